"""The LR schedule: warmup, then constant, cosine or linear to min_lr (a pure function)."""

from __future__ import annotations

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.train.schedule import make_lr_lambda


def test_lr_schedules():
    cos = make_lr_lambda(schedule="cosine", lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [cos(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert cos(4) == pytest.approx(1.0)
    assert cos(9) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert cos(14) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    lin = make_lr_lambda(schedule="linear", lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10)
    assert [lin(s) for s in (0, 5, 10, 11)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    const = make_lr_lambda(schedule="constant", lr=1.0, min_lr=0.0, warmup_steps=1, total_steps=5)
    assert [const(s) for s in (0, 1, 50)] == pytest.approx([0.5, 1.0, 1.0])
    with pytest.raises(XparConfigError, match="optim.schedule"):
        make_lr_lambda(schedule="step", lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=5)


def test_a_restored_scheduler_continues_with_the_same_lr_bitwise():
    f = make_lr_lambda(schedule="cosine", lr=3e-3, min_lr=3e-4, warmup_steps=3, total_steps=20)

    def build():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)

    opt_a, sched_a = build()
    for _ in range(7):
        opt_a.step()
        sched_a.step()
    opt_b, sched_b = build()
    opt_b.load_state_dict(opt_a.state_dict())  # as a checkpoint restores both
    sched_b.load_state_dict(sched_a.state_dict())
    for _ in range(5):
        assert (
            opt_b.param_groups[0]["lr"]
            == opt_a.param_groups[0]["lr"]
            == 3e-3 * f(sched_a.last_epoch)
        )
        for opt, sched in ((opt_a, sched_a), (opt_b, sched_b)):
            opt.step()
            sched.step()
