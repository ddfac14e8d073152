"""Transformer LM with optional MoE feed-forward blocks: a causal decoder, or with
model.causal=false a bidirectional encoder (trained as a masked LM).

Single-device code: no torch.distributed or deepspeed here. Expert parallelism
comes in through the MoE layer's ep_group, which is passed through untouched.

Shape suffixes: B batch, L sequence, D model dim, H heads, K head dim,
F ffn dim, V vocab.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.config import ModelConfig, check_causal, moe_block_ids
from xpar.models.kv_cache import KVCache
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
    seq_len: int, head_dim: int, theta: float, device: torch.device, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, K/2] in fp32 for positions start..start+L-1 (absolute positions:
    a decode step with a KV cache rotates its token at its place in the sequence).

    Computed per forward, not stored as buffers, so that casting the model to
    bf16 cannot round the angles (position * frequency grows large).
    """
    f32 = dict(device=device, dtype=torch.float32)
    inv_freq_K = theta ** (-torch.arange(0, head_dim, 2, **f32) / head_dim)
    angle_LK = torch.outer(torch.arange(start, start + seq_len, **f32), inv_freq_K)
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
    """Projections, heads and rotary positions; the registered variant does the mixing.

    Grouped-query attention: wqkv's rows are [q (H*K); k (N*K); v (N*K)] for N = kv heads,
    head h at rows h*K..(h+1)*K of its part; query head h reads kv head h // (H / N). With
    N = H this is plain multi-head attention, the same weights and the same numbers.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal
        self.attention = cfg.attention
        kv_dim = self.n_kv_heads * self.head_dim
        self.wqkv = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kernel = get_attention(cfg.attention)(cfg.n_heads, cfg.head_dim, cfg.attention_opts())

    def forward(
        self,
        x_BLD: torch.Tensor,
        cos_LK: torch.Tensor,
        sin_LK: torch.Tensor,
        cache: KVCache | None = None,
    ):
        B, L, D = x_BLD.shape
        H, N, K = self.n_heads, self.n_kv_heads, self.head_dim
        # split, not slicing: its backward concatenates (no zero-filled sums), and v keeps
        # the strides the fused [B, L, 3, H, K] view gave it (bitwise the same numbers).
        q_BLX, k_BLX, v_BLX = self.wqkv(x_BLD).split((H * K, N * K, N * K), dim=-1)
        q_BHLK = q_BLX.view(B, L, H, K).transpose(1, 2)
        k_BNLK = k_BLX.view(B, L, N, K).transpose(1, 2)
        v_BNLK = v_BLX.view(B, L, N, K).transpose(1, 2)
        q_BHLK = apply_rotary(q_BHLK, cos_LK, sin_LK)
        k_BNLK = apply_rotary(k_BNLK, cos_LK, sin_LK)
        causal = self.causal
        if cache is not None:
            causal = self._cached_causal(cache, L)
            k_BNLK, v_BNLK = cache.append(k_BNLK, v_BNLK)  # now every position so far
        if N != H:
            k_BHLK = k_BNLK.repeat_interleave(H // N, dim=1)
            v_BHLK = v_BNLK.repeat_interleave(H // N, dim=1)
        else:
            k_BHLK, v_BHLK = k_BNLK, v_BNLK
        o_BHLK = self.kernel(q_BHLK, k_BHLK, v_BHLK, causal=causal)
        return self.wo(o_BHLK.transpose(1, 2).reshape(B, L, D))

    def _cached_causal(self, cache: KVCache, L: int) -> bool:
        """The kernel's causal flag for L new tokens after cache.length cached ones.

        SDPA's is_causal aligns the mask top-left: with fewer queries than keys, query 0
        would see key 0 only, not every cached key. So a cached call is either the prompt
        into an empty cache (square: the usual causal mask) or one token (it sees every
        key, all of them in its past: no mask)."""
        if not self.causal:
            raise XparConfigError(
                "model.causal=False: a KV cache is for causal decoding; an encoder attends "
                "to the whole sequence, so run it without a cache"
            )
        if not getattr(self.kernel, "cache_ok", False):
            raise XparConfigError(
                f"model.attention={self.attention!r} does not support a KV cache; "
                "generate without one (xpar generate --no-cache) or use model.attention=dense"
            )
        if cache.length == 0:
            return True
        if L == 1:
            return False
        raise ValueError(
            f"a cached forward of {L} tokens after {cache.length} cached ones: feed the "
            "prompt whole into an empty cache, then one token per step"
        )


def _state_of(obj: object) -> dict | None:
    """A copy of obj's attributes: containers and dataclasses copied, the rest (process
    groups, modules) by reference."""
    if obj is None:
        return None
    return {
        k: copy.copy(v) if isinstance(v, (set, dict, list)) or dataclasses.is_dataclass(v) else v
        for k, v in vars(obj).items()
    }


def _set_state(obj: object, state: dict | None) -> None:
    """obj's attributes back to `state`; dataclasses in place (others may hold them)."""
    if obj is None:
        return
    for k, v in state.items():
        cur = getattr(obj, k, None)
        if dataclasses.is_dataclass(v) and type(cur) is type(v):
            for f in dataclasses.fields(v):
                setattr(cur, f.name, getattr(v, f.name))
        else:
            setattr(obj, k, copy.copy(v) if isinstance(v, (set, dict, list)) else v)


class Block(nn.Module):
    """Attention then FFN (dense MLP or MoE layer), each pre-norm with a residual.

    recompute (moe.recompute=block): in training, keep only the block's input and redo its
    forward in backward (torch.utils.checkpoint). The redo repeats the MoE layer's
    all-to-alls (every rank recomputes its blocks in the same order) and the router's
    jitter (the RNG state is restored) from the dispatcher state the forward saw, whose
    changes (traffic counters) it then undoes, so a step counts its rows once. Its outputs
    (the aux) are dropped.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        moe_cfg: MoEConfig | None,
        ep_group: object = None,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.recompute = recompute
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
        cache: KVCache | None = None,
    ):
        if self.recompute and cache is None and torch.is_grad_enabled():
            return self._checkpointed(x_BLD, cos_LK, sin_LK, tokens_BL)
        return self._forward(x_BLD, cos_LK, sin_LK, tokens_BL, cache)

    def _checkpointed(self, x_BLD, cos_LK, sin_LK, tokens_BL):
        # The dispatcher's state (traffic counters, what it learnt of past calls) as the
        # forward found it: the redo starts from it, so it takes the forward's paths (the
        # same collectives), and its own changes are undone afterwards.
        dispatcher = self.ffn.dispatcher if self.is_moe else None
        at_forward = _state_of(dispatcher)
        runs = []  # the first run is the forward; any later one is backward's redo

        def run(x_BLD, cos_LK, sin_LK, tokens_BL):
            if not runs:
                runs.append(1)
                return self._forward(x_BLD, cos_LK, sin_LK, tokens_BL, None)
            now = _state_of(dispatcher)
            _set_state(dispatcher, at_forward)
            try:
                return self._forward(x_BLD, cos_LK, sin_LK, tokens_BL, None)
            finally:
                _set_state(dispatcher, now)

        # early_stop=False: the redo runs the whole block, so every collective it starts
        # (the MoE layer's load all-reduce included) also completes, on every rank alike.
        return checkpoint(
            run, x_BLD, cos_LK, sin_LK, tokens_BL, use_reentrant=False, early_stop=False
        )

    def _forward(self, x_BLD, cos_LK, sin_LK, tokens_BL, cache):
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), cos_LK, sin_LK, cache)
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
        # moe.recompute=block recomputes every block, dense ones too, in backward.
        recompute = moe_cfg.recompute == "block"
        self.blocks = nn.ModuleList(
            Block(model_cfg, moe_cfg if i in moe_ids else None, ep_group, recompute)
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

    def forward(
        self,
        tokens_BL: torch.Tensor,
        cache: list[KVCache] | None = None,
        start_pos: int | None = None,
    ) -> tuple[torch.Tensor, list]:
        h_BLD, aux_list = self.hidden(tokens_BL, cache, start_pos)
        return self.lm_head(h_BLD), aux_list

    def new_cache(
        self,
        batch: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[KVCache]:
        """One empty KVCache per block for `batch` sequences of up to max_len positions
        (default model.max_seq_len), in the model's dtype and on its device by default."""
        w = self.tok_emb.weight
        cfg = self.model_cfg
        return [
            KVCache(
                batch,
                cfg.kv_heads,
                max_len or cfg.max_seq_len,
                cfg.head_dim,
                dtype=dtype or w.dtype,
                device=device or w.device,
            )
            for _ in self.blocks
        ]

    def hidden(
        self,
        tokens_BL: torch.Tensor,
        cache: list[KVCache] | None = None,
        start_pos: int | None = None,
    ) -> tuple[torch.Tensor, list]:
        """With `cache` (from new_cache), tokens_BL continue the cached positions: rotary
        angles start at start_pos (default: the cache's length; 0 without a cache)."""
        L = tokens_BL.shape[1]
        start = self._start(cache, start_pos)
        if start + L > self.model_cfg.max_seq_len:
            where = f"position {start} + " if start else ""
            raise ValueError(
                f"sequence length {where}{L} exceeds model.max_seq_len="
                f"{self.model_cfg.max_seq_len}; raise model.max_seq_len or feed shorter sequences"
            )
        cos_LK, sin_LK = rotary_cos_sin(
            L, self.model_cfg.head_dim, self.model_cfg.rope_theta, tokens_BL.device, start
        )
        x_BLD = self.tok_emb(tokens_BL)
        aux_list = []
        for i, block in enumerate(self.blocks):
            # Token ids go along for routers that route by them (hash layers).
            x_BLD, aux = block(
                x_BLD, cos_LK, sin_LK, tokens_BL, None if cache is None else cache[i]
            )
            if aux is not None:
                aux_list.append(aux)
        return self.norm(x_BLD), aux_list

    def _start(self, cache: list[KVCache] | None, start_pos: int | None) -> int:
        if cache is None:
            return start_pos or 0
        if len(cache) != len(self.blocks):
            raise ValueError(
                f"cache has {len(cache)} layers but the model {len(self.blocks)} blocks; "
                "make it with model.new_cache"
            )
        length = cache[0].length
        if start_pos is not None and start_pos != length:
            raise ValueError(
                f"start_pos={start_pos} but the cache holds {length} positions; the new "
                "tokens must continue the cached ones (start_pos = cache length)"
            )
        return length
