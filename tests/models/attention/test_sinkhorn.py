"""Sinkhorn attention: one block is dense; otherwise softmax over [own block ++ the soft-
permuted block], rebuilt here block by block from its permutation; Sinkhorn balancing equal
to the plain (not log-space) iteration, causal rows reading no later rows; causal in a whole
model and with a trained sorting network; options refused by name; its cost."""

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.attention.sinkhorn import SinkhornOptions, sinkhorn_log
from xpar.models.config import ModelConfig
from xpar.testing.attention_reference import (
    assert_model_causal,
    assert_same_forward_backward,
    causal_mask,
    masked_attention,
)

B, H, L, K = 2, 2, 32, 8


def _kernel(seed=0, **options):
    kernel = get_attention("sinkhorn")(H, K, SinkhornOptions(**options)).double()
    # A sorting network that has learned something (it starts at zero: uniform P).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        kernel.sort_HKK.copy_(torch.randn(H, K, K, generator=g, dtype=torch.float64) * 0.01)
    return kernel


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, K, dtype=torch.float64, generator=g) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_one_block_is_dense(causal):
    kernel = _kernel(block=L)
    mask = causal_mask(L) if causal else None
    assert_same_forward_backward(
        lambda q, k, v: kernel(q, k, v, causal),
        lambda q, k, v: masked_attention(q, k, v, mask),
        *_qkv(),
    )


def _reference(kernel, q, k, v, causal):
    """Block by block: softmax over [the block's own keys ++ sum_j P_nj (block j's keys)],
    the own block causally masked; block 0 of a causal run has no sorted part."""
    b = kernel.options.block
    N = L // b
    p = kernel.permutation(q, k, causal)  # differentiable: the reference shares it
    blocks = lambda x: [x[:, :, n * b : (n + 1) * b] for n in range(N)]  # noqa: E731
    kb, vb = blocks(k), blocks(v)
    out = []
    for n, qn in enumerate(blocks(q)):
        ks = sum(p[:, :, n, j, None, None] * kb[j] for j in range(N))
        vs = sum(p[:, :, n, j, None, None] * vb[j] for j in range(N))
        own = causal_mask(b) if causal else torch.ones(b, b, dtype=torch.bool)
        sorted_ok = torch.full((b, b), not (causal and n == 0))
        allowed = torch.cat([own, sorted_ok], dim=1)
        out.append(
            masked_attention(qn, torch.cat([kb[n], ks], 2), torch.cat([vb[n], vs], 2), allowed)
        )
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [4, 8])
def test_equals_softmax_over_own_and_sorted_block(causal, block):
    kernel = _kernel(block=block, sinkhorn_iters=5, temperature=0.5)
    q, k, v = _qkv(1)
    p = kernel.permutation(q, k, causal)
    # Soft: blocks mix several blocks (causal block 1 has only block 0 to draw from).
    assert p.min() >= 0 and p[:, :, 2:].max() < 0.999
    if causal:  # strictly earlier blocks only; rows sum to 1 except block 0's (empty)
        assert torch.equal(p.triu(), torch.zeros_like(p))
        torch.testing.assert_close(
            p.sum(-1)[..., 1:], torch.ones(B, H, L // block - 1, dtype=p.dtype)
        )
    assert_same_forward_backward(
        lambda q, k, v: kernel(q, k, v, causal),
        lambda q, k, v: _reference(kernel, q, k, v, causal),
        q,
        k,
        v,
    )


def _plain_sinkhorn(logits, iters, causal):
    """The same balancing in probability space, written the obvious way."""
    e = logits.exp()
    if causal:
        e = e * torch.ones(e.shape[-1], e.shape[-1]).tril()
    for _ in range(iters):
        if causal:
            e = e / e.cumsum(-2).clamp(min=1e-300) * (e > 0)
            e = e / e.sum(-1, keepdim=True)
        else:
            e = e / e.sum(-1, keepdim=True)
            e = e / e.sum(-2, keepdim=True)
    return e


@pytest.mark.parametrize("causal", [True, False])
def test_sinkhorn_balancing(causal):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, 6, dtype=torch.float64, generator=g) * 2
    p = sinkhorn_log(logits, 6, causal)
    torch.testing.assert_close(p, _plain_sinkhorn(logits, 6, causal), atol=1e-12, rtol=1e-10)
    if not causal:  # doubly stochastic once converged
        p = sinkhorn_log(logits, 200, causal)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 6, dtype=p.dtype))
        torch.testing.assert_close(p.sum(-2), torch.ones(3, 6, dtype=p.dtype))
    else:  # row i reads rows <= i only
        later = logits.clone()
        later[:, 4:] += torch.randn(3, 2, 6, dtype=torch.float64, generator=g)
        assert torch.equal(sinkhorn_log(later, 6, True)[:, :4], p[:, :4])


def test_causal_with_a_trained_sorting_network():
    """Changing the tokens after t changes no output at <= t (the sorting network's inputs
    included: block i sorts by block i-1's queries)."""
    kernel = _kernel(block=4)
    q, k, v = _qkv(2)
    base = kernel(q, k, v, True)
    for t in (0, 5, 6, 7, 13, 30):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] += 1.0
        out = kernel(q2, k2, v2, True)
        torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], atol=1e-12, rtol=0)
        assert not torch.allclose(out[:, :, t + 1], base[:, :, t + 1])


def test_causal_in_a_whole_model():
    assert_model_causal("sinkhorn", {"block": 4}, L=16)


def test_sorting_network_is_a_parameter_that_learns():
    kernel = get_attention("sinkhorn")(H, K, SinkhornOptions(block=8)).double()
    assert dict(kernel.named_parameters()).keys() == {"sort_HKK"}
    assert torch.equal(kernel.sort_HKK, torch.zeros(H, K, K, dtype=torch.float64))
    for causal in (True, False):
        kernel.sort_HKK.grad = None
        q, k, v = _qkv(3)
        (kernel(q, k, v, causal) * torch.randn(B, H, L, K, dtype=torch.float64)).sum().backward()
        assert kernel.sort_HKK.grad.abs().max() > 0


def test_a_length_the_block_does_not_divide_is_refused():
    kernel = _kernel(block=5)
    with pytest.raises(
        ValueError, match=r"attention_options\.block=5 must divide the sequence length 32"
    ):
        kernel(*_qkv(), True)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"block": 0}, r"attention_options\.block=0 is invalid: use an integer >= 1"),
        (
            {"sinkhorn_iters": 0},
            r"attention_options\.sinkhorn_iters=0 is invalid: use an integer >= 1",
        ),
        (
            {"temperature": 0},
            r"attention_options\.temperature=0 is invalid: use a finite number > 0",
        ),
        ({"temperature": float("inf")}, r"attention_options\.temperature=inf is invalid"),
        (
            {"block": 12},
            r"attention_options\.block=12 is invalid: it must divide model\.max_seq_len=32",
        ),
    ],
)
def test_bad_options_are_refused_by_name(options, match):
    with pytest.raises(XparConfigError, match=match):
        ModelConfig(
            vocab_size=10,
            d_model=16,
            n_heads=2,
            max_seq_len=32,
            attention="sinkhorn",
            attention_options=options,
        )


def test_declares_its_cost():
    cls = get_attention("sinkhorn")
    assert cls.causal_ok and not cls.exact and not cls.cache_ok
    opts = SinkhornOptions(block=64)
    # 1024 tokens: 16 blocks; 128 keys per query, 16 blocks mixed into each sorted one.
    assert cls.flops_per_token(1024, 256, opts) == 2 * 2 * 128 * 256 + 2 * 2 * 16 * 256
    assert cls.memory_per_token(1024, 4, opts) == 4 * (128 + 16 / 64)
    dense = get_attention("dense")
    growth = cls.flops_per_token(16384, 256, opts) / cls.flops_per_token(1024, 256, opts)
    assert growth < 3  # dense: 16
    assert cls.memory_per_token(16384, 4, opts) / cls.memory_per_token(1024, 4, opts) < 1.1
    assert cls.flops_per_token(16384, 256, opts) < dense.flops_per_token(16384, 256, None) / 10
