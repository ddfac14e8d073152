"""LSH attention (Reformer) against masked-softmax references built from its own hashes.

Shared QK: the keys are q / ||q||. A query never sees itself unless it is its only key, which
as a mask is: drop the diagonal, except in rows where nothing else is allowed.
"""

import math

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

LSH = get_attention("lsh")


def _lsh(**options):
    return LSH(2, 8, LSH.Options(**options))


def _qkv(L, B=2, H=2, K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, K, generator=g, dtype=torch.float64) for _ in range(3)]


def _self_rule(allowed):
    """[..., L, L] allowed keys -> without the diagonal, unless the diagonal is all a row has."""
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool)
    others = allowed & ~eye
    lone = ~others.any(dim=-1, keepdim=True)
    return torch.where(lone, eye, others)


def _shared_qk(q, v, allowed):
    return masked_attention(q, q / q.norm(dim=-1, keepdim=True), v, _self_rule(allowed))


def _allowed(lsh, q, causal):
    """[B, H, N, L, L] allowed keys of each round, written position by position from the
    kernel's buckets: its sorted rank, its chunk, and (causal) its bucket."""
    bucket = lsh.buckets(q)
    B, H, N, L = bucket.shape
    c = min(lsh.options.chunk_len, L)
    allowed = torch.zeros(B, H, N, L, L, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for r in range(N):
                bk = bucket[b, h, r].tolist()
                order = sorted(range(L), key=lambda i: (bk[i], i))
                rank = {pos: n for n, pos in enumerate(order)}
                for i in range(L):
                    for j in range(L):
                        if causal:
                            back = rank[i] - rank[j]
                            ok = bk[i] == bk[j] and 0 <= back <= c
                        else:
                            ok = 0 <= rank[i] // c - rank[j] // c <= 1
                        allowed[b, h, r, i, j] = ok
    return allowed


def _multi_round_reference(q, v, allowed_BHNLL):
    """softmax over the rounds' key sets joined (a key in m rounds counts m times), the self
    score at -1e5 in every round: what the log-sum-exp combination of the rounds computes."""
    k = q / q.norm(dim=-1, keepdim=True)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    eye = torch.eye(q.shape[-2], dtype=torch.bool)
    s = s.masked_fill(eye, -1e5)
    count = (allowed_BHNLL | eye).sum(dim=2).to(q.dtype)  # every round offers self
    return torch.softmax(s + count.log(), dim=-1) @ v


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_one_chunk_one_bucket_is_shared_qk_attention(causal, n_hashes):
    """chunk_len = L: one chunk holds the sequence; zeroed rotations put everything in
    bucket 0 (the causal rule keeps to a bucket). Then it is dense shared-QK attention."""
    L = 32
    lsh = _lsh(n_hashes=n_hashes, n_buckets=4, chunk_len=L)
    lsh.rotations_NKU.zero_()
    q, k, v = _qkv(L)
    allowed = causal_mask(L) if causal else torch.ones(L, L, dtype=torch.bool)
    assert_same_forward_backward(
        lambda q, k, v: lsh(q, k, v, causal=causal),
        lambda q, k, v: _shared_qk(q, v, allowed),
        q,
        k,
        v,
    )


def test_one_chunk_attends_across_buckets_when_not_causal():
    L = 32
    lsh = _lsh(n_hashes=2, n_buckets=8, chunk_len=L)
    q, k, v = _qkv(L)
    assert lsh.buckets(q).unique().numel() > 1
    everything = torch.ones(L, L, dtype=torch.bool)
    assert_same_forward_backward(
        lambda q, k, v: lsh(q, k, v, causal=False),
        lambda q, k, v: _shared_qk(q, v, everything),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("blocks", ["whole", "chunk by chunk"])
@pytest.mark.parametrize("L", [48, 45])  # 45: padded to 48 (chunk_len does not divide it)
@pytest.mark.parametrize("causal", [True, False])
def test_one_round_sees_only_its_window(causal, L, blocks):
    """Several buckets and chunks: equal to masked attention over the window rule applied
    to the kernel's own hashes (non-causal: own and previous chunk of the sorted order;
    causal: own bucket, at most chunk_len places back)."""
    lsh = _lsh(n_hashes=1, n_buckets=4, chunk_len=8)
    if blocks != "whole":
        lsh.scores_per_block = 1  # one chunk per block: the blocks' seams are tested
    q, k, v = _qkv(L)
    assert lsh.buckets(q).unique().numel() == 4
    allowed = _allowed(lsh, q, causal)[:, :, 0]
    assert not allowed.all()
    if causal:
        assert not (allowed & ~causal_mask(L)).any()
    assert_same_forward_backward(
        lambda q, k, v: lsh(q, k, v, causal=causal),
        lambda q, k, v: _shared_qk(q, v, allowed),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False])
def test_rounds_combine_by_log_sum_exp(causal):
    L = 40
    lsh = _lsh(n_hashes=3, n_buckets=4, chunk_len=8)
    lsh.scores_per_block = 2 * 2 * 8 * 16 * 2  # two chunks per block: 5 chunks in 3 blocks
    q, k, v = _qkv(L, seed=1)
    allowed = _allowed(lsh, q, causal)
    assert not torch.equal(allowed[:, :, 0], allowed[:, :, 1])  # the rounds differ
    assert_same_forward_backward(
        lambda q, k, v: lsh(q, k, v, causal=causal),
        lambda q, k, v: _multi_round_reference(q, v, allowed),
        q,
        k,
        v,
    )


def test_k_is_ignored_and_half_precision_runs_in_float32():
    lsh = _lsh(n_hashes=2, n_buckets=4, chunk_len=8)
    q, k, v = (x.float() for x in _qkv(32))
    out = lsh(q, k, v, causal=True)
    torch.testing.assert_close(lsh(q, torch.randn_like(k), v, causal=True), out)
    half = lsh(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert half.dtype == torch.bfloat16
    # bf16 inputs can flip a hash or two (another window): compare where most positions agree.
    close = ((half.float() - out).abs() < 0.05).float().mean()
    assert close > 0.9, close


def test_rotations_come_from_the_seed_and_live_in_the_state_dict():
    a, b = _lsh(n_hashes=2, seed=7), _lsh(n_hashes=2, seed=7)
    assert torch.equal(a.rotations_NKU, b.rotations_NKU)
    assert a.rotations_NKU.shape == (2, 8, 16)
    assert not torch.equal(a.rotations_NKU, _lsh(n_hashes=2, seed=8).rotations_NKU)
    # Round r is the r-th draw: more rounds keep the first ones.
    assert torch.equal(_lsh(n_hashes=3, seed=7).rotations_NKU[:2], a.rotations_NKU)
    assert "rotations_NKU" in a.state_dict()


def test_whole_decoder_is_causal():
    assert_model_causal("lsh", {"n_hashes": 2, "n_buckets": 4, "chunk_len": 4}, L=16)


def _cfg(max_seq_len=64, **options):
    return ModelConfig(
        vocab_size=16,
        d_model=16,
        n_heads=2,
        d_ff=16,
        max_seq_len=max_seq_len,
        attention="lsh",
        attention_options=options,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_hashes": 0}, r"attention_options\.n_hashes=0 is invalid: use an integer >= 1"),
        ({"chunk_len": 0}, r"attention_options\.chunk_len=0 is invalid: use an integer >= 1"),
        ({"n_buckets": 5}, r"attention_options\.n_buckets=5 is invalid: use an even integer"),
        ({"n_buckets": 0}, r"attention_options\.n_buckets=0 is invalid: use an even integer"),
        ({"seed": -1}, r"attention_options\.seed=-1 is invalid: use an integer in \[0, 2\*\*63\)"),
        (
            {"chunk_len": 24},
            r"attention_options\.chunk_len=24 is invalid: it must divide "
            r"model\.max_seq_len=64 .* e\.g\. 16",
        ),
        (
            {"chunk_len": 8, "n_buckets": 6},
            r"attention_options\.n_buckets=6 is invalid: with model\.max_seq_len=64 and "
            r"chunk_len=8 the sorted sequence has 8 chunks; n_buckets must divide 8 or be a "
            r"multiple of it .* e\.g\. n_buckets=4",
        ),
        ({"chunk_len": 1, "n_buckets": 128}, r"n_buckets=128 is invalid: .*at most max_seq_len"),
    ],
)
def test_config_refusals(options, message):
    with pytest.raises(XparConfigError, match=message):
        _cfg(**options)


def test_config_odd_length_with_chunks_of_one():
    with pytest.raises(XparConfigError, match=r"n_buckets=2 is invalid: .* use chunk_len >= 2"):
        _cfg(max_seq_len=15, chunk_len=1, n_buckets=2)


def test_config_accepts_aligned_buckets():
    _cfg(chunk_len=8, n_buckets=4)  # 4 divides the 8 chunks
    _cfg(chunk_len=8, n_buckets=16)  # a multiple of them
    _cfg(max_seq_len=16384, chunk_len=128, n_buckets=64)


def test_cost_is_linear_in_length():
    opts = LSH.Options(n_hashes=2, n_buckets=64, chunk_len=128)
    D, H = 512, 8
    # Per round QK^T and AV over 2 chunks of keys, plus the hash: constant per token.
    assert LSH.flops_per_token(4096, D, opts) == 2 * (2 * 2 * 256 * D + 64 * D)
    assert LSH.flops_per_token(16384, D, opts) == LSH.flops_per_token(4096, D, opts)
    assert LSH.memory_per_token(16384, H, opts) == LSH.memory_per_token(4096, H, opts)
    assert LSH.memory_per_token(4096, H, opts) == H * 2 * 256
    dense = get_attention("dense")
    assert dense.flops_per_token(16384, D, None) / dense.flops_per_token(4096, D, None) == 4
    assert LSH.flops_per_token(16384, D, opts) < dense.flops_per_token(16384, D, None) / 10
    # One chunk (L <= chunk_len): the chunk alone, no previous one.
    assert LSH.memory_per_token(100, H, opts) == H * 2 * 100
    # Padding is paid for: 130 positions take 2 chunks of 128.
    assert LSH.memory_per_token(130, H, opts) == H * 2 * 256 * 256 / 130
