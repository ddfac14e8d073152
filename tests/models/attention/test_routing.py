"""Routing attention: dense with one cluster and no window; otherwise equal to masked softmax
over the keys of its own clusters (plus the local window), rebuilt here from the clusters it
reports; causal in a whole model; centroids seeded, moved only by training passes, resumed
bitwise; options refused by name; a cost that grows like L / n_clusters per token."""

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.attention.routing import RoutingOptions
from xpar.models.config import ModelConfig
from xpar.testing.attention_reference import (
    assert_model_causal,
    assert_same_forward_backward,
    causal_mask,
    masked_attention,
)

B, H, L, K = 2, 2, 40, 8


def _kernel(**options):
    return get_attention("routing")(H, K, RoutingOptions(**options))


def _qkv(seed=0, L=L):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, K, dtype=torch.float64, generator=g) for _ in range(3)]


def _local(L, window, causal):
    d = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    return (d >= 0) & (d <= window) if causal else d.abs() <= window


@pytest.mark.parametrize("causal", [True, False])
def test_one_cluster_without_window_is_dense(causal):
    kernel = _kernel(n_clusters=1, window=0)
    mask = causal_mask(L) if causal else None
    assert_same_forward_backward(
        lambda q, k, v: kernel(q, k, v, causal),
        lambda q, k, v: masked_attention(q, k, v, mask),
        *_qkv(),
    )


def _reference(kernel, q, k, v, causal):
    """For each cluster a query is in: softmax over that cluster's keys (causally allowed)
    and the query's local keys, one L-wide mask per membership; averaged; a query in no
    cluster: its local keys alone."""
    (iq, okq), (ik, okk) = kernel.routes(q, k, causal)
    C, W = iq.shape[2:]
    window = kernel.options.window
    local_LL = _local(L, window, causal)
    # scatter_add, not scatter_: an empty slot's index (0) must not overwrite a real one.
    in_key_BHCL = torch.zeros(B, H, C, L, dtype=torch.long).scatter_add_(-1, ik, okk.long()) > 0
    allowed = in_key_BHCL[:, :, :, None, :] & (
        causal_mask(L)[iq] if causal else torch.ones(B, H, C, W, L, dtype=torch.bool)
    )
    allowed = allowed | local_LL[iq]  # [B, H, C, W, L]
    q_slot = q.gather(2, iq.reshape(B, H, C * W, 1).expand(-1, -1, -1, K))
    o_slot = masked_attention(q_slot, k, v, allowed.reshape(B, H, C * W, L))
    o_slot = o_slot * okq.reshape(B, H, C * W, 1)
    total = torch.zeros_like(q).index_put_(
        (
            torch.arange(B)[:, None, None],
            torch.arange(H)[None, :, None],
            iq.reshape(B, H, C * W),
        ),
        o_slot,
        accumulate=True,
    )
    count = torch.zeros(B, H, L, dtype=q.dtype)
    count.scatter_add_(-1, iq.reshape(B, H, C * W), okq.reshape(B, H, C * W).to(q.dtype))
    local_only = masked_attention(q, k, v, local_LL)
    return torch.where(count[..., None] > 0, total / count.clamp(min=1)[..., None], local_only)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_clusters,window", [(4, 3), (5, 0), (3, 12)])
def test_equals_masked_softmax_over_its_clusters(causal, n_clusters, window):
    kernel = _kernel(n_clusters=n_clusters, window=window).eval()  # no update between calls
    q, k, v = _qkv(1)
    (iq, okq), _ = kernel.routes(q, k, causal)
    count = torch.zeros(B, H, L).scatter_add_(
        -1, iq.reshape(B, H, -1), okq.reshape(B, H, -1).float()
    )
    # The cases the combination rule covers do occur: queries in no cluster, and (top-
    # capacity, non-causal) in several.
    assert (count == 0).any()
    assert (count > 1).any() if not causal else count.max() == 1
    assert_same_forward_backward(
        lambda q, k, v: kernel(q, k, v, causal),
        lambda q, k, v: _reference(kernel, q, k, v, causal),
        q,
        k,
        v,
    )


def test_causal_in_a_whole_model():
    # Frozen centroids: a training pass's update would re-cluster the next pass (the
    # kernel test below covers causality with the update on).
    assert_model_causal("routing", {"n_clusters": 4, "window": 2, "ema_decay": 1.0}, L=16)


def test_a_training_pass_is_causal_and_updates_after_attending():
    q, k, v = _qkv(2)
    t = 17
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn(B, H, L - t - 1, K, dtype=x.dtype)
    a, b = (
        _kernel(n_clusters=4, window=2, ema_decay=0.5),
        _kernel(n_clusters=4, window=2, ema_decay=0.5),
    )
    start = a.centroids_HCK.clone()
    out_a, out_b = a(q, k, v, True), b(q2, k2, v2, True)
    torch.testing.assert_close(out_a[:, :, : t + 1], out_b[:, :, : t + 1], atol=0, rtol=0)
    assert not torch.equal(a.centroids_HCK, start)  # it did move (on all of the batch)


def test_centroids_are_seeded_and_move_in_training_only():
    a, b, c = _kernel(seed=3), _kernel(seed=3), _kernel(seed=4)
    assert torch.equal(a.centroids_HCK, b.centroids_HCK)
    assert not torch.equal(a.centroids_HCK, c.centroids_HCK)
    norms = a.centroids_HCK.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    q, k, v = _qkv(3)
    start = a.centroids_HCK.clone()
    a.eval()(q, k, v, True)
    assert torch.equal(a.centroids_HCK, start)
    frozen = _kernel(seed=3, ema_decay=1.0)
    frozen(q, k, v, True)
    assert torch.equal(frozen.centroids_HCK, start)
    a.train()(q, k, v, True)
    assert not torch.equal(a.centroids_HCK, start)
    torch.testing.assert_close(a.centroids_HCK.norm(dim=-1), norms)


def test_resume_from_a_state_dict_is_bitwise():
    batches = [_qkv(s) for s in range(3)]
    run = _kernel(n_clusters=4, ema_decay=0.9)
    for qkv in batches[:2]:
        run(*qkv, True)
    resumed = _kernel(n_clusters=4, ema_decay=0.9)
    resumed.load_state_dict(run.state_dict())
    assert torch.equal(run(*batches[2], True), resumed(*batches[2], True))
    assert torch.equal(run.centroids_HCK, resumed.centroids_HCK)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"n_clusters": 0}, r"attention_options\.n_clusters=0 is invalid: use an integer >= 1"),
        ({"window": -1}, r"attention_options\.window=-1 is invalid: use an integer >= 0"),
        (
            {"ema_decay": 1.5},
            r"attention_options\.ema_decay=1\.5 is invalid: use a number in \[0, 1\]",
        ),
        ({"seed": -1}, r"attention_options\.seed=-1 is invalid: use an integer in"),
        ({"n_clusters": 33}, r"n_clusters=33 is invalid: more clusters than model\.max_seq_len=32"),
        ({"window": 32}, r"window=32 is invalid: a window of model\.max_seq_len=32 or more"),
    ],
)
def test_bad_options_are_refused_by_name(options, match):
    with pytest.raises(XparConfigError, match=match):
        ModelConfig(
            vocab_size=10,
            d_model=16,
            n_heads=2,
            max_seq_len=32,
            attention="routing",
            attention_options=options,
        )


def test_declares_its_cost():
    cls = get_attention("routing")
    assert cls.causal_ok and not cls.exact and not cls.cache_ok
    opts = RoutingOptions(n_clusters=16, window=32)
    # 1024 tokens, 16 clusters of 64 slots: 64 cluster keys, 96 local, 16 centroids.
    assert cls.flops_per_token(1024, 256, opts) == 2 * 2 * (64 + 96) * 256 + 2 * 2 * 16 * 256
    assert cls.memory_per_token(1024, 4, opts) == 4 * (64 + 96 + 32)
    dense = get_attention("dense")
    for per_token in (cls.flops_per_token, cls.memory_per_token):
        growth = per_token(16384, 256, opts) / per_token(1024, 256, opts)
        assert growth < 16 / 2  # dense grows 16x; this ~ L / n_clusters plus a constant
    assert cls.flops_per_token(16384, 256, opts) < dense.flops_per_token(16384, 256, None) / 10
