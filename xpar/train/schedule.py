"""The learning-rate schedule: a multiplier of the base lr as a pure function of the step.

The adapter wraps it in a LambdaLR that the engine steps and the checkpoint saves, so a
resumed run computes exactly the lr the uninterrupted run would have.

On resume the schedule's length is the checkpoint's (`schedule_steps` in client_state.json),
not train.steps: a run extended past it holds optim.min_lr (the floor every decay ends on)
instead of re-stretching the curve, which would jump the lr back up mid-run; a run stopped
short of it ends on the saved curve. `resume_note` is the one line that says so. To decay
over a longer run, start one (train.init_from=<checkpoint> keeps the weights).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from xpar.errors import XparConfigError

SCHEDULES = ("cosine", "constant", "linear")


def make_lr_lambda(
    *,
    schedule: str,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (a pure function: resume is exact).

    Linear warmup from lr/(warmup+1) to lr over warmup_steps, then "constant",
    "cosine" (to min_lr at total_steps) or "linear" (to min_lr at total_steps).
    """
    if schedule not in SCHEDULES:
        raise XparConfigError(
            f"optim.schedule={schedule!r} is invalid: use 'cosine', 'constant' or 'linear'"
        )
    return functools.partial(
        _lr_multiplier,
        schedule=schedule,
        floor=min_lr / lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
    )


def _lr_multiplier(
    step: int, *, schedule: str, floor: float, warmup_steps: int, total_steps: int
) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return floor + (1 - floor) * (1 - t)


def resume_note(*, schedule: str, saved_steps: int, steps: int, min_lr: float) -> str | None:
    """The line a resume prints when train.steps differs from the saved schedule's length."""
    if steps == saved_steps or schedule == "constant":
        return None  # a constant schedule does not depend on its length
    kept = (
        f"optim.schedule={schedule} keeps the checkpoint's length of {saved_steps} steps "
        f"(train.steps={steps} does not re-stretch it)"
    )
    if steps > saved_steps:
        return f"{kept}: steps {saved_steps + 1}..{steps} hold optim.min_lr={min_lr:g}"
    return f"{kept}: the run ends at step {steps}, before the schedule reaches optim.min_lr"
