"""Soft MoE (Puigcerver et al. 2023) and the dense soft mixture of experts.

`soft`: every expert processes P = moe.router_options.slots_per_expert slots per sequence.
Slot embeddings phi (`weight`, [D, E*P]) score each token against each slot of its
sequence, logits_BLJ = x_BLD @ phi. A slot's input is a mixture of its sequence's tokens,
softmax over the L tokens (dispatch weights); a token's output is a mixture of its
sequence's slot outputs, softmax over the J = E*P slots (combine weights). Every token feeds
every slot of its sequence, so nothing is dropped and there is no capacity
(moe.capacity_factor is ignored); there is no balance loss (each expert gets exactly B*P
slots) and no z-loss (the paper has none; the dispatch softmax runs over tokens, where
ST-MoE's per-token z-loss does not apply). NOT causal: a slot mixes the whole sequence,
later tokens included, so the decoder-only LM refuses it (use model.causal=false). With no
sequence length (seq_len 0) the batch is one sequence. The paper's l2 normalisation of x
and phi (for large widths) and moe.jitter_eps are not applied.

The plan carries the weights per sequence, slot_dispatch_BLJ / slot_combine_BLJ [B, L, J]
(token (b, l) only touches sequence b's slots); the layer builds the slots with one batched
product, u_BJD = d_BJL x_BLD, orders them expert-major, slot s = e*B*P + b*P + p, so the
plan's rows are sorted by expert (token_idx_A indexes the slots, weight_A is 1), and mixes
their outputs back with another, y_BLD = c_BLJ y_BJD. Cost: the two hold 2 T J floats and
each product costs 2 T J D FLOPs, what Soft MoE needs. The block-diagonal [T, B*J] matrices
used before cost B times both: the two products' forward and backward are now 2.4x faster
at B=8, L=128, D=256, E=8 and 8x to 27x at B=16..64 (one CPU thread).

`soft_mix`: the older dense "soft routing" mixture, the dense upper reference: every expert
runs on every token, y = sum_e p_e f_e(x) with p = softmax(x W^T) over the experts.
Causal (a token's weights depend on that token alone), always dropless, no balance loss;
the z-loss applies. moe.top_k and the capacity factor are ignored.

Legend: T tokens (B sequences of L), D model dim, E experts, P slots per expert,
J = E*P slots of one sequence, S = B*J slots of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xpar.config.checks import need_int
from xpar.moe.losses import router_entropy
from xpar.moe.plan import RouterStats, RoutingPlan, even_plan
from xpar.moe.routers import LinearRouter, NaiveRoute, Router, register
from xpar.moe.routers.base import stats_of


@dataclass
class SoftOptions:
    slots_per_expert: int = 1  # slots each expert processes per sequence

    def validate(self, prefix: str) -> None:
        need_int(prefix, self, "slots_per_expert", 1, "use an integer >= 1, e.g. 1")


@dataclass
class SlotRoute:
    """A naive soft route (tests only): slot n is expert experts[n] applied to inputs[n] (a
    [D] mixture of tokens); token t's output is sum over (n, w) in combine[t] of w times slot
    n's output. `naive_route` returns it in place of the kept triples."""

    experts: list[int] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    combine: list[list[tuple[int, torch.Tensor]]] = field(default_factory=list)


def sequences(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(B, L): seq_len 0 makes the batch one sequence (none when it is empty)."""
    if seq_len <= 0:
        return (1, num_tokens) if num_tokens else (0, 0)
    assert num_tokens % seq_len == 0, f"{num_tokens} tokens are not whole sequences"
    return num_tokens // seq_len, seq_len


@register
class SoftRouter(Router):
    name = "soft"
    causal = False
    Options = SoftOptions

    def __init__(self, d_model: int, cfg, vocab_size: int = 0) -> None:
        super().__init__(d_model, cfg, vocab_size)
        self.slots_per_expert = int(cfg.options().slots_per_expert)
        # phi: one column per slot of a sequence, expert-major (column e*P + p).
        self.weight = nn.Parameter(torch.empty(d_model, cfg.num_experts * self.slots_per_expert))
        nn.init.normal_(self.weight, std=0.02)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)

    @classmethod
    def num_params(cls, d_model: int, cfg) -> int:
        return d_model * cfg.num_experts * int(cfg.options().slots_per_expert)

    @classmethod
    def experts_per_token(cls, cfg, seq_len: int = 0) -> float:
        """Expert rows computed per token: E*P slots per sequence of L tokens, E*P/L. It
        depends on L, which the cost report does not pass today: without it, E (every
        expert's parameters shape every token's output), an upper bound once L >= P."""
        E = cfg.num_experts
        if seq_len > 0:
            return E * int(cfg.options().slots_per_expert) / seq_len
        return float(E)

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        T, D = x_TD.shape
        E, P = self.cfg.num_experts, self.slots_per_expert
        B, L = sequences(T, seq_len)
        logits_BLJ = x_TD.float().reshape(B, L, D) @ self.weight.float()
        dispatch_BLJ = torch.softmax(logits_BLJ, dim=1)  # over the sequence's tokens
        combine_BLJ = torch.softmax(logits_BLJ, dim=2)  # over the sequence's slots
        S, dev = B * E * P, x_TD.device
        zero = logits_BLJ.sum() * 0.0
        entropy = router_entropy(combine_BLJ.reshape(T, E * P))
        return even_plan(
            torch.arange(S, device=dev),
            torch.ones(S, device=dev),
            E,
            B * P,
            S,
            RouterStats(lb_loss=zero, z_loss=zero, entropy=entropy),
            slot_dispatch_BLJ=dispatch_BLJ,
            slot_combine_BLJ=combine_BLJ,
        )

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> tuple[SlotRoute, torch.Tensor]:
        """Slot by slot and token by token, one dot product per (token, slot)."""
        T = x_TD.shape[0]
        E, P = self.cfg.num_experts, self.slots_per_expert
        B, L = sequences(T, seq_len)
        x = x_TD.float()
        phi = self.weight.float()
        route = SlotRoute(combine=[[] for _ in range(T)])
        for b in range(B):
            toks = range(b * L, (b + 1) * L)
            logit = {(t, j): (x[t] * phi[:, j]).sum() for t in toks for j in range(E * P)}
            first = len(route.experts)  # this sequence's slots: first + j
            for j in range(E * P):
                d = torch.softmax(torch.stack([logit[t, j] for t in toks]), dim=0)
                route.experts.append(j // P)
                route.inputs.append(sum(d[i] * x[t] for i, t in enumerate(toks)))
            for t in toks:
                c = torch.softmax(torch.stack([logit[t, j] for j in range(E * P)]), dim=0)
                route.combine[t] = [(first + j, c[j]) for j in range(E * P)]
        return route, x.sum() * 0.0


@register
class SoftMixRouter(LinearRouter):
    name = "soft_mix"

    @classmethod
    def experts_per_token(cls, cfg, seq_len: int = 0) -> float:
        return float(cfg.num_experts)

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> RoutingPlan:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        (T, E), dev = probs_TE.shape, x_TD.device
        stats = stats_of(logits_TE, probs_TE, logits_TE.sum() * 0.0)
        # Rows expert-major: every token once per expert.
        token_idx_A = torch.arange(T, device=dev).repeat(E)
        return even_plan(token_idx_A, probs_TE.t().reshape(-1), E, T, T, stats)

    def naive_route(
        self,
        x_TD: torch.Tensor,
        capacity_factor: float | None,
        token_ids_T: torch.Tensor | None = None,
        seq_len: int = 0,
    ) -> NaiveRoute:
        logits_TE, probs_TE = self.naive_probs(x_TD)
        T, E = probs_TE.shape
        kept = [(t, e, probs_TE[t, e]) for t in range(T) for e in range(E)]
        return kept, logits_TE.sum() * 0.0
