"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): O(L), not softmax.

phi(x) = elu(x) + 1 (positive), out_i = phi(q_i) S_i / (phi(q_i) . z_i + eps), with S, z the
sums of phi(k_j) v_j^T and phi(k_j) over every key (non-causal) or keys j <= i (causal,
chunked prefix sums: kernelized.py). It is not exact (not softmax attention), has no
parameters and no randomness. The 1/sqrt(K) score scale of softmax attention cancels in
the normalisation, so it is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpar.models.attention import Attention, register
from xpar.models.attention.kernelized import (
    check_chunk_eps,
    compute_dtype,
    kernel_cost,
    kernel_memory,
    kernel_sums,
)


@dataclass
class LinearOptions:
    chunk: int = 64  # positions per causal chunk (a C x C masked block each)
    eps: float = 1e-6  # added to the normaliser phi(q) . sum phi(k)

    def validate(self, prefix: str) -> None:
        check_chunk_eps(prefix, self)


def elu_features(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


@register
class LinearAttention(Attention):
    name = "linear"
    exact = False
    Options = LinearOptions

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        dtype = compute_dtype(q_BHLK)
        phiq_BHLK = elu_features(q_BHLK.to(dtype))
        phik_BHLK = elu_features(k_BHLK.to(dtype))
        num_BHLK, den_BHL1 = kernel_sums(
            phiq_BHLK, phik_BHLK, v_BHLK.to(dtype), causal, self.options.chunk
        )
        return (num_BHLK / (den_BHL1 + self.options.eps)).to(v_BHLK.dtype)

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: LinearOptions) -> float:
        # Causal chunked form (the non-causal one has no C x C block); M = K features.
        return kernel_cost(seq_len, d_model, None, options.chunk)

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: LinearOptions) -> float:
        return kernel_memory(seq_len, n_heads, None, options.chunk)
