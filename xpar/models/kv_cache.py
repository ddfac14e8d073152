"""KVCache: one attention layer's keys and values of the positions decoded so far.

Preallocated for max_len positions, so a decode step writes one column in place instead
of concatenating a growing tensor. Keys are stored after rotary (at their absolute
positions) and before grouped-query repetition, so the cache holds n_kv_heads heads.

Shape suffixes: B batch, N key/value heads, S cache capacity (max_len), L new positions,
K head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k_BNSK = torch.zeros(shape, dtype=dtype, device=device)
        self.v_BNSK = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled

    @property
    def max_len(self) -> int:
        return self.k_BNSK.shape[2]

    def append(
        self, k_BNLK: torch.Tensor, v_BNLK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store L new positions; return the keys and values of every position so far
        ([B, N, length, K] views of the buffers)."""
        start, end = self.length, self.length + k_BNLK.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache full: {start} cached + {k_BNLK.shape[2]} new positions exceed its "
                f"max_len={self.max_len}; make the cache longer (model.new_cache(max_len=...))"
            )
        self.k_BNSK[:, :, start:end] = k_BNLK
        self.v_BNSK[:, :, start:end] = v_BNLK
        self.length = end
        return self.k_BNSK[:, :, :end], self.v_BNSK[:, :, :end]
