"""Routing attention (Roy et al. 2021, "Efficient Content-Based Sparse Attention with Routing
Transformers"): queries and keys are routed to clusters by online k-means and attend within
their cluster, plus a small local window around every query.

Clustering: queries and keys are layer-normalised (no affine, divided by sqrt(K): unit
vectors) and compared with `n_clusters` unit centroids per head by dot product. The
centroids are a registered buffer, drawn from `seed` (every rank and every resume agrees),
and in training forward passes only they move by EMA towards the mean of the queries and
keys nearest to them (mini-batch k-means, `ema_decay`; 1 freezes them). The update runs
after this pass's attention, so a pass's outputs never depend on its own update.

Multi-rank: model code never imports torch.distributed, so the update uses this rank's
batch only. Data-parallel ranks see different batches, so their centroids drift apart
after the first training step (each rank's attention stays valid, just differently
clustered), and a checkpoint written from one rank's copy does not resume the other ranks
bitwise. Syncing them (averaging the buffer across the data-parallel group each step) is the
trainer's job, not done here.

Balanced clusters, capacity w = ceil(L / n_clusters) queries and w keys per cluster:
- non-causal (the paper's balanced variant): each cluster takes its top-w queries and top-w
  keys by similarity to its centroid, so every cluster has the same size; a token may be in
  several clusters or in none.
- causal: a top-w by similarity over the whole sequence is not causal (a later token can
  push an earlier one out of a cluster), so each token goes to its nearest centroid and each
  cluster keeps the first w of its tokens in position order (the MoE capacity rule, earlier
  tokens first); membership of token i then depends on tokens <= i only. A token is in one
  cluster or, past capacity, in none.
Within a cluster tokens are sorted by position and, when causal, key j is seen by query i
only if j <= i.

Local window: every query also attends to the keys within `window` positions (causal:
i - window <= j <= i; otherwise |i - j| <= window), itself included, so no query is left
without keys. A key both local and in the query's cluster counts once (the cluster part
skips local keys). For each cluster a query is in, its output is the softmax over [its
cluster's keys ++ its local keys]; a query in several clusters averages those outputs; a
query in no cluster gets its local attention alone. With n_clusters=1 and window=0 every
query sees every (allowed) key once: dense attention exactly.

Cost: a cluster holds w x w scores; with C clusters that is C w^2 ~ L^2 / C per head (the
paper takes C ~ sqrt(L)), so at a fixed n_clusters the cost per token still grows like L;
the local part is a block of window keys before/after each query. Scores are not kept for
backward (block_softmax recomputes them chunk by chunk); the clusters' bool masks are. No
L x L tensor is built unless n_clusters=1.

Shape suffixes: B batch, H heads, L sequence, K head dim, C clusters, W cluster capacity,
N tokens routed per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpar.config.checks import bad, is_finite, is_int, need_int
from xpar.models.attention import Attention, register
from xpar.models.attention.block_softmax import block_softmax, merge_softmax


@dataclass
class RoutingOptions:
    n_clusters: int = 32  # k-means centroids per head; capacity ceil(L / n_clusters) each
    window: int = 32  # local keys on each side of a query (causal: before it), itself extra
    ema_decay: float = 0.999  # centroid EMA per training forward; 1 freezes them
    seed: int = 0  # the centroids' initial draw (the same on every rank and layer)

    def validate(self, prefix: str) -> None:
        need_int(prefix, self, "n_clusters", 1)
        need_int(
            prefix, self, "window", 0, "use an integer >= 0 (0: a query's local key is itself)"
        )
        d = self.ema_decay
        if not is_finite(d) or not 0 <= d <= 1:
            raise bad(prefix, "ema_decay", d, "use a number in [0, 1] (1: frozen centroids)")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad(prefix, "seed", self.seed, "use an integer in [0, 2**63)")


def capacity(seq_len: int, n_clusters: int) -> int:
    """Queries (and keys) per cluster: ceil(L / C), at most L."""
    return min(seq_len, -(-seq_len // n_clusters))


def local_keys(window: int, causal: bool) -> int:
    """Keys scored per query by the local part: itself (window 0), or window-sized blocks
    (the query's own and the one before; non-causal also the one after)."""
    return 1 if window == 0 else (2 if causal else 3) * window


def _unit(x_BHLK: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine, scaled to unit length (fp32: routing is a comparison)."""
    K = x_BHLK.shape[-1]
    return F.layer_norm(x_BHLK.detach().float(), (K,)) / math.sqrt(K)


def _gather(x_BHLX: torch.Tensor, idx_BHCW: torch.Tensor) -> torch.Tensor:
    """x at the positions idx: [B, H, L, *X] -> [B, H, C, W, *X]."""
    B, H, C, W = idx_BHCW.shape
    extra = x_BHLX.shape[3:]
    flat = idx_BHCW.reshape(B, H, C * W, *([1] * len(extra))).expand(B, H, C * W, *extra)
    return x_BHLX.gather(2, flat).view(B, H, C, W, *extra)


def _first_come(assign_BHL: torch.Tensor, C: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cluster's first W tokens in position order: positions [B, H, C, W] (sorted)
    and whether each slot is filled."""
    B, H, L = assign_BHL.shape
    order_BHL = torch.sort(assign_BHL, dim=-1, stable=True).indices  # by cluster, then position
    count_BHC = torch.zeros(B, H, C, dtype=torch.long, device=assign_BHL.device)
    count_BHC.scatter_add_(-1, assign_BHL, torch.ones_like(assign_BHL))
    start_BHC = count_BHC.cumsum(-1) - count_BHC
    slot_W = torch.arange(W, device=assign_BHL.device)
    ok_BHCW = slot_W < count_BHC[..., None]
    at_BHCW = (start_BHC[..., None] + slot_W).clamp(max=L - 1)
    idx_BHCW = order_BHL.gather(-1, at_BHCW.view(B, H, C * W)).view(B, H, C, W)
    return idx_BHCW.masked_fill(~ok_BHCW, 0), ok_BHCW


def _top_capacity(sim_BHLC: torch.Tensor, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cluster's W most similar tokens, sorted by position; every slot is filled."""
    idx_BHCW = sim_BHLC.transpose(-1, -2).topk(W, dim=-1).indices.sort(-1).values
    return idx_BHCW, torch.ones_like(idx_BHCW, dtype=torch.bool)


def local_attention(q_BHLK, k_BHLK, v_BHLK, window: int, causal: bool, scale: float):
    """Attention over each query's local keys: (output [B, H, L, K], log-sum-exp [B, H, L])."""
    B, H, L, K = q_BHLK.shape
    if window == 0:  # itself only
        return v_BHLK, (q_BHLK * k_BHLK).sum(-1) * scale
    b = window
    nb = -(-L // b)
    pad = nb * b - L
    q_BHNRK = F.pad(q_BHLK * scale, (0, 0, 0, pad)).view(B, H, nb, b, K)
    # Key blocks n-1, n (and n+1): one zero block either side, masked below.
    k_BHXK = F.pad(k_BHLK, (0, 0, b, pad + b)).view(B, H, nb + 2, b, K)
    v_BHXK = F.pad(v_BHLK, (0, 0, b, pad + b)).view(B, H, nb + 2, b, K)
    parts = 2 if causal else 3
    k_BHNTK = torch.cat([k_BHXK[:, :, i : i + nb] for i in range(parts)], dim=3)
    v_BHNTK = torch.cat([v_BHXK[:, :, i : i + nb] for i in range(parts)], dim=3)
    dev = q_BHLK.device
    i_NR1 = (torch.arange(nb, device=dev)[:, None] * b + torch.arange(b, device=dev))[..., None]
    j_N1T = (torch.arange(nb, device=dev)[:, None] - 1) * b + torch.arange(parts * b, device=dev)
    j_N1T = j_N1T[:, None, :]
    near = (i_NR1 - j_N1T >= 0) if causal else (i_NR1 - j_N1T >= -window)
    allowed_NRT = near & (i_NR1 - j_N1T <= window) & (j_N1T >= 0) & (j_N1T < L)
    o_BHNRK, lse_BHNR = block_softmax(q_BHNRK, k_BHNTK, v_BHNTK, allowed_NRT)
    o_BHLK = o_BHNRK.reshape(B, H, nb * b, K)[:, :, :L]
    return o_BHLK, lse_BHNR.reshape(B, H, nb * b)[:, :, :L]


def _cluster_attention(qs_BHLK, k_BHLK, v_BHLK, iq_BHCW, ik_BHCW, okk_BHCW, window, causal):
    """Attention of each cluster's queries (qs: already scaled) over the cluster's keys that
    are allowed and not local to the query: (output [B, H, C, W, K], log-sum-exp
    [B, H, C, W], -inf and a zero output for a query with none)."""
    L = qs_BHLK.shape[2]
    qc, kc, vc = (
        _gather(x, i) for x, i in ((qs_BHLK, iq_BHCW), (k_BHLK, ik_BHCW), (v_BHLK, ik_BHCW))
    )
    i_BHCW1, j_BHC1W = iq_BHCW[..., :, None], ik_BHCW[..., None, :]
    if causal:  # an empty key slot (only causal has them) sits after every query
        j_BHC1W = j_BHC1W.masked_fill(~okk_BHCW[..., None, :], L + window)
        allowed = j_BHC1W < i_BHCW1 - window
    else:
        # Two bool comparisons, not |i - j| > window: no score-sized int64 temporaries.
        allowed = (j_BHC1W < i_BHCW1 - window) | (j_BHC1W > i_BHCW1 + window)
    return block_softmax(qc, kc, vc, allowed)


def _merge(local, cluster, iq_BHCW, okq_BHCW) -> torch.Tensor:
    """One softmax over [cluster keys ++ local keys] per (query, cluster) slot, averaged
    over the clusters a query is in; a query in none keeps its local attention."""
    o_BHLK, lse_BHL = local
    B, H, L, K = o_BHLK.shape
    C, W = iq_BHCW.shape[2:]
    o_slot = merge_softmax(*cluster, _gather(o_BHLK, iq_BHCW), _gather(lse_BHL, iq_BHCW))
    okq = okq_BHCW.to(o_BHLK.dtype)
    o_slot = o_slot * okq[..., None]
    flat = iq_BHCW.reshape(B, H, C * W)
    sum_BHLK = torch.zeros_like(o_BHLK).scatter_add(
        2, flat[..., None].expand(B, H, C * W, K), o_slot.reshape(B, H, C * W, K)
    )
    cnt_BHL = torch.zeros_like(lse_BHL).scatter_add(2, flat, okq.reshape(B, H, C * W))
    return torch.where(cnt_BHL[..., None] > 0, sum_BHLK / cnt_BHL.clamp(min=1)[..., None], o_BHLK)


@register
class RoutingAttention(Attention):
    name = "routing"
    exact = False
    Options = RoutingOptions

    def __init__(self, n_heads: int, head_dim: int, options: RoutingOptions) -> None:
        super().__init__(n_heads, head_dim, options)
        g = torch.Generator().manual_seed(options.seed)
        mu_HCK = torch.randn(n_heads, options.n_clusters, head_dim, generator=g)
        self.register_buffer("centroids_HCK", F.normalize(mu_HCK, dim=-1))

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        B, H, L, K = q_BHLK.shape
        opts = self.options
        C, window = opts.n_clusters, opts.window
        W = capacity(L, C)
        scale = 1.0 / math.sqrt(K)
        qn_BHLK, kn_BHLK = _unit(q_BHLK), _unit(k_BHLK)
        sq_BHLC, sk_BHLC = self._similarity(qn_BHLK), self._similarity(kn_BHLK)
        (iq_BHCW, okq_BHCW), (ik_BHCW, okk_BHCW) = (
            self._clusters(s, W, causal) for s in (sq_BHLC, sk_BHLC)
        )
        local = local_attention(q_BHLK, k_BHLK, v_BHLK, window, causal, scale)
        cluster = _cluster_attention(
            q_BHLK * scale, k_BHLK, v_BHLK, iq_BHCW, ik_BHCW, okk_BHCW, window, causal
        )
        out_BHLK = _merge(local, cluster, iq_BHCW, okq_BHCW)
        if self.training and opts.ema_decay < 1:
            self._update_centroids(qn_BHLK, kn_BHLK, sq_BHLC, sk_BHLC)
        return out_BHLK

    @torch.no_grad()
    def _similarity(self, x_unit_BHLK: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhlk,hck->bhlc", x_unit_BHLK, self.centroids_HCK.float())

    def _clusters(self, sim_BHLC: torch.Tensor, W: int, causal: bool):
        if causal:
            return _first_come(sim_BHLC.argmax(-1), self.options.n_clusters, W)
        return _top_capacity(sim_BHLC, W)

    @torch.no_grad()
    def routes(self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, causal: bool):
        """The clusters this pass would use: (query positions, filled) and (key positions,
        filled), each [B, H, C, W]; what the test rebuilds the attention from."""
        W = capacity(q_BHLK.shape[2], self.options.n_clusters)
        return tuple(
            self._clusters(self._similarity(_unit(x)), W, causal) for x in (q_BHLK, k_BHLK)
        )

    @torch.no_grad()
    def _update_centroids(self, qn_BHLK, kn_BHLK, sq_BHLC, sk_BHLC) -> None:
        """One mini-batch k-means step: each centroid moves by EMA towards the mean of the
        queries and keys nearest to it (centroids nobody chose stay), then back to unit length."""
        H, C, K = self.centroids_HCK.shape
        x_HNK = torch.cat([qn_BHLK, kn_BHLK], dim=2).transpose(0, 1).reshape(H, -1, K)
        a_HN = torch.cat([sq_BHLC, sk_BHLC], dim=2).argmax(-1).transpose(0, 1).reshape(H, -1)
        slot = (a_HN + C * torch.arange(H, device=a_HN.device)[:, None]).reshape(-1)
        # index_add_: deterministic on CPU; on CUDA under torch.use_deterministic_algorithms.
        sums = x_HNK.new_zeros(H * C, K).index_add_(0, slot, x_HNK.reshape(-1, K))
        counts = torch.bincount(slot, minlength=H * C).view(H, C, 1)
        mean_HCK = sums.view(H, C, K) / counts.clamp(min=1)
        mu_HCK = self.centroids_HCK.float()
        d = self.options.ema_decay
        moved = F.normalize(d * mu_HCK + (1 - d) * mean_HCK, dim=-1)
        self.centroids_HCK.copy_(torch.where(counts > 0, moved, mu_HCK))

    @classmethod
    def check(cls, model_cfg, prefix: str) -> None:
        opts = model_cfg.attention_opts(prefix)
        where = f"{prefix}.attention_options"
        if opts.n_clusters > model_cfg.max_seq_len:
            raise bad(
                where,
                "n_clusters",
                opts.n_clusters,
                f"more clusters than model.max_seq_len={model_cfg.max_seq_len} tokens; "
                "use at most max_seq_len (about sqrt(max_seq_len) is the paper's choice)",
            )
        if opts.window >= model_cfg.max_seq_len:
            raise bad(
                where,
                "window",
                opts.window,
                f"a window of model.max_seq_len={model_cfg.max_seq_len} or more is dense "
                "attention; use a smaller window or model.attention=dense",
            )

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: RoutingOptions) -> float:
        # Per token: its share of the C W cluster slots, each scoring W keys (QK^T and AV),
        # its local keys (non-causal count: causal scores 2 window blocks, not 3), and the
        # routing products of its query and key with the C centroids.
        C = options.n_clusters
        W = capacity(seq_len, C)
        slots = C * W / seq_len
        keys = slots * W + local_keys(options.window, causal=False)
        return 2 * 2 * keys * d_model + 2 * 2 * C * d_model

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: RoutingOptions) -> float:
        C = options.n_clusters
        W = capacity(seq_len, C)
        slots = C * W / seq_len
        return n_heads * (slots * W + local_keys(options.window, causal=False) + 2 * C)
