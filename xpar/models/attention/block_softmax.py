"""Softmax attention over small key sets (blocks, clusters) that keeps no scores for backward.

`block_softmax(q, k, v, allowed)` is masked softmax attention on the last two dims, batched
over the rest, returning the output and the log-sum-exp of each row (so two key sets can be
merged into one softmax). Its backward recomputes the scores chunk by chunk (as flash
attention does) instead of holding them, so a layer's memory is its inputs and outputs plus
one chunk of scores. Shared by routing (clusters and local windows) and sinkhorn (blocks).

Shape suffixes: X any batch dims, G the chunked dim (blocks or clusters), R queries, T keys,
K head dim.
"""

from __future__ import annotations

import torch

CHUNK_SCORES = 1 << 23  # score elements per chunk (32 MB in fp32)


def _chunks(q_XGRK: torch.Tensor, t: int, chunk_scores: int):
    """Slices of the G dim holding about chunk_scores scores each (at least one G)."""
    G, R = q_XGRK.shape[-3], q_XGRK.shape[-2]
    per_g = max(1, q_XGRK[..., 0, 0, 0].numel() * R * t)
    step = max(1, chunk_scores // per_g)
    return [slice(i, min(i + step, G)) for i in range(0, G, step)]


def _mask_at(allowed: torch.Tensor, sl: slice) -> torch.Tensor:
    """The mask's rows for these G (the mask broadcasts over the leading batch dims)."""
    return allowed[..., sl, :, :]


class _BlockSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, allowed, chunk_scores):
        o = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1])
        for sl in _chunks(q, k.shape[-2], chunk_scores):
            s = (q[..., sl, :, :] @ k[..., sl, :, :].transpose(-1, -2)).masked_fill_(
                ~_mask_at(allowed, sl), float("-inf")
            )
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row with no key
            e = s.sub_(m).exp_()
            den = e.sum(-1, keepdim=True)
            o[..., sl, :, :] = (e @ v[..., sl, :, :]) / den.clamp(min=torch.finfo(den.dtype).tiny)
            lse[..., sl, :] = (m + den.log()).squeeze(-1)  # -inf for a row with no key
        ctx.save_for_backward(q, k, v, allowed, o, lse)
        ctx.chunk_scores = chunk_scores
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, allowed, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if do is None:
            do = torch.zeros_like(o)
        if dlse is None:
            dlse = torch.zeros_like(lse)
        # d lse / d s = p, and d o / d s = p * (do v^T - rowsum(do * o)).
        shift = (dlse - (do * o).sum(-1))[..., None]
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None]
        for sl in _chunks(q, k.shape[-2], ctx.chunk_scores):
            qs, ks, vs, dos = (x[..., sl, :, :] for x in (q, k, v, do))
            s = (qs @ ks.transpose(-1, -2)).masked_fill_(~_mask_at(allowed, sl), float("-inf"))
            p = s.sub_(lse_safe[..., sl, :, :]).exp_()
            dv[..., sl, :, :] = p.transpose(-1, -2) @ dos
            ds = (dos @ vs.transpose(-1, -2)).add_(shift[..., sl, :, :]).mul_(p)
            dq[..., sl, :, :] = ds @ ks
            dk[..., sl, :, :] = ds.transpose(-1, -2) @ qs
        return dq, dk, dv, None, None


def block_softmax(
    q_XGRK: torch.Tensor,
    k_XGTK: torch.Tensor,
    v_XGTK: torch.Tensor,
    allowed_XGRT: torch.Tensor,
    chunk_scores: int = CHUNK_SCORES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T over the allowed keys) v and the rows' log-sum-exp (-inf and a zero
    output for a row with no allowed key). q comes scaled; allowed is a bool mask that
    broadcasts over the leading batch dims (its last three dims are G, R, T)."""
    return _BlockSoftmax.apply(q_XGRK, k_XGTK, v_XGTK, allowed_XGRT, chunk_scores)


def merge_softmax(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> torch.Tensor:
    """One softmax over two disjoint key sets from each one's output and log-sum-exp (lse2
    finite: the second set is never empty)."""
    top = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
