"""Test-only fault injection, read from the environment once, in one place.

XPAR_TEST_CRASH_AFTER_STEP=N     SIGKILL this process right after step N (a lost node).
XPAR_TEST_CRASH_BEFORE_PUBLISH=N exit after writing checkpoint N but before `latest` moves.
XPAR_TEST_RAISE_AFTER_STEP=N     raise InjectedFault after step N (a bug in the loop).

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


class InjectedFault(RuntimeError):
    """Raised by XPAR_TEST_RAISE_AFTER_STEP: the trainer must clean up after it."""


@dataclass(frozen=True)
class FaultHooks:
    crash_after_step: int = 0  # 0: never
    crash_before_publish: int = 0
    raise_after_step: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FaultHooks:
        env = os.environ if env is None else env
        return cls(
            crash_after_step=int(env.get(CRASH_AFTER_STEP, "0") or 0),
            crash_before_publish=int(env.get(CRASH_BEFORE_PUBLISH, "0") or 0),
            raise_after_step=int(env.get(RAISE_AFTER_STEP, "0") or 0),
        )

    def after_step(self, step: int) -> None:
        if self.crash_after_step and step == self.crash_after_step:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a preempted node, no cleanup
        if self.raise_after_step and step == self.raise_after_step:
            raise InjectedFault(f"{RAISE_AFTER_STEP}={step}")

    def before_publish(self, step: int) -> None:
        if self.crash_before_publish and step == self.crash_before_publish:
            os._exit(3)  # a crash after writing, before the pointer moves
