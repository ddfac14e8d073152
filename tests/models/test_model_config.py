import pytest
from omegaconf import OmegaConf

from xpar.errors import XparConfigError
from xpar.models.config import ModelConfig


def test_defaults_are_valid_and_structured_roundtrip():
    cfg = OmegaConf.structured(ModelConfig)
    cfg.vocab_size = 256
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ModelConfig)
    assert obj.vocab_size == 256 and obj.head_dim == 64


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=250, n_heads=4), "model.n_heads=4"),  # not divisible
        (dict(d_model=12, n_heads=4), "model.n_heads=4"),  # head dim 3 is odd
        (dict(d_model=0), "model.d_model=0"),
        (dict(n_layers=0), "model.n_layers=0"),
        (dict(n_heads=-1), "model.n_heads=-1"),
        (dict(d_ff=0), "model.d_ff=0"),
        (dict(max_seq_len=0), "model.max_seq_len=0"),
        (dict(vocab_size=-3), "model.vocab_size=-3"),
        (dict(rope_theta=0.0), "model.rope_theta=0.0"),
        (dict(norm_eps=-1e-5), "model.norm_eps=-1e-05"),
        (dict(init_std=float("inf")), "model.init_std=inf"),
        (dict(activation="tanh"), "model.activation='tanh'"),
        (dict(d_model=True), "model.d_model=True"),
        (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads=3"),  # does not divide n_heads
        (dict(n_heads=4, n_kv_heads=8), "model.n_kv_heads=8"),
        (dict(n_kv_heads=-1), "model.n_kv_heads=-1"),
        (dict(n_kv_heads=2.0), "model.n_kv_heads=2.0"),
    ],
)
def test_invalid_fields_name_field_value_and_fix(kwargs, field):
    with pytest.raises(XparConfigError) as e:
        ModelConfig(**kwargs)
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert "is invalid:" in msg and len(msg.split("is invalid:")[1].strip()) > 5


def test_n_kv_heads_zero_means_n_heads_and_message_names_the_fix():
    assert ModelConfig(n_heads=4).kv_heads == 4
    assert ModelConfig(n_heads=4, n_kv_heads=2).kv_heads == 2
    with pytest.raises(XparConfigError, match="divisor of n_heads") as e:
        ModelConfig(n_heads=4, n_kv_heads=3)
    assert "model.n_heads=4" in str(e.value)


def test_rotary_message_mentions_even_head_dim():
    with pytest.raises(XparConfigError, match="rotary"):
        ModelConfig(d_model=24, n_heads=8)


def test_invalid_override_is_caught_when_materialised():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"d_model": 100, "n_heads": 3})
    with pytest.raises(XparConfigError, match="model.n_heads=3"):
        OmegaConf.to_object(cfg)
