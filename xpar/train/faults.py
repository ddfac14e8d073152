"""Test-only fault injection, read from the environment once, in one place.

XPAR_TEST_CRASH_AFTER_STEP=N     SIGKILL this process right after step N (a lost node).
XPAR_TEST_CRASH_BEFORE_PUBLISH=N exit after writing checkpoint N but before `latest` moves.
XPAR_TEST_RAISE_AFTER_STEP=N     raise InjectedFault after step N (a bug in the loop).
XPAR_TEST_NAN_LOSS=R:N           rank R's loss is NaN at step N ("R:N+": at N and after).

Unset (the normal case) they do nothing. The resume and crash-mid-save tests use them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

CRASH_AFTER_STEP = "XPAR_TEST_CRASH_AFTER_STEP"
CRASH_BEFORE_PUBLISH = "XPAR_TEST_CRASH_BEFORE_PUBLISH"
RAISE_AFTER_STEP = "XPAR_TEST_RAISE_AFTER_STEP"
NAN_LOSS = "XPAR_TEST_NAN_LOSS"


class InjectedFault(RuntimeError):
    """Raised by XPAR_TEST_RAISE_AFTER_STEP: the trainer must clean up after it."""


@dataclass(frozen=True)
class FaultHooks:
    crash_after_step: int = 0  # 0: never
    crash_before_publish: int = 0
    raise_after_step: int = 0
    nan_loss: str = ""  # "R:N" or "R:N+"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FaultHooks:
        env = os.environ if env is None else env
        return cls(
            crash_after_step=int(env.get(CRASH_AFTER_STEP, "0") or 0),
            crash_before_publish=int(env.get(CRASH_BEFORE_PUBLISH, "0") or 0),
            raise_after_step=int(env.get(RAISE_AFTER_STEP, "0") or 0),
            nan_loss=env.get(NAN_LOSS, ""),
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
