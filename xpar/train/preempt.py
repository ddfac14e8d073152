"""Preemption: catch the scheduler's warning signal, agree on a stop step, requeue.

How a preempted Slurm job flows (see launch/slurm.sbatch):

1. Slurm sends the warning signal (``#SBATCH --signal=B:USR1@120``) to the batch
   shell only. torchrun would not forward USR1 to its workers anyway, so the
   batch script forwards it by creating the flag file named in
   ``$XPAR_PREEMPT_FLAG``. Every rank also handles the real signal, for
   launches that deliver it to the workers directly (``srun python ...``,
   submitit, ``scancel --signal=USR1`` on the steps).
2. Every rank calls ``watcher.should_stop(step)`` once per step; one tiny
   all-reduce MAX makes all ranks see the signal at the same step, so they all
   save the same checkpoint and none is left waiting in a collective.
3. The trainer saves, then calls ``watcher.requeue_if_slurm()`` and exits with
   ``watcher.exit_code()``. Under our batch script rank 0 only writes
   ``$XPAR_REQUEUE_FILE`` and the batch script runs ``scontrol requeue`` once
   all nodes have exited; elsewhere rank 0 runs ``scontrol requeue`` itself.

SIGTERM (scancel, time limit, Slurm's own preempt-requeue) also stops the run
with a checkpoint, but never requeues: a cancelled job must stay cancelled.

train.max_time_s is the same agreement with a clock instead of a signal:
``watcher.limit_time(seconds)`` as the loop starts, and the first step at which any
rank is past the limit is every rank's stop step (the flag travels in the same
all-reduce). It is the user's own limit: exit 0, never a requeue.

Trainer loop::

    watcher = PreemptionWatcher()          # after init_process_group
    for step in range(start, steps):
        ...train one step...
        if watcher.should_stop(step):
            save_checkpoint(step)
            break
    watcher.requeue_if_slurm()
    watcher.uninstall()
    sys.exit(watcher.exit_code())
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

import torch
import torch.distributed as dist

from xpar.parallel.watchdog import collective

_AGREE = collective("all_reduce (stop-step agreement: preemption signal, train.max_time_s)")

# sysexits.h EX_TEMPFAIL: "try again later". Used when a run stopped early
# because of a signal and no elastic agent sits between us and the scheduler.
EXIT_PREEMPTED = 75

ENV_SIGNAL = "XPAR_PREEMPT_SIGNAL"  # e.g. "USR1", "SIGUSR2", "12"
ENV_FLAG = "XPAR_PREEMPT_FLAG"  # a path; its existence means "the warning signal came"
ENV_REQUEUE_FILE = "XPAR_REQUEUE_FILE"  # set by slurm.sbatch: it requeues, we only ask


def parse_signal(sig: int | str | signal.Signals) -> signal.Signals:
    """Accept 10, "10", "USR1", "SIGUSR1" or signal.SIGUSR1."""
    if isinstance(sig, signal.Signals):
        return sig
    if isinstance(sig, int) or (isinstance(sig, str) and sig.strip().isdigit()):
        return signal.Signals(int(sig))
    name = sig.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {sig!r}; use a name like USR1 or a number") from None


class PreemptionWatcher:
    """Turn scheduler signals into one stop step that every rank agrees on.

    warning_signal: the signal that announces the end of the allocation
        (default: $XPAR_PREEMPT_SIGNAL, else SIGUSR1). It leads to a requeue.
    check_every: all-reduce the flag only every k steps (all ranks must call
        should_stop with the same steps); 1 costs one int32 all-reduce per step.
    group: process group to agree over (default: the world, if initialised).
    flag_file: a path whose existence counts as the warning signal (default:
        $XPAR_PREEMPT_FLAG); this is how the batch script forwards USR1.
    handle_sigterm: also stop (without requeue) on SIGTERM.
    clock: seconds, for limit_time (tests pass their own).
    Signal handlers can only be installed from the main thread.
    """

    def __init__(
        self,
        warning_signal: int | str | signal.Signals | None = None,
        *,
        check_every: int = 1,
        group: dist.ProcessGroup | None = None,
        flag_file: str | None = None,
        handle_sigterm: bool = True,
        install: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if check_every < 1:
            raise ValueError(f"check_every={check_every} must be >= 1")
        if warning_signal is None:
            warning_signal = os.environ.get(ENV_SIGNAL, "SIGUSR1")
        self.warning_signal = parse_signal(warning_signal)
        self.check_every = check_every
        self.group = group
        self.flag_file = flag_file if flag_file is not None else os.environ.get(ENV_FLAG) or None
        self.signals = [self.warning_signal]
        if handle_sigterm and self.warning_signal != signal.SIGTERM:
            self.signals.append(signal.SIGTERM)
        self._received: signal.Signals | None = None  # first signal seen by this process
        self._received_at: float | None = None
        self._agreed: signal.Signals | None = None  # signal all ranks agreed to stop on
        self.stop_step: int | None = None
        self._clock = clock
        self._started: float | None = None  # limit_time's start
        self._limit_s = 0.0
        self.out_of_time = False  # all ranks agreed the time limit was reached
        self._previous: dict[signal.Signals, object] = {}
        self._flag_buf: torch.Tensor | None = None
        if install:
            self.install()

    # -- signal handling ------------------------------------------------------
    def install(self) -> None:
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGTERM and self._received == signal.SIGTERM:
            # A second SIGTERM means "now": fall back to what was there before us.
            prev = self._previous.get(sig, signal.SIG_DFL)
            signal.signal(sig, prev)
            os.kill(os.getpid(), sig)
            return
        # SIGTERM outranks the warning: it must not be turned into a requeue later.
        if self._received is None or sig == signal.SIGTERM:
            self._received = sig
            self._received_at = time.time()

    @property
    def received(self) -> signal.Signals | None:
        """The signal this process saw (the flag file counts as the warning signal)."""
        if self._received is None and self.flag_file and os.path.exists(self.flag_file):
            self._received = self.warning_signal
            self._received_at = time.time()
        return self._received

    @property
    def stopped_by(self) -> signal.Signals | None:
        """The signal all ranks agreed to stop on, or None."""
        return self._agreed

    # -- the time limit -------------------------------------------------------
    def limit_time(self, seconds: float) -> None:
        """Stop once `seconds` have passed from now (0: no limit), agreed like a signal."""
        self._started, self._limit_s = self._clock(), float(seconds)

    def elapsed(self) -> float:
        """Seconds since limit_time was called (0 before)."""
        return 0.0 if self._started is None else self._clock() - self._started

    def _late(self) -> bool:
        return self._started is not None and self._limit_s > 0 and self.elapsed() >= self._limit_s

    # -- agreement ------------------------------------------------------------
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _buffer(self) -> torch.Tensor:
        if self._flag_buf is None:
            device = "cpu"
            if dist.get_backend(self.group) == "nccl":
                device = f"cuda:{torch.cuda.current_device()}"
            self._flag_buf = torch.zeros(2, dtype=torch.int32, device=device)
        return self._flag_buf

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank got a signal or ran out of time.

        Collective: every rank of the group must call it with the same steps.
        Once True it stays True (without further communication).
        """
        if self.stop_step is not None:
            return True
        if step % self.check_every != 0:
            return False
        local = self.received
        # Encode "nothing" as 0 and otherwise the signal number, with SIGTERM
        # mapped above any warning signal so that MAX prefers it.
        code = 0 if local is None else (1000 if local == signal.SIGTERM else int(local))
        late = int(self._late())
        if self._distributed():
            buf = self._buffer()
            buf[0], buf[1] = code, late
            with _AGREE:  # .item() waits for the result (NCCL returns before it ends)
                dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
                code, late = int(buf[0].item()), int(buf[1].item())
        if code == 0 and not late:
            return False
        self.stop_step, self.out_of_time = step, bool(late)
        if code == 0:
            return True  # the trainer names train.max_time_s in its own line
        self._agreed = signal.SIGTERM if code == 1000 else signal.Signals(code)
        if self._rank() == 0:
            print(
                f"[xpar] {self._agreed.name} received: all ranks stop after step {step}",
                file=sys.stderr,
                flush=True,
            )
        return True

    def _rank(self) -> int:
        return dist.get_rank() if self._distributed() else int(os.environ.get("RANK", "0"))

    # -- after the checkpoint is saved ---------------------------------------
    def _stop_signal(self) -> signal.Signals | None:
        return self._agreed if self._agreed is not None else self.received

    def wants_requeue(self) -> bool:
        """Stopped because of the warning signal (not SIGTERM, not the time limit)."""
        return not self.out_of_time and self._stop_signal() == self.warning_signal

    def requeue_if_slurm(self) -> bool:
        """Ask Slurm to requeue this job; call after the checkpoint is saved.

        Acts on rank 0 only, under Slurm only ($SLURM_JOB_ID), and only when
        the run stopped on the warning signal. If $XPAR_REQUEUE_FILE is set
        (our batch script), writes that file and lets the batch script requeue
        once every node has exited; otherwise runs `scontrol requeue`.
        Returns True when a requeue was requested.
        """
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id or not self.wants_requeue() or self._rank() != 0:
            return False
        sig = self._stop_signal()
        assert sig is not None
        request_file = os.environ.get(ENV_REQUEUE_FILE)
        if request_file:
            os.makedirs(os.path.dirname(os.path.abspath(request_file)), exist_ok=True)
            tmp = request_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"job_id": job_id, "step": self.stop_step, "signal": sig.name}, f)
            os.replace(tmp, request_file)  # atomic: the batch script never reads half a file
            print(f"[xpar] requeue requested in {request_file}", file=sys.stderr, flush=True)
            return True
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            print(
                f"[xpar] scontrol requeue {job_id} failed ({proc.returncode}): "
                f"{proc.stderr.strip()}",
                file=sys.stderr,
                flush=True,
            )
            return False
        print(f"[xpar] job {job_id} requeued", file=sys.stderr, flush=True)
        return True

    def exit_code(self) -> int:
        """Exit status for the trainer process.

        0 when the run was not stopped by a signal (a time limit is not one). When it was: 0 under
        torchrun, because torchrun reads any other status as a crash (it would
        restart the workers or print a failure); EXIT_PREEMPTED (75) when the
        process talks to the scheduler directly (srun, submitit).
        """
        if self._stop_signal() is None:
            return 0
        if "TORCHELASTIC_RUN_ID" in os.environ:
            return 0
        return EXIT_PREEMPTED
