"""Linformer: with proj_len = L and E = F = identity it is dense non-causal attention."""

import pytest
import torch

from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.models import MoETransformer
from xpar.models.attention import get_attention
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.testing.attention_reference import assert_same_forward_backward, masked_attention


def _qkv(L, B=2, H=2, K=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, K, generator=g, dtype=torch.float64) for _ in range(3)]


def _linformer(proj_len, max_len):
    cls = get_attention("linformer")
    return cls(2, 8, cls.Options(proj_len=proj_len, max_len=max_len)).double()


def test_identity_projections_are_dense():
    kernel = _linformer(40, 40)
    with torch.no_grad():
        kernel.E_PM.copy_(torch.eye(40))
        kernel.F_PM.copy_(torch.eye(40))
    assert_same_forward_backward(
        lambda *x: kernel(*x, causal=False), lambda q, k, v: masked_attention(q, k, v), *_qkv(40)
    )


def test_shorter_sequences_use_the_first_columns():
    kernel = _linformer(6, 64)
    q, k, v = (x.requires_grad_(True) for x in _qkv(20))
    out = kernel(q, k, v, causal=False)
    E, F = kernel.E_PM[:, :20], kernel.F_PM[:, :20]
    torch.testing.assert_close(out, masked_attention(q, E @ k, F @ v))
    out.sum().backward()
    assert kernel.E_PM.grad[:, 20:].abs().max() == 0 and kernel.E_PM.grad[:, :20].abs().max() > 0
    assert kernel.F_PM.grad[:, :20].abs().max() > 0
    with pytest.raises(ValueError, match="cannot be causal"):
        kernel(q, k, v, causal=True)
    with pytest.raises(ValueError, match="longer than linformer's max_len=64"):
        kernel(*_qkv(65), causal=False)


def test_projections_are_model_parameters():
    cfg = ModelConfig(
        vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
        causal=False, attention="linformer", attention_options={"proj_len": 4, "max_len": 16},
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoETransformer(cfg, MoEConfig(num_experts=4, top_k=2, d_ff=8, capacity_factor=None))
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters() if k.endswith("_PM")}
    assert shapes == {f"blocks.{i}.attn.kernel.{n}_PM": (4, 16) for i in (0, 1) for n in "EF"}
    # normal(0, 1/sqrt(max_len)), distinct per layer
    E0, E1 = model.blocks[0].attn.kernel.E_PM, model.blocks[1].attn.kernel.E_PM
    assert not torch.equal(E0, E1) and 0.1 < E0.std().item() < 0.5
    logits, _ = model(torch.randint(0, 40, (2, 12)))
    logits.sum().backward()
    assert E1.grad is not None and E1.grad.abs().max() > 0


def _cfg(causal=False, max_seq_len=64, **opts):
    return ModelConfig(
        vocab_size=40, d_model=16, n_heads=2, max_seq_len=max_seq_len, causal=causal,
        attention="linformer", attention_options=opts,
    )  # fmt: skip


def test_config_refusals():
    with pytest.raises(
        XparConfigError,
        match=r"model\.attention='linformer' is invalid: linformer is not causal .* "
        r"model\.causal=True; set model\.causal=false",
    ):
        _cfg(causal=True, proj_len=8, max_len=64)
    with pytest.raises(XparConfigError, match=r"proj_len=0 is invalid: use an integer >= 1"):
        _cfg(proj_len=0, max_len=64)
    with pytest.raises(
        XparConfigError, match=r"proj_len=65 is invalid: it must be <= model\.max_seq_len=64"
    ):
        _cfg(proj_len=65, max_len=64)
    with pytest.raises(XparConfigError, match=r"max_len=0 is invalid: set it to model\.max_seq"):
        _cfg(proj_len=8)
    with pytest.raises(XparConfigError, match=r"max_len=32 is invalid: E and F must cover model"):
        _cfg(proj_len=8, max_len=32)
    assert _cfg(proj_len=64, max_len=128).attention_opts().max_len == 128


def test_config_file_sets_max_len_from_the_model():
    ov = ["experiment=tiny", "attention=linformer", "model.causal=false"]
    cfg = compose_config([*ov, "model.max_seq_len=192"], world_size=1, cuda_available=False)
    assert cfg.model.attention_options == {"proj_len": 128, "max_len": 192}
    with pytest.raises(XparConfigError, match=r"linformer is not causal"):
        compose_config(ov[:2], world_size=1, cuda_available=False)


def test_cost_declared():
    cls = get_attention("linformer")
    opts = cls.Options(proj_len=256, max_len=16384)
    assert not cls.causal_ok and not cls.exact and not cls.cache_ok
    # Linear in L: the per-token cost does not grow with the sequence.
    assert cls.flops_per_token(16384, 512, opts) == cls.flops_per_token(1024, 512, opts)
    assert cls.flops_per_token(1024, 512, opts) == 8 * 256 * 512
    assert cls.memory_per_token(16384, 8, opts) == 8 * 256
