"""Dense softmax attention through SDPA: the exact reference every other variant is held to.

The causal mask is SDPA's is_causal (no L x L mask tensor is built here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpar.models.attention import Attention, register


@register
class DenseAttention(Attention):
    name = "dense"
    cache_ok = True

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_BHLK, k_BHLK, v_BHLK, is_causal=causal)

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: object) -> float:
        # QK^T and AV over the FULL L x L score matrix (not halved for the causal mask):
        # what SDPA's math path and torch.utils.flop_counter count.
        return 2 * 2 * seq_len * d_model

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: object) -> float:
        return n_heads * seq_len
