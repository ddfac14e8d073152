"""Parameter and FLOP cost of a model, from its configs alone.

Notation: V vocab, D d_model, N n_layers, H heads, G key/value heads (model.kv_heads),
K = D / H head dim, F dense d_ff, E experts, k experts per token
(the router's `experts_per_token`), Fe expert d_ff, Fs shared-expert d_ff, L sequence
length, and m(act) the activation's matrix count (3 for gated swiglu: w1, w3, w2; else 2).

Parameters (no biases anywhere):
    attention per block   2 D^2 + 2 D G K  (wqkv D (D + 2 G K) + wo D^2; 4 D^2 when G = H)
    norms per block       2 D              (+ D for the final norm)
    dense FFN             m(model.act) D F
    MoE FFN               router (its `num_params`; E D for a linear router)
                          + E m(moe.act) D Fe + m(moe.act) D Fs (shared)
    embedding             V D              (+ V D LM head unless tied)

active_params: the parameters one token touches. Everything, except that each
MoE block counts only k routed experts instead of E (router and shared expert
in full); k comes from the router (expert choice: capacity_factor on average).
The embedding table counts in full (as it does in total_params).

FLOPs per token (training = forward + backward = 3 x forward):
    forward = 2 * matmul_active_params + N * attention.flops_per_token(L)
where matmul_active_params = active_params - norm weights - (embedding table
+ untied LM head) + V D: the embedding is a lookup, not a matmul; the LM head
is one V D matmul, tied or not. The router is a matmul and counts. The attention term comes from the
attention variant (dense: 2 * 2 * L * D, QK^T and AV over the FULL L x L score
matrix, not halved for the causal mask, which matches SDPA's math path and
torch.utils.flop_counter and bounds flash kernels that skip masked tiles; grouped-query
attention repeats k/v heads, so every query head still does its full products).
Element-wise work (norms, activations, softmax, rotary) is not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from xpar.activations import get_activation
from xpar.models.attention import get_attention
from xpar.models.config import ModelConfig, moe_block_ids
from xpar.moe import MoEConfig
from xpar.moe.routers import get_router


def _mats(activation: str) -> int:
    return get_activation(activation).matrices


@dataclass(frozen=True)
class ModelCost:
    total_params: int
    active_params: float  # float: expert choice averages capacity_factor experts
    embedding_params: int  # V D (the lookup table)
    lm_head_params: int  # V D if untied, else 0 (shared with the embedding)
    norm_params: int
    attention_params: int
    dense_ffn_params: int
    moe_params: int  # routers + all experts + shared experts, over all MoE blocks
    params_per_expert: int
    n_moe_layers: int
    experts_per_token: float
    matmul_active_params: float
    seq_len: int
    attention_flops_per_token: float  # forward, full L x L
    forward_flops_per_token: float
    flops_per_token: float  # training: 3 x forward


def model_cost(model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int) -> ModelCost:
    """Parameter counts and FLOPs per token, by the formulas in this module's docstring."""
    V, D, N = model_cfg.vocab_size, model_cfg.d_model, model_cfg.n_layers
    n_moe = len(moe_block_ids(model_cfg, moe_cfg))
    n_dense = N - n_moe

    kv_dim = model_cfg.kv_heads * model_cfg.head_dim
    kernel = get_attention(model_cfg.attention)
    own = kernel.num_params(model_cfg.n_heads, model_cfg.head_dim, model_cfg.attention_opts())
    attention = N * (2 * D * D + 2 * D * kv_dim + own)
    norms = N * 2 * D + D
    dense_ffn = n_dense * _mats(model_cfg.activation) * D * model_cfg.d_ff
    per_expert = _mats(moe_cfg.activation) * D * moe_cfg.d_ff
    router_cls = get_router(moe_cfg.router)
    router = router_cls.num_params(D, moe_cfg)
    shared = _mats(moe_cfg.activation) * D * moe_cfg.shared_expert_d_ff
    moe = n_moe * (router + moe_cfg.num_experts * per_expert + shared)
    embedding = V * D
    lm_head = 0 if model_cfg.tie_embeddings else V * D
    total = embedding + lm_head + norms + attention + dense_ffn + moe

    experts_per_token = router_cls.experts_per_token(moe_cfg, seq_len=seq_len) if n_moe else 0.0
    active = total - n_moe * (moe_cfg.num_experts - experts_per_token) * per_expert
    if float(active).is_integer():
        active = int(active)
    # The lookup table is no matmul; the LM head is one, even when it shares that table.
    matmul_active = active - norms - (embedding + lm_head) + V * D

    attn_flops = N * kernel.flops_per_token(seq_len, D, model_cfg.attention_opts())
    fwd = 2 * matmul_active + attn_flops
    return ModelCost(
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        lm_head_params=lm_head,
        norm_params=norms,
        attention_params=attention,
        dense_ffn_params=dense_ffn,
        moe_params=moe,
        params_per_expert=per_expert,
        n_moe_layers=n_moe,
        experts_per_token=experts_per_token,
        matmul_active_params=matmul_active,
        seq_len=seq_len,
        attention_flops_per_token=attn_flops,
        forward_flops_per_token=fwd,
        flops_per_token=3 * fwd,
    )


def total_params(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> int:
    return model_cost(model_cfg, moe_cfg, seq_len=1).total_params


def active_params(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> float:
    return model_cost(model_cfg, moe_cfg, seq_len=1).active_params


def flops_per_token(model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    return model_cost(model_cfg, moe_cfg, seq_len).flops_per_token


def describe_cost(model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int) -> dict:
    """A flat dict for printing/logging: every ModelCost field plus readable strings."""
    c = model_cost(model_cfg, moe_cfg, seq_len)
    out = asdict(c)
    moe = (
        f" ({c.n_moe_layers}/{model_cfg.n_layers} MoE blocks, "
        f"{c.experts_per_token:g}/{moe_cfg.num_experts} experts per token)"
        if c.n_moe_layers
        else " (dense)"
    )
    out["summary"] = (
        f"params {_human(c.total_params)} total, {_human(c.active_params)} active{moe}; "
        f"{_human(c.flops_per_token)}FLOP/token train at seq_len {seq_len}"
    )
    return out


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"
