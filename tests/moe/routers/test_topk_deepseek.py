"""DeepSeek-style options of top-k (sigmoid scores, group-limited routing, route_scale, the
sequence-wise balance loss) against the token-by-token naive route, alone and inside
MoELayer, plus their properties, balance terms and config errors."""

import copy

import pytest
import torch

from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.losses import (
    balance_loss_from_counts,
    balance_terms,
    load_balancing_loss,
    sequence_balance_loss,
    z_loss,
)
from xpar.moe.plan import plan_from_choices
from xpar.moe.routers.base import stats_of
from xpar.testing.moe_reference import naive_moe

D = 12
SIG = {"score_func": "sigmoid"}
GROUPS = {"n_groups": 4, "topk_groups": 2}
OPTIONS = {
    "sigmoid_k2": (2, SIG),
    "sigmoid_k1": (1, SIG),
    "groups": (2, GROUPS),
    "groups_of_one_expert": (3, {"n_groups": 8, "topk_groups": 4}),
    "one_group_kept": (2, {"n_groups": 4, "topk_groups": 1}),
    "route_scale": (2, {"route_scale": 2.5}),
    "sequence_loss": (2, {"balance_loss": "sequence"}),
    "groups_bias": (2, {**GROUPS, "bias_update_rate": 0.01}),
    "deepseek": (
        3,
        {**SIG, **GROUPS, "balance_loss": "sequence", "route_scale": 1.5, "bias_update_rate": 0.01},
    ),
}


def make_layer(K, opts, cf=None, policy="probs", renormalize=True, activation="gelu", E=8):
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        d_ff=10,
        capacity_factor=cf,
        drop_policy=policy,
        renormalize=renormalize,
        activation=activation,
        aux_loss_weight=0.1,  # large enough that the balance loss's gradient shows
        router_options=opts,
    )
    torch.manual_seed(0)
    layer = MoELayer(D, cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.7)
        if hasattr(layer.router, "expert_bias_E"):
            layer.router.expert_bias_E.copy_(torch.linspace(-0.2, 0.25, E))
    return layer


@pytest.mark.parametrize(
    "cf,policy,renormalize",
    [(None, "probs", True), (0.75, "probs", True), (1.0, "position", False)],
)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_layer_matches_naive_reference(name, cf, policy, renormalize):
    K, opts = OPTIONS[name]
    layer = make_layer(K, opts, cf, policy, renormalize, "swiglu" if cf else "gelu")
    ref = copy.deepcopy(layer)
    B, L = 3, 6
    x = torch.randn(B, L, D, requires_grad=True)
    cot = torch.randn(B, L, D)
    y, aux = layer(x)
    ((y * cot).sum() + aux.loss).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, aux_ref, kept = naive_moe(ref, x_ref.reshape(-1, D), cf, seq_len=L)
    ((y_ref.reshape(B, L, D) * cot).sum() + aux_ref).backward()
    torch.testing.assert_close(y, y_ref.reshape(B, L, D), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.loss, aux_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    naive = dict(ref.named_parameters())
    for pname, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, naive[pname].grad, atol=1e-5, rtol=1e-5, msg=pname)
    assert aux.dropped_fraction.item() == pytest.approx(1 - len(kept) / (B * L * K))
    if cf == 0.75:
        assert aux.dropped_fraction.item() > 0, "the case should exercise dropping"


@pytest.mark.parametrize("name", list(OPTIONS))
def test_router_alone_matches_naive_route(name):
    """The plan's (token, expert, weight) triples and the balance loss vs naive_route, and
    the gradient of a functional of both w.r.t. the router weight and the input."""
    K, opts = OPTIONS[name]
    r = make_layer(K, opts).router
    B, L = 4, 5
    x = torch.randn(B * L, D, requires_grad=True)
    plan = r(x, None, seq_len=L)
    kept, lb = r.naive_route(x, None, seq_len=L)
    got = {
        (int(t), int(e)): w
        for t, e, w in zip(plan.token_idx_A, plan.expert_idx_A, plan.weight_A, strict=True)
    }
    want = {(t, e): w for t, e, w in kept}
    assert set(got) == set(want)
    g = {k: float(torch.randn(())) for k in sorted(want)}
    real = sum(g[k] * got[k] for k in g) + plan.lb_loss
    naive = sum(g[k] * want[k] for k in g) + lb
    torch.testing.assert_close(real, naive, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(real, (x, r.weight))
    naive_grads = torch.autograd.grad(naive, (x, r.weight))
    for a, b in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_defaults_compute_todays_topk_bit_for_bit():
    """Today's top-k written out (softmax, topk, renormalise, Switch loss): the default
    options give exactly these tensors."""
    for K, cf in [(1, None), (2, 0.75), (3, 1.25)]:
        r = make_layer(K, {}).router
        x = torch.randn(40, D)
        plan = r(x, cf, seq_len=8)
        logits = x @ r.weight.t()
        probs = torch.softmax(logits, dim=-1)
        top_p, top_e = probs.topk(K, dim=-1)
        w = top_p / top_p.sum(dim=-1, keepdim=True) if K > 1 else top_p
        old = plan_from_choices(
            top_e,
            w,
            num_experts=8,
            capacity_factor=cf,
            drop_policy="probs",
            stats=stats_of(logits, probs, load_balancing_loss(probs, top_e)),
        )
        for field in ("token_idx_A", "expert_idx_A", "weight_A", "counts_E", "lb_loss"):
            assert torch.equal(getattr(plan, field), getattr(old, field)), field
        assert torch.equal(plan.z_loss, z_loss(logits)) and torch.equal(plan.entropy, old.entropy)
        assert list(r.state_dict()) == ["weight"]


@pytest.mark.parametrize("seed", range(8))
def test_group_limited_routing_stays_in_the_best_groups(seed):
    g = torch.Generator().manual_seed(seed)
    E, G = [(8, 4), (12, 3), (12, 6), (16, 8)][seed % 4]
    tg = 1 + seed % (G - 1)
    K = min(3, tg * (E // G))
    opts = {"n_groups": G, "topk_groups": tg, "score_func": ["softmax", "sigmoid"][seed % 2]}
    if seed % 3 == 0:
        opts["bias_update_rate"] = 0.01
    r = make_layer(K, opts, E=E).router
    with torch.no_grad():
        r.weight.normal_(0, 1.5, generator=g)
        if seed % 3 == 0:
            r.expert_bias_E.normal_(0, 0.2, generator=g)
        x = torch.randn(50, D, generator=g)
        plan = r(x, None)
    size = E // G
    bias = r.expert_bias_E if seed % 3 == 0 else torch.zeros(E)
    logits = x @ r.weight.detach().t()
    s = torch.softmax(logits, -1) if opts["score_func"] == "softmax" else torch.sigmoid(logits)
    sel = (s + bias).reshape(50, G, size)
    group_score = sel.topk(min(2, size), dim=-1).values.sum(-1)
    best = group_score.topk(tg, dim=-1).indices
    for t in range(50):
        experts = plan.expert_idx_A[plan.token_idx_A == t].tolist()
        groups = {e // size for e in experts}
        assert len(experts) == K and len(groups) <= tg
        assert groups <= set(best[t].tolist())
        # The K experts are the best (biased) ones inside the kept groups.
        allowed = [e for e in range(E) if e // size in set(best[t].tolist())]
        top = sorted(allowed, key=lambda e: -float((s + bias)[t, e]))[:K]
        assert sorted(experts) == sorted(top)


def test_groups_limit_what_plain_top_k_would_choose():
    # Without groups some tokens use experts from more than one group: the limit bites.
    x = torch.randn(60, D)
    plain = make_layer(2, {}).router(x, None)
    limited = make_layer(2, {"n_groups": 4, "topk_groups": 1}).router(x, None)

    def spread(plan):
        return max(
            len({int(e) // 2 for e in plan.expert_idx_A[plan.token_idx_A == t]}) for t in range(60)
        )

    assert spread(plain) > 1 and spread(limited) == 1


@pytest.mark.parametrize("opts", [SIG, {**SIG, **GROUPS}, GROUPS])
def test_the_bias_changes_the_choice_but_not_the_weights_or_any_gradient(opts):
    K = 2
    biased = make_layer(K, {**opts, "bias_update_rate": 0.01})
    with torch.no_grad():
        biased.router.expert_bias_E.copy_(torch.tensor([0.5, -0.5, 0.4, -0.4, 0.0, 0.3, -0.3, 0.2]))
    unbiased = copy.deepcopy(biased)
    unbiased.router.expert_bias_E.zero_()
    x = torch.randn(40, D)
    logits = x @ biased.router.weight.detach().t()
    scores = torch.sigmoid(logits) if opts.get("score_func") == "sigmoid" else logits.softmax(-1)
    chosen = biased.router._choose(scores)[1]
    assert not torch.equal(chosen, unbiased.router._choose(scores)[1]), "the bias should bite"
    # A run whose choice is fixed to the biased one and that has no bias anywhere else.
    fixed = copy.deepcopy(unbiased)
    fixed.router._choose = lambda s: (s.gather(-1, chosen), chosen)
    runs = []
    for layer in (biased, fixed):
        xi = x.clone().requires_grad_(True)
        y, aux = layer(xi)
        ((y * torch.arange(D)).sum() + aux.loss).backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        runs.append((y, aux.loss, xi.grad, grads, layer.router(x, None)))
    (y1, l1, gx1, g1, p1), (y2, l2, gx2, g2, p2) = runs
    assert torch.equal(y1, y2) and torch.equal(l1, l2) and torch.equal(gx1, gx2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
    # The chosen experts keep their own unbiased scores, renormalised over the chosen k.
    want = scores.gather(-1, chosen)
    want = want / want.sum(-1, keepdim=True)
    for t, e, w in zip(p1.token_idx_A, p1.expert_idx_A, p1.weight_A.detach(), strict=True):
        k = chosen[t].tolist().index(int(e))
        assert float(w) == pytest.approx(float(want[t, k]), rel=1e-6)


def test_sigmoid_weights_and_route_scale():
    layer = make_layer(3, {**SIG, "route_scale": 2.5})
    x = torch.randn(30, D)
    plan = layer.router(x, None)
    s = torch.sigmoid(x @ layer.router.weight.detach().t())
    top_s, top_e = s.topk(3, dim=-1)
    sums = torch.zeros(30).index_add(0, plan.token_idx_A, plan.weight_A.detach())
    torch.testing.assert_close(sums, torch.full((30,), 2.5))
    for t, e, w in zip(plan.token_idx_A, plan.expert_idx_A, plan.weight_A.detach(), strict=True):
        assert float(w) == pytest.approx(2.5 * float(s[t, e] / top_s[t].sum()), rel=1e-6)
    assert set(plan.expert_idx_A[plan.token_idx_A == 0].tolist()) == set(top_e[0].tolist())
    # k = 1 keeps the raw score (renormalising one weight would make it 1, with no gradient).
    one = make_layer(1, SIG).router(x, None)
    torch.testing.assert_close(one.weight_A.detach(), s[one.token_idx_A, one.expert_idx_A])


# ------------------------------------------------------------------ balance losses


def test_sequence_loss_known_values():
    E, L = 2, 3
    # Sequence 0 sends every token to expert 0, sequence 1 to expert 1.
    probs = torch.tensor([[1.0, 0.0]] * L + [[0.0, 1.0]] * L)
    idx = torch.tensor([[0]] * L + [[1]] * L)
    assert sequence_balance_loss(probs, idx, L).item() == pytest.approx(E)  # collapsed each
    assert load_balancing_loss(probs, idx).item() == pytest.approx(1.0)  # balanced batch
    # Uniform scores: 1.0 whatever the choices.
    u = torch.full((12, 4), 0.25)
    idx = torch.randint(0, 4, (12, 2))
    assert sequence_balance_loss(u, idx, 4).item() == pytest.approx(1.0)
    assert sequence_balance_loss(u[:0], idx[:0], 4).item() == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_sequence_loss_over_one_sequence_is_the_batch_loss(seed):
    g = torch.Generator().manual_seed(seed)
    T, E, K = 12, 6, 1 + seed % 3
    probs = torch.softmax(torch.randn(T, E, generator=g), -1)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    batch = load_balancing_loss(probs, idx)
    torch.testing.assert_close(sequence_balance_loss(probs, idx, 0), batch)
    torch.testing.assert_close(sequence_balance_loss(probs, idx, T), batch)
    # Per sequence: the mean of each sequence's own batch loss.
    per = [load_balancing_loss(probs[i : i + 4], idx[i : i + 4]) for i in range(0, T, 4)]
    torch.testing.assert_close(sequence_balance_loss(probs, idx, 4), sum(per) / 3)


@pytest.mark.parametrize("opts", [{}, SIG, {**SIG, **GROUPS, "bias_update_rate": 0.01}])
def test_batch_balance_terms_give_the_loss_exactly(opts):
    layer = make_layer(2, opts, cf=0.5)
    x = torch.randn(37, D)
    plan = layer.router(x, 0.5)
    counts, probs = plan.balance_counts_E, plan.balance_probs_E
    assert counts.sum().item() == 37 * 2  # counted before the drops
    assert torch.equal(balance_loss_from_counts(counts, probs), plan.lb_loss)
    assert probs.requires_grad
    # One process with moe.balance_scope=global: the layer's loss is the router's, exactly.
    glob = copy.deepcopy(layer)
    glob.cfg.balance_scope = "global"
    _, aux = layer(x)
    _, aux_g = glob(x)
    assert torch.equal(aux.lb_loss, aux_g.lb_loss) and torch.equal(aux.lb_loss, plan.lb_loss)
    # Empty micro-batch: zero mean scores, not NaN (a rank may have no tokens).
    c0, p0 = balance_terms(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long))
    assert c0.tolist() == [0] * 8 and p0.tolist() == [0.0] * 8


def test_sequence_loss_has_no_batch_terms_and_uses_the_sequences():
    layer = make_layer(2, {**SIG, "balance_loss": "sequence"})
    x = torch.randn(4, 5, D)
    plan = layer.router(x.reshape(20, D), None, seq_len=5)
    assert plan.balance_counts_E is None and plan.balance_probs_E is None
    s = torch.sigmoid(x.reshape(20, D) @ layer.router.weight.detach().t())
    norm = s / s.sum(-1, keepdim=True)
    e_TK = torch.stack([plan.expert_idx_A[plan.token_idx_A == t].sort().values for t in range(20)])
    want = sequence_balance_loss(norm, e_TK, 5)
    assert plan.lb_loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert plan.lb_loss.item() != pytest.approx(load_balancing_loss(norm, e_TK).item(), rel=1e-4)
    whole = layer.router(x.reshape(20, D), None, seq_len=0).lb_loss
    assert whole.item() == pytest.approx(load_balancing_loss(norm, e_TK).item(), rel=1e-6)
    _, aux = layer(x)  # the layer passes L from [B, L, D]
    assert aux.lb_loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_empty_batch_with_every_option():
    layer = make_layer(*OPTIONS["deepseek"])
    x = torch.randn(0, 4, D, requires_grad=True)
    y, aux = layer(x)
    (y.sum() + aux.loss).backward()
    assert y.shape == (0, 4, D) and aux.loss.item() == 0.0


# -------------------------------------------------------------------- config errors

BAD = [
    ({"n_groups": 3}, 8, 2, r"moe\.router_options\.n_groups=3 is invalid.*divide.*num_experts=8"),
    ({"n_groups": 0}, 8, 2, r"moe\.router_options\.n_groups=0 is invalid"),
    ({"n_groups": 4, "topk_groups": 5}, 8, 2, r"topk_groups=5 is invalid.*n_groups=4"),
    ({"n_groups": 4, "topk_groups": 0}, 8, 2, r"topk_groups=0 is invalid"),
    ({"n_groups": 4, "topk_groups": True}, 8, 2, r"topk_groups=True is invalid"),
    ({"n_groups": "4"}, 8, 2, r"n_groups='4' is invalid"),
    ({"n_groups": 4, "topk_groups": 1}, 8, 3, r"moe\.top_k=3 is invalid.*hold only 2"),
    ({"n_groups": 8, "topk_groups": 2}, 8, 3, r"moe\.top_k=3 is invalid.*hold only 2"),
    ({"score_func": "tanh"}, 8, 2, r"score_func='tanh' is invalid.*softmax, sigmoid"),
    ({"balance_loss": "global"}, 8, 2, r"balance_loss='global' is invalid.*batch, sequence"),
    ({"route_scale": 0.0}, 8, 2, r"route_scale=0\.0 is invalid"),
    ({"route_scale": -1}, 8, 2, r"route_scale=-1 is invalid"),
    ({"route_scale": float("inf")}, 8, 2, r"route_scale=inf is invalid"),
]


@pytest.mark.parametrize("opts,E,K,msg", BAD)
def test_bad_options_are_config_errors(opts, E, K, msg):
    with pytest.raises(XparConfigError, match=msg):
        MoEConfig(num_experts=E, top_k=K, router_options=opts)


def test_bad_options_are_refused_when_the_config_is_composed():
    with pytest.raises(XparConfigError, match=r"moe\.router_options\.n_groups=3 is invalid"):
        compose_config(["moe=deepseek", "moe.router_options.n_groups=3"], world_size=2)
    with pytest.raises(XparConfigError, match=r"moe\.top_k=9 is invalid"):
        compose_config(["moe=deepseek", "moe.top_k=9"], world_size=2)


def test_hydra_deepseek_composes_and_trains_a_step():
    cfg = compose_config(["moe=deepseek"], world_size=2, cuda_available=False)
    for world_size in (1, 2, 4):
        cfg.validate(world_size, cuda_available=False)
    o = cfg.moe.options()
    assert (o.score_func, o.n_groups, o.topk_groups, o.balance_loss) == (
        "sigmoid",
        4,
        2,
        "sequence",
    )
    assert o.bias_update_rate > 0 and cfg.moe.shared_expert_d_ff > 0 and cfg.moe.is_causal
    model_cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32)
    torch.manual_seed(0)
    model = MoETransformer(model_cfg, cfg.moe, ep_group="local")
    logits, aux = model(torch.randint(0, 32, (2, 8)))
    (logits.sum() + sum(a.loss for a in aux)).backward()
    assert all(a.lb_loss.item() > 0 for a in aux)
