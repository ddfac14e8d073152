"""Grouped-query attention (model.n_kv_heads): a naive per-head reference, and plain
multi-head attention bitwise unchanged when n_kv_heads = n_heads."""

import math

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.models.config import ModelConfig
from xpar.models.transformer import MoETransformer, SelfAttention, apply_rotary, rotary_cos_sin
from xpar.moe import MoEConfig

DENSE = MoEConfig(every=0)


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def naive_attention(attn: SelfAttention, x_BLD: torch.Tensor, causal: bool) -> torch.Tensor:
    """Head by head from the rows of wqkv: q head h uses kv head h // (H / N)."""
    B, L, D = x_BLD.shape
    H, N, K = attn.n_heads, attn.n_kv_heads, attn.head_dim
    W = attn.wqkv.weight
    cos, sin = rotary_cos_sin(L, K, 10000.0, x_BLD.device)
    outs = []
    for h in range(H):
        g = h // (H // N)
        wq = W[h * K : (h + 1) * K]
        wk = W[H * K + g * K : H * K + (g + 1) * K]
        wv = W[H * K + N * K + g * K : H * K + N * K + (g + 1) * K]
        q = apply_rotary((x_BLD @ wq.T)[:, None], cos, sin)[:, 0]
        k = apply_rotary((x_BLD @ wk.T)[:, None], cos, sin)[:, 0]
        v = x_BLD @ wv.T
        s = q @ k.transpose(1, 2) / math.sqrt(K)
        if causal:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(s, dim=-1) @ v)
    return attn.wo(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("n_kv", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_equals_naive_reference(n_kv, causal):
    torch.manual_seed(0)
    attn = SelfAttention(cfg(n_kv_heads=n_kv, causal=causal))
    torch.nn.init.normal_(attn.wqkv.weight, std=0.3)
    assert attn.wqkv.weight.shape == (32 + 2 * n_kv * 8, 32)
    x = torch.randn(2, 7, 32)
    cos, sin = rotary_cos_sin(7, 8, 10000.0, x.device)
    got = attn(x, cos, sin)
    torch.testing.assert_close(got, naive_attention(attn, x, causal), atol=1e-5, rtol=1e-5)


def test_kv_heads_are_shared_by_consecutive_query_heads():
    """Changing kv head 1's weights changes query heads 2 and 3 only (H=4, N=2)."""
    torch.manual_seed(0)
    attn = SelfAttention(cfg(n_kv_heads=2))
    x = torch.randn(1, 5, 32)
    cos, sin = rotary_cos_sin(5, 8, 10000.0, x.device)
    torch.nn.init.eye_(attn.wo.weight)  # the output is the heads side by side
    before = attn(x, cos, sin)
    with torch.no_grad():
        attn.wqkv.weight[32 + 8 : 32 + 16] += 1.0  # k rows of kv head 1
    after = attn(x, cos, sin)
    same = (before == after).view(1, 5, 4, 8).all(dim=(0, 1, 3))
    assert same.tolist() == [True, True, False, False]


def old_attention(attn: SelfAttention, x_BLD, cos, sin):
    """SelfAttention.forward as it was before grouped-query attention."""
    B, L, D = x_BLD.shape
    qkv = attn.wqkv(x_BLD).view(B, L, 3, attn.n_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = attn.kernel(q, k, v, causal=attn.causal)
    return attn.wo(o.transpose(1, 2).reshape(B, L, D))


@pytest.mark.parametrize("n_kv", [0, 4])
def test_n_kv_equal_to_n_heads_is_bitwise_the_old_attention(n_kv):
    torch.manual_seed(0)
    attn = SelfAttention(cfg(n_kv_heads=n_kv))
    x = torch.randn(3, 9, 32)
    cos, sin = rotary_cos_sin(9, 8, 10000.0, x.device)
    grads = []
    for fn in (attn.forward, lambda *a: old_attention(attn, *a)):
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi, cos, sin)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, attn.wqkv.weight.grad.clone()))
    for new, old in zip(*grads, strict=True):
        assert torch.equal(new, old)


def test_n_kv_equal_to_n_heads_builds_the_same_model():
    torch.manual_seed(0)
    a = MoETransformer(cfg(), DENSE)
    torch.manual_seed(0)
    b = MoETransformer(cfg(n_kv_heads=4), DENSE)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    tokens = torch.randint(0, 48, (2, 12))
    assert torch.equal(a(tokens)[0], b(tokens)[0])


def test_gqa_model_is_smaller_and_runs():
    torch.manual_seed(0)
    full = MoETransformer(cfg(), DENSE)
    gqa = MoETransformer(cfg(n_kv_heads=1), DENSE)
    saved = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in gqa.parameters())
    assert saved == 2 * 2 * 32 * (32 - 8)  # 2 layers, k and v, D x (H - N) K each
    logits, _ = gqa(torch.randint(0, 48, (2, 6)))
    assert logits.shape == (2, 6, 48) and torch.isfinite(logits).all()


def test_bad_n_kv_heads_is_refused_naming_field_value_and_fix():
    with pytest.raises(XparConfigError) as e:
        cfg(n_heads=4, n_kv_heads=3)
    msg = str(e.value)
    assert msg.startswith("model.n_kv_heads=3 is invalid:")
    assert "model.n_heads=4" in msg and "divisor" in msg
