"""Top-k router invariants as property tests (hypothesis drives sizes, k, capacity, seeds)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from router_helpers import make_router

from xpar.moe.config import MoEConfig
from xpar.moe.plan import token_choice_capacity
from xpar.moe.routers import get_router

topk_cases = st.tuples(
    st.integers(1, 9),  # E
    st.integers(1, 4),  # K (clipped to E)
    st.integers(0, 60),  # T
    st.sampled_from([None, 0.25, 0.5, 1.0, 1.25, 2.0]),
    st.sampled_from(["probs", "position"]),
    st.integers(0, 10_000),
)


def route(case):
    E, K, T, cf, policy, seed = case
    K = min(K, E)
    r = make_router(E, K, seed=seed, policy=policy)
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        logits = x @ r.weight.t()
        top_e = torch.softmax(logits, -1).topk(K, dim=-1).indices
        plan = r(x, cf)
    return E, K, T, cf, policy, r, x, plan, top_e


@settings(max_examples=120, deadline=None)
@given(topk_cases)
def test_topk_plan_invariants(case):
    E, K, T, cf, policy, r, x, plan, top_e = route(case)
    pairs = list(zip(plan.token_idx_A.tolist(), plan.expert_idx_A.tolist(), strict=True))
    # k distinct experts per token; kept pairs are a subset of the choices, no duplicates.
    for t in range(T):
        assert len(set(top_e[t].tolist())) == K
    assert len(set(pairs)) == len(pairs)
    choice = {(t, e): k for t in range(T) for k, e in enumerate(top_e[t].tolist())}
    assert all(p in choice for p in pairs)
    # Grouped by expert; counts agree; load before drop counts every choice.
    assert torch.all(plan.expert_idx_A[1:] >= plan.expert_idx_A[:-1])
    assert plan.counts_E.tolist() == torch.bincount(plan.expert_idx_A, minlength=E).tolist()
    assert plan.tokens_per_expert_E.sum().item() == T * K
    # Load <= capacity.
    cap = math.inf if cf is None else token_choice_capacity(cf, K, T, E)
    assert all(c <= cap for c in plan.counts_E.tolist())
    # First choices never dropped for second ones, per expert.
    kept = set(pairs)
    for e in range(E):
        ks_kept = [choice[p] for p in kept if p[1] == e]
        ks_dropped = [k for (t, ee), k in choice.items() if ee == e and (t, ee) not in kept]
        if ks_kept and ks_dropped:
            assert max(ks_kept) <= min(ks_dropped)
    # Within a choice rank: position keeps a prefix in token order; probs the top weights.
    w = r.cfg
    for e in range(E):
        for k in range(K):
            cands = [t for t in range(T) if top_e[t, k].item() == e]
            kept_t = [t for t in cands if (t, e) in kept]
            if policy == "position":
                assert kept_t == cands[: len(kept_t)]
            elif kept_t and len(kept_t) < len(cands):
                # "probs" ranks by the combine weight (renormalised over the k choices).
                top_p = torch.softmax(x @ r.weight.t(), -1).topk(K, dim=-1).values
                cw = top_p / top_p.sum(-1, keepdim=True) if K > 1 else top_p
                kept_w = min(cw[t, k].item() for t in kept_t)
                drop_w = max(cw[t, k].item() for t in cands if t not in kept_t)
                assert kept_w >= drop_w - 1e-7
    # No drops when capacity_factor * k >= E.
    if cf is None or cf * K >= E:
        assert plan.dropped_fraction.item() == 0.0
        assert len(pairs) == T * K
    assert w.top_k == K


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(2, 4), st.integers(1, 40), st.integers(0, 999))
def test_renormalised_weights_sum_to_one(E, K, T, seed):
    K = min(K, E)
    r = make_router(E, K, seed=seed, cf=None)
    plan = r(torch.randn(T, 8), None)
    sums = torch.zeros(T).index_add(0, plan.token_idx_A, plan.weight_A.detach())
    torch.testing.assert_close(sums, torch.ones(T))


def test_switch_k1_keeps_raw_probability_and_no_renorm_flag():
    r = make_router(6, 1, cf=None)
    x = torch.randn(20, 8)
    plan = r(x, None)
    p = torch.softmax(x @ r.weight.t(), -1)
    torch.testing.assert_close(plan.weight_A, p[plan.token_idx_A, plan.expert_idx_A])
    r2 = make_router(6, 3, cf=None, renormalize=False)
    plan2 = r2(x, None)
    p2 = torch.softmax(x @ r2.weight.t(), -1)
    torch.testing.assert_close(plan2.weight_A, p2[plan2.token_idx_A, plan2.expert_idx_A])


def test_topk_balance_loss_is_one_under_uniform_routing():
    # Through a router with zero weights (uniform softmax): exactly 1 before weighting.
    r = make_router(8, 2, cf=None)
    with torch.no_grad():
        r.weight.zero_()
    assert r(torch.randn(40, 8), None).lb_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_router_scores_in_float32_and_jitter_only_in_training():
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=4, jitter_eps=0.1)
    r = get_router("topk")(8, cfg)
    x = torch.randn(10, 8).to(torch.bfloat16)
    assert r.logits(x).dtype == torch.float32
    r.eval()
    torch.testing.assert_close(r.logits(x), r.logits(x))
    r.train()
    assert not torch.equal(r.logits(x), r.logits(x))
