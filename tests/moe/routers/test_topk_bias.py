"""Aux-loss-free balancing in top-k: the bias steers the choice, not the weight, moves once per
optimizer step from the global load, is the same on every rank and lives in the checkpoint."""

import copy
import json

import pytest
import torch

from tests.fixtures import golden
from xpar.errors import XparConfigError
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.routers.topk import TopKRouter
from xpar.testing.moe_reference import naive_moe

RATE = {"bias_update_rate": 0.01}


def _router(**kw) -> TopKRouter:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=4, router_options=kw)
    return TopKRouter(8, cfg)


def test_off_by_default_and_the_state_dict_is_unchanged():
    assert not _router().updates_after_step and list(_router().state_dict()) == ["weight"]
    r = _router(**RATE)
    assert r.updates_after_step and sorted(r.state_dict()) == ["expert_bias_E", "weight"]
    with pytest.raises(XparConfigError, match=r"bias_update_rate"):
        MoEConfig(router_options={"bias_update_rate": -1})


def test_the_bias_changes_which_experts_are_chosen_but_not_their_weights():
    r = _router(**RATE)
    x = torch.randn(64, 8)
    plain = r(x, capacity_factor=None)
    r.expert_bias_E[0] = 10.0  # every token now picks expert 0 ...
    biased = r(x, capacity_factor=None)
    assert int(biased.counts_E[0]) == 64 and int(plain.counts_E[0]) < 64
    probs = torch.softmax(x @ r.weight.detach().t(), dim=-1)
    # ... with its own unbiased probability, renormalised over its two choices
    rows = biased.token_idx_A[biased.expert_idx_A == 0]
    others = {int(t): float(probs[t, 0]) for t in rows}
    weights = biased.weight_A.detach()
    for t, w, e in zip(biased.token_idx_A, weights, biased.expert_idx_A, strict=True):
        if int(e) == 0:
            mate = [
                int(e2)
                for t2, e2 in zip(biased.token_idx_A, biased.expert_idx_A, strict=True)
                if int(t2) == int(t) and int(e2) != 0
            ][0]
            want = others[int(t)] / (others[int(t)] + float(probs[t, mate]))
            assert float(w) == pytest.approx(want, rel=1e-5)


def test_the_update_moves_overloaded_experts_down_and_underloaded_up():
    r = _router(**RATE)
    r.after_optimizer_step(torch.tensor([10.0, 2.0, 4.0, 4.0], dtype=torch.float64))
    assert r.expert_bias_E.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])


def test_the_layer_with_a_bias_matches_the_naive_reference():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6, capacity_factor=1.0, router_options=RATE)
    layer = MoELayer(12, cfg)
    layer.router.expert_bias_E.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    ref = copy.deepcopy(layer)
    x = torch.randn(30, 12)
    y, _ = layer(x)
    y_ref, _, _ = naive_moe(ref, x, cfg.capacity_factor)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_two_ranks_keep_the_same_bias_and_save_it(tmp_path):
    out = tmp_path / "run"
    golden.torchrun(
        out,
        golden.TINY
        + golden.data_overrides(tmp_path / "cache")
        + ["+moe.router_options.bias_update_rate=0.01"],
    )
    step = out / "checkpoints" / "step_00000006"
    biases = []
    for f in sorted(step.glob("rank*.pt")):
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        biases.append({k: v for k, v in module.items() if k.endswith("expert_bias_E")})
    assert len(biases) == 2 and len(biases[0]) == 2  # 2 MoE layers
    for name, b in biases[0].items():
        assert torch.equal(b, biases[1][name]), name  # identical on every rank
        # six applied steps of +-0.01 each: a multiple of 0.01, and it has moved
        assert b.abs().max() > 0 and (b.abs() <= 0.06 + 1e-6).all(), b
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
