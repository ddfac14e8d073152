"""Kernelised attention in O(L): softmax(q k^T) replaced by a feature map, phi(q) . phi(k).

With positive features the attention weights of query i are phi(q_i) . phi(k_j) over the
normaliser phi(q_i) . sum_j phi(k_j), so the key sums can be taken first:

    num_i = phi(q_i) (sum_j phi(k_j) v_j^T),    den_i = phi(q_i) . sum_j phi(k_j)

(Katharopoulos et al. 2020, "Transformers are RNNs", eq. 5-6). Non-causal: one [M, K] state
per head. Causal: j <= i, the sums become prefix sums, taken in chunks of C positions: inside
a chunk the masked [C, C] block phi(Q_c) phi(K_c)^T (C x C, never L x L once L > C); across
chunks the states of all earlier chunks, S = sum phi(k) v^T and z = sum phi(k), cumulative
over chunks. Cost per token and head: O(C M + M K), memory O(L (C + M K / C)).

The variants (linear.py, performer.py) choose phi and the normalising eps; this module only
sums. Shape suffixes: B batch, H heads, L sequence, M features, K head dim, X = K + 1, N chunks,
C chunk, Z = B H N (chunks as one batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from xpar.config.checks import need_int, need_positive

# The cost methods are given d_model (flops) or n_heads (memory) but not the head dim, which
# the state size M K depends on: they count it at this head dim (the common one), capped at
# d_model. See flops_per_token / memory_per_token of the variants.
COST_HEAD_DIM = 64


def check_chunk_eps(prefix: str, options: object) -> None:
    """The options every kernelised variant has: chunk (causal block size) and eps."""
    need_int(
        prefix, options, "chunk", 1, "use an integer >= 1 (positions per causal chunk), e.g. 64"
    )
    need_positive(
        prefix,
        options,
        "eps",
        "use a finite number > 0 (added to the normaliser, so an all-zero one stays finite), e.g. 1e-6",
    )


def kernel_sums(
    phiq_BHLM: torch.Tensor, phik_BHLM: torch.Tensor, v_BHLK: torch.Tensor, causal: bool, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_BHLK, den_BHL1): sum_j w_ij v_j and sum_j w_ij, w_ij = phi(q_i) . phi(k_j), over
    every key (causal=False) or keys j <= i (causal=True, chunked prefix sums)."""
    if not causal:
        kv_BHMK = phik_BHLM.transpose(-1, -2) @ v_BHLK
        z_BHM1 = phik_BHLM.sum(-2).unsqueeze(-1)
        return phiq_BHLM @ kv_BHMK, phiq_BHLM @ z_BHM1
    B, H, L, M = phiq_BHLM.shape
    K = v_BHLK.shape[-1]
    C = min(chunk, L)
    N = math.ceil(L / C)
    pad = N * C - L  # zero features and values past the end: they add nothing to any sum
    # A ones column on v: the normaliser comes out of the same products (column K).
    v1_BHLX = torch.cat((v_BHLK, torch.ones_like(v_BHLK[..., :1])), dim=-1)
    q_ZCM = _pad_rows(phiq_BHLM, pad).view(B * H * N, C, M)
    k_ZCM = _pad_rows(phik_BHLM, pad).view(B * H * N, C, M)
    v1_ZCX = _pad_rows(v1_BHLX, pad).view(B * H * N, C, K + 1)
    # Across chunks: each chunk sees the summed states of the chunks before it.
    kv1_BHNMX = (k_ZCM.transpose(-1, -2) @ v1_ZCX).view(B, H, N, M, K + 1)
    kv1_prev_ZMX = _exclusive_cumsum(kv1_BHNMX).view(B * H * N, M, K + 1)
    # Inside a chunk: the quadratic form with the causal mask (tril of a C x C block; in
    # place, as the product's backward keeps its inputs, not its output).
    w_ZCC = torch.bmm(q_ZCM, k_ZCM.transpose(-1, -2)).tril_()
    out_ZCX = torch.baddbmm(q_ZCM @ kv1_prev_ZMX, w_ZCC, v1_ZCX)
    out_BHLX = out_ZCX.view(B, H, N * C, K + 1)[:, :, :L]
    return out_BHLX[..., :K], out_BHLX[..., K:]


def _pad_rows(x_BHL_: torch.Tensor, pad: int) -> torch.Tensor:
    """pad zero rows at the end of dim 2 (no copy when there are none to add)."""
    return F.pad(x_BHL_, (0, 0, 0, pad)) if pad else x_BHL_


def _exclusive_cumsum(x_BHN__: torch.Tensor) -> torch.Tensor:
    """Along dim 2: the sum of the entries before each one (a shifted cumsum, not cumsum
    minus itself, which would cancel catastrophically in float32 over long sequences)."""
    shifted = torch.cat((torch.zeros_like(x_BHN__[:, :, :1]), x_BHN__[:, :, :-1]), dim=2)
    return shifted.cumsum(dim=2)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Sums over up to L keys in float32 at least (bf16 prefix sums drift)."""
    return torch.promote_types(x.dtype, torch.float32)


def kernel_cost(seq_len: int, d_model: int, n_features_per_head: int | None, chunk: int) -> float:
    """Forward FLOPs per token per layer of the causal chunked sums, all heads: the [C, C]
    block (phi(Q) phi(K)^T and its product with V) and the state (phi(K)^T V, phi(Q) S).
    n_features_per_head None: M = the head dim (linear attention's elu + 1)."""
    K = min(COST_HEAD_DIM, d_model)
    H = d_model / K
    M = K if n_features_per_head is None else n_features_per_head
    C = min(chunk, seq_len)
    return H * (2 * C * M + 2 * C * K + 2 * 2 * M * K)


def kernel_memory(seq_len: int, n_heads: int, n_features_per_head: int | None, chunk: int) -> float:
    """Elements held per token per layer: the C-wide masked block, phi(q) and phi(k) (M each)
    and the chunk states (M K per chunk of C tokens)."""
    K = COST_HEAD_DIM
    M = K if n_features_per_head is None else n_features_per_head
    C = min(chunk, seq_len)
    return n_heads * (C + 2 * M + M * K / C)
