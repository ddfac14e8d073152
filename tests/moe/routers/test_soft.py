"""Soft MoE (`soft`) and the dense soft mixture (`soft_mix`) against naive references.

The naive references build each slot's input token by token and mix each token's slots
one by one (xpar.testing.moe_reference); the layer uses the plan's per-sequence [B, L, J]
weights in batched products. Forward values and every gradient must agree within 1e-5.
"""

import copy
import math

import pytest
import torch

from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.models import MoETransformer, model_cost
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.experts import expert_mlp
from xpar.moe.layer import slot_inputs, slot_outputs
from xpar.moe.routers import get_router
from xpar.moe.routers.soft import SlotRoute
from xpar.testing.moe_reference import naive_moe

D = 12


def build(router="soft", P=1, E=4, **kw):
    opts = {"slots_per_expert": P} if router == "soft" else {}
    cfg = MoEConfig(num_experts=E, top_k=1, d_ff=10, router=router, router_options=opts, **kw)
    torch.manual_seed(0)
    layer = MoELayer(D, cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.7)  # peaked softmaxes, far from uniform
    return layer


def compare_with_naive(layer, x, seq_len, tol=1e-5):
    """Forward, aux loss, input and every parameter gradient vs naive_moe."""
    ref = copy.deepcopy(layer)
    x = x.clone().requires_grad_(True)
    cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    y, aux = layer(x)
    ((y * cot).sum() + aux.loss).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, aux_ref, pairs = naive_moe(ref, x_ref.reshape(-1, D), None, seq_len=seq_len)
    ((y_ref.reshape(x.shape) * cot).sum() + aux_ref).backward()
    torch.testing.assert_close(y, y_ref.reshape(x.shape), atol=tol, rtol=tol)
    torch.testing.assert_close(aux.loss, aux_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=tol)
    naive = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, naive[name].grad, atol=tol, rtol=tol, msg=name)
    return aux, pairs


# ---------------------------------------------------------------------------- soft


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("B,L", [(3, 5), (1, 7), (2, 1)])
def test_soft_layer_matches_naive_reference(B, L, P, activation):
    layer = build(P=P, activation=activation, shared_expert_d_ff=6 if P == 2 else 0)
    aux, pairs = compare_with_naive(layer, torch.randn(B, L, D), L)
    E = layer.cfg.num_experts
    assert len(pairs) == B * E * P and sorted(e for _, e in pairs) == sorted(
        e for e in range(E) for _ in range(B * P)
    )
    assert aux.tokens_per_expert.tolist() == [B * P] * E
    assert aux.dropped_fraction.item() == 0.0 and aux.lb_loss.item() == 0.0


def test_soft_without_sequences_treats_the_batch_as_one_sequence():
    layer = build(P=2)
    x = torch.randn(9, D)
    compare_with_naive(layer, x, 0)
    # ... which is a [1, 9, D] batch.
    y2, _ = layer(x)
    y3, _ = layer(x.unsqueeze(0))
    torch.testing.assert_close(y2, y3[0], atol=0, rtol=0)


def test_soft_router_alone_matches_its_naive_route():
    """The plan's slot weights, and the layer's slots built from them, vs the naive route's
    slots: values and gradients (x, phi)."""
    torch.manual_seed(1)
    B, L, E, P = 3, 4, 3, 2
    J = E * P
    r = build(P=P, E=E).router
    x = torch.randn(B * L, D, requires_grad=True)
    plan = r(x, None, seq_len=L)
    route, _ = r.naive_route(x, None, seq_len=L)
    assert isinstance(route, SlotRoute)
    assert plan.slot_dispatch_BLJ.shape == plan.slot_combine_BLJ.shape == (B, L, J)
    u = slot_inputs(plan.slot_dispatch_BLJ, x, E)  # [S, D], expert-major
    # Naive slot n = b*J + e*P + p; the layer's row is e*B*P + b*P + p.
    row = [e * B * P + b * P + p for b in range(B) for e in range(E) for p in range(P)]
    u_naive = torch.stack(route.inputs)
    c_naive = torch.zeros(B * L, J)
    for t, pairs in enumerate(route.combine):
        for n, w in pairs:
            assert n // J == t // L  # a token mixes its own sequence's slots only
            c_naive[t, n % J] = w
    comb_TJ = plan.slot_combine_BLJ.reshape(B * L, J)
    torch.testing.assert_close(u[row], u_naive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(comb_TJ, c_naive, atol=1e-6, rtol=1e-5)
    assert route.experts == [int(plan.expert_idx_A[row[n]]) for n in range(len(row))]
    # Gradients of one functional of both, through each.
    g1, g2 = torch.randn(u_naive.shape), torch.randn(c_naive.shape)
    real = (u[row] * g1).sum() + (comb_TJ * g2).sum()
    gx, gw = torch.autograd.grad(real, (x, r.weight))
    naive = (u_naive * g1).sum()
    for t, pairs in enumerate(route.combine):
        naive = naive + sum(w * g2[t, n % J] for n, w in pairs)
    nx, nw = torch.autograd.grad(naive, (x, r.weight))
    torch.testing.assert_close(gx, nx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, nw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_slot_inputs_and_outputs_match_loops(seed):
    """The layer's batched slot products vs a loop over sequences, slots and tokens."""
    g = torch.Generator().manual_seed(seed)
    B, L, E, P = 1 + seed % 3, 1 + seed, 2 + seed % 2, 1 + seed % 3
    J = E * P
    d, c = torch.rand(B, L, J, generator=g), torch.rand(B, L, J, generator=g)
    x, y_S = torch.randn(B * L, D, generator=g), torch.randn(B * J, D, generator=g)
    u, y = slot_inputs(d, x, E), slot_outputs(c, y_S, E)
    assert u.shape == (B * J, D) and y.shape == (B * L, D)
    for b in range(B):
        for e in range(E):
            for p in range(P):
                want = sum(d[b, i, e * P + p] * x[b * L + i] for i in range(L))
                torch.testing.assert_close(u[e * B * P + b * P + p], want, atol=1e-5, rtol=1e-5)
        for i in range(L):
            want = sum(
                c[b, i, e * P + p] * y_S[e * B * P + b * P + p] for e in range(E) for p in range(P)
            )
            torch.testing.assert_close(y[b * L + i], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_soft_weights_are_distributions_within_each_sequence(seed):
    g = torch.Generator().manual_seed(seed)
    B, L = 1 + seed % 3, 2 + seed
    E, P = 2 + seed % 3, 1 + seed % 2
    r = build(P=P, E=E).router
    with torch.no_grad():
        r.weight.normal_(0, 2.0, generator=g)
        plan = r(torch.randn(B * L, D, generator=g), None, seq_len=L)
    disp, comb = plan.slot_dispatch_BLJ, plan.slot_combine_BLJ
    S = B * E * P
    assert disp.shape == comb.shape == (B, L, E * P)
    assert torch.all(disp > 0) and torch.all(comb > 0)
    # Dispatch: each slot's weights sum to 1 over its sequence's tokens; combine: each
    # token's weights sum to 1 over its sequence's slots.
    torch.testing.assert_close(disp.sum(1), torch.ones(B, E * P), atol=1e-6, rtol=0)
    torch.testing.assert_close(comb.sum(2), torch.ones(B, L), atol=1e-6, rtol=0)
    # The plan: slot rows grouped by expert, B*P each, weight 1, no drops.
    assert plan.token_idx_A.tolist() == list(range(S)) and plan.num_tokens == S
    assert plan.expert_idx_A.tolist() == [e for e in range(E) for _ in range(B * P)]
    assert plan.counts_E.tolist() == [B * P] * E
    assert torch.all(plan.weight_A == 1) and plan.dropped_fraction.item() == 0.0


def test_soft_sequences_do_not_see_each_other():
    layer = build(P=2)
    x = torch.randn(3, 5, D)
    y, _ = layer(x)
    x2 = x.clone()
    x2[1, 4] += 1.0  # a token of sequence 1
    y2, _ = layer(x2)
    assert torch.equal(y2[0], y[0]) and torch.equal(y2[2], y[2])
    assert (y2[1] - y[1]).abs().min() > 0, "every token of sequence 1 sees the change"


def test_soft_with_one_token_per_sequence_is_a_per_token_mixture():
    # L = 1: every slot's input is its token (dispatch weight exactly 1), and the token mixes
    # its E*P slots' outputs by the softmax of its logits.
    layer = build(P=2, E=3)
    x = torch.randn(4, 1, D)
    plan = layer.router(x.reshape(4, D), None, seq_len=1)
    assert plan.slot_dispatch_BLJ.shape == (4, 1, 6) and torch.all(plan.slot_dispatch_BLJ == 1)
    y, _ = layer(x)
    ex = layer.experts
    logits = x.reshape(4, D) @ layer.router.weight
    c = torch.softmax(logits, dim=-1)
    f = torch.stack(
        [expert_mlp(x.reshape(4, D), ex.w1[e], ex.w2[e], None, "gelu") for e in range(3)]
    )
    want = sum(c[:, j : j + 1] * f[j // 2] for j in range(6))
    torch.testing.assert_close(y.reshape(4, D), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, D), (0, 5, D)])
def test_soft_empty_batch(shape):
    layer = build(P=2)
    x = torch.randn(*shape, requires_grad=True)
    y, aux = layer(x)
    (y.sum() + aux.loss).backward()
    assert y.shape == shape and aux.loss.item() == 0.0
    assert aux.tokens_per_expert.tolist() == [0.0] * 4
    assert torch.count_nonzero(layer.experts.w1.grad) == 0
    assert (
        layer.router.weight.grad is not None and torch.count_nonzero(layer.router.weight.grad) == 0
    )


def test_soft_entropy_and_parameters():
    layer = build(P=3, E=4)
    r = layer.router
    assert r.weight.shape == (D, 12) and get_router("soft").num_params(D, layer.cfg) == D * 12
    x = torch.randn(2 * 6, D)
    plan = r(x, None, seq_len=6)
    c = torch.softmax((x @ r.weight).detach(), dim=-1)
    want = -(c * c.log()).sum(-1).mean()
    torch.testing.assert_close(plan.entropy, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        r.weight.zero_()
    assert r(x, None, seq_len=6).entropy.item() == pytest.approx(math.log(12), rel=1e-6)
    r.reset_parameters(0.5)
    assert r.weight.std().item() == pytest.approx(0.5, rel=0.2)
    assert get_router("soft").experts_per_token(layer.cfg, seq_len=6) == 4 * 3 / 6
    assert get_router("soft").experts_per_token(layer.cfg) == 4.0


def test_soft_capacity_factor_is_ignored():
    a = build(P=2, capacity_factor=0.1)
    b = build(P=2, capacity_factor=None)
    x = torch.randn(2, 5, D)
    ya, aux = a(x)
    yb, _ = b(x)
    assert torch.equal(ya, yb) and aux.dropped_fraction.item() == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_soft_slots_per_expert_must_be_a_positive_integer(bad):
    with pytest.raises(
        XparConfigError, match=r"moe\.router_options\.slots_per_expert=.* is invalid"
    ):
        MoEConfig(router="soft", router_options={"slots_per_expert": bad})


def test_soft_in_the_encoder_model_and_its_param_count():
    moe = MoEConfig(
        num_experts=4,
        top_k=1,
        d_ff=16,
        router="soft",
        capacity_factor=None,
        router_options={"slots_per_expert": 2},
    )
    cfg = ModelConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, causal=False
    )
    torch.manual_seed(0)
    model = MoETransformer(cfg, moe, ep_group="local")
    logits, aux = model(torch.randint(0, 32, (3, 8)))
    assert logits.shape == (3, 8, 32) and len(aux) == 2
    assert model_cost(cfg, moe, seq_len=8).total_params == sum(
        p.numel() for p in model.parameters()
    )
    with pytest.raises(XparConfigError, match="model.causal=false"):
        MoETransformer(ModelConfig(**{**vars(cfg), "causal": True}), moe, ep_group="local")


# ------------------------------------------------------------------------ soft_mix


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_soft_mix_matches_naive_reference(activation):
    layer = build("soft_mix", E=5, activation=activation, capacity_factor=0.25)
    aux, pairs = compare_with_naive(layer, torch.randn(2, 6, D), 6)
    assert len(pairs) == 12 * 5  # every token, every expert, despite capacity_factor=0.25
    assert aux.dropped_fraction.item() == 0.0 and aux.lb_loss.item() == 0.0
    assert aux.tokens_per_expert.tolist() == [12.0] * 5


@pytest.mark.parametrize("seed", range(4))
def test_soft_mix_is_the_probability_weighted_sum_of_every_expert(seed):
    layer = build("soft_mix", E=3 + seed, activation="swiglu" if seed % 2 else "gelu")
    ex, act = layer.experts, layer.cfg.activation
    x = torch.randn(7 + seed, D, generator=torch.Generator().manual_seed(seed))
    y, _ = layer(x)
    p = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    want = sum(
        p[:, e : e + 1]
        * expert_mlp(x, ex.w1[e], ex.w2[e], ex.w3[e] if ex.w3 is not None else None, act)
        for e in range(ex.num_experts)
    )
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)


def test_soft_mix_declares_every_expert_per_token_and_is_causal():
    cfg = MoEConfig(num_experts=6, top_k=1, d_ff=8, router="soft_mix")
    assert get_router("soft_mix").causal and cfg.is_causal
    assert get_router("soft_mix").experts_per_token(cfg) == 6.0
    model_cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32)
    c = model_cost(model_cfg, cfg, seq_len=8)
    assert c.active_params == c.total_params  # every expert is active


def test_soft_mix_empty_batch():
    layer = build("soft_mix")
    x = torch.randn(0, D, requires_grad=True)
    y, aux = layer(x)
    (y.sum() + aux.loss).backward()
    assert y.shape == (0, D) and aux.loss.item() == 0.0


# -------------------------------------------------------------------------- Hydra


def test_hydra_composes_soft_in_the_encoder_and_soft_mix_anywhere():
    soft = compose_config(["moe=soft", "model.causal=false"], world_size=2, cuda_available=False)
    assert soft.moe.router == "soft" and soft.moe.options().slots_per_expert == 1
    assert soft.moe.capacity_factor is None and not soft.model.causal
    mix = compose_config(["moe=soft_mix"], world_size=2, cuda_available=False)
    assert mix.moe.router == "soft_mix" and mix.model.causal
    for cfg in (soft, mix):
        for world_size in (1, 2, 4):
            cfg.validate(world_size, cuda_available=False)
    two = compose_config(
        ["moe=soft", "model.causal=false", "moe.router_options.slots_per_expert=2"],
        world_size=2,
        cuda_available=False,
    )
    assert two.moe.options().slots_per_expert == 2


def test_hydra_refuses_soft_in_the_causal_decoder():
    with pytest.raises(
        XparConfigError, match=r"moe\.router='soft' is not allowed.*model\.causal=false"
    ):
        compose_config(["moe=soft"], world_size=2, cuda_available=False)
    with pytest.raises(XparConfigError, match=r"slots_per_expert=0 is invalid"):
        compose_config(
            ["moe=soft", "model.causal=false", "moe.router_options.slots_per_expert=0"],
            world_size=2,
            cuda_available=False,
        )
