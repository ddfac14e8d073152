"""Linear attention (elu + 1 features) equals its quadratic form, is causal in a whole model,
refuses bad options by name and declares an O(L) cost."""

import pytest
import torch
import torch.nn.functional as F
from test_kernelized import quadratic_form

from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.attention import get_attention
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.testing.attention_reference import assert_model_causal, assert_same_forward_backward

SMALL = {"chunk": 4}  # the options for L = 16 model tests: 4 chunks, a partial one never


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_equals_its_quadratic_form(causal, chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    attn = get_attention("linear")(2, 8, get_attention("linear").Options(chunk=chunk, eps=1e-6))

    def reference(q, k, v):
        return quadratic_form(F.elu(q) + 1, F.elu(k) + 1, v, causal, 1e-6)

    assert_same_forward_backward(lambda q, k, v: attn(q, k, v, causal), reference, q, k, v)


def test_linear_is_causal_in_a_whole_model():
    assert_model_causal("linear", SMALL, L=16)


def test_linear_runs_in_bf16():
    cfg = ModelConfig(
        vocab_size=32,
        d_model=16,
        n_layers=1,
        n_heads=2,
        d_ff=32,
        attention="linear",
        attention_options=SMALL,
    )
    model = MoETransformer(cfg, MoEConfig(num_experts=2, top_k=1, d_ff=8, capacity_factor=None))
    logits = model.to(torch.bfloat16)(torch.randint(0, 32, (2, 16)))[0]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chunk": 0}, r"attention_options\.chunk=0 is invalid: use an integer >= 1"),
        ({"chunk": 2.5}, r"attention_options\.chunk=2\.5 is invalid"),
        ({"eps": 0}, r"attention_options\.eps=0 is invalid: use a finite number > 0"),
        ({"eps": float("nan")}, r"attention_options\.eps=nan is invalid"),
        ({"n_features": 8}, r"attention_options\.n_features is not an option"),
    ],
)
def test_linear_refuses_bad_options(options, message):
    with pytest.raises(XparConfigError, match=message):
        ModelConfig(attention="linear", attention_options=options)


def test_linear_declares_an_o_of_l_cost():
    cls = get_attention("linear")
    assert cls.causal_ok and not cls.exact and not cls.cache_ok
    opts = cls.Options()
    dense = get_attention("dense")
    # Per token: constant in L (dense grows 4x from 4k to 16k), far below dense at 4k.
    assert cls.flops_per_token(16384, 512, opts) == cls.flops_per_token(4096, 512, opts)
    assert cls.memory_per_token(16384, 8, opts) == cls.memory_per_token(4096, 8, opts)
    assert cls.flops_per_token(4096, 512, opts) < dense.flops_per_token(4096, 512, None) / 10
    assert cls.memory_per_token(4096, 8, opts) < dense.memory_per_token(4096, 8, None) / 10
