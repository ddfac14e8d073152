"""Training health: a bad step is skipped on every rank, a run that stays bad stops.

A step is bad when its loss or gradients are not finite on any rank. Every rank puts its
own verdict into its slot of the step's loss all-reduce (no extra collective), so all ranks
see the same verdict in the same step and skip the optimizer step together: the weights
and optimizer moments stay as they were, the data and the LR schedule move on. A finite
loss above train.max_loss (default 4 x ln(vocab): four times the loss of a uniform guess)
is a diverged step: it is applied, but counts as bad. train.max_bad_steps bad steps in a
row stop the run with EXIT_UNHEALTHY and no checkpoint of those weights; a checkpoint is
never written from non-finite weights (`weights_finite`, checked by every save).

Routing health: when most token assignments are dropped for many steps in a row (a
capacity factor far too small), one warning says so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from xpar.config.store import XparConfigWarning

# A run stopped because its steps stayed bad: distinct from 1 (crash), 2 (config), 4 (nothing
# to do), 6 (a collective timed out), 75 (preempted).
EXIT_UNHEALTHY = 7

OK, BAD_LOSS, BAD_GRADS = 0, 1, 2  # a rank's verdict in the step's all-reduce
DEFAULT_LOSS_FACTOR = 4.0  # max_loss = this x ln(vocab) when train.max_loss=0
DROP_WARN_FRACTION = 0.5  # of token assignments dropped, mean over the MoE layers
DROP_WARN_STEPS = 20  # steps in a row above it before the warning


def max_loss_for(max_loss: float, vocab_size: int) -> float:
    return max_loss if max_loss > 0 else DEFAULT_LOSS_FACTOR * math.log(vocab_size)


def first_nonfinite_grad(module: nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or inf (None: all finite).

    One device sync for the whole model; names are looked up only when something is wrong.
    """
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(g).all() for _, g in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def weights_finite(module: nn.Module) -> bool:
    """Whether every parameter of this rank is finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in module.parameters()]).all())


def describe(verdicts: list[int], names: list[str | None]) -> str:
    """Where a bad step came from: the ranks whose loss was not finite first (a NaN loss
    makes every rank's reduced gradients NaN), else those whose gradients were not."""
    for code, what in ((BAD_LOSS, "loss"), (BAD_GRADS, "gradients")):
        ranks = [r for r, v in enumerate(verdicts) if v == code]
        if ranks:
            first = names[ranks[0]] or what
            return (
                f"non-finite {what} on rank{'s' if len(ranks) > 1 else ''} "
                f"{', '.join(map(str, ranks))} (first: {first})"
            )
    return "non-finite gradients (found by DeepSpeed's overflow check)"


@dataclass
class StepHealth:
    """Counts bad steps in a row; says when the run must stop and why."""

    max_bad_steps: int
    max_loss: float
    in_a_row: int = 0
    skipped: int = 0  # over the run
    stop_reason: str | None = None

    def record(self, step: int, loss: float, bad: str | None) -> str | None:
        """One step's verdict (`bad`: why it was skipped, None if applied); returns the line
        to print for a bad step (None for a good one). Sets stop_reason when the run must stop."""
        if bad is None and math.isfinite(loss) and loss > self.max_loss:
            bad = f"loss {loss:.4g} above train.max_loss={self.max_loss:.4g} (diverged)"
            what = "applied"
        elif bad is not None:
            self.skipped += 1
            what = "skipped on every rank: weights and optimizer state unchanged"
        else:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        line = f"step {step}: {bad}; {what} ({self.in_a_row} of train.max_bad_steps="
        line += f"{self.max_bad_steps} in a row)"
        if self.in_a_row >= self.max_bad_steps:
            self.stop_reason = (
                f"{self.in_a_row} bad steps in a row (last: {bad}); no checkpoint is written "
                "from these weights. Lower optim.lr, raise optim.warmup_steps or set "
                "optim.grad_clip, then resume from the last checkpoint"
            )
        return line


@dataclass
class DropWatch:
    """Warns once when most token assignments are dropped for DROP_WARN_STEPS steps in a row."""

    capacity_factor: float | None
    in_a_row: int = 0
    warned: bool = False

    def record(self, dropped_fractions: list[float]) -> None:
        if self.warned or not dropped_fractions:
            return
        mean = sum(dropped_fractions) / len(dropped_fractions)
        self.in_a_row = self.in_a_row + 1 if mean > DROP_WARN_FRACTION else 0
        if self.in_a_row >= DROP_WARN_STEPS:
            self.warned = True
            warnings.warn(
                f"moe: {mean:.0%} of token assignments were dropped (over capacity) in each of "
                f"the last {self.in_a_row} steps (mean over the MoE layers): those tokens skip "
                f"their experts. moe.capacity_factor={self.capacity_factor} is far too small; "
                "raise it (1.0 to 2.0 is usual) or set moe.capacity_factor=null (dropless)",
                XparConfigWarning,
                stacklevel=2,
            )
