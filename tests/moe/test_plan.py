"""plan_from_choices: capacity and the drop policy, on hand-made choices."""

import pytest
import torch

from xpar.moe.plan import RouterStats, plan_from_choices

ZERO = torch.zeros(())
STATS = RouterStats(lb_loss=ZERO, z_loss=ZERO, entropy=ZERO)


def _plan(e_TK, w_TK, cf, policy="probs", E=2):
    return plan_from_choices(
        torch.tensor(e_TK),
        torch.tensor(w_TK),
        num_experts=E,
        capacity_factor=cf,
        drop_policy=policy,
        stats=STATS,
    )


def _pairs(plan):
    return list(zip(plan.token_idx_A.tolist(), plan.expert_idx_A.tolist(), strict=True))


def test_dropless_keeps_everything_grouped_by_expert():
    plan = _plan([[1, 0], [0, 1], [1, 0]], [[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]], None)
    assert plan.expert_idx_A.tolist() == [0, 0, 0, 1, 1, 1]
    assert plan.counts_E.tolist() == [3, 3] and plan.dropped_fraction.item() == 0.0
    w = {p: plan.weight_A[i].item() for i, p in enumerate(_pairs(plan))}
    assert w[(0, 1)] == pytest.approx(0.6) and w[(2, 0)] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "policy, kept_first",
    [("probs", [(2, 0)]), ("position", [(0, 0)])],
)
def test_capacity_keeps_first_choices_then_by_policy(policy, kept_first):
    # 4 tokens, top-1 of 2 experts, cf 0.5: capacity ceil(0.5 * 1 * 4 / 2) = 1 per expert.
    e_TK = [[0], [0], [0], [1]]
    w_TK = [[0.5], [0.6], [0.9], [0.8]]
    plan = _plan(e_TK, w_TK, 0.5, policy)
    assert _pairs(plan) == kept_first + [(3, 1)]
    assert plan.tokens_per_expert_E.tolist() == [3.0, 1.0]
    assert plan.dropped_fraction.item() == pytest.approx(0.5)


def test_second_choices_never_displace_first_choices():
    # Expert 0 is token 1's first choice and token 0's second choice (with a higher weight).
    plan = _plan([[1, 0], [0, 1]], [[0.1, 0.9], [0.8, 0.2]], 0.5)  # capacity 1
    assert (1, 0) in _pairs(plan) and (0, 0) not in _pairs(plan)
