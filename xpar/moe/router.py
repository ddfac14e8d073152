"""The gating service: routers that turn token activations into a RoutingPlan.

Pure math on local tensors: no process group, unit-testable on one device.

Legend: T tokens, D model dim, E experts, K top-k, A kept assignments, C capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from xpar.moe.config import MoEConfig
from xpar.moe.losses import load_balancing_loss, router_entropy, z_loss


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


def token_choice_capacity(
    capacity_factor: float, top_k: int, num_tokens: int, num_experts: int
) -> int:
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def expert_choice_capacity(capacity_factor: float, num_tokens: int, num_experts: int) -> int:
    return min(math.ceil(capacity_factor * num_tokens / num_experts), num_tokens)


class _RouterBase(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Scores in float32 whatever the activation dtype: softmax over E is sensitive.
        x_TD = x_TD.float()
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD @ self.weight.float().t()


class TopKRouter(_RouterBase):
    """Token choice: each token picks its top-k distinct experts.

    k=1 keeps the raw probability as the combine weight (Switch); k>1 renormalises
    over the chosen k (GShard/Mixtral) unless cfg.renormalize is False. With a
    capacity, every first choice is placed before any second choice; within a
    choice rank `probs` keeps the highest weights, `position` the earlier tokens.
    """

    def forward(self, x_TD: torch.Tensor, capacity_factor: float | None) -> RoutingPlan:
        cfg = self.cfg
        T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, top_e_TK = probs_TE.topk(K, dim=-1)
        if K > 1 and cfg.renormalize:
            w_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        else:
            w_TK = top_p_TK

        # Assignments in choice-major order: a = k*T + t.
        e_A0 = top_e_TK.t().reshape(-1)
        counts_before_E = torch.bincount(e_A0, minlength=E)
        dev = x_TD.device
        cap = None if capacity_factor is None else token_choice_capacity(capacity_factor, K, T, E)
        if cap is None or cap >= T:
            # No expert can overflow: each takes at most T rows (experts are distinct per token).
            order_A0 = torch.argsort(e_A0, stable=True)
            a_kept = order_A0
        else:
            if cfg.drop_policy == "probs":
                w_KT = w_TK.detach().t()
                prio_KT = torch.argsort(-w_KT, dim=-1, stable=True)
                prio_KT = prio_KT + torch.arange(K, device=dev).unsqueeze(1) * T
                prio_A0 = prio_KT.reshape(-1)
            else:  # position: choice rank, then token order
                prio_A0 = torch.arange(K * T, device=dev)
            e_prio = e_A0[prio_A0]
            by_expert = torch.argsort(e_prio, stable=True)
            e_sorted = e_prio[by_expert]
            starts_E = torch.cumsum(counts_before_E, 0) - counts_before_E
            pos = torch.arange(K * T, device=dev) - starts_E[e_sorted]
            a_kept = prio_A0[by_expert][pos < cap]

        token_idx_A = a_kept % max(T, 1)
        k_idx_A = a_kept // max(T, 1)
        expert_idx_A = e_A0[a_kept]
        weight_A = w_TK[token_idx_A, k_idx_A]
        counts_E = torch.bincount(expert_idx_A, minlength=E)
        dropped = 1.0 - a_kept.numel() / (K * T) if T > 0 else 0.0
        return RoutingPlan(
            token_idx_A=token_idx_A,
            expert_idx_A=expert_idx_A,
            weight_A=weight_A,
            counts_E=counts_E,
            tokens_per_expert_E=counts_before_E.float(),
            num_tokens=T,
            lb_loss=load_balancing_loss(probs_TE, top_e_TK),
            z_loss=z_loss(logits_TE),
            dropped_fraction=torch.tensor(dropped, device=dev),
            entropy=router_entropy(probs_TE),
        )


class ExpertChoiceRouter(_RouterBase):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by score.

    C = min(ceil(capacity_factor * T / E), T). A token may be taken by 0..E experts.
    NOT causal: which tokens an expert takes depends on every token in the batch,
    so a causal decoder leaks future tokens through it; causal models refuse it.
    Balanced by construction, so it has no load-balancing loss; z-loss applies.
    """

    def forward(self, x_TD: torch.Tensor, capacity_factor: float | None) -> RoutingPlan:
        cfg = self.cfg
        T, E = x_TD.shape[0], cfg.num_experts
        assert capacity_factor is not None, "MoEConfig.validate refuses dropless expert choice"
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = expert_choice_capacity(capacity_factor, T, E)
        w_EC, tok_EC = probs_TE.t().topk(C, dim=-1)
        dev = x_TD.device
        expert_idx_A = torch.arange(E, device=dev).repeat_interleave(C)
        token_idx_A = tok_EC.reshape(-1)
        taken_T = torch.zeros(T, dtype=torch.bool, device=dev)
        taken_T[token_idx_A] = True
        dropped = 1.0 - taken_T.float().mean() if T > 0 else torch.zeros((), device=dev)
        counts_E = torch.full((E,), C, dtype=torch.long, device=dev)
        return RoutingPlan(
            token_idx_A=token_idx_A,
            expert_idx_A=expert_idx_A,
            weight_A=w_EC.reshape(-1),
            counts_E=counts_E,
            tokens_per_expert_E=counts_E.float(),
            num_tokens=T,
            lb_loss=logits_TE.sum() * 0.0,
            z_loss=z_loss(logits_TE),
            dropped_fraction=dropped,
            entropy=router_entropy(probs_TE),
        )


def build_router(d_model: int, cfg: MoEConfig) -> _RouterBase:
    if cfg.router == "topk":
        return TopKRouter(d_model, cfg)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(d_model, cfg)
    raise AssertionError(f"unvalidated router {cfg.router!r}")
