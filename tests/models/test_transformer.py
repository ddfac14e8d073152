import math

import pytest
import torch
import torch.nn.functional as F

from xpar.errors import XparConfigError
from xpar.models.config import ModelConfig
from xpar.models.transformer import (
    MoETransformer,
    apply_rotary,
    moe_block_ids,
    rotary_cos_sin,
)
from xpar.moe import MoEConfig

DENSE = MoEConfig(every=0)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def test_forward_shapes_dense():
    torch.manual_seed(0)
    model = MoETransformer(tiny(), DENSE)
    logits, aux = model(torch.randint(0, 48, (3, 20)))
    assert logits.shape == (3, 20, 48)
    assert aux == []
    assert all(not b.is_moe for b in model.blocks)


def test_no_biases_and_tied_embeddings():
    tied = MoETransformer(tiny(tie_embeddings=True), DENSE)
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = MoETransformer(tiny(), DENSE)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    for name, _ in untied.named_parameters():
        assert "bias" not in name


def test_vocab_size_placeholder_refused():
    with pytest.raises(XparConfigError, match="model.vocab_size=0"):
        MoETransformer(tiny(vocab_size=0), DENSE)


def test_too_long_sequence_refused():
    model = MoETransformer(tiny(max_seq_len=8), DENSE)
    with pytest.raises(ValueError, match="model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_moe_block_placement():
    cfg = tiny(n_layers=6)
    assert moe_block_ids(cfg, MoEConfig(every=0)) == []
    assert moe_block_ids(cfg, MoEConfig(every=1)) == [0, 1, 2, 3, 4, 5]
    assert moe_block_ids(cfg, MoEConfig(every=2)) == [1, 3, 5]
    assert moe_block_ids(cfg, MoEConfig(every=4)) == [3]
    assert moe_block_ids(cfg, MoEConfig(every=7)) == []


def test_expert_choice_refused_in_moe_model_but_fine_when_dense():
    ec = MoEConfig(router="expert_choice", capacity_factor=1.0, every=1)
    with pytest.raises(XparConfigError, match="moe.router='expert_choice'.*topk"):
        MoETransformer(tiny(), ec)
    ec_dense = MoEConfig(router="expert_choice", capacity_factor=1.0, every=0)
    MoETransformer(tiny(), ec_dense)  # no MoE block, nothing routes


def test_init_std_and_depth_scaled_outputs():
    torch.manual_seed(0)
    cfg = tiny(d_model=128, n_heads=4, d_ff=256, n_layers=8, init_std=0.02)
    model = MoETransformer(cfg, DENSE)
    out_std = 0.02 / math.sqrt(2 * 8)
    stds = {n: p.std().item() for n, p in model.named_parameters()}
    assert stds["blocks.0.attn.wqkv.weight"] == pytest.approx(0.02, rel=0.05)
    assert stds["blocks.3.ffn.w1.weight"] == pytest.approx(0.02, rel=0.05)
    assert stds["blocks.3.attn.wo.weight"] == pytest.approx(out_std, rel=0.05)
    assert stds["blocks.7.ffn.w2.weight"] == pytest.approx(out_std, rel=0.05)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(128))


def _check_causal(model: torch.nn.Module, vocab: int, L: int = 16) -> None:
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, L))
    model.eval()
    with torch.no_grad():
        base, _ = model(tokens)
        for t in (0, 5, L - 2):
            changed = tokens.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(L - t - 1)) % vocab
            out, _ = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-5)
            # and the change is visible at t + 1, so the test could fail
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "squared_relu", "relu"])
def test_causal_dense(activation):
    torch.manual_seed(0)
    _check_causal(MoETransformer(tiny(activation=activation), DENSE), 48)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    L, K = 24, 16
    q_K, k_K = torch.randn(K, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    cos, sin = rotary_cos_sin(L, K, 10000.0, torch.device("cpu"))
    q_LK = apply_rotary(q_K.expand(1, 1, L, K), cos, sin)[0, 0]
    k_LK = apply_rotary(k_K.expand(1, 1, L, K), cos, sin)[0, 0]
    scores_LL = q_LK @ k_LK.T  # scores[m, n] for query at m, key at n
    for off in range(-L + 1, L):
        diag = torch.diagonal(scores_LL, offset=off)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=1e-5, atol=1e-5)
    # position 0 is the identity, rotation keeps norms, and positions are distinguishable
    torch.testing.assert_close(q_LK[0], q_K)
    torch.testing.assert_close(q_LK.norm(dim=-1), q_K.norm().expand(L))
    assert not torch.allclose(scores_LL[0, 0], scores_LL[5, 0])


def test_rotary_pairs_rotate_at_theta_frequencies():
    K, theta = 8, 100.0
    cos, sin = rotary_cos_sin(4, K, theta, torch.device("cpu"))
    x = torch.zeros(1, 1, 4, K)
    x[..., 1] = 1.0  # first coordinate of pair j=1, partner is index 1 + K/2
    y = apply_rotary(x, cos, sin)[0, 0]
    freq = theta ** (-2 * 1 / K)
    for m in range(4):
        assert y[m, 1].item() == pytest.approx(math.cos(m * freq), abs=1e-6)
        assert y[m, 1 + K // 2].item() == pytest.approx(math.sin(m * freq), abs=1e-6)


def _overfit(model: torch.nn.Module, vocab: int, steps: int = 40) -> tuple[float, float]:
    torch.manual_seed(0)
    batch = torch.randint(0, vocab, (4, 17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        logits, aux = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        total = loss + sum((a.loss for a in aux), torch.zeros(()))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_overfit_one_batch_dense():
    torch.manual_seed(0)
    first, last = _overfit(MoETransformer(tiny(), DENSE), 48)
    assert first == pytest.approx(math.log(48), rel=0.1)  # small init -> near-uniform logits
    assert last < 0.2 * first, (first, last)


MOE = MoEConfig(num_experts=4, top_k=2, d_ff=32, every=2, capacity_factor=None)


def test_forward_moe_returns_one_aux_per_moe_block():
    torch.manual_seed(0)
    model = MoETransformer(tiny(n_layers=4), MOE, ep_group="local")
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    logits, aux = model(torch.randint(0, 48, (2, 12)))
    assert logits.shape == (2, 12, 48)
    assert len(aux) == 2
    for a in aux:
        assert a.loss.ndim == 0 and a.loss.requires_grad
        assert a.tokens_per_expert.shape == (4,)
        assert a.tokens_per_expert.sum().item() == 2 * 12 * 2  # k assignments per token


def test_moe_expert_output_projection_is_depth_scaled():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=1, d_ff=256, every=1, shared_expert_d_ff=256)
    model = MoETransformer(tiny(d_model=128, n_layers=8), moe, ep_group="local")
    layer = model.blocks[0].ffn
    out_std = 0.02 / math.sqrt(16)
    assert layer.experts.w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.experts.w2.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.shared_expert.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.router.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_causal_moe_dropless(activation):
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=4, top_k=2, d_ff=32, every=1, capacity_factor=None, activation=activation
    )
    _check_causal(MoETransformer(tiny(), moe, ep_group="local"), 48)


def test_causality_test_catches_capacity_drops():
    # With a capacity, whether a token keeps its expert depends on the other tokens
    # in the batch (including later ones). The same check must notice that leak.
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=1, d_ff=32, every=1, capacity_factor=0.5)
    model = MoETransformer(tiny(), moe, ep_group="local")
    # _check_causal runs in eval mode, which uses capacity_factor too (no eval override)
    with pytest.raises(AssertionError):
        _check_causal(model, 48)


def test_overfit_one_batch_moe():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, d_ff=32, every=1, shared_expert_d_ff=16)
    first, last = _overfit(MoETransformer(tiny(), moe, ep_group="local"), 48)
    assert last < 0.2 * first, (first, last)


def _bf16_matches_fp32(device: str) -> None:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, d_ff=32, every=2, capacity_factor=None)
    model = MoETransformer(tiny(n_layers=4), moe, ep_group="local").to(device)
    tokens = torch.randint(0, 48, (2, 32), device=device)
    with torch.no_grad():
        want, _ = model(tokens)
    model = model.to(torch.bfloat16)
    got, aux = model(tokens)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    (got.float().logsumexp(-1).mean() + sum(a.loss for a in aux)).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_bf16_cpu_matches_fp32():
    _bf16_matches_fp32("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_matches_fp32():
    _bf16_matches_fp32("cuda")


@pytest.mark.parametrize("n_kv", [0, 2])
@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_prefill_then_decode_equals_full_forward(n_kv, moe):
    """The prompt into an empty cache, then one token per step: each step's logits are the
    full forward's at that position (rotary at absolute positions, decode sees every key)."""
    torch.manual_seed(0)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, d_ff=32, capacity_factor=None) if moe else DENSE
    model = MoETransformer(tiny(n_kv_heads=n_kv), moe_cfg, ep_group="local").eval()
    tokens = torch.randint(0, 48, (2, 12))
    with torch.no_grad():
        want, _ = model(tokens)
        cache = model.new_cache(2, 16)
        got = [model(tokens[:, :5], cache)[0]]
        for t in range(5, 12):
            got.append(model(tokens[:, t : t + 1], cache, start_pos=t)[0])
    assert cache[0].length == 12 and cache[0].k_BNSK.shape == (2, n_kv or 4, 16, 8)
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-5, rtol=1e-5)


def test_kv_cache_misuse_is_refused():
    model = MoETransformer(tiny(), DENSE).eval()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="start_pos=1"):
            model(torch.zeros(1, 1, dtype=torch.long), cache, start_pos=1)
        with pytest.raises(ValueError, match="one token per step"):
            model(torch.zeros(1, 2, dtype=torch.long), cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache)
        for _ in range(4):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="max_len=8"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="position 4 \\+ 30 exceeds model.max_seq_len=32"):
            model(torch.zeros(1, 30, dtype=torch.long), start_pos=4)
    encoder = MoETransformer(tiny(causal=False), DENSE).eval()
    with pytest.raises(XparConfigError, match="model.causal=False"):
        encoder(torch.zeros(1, 3, dtype=torch.long), encoder.new_cache(1))
