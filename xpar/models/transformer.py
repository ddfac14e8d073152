"""Transformer LM with optional MoE feed-forward blocks: a causal decoder, or with
model.causal=false a bidirectional encoder (trained as a masked LM).

Single-device code: no torch.distributed or deepspeed here. Expert parallelism
comes in through the MoE layer's ep_group, which is passed through untouched.

Shape suffixes: B batch, L sequence, D model dim, H heads, K head dim,
F ffn dim, V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.config import ModelConfig, check_causal, moe_block_ids
from xpar.models.mlp import MLP
from xpar.moe import MoEConfig, MoELayer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, K/2] in fp32 for positions 0..L-1.

    Computed per forward, not stored as buffers, so that casting the model to
    bf16 cannot round the angles (position * frequency grows large).
    """
    f32 = dict(device=device, dtype=torch.float32)
    inv_freq_K = theta ** (-torch.arange(0, head_dim, 2, **f32) / head_dim)
    angle_LK = torch.outer(torch.arange(seq_len, **f32), inv_freq_K)
    return angle_LK.cos(), angle_LK.sin()


def apply_rotary(x_BHLK: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[j], x[j + K/2]) by angle position * theta^(-2j/K).

    After rotation, q_m . k_n depends on positions only through m - n.
    """
    half = x_BHLK.shape[-1] // 2
    x32 = x_BHLK.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    out = torch.cat((x1 * cos_LK - x2 * sin_LK, x1 * sin_LK + x2 * cos_LK), dim=-1)
    return out.to(x_BHLK.dtype)


class SelfAttention(nn.Module):
    """Projections, heads and rotary positions; the registered variant does the mixing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kernel = get_attention(cfg.attention)(cfg.n_heads, cfg.head_dim, cfg.attention_opts())

    def forward(self, x_BLD: torch.Tensor, cos_LK: torch.Tensor, sin_LK: torch.Tensor):
        B, L, D = x_BLD.shape
        qkv_BL3HK = self.wqkv(x_BLD).view(B, L, 3, self.n_heads, self.head_dim)
        q_BHLK, k_BHLK, v_BHLK = qkv_BL3HK.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHLK = apply_rotary(q_BHLK, cos_LK, sin_LK)
        k_BHLK = apply_rotary(k_BHLK, cos_LK, sin_LK)
        o_BHLK = self.kernel(q_BHLK, k_BHLK, v_BHLK, causal=self.causal)
        return self.wo(o_BHLK.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, moe_cfg: MoEConfig | None, ep_group: object = None
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = moe_cfg is not None
        if moe_cfg is not None:
            self.ffn = MoELayer(cfg.d_model, moe_cfg, ep_group, vocab_size=cfg.vocab_size)
        else:
            self.ffn = MLP(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(
        self,
        x_BLD: torch.Tensor,
        cos_LK: torch.Tensor,
        sin_LK: torch.Tensor,
        tokens_BL: torch.Tensor | None = None,
    ):
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), cos_LK, sin_LK)
        h_BLD = self.ffn_norm(x_BLD)
        if self.is_moe:
            y_BLD, aux = self.ffn(h_BLD, tokens_BL)
        else:
            y_BLD, aux = self.ffn(h_BLD), None
        return x_BLD + y_BLD, aux


class MoETransformer(nn.Module):
    """LM: embed -> n_layers x (attention, FFN or MoE) -> norm -> LM head.

    forward(tokens_BL) -> (logits_BLV, aux_list): aux_list holds one MoEAux per
    MoE block, in block order (empty for a dense model). The caller adds
    sum(aux.loss) to its cross entropy. hidden(tokens_BL) -> (h_BLD, aux_list) stops
    before the LM head (after the final norm), for task heads.
    """

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, ep_group: object = None):
        super().__init__()
        model_cfg.validate()
        moe_cfg.validate()
        if model_cfg.vocab_size < 1:
            raise XparConfigError(
                f"model.vocab_size={model_cfg.vocab_size} is invalid for building a model: "
                "set it to the tokenizer's vocabulary size (0 is only a placeholder)"
            )
        check_causal(model_cfg, moe_cfg)
        self.model_cfg = model_cfg
        self.moe_cfg = moe_cfg
        moe_ids = set(moe_block_ids(model_cfg, moe_cfg))
        self.tok_emb = nn.Embedding(model_cfg.vocab_size, model_cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(model_cfg, moe_cfg if i in moe_ids else None, ep_group)
            for i in range(model_cfg.n_layers)
        )
        self.norm = RMSNorm(model_cfg.d_model, model_cfg.norm_eps)
        self.lm_head = nn.Linear(model_cfg.d_model, model_cfg.vocab_size, bias=False)
        if model_cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(init_std) everywhere; residual-branch outputs get init_std / sqrt(2 n_layers).

        Each FFN (dense MLP or MoE layer) draws its own weights in a fixed order; expert
        banks are drawn whole and sliced, so the init does not depend on the EP layout.
        """
        std = self.model_cfg.init_std
        out_std = std / math.sqrt(2 * self.model_cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not self.model_cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.wqkv.weight, std=std)
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            block.ffn.reset_parameters(std, out_std)

    def forward(self, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, list]:
        h_BLD, aux_list = self.hidden(tokens_BL)
        return self.lm_head(h_BLD), aux_list

    def hidden(self, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, list]:
        L = tokens_BL.shape[1]
        if L > self.model_cfg.max_seq_len:
            raise ValueError(
                f"sequence length {L} exceeds model.max_seq_len={self.model_cfg.max_seq_len}; "
                "raise model.max_seq_len or feed shorter sequences"
            )
        cos_LK, sin_LK = rotary_cos_sin(
            L, self.model_cfg.head_dim, self.model_cfg.rope_theta, tokens_BL.device
        )
        x_BLD = self.tok_emb(tokens_BL)
        aux_list = []
        for block in self.blocks:
            # Token ids go along for routers that route by them (hash layers).
            x_BLD, aux = block(x_BLD, cos_LK, sin_LK, tokens_BL)
            if aux is not None:
                aux_list.append(aux)
        return self.norm(x_BLD), aux_list
