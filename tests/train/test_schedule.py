"""The LR schedule: warmup, then constant, cosine or linear to min_lr (a pure function); on
resume it keeps the checkpoint's length (the rule and its line)."""

from __future__ import annotations

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.train.schedule import make_lr_lambda, resume_note


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


def test_a_resumed_schedule_keeps_its_length_and_holds_min_lr_after_it():
    # A 10-step cosine extended to 20 on resume: built over the saved 10 steps (the rule),
    # steps 11..20 stay at min_lr; re-stretched over 20, step 11 would jump back up.
    kept = make_lr_lambda(schedule="cosine", lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=10)
    stretched = make_lr_lambda(
        schedule="cosine", lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=20
    )
    assert [3e-3 * kept(s) for s in range(10, 20)] == pytest.approx([3e-4] * 10)
    assert 3e-3 * stretched(10) > 1.5e-3  # what the resume used to do


def test_resume_note_says_the_rule_when_it_applies():
    note = resume_note(schedule="cosine", saved_steps=10, steps=20, min_lr=3e-4)
    assert note == (
        "optim.schedule=cosine keeps the checkpoint's length of 10 steps (train.steps=20 does "
        "not re-stretch it): steps 11..20 hold optim.min_lr=0.0003"
    )
    short = resume_note(schedule="linear", saved_steps=10, steps=5, min_lr=0.0)
    assert short.endswith("the run ends at step 5, before the schedule reaches optim.min_lr")
    assert resume_note(schedule="cosine", saved_steps=10, steps=10, min_lr=3e-4) is None
    assert resume_note(schedule="constant", saved_steps=10, steps=20, min_lr=3e-4) is None
