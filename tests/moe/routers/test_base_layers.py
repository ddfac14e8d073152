"""BASE layers: in training every expert gets exactly its share of the tokens (Sinkhorn, then
a greedy rounding); at eval plain top-1. Equal to the naive token-by-token reference alone
and inside MoELayer (forward and every gradient)."""

import copy
import math

import pytest
import torch

from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.routers import get_router
from xpar.moe.routers.base_layers import (
    balanced_assignment,
    expert_shares,
    greedy_assign,
    sinkhorn_log_plan,
)
from xpar.testing.moe_reference import naive_moe

D = 12


def make(E=6, seed=0, cf=None, policy="probs", std=1.0, **opts):
    cfg = MoEConfig(
        num_experts=E,
        top_k=1,
        d_ff=10,
        router="base",
        capacity_factor=cf,
        drop_policy=policy,
        router_options=opts,
    )
    torch.manual_seed(seed)
    r = get_router("base")(D, cfg)
    with torch.no_grad():
        r.weight.normal_(0, std)  # uneven scores, so the balancing has work to do
    return r


def pairs(plan):
    return sorted(zip(plan.token_idx_A.tolist(), plan.expert_idx_A.tolist(), strict=True))


def naive_greedy(score, shares):
    """The sequential greedy itself: pairs by descending score, ties by t * E + e."""
    T, E = len(score), len(shares)
    room, choice = list(shares), [-1] * T
    for _, _, t, e in sorted((-score[t][e], t * E + e, t, e) for t in range(T) for e in range(E)):
        if choice[t] < 0 and room[e] > 0:
            choice[t], room[e] = e, room[e] - 1
    return choice


def test_shares_rule():
    assert expert_shares(10, 4) == [3, 3, 2, 2]
    assert expert_shares(8, 4) == [2, 2, 2, 2]
    assert expert_shares(3, 5) == [1, 1, 1, 0, 0]
    assert expert_shares(0, 3) == [0, 0, 0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T,E", [(24, 4), (25, 4), (3, 5), (7, 7), (50, 6), (1, 3)])
def test_forward_plan_equals_naive_route_in_training(T, E, seed):
    r = make(E=E, seed=seed)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    if T > 4:
        x[T // 2] = x[0]  # identical rows: ties the rounding must break like the greedy
    plan = r(x, 0.25)  # the capacity factor does not apply in training
    kept, lb = r.naive_route(x, 0.25)
    assert pairs(plan) == sorted((t, e) for t, e, _ in kept)
    want = {t: w for t, _, w in kept}
    got = torch.stack([want[t] for t in plan.token_idx_A.tolist()]) if T else plan.weight_A
    torch.testing.assert_close(plan.weight_A, got, atol=1e-6, rtol=1e-6)
    assert plan.counts_E.tolist() == expert_shares(T, E)
    assert plan.tokens_per_expert_E.tolist() == expert_shares(T, E)
    assert plan.dropped_fraction.item() == 0.0 and plan.lb_loss.item() == lb.item() == 0.0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cf,policy", [(None, "probs"), (0.5, "probs"), (0.75, "position")])
def test_forward_plan_equals_naive_route_at_eval(cf, policy, seed):
    r = make(seed=seed, cf=cf, policy=policy).eval()
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(seed + 1))
    plan = r(x, cf)
    kept, _ = r.naive_route(x, cf)
    assert pairs(plan) == sorted((t, e) for t, e, _ in kept)
    if cf == 0.5:
        assert plan.dropped_fraction.item() > 0, "the case should exercise dropping"


def test_eval_is_top1_by_score_with_sigmoid_weights():
    r = make(std=2.0).eval()
    x = torch.randn(64, D)
    plan = r(x, None)
    logits = x @ r.weight.detach().t()
    top = logits.argmax(-1)
    assert pairs(plan) == sorted(enumerate(top.tolist()))
    torch.testing.assert_close(
        plan.weight_A, torch.sigmoid(logits[plan.token_idx_A, plan.expert_idx_A])
    )
    assert not torch.equal(plan.counts_E, torch.tensor(expert_shares(64, 6))), "uneven at eval"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [30, 4])
def test_layer_equals_naive_moe_values_and_gradients(training, seed, T):
    cf = 0.5 if not training else 0.3  # at eval it drops; in training it does not apply
    cfg = MoEConfig(num_experts=6, top_k=1, d_ff=10, router="base", capacity_factor=cf)
    torch.manual_seed(seed)
    layer = MoELayer(D, cfg).train(training)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.7)
    ref = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, T // 2, D, generator=g, requires_grad=True)
    cot = torch.randn(2, T // 2, D, generator=g)
    y, aux = layer(x)
    ((y * cot).sum() + aux.loss).backward()

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, aux_ref, kept = naive_moe(ref, x_ref.reshape(-1, D), cf)
    ((y_ref.reshape(x.shape) * cot).sum() + aux_ref).backward()

    torch.testing.assert_close(y, y_ref.reshape(x.shape), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.loss, aux_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    real, naive = dict(layer.named_parameters()), dict(ref.named_parameters())
    assert sorted(real) == sorted(naive) and "router.weight" in real
    for name, p in real.items():
        torch.testing.assert_close(p.grad, naive[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    assert layer.router.weight.grad.abs().sum() > 0, "the combine weight trains the router"
    assert aux.lb_loss.item() == 0.0 and aux.z_loss.item() > 0
    if training:
        assert len(kept) == T and aux.tokens_per_expert.tolist() == expert_shares(T, 6)
    elif T == 30:
        assert aux.dropped_fraction.item() > 0, "the case should exercise dropping"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "T,E", [(0, 4), (1, 4), (3, 8), (8, 8), (9, 8), (64, 8), (100, 7), (257, 16), (33, 1)]
)
def test_every_expert_gets_exactly_its_share(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * (0.1, 1.0, 5.0)[seed % 3]
    e_T = balanced_assignment(logits, iters=20, tol=1e-3)
    assert e_T.shape == (T,) and (e_T >= 0).all()
    assert torch.bincount(e_T, minlength=E).tolist() == expert_shares(T, E)


@pytest.mark.parametrize("seed", range(3))
def test_exact_shares_when_scores_strongly_favour_one_expert(seed):
    r = make(E=8, seed=seed, std=0.0)
    with torch.no_grad():
        r.weight[3, 0] = 50.0
    x = torch.randn(203, D, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = x[:, 0].abs() + 1.0  # every token's best expert is 3, by far
    plan = r(x, None)
    assert plan.counts_E.tolist() == expert_shares(203, 8)
    assert sorted(plan.token_idx_A.tolist()) == list(range(203))  # each token once
    kept, _ = r.naive_route(x, None)
    assert pairs(plan) == sorted((t, e) for t, e, _ in kept)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("T,E", [(12, 3), (40, 5), (9, 9), (5, 8), (60, 4)])
def test_greedy_rounds_equal_the_sequential_greedy_with_ties(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (T, E), generator=g).float()  # many exact ties
    n = min(T, E)
    shares = expert_shares(T, E)[:n]
    got = greedy_assign(score[:, :n], torch.tensor(shares))
    assert got.tolist() == naive_greedy(score[:, :n].tolist(), shares)


def _naive_sinkhorn(logits, shares, iters):
    """Plain (not log-space) Sinkhorn in float64, for comparison."""
    K = logits.double().exp()
    c = torch.tensor(shares, dtype=torch.float64)
    b = torch.ones(logits.shape[1], dtype=torch.float64)
    for _ in range(iters):
        a = 1.0 / (K @ b)
        b = c / (K.t() @ a)
    a = 1.0 / (K @ b)
    return a[:, None] * K * b[None, :]


@pytest.mark.parametrize("seed", range(3))
def test_sinkhorn_plan_marginals_and_naive_agreement(seed):
    T, E = 37, 5
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2
    shares = expert_shares(T, E)
    plan = sinkhorn_log_plan(logits, torch.tensor(shares), iters=5, tol=1e-12).exp()
    torch.testing.assert_close(plan.double(), _naive_sinkhorn(logits, shares, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.ones(T))  # every token's mass is 1
    # Run to convergence: the column sums are within tol (relative) of the shares.
    conv = sinkhorn_log_plan(logits, torch.tensor(shares), iters=1000, tol=1e-4).exp()
    rel = (conv.sum(0) / torch.tensor(shares, dtype=torch.float32) - 1).abs().max()
    assert rel <= 2e-4
    # No gradient flows through Sinkhorn.
    assert not sinkhorn_log_plan(
        logits.requires_grad_(), torch.tensor(shares), 3, 1e-3
    ).requires_grad


def test_options_are_used():
    x = torch.randn(60, D, generator=torch.Generator().manual_seed(0))
    one = make(std=3.0, sinkhorn_iters=1)
    many = make(std=3.0, sinkhorn_iters=50, sinkhorn_tol=1e-6)
    assert (one.sinkhorn_iters, many.sinkhorn_tol) == (1, 1e-6)
    assert pairs(one(x, None)) != pairs(many(x, None))


def test_contract():
    r = make(E=5)
    cls = type(r)
    assert not cls.causal and not r.needs_token_counts
    assert cls.experts_per_token(r.cfg) == 1.0 and cls.num_params(D, r.cfg) == 5 * D
    assert MoEConfig(router="base", top_k=1).is_causal is False


@pytest.mark.parametrize(
    "kw,msg",
    [
        (
            dict(router_options={"sinkhorn_iters": 0}),
            r"moe\.router_options\.sinkhorn_iters=0 is invalid: use an integer >= 1",
        ),
        (
            dict(router_options={"sinkhorn_iters": 2.5}),
            r"moe\.router_options\.sinkhorn_iters=2\.5 is invalid",
        ),
        (
            dict(router_options={"sinkhorn_tol": 0.0}),
            r"moe\.router_options\.sinkhorn_tol=0\.0 is invalid: use a small tolerance > 0",
        ),
        (
            dict(router_options={"sinkhorn_tol": -1e-3}),
            r"moe\.router_options\.sinkhorn_tol=-0\.001 is invalid",
        ),
        (dict(top_k=2), r"moe\.top_k=2 is invalid: base sends each token to exactly one expert"),
    ],
)
def test_bad_configs_name_field_value_and_fix(kw, msg):
    with pytest.raises(XparConfigError, match=msg):
        MoEConfig(router="base", **{"top_k": 1, **kw})


def test_hydra_base_composes_in_the_encoder_and_the_decoder_refuses_it():
    cfg = compose_config(["moe=base", "model.causal=false"], world_size=2, cuda_available=False)
    assert cfg.moe.router == "base" and cfg.moe.top_k == 1 and not cfg.model.causal
    assert cfg.moe.options().sinkhorn_iters == 20
    with pytest.raises(XparConfigError, match=r"moe\.router='base'.*model\.causal=false"):
        compose_config(["moe=base"], world_size=2, cuda_available=False)


def test_large_batch_shares_and_one_expert_per_token():
    # The size the assignment was timed at (T=4096, E=16).
    r = make(E=16, std=0.02)
    plan = r(torch.randn(4096, D), None)
    assert plan.counts_E.tolist() == [256] * 16
    assert torch.equal(torch.sort(plan.token_idx_A).values, torch.arange(4096))
    assert math.isclose(plan.dropped_fraction.item(), 0.0)


def test_non_finite_scores_still_get_exact_shares():
    logits = torch.randn(20, 4)
    logits[3] = float("nan")
    logits[5, 1] = float("-inf")
    logits[7, 2] = float("inf")
    e_T = balanced_assignment(logits, iters=5, tol=1e-3)
    assert torch.bincount(e_T, minlength=4).tolist() == [5, 5, 5, 5]
