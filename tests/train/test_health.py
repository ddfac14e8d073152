"""The step guard: a non-finite step is skipped on every rank, a run that stays bad stops.

The unit tests pin the rules; the 2-rank runs inject a NaN loss on rank 1 for real
(XPAR_TEST_NAN_LOSS) under ZeRO-0 (xpar's own skip) and ZeRO-2 (DeepSpeed's overflow
check), and a learning rate that makes the run diverge.
"""

import math
import time
import warnings

import pytest
import torch
from torch import nn

from tests.fixtures import golden
from xpar.config.store import XparConfigWarning
from xpar.train import health
from xpar.train.faults import NAN_LOSS


def test_a_bad_step_counts_and_enough_in_a_row_stop_the_run():
    h = health.StepHealth(max_bad_steps=3, max_loss=10.0)
    assert h.record(1, 5.0, None) is None
    assert "skipped on every rank" in h.record(2, math.nan, "non-finite loss on rank 1")
    assert h.record(3, 5.0, None) is None and h.in_a_row == 0  # a good step resets
    for step in (4, 5):
        h.record(step, math.nan, "x")
    assert h.stop_reason is None
    line = h.record(6, math.nan, "x")
    assert "3 of train.max_bad_steps=3" in line
    assert "3 bad steps in a row" in h.stop_reason and h.skipped == 4


def test_a_finite_loss_above_max_loss_is_applied_but_counts_as_diverged():
    h = health.StepHealth(max_bad_steps=2, max_loss=10.0)
    assert "diverged" in h.record(1, 11.0, None) and h.skipped == 0
    h.record(2, 1e9, None)
    assert "diverged" in h.stop_reason
    assert health.max_loss_for(0.0, 256) == pytest.approx(4 * math.log(256))
    assert health.max_loss_for(7.0, 256) == 7.0


def test_the_line_names_the_rank_where_the_loss_went_bad_before_those_whose_grads_did():
    # A NaN loss on rank 1 makes every rank's reduced gradients NaN: rank 1 is the origin.
    line = health.describe([health.BAD_GRADS, health.BAD_LOSS], ["blocks.0.w", "the loss"])
    assert line == "non-finite loss on rank 1 (first: the loss)"
    line = health.describe([health.BAD_GRADS, health.BAD_GRADS], ["blocks.0.w", "blocks.0.w"])
    assert line == "non-finite gradients on ranks 0, 1 (first: blocks.0.w)"
    assert "overflow check" in health.describe([], [])


def test_first_nonfinite_grad_and_weights_finite():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert health.first_nonfinite_grad(m) is None  # no gradients yet
    m(torch.ones(1, 2)).sum().backward()
    assert health.first_nonfinite_grad(m) is None
    m[1].bias.grad[0] = math.inf
    assert health.first_nonfinite_grad(m) == "1.bias"
    assert health.weights_finite(m)
    with torch.no_grad():
        m[0].weight[0, 0] = math.nan
    assert not health.weights_finite(m)


def test_routing_that_drops_most_tokens_warns_once():
    w = health.DropWatch(capacity_factor=0.01)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(health.DROP_WARN_STEPS - 1):
            w.record([0.98, 0.97])
        w.record([0.1, 0.1])  # one healthy step resets the count
        for _ in range(3 * health.DROP_WARN_STEPS):
            w.record([0.98, 0.97])
    msgs = [str(x.message) for x in seen if issubclass(x.category, XparConfigWarning)]
    assert len(msgs) == 1 and "98% of token assignments" in msgs[0]
    assert "moe.capacity_factor=0.01" in msgs[0]


# --------------------------------------------------------------------------- real runs


def _stopped_unhealthy(p) -> bool:
    # torchrun exits 1 when a worker fails; its summary names the worker's own exit code.
    return p.returncode == 1 and f"exitcode  : {health.EXIT_UNHEALTHY} " in p.stderr


def _run(tmp_path, name, extra, env=None):
    out = tmp_path / name
    t0 = time.monotonic()
    p = golden.torchrun(
        out,
        golden.TINY + golden.data_overrides(tmp_path / "cache") + extra,
        check=False,
        env=env,
    )
    return out, p, time.monotonic() - t0


def _rank_weights_finite(step_dir) -> bool:
    for f in sorted(step_dir.glob("rank*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        if not all(
            torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point()
        ):
            return False
    return True


@pytest.mark.slow
def test_one_nan_loss_under_zero0_is_skipped_everywhere_and_training_goes_on(tmp_path):
    out, p, _ = _run(
        tmp_path,
        "zero0",
        ["parallel=zero0", "train.ckpt_every=3", "train.keep_checkpoints=1"],
        env={NAN_LOSS: "1:5"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    said = [ln for ln in p.stdout.splitlines() if ln.startswith("step 5:")]
    assert len(said) == 1, p.stdout[-3000:]  # rank 0 speaks, once
    assert "non-finite loss on rank 1 (first: the loss)" in said[0]
    assert "skipped on every rank" in said[0]
    losses = golden.losses(out)
    assert math.isnan(losses[5]) and all(math.isfinite(losses[s]) for s in (1, 2, 3, 4, 6))
    assert _rank_weights_finite(out / "checkpoints" / "step_00000006")


@pytest.mark.slow
def test_nan_at_every_step_under_zero2_stops_the_run_non_zero_without_a_bad_checkpoint(tmp_path):
    out, p, took = _run(
        tmp_path,
        "zero2",
        ["parallel=zero2", "train.steps=12", "train.ckpt_every=2", "train.max_bad_steps=3"],
        env={NAN_LOSS: "1:4+"},
    )
    assert _stopped_unhealthy(p), p.stdout[-3000:] + p.stderr[-3000:]
    assert "stopping at step 6: 3 bad steps in a row" in p.stdout, p.stdout[-3000:]
    assert "non-finite loss on rank 1" in p.stdout
    steps = sorted(d.name for d in (out / "checkpoints").glob("step_*"))
    assert steps[-1] <= "step_00000006", steps  # nothing after the stop
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert _rank_weights_finite(latest)
    print(f"NaN from step 4 to a stop at step 6 with exit 7: {took:.1f}s for the whole run")


@pytest.mark.slow
def test_a_diverging_learning_rate_stops_the_run(tmp_path):
    _, p, _ = _run(tmp_path, "diverge", ["optim.lr=1e6", "train.steps=30", "train.max_bad_steps=3"])
    assert _stopped_unhealthy(p), p.stdout[-3000:] + p.stderr[-3000:]
    assert "bad steps in a row" in p.stdout
