"""Top-k attention (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention").

Each query keeps its `k` highest-scoring keys among those it may see (the causal mask is
applied before the choice) and takes the softmax over those alone. With k >= L it is dense
attention, exactly.

It is NOT sub-quadratic in time: every score q.k is computed to find the top k. It is in
memory: queries go in chunks of `query_chunk`, so the largest score tensor is one
[B, H, query_chunk, L] tile (next to the chunk's kept values, [B, H, query_chunk, k, K]),
and what is kept for backward is the top-k indices and weights ([B, H, L, k]), never the
scores. The backward works from those alone (the choice
is piecewise constant, so the gradient flows through the kept scores only, as for a fixed
mask), in chunks of queries, in O(L k K) time. Causal chunks score only the keys up to
their last query.

Backward adds into dk/dv with index_add_, which is deterministic on CPU (on CUDA only
under torch.use_deterministic_algorithms).

Shape suffixes: B batch, H heads, L queries, S keys, C queries in a chunk, W keys a chunk
scores, k kept keys per query, K head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xpar.config.checks import need_int
from xpar.models.attention import Attention, register


@dataclass
class TopKOptions:
    k: int = 64  # keys kept per query
    query_chunk: int = 256  # queries scored at a time: the score tile is query_chunk x L

    def validate(self, prefix: str) -> None:
        need_int(prefix, self, "k", 1, "use an integer >= 1 (keys each query keeps), e.g. 64")
        need_int(prefix, self, "query_chunk", 1, "use an integer >= 1, e.g. 256")


def _chunk_top_k(
    q_BHCK: torch.Tensor, k_BHSK: torch.Tensor, start: int, kk: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-kk keys of queries start..start+C-1: (scaled scores, key indices), [B, H, C, kk].

    Causal: query i sees keys j <= i, so only the first max(end, kk) keys are scored (the
    extra ones, masked, are picked only when fewer than kk are visible and get weight 0)."""
    C, S = q_BHCK.shape[-2], k_BHSK.shape[-2]
    scale = 1.0 / math.sqrt(q_BHCK.shape[-1])
    W = min(S, max(start + C, kk)) if causal else S
    s_BHCW = (q_BHCK @ k_BHSK[:, :, :W].transpose(-1, -2)).mul_(scale)
    if causal:  # keys before `start` are visible to the whole chunk: mask the rest only
        i_C1 = torch.arange(start, start + C, device=q_BHCK.device)[:, None]
        hidden_CX = torch.arange(start, W, device=q_BHCK.device)[None, :] > i_C1
        s_BHCW[..., start:].masked_fill_(hidden_CX, float("-inf"))
    return s_BHCW.topk(kk, dim=-1, sorted=False)


def _rows(idx_BHCk: torch.Tensor, S: int) -> torch.Tensor:
    """The kept indices as rows of x.reshape(B * H * S, K): [B * H * C * k]."""
    B, H = idx_BHCk.shape[:2]
    off_BH11 = torch.arange(B * H, device=idx_BHCk.device, dtype=idx_BHCk.dtype) * S
    return (idx_BHCk + off_BH11.view(B, H, 1, 1)).reshape(-1)


class _TopKAttention(torch.autograd.Function):
    """Saves q, k, v (the caller holds them anyway) and the top-k indices and weights.

    Kept keys are fetched with index_select over rows of [B * H * S, K] (whole rows copied,
    much faster on CPU than gather with an expanded index) and gradients added back with
    index_add_. Outputs are written in place (no concatenation of chunks: no second copy),
    indices kept as int32 where they fit."""

    @staticmethod
    def forward(ctx, q_BHLK, k_BHSK, v_BHSK, kk: int, chunk: int, causal: bool):
        (B, H, L, K), S = q_BHLK.shape, k_BHSK.shape[-2]
        # The softmax in fp32 at least (bf16 scores would round the weights coarsely).
        acc = torch.promote_types(q_BHLK.dtype, torch.float32)
        index = torch.int32 if B * H * S < 2**31 else torch.int64
        v_XK = v_BHSK.reshape(B * H * S, K)
        o_BHLK = q_BHLK.new_empty(B, H, L, K)
        idx_BHLk = torch.empty(B, H, L, kk, dtype=index, device=q_BHLK.device)
        p_BHLk = q_BHLK.new_empty(B, H, L, kk)
        for start in range(0, L, chunk):
            sl = slice(start, start + chunk)
            q_BHCK = q_BHLK[:, :, sl]
            C = q_BHCK.shape[-2]
            s_BHCk, idx_BHCk = _chunk_top_k(q_BHCK, k_BHSK, start, kk, causal)
            idx_BHLk[:, :, sl] = idx_BHCk
            p_BHCk = p_BHLk[:, :, sl]
            p_BHCk.copy_(torch.softmax(s_BHCk.to(acc), dim=-1))
            v_BHCkK = v_XK.index_select(0, _rows(idx_BHLk[:, :, sl], S)).view(B, H, C, kk, K)
            o_BHLK[:, :, sl] = torch.einsum("bhck,bhckd->bhcd", p_BHCk, v_BHCkK)
        ctx.save_for_backward(q_BHLK, k_BHSK, v_BHSK, idx_BHLk, p_BHLk)
        ctx.chunk = chunk
        return o_BHLK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do_BHLK):
        q_BHLK, k_BHSK, v_BHSK, idx_BHLk, p_BHLk = ctx.saved_tensors
        (B, H, L, K), S, kk = q_BHLK.shape, k_BHSK.shape[-2], idx_BHLk.shape[-1]
        scale = 1.0 / math.sqrt(K)
        k_XK, v_XK = k_BHSK.reshape(B * H * S, K), v_BHSK.reshape(B * H * S, K)
        dk_XK, dv_XK = torch.zeros_like(k_XK), torch.zeros_like(v_XK)
        dq_BHLK = torch.empty_like(q_BHLK)
        # The fetched [C, k, K] rows of k and v stay within a [query_chunk, S] tile's size.
        chunk = max(1, min(ctx.chunk, ctx.chunk * S // (2 * kk * K)))
        for start in range(0, L, chunk):
            sl = slice(start, start + chunk)
            idx_BHCk, p_BHCk = idx_BHLk[:, :, sl], p_BHLk[:, :, sl]
            q_BHCK, do_BHCK = q_BHLK[:, :, sl], do_BHLK[:, :, sl]
            C, rows = q_BHCK.shape[-2], _rows(idx_BHCk, S)
            k_BHCkK = k_XK.index_select(0, rows).view(B, H, C, kk, K)
            v_BHCkK = v_XK.index_select(0, rows).view(B, H, C, kk, K)
            # o = sum_j p_j v_j, p = softmax(s): ds_j = p_j (do.v_j - do.o)
            dp_BHCk = torch.einsum("bhckd,bhcd->bhck", v_BHCkK, do_BHCK)
            ds_BHCk = p_BHCk * (dp_BHCk - (p_BHCk * dp_BHCk).sum(-1, keepdim=True)) * scale
            dq_BHLK[:, :, sl] = torch.einsum("bhck,bhckd->bhcd", ds_BHCk, k_BHCkK)
            # The fetched rows are no longer needed: overwrite them with the grads to add.
            torch.mul(ds_BHCk.unsqueeze(-1), q_BHCK.unsqueeze(-2), out=k_BHCkK)
            torch.mul(p_BHCk.unsqueeze(-1), do_BHCK.unsqueeze(-2), out=v_BHCkK)
            dk_XK.index_add_(0, rows, k_BHCkK.view(-1, K))
            dv_XK.index_add_(0, rows, v_BHCkK.view(-1, K))
        return dq_BHLK, dk_XK.view(B, H, S, K), dv_XK.view(B, H, S, K), None, None, None


@register
class TopKAttention(Attention):
    name = "topk"
    exact = False  # dense only when k >= L
    Options = TopKOptions

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        kk = min(self.options.k, k_BHLK.shape[-2])
        return _TopKAttention.apply(q_BHLK, k_BHLK, v_BHLK, kk, self.options.query_chunk, causal)

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: TopKOptions) -> float:
        # Every score (the full L, like dense: not halved for the causal mask), then the
        # weighted sum over the k kept values.
        return 2 * seq_len * d_model + 2 * min(options.k, seq_len) * d_model

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: TopKOptions) -> float:
        # Kept for backward: k weights (and their indices) per query and head. The passing
        # [query_chunk, L] tile of one chunk is not held.
        return n_heads * min(options.k, seq_len)
