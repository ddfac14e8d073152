"""Dense attention equals the naive masked-softmax reference, causal or not."""

import math

import pytest
import torch

from xpar.models.attention import get_attention


def naive_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(K) + mask) v, one L x L score matrix: the exact reference."""
    L = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("causal", [True, False])
def test_dense_matches_naive(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    dense = get_attention("dense")(3, 8, None)
    torch.testing.assert_close(dense(q, k, v, causal=causal), naive_attention(q, k, v, causal))


def test_dense_declares_its_cost():
    cls = get_attention("dense")
    assert cls.causal_ok and cls.exact
    # QK^T and AV over the full L x L matrix: 2 matmuls of 2 L D FLOPs per token.
    assert cls.flops_per_token(128, 256, None) == 2 * 2 * 128 * 256
    assert cls.memory_per_token(128, 4, None) == 4 * 128
