"""Test-only fault injection, read from the environment once, in one place.

XPAR_TEST_CRASH_AFTER_STEP=N     SIGKILL this process right after step N (a lost node).
XPAR_TEST_CRASH_BEFORE_PUBLISH=N exit after writing checkpoint N but before `latest` moves.
XPAR_TEST_RAISE_AFTER_STEP=N     raise InjectedFault after step N (a bug in the loop).
XPAR_TEST_NAN_LOSS=R:N           rank R's loss is NaN at step N ("R:N+": at N and after).
XPAR_TEST_ENOSPC_AT_SAVE=N       the checkpoint writer fails with ENOSPC (a full disk) on its
                                 first file of step N's save, after writing it ("R:N": on
                                 rank R only).

Unset (the normal case) they do nothing. The resume and crash-mid-save tests use them.
The checkpoint writer has no run to ask, so it reads them through `active()`.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CRASH_AFTER_STEP = "XPAR_TEST_CRASH_AFTER_STEP"
CRASH_BEFORE_PUBLISH = "XPAR_TEST_CRASH_BEFORE_PUBLISH"
RAISE_AFTER_STEP = "XPAR_TEST_RAISE_AFTER_STEP"
NAN_LOSS = "XPAR_TEST_NAN_LOSS"
ENOSPC_AT_SAVE = "XPAR_TEST_ENOSPC_AT_SAVE"


class InjectedFault(RuntimeError):
    """Raised by XPAR_TEST_RAISE_AFTER_STEP: the trainer must clean up after it."""


@dataclass(frozen=True)
class FaultHooks:
    crash_after_step: int = 0  # 0: never
    crash_before_publish: int = 0
    raise_after_step: int = 0
    nan_loss: str = ""  # "R:N" or "R:N+"
    enospc_at_save: str = ""  # "N" or "R:N"
    rank: int = 0  # this process's (the launcher's RANK): for the writer, which has no run

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FaultHooks:
        env = os.environ if env is None else env
        return cls(
            crash_after_step=int(env.get(CRASH_AFTER_STEP, "0") or 0),
            crash_before_publish=int(env.get(CRASH_BEFORE_PUBLISH, "0") or 0),
            raise_after_step=int(env.get(RAISE_AFTER_STEP, "0") or 0),
            nan_loss=env.get(NAN_LOSS, ""),
            enospc_at_save=env.get(ENOSPC_AT_SAVE, ""),
            rank=int(env.get("RANK", "0") or 0),
        )

    def loss_is_nan(self, rank: int, step: int) -> bool:
        """Whether XPAR_TEST_NAN_LOSS poisons this rank's loss at this step."""
        if not self.nan_loss:
            return False
        r, _, n = self.nan_loss.partition(":")
        onwards = n.endswith("+")
        first = int(n.rstrip("+"))
        return int(r) == rank and (step == first or (onwards and step > first))

    def after_step(self, step: int) -> None:
        if self.crash_after_step and step == self.crash_after_step:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a preempted node, no cleanup
        if self.raise_after_step and step == self.raise_after_step:
            raise InjectedFault(f"{RAISE_AFTER_STEP}={step}")

    def before_publish(self, step: int) -> None:
        if self.crash_before_publish and step == self.crash_before_publish:
            os._exit(3)  # a crash after writing, before the pointer moves

    def before_replace(self, path: Path) -> None:
        """The atomic writer, before it renames `path` into place: XPAR_TEST_ENOSPC_AT_SAVE."""
        if not self.enospc_at_save:
            return
        r, _, n = self.enospc_at_save.rpartition(":")
        if path.parent.name == f"step_{int(n):08d}" and (not r or int(r) == self.rank):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({ENOSPC_AT_SAVE})")


@functools.cache
def active() -> FaultHooks:
    """This process's hooks, read from the environment once."""
    return FaultHooks.from_env()
