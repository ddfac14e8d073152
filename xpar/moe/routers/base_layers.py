"""BASE layers (Lewis et al. 2021), with the Sinkhorn assignment of S-BASE (Clark et al. 2022).

A linear router scores tokens, logits_TE = x_TD W^T. Each token goes to exactly one expert
with the combine weight sigmoid(logit of that expert), differentiable w.r.t. W.

Training (self.training): a balanced assignment. Every expert gets exactly its share of the
rank's T tokens: T // E each, and the remainder T % E one more each for experts 0..T%E-1
(so for T < E, experts 0..T-1 get one token and the rest none). It is computed by
Sinkhorn iterations on the scores (float32, log space, no gradient; at most
moe.router_options.sinkhorn_iters rounds, stopping once every column sum is within a
relative sinkhorn_tol of its share) and a greedy rounding of the plan that respects the
shares exactly: (token, expert) pairs in descending plan order (ties by t * E + e), each
assigned when the token is free and the expert has room. The capacity factor does not
apply in training (the shares are exact; nothing is dropped).

Eval (not self.training): plain top-1 by score, as BASE does at test time, through
`plan_from_choices` with the eval capacity (moe.eval_capacity_factor, else capacity_factor).

NOT causal: in training a token's expert depends on every token in the batch, future
tokens included, so the decoder-only LM refuses it; the encoder (model.causal=false)
takes it. Balanced by construction: no load-balancing loss; the z-loss applies as for the
other linear routers.

Legend: T tokens, D model dim, E experts, F free (not yet assigned) tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xpar.config.checks import bad, need_int, need_positive
from xpar.moe.plan import RoutingPlan, plan_from_choices
from xpar.moe.routers import LinearRouter, NaiveRoute, register
from xpar.moe.routers.base import stats_of


@dataclass
class BaseOptions:
    sinkhorn_iters: int = 20  # at most this many (row, column) normalisation rounds
    sinkhorn_tol: float = 1e-3  # stop when every column sum is within this (relative) of its share

    def validate(self, prefix: str) -> None:
        need_int(prefix, self, "sinkhorn_iters", 1, "use an integer >= 1, e.g. 20")
        need_positive(prefix, self, "sinkhorn_tol", "use a small tolerance > 0, e.g. 1e-3")


def expert_shares(num_tokens: int, num_experts: int) -> list[int]:
    """T // E tokens per expert, one more for each of the first T % E experts."""
    q, r = divmod(num_tokens, num_experts)
    return [q + (e < r) for e in range(num_experts)]


@torch.no_grad()
def sinkhorn_log_plan(
    logits_TE: torch.Tensor, shares_E: torch.Tensor, iters: int, tol: float
) -> torch.Tensor:
    """log of the plan: every row sums to 1, columns towards shares_E (all > 0). [T, E]."""
    s_TE = logits_TE.detach().float()
    log_c_E = shares_E.float().log()
    v_E = torch.zeros_like(log_c_E)
    for _ in range(iters):
        u_T = -torch.logsumexp(s_TE + v_E, dim=1)
        lcol_E = torch.logsumexp(s_TE + u_T[:, None], dim=0)  # log column sums, before v
        if float((lcol_E + v_E - log_c_E).exp().sub(1).abs().max()) <= tol:
            return s_TE + u_T[:, None] + v_E
        v_E = log_c_E - lcol_E
    u_T = -torch.logsumexp(s_TE + v_E, dim=1)  # end on a row step: each token's mass is 1
    return s_TE + u_T[:, None] + v_E


def greedy_assign(score_TE: torch.Tensor, shares_E: torch.Tensor) -> torch.Tensor:
    """The expert of each token [T] (long) under the sequential greedy: pairs in descending
    score (ties by t * E + e), each taken when the token is free and the expert has room.

    Computed in rounds. Each round every free token proposes its best expert with room, and
    a proposal (t, e) is taken when fewer free tokens than e's room come before t in e's
    column. Those are the only tokens that can reach e before t, and t's better experts are
    full, so the sequential greedy takes (t, e) too, and taking it early changes none of its
    other choices; the round's best pair always qualifies, so every round makes progress.
    """
    T, E = score_TE.shape
    dev = score_TE.device
    # Non-finite scores (a diverged step) still get an exact assignment, below every real one.
    lo = torch.finfo(torch.float32).min
    score_TE = torch.nan_to_num(score_TE.float(), nan=lo, neginf=lo)
    # Each column once, in the greedy's order: descending score, ties by token id (stable);
    # each round keeps only the free tokens, so the work shrinks with them.
    order_EF = torch.sort(score_TE.t().contiguous(), dim=1, descending=True, stable=True).indices
    room_E = shares_E.clone().long()
    expert_T = torch.full((T,), -1, dtype=torch.long, device=dev)
    free_F = torch.arange(T, device=dev)  # ascending token ids
    local_T = torch.empty(T, dtype=torch.long, device=dev)  # token id -> index in free_F
    while free_F.numel():
        F = free_F.numel()
        steps_F = torch.arange(F, device=dev)
        local_T[free_F] = steps_F
        # argmax gives the first of equal scores: the lower expert id, as in the greedy order.
        best_e_F = score_TE[free_F].masked_fill(room_E == 0, -math.inf).argmax(dim=1)
        place_EF = torch.empty_like(order_EF)  # free token f's place in column e
        place_EF.scatter_(1, local_T[order_EF], steps_F.expand(E, F).contiguous())
        take_F = place_EF[best_e_F, steps_F] < room_E[best_e_F]
        expert_T[free_F[take_F]] = best_e_F[take_F]
        room_E = room_E - torch.bincount(best_e_F[take_F], minlength=E)
        if bool(take_F.logical_not().all()):
            raise RuntimeError("greedy_assign made no progress: the shares must sum to T")
        free_F = free_F[~take_F]
        left_T = torch.zeros(T, dtype=torch.bool, device=dev)
        left_T[free_F] = True
        order_EF = order_EF[left_T[order_EF]].view(E, free_F.numel())
    return expert_T


def balanced_assignment(logits_TE: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Each token's expert [T] (long), every expert exactly its share (`expert_shares`)."""
    T, E = logits_TE.shape
    if T == 0:
        return torch.zeros(0, dtype=torch.long, device=logits_TE.device)
    n = min(T, E)  # experts with a share > 0: a prefix
    shares = torch.tensor(expert_shares(T, E)[:n], device=logits_TE.device)
    log_plan_TN = sinkhorn_log_plan(logits_TE[:, :n], shares, iters, tol)
    return greedy_assign(log_plan_TN, shares)


@register
class BaseRouter(LinearRouter):
    name = "base"
    causal = False
    Options = BaseOptions

    def __init__(self, d_model: int, cfg, vocab_size: int = 0) -> None:
        super().__init__(d_model, cfg, vocab_size)
        opts = cfg.options()
        self.sinkhorn_iters = int(opts.sinkhorn_iters)
        self.sinkhorn_tol = float(opts.sinkhorn_tol)

    @classmethod
    def check(cls, cfg, prefix: str) -> None:
        if cfg.top_k != 1:
            raise bad(
                prefix,
                "top_k",
                cfg.top_k,
                "base sends each token to exactly one expert; set moe.top_k=1 "
                "(conf/moe/base.yaml does)",
            )

    @classmethod
    def experts_per_token(cls, cfg, seq_len: int = 0) -> float:
        return 1.0

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.training:
            e_T = balanced_assignment(logits_TE, self.sinkhorn_iters, self.sinkhorn_tol)
            capacity_factor = None  # the shares are exact
        else:
            e_T = logits_TE.argmax(dim=-1)
        e_TK = e_T[:, None]
        return plan_from_choices(
            e_TK,
            torch.sigmoid(logits_TE.gather(1, e_TK)),
            num_experts=self.cfg.num_experts,
            capacity_factor=capacity_factor,
            drop_policy=self.cfg.drop_policy,
            stats=stats_of(logits_TE, probs_TE, logits_TE.sum() * 0.0),
        )

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> NaiveRoute:
        """Token by token; the Sinkhorn plan is `sinkhorn_log_plan`'s (tested on its own),
        its rounding the sequential greedy itself."""
        logits_TE, _ = self.naive_probs(x_TD)
        T, E = logits_TE.shape
        order = list(range(T))
        if self.training:
            choice, cap = self._naive_balanced(logits_TE), math.inf  # exact shares, no drops
        else:
            scores = logits_TE.detach()
            choice = [int(scores[t].argmax()) for t in range(T)]
            cap = math.inf if capacity_factor is None else math.ceil(capacity_factor * T / E)
            if self.cfg.drop_policy == "probs":  # the highest combine weights first
                order.sort(key=lambda t: -float(torch.sigmoid(scores[t, choice[t]])))
        load, kept = [0] * E, []
        for t in order:
            e = choice[t]
            if load[e] < cap:
                load[e] += 1
                kept.append((t, e, torch.sigmoid(logits_TE[t, e])))
        return kept, logits_TE.sum() * 0.0

    def _naive_balanced(self, logits_TE: torch.Tensor) -> list[int]:
        T, E = logits_TE.shape
        room = expert_shares(T, E)
        n = min(T, E)
        plan = sinkhorn_log_plan(
            logits_TE[:, :n], torch.tensor(room[:n]), self.sinkhorn_iters, self.sinkhorn_tol
        ).tolist()
        pairs = sorted((-plan[t][e], t * E + e, t, e) for t in range(T) for e in range(n))
        choice = [-1] * T
        for _, _, t, e in pairs:
            if choice[t] < 0 and room[e] > 0:
                choice[t] = e
                room[e] -= 1
        return choice
