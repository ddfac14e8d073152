"""The attention registry: adding a variant is one module (plus its test).

A variant defined here, as a contributor would in xpar/models/attention/<name>.py, is
selected with model.attention, gets its options validated, is used by the model and
counted by the cost report, with nothing else edited.
"""

from dataclasses import dataclass

import pytest
import torch
from test_dense_attention import naive_attention

from xpar.config.checks import bad
from xpar.errors import XparConfigError
from xpar.models import MoETransformer, model_cost
from xpar.models.attention import ATTENTIONS, Attention, attention_names, register
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig


@dataclass
class _Options:
    scale: float = 1.0

    def validate(self, prefix: str) -> None:
        if not self.scale > 0:
            raise bad(prefix, "scale", self.scale, "use a number > 0")


class NaiveAttention(Attention):
    name = "test_naive"
    Options = _Options

    def forward(self, q, k, v, causal):
        return naive_attention(q * self.options.scale, k, v, causal)

    @classmethod
    def flops_per_token(cls, seq_len, d_model, options):
        return 7.0 * seq_len


@pytest.fixture
def naive_variant():
    register(NaiveAttention)
    yield NaiveAttention
    ATTENTIONS._classes.pop(NaiveAttention.name)


def _cfg(**kw):
    return ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32, **kw)


def test_dense_is_registered_and_the_default():
    assert "dense" in attention_names() and ModelConfig().attention == "dense"
    with pytest.raises(XparConfigError, match=r"model\.attention='flash9' is invalid: choose"):
        _cfg(attention="flash9")


def test_a_new_attention_is_one_module(naive_variant):
    moe = MoEConfig(num_experts=4, top_k=2, d_ff=8, capacity_factor=None)
    torch.manual_seed(0)
    dense = MoETransformer(_cfg(), moe, ep_group="local")
    torch.manual_seed(0)
    naive = MoETransformer(_cfg(attention="test_naive"), moe, ep_group="local")
    tokens = torch.randint(0, 40, (2, 12))
    # Same weights (the variant holds none), same maths: the same logits.
    torch.testing.assert_close(naive(tokens)[0], dense(tokens)[0], atol=1e-5, rtol=1e-5)
    assert model_cost(_cfg(attention="test_naive"), moe, 12).attention_flops_per_token == 2 * 7 * 12
    with pytest.raises(XparConfigError, match=r"model\.attention_options\.scale=0 is invalid"):
        _cfg(attention="test_naive", attention_options={"scale": 0})
    with pytest.raises(XparConfigError, match=r"attention_options\.window is not an option"):
        _cfg(attention_options={"window": 4})
