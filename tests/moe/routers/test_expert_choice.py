"""Expert choice: each expert takes exactly its capacity of distinct tokens."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from router_helpers import make_router


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(0, 50),
    st.sampled_from([0.1, 0.5, 1.0, 2.0, 20.0]),
    st.integers(0, 999),
)
def test_expert_choice_gives_each_expert_min_capacity_tokens(E, T, cf, seed):
    r = make_router(E, 1, router="expert_choice", cf=cf, seed=seed)
    plan = r(torch.randn(T, 8), cf)
    C = min(math.ceil(cf * T / E), T)
    assert plan.counts_E.tolist() == [C] * E
    for e in range(E):
        toks = plan.token_idx_A[plan.expert_idx_A == e].tolist()
        assert len(set(toks)) == len(toks) == C
