"""MoELayer equals the naive per-token reference, forward and every gradient."""

import copy

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.moe import MoEConfig, MoELayer
from xpar.testing.moe_reference import naive_moe

ROUTINGS = {
    "switch_k1_probs": dict(top_k=1, capacity_factor=1.0, drop_policy="probs"),
    "gshard_k2_probs": dict(top_k=2, capacity_factor=0.75, drop_policy="probs"),
    "gshard_k2_position": dict(top_k=2, capacity_factor=0.75, drop_policy="position"),
    "k3_no_renorm": dict(top_k=3, capacity_factor=1.0, renormalize=False),
    "dropless_k2": dict(top_k=2, capacity_factor=None),
    "expert_choice": dict(router="expert_choice", top_k=1, capacity_factor=1.5),
}
ACTIVATIONS = ["gelu", "relu", "squared_relu", "swiglu"]


def build(D=12, **kw):
    cfg = MoEConfig(num_experts=kw.pop("num_experts", 6), d_ff=kw.pop("d_ff", 10), **kw)
    torch.manual_seed(0)
    layer = MoELayer(D, cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.7)  # uneven routing so capacity bites
    return layer


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_layer_matches_naive_reference(routing, activation):
    layer = build(activation=activation, **ROUTINGS[routing])
    ref = copy.deepcopy(layer)  # the naive reference runs on its own copy of the weights
    x = torch.randn(2, 15, 12, requires_grad=True)
    g = torch.randn(2, 15, 12)
    y, aux = layer(x)
    ((y * g).sum() + aux.loss).backward()

    x_ref = x.detach().clone().requires_grad_(True)
    cf = layer.cfg.capacity_factor
    y_ref, aux_ref, kept = naive_moe(ref, x_ref.reshape(-1, 12), cf)
    ((y_ref.reshape(2, 15, 12) * g).sum() + aux_ref).backward()

    torch.testing.assert_close(y, y_ref.reshape(2, 15, 12), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.loss, aux_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    real, naive = dict(layer.named_parameters()), dict(ref.named_parameters())
    assert sorted(real) == sorted(naive) and {"router.weight", "experts.w1", "experts.w2"} <= set(
        real
    )
    for name, p in real.items():
        torch.testing.assert_close(p.grad, naive[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    if routing != "dropless_k2" and routing != "expert_choice":
        assert aux.dropped_fraction.item() > 0, "the test should exercise dropping"
    assert aux.dropped_fraction.item() == pytest.approx(
        1 - len(kept) / (30 * layer.cfg.top_k)
        if layer.cfg.router == "topk"
        else aux.dropped_fraction.item()
    )


def test_eval_capacity_factor_and_shared_expert():
    layer = build(top_k=2, capacity_factor=0.5, eval_capacity_factor=4.0, shared_expert_d_ff=8)
    x = torch.randn(40, 12)
    layer.train()
    _, aux_train = layer(x)
    layer.eval()
    y_eval, aux_eval = layer(x)
    assert aux_train.dropped_fraction.item() > 0
    assert aux_eval.dropped_fraction.item() == 0
    # Shared expert adds a dense MLP of every token on top of the routed output.
    shared = layer.shared_expert
    layer.shared_expert = None
    y_routed, _ = layer(x)
    layer.shared_expert = shared
    torch.testing.assert_close(y_eval, y_routed + shared(x))


def test_aux_report():
    layer = build(top_k=2, capacity_factor=None)
    x = torch.randn(3, 7, 12)
    y, aux = layer(x)
    assert y.shape == x.shape
    assert aux.tokens_per_expert.shape == (6,)
    assert aux.tokens_per_expert.sum().item() == 21 * 2
    assert 0 <= aux.router_entropy.item() <= torch.log(torch.tensor(6.0)).item() + 1e-6
    cfg = layer.cfg
    torch.testing.assert_close(
        aux.loss, cfg.aux_loss_weight * aux.lb_loss + cfg.z_loss_weight * aux.z_loss
    )


def test_degenerate_single_process():
    # Every token to one expert.
    layer = build(top_k=1, capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3, 0] = 5.0
    x = torch.randn(20, 12)
    x[:, 0] = 10.0
    _, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [0, 0, 0, 20, 0, 0]
    # Empty batch: works, zero aux loss, gradients are zeros not errors.
    layer = build(top_k=2, capacity_factor=1.0)
    x = torch.randn(0, 12, requires_grad=True)
    y, aux = layer(x)
    (y.sum() + aux.loss).backward()
    assert y.shape == (0, 12) and aux.loss.item() == 0.0
    assert torch.count_nonzero(layer.experts.w1.grad) == 0
    # One local expert.
    layer = build(num_experts=1, top_k=1, capacity_factor=1.0)
    y, _ = layer(torch.randn(5, 12))
    assert y.shape == (5, 12)


def test_expert_weights_independent_of_sharding():
    torch.manual_seed(3)
    full = MoELayer(8, MoEConfig(num_experts=4, top_k=1, d_ff=6))
    assert full.experts.w1.shape == (4, 8, 6) and full.experts.w2.shape == (4, 6, 8)
    assert full.router.weight.shape == (4, 8)
    assert all(getattr(p, "xpar_expert", False) for p in full.experts.parameters())
    assert not getattr(full.router.weight, "xpar_expert", False)


BAD = [
    (dict(num_experts=0), "moe.num_experts=0"),
    (dict(num_experts=4, top_k=5), "moe.top_k=5"),
    (dict(capacity_factor=0.0), "moe.capacity_factor=0.0"),
    (dict(capacity_factor=-1.0), "moe.capacity_factor=-1.0"),
    (dict(router="nope"), "moe.router='nope'"),
    (dict(activation="tanh"), "moe.activation='tanh'"),
    (dict(drop_policy="random"), "moe.drop_policy='random'"),
    (dict(router="expert_choice", capacity_factor=None), "moe.capacity_factor=None"),
    (dict(aux_loss_weight=-0.1), "moe.aux_loss_weight=-0.1"),
]


@pytest.mark.parametrize("kw,msg", BAD)
def test_bad_configs_name_field_and_value(kw, msg):
    with pytest.raises(XparConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        MoEConfig(**kw)


def test_ep_group_string_must_be_local():
    with pytest.raises(XparConfigError, match="ep_group"):
        MoELayer(8, MoEConfig(num_experts=4, top_k=1, d_ff=6), ep_group="world")
