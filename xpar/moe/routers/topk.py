"""Token choice top-k (Switch for k=1, GShard/Mixtral for k>1, DeepSeek-V3 by its options).

Each token picks its top-k distinct experts by score. k=1 keeps the raw score as the
combine weight (Switch); k>1 renormalises over the chosen k unless moe.renormalize is
false. Capacity and drops: `plan_from_choices`.

Options (moe.router_options; the defaults are plain top-k, computed exactly as before):
- `score_func`: `softmax` over the E experts (default) or `sigmoid` of each logit
  (DeepSeek-V3). The balance losses and the entropy metric use the scores normalised over
  experts, s' = s / sum_j s_j (softmax scores already are).
- `n_groups`, `topk_groups`: group-limited routing (DeepSeek-V3's node-limited routing).
  The experts are split into n_groups contiguous groups (so, with EP ranks holding
  contiguous slices, groups can be ranks); each token keeps the topk_groups groups with the
  highest sum of their top-2 selection scores (top-1 for groups of one expert) and picks
  its k experts among those groups only. n_groups=1: off.
- `route_scale`: multiplies the combine weights (after any renormalisation).
- `balance_loss`: `batch`, the Switch loss E * sum_i f_i P_i over the micro-batch (its
  terms go into the plan, so moe.balance_scope=global can sum the load over ranks), or
  `sequence`, DeepSeek-V3's sequence-wise loss (`sequence_balance_loss`; the batch is one
  sequence when the caller gives no sequence length), which stays per micro-batch.

Auxiliary-loss-free balancing (Wang et al. 2024), `bias_update_rate > 0`: a per-expert bias
is added to the scores for the choice of experts only (group choice included), never to
the combine weights, and after each applied optimizer step moves by
`rate * sign(mean load - load_i)` from the load of the whole step over every rank.

The z-loss (on the logits) applies to both score functions.

Legend: T tokens, D model dim, E experts, K top-k, G groups, g experts per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xpar.config.checks import bad, is_finite, is_int, is_number, need_choice, need_int
from xpar.moe.losses import balance_terms, load_balancing_loss, sequence_balance_loss
from xpar.moe.plan import RoutingPlan, plan_from_choices
from xpar.moe.routers import LinearRouter, NaiveRoute, register
from xpar.moe.routers.base import stats_of

SCORE_FUNCS = ("softmax", "sigmoid")
BALANCE_LOSSES = ("batch", "sequence")


@dataclass
class TopKOptions:
    bias_update_rate: float = 0.0  # aux-loss-free balancing's bias step; 0 = off
    score_func: str = "softmax"  # softmax over experts, or sigmoid per expert (DeepSeek-V3)
    n_groups: int = 1  # contiguous expert groups for group-limited routing; 1 = off
    topk_groups: int = 1  # groups each token may use (when n_groups > 1)
    route_scale: float = 1.0  # multiplies the combine weights
    balance_loss: str = "batch"  # batch (Switch) or sequence (DeepSeek-V3's sequence-wise)

    def validate(self, prefix: str) -> None:
        r = self.bias_update_rate
        if not is_number(r) or not 0 <= r < 1:
            raise bad(prefix, "bias_update_rate", r, "use 0 (off) or a small step, e.g. 1e-3")
        need_choice(prefix, self, "score_func", SCORE_FUNCS)
        need_choice(prefix, self, "balance_loss", BALANCE_LOSSES)
        need_int(prefix, self, "n_groups", 1, "use 1 (off) or a divisor of moe.num_experts")
        if not is_int(self.topk_groups) or not 1 <= self.topk_groups <= self.n_groups:
            raise bad(
                prefix,
                "topk_groups",
                self.topk_groups,
                f"use an integer from 1 to n_groups={self.n_groups}",
            )
        if not is_finite(self.route_scale) or not self.route_scale > 0:
            raise bad(prefix, "route_scale", self.route_scale, "use a number > 0, e.g. 1.0")


def group_limited(sel_TE: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """sel_TE with the experts outside each token's topk_groups best groups set to -inf; a
    group's score is the sum of its top-2 entries (top-1 for a group of one expert)."""
    T, E = sel_TE.shape
    sel_TGg = sel_TE.reshape(T, n_groups, E // n_groups)
    group_TG = sel_TGg.topk(min(2, E // n_groups), dim=-1).values.sum(dim=-1)
    keep_TG = group_TG.topk(topk_groups, dim=-1).indices
    drop_TG = torch.ones(T, n_groups, dtype=torch.bool, device=sel_TE.device)
    drop_TG.scatter_(1, keep_TG, False)
    return sel_TGg.masked_fill(drop_TG.unsqueeze(-1), -math.inf).reshape(T, E)


@register
class TopKRouter(LinearRouter):
    name = "topk"
    Options = TopKOptions

    def __init__(self, d_model: int, cfg, vocab_size: int = 0) -> None:
        super().__init__(d_model, cfg, vocab_size)
        opts = cfg.options()
        self.bias_update_rate = float(opts.bias_update_rate)
        self.score_func = opts.score_func
        self.n_groups, self.topk_groups = int(opts.n_groups), int(opts.topk_groups)
        self.route_scale = float(opts.route_scale)
        self.balance_loss = opts.balance_loss
        if self.bias_update_rate > 0:  # only then: a plain top-k's state dict is unchanged
            self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts))

    @classmethod
    def check(cls, cfg, prefix: str) -> None:
        opts = cfg.options(prefix)  # its own fields first
        E, where = cfg.num_experts, f"{prefix}.router_options"
        if E % opts.n_groups:
            raise bad(
                where,
                "n_groups",
                opts.n_groups,
                f"n_groups must divide moe.num_experts={E} (groups are equal, contiguous "
                f"slices of the experts); use a divisor of {E}",
            )
        room = opts.topk_groups * (E // opts.n_groups)
        if cfg.top_k > room:
            raise bad(
                prefix,
                "top_k",
                cfg.top_k,
                f"the topk_groups={opts.topk_groups} chosen groups of {E // opts.n_groups} "
                f"experts hold only {room}; lower top_k to <= {room} or raise "
                "moe.router_options.topk_groups",
            )

    @property
    def updates_after_step(self) -> bool:
        return self.bias_update_rate > 0

    def after_optimizer_step(self, load_E: torch.Tensor) -> None:
        if self.updates_after_step:
            load_E = load_E.to(self.expert_bias_E)
            self.expert_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)

    def _scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, scores normalised over experts) [T, E]."""
        if self.score_func == "softmax":
            probs_TE = torch.softmax(logits_TE, dim=-1)
            return probs_TE, probs_TE
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def _choose(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores, experts) [T, K]: the bias and the groups steer the choice only."""
        if not self.updates_after_step and self.n_groups == 1:
            return scores_TE.topk(self.cfg.top_k, dim=-1)
        sel_TE = scores_TE.detach()
        if self.updates_after_step:
            sel_TE = sel_TE + self.expert_bias_E
        if self.n_groups > 1:
            sel_TE = group_limited(sel_TE, self.n_groups, self.topk_groups)
        top_e_TK = sel_TE.topk(self.cfg.top_k, dim=-1).indices
        return scores_TE.gather(-1, top_e_TK), top_e_TK

    def _weights(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_p_TK, top_e_TK = self._choose(scores_TE)
        if self.cfg.top_k > 1 and self.cfg.renormalize:
            top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            top_p_TK = top_p_TK * self.route_scale
        return top_p_TK, top_e_TK

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        logits_TE = self.logits(x_TD)
        scores_TE, norm_TE = self._scores(logits_TE)
        w_TK, top_e_TK = self._weights(scores_TE)
        if self.balance_loss == "sequence":
            lb_loss = sequence_balance_loss(norm_TE, top_e_TK, seq_len)
        else:
            lb_loss = load_balancing_loss(norm_TE, top_e_TK)
        plan = plan_from_choices(
            top_e_TK,
            w_TK,
            num_experts=self.cfg.num_experts,
            capacity_factor=capacity_factor,
            drop_policy=self.cfg.drop_policy,
            stats=stats_of(logits_TE, norm_TE, lb_loss),
        )
        if self.balance_loss == "batch":  # the sequence loss has no batch-wide terms
            plan.balance_counts_E, plan.balance_probs_E = balance_terms(norm_TE, top_e_TK)
        return plan

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> NaiveRoute:
        cfg = self.cfg
        T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
        logits_TE, probs_TE = self.naive_probs(x_TD)
        bias_E = getattr(self, "expert_bias_E", probs_TE.new_zeros(E))
        top_e, w = [], []
        for t in range(T):
            s_E = probs_TE[t] if self.score_func == "softmax" else torch.sigmoid(logits_TE[t])
            top_e.append(self._naive_choice((s_E.detach() + bias_E).tolist()))
            p = [s_E[e] for e in top_e[t]]
            if K > 1 and cfg.renormalize:
                total = sum(p)
                p = [pk / total for pk in p]
            w.append([pk * self.route_scale for pk in p])
        cap = math.inf if capacity_factor is None else math.ceil(capacity_factor * K * T / E)
        load, kept = [0] * E, []
        for k in range(K):
            order = list(range(T))
            if cfg.drop_policy == "probs":
                order = sorted(order, key=lambda t: -w[t][k].item())
            for t in order:
                e = top_e[t][k]
                if load[e] < cap:
                    load[e] += 1
                    kept.append((t, e, w[t][k]))
        return kept, self._naive_balance(logits_TE, probs_TE, top_e, seq_len)

    def _naive_choice(self, sel: list[float]) -> list[int]:
        """One token's K experts from its selection scores (bias added), groups applied."""
        E, G = len(sel), self.n_groups
        allowed = list(range(E))
        if G > 1:
            g = E // G
            group = [sum(sorted(sel[i * g : (i + 1) * g], reverse=True)[:2]) for i in range(G)]
            best = sorted(range(G), key=lambda i: -group[i])[: self.topk_groups]
            allowed = [e for e in allowed if e // g in best]
        return sorted(allowed, key=lambda e: -sel[e])[: self.cfg.top_k]

    def _naive_balance(
        self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, top_e: list, seq_len: int
    ) -> torch.Tensor:
        T, E, K = len(top_e), self.cfg.num_experts, self.cfg.top_k
        if self.score_func == "sigmoid":
            s = torch.sigmoid(logits_TE)
            probs_TE = torch.stack([s[t] / s[t].sum() for t in range(T)]) if T else s
        if T == 0:
            return probs_TE.sum() * 0.0
        L = T if self.balance_loss == "batch" or seq_len == 0 else seq_len
        per_seq = []
        for b in range(T // L):
            toks = range(b * L, (b + 1) * L)
            lb = probs_TE.new_zeros(())
            for i in range(E):
                n_i = sum(top_e[t].count(i) for t in toks)
                lb = lb + (n_i / (K * L)) * sum(probs_TE[t, i] for t in toks) / L
            per_seq.append(E * lb)
        return sum(per_seq) / len(per_seq)
