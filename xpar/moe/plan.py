"""RoutingPlan, and the one place where token choices meet capacity and the drop policy.

Any token-choice router produces choices (expert_idx_TK, weight_TK) and calls
`plan_from_choices`; routers that choose differently (expert choice) build the plan
themselves.

Legend: T tokens, E experts, K choices per token, A kept assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DROP_POLICIES = ("probs", "position")


@dataclass
class RouterStats:
    """The router's losses (unweighted) and its entropy metric for one batch."""

    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    entropy: torch.Tensor


@dataclass
class RoutingPlan:
    """Kept (token, expert, weight) assignments, grouped by expert.

    expert_idx_A is non-decreasing, so rows for expert i are contiguous and
    counts_E[i] long; a token may appear 0..E times.
    """

    token_idx_A: torch.Tensor  # long [A]
    expert_idx_A: torch.Tensor  # long [A], sorted
    weight_A: torch.Tensor  # float32 [A], differentiable w.r.t. the router
    counts_E: torch.Tensor  # long [E], kept rows per expert
    tokens_per_expert_E: torch.Tensor  # float [E], assignments before dropping
    num_tokens: int
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_fraction: torch.Tensor
    entropy: torch.Tensor
    # Soft routing (Soft MoE), per sequence (B sequences of L tokens, J slots each): slot j
    # of sequence b takes sum_l slot_dispatch_BLJ[b, l, j] x[b, l], and token (b, l) gets
    # sum_j slot_combine_BLJ[b, l, j] times slot j's output; token_idx_A/num_tokens index
    # the B*J slots, expert-major (see MoELayer). None: rows are the tokens themselves.
    slot_dispatch_BLJ: torch.Tensor | None = None
    slot_combine_BLJ: torch.Tensor | None = None
    # The batch-wise balance loss's terms, for moe.balance_scope=global: assignments per
    # expert (counted before drops) and the differentiable mean score per expert. None: the
    # router has no such loss (or a per-sequence one), and lb_loss stands as it is.
    balance_counts_E: torch.Tensor | None = None
    balance_probs_E: torch.Tensor | None = None


def even_plan(
    token_idx_A: torch.Tensor,
    weight_A: torch.Tensor,
    num_experts: int,
    per_expert: int,
    num_tokens: int,
    stats: RouterStats,
    dropped_fraction: torch.Tensor | None = None,
    **slots: torch.Tensor,
) -> RoutingPlan:
    """The plan of a router that gives every expert the same `per_expert` rows, expert-major
    (expert choice, the soft mixture, Soft MoE's slots): nothing to count or drop by
    capacity. `dropped_fraction`: tokens no expert took (default none); `slots`: Soft MoE's
    slot_dispatch_BLJ / slot_combine_BLJ."""
    E, dev = num_experts, token_idx_A.device
    counts_E = torch.full((E,), per_expert, dtype=torch.long, device=dev)
    return RoutingPlan(
        token_idx_A=token_idx_A,
        expert_idx_A=torch.arange(E, device=dev).repeat_interleave(per_expert),
        weight_A=weight_A,
        counts_E=counts_E,
        tokens_per_expert_E=counts_E.float(),
        num_tokens=num_tokens,
        lb_loss=stats.lb_loss,
        z_loss=stats.z_loss,
        dropped_fraction=(
            torch.zeros((), device=dev) if dropped_fraction is None else dropped_fraction
        ),
        entropy=stats.entropy,
        **slots,
    )


def token_choice_capacity(
    capacity_factor: float, top_k: int, num_tokens: int, num_experts: int
) -> int:
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def plan_from_choices(
    expert_idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    num_experts: int,
    capacity_factor: float | None,
    drop_policy: str,
    stats: RouterStats,
) -> RoutingPlan:
    """Keep at most ceil(capacity_factor * K * T / E) rows per expert (None: keep all).

    Every first choice is placed before any second choice; within a choice rank `probs`
    keeps the highest weights, `position` the earlier tokens. A token's K experts must
    be distinct.
    """
    T, K = expert_idx_TK.shape
    E, dev = num_experts, expert_idx_TK.device
    # Assignments in choice-major order: a = k*T + t.
    e_A0 = expert_idx_TK.t().reshape(-1)
    counts_before_E = torch.bincount(e_A0, minlength=E)
    cap = None if capacity_factor is None else token_choice_capacity(capacity_factor, K, T, E)
    if cap is None or cap >= T:
        # No expert can overflow: each takes at most T rows (experts are distinct per token).
        a_kept = torch.argsort(e_A0, stable=True)
    else:
        a_kept = _kept_under_capacity(e_A0, weight_TK, counts_before_E, cap, drop_policy)
    token_idx_A = a_kept % max(T, 1)
    k_idx_A = a_kept // max(T, 1)
    expert_idx_A = e_A0[a_kept]
    dropped = 1.0 - a_kept.numel() / (K * T) if T > 0 else 0.0
    return RoutingPlan(
        token_idx_A=token_idx_A,
        expert_idx_A=expert_idx_A,
        weight_A=weight_TK[token_idx_A, k_idx_A],
        counts_E=torch.bincount(expert_idx_A, minlength=E),
        tokens_per_expert_E=counts_before_E.float(),
        num_tokens=T,
        lb_loss=stats.lb_loss,
        z_loss=stats.z_loss,
        dropped_fraction=torch.tensor(dropped, device=dev),
        entropy=stats.entropy,
    )


def _kept_under_capacity(
    e_A0: torch.Tensor, weight_TK: torch.Tensor, counts_E: torch.Tensor, cap: int, policy: str
) -> torch.Tensor:
    """Assignment ids (choice-major) that fit, grouped by expert in priority order."""
    T, K = weight_TK.shape
    dev = e_A0.device
    if policy == "probs":
        prio_KT = torch.argsort(-weight_TK.detach().t(), dim=-1, stable=True)
        prio_A0 = (prio_KT + torch.arange(K, device=dev).unsqueeze(1) * T).reshape(-1)
    else:  # position: choice rank, then token order
        prio_A0 = torch.arange(K * T, device=dev)
    e_prio = e_A0[prio_A0]
    by_expert = torch.argsort(e_prio, stable=True)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos = torch.arange(K * T, device=dev) - starts_E[e_prio[by_expert]]
    return prio_A0[by_expert][pos < cap]
