"""Top-k attention equals masked softmax with each query's top-k visible keys as the mask."""

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.config import ModelConfig
from xpar.testing.attention_reference import (
    assert_model_causal,
    assert_same_forward_backward,
    causal_mask,
    masked_attention,
)


def _qkv(L, B=2, H=2, K=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, K, generator=g, dtype=torch.float64) for _ in range(3)]


def _topk(k, query_chunk):
    return get_attention("topk")(2, 8, get_attention("topk").Options(k=k, query_chunk=query_chunk))


def top_k_mask(q, k_, k, causal):
    """[B, H, L, S] bool: the k best-scoring keys of each query among those it may see."""
    L, S = q.shape[-2], k_.shape[-2]
    s = q @ k_.transpose(-1, -2)
    visible = causal_mask(L, S) if causal else torch.ones(L, S, dtype=torch.bool)
    s = s.masked_fill(~visible, float("-inf"))
    idx = s.topk(min(k, S), dim=-1).indices
    mask = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, idx, True)
    return mask & visible  # fewer than k visible: those only


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k", [48, 100])
def test_k_at_least_L_is_dense(causal, k):
    q, k_, v = _qkv(48)
    allowed = causal_mask(48) if causal else None
    assert_same_forward_backward(
        lambda *x: _topk(k, 16)(*x, causal=causal),
        lambda q, k_, v: masked_attention(q, k_, v, allowed),
        q,
        k_,
        v,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k,chunk", [(5, 16), (5, 13), (12, 64), (1, 7)])
def test_top_k_equals_masked_softmax(causal, k, chunk):
    q, k_, v = _qkv(50)
    assert_same_forward_backward(
        lambda *x: _topk(k, chunk)(*x, causal=causal),
        lambda q, k_, v: masked_attention(q, k_, v, top_k_mask(q, k_, k, causal)),
        q,
        k_,
        v,
    )


def test_bf16_runs_close_to_fp32():
    # k >= L: bf16 rounding could otherwise swap which keys are the k best.
    q, k_, v = (x.float() for x in _qkv(40))
    want = _topk(40, 16)(q, k_, v, causal=True)
    got = _topk(40, 16)(q.bfloat16(), k_.bfloat16(), v.bfloat16(), causal=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_model_is_causal():
    assert_model_causal("topk", {"k": 4, "query_chunk": 8}, L=16)


def _cfg(**opts):
    return ModelConfig(
        vocab_size=40, d_model=16, n_heads=2, attention="topk", attention_options=opts
    )


def test_config_refusals():
    with pytest.raises(XparConfigError, match=r"attention_options\.k=0 is invalid: use an integer"):
        _cfg(k=0)
    with pytest.raises(XparConfigError, match=r"attention_options\.query_chunk=2\.5 is invalid"):
        _cfg(query_chunk=2.5)
    with pytest.raises(XparConfigError, match=r"attention_options\.window is not an option"):
        _cfg(window=4)
    assert _cfg(k=8).attention_opts().k == 8


def test_cost_declared():
    cls = get_attention("topk")
    opts = cls.Options(k=64)
    assert cls.causal_ok and not cls.exact and not cls.cache_ok
    # Time: all L scores plus k values (quadratic, like dense); memory held: k per head.
    assert cls.flops_per_token(4096, 256, opts) == 2 * 4096 * 256 + 2 * 64 * 256
    assert cls.flops_per_token(32, 256, opts) == 2 * 2 * 32 * 256  # k > L: dense
    assert cls.memory_per_token(16384, 8, opts) == cls.memory_per_token(1024, 8, opts) == 8 * 64
