"""Sliding-window attention equals masked softmax attention with the band mask (plus
global tokens and random keys), forward and gradients within 1e-5; never an L x L tensor;
causal inside the whole model; bad options refused by name."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import xpar.models.attention.blockwise as blockwise
from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.attention.sliding_window import random_index
from xpar.models.config import ModelConfig
from xpar.testing.attention_reference import (
    assert_model_causal,
    assert_same_forward_backward,
    masked_attention,
)

CLS = get_attention("sliding_window")


def reference_mask(L: int, H: int, opt, causal: bool) -> torch.Tensor:
    """[H, L, L] bool, the pattern as the docstring states it (tests only: quadratic)."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    w, g = opt.window, opt.global_tokens
    band = (i - j < w) & (j <= i) if causal else (i - j).abs() < w
    mask = (band | (i < g) | (j < g)).expand(H, L, L).clone()
    if opt.random_keys:
        idx_HNR = random_index(L, H, opt)
        block = min(w, L, 64)
        for h in range(H):
            for n, keys in enumerate(idx_HNR[h]):
                mask[h, n * block : (n + 1) * block, keys[keys >= 0]] = True
    return mask


def _check(options: dict, causal: bool, L: int, B: int = 2, H: int = 2, K: int = 8) -> None:
    opt = CLS.Options(**options)
    attn = CLS(H, K, opt)
    gen = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(B, H, L, K, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = reference_mask(L, H, opt, causal)
    assert_same_forward_backward(
        lambda q, k, v: attn(q, k, v, causal=causal),
        lambda q, k, v: masked_attention(q, k, v, mask),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("window", "L"), [(1, 32), (5, 37), (16, 32), (64, 37)])
def test_window_equals_masked_attention(window, causal, L):
    # window 64 > L: every query sees all its (earlier) keys, dense; 37: a partial block.
    _check({"window": window}, causal, L)


@pytest.mark.parametrize("causal", [True, False])
def test_window_over_several_blocks(causal):
    # window 70 > the 64-row blocks: the band spans 2 key blocks on each side.
    _check({"window": 70}, causal, L=150, B=1, H=1)


@pytest.mark.parametrize(
    "options",
    [
        {"window": 4, "global_tokens": 3},
        {"window": 4, "random_keys": 6, "seed": 3},
        {"window": 5, "global_tokens": 2, "random_keys": 4},
        {"window": 1, "global_tokens": 1, "random_keys": 40},  # repeats, overlaps
        {"window": 8, "global_tokens": 40},  # every token global: dense
    ],
)
def test_global_and_random_keys_equal_masked_attention(options):
    _check(options, causal=False, L=37)


def test_small_chunks_equal_masked_attention(monkeypatch):
    # Chunks of a few blocks, and of part of one block's rows: the same numbers.
    for elements in (300, 20):
        monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", elements)
        _check({"window": 6, "global_tokens": 2, "random_keys": 3}, causal=False, L=37)
        _check({"window": 6}, causal=True, L=37)


def test_random_keys_are_deterministic_per_seed_and_head():
    opt = CLS.Options(window=8, random_keys=4, seed=5)
    a, b = random_index(64, 2, opt), random_index(64, 2, opt)
    assert torch.equal(a, b) and a.shape == (2, 8, 4)
    assert not torch.equal(a[0], a[1]), "heads draw their own keys"
    assert not torch.equal(a, random_index(64, 2, CLS.Options(window=8, random_keys=4)))


class _LargestTensor(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("causal", [True, False])
def test_no_l_by_l_tensor(causal):
    L, H, K = 1024, 2, 8
    options = {"window": 16} if causal else {"window": 16, "global_tokens": 4, "random_keys": 8}
    attn = CLS(H, K, CLS.Options(**options))
    q, k, v = (torch.randn(1, H, L, K, requires_grad=True) for _ in range(3))
    with _LargestTensor() as seen:
        attn(q, k, v, causal=causal).sum().backward()
    # Tiles: L x (3 * 16) scores per head at most; an L x L matrix would be 1M.
    assert seen.numel <= H * L * 64, seen.numel


def test_causal_inside_the_model():
    assert_model_causal("sliding_window", {"window": 4}, L=16)


def test_bf16_inputs_run_close_to_fp32():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    attn = CLS(2, 16, CLS.Options(window=8))
    out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attn(q, k, v, causal=True), atol=3e-2, rtol=0)


def _model(**kw):
    return ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ff=32, max_seq_len=64, **kw)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"window": 0}, r"attention_options\.window=0 is invalid: use an integer >= 1"),
        ({"window": 2.5}, r"attention_options\.window=2\.5 is invalid"),
        ({"global_tokens": -1}, r"attention_options\.global_tokens=-1 is invalid: use an int"),
        ({"random_keys": True}, r"attention_options\.random_keys=True is invalid"),
        ({"seed": -3}, r"attention_options\.seed=-3 is invalid: use an integer in \[0"),
    ],
)
def test_bad_options_refused(options, match):
    with pytest.raises(XparConfigError, match=match):
        _model(causal=False, attention="sliding_window", attention_options=options)


@pytest.mark.parametrize("name", ["global_tokens", "random_keys"])
def test_causal_model_refuses_global_and_random_keys(name):
    with pytest.raises(
        XparConfigError,
        match=rf"model\.attention_options\.{name}=2 is invalid: a causal model cannot use it.*"
        rf"set {name}=0 or model\.causal=false",
    ):
        _model(attention="sliding_window", attention_options={"window": 4, name: 2})
    _model(causal=False, attention="sliding_window", attention_options={"window": 4, name: 2})
    attn = CLS(2, 8, CLS.Options(window=4, **{name: 2}))
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(XparConfigError, match=rf"{name}=2 is invalid"):
        attn(q, q, q, causal=True)  # the kernel called causally on its own refuses too


def test_cost_is_linear_in_length():
    opt = CLS.Options(window=256)
    flops = [CLS.flops_per_token(L, 512, opt) for L in (4096, 8192, 16384)]
    assert flops[0] == flops[1] == flops[2] == 2 * 2 * (256 + 64) * 512  # w + block keys
    dense = get_attention("dense")
    assert CLS.memory_per_token(16384, 8, opt) * 40 < dense.memory_per_token(16384, 8, None)
    both = CLS.Options(window=256, global_tokens=4, random_keys=16)
    assert CLS.flops_per_token(16384, 1, both) == 2 * 2 * ((4 + 1 + 4) * 64 + 2 * 4 + 16)
