"""Sliding-window attention (Longformer, Beltagy et al. 2020), with Longformer's global
tokens and BigBird's random keys (Zaheer et al. 2020) as options. Exact: equal to masked
softmax attention with the mask below.

Who query i sees (options window w, global_tokens g, random_keys r):
- causal: the last w keys, itself included: i - w < j <= i;
- non-causal: a symmetric window |i - j| < w (2w - 1 keys), plus
  - global tokens: positions < g attend to every key and every query attends to them;
  - random keys: each query block (the blocks below) sees r keys drawn for it, per
    head, from a generator seeded with `seed` (so every rank, layer and resume agrees); the
    r draws are with replacement and a key drawn twice, or already in the window or
    global, counts once.
Global and random keys are non-causal only (they would see the future).

Blocked: queries in blocks of n = min(w, 64, L) rows; block b's key tile is the key blocks
b-R..b (causal) or b-R..b+R (non-causal), R = ceil((w - 1) / n), the exact band mask applied
inside the [n x (R + 1) n] (or [n x (2R + 1) n]) tile: w + n keys (causal) for w >= 64.
Global columns and random keys are further partial softmaxes, merged by log-sum-exp
(xpar.models.attention.blockwise); global rows are dense over all keys (g x L). Nothing
is L x L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpar.config.checks import bad, is_int
from xpar.models.attention import Attention, register
from xpar.models.attention.blockwise import (
    Gathered,
    KeySetCost,
    Shared,
    blockwise_attention,
    merge_partials,
    window_attention,
    window_block,
    window_tile,
)


@dataclass
class SlidingWindowOptions:
    window: int = 256  # keys each query sees on each side, itself included
    global_tokens: int = 0  # first positions that attend to / are seen by all (non-causal)
    random_keys: int = 0  # random keys per query block (BigBird; non-causal)
    seed: int = 0  # the random keys' generator seed

    def validate(self, prefix: str) -> None:
        for name, lo in (("window", 1), ("global_tokens", 0), ("random_keys", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise bad(prefix, name, v, f"use an integer >= {lo}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad(prefix, "seed", self.seed, "use an integer in [0, 2**63)")

    def refuse_causal(self, prefix: str) -> None:
        for name in ("global_tokens", "random_keys"):
            v = getattr(self, name)
            if v > 0:
                raise bad(
                    prefix,
                    name,
                    v,
                    "a causal model cannot use it (those keys would see the future); "
                    f"set {name}=0 or model.causal=false",
                )


def random_index(L: int, n_heads: int, options: SlidingWindowOptions) -> torch.Tensor:
    """[H, N, r] long: the random keys of each head's query blocks (N blocks of
    min(window, 64, L) rows); -1 marks a repeated draw. The same for every call with (L, H)."""
    block = window_block(options.window, L)
    n_blocks = -(-L // block)
    g = torch.Generator().manual_seed(options.seed)
    idx_HNR = torch.randint(0, L, (n_heads, n_blocks, options.random_keys), generator=g)
    idx_HNR = idx_HNR.sort(dim=-1).values
    repeat = torch.zeros_like(idx_HNR, dtype=torch.bool)
    repeat[..., 1:] = idx_HNR[..., 1:] == idx_HNR[..., :-1]
    return idx_HNR.masked_fill(repeat, -1)


@register
class SlidingWindowAttention(KeySetCost, Attention):
    name = "sliding_window"
    Options = SlidingWindowOptions

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        opt: SlidingWindowOptions = self.options
        if causal:
            opt.refuse_causal("model.attention_options")
        L = q_BHLK.shape[2]
        w, g, r = opt.window, min(opt.global_tokens, L), opt.random_keys
        if g == L:  # every position is global: dense
            return F.scaled_dot_product_attention(q_BHLK, k_BHLK, v_BHLK)
        block = window_block(w, L)
        parts = [window_attention(q_BHLK, k_BHLK, v_BHLK, w, causal)]
        if g > 0:
            pos_G = torch.arange(g, device=q_BHLK.device)

            def global_not_in_window(i, j):
                return (i - j).abs() >= w

            k_G, v_G = k_BHLK[:, :, :g], v_BHLK[:, :, :g]
            parts.append(
                blockwise_attention(q_BHLK, k_G, v_G, block, Shared(pos_G), global_not_in_window)
            )
        if r > 0:
            idx_HNR = random_index(L, q_BHLK.shape[1], opt).to(q_BHLK.device)

            def random_not_seen(i, j):
                return ((i - j).abs() >= w) & (j >= g)

            parts.append(
                blockwise_attention(
                    q_BHLK, k_BHLK, v_BHLK, block, Gathered(idx_HNR), random_not_seen
                )
            )
        o_BHLK = merge_partials(parts)
        if g > 0:  # global rows see every key
            o_BHGK = F.scaled_dot_product_attention(q_BHLK[:, :, :g], k_BHLK, v_BHLK)
            o_BHLK = torch.cat([o_BHGK, o_BHLK[:, :, g:]], dim=2)
        return o_BHLK

    @classmethod
    def check(cls, model_cfg, prefix: str) -> None:
        # A window past model.max_seq_len is allowed: it is dense attention, exactly.
        if model_cfg.causal:
            model_cfg.attention_opts(prefix).refuse_causal(f"{prefix}.attention_options")

    @classmethod
    def keys_per_query(cls, seq_len: int, options: SlidingWindowOptions) -> int:
        """Scores computed per query: the band tile (R + 1 key blocks causal, 2R + 1 with
        global or random keys, which are non-causal), the global and random columns, and
        the global rows' L keys spread over the L tokens. The contract gives no causal flag:
        without global/random keys this counts the causal tile, w + 64 keys, where a
        non-causal run computes 2w + 64."""
        g, r = options.global_tokens, options.random_keys
        return window_tile(options.window, seq_len, causal=not (g or r)) + 2 * g + r


__all__ = ["SlidingWindowAttention", "SlidingWindowOptions", "random_index"]
