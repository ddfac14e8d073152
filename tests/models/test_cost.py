import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from xpar.models.attention import attention_names, get_attention
from xpar.models.config import ModelConfig
from xpar.models.cost import (
    active_params,
    describe_cost,
    flops_per_token,
    model_cost,
    total_params,
)
from xpar.models.transformer import MoETransformer
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.expert_gemm import FLOP_FORMULAS


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=32, n_layers=4, n_heads=4, d_ff=48, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


CASES = {
    "dense_gelu": (tiny(), MoEConfig(every=0)),
    "dense_swiglu_tied": (tiny(activation="swiglu", tie_embeddings=True), MoEConfig(every=0)),
    "moe_every1": (tiny(), MoEConfig(num_experts=4, top_k=2, d_ff=24, every=1)),
    "moe_every2_top1": (tiny(), MoEConfig(num_experts=6, top_k=1, d_ff=16, every=2)),
    "moe_shared_swiglu": (
        tiny(tie_embeddings=True),
        MoEConfig(num_experts=4, top_k=2, d_ff=16, activation="swiglu", shared_expert_d_ff=20),
    ),
    "dense_gqa": (tiny(n_heads=4, n_kv_heads=2), MoEConfig(every=0)),
    "moe_gqa_one_kv_head": (tiny(n_kv_heads=1), MoEConfig(num_experts=4, top_k=2, d_ff=16)),
    "moe_every3_mixed_act": (
        tiny(activation="swiglu", n_layers=5),
        MoEConfig(num_experts=8, top_k=3, d_ff=8, every=3, activation="squared_relu"),
    ),
}


def real_counts(model: MoETransformer) -> tuple[int, int]:
    """(sum of numel over unique parameters, that minus the E - k unused experts per MoE layer)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights
    unused = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            per_expert = sum(p[0].numel() for p in module.experts.parameters())
            assert all(getattr(p, "xpar_expert", False) for p in module.experts.parameters())
            unused += (module.cfg.num_experts - module.cfg.top_k) * per_expert
    return total, total - unused


@pytest.mark.parametrize("name", list(CASES))
def test_param_counts_match_built_model(name):
    model_cfg, moe_cfg = CASES[name]
    model = MoETransformer(model_cfg, moe_cfg, ep_group="local")
    total, active = real_counts(model)
    assert total_params(model_cfg, moe_cfg) == total
    assert active_params(model_cfg, moe_cfg) == active
    c = model_cost(model_cfg, moe_cfg, seq_len=16)
    assert c.n_moe_layers == sum(b.is_moe for b in model.blocks)
    if c.n_moe_layers == 0:
        assert active == total
    else:
        assert active < total


@pytest.mark.parametrize("attention", attention_names())
def test_every_attention_variants_own_parameters_are_counted(attention):
    from tests.models.attention.test_every_attention import _cfg

    model_cfg, moe_cfg = _cfg(attention, causal=get_attention(attention).causal_ok)
    model = MoETransformer(model_cfg, moe_cfg, ep_group="local")
    assert model_cost(model_cfg, moe_cfg, seq_len=16).total_params == real_counts(model)[0]


def test_tied_embeddings_counted_once():
    untied = total_params(tiny(), MoEConfig(every=0))
    tied = total_params(tiny(tie_embeddings=True), MoEConfig(every=0))
    assert untied - tied == 40 * 32
    # ...but the LM head matmul costs the same FLOPs either way
    assert flops_per_token(tiny(), MoEConfig(every=0), 16) == flops_per_token(
        tiny(tie_embeddings=True), MoEConfig(every=0), 16
    )


def test_expert_choice_active_uses_capacity_factor():
    cfg = tiny()
    ec = MoEConfig(num_experts=8, d_ff=16, router="expert_choice", capacity_factor=1.5)
    tk = MoEConfig(num_experts=8, top_k=2, d_ff=16)
    c_ec, c_tk = model_cost(cfg, ec, 16), model_cost(cfg, tk, 16)
    per_expert = 2 * 32 * 16
    assert c_ec.total_params == c_tk.total_params
    assert c_ec.experts_per_token == 1.5
    assert c_tk.active_params - c_ec.active_params == pytest.approx(4 * 0.5 * per_expert)


def measured_train_flops(model: torch.nn.Module, tokens: torch.Tensor, vocab: int) -> int:
    # The math SDPA backend is built from bmm, which FlopCounterMode counts (full L x L);
    # the fused CPU kernel is not counted at all.
    # The grouped expert GEMMs (moe.expert_gemm=grouped) are counted with our formula.
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with sdpa_kernel(SDPBackend.MATH), counter:
        logits, aux = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss = loss + sum((a.loss for a in aux), torch.zeros(()))
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CASES))
def test_flops_match_flop_counter(name):
    model_cfg, moe_cfg = CASES[name]
    if moe_cfg.every:
        moe_cfg = MoEConfig(**{**vars(moe_cfg), "capacity_factor": None})  # dropless: k rows/token
    torch.manual_seed(0)
    model = MoETransformer(model_cfg, moe_cfg, ep_group="local")
    B, L = 3, 16
    tokens = torch.randint(0, model_cfg.vocab_size, (B, L + 1))
    measured = measured_train_flops(model, tokens, model_cfg.vocab_size)
    c = model_cost(model_cfg, moe_cfg, seq_len=L)
    predicted = c.flops_per_token * B * L
    # Dense code is all ours: exact. MoE combine/router internals may add a little.
    rel = 0.01 if c.n_moe_layers else 1e-12
    assert measured == pytest.approx(predicted, rel=rel), (measured, predicted)
    # the matmul part alone, with the attention term (counted separately) taken out
    matmul_measured = measured - 3 * c.attention_flops_per_token * B * L
    assert matmul_measured == pytest.approx(6 * c.matmul_active_params * B * L, rel=rel)


def test_describe_cost_is_printable():
    d = describe_cost(*CASES["moe_every2_top1"], seq_len=16)
    assert d["total_params"] == total_params(*CASES["moe_every2_top1"])
    assert "2/4 MoE blocks" in d["summary"] and "1/6 experts" in d["summary"]
    assert "dense" in describe_cost(*CASES["dense_gelu"], seq_len=16)["summary"]
