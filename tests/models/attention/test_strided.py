"""Sparse Transformer attention (strided and fixed patterns) equals masked softmax
attention with the pattern's mask, forward and gradients within 1e-5, causal or not;
never an L x L tensor; causal inside the whole model; bad options refused by name."""

import pytest
import torch
from test_sliding_window import _LargestTensor

import xpar.models.attention.blockwise as blockwise
from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.config import ModelConfig
from xpar.testing.attention_reference import (
    assert_model_causal,
    assert_same_forward_backward,
    masked_attention,
)

CLS = get_attention("strided")


def reference_mask(L: int, opt, causal: bool) -> torch.Tensor:
    """[L, L] bool, the paper's pattern as the docstring states it (tests only)."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    s = opt.stride
    if opt.pattern == "strided":
        mask = ((i - j).abs() < s) | ((i - j) % s == 0)
    else:
        mask = (i // s == j // s) | (j % s >= s - opt.c)
    return mask & (j <= i) if causal else mask


def _check(options: dict, causal: bool, L: int, B: int = 2, H: int = 2, K: int = 8) -> None:
    opt = CLS.Options(**options)
    attn = CLS(H, K, opt)
    gen = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(B, H, L, K, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = reference_mask(L, opt, causal)
    assert_same_forward_backward(
        lambda q, k, v: attn(q, k, v, causal=causal),
        lambda q, k, v: masked_attention(q, k, v, mask),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("options", "L"),
    [
        ({"stride": 4}, 32),
        ({"stride": 7}, 37),  # a partial last block and residue class
        ({"stride": 1}, 32),  # every key is a summary key: dense
        ({"stride": 70}, 37),  # stride > L: the band alone, dense
        ({"stride": 70}, 150),  # the band over several 64-row blocks
        ({"pattern": "fixed", "stride": 4, "c": 1}, 32),
        ({"pattern": "fixed", "stride": 6, "c": 3}, 37),
        ({"pattern": "fixed", "stride": 8, "c": 8}, 32),  # c = stride: all earlier blocks
        ({"pattern": "fixed", "stride": 40, "c": 2}, 37),  # no block ends inside L
    ],
)
def test_pattern_equals_masked_attention(options, causal, L):
    _check(options, causal, L, B=1 if L > 64 else 2)


def test_small_chunks_equal_masked_attention(monkeypatch):
    for elements in (300, 20):
        monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", elements)
        _check({"stride": 5}, causal=True, L=37)
        _check({"pattern": "fixed", "stride": 6, "c": 2}, causal=False, L=37)


@pytest.mark.parametrize("options", [{"stride": 32}, {"pattern": "fixed", "stride": 32, "c": 4}])
@pytest.mark.parametrize("causal", [True, False])
def test_no_l_by_l_tensor(options, causal):
    L, H, K = 1024, 2, 8
    attn = CLS(H, K, CLS.Options(**options))
    q, k, v = (torch.randn(1, H, L, K, requires_grad=True) for _ in range(3))
    with _LargestTensor() as seen:
        attn(q, k, v, causal=causal).sum().backward()
    # Band tiles L x 96 and L x (L / 32) summaries per head; an L x L matrix would be 1M.
    assert seen.numel <= H * L * 128, seen.numel


@pytest.mark.parametrize("options", [{"stride": 4}, {"pattern": "fixed", "stride": 4, "c": 2}])
def test_causal_inside_the_model(options):
    assert_model_causal("strided", options, L=16)


def _model(**kw):
    return ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ff=32, max_seq_len=64, **kw)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"pattern": "dilated"}, r"pattern='dilated' is invalid: choose one of strided, fixed"),
        ({"stride": 0}, r"attention_options\.stride=0 is invalid: use an integer >= 1"),
        ({"stride": 4, "c": 0}, r"attention_options\.c=0 is invalid: use an integer >= 1"),
        (
            {"pattern": "fixed", "stride": 4, "c": 5},
            r"attention_options\.c=5 is invalid: use an integer in \[1, stride=4\]",
        ),
        ({"c": "8"}, r"attention_options\.c='8' is invalid"),
    ],
)
def test_bad_options_refused(options, match):
    with pytest.raises(XparConfigError, match=match):
        _model(attention="strided", attention_options=options)


def test_cost_grows_slower_than_length():
    dense = get_attention("dense")
    for options in ({"stride": 128}, {"pattern": "fixed", "stride": 128, "c": 8}):
        opt = CLS.Options(**options)
        f4, f16 = (CLS.flops_per_token(L, 512, opt) for L in (4096, 16384))
        assert f4 < f16 < 4 * f4  # sub-quadratic: per token, well under the 4x of L
        assert f16 * 10 < dense.flops_per_token(16384, 512, None)
        assert CLS.memory_per_token(16384, 8, opt) * 10 < dense.memory_per_token(16384, 8, None)
    # strided: the band tile (128 + 64 keys) plus L / 128 summary keys.
    assert CLS.flops_per_token(16384, 1, CLS.Options(stride=128)) == 2 * 2 * (192 + 128)
