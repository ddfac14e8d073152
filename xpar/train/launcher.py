"""A torchrun worker dies with its launcher.

torchrun starts each worker in a session of its own (start_new_session), so a
`kill -KILL` of torchrun or of its process group leaves the workers running as orphans:
they train on, write checkpoints, and race the next run into the same out_dir. Under
torchrun the worker therefore asks the kernel (Linux prctl PR_SET_PDEATHSIG) for SIGKILL
when its parent dies.

Why SIGKILL and not SIGTERM (which xpar.train.preempt turns into a saved checkpoint):
a dead launcher takes the job's store with it (torchrun's agent hosts it), so nothing
that reaches other ranks through the store works any more, and a save now would be
written into an out_dir the next run may already be starting in. `kill -KILL` of the
launcher means "stop now"; a graceful stop is `kill -TERM` of torchrun, which forwards
it to the workers, and the preemption path saves. A checkpoint is published last
(xpar.train.checkpoint), so a worker killed mid-save leaves the previous one intact.

The death signal fires when the *thread* that forked the worker exits: torchrun starts
its workers from its main thread (checked with torch 2.13), so it fires with torchrun.
A launcher that died before the prctl call is caught by comparing the parent pid after
it (reparented to init or a subreaper). Outside torchrun (a plain `python -m xpar.train`,
srun, submitit) nothing is set: a run started under `nohup` must outlive its shell.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEATH_SIGNAL = signal.SIGKILL


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a torchrun worker (its parent is the elastic agent)."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env


def die_with_launcher(env: Mapping[str, str] | None = None) -> bool:
    """Under torchrun on Linux: SIGKILL this process when torchrun dies. True when set."""
    if not under_torchrun(env) or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0) != 0:
        return False  # not fatal: the worker just behaves as before
    # torchrun died before the prctl: this worker was reparented and no signal will come.
    if parent == 1 or os.getppid() != parent:
        os.kill(os.getpid(), DEATH_SIGNAL)
    return True
