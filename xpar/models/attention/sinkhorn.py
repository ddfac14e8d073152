"""Sparse Sinkhorn attention (Tay et al. 2020): blocks of `block` tokens; each query block
attends to its own block (local) and to one "sorted" block, a soft permutation of the key
and value blocks learned by a small sorting network.

Sorting network: block i's pooled (summed) queries and block j's pooled keys give the
block-to-block score R_ij = pq_i W pk_j (W: [K, K] per head, an nn.Parameter, zero at init:
the uniform soft permutation until it learns). R / temperature is made doubly stochastic by
`sinkhorn_iters` rounds of row then column normalisation in log space, giving P; the sorted
keys of block i are sum_j P_ij k_j (values likewise), and block i's queries attend by one
softmax over [its own block's keys ++ its sorted block's keys].

Causal (in the spirit of the paper's causal Sinkhorn balancing): block i draws only from
strictly earlier blocks (P_ij = 0 for j >= i; block 0 has no sorted part), the column
normalisation of row i sums over rows <= i only (a cumulative sum: a full column sum would
read later blocks) and each round ends with the row normalisation (see sinkhorn_log), block i's sorting query is block i-1's pooled queries (its own pool
would hold its later tokens), and the local block is causally masked.

Cost: 2 * block keys per query plus the block mixing (nb^2 block K per head, nb = L /
block: it grows like L per token and dominates once L > 2 block^2). Scores are not kept for
backward (block_softmax recomputes them). No L x L tensor is built unless block = L.

Shape suffixes: B batch, H heads, L sequence, K head dim, N blocks, R queries in a block,
T keys of a block's attention (2 * block), I/J blocks of the sorting matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xpar.config.checks import bad, need_int, need_positive
from xpar.models.attention import Attention, register
from xpar.models.attention.block_softmax import block_softmax, merge_softmax


@dataclass
class SinkhornOptions:
    block: int = 64  # tokens per block (must divide the sequence length)
    sinkhorn_iters: int = 8  # row + column normalisation rounds
    temperature: float = 0.75  # divides the sorting scores (lower: closer to a hard permutation)

    def validate(self, prefix: str) -> None:
        need_int(prefix, self, "block", 1)
        need_int(prefix, self, "sinkhorn_iters", 1)
        need_positive(prefix, self, "temperature", "use a finite number > 0")


def sinkhorn_log(logits_BHIJ: torch.Tensor, iters: int, causal: bool) -> torch.Tensor:
    """Sinkhorn balancing in log space: `iters` rounds of row then column normalisation;
    returns P = exp(log P).

    causal: only j <= i counts (lower triangle, diagonal included) and the column sum of
    row i runs over rows <= i only. A lower-triangular matrix cannot be doubly stochastic
    unless it is the identity (and that cumulative column step always sets the first
    allowed entry of a column to 1), so a causal round is column then row: every row of P
    sums to 1, and row i weighs block j by its share of column j among rows <= i (a key
    block earlier rows drew on heavily counts less)."""
    x = logits_BHIJ.to(torch.promote_types(logits_BHIJ.dtype, torch.float32))
    if not causal:
        for _ in range(iters):
            x = x - torch.logsumexp(x, dim=-1, keepdim=True)
            x = x - torch.logsumexp(x, dim=-2, keepdim=True)
        return x.exp()
    n = x.shape[-1]
    # A finite stand-in for -inf: no inf - inf (NaN) in the cumulative sums or their grads.
    neg = torch.finfo(x.dtype).min / 2
    upper_IJ = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    x = x.masked_fill(upper_IJ, neg)
    for _ in range(iters):
        x = (x - torch.logcumsumexp(x, dim=-2)).masked_fill(upper_IJ, neg)
        x = (x - torch.logsumexp(x, dim=-1, keepdim=True)).masked_fill(upper_IJ, neg)
    return x.exp().masked_fill(upper_IJ, 0.0)


@register
class SinkhornAttention(Attention):
    name = "sinkhorn"
    exact = False
    Options = SinkhornOptions

    def __init__(self, n_heads: int, head_dim: int, options: SinkhornOptions) -> None:
        super().__init__(n_heads, head_dim, options)
        # Zero: every block scores every other alike (no RNG, the same on every rank).
        self.sort_HKK = nn.Parameter(torch.zeros(n_heads, head_dim, head_dim))

    def permutation(self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, causal: bool):
        """The soft permutation P [B, H, N, N]: row i weighs the key blocks block i draws
        from (causal: strictly earlier ones; row 0 is zero)."""
        B, H, L, K = q_BHLK.shape
        b = self._block(L)
        N = L // b
        pq_BHNK = q_BHLK.view(B, H, N, b, K).sum(3)
        pk_BHNK = k_BHLK.view(B, H, N, b, K).sum(3)
        if causal:
            # Rows 1..N-1 (sorting query: the block before), columns 0..N-2.
            pq_BHNK, pk_BHNK = pq_BHNK[:, :, :-1], pk_BHNK[:, :, :-1]
        r_BHIJ = torch.einsum("bhik,hkl,bhjl->bhij", pq_BHNK, self.sort_HKK, pk_BHNK)
        p_BHIJ = sinkhorn_log(
            r_BHIJ / self.options.temperature, self.options.sinkhorn_iters, causal
        )
        p_BHIJ = p_BHIJ.to(q_BHLK.dtype)
        return F.pad(p_BHIJ, (0, 1, 1, 0)) if causal else p_BHIJ

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        B, H, L, K = q_BHLK.shape
        b = self._block(L)
        N = L // b
        q_BHNRK, k_BHNRK, v_BHNRK = (x.view(B, H, N, b, K) for x in (q_BHLK, k_BHLK, v_BHLK))
        p_BHIJ = self.permutation(q_BHLK, k_BHLK, causal)
        ks_BHNRK = torch.einsum("bhij,bhjrk->bhirk", p_BHIJ, k_BHNRK)
        vs_BHNRK = torch.einsum("bhij,bhjrk->bhirk", p_BHIJ, v_BHNRK)
        # One softmax over [own block ++ sorted block], as two key sets merged by their
        # log-sum-exps (no concatenated copy of the keys and values).
        qs_BHNRK = q_BHNRK / math.sqrt(K)
        own_NRR, sorted_NRR = self._allowed(N, b, causal, q_BHLK.device)
        o_own, lse_own = block_softmax(qs_BHNRK, k_BHNRK, v_BHNRK, own_NRR)
        o_srt, lse_srt = block_softmax(qs_BHNRK, ks_BHNRK, vs_BHNRK, sorted_NRR)
        o_BHNRK = merge_softmax(o_srt, lse_srt, o_own, lse_own)  # own: never empty
        return o_BHNRK.reshape(B, H, L, K)

    @staticmethod
    def _allowed(N: int, b: int, causal: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, b, b] masks of the own block (causal: lower triangle) and the sorted block
        (causal: none in block 0, which has no earlier block)."""
        full_NRR = torch.ones(1, 1, 1, dtype=torch.bool, device=device).expand(N, b, b)
        if not causal:
            return full_NRR, full_NRR
        own_NRR = torch.ones(b, b, dtype=torch.bool, device=device).tril().expand(N, b, b)
        sorted_N11 = (torch.arange(N, device=device) > 0)[:, None, None]
        return own_NRR, sorted_N11.expand(N, b, b)

    def _block(self, L: int) -> int:
        b = self.options.block
        if L % b:
            raise ValueError(
                f"model.attention_options.block={b} must divide the sequence length {L}: "
                f"use sequences of a multiple of {b} tokens or a block that divides {L}"
            )
        return b

    @classmethod
    def check(cls, model_cfg, prefix: str) -> None:
        opts = model_cfg.attention_opts(prefix)
        L = model_cfg.max_seq_len
        if L % opts.block:
            raise bad(
                f"{prefix}.attention_options",
                "block",
                opts.block,
                f"it must divide model.max_seq_len={L}; use a divisor of {L}",
            )

    @classmethod
    def num_params(cls, n_heads: int, head_dim: int, options: object) -> int:
        return n_heads * head_dim * head_dim  # the sorting network's sort_HKK

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: SinkhornOptions) -> float:
        # QK^T and AV over 2 * block keys, and mixing the N key and value blocks into the
        # sorted ones (N multiply-adds per element of each); the sorting scores (N^2 K per
        # head over L tokens) are left out as negligible.
        n_blocks = seq_len / options.block
        return 2 * 2 * (2 * options.block) * d_model + 2 * 2 * n_blocks * d_model

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: SinkhornOptions) -> float:
        # The [b, 2b] scores of each block, and the N x N permutation shared by L tokens.
        n_blocks = seq_len / options.block
        return n_heads * (2 * options.block + n_blocks / options.block)
