"""Blockwise masked softmax attention that never holds an L x L tensor (shared by the
sliding_window and strided variants).

Queries are cut into blocks of `block` rows; every query block sees one tile of T keys,
taken from k/v by a key layout:
- Band(lo, hi): the key blocks b+lo .. b+hi of the same blocking (a sliding window);
- Shared(pos_S): all S keys of k/v, at positions pos_S (a short key set: global tokens,
  summary columns);
- Gathered(index_HNT): the keys index_HNT[h, b] for query block b of head h (random
  keys; -1 means no key).
A predicate allowed(i, j) on query and key positions picks the keys inside the tile. The
result is (o, lse): the softmax over the allowed keys and its log-sum-exp (-inf and o = 0
for a query with none), so partial results over disjoint key sets merge exactly
(merge_partials). Forward and backward run a chunk of query blocks at a time and the
backward recomputes the scores (as flash attention does): only q, k, v, o, lse and the
mask (as an additive 0 / -inf bias, N x W x T = L x T) are kept between them, never the
scores. A masked key weighs e^-80 relative to the best key instead of 0 (EXP_FLOOR):
exact to ~1e-33.

Shape suffixes: B batch, H heads, L queries, S keys, K head dim, N query blocks,
W rows of a block, T keys of a tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# allowed(i, j): i [N, W, 1] query positions, j [..., N, 1, T] key positions -> bool.
Allowed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Score elements (rows * T, of one batch row and head) a chunk computes at a time: ~4 MB
# in fp32, so its elementwise passes stay in cache.
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Band:
    lo: int  # first key block, relative to the query block (<= 0)
    hi: int  # last key block, relative to the query block (>= 0)


@dataclass(frozen=True)
class Shared:
    pos_S: torch.Tensor  # the keys' positions, what allowed() sees


@dataclass(frozen=True)
class Gathered:
    index_HNT: torch.Tensor  # key indices per head and query block; -1: none


Layout = Band | Shared | Gathered


class _Keys:
    """One layout's key tiles for query blocks [b0, b1) of one batch row and head h:
    scores x @ tile^T, products p @ tile, and gradients back into the (padded) keys.
    Works on one head's [S, C] keys; a band's tiles are strided views (no copies)."""

    def __init__(self, layout: Layout, block: int, n_blocks: int, S: int) -> None:
        self.layout, self.block, self.n_blocks, self.S = layout, block, n_blocks, S
        if isinstance(layout, Band):
            self.width = layout.hi - layout.lo + 1  # key blocks per tile
            self.T = self.width * block
            self.front = -layout.lo * block
            self.padded_len = (n_blocks + self.width - 1) * block
        elif isinstance(layout, Shared):
            self.T = S
        else:
            self.T = layout.index_HNT.shape[-1]

    def pad(self, x_SC: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layout, Band):
            return F.pad(x_SC, (0, 0, self.front, self.padded_len - self.front - self.S))
        return x_SC

    def unpad(self, x_SC: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layout, Band):
            return x_SC[self.front : self.front + self.S]
        return x_SC

    def positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(j, real): every tile's key positions and which are real keys, [..., N, 1, T]."""
        lay = self.layout
        if isinstance(lay, Band):
            b_N11 = torch.arange(self.n_blocks, device=device)[:, None, None]
            j = (b_N11 + lay.lo) * self.block + torch.arange(self.T, device=device)
            return j, (j >= 0) & (j < self.S)
        if isinstance(lay, Shared):
            return lay.pos_S[None, None, :], torch.ones((), dtype=torch.bool, device=device)
        j = lay.index_HNT[:, :, None, :]
        return j, j >= 0

    def _index(self, h: int, b0: int, b1: int) -> torch.Tensor:
        idx_HNT = self.layout.index_HNT
        return idx_HNT[h % idx_HNT.shape[0], b0:b1].clamp(min=0)  # -1: masked anyway

    def _tile(self, x_SC: torch.Tensor, h: int, b0: int, b1: int) -> torch.Tensor:
        """[n, T, C] (Shared: [S, C])."""
        if isinstance(self.layout, Band):  # windows of T rows every `block` rows: a view
            return x_SC.unfold(0, self.T, self.block)[b0:b1].transpose(1, 2)
        if isinstance(self.layout, Shared):
            return x_SC
        return x_SC[self._index(h, b0, b1)]

    def scores(self, bias, x_nWC, k_SC, h, b0, b1) -> torch.Tensor:
        """bias + x @ tile[..., :C]^T: [n, W, T] (C: x's columns; no bias: None)."""
        n, W, C = x_nWC.shape
        tile = self._tile(k_SC, h, b0, b1)[..., :C]
        if isinstance(self.layout, Shared):  # one key set: a single matmul
            x = x_nWC.reshape(n * W, C)
            if bias is None:
                return (x @ tile.t()).view(n, W, -1)
            return torch.addmm(bias.reshape(n * W, -1), x, tile.t()).view(n, W, -1)
        if bias is None:
            return torch.bmm(x_nWC, tile.transpose(1, 2))
        return torch.baddbmm(bias, x_nWC, tile.transpose(1, 2))

    def apply(self, p_nWT, x_SC, h, b0, b1, C: int) -> torch.Tensor:
        """p @ tile[..., :C]: [n, W, C]."""
        return torch.matmul(p_nWT, self._tile(x_SC, h, b0, b1)[..., :C])

    def add_grad(self, dx_SK, h, b0, b1, g_nWT, x_nWK) -> None:
        """dx's tile rows += g^T @ x (the k or v gradient of this chunk)."""
        lay = self.layout
        if isinstance(lay, Band):
            B = self.block
            blocks = dx_SK.view(-1, B, dx_SK.shape[-1])
            for t in range(self.width):
                g_t = g_nWT[:, :, t * B : (t + 1) * B].transpose(1, 2)
                blocks[b0 + t : b1 + t].baddbmm_(g_t, x_nWK)
        elif isinstance(lay, Shared):
            dx_SK.addmm_(g_nWT.reshape(-1, self.T).t(), x_nWK.reshape(-1, x_nWK.shape[-1]))
        else:
            idx = self._index(h, b0, b1).flatten()
            dx_SK.index_add_(0, idx, torch.bmm(g_nWT.transpose(1, 2), x_nWK).flatten(0, 1))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least: bf16 exp and sums drift."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(n_blocks: int, block: int, T: int):
    """(b0, b1, a0, a1): query blocks [b0, b1), rows [a0, a1) of each: ~CHUNK_ELEMENTS
    scores of one batch row and head (one head per chunk keeps the band tiles views)."""
    rows = max(1, CHUNK_ELEMENTS // T)
    if rows >= block:
        n = rows // block
        for b0 in range(0, n_blocks, n):
            yield b0, min(n_blocks, b0 + n), 0, block
    else:  # one block is already too big: split its rows
        for b0 in range(n_blocks):
            for a0 in range(0, block, rows):
                yield b0, b0 + 1, a0, min(block, a0 + rows)


def _rows(x_LC: torch.Tensor, n_blocks: int, block: int, value: float = 0.0) -> torch.Tensor:
    """One head's [L, C] rows padded to [N, W, C] blocks."""
    pad = n_blocks * block - x_LC.shape[0]
    return F.pad(x_LC, (0, 0, 0, pad), value=value).view(n_blocks, block, -1)


def _ones_column(x_SC: torch.Tensor) -> torch.Tensor:
    """[x, 1]: a matmul with it also sums the other operand's rows."""
    return torch.cat([x_SC, torch.ones_like(x_SC[..., :1])], dim=-1)


# In place of +inf for the backward's "no key" rows: exp(score - NO_KEY) = 0, no inf * 0.
NO_KEY = 1e30
# exp's floor: CPU exp of -inf or of an underflowing argument takes a slow path (~10x), and
# half a causal tile is masked; e^-80 (1.8e-35, still a normal fp32) instead of 0 for a
# masked key moves nothing measurably (T * 1.8e-35 of the denominator).
EXP_FLOOR = -80.0


def _exp_(s: torch.Tensor) -> torch.Tensor:
    return s.clamp_(min=EXP_FLOOR).exp_()


class _BlockwiseAttention(torch.autograd.Function):
    """One batch row and head at a time (its padded copies are 1 / (B H) of the inputs),
    chunks of query blocks within it."""

    @staticmethod
    def forward(ctx, q_BHLK, k_BHSK, v_BHSK, block, layout, allowed, scale):
        B, H, L, K = q_BHLK.shape
        N = -(-L // block)
        keys = _Keys(layout, block, N, k_BHSK.shape[2])
        work = _work_dtype(q_BHLK.dtype)
        dev = q_BHLK.device
        with torch.autocast(dev.type, enabled=False):
            # The mask as a 0 / -inf bias the score matmul adds: [N, W, T] or [H, N, W, T].
            i_NW1 = torch.arange(N * block, device=dev).view(N, block, 1)
            j, real = keys.positions(dev)
            blocked = ~(allowed(i_NW1, j) & real)
            shape = (*blocked.shape[:-3], N, block, keys.T)
            bias = torch.zeros(shape, dtype=work, device=dev).masked_fill_(blocked, -math.inf)
            o_BHLK = torch.empty_like(q_BHLK, memory_format=torch.contiguous_format)
            lse_BHL = torch.empty(B, H, L, dtype=work, device=dev)
            for b, h in ((b, h) for b in range(B) for h in range(H)):
                # Scaled queries [N, W, K]; keys [S(+pad), K]; values with a ones column,
                # so p @ [v, 1] also gives the softmax denominator.
                q = _rows(q_BHLK[b, h].to(work) * scale, N, block)
                k = keys.pad(k_BHSK[b, h].to(work))
                v1 = _ones_column(keys.pad(v_BHSK[b, h].to(work)))
                o = torch.empty_like(q)
                lse = torch.empty(N, block, 1, dtype=work, device=dev)
                for b0, b1, a0, a1 in _chunks(N, block, keys.T):
                    bias_c = _mask(bias, h, b0, b1, a0, a1)
                    s = keys.scores(bias_c, q[b0:b1, a0:a1], k, h, b0, b1)
                    m = s.amax(-1, keepdim=True)
                    some = torch.isfinite(m)  # False: a query with no key (o = 0, lse = -inf)
                    m = torch.where(some, m, 0.0)
                    od = keys.apply(_exp_(s.sub_(m)), v1, h, b0, b1, K + 1)
                    den = od[..., K:]  # >= 1: the max key's exp(0)
                    o[b0:b1, a0:a1] = torch.where(some, od[..., :K] / den, 0.0)
                    lse[b0:b1, a0:a1] = torch.where(some, m + torch.log(den), -math.inf)
                o_BHLK[b, h] = o.view(-1, K)[:L]
                lse_BHL[b, h] = lse.view(-1)[:L]
        ctx.save_for_backward(q_BHLK, k_BHSK, v_BHSK, o_BHLK, lse_BHL, bias)
        ctx.block, ctx.layout, ctx.scale = block, layout, scale
        return o_BHLK, lse_BHL

    @staticmethod
    def backward(ctx, do_BHLK, dlse_BHL):
        q_BHLK, k_BHSK, v_BHSK, o_BHLK, lse_BHL, bias = ctx.saved_tensors
        block, scale = ctx.block, ctx.scale
        B, H, L, K = q_BHLK.shape
        N = -(-L // block)
        keys = _Keys(ctx.layout, block, N, k_BHSK.shape[2])
        work = _work_dtype(q_BHLK.dtype)
        dq_BHLK = torch.empty_like(q_BHLK, memory_format=torch.contiguous_format)
        dk_BHSK = torch.empty_like(k_BHSK, memory_format=torch.contiguous_format)
        dv_BHSK = torch.empty_like(v_BHSK, memory_format=torch.contiguous_format)
        with torch.autocast(q_BHLK.device.type, enabled=False):
            for b, h in ((b, h) for b in range(B) for h in range(H)):
                # p = exp(bias + [q, -lse] @ [k, 1]^T): one matmul, no pass to subtract lse;
                # lse = NO_KEY where a query has no key, so p = 0 (padding rows: do = 0).
                lse = lse_BHL[b, h].to(work)
                lse = torch.where(torch.isfinite(lse), lse, NO_KEY)[:, None]
                q1 = _rows(torch.cat([q_BHLK[b, h].to(work) * scale, -lse], -1), N, block)
                k1 = _ones_column(keys.pad(k_BHSK[b, h].to(work)))
                v1 = _ones_column(keys.pad(v_BHSK[b, h].to(work)))
                # ds = p * (do.v - (do.o - dlse)): [do, -(do.o - dlse)] @ [v, 1]^T, times p.
                do = do_BHLK[b, h].to(work)
                D = (do * o_BHLK[b, h].to(work)).sum(-1, keepdim=True) - dlse_BHL[b, h, :, None]
                do1 = _rows(torch.cat([do, -D.to(work)], -1), N, block)
                dq = torch.empty(N, block, K, dtype=work, device=q1.device)
                dk = torch.zeros(k1.shape[0], K, dtype=work, device=q1.device)
                dv = torch.zeros(k1.shape[0], K, dtype=work, device=q1.device)
                for b0, b1, a0, a1 in _chunks(N, block, keys.T):
                    q_c, do_c = q1[b0:b1, a0:a1], do1[b0:b1, a0:a1]
                    bias_c = _mask(bias, h, b0, b1, a0, a1)
                    p = _exp_(keys.scores(bias_c, q_c, k1, h, b0, b1))
                    keys.add_grad(dv, h, b0, b1, p, do_c[..., :K])
                    ds = keys.scores(None, do_c, v1, h, b0, b1).mul_(p)
                    dq[b0:b1, a0:a1] = keys.apply(ds, k1, h, b0, b1, K)
                    keys.add_grad(dk, h, b0, b1, ds, q_c[..., :K])
                dq_BHLK[b, h] = dq.view(-1, K)[:L] * scale
                dk_BHSK[b, h] = keys.unpad(dk)
                dv_BHSK[b, h] = keys.unpad(dv)
        return dq_BHLK, dk_BHSK, dv_BHSK, None, None, None, None


def _mask(bias, h, b0, b1, a0, a1):
    """The chunk's mask bias: bias is [N, W, T] or per head [H, N, W, T]."""
    if bias.dim() == 4:
        bias = bias[h % bias.shape[0]]
    return bias[b0:b1, a0:a1]


def blockwise_attention(
    q_BHLK: torch.Tensor,
    k_BHSK: torch.Tensor,
    v_BHSK: torch.Tensor,
    block: int,
    layout: Layout,
    allowed: Allowed,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_BHLK, lse_BHL) of softmax(q k^T / sqrt(K)) v over the allowed keys of each query's
    tile; scores never leave a chunk."""
    scale = 1.0 / math.sqrt(q_BHLK.shape[-1])
    return _BlockwiseAttention.apply(q_BHLK, k_BHSK, v_BHSK, block, layout, allowed, scale)


# Query block rows of a window band: small blocks waste less of the tile (window + block
# keys, causal) and keep the matmuls efficient; BigBird's block size too.
MAX_BLOCK = 64


def window_block(window: int, L: int) -> int:
    return min(window, L, MAX_BLOCK)


def window_reach(window: int, L: int) -> int:
    """Key blocks on each side of a query block that a window band spans."""
    block = window_block(window, L)
    return min(-(-(window - 1) // block), -(-L // block) - 1)


def window_attention(
    q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, window: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) over the window band: i - window < j <= i (causal) or |i - j| < window."""
    L = q_BHLK.shape[2]
    block, reach = window_block(window, L), window_reach(window, L)

    def in_window(i, j):
        return (i - j < window) & (j <= i) if causal else (i - j).abs() < window

    band = Band(-reach, 0 if causal else reach)
    return blockwise_attention(q_BHLK, k_BHLK, v_BHLK, block, band, in_window)


def window_tile(window: int, L: int, causal: bool) -> int:
    """Keys in a window band's tile: scores computed per query."""
    reach = window_reach(window, L)
    return (1 + reach + (0 if causal else reach)) * window_block(window, L)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """softmax attention over the union of disjoint key sets from each set's (o, lse): each
    part weighs exp(lse_part - lse_all). Every query must have a key in some part."""
    if len(parts) == 1:
        return parts[0][0]
    lse_PBHL = torch.stack([lse for _, lse in parts])
    lse_BHL = torch.logsumexp(lse_PBHL, dim=0)
    out = 0
    for o_BHLK, lse in parts:
        out = out + torch.exp(lse - lse_BHL)[..., None].to(o_BHLK.dtype) * o_BHLK
    return out


class KeySetCost:
    """The cost of a variant that scores keys_per_query(seq_len, options) keys per query:
    QK^T and AV over those keys, the scores held a chunk at a time (the backward recomputes
    them). Mixed into such a variant before Attention."""

    @classmethod
    def keys_per_query(cls, seq_len: int, options: object) -> int:
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: object) -> float:
        return 2 * 2 * cls.keys_per_query(seq_len, options) * d_model

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: object) -> float:
        return n_heads * cls.keys_per_query(seq_len, options)
