"""Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by score.

C = min(ceil(capacity_factor * T / E), T). A token may be taken by 0..E experts.
NOT causal: which tokens an expert takes depends on every token in the batch, so a
causal decoder leaks future tokens through it; causal models refuse it. Balanced by
construction, so it has no load-balancing loss; z-loss applies.

Legend: T tokens, E experts, C tokens per expert.
"""

from __future__ import annotations

import math

import torch

from xpar.config.checks import bad
from xpar.moe.plan import RoutingPlan, even_plan
from xpar.moe.routers import LinearRouter, NaiveRoute, register
from xpar.moe.routers.base import stats_of


def expert_choice_capacity(capacity_factor: float, num_tokens: int, num_experts: int) -> int:
    return min(math.ceil(capacity_factor * num_tokens / num_experts), num_tokens)


@register
class ExpertChoiceRouter(LinearRouter):
    name = "expert_choice"
    causal = False

    @classmethod
    def check(cls, cfg, prefix: str) -> None:
        if cfg.capacity_factor is None:
            raise bad(
                prefix,
                "capacity_factor",
                None,
                "expert_choice needs a capacity (each expert takes capacity_factor*T/E tokens); "
                "set e.g. capacity_factor=1.0",
            )

    @classmethod
    def experts_per_token(cls, cfg, seq_len: int = 0) -> float:
        # Each expert takes capacity_factor * T / E tokens: capacity_factor visits per token.
        return min(float(cfg.capacity_factor), float(cfg.num_experts))

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        T, E = x_TD.shape[0], self.cfg.num_experts
        assert capacity_factor is not None, "MoEConfig.validate refuses dropless expert choice"
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = expert_choice_capacity(capacity_factor, T, E)
        w_EC, tok_EC = probs_TE.t().topk(C, dim=-1)
        dev = x_TD.device
        token_idx_A = tok_EC.reshape(-1)
        taken_T = torch.zeros(T, dtype=torch.bool, device=dev)
        taken_T[token_idx_A] = True
        dropped = 1.0 - taken_T.float().mean() if T > 0 else torch.zeros((), device=dev)
        stats = stats_of(logits_TE, probs_TE, logits_TE.sum() * 0.0)
        return even_plan(token_idx_A, w_EC.reshape(-1), E, C, T, stats, dropped)

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> NaiveRoute:
        T, E = x_TD.shape[0], self.cfg.num_experts
        logits_TE, probs_TE = self.naive_probs(x_TD)
        C = min(math.ceil(capacity_factor * T / E), T)
        kept = [
            (t, e, probs_TE[t, e])
            for e in range(E)
            for t in probs_TE[:, e].topk(C).indices.tolist()
        ]
        return kept, logits_TE.sum() * 0.0
