"""Token choice top-k (Switch for k=1, GShard/Mixtral for k>1).

Each token picks its top-k distinct experts by softmax probability over all E. k=1
keeps the raw probability as the combine weight (Switch); k>1 renormalises over the
chosen k unless moe.renormalize is false. Capacity and drops: `plan_from_choices`.

Auxiliary-loss-free balancing (Wang et al. 2024), `moe.router_options.bias_update_rate > 0`:
a per-expert bias is added to the probabilities for the choice of experts only, never to the
combine weights, and after each applied optimizer step moves by
`rate * sign(mean load - load_i)` from the load of the whole step over every rank.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xpar.config.checks import bad, is_number
from xpar.moe.losses import load_balancing_loss
from xpar.moe.plan import RoutingPlan, plan_from_choices
from xpar.moe.routers import LinearRouter, NaiveRoute, register
from xpar.moe.routers.base import stats_of


@dataclass
class TopKOptions:
    bias_update_rate: float = 0.0  # aux-loss-free balancing's bias step; 0 = off

    def validate(self, prefix: str) -> None:
        r = self.bias_update_rate
        if not is_number(r) or not 0 <= r < 1:
            raise bad(prefix, "bias_update_rate", r, "use 0 (off) or a small step, e.g. 1e-3")


@register
class TopKRouter(LinearRouter):
    name = "topk"
    Options = TopKOptions

    def __init__(self, d_model: int, cfg, vocab_size: int = 0) -> None:
        super().__init__(d_model, cfg, vocab_size)
        self.bias_update_rate = float(cfg.options().bias_update_rate)
        if self.bias_update_rate > 0:  # only then: a plain top-k's state dict is unchanged
            self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts))

    @property
    def updates_after_step(self) -> bool:
        return self.bias_update_rate > 0

    def after_optimizer_step(self, load_E: torch.Tensor) -> None:
        if self.updates_after_step:
            load_E = load_E.to(self.expert_bias_E)
            self.expert_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)

    def _choose(self, probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen probabilities, experts) [T, K]: the bias steers the choice, not the weight."""
        if not self.updates_after_step:
            return probs_TE.topk(self.cfg.top_k, dim=-1)
        top_e_TK = (probs_TE + self.expert_bias_E).topk(self.cfg.top_k, dim=-1).indices
        return probs_TE.gather(-1, top_e_TK), top_e_TK

    def _weights(self, probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_p_TK, top_e_TK = self._choose(probs_TE)
        if self.cfg.top_k > 1 and self.cfg.renormalize:
            return top_p_TK / top_p_TK.sum(dim=-1, keepdim=True), top_e_TK
        return top_p_TK, top_e_TK

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        w_TK, top_e_TK = self._weights(probs_TE)
        return plan_from_choices(
            top_e_TK,
            w_TK,
            num_experts=self.cfg.num_experts,
            capacity_factor=capacity_factor,
            drop_policy=self.cfg.drop_policy,
            stats=stats_of(logits_TE, probs_TE, load_balancing_loss(probs_TE, top_e_TK)),
        )

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> NaiveRoute:
        cfg = self.cfg
        T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
        _, probs_TE = self.naive_probs(x_TD)
        bias_E = getattr(self, "expert_bias_E", probs_TE.new_zeros(E))
        top_e = (probs_TE + bias_E).topk(K, dim=-1).indices
        top_p = probs_TE.gather(-1, top_e)
        w = top_p / top_p.sum(-1, keepdim=True) if (K > 1 and cfg.renormalize) else top_p
        cap = math.inf if capacity_factor is None else math.ceil(capacity_factor * K * T / E)
        load, kept = [0] * E, []
        for k in range(K):
            order = list(range(T))
            if cfg.drop_policy == "probs":
                order = sorted(order, key=lambda t: -w[t, k].item())
            for t in order:
                e = int(top_e[t, k])
                if load[e] < cap:
                    load[e] += 1
                    kept.append((t, e, w[t, k]))
        lb = probs_TE.new_zeros(())
        for i in range(E):
            f_i = sum(int(top_e[t, k]) == i for t in range(T) for k in range(K)) / max(T * K, 1)
            lb = lb + f_i * probs_TE[:, i].mean()
        return kept, E * lb
