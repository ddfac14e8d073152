"""Sparse Transformer attention (Child et al. 2019): the strided and fixed factorised
patterns, both heads of the factorisation in one softmax. Exact: equal to masked softmax
attention with the mask below. Causal or not.

Who query i sees (options stride s, c):
- pattern=strided: the local band i - s < j <= i (non-causal |i - j| < s), plus the
  summary keys j with (i - j) % s == 0 (j <= i when causal);
- pattern=fixed: its own block of s positions (floor(j / s) == floor(i / s), j <= i when
  causal), plus the summary columns, the last c positions of every block
  (j % s >= s - c, j <= i when causal).
A key in both sets counts once.

How, without an L x L tensor (xpar.models.attention.blockwise):
- the local part is blocked like sliding_window (strided) or one [s x s] tile per block
  (fixed);
- strided summary: keys of one residue class i % s; the sequence is regrouped by residue,
  so each class is one block of M = ceil(L / s) positions: s tiles of [M x M], L * M
  scores in all (dense: L * L), minus the diagonal (already local);
- fixed summary: the ceil(L / s) * c summary columns shared by every query, an
  L x (L c / s) score matrix (sub-quadratic for the large strides used; dense is L x L),
  minus the query's own block (already local);
- the two partial softmaxes merge by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xpar.config.checks import bad, is_int, need_choice
from xpar.models.attention import Attention, register
from xpar.models.attention.blockwise import (
    MAX_BLOCK,
    Band,
    KeySetCost,
    Shared,
    blockwise_attention,
    merge_partials,
    window_attention,
    window_tile,
)

PATTERNS = ("strided", "fixed")


@dataclass
class StridedOptions:
    pattern: str = "strided"  # strided: band + every stride-th key; fixed: blocks + summaries
    stride: int = 128  # band width / block size (the paper uses about sqrt(L))
    c: int = 8  # fixed: summary positions at the end of each block

    def validate(self, prefix: str) -> None:
        need_choice(prefix, self, "pattern", PATTERNS)
        if not is_int(self.stride) or self.stride < 1:
            raise bad(prefix, "stride", self.stride, "use an integer >= 1")
        if not is_int(self.c) or self.c < 1:
            raise bad(prefix, "c", self.c, "use an integer >= 1")
        if self.pattern == "fixed" and self.c > self.stride:
            raise bad(prefix, "c", self.c, f"use an integer in [1, stride={self.stride}]")


def _regroup(x_BHLK: torch.Tensor, stride: int) -> torch.Tensor:
    """Positions m * stride + r reordered to r * M + m (zero-padded to M * stride)."""
    B, H, L, K = x_BHLK.shape
    M = -(-L // stride)
    x = torch.nn.functional.pad(x_BHLK, (0, 0, 0, M * stride - L))
    return x.view(B, H, M, stride, K).transpose(2, 3).reshape(B, H, stride * M, K)


def _ungroup(x_BHX: torch.Tensor, stride: int, L: int) -> torch.Tensor:
    """_regroup's inverse on [B, H, stride * M, ...] (the padding dropped)."""
    B, H, SM = x_BHX.shape[:3]
    M = SM // stride
    x = x_BHX.view(B, H, stride, M, *x_BHX.shape[3:]).transpose(2, 3)
    return x.reshape(B, H, SM, *x_BHX.shape[3:])[:, :, :L]


def _strided_summary(q_BHLK, k_BHLK, v_BHLK, stride: int, causal: bool):
    """(o, lse) over the keys j != i with (i - j) % stride == 0 (j < i when causal)."""
    L = q_BHLK.shape[2]
    M = -(-L // stride)

    def same_class(i, j):  # i, j: regrouped positions of one residue block
        r, m_i, m_j = i // M, i % M, j % M
        real = m_j * stride + r < L
        return real & ((m_j < m_i) if causal else (m_j != m_i))

    q, k, v = (_regroup(x, stride) for x in (q_BHLK, k_BHLK, v_BHLK))
    o, lse = blockwise_attention(q, k, v, M, Band(0, 0), same_class)
    return _ungroup(o, stride, L), _ungroup(lse, stride, L)


def _fixed_local(q_BHLK, k_BHLK, v_BHLK, stride: int, causal: bool):
    """(o, lse) over the query's own block of `stride` positions."""
    block = min(stride, q_BHLK.shape[2])

    def in_block(i, j):  # the tile is the query's own block
        return j <= i if causal else j >= 0

    return blockwise_attention(q_BHLK, k_BHLK, v_BHLK, block, Band(0, 0), in_block)


def summary_positions(L: int, stride: int, c: int, device=None) -> torch.Tensor:
    """The fixed pattern's summary columns: j % stride >= stride - c, j < L."""
    j = torch.arange(L, device=device)
    return j[j % stride >= stride - c]


def _fixed_summary(q_BHLK, k_BHLK, v_BHLK, stride: int, c: int, causal: bool):
    """(o, lse) over the summary columns outside the query's own block (earlier blocks
    only when causal)."""
    L = q_BHLK.shape[2]
    pos_S = summary_positions(L, stride, c, q_BHLK.device)
    if len(pos_S) == 0:  # shorter than one block's summary start
        return None

    def other_block(i, j):
        return (j // stride < i // stride) if causal else (j // stride != i // stride)

    k_S, v_S = k_BHLK[:, :, pos_S], v_BHLK[:, :, pos_S]
    block = min(MAX_BLOCK, L)
    return blockwise_attention(q_BHLK, k_S, v_S, block, Shared(pos_S), other_block)


@register
class StridedAttention(KeySetCost, Attention):
    name = "strided"
    Options = StridedOptions

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        opt: StridedOptions = self.options
        s = opt.stride
        if opt.pattern == "strided":
            local = window_attention(q_BHLK, k_BHLK, v_BHLK, s, causal)
            summary = _strided_summary(q_BHLK, k_BHLK, v_BHLK, s, causal)
        else:
            local = _fixed_local(q_BHLK, k_BHLK, v_BHLK, s, causal)
            summary = _fixed_summary(q_BHLK, k_BHLK, v_BHLK, s, opt.c, causal)
        return merge_partials([local] if summary is None else [local, summary])

    @classmethod
    def keys_per_query(cls, seq_len: int, options: StridedOptions) -> int:
        """Scores computed per query: the local tile (causal band for strided: the
        contract gives no causal flag; non-causal adds a block) plus the summary keys."""
        s, n_blocks = options.stride, -(-seq_len // options.stride)
        if options.pattern == "strided":
            return window_tile(s, seq_len, causal=True) + n_blocks
        return min(s, seq_len) + n_blocks * options.c
