"""The attention contract: what an attention variant declares so the model never names it.

A variant receives q_BHLK, k_BHLK, v_BHLK after the shared projections and rotary
positions and returns o_BHLK; projections, heads and the output projection are the
model's, not the variant's. It declares whether it can be causal, whether it is exact
(equal to masked softmax attention), its forward FLOPs and memory per token for the
cost report, and its own options.

Shape suffixes: B batch, H heads, L sequence, K head dim.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from xpar.registry import NoOptions


class Attention(nn.Module):
    name: ClassVar[str]
    causal_ok: ClassVar[bool] = True
    exact: ClassVar[bool] = True
    # Whether it runs with a KV cache (decode: one query against every cached key, no mask).
    cache_ok: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, n_heads: int, head_dim: int, options: object) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.options = n_heads, head_dim, options

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def check(cls, model_cfg, prefix: str) -> None:
        """Config checks that only this variant needs (raise XparConfigError)."""

    @classmethod
    def num_params(cls, n_heads: int, head_dim: int, options: object) -> int:
        """Parameters of the variant's own (learned projections, a sorting network), per
        layer, beside the shared projections: counted by the cost report."""
        return 0

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: object) -> float:
        """Forward FLOPs per token per layer of the score and value products."""
        raise NotImplementedError

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: object) -> float:
        """Attention-score elements held per token per layer (activation memory)."""
        raise NotImplementedError
