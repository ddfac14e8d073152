"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along the sequence to `proj_len` rows by learned matrices
E, F of shape [proj_len, max_len] (one of each per layer, shared by every head, the paper's
headwise-shared default): K' = E[:, :L] K, V' = F[:, :L] V; then dense softmax attention of
the L queries over those proj_len rows. O(L proj_len) time and memory. Every projected row
mixes all positions, so it cannot be causal (model.causal=true is refused by `check`).

max_len fixes the shape of E and F; conf/attention/linformer.yaml sets it to
${model.max_seq_len}. (The kernel is built as cls(n_heads, head_dim, options), so the
length has to come in through the options.)

Init: E, F ~ normal(0, 1/sqrt(max_len)). A projected row is a sum of L rows with weights of
variance 1/max_len, so at L = max_len it has the variance of one key (or value) and the
scores keep the 1/sqrt(K) scale of dense attention; the fairseq reference's xavier init
(gain 1/sqrt(2) on a max_len -> proj_len linear) has about the same std, 1/sqrt(max_len +
proj_len). A std of 1/proj_len-ish would instead scale the projected rows by sqrt(L /
proj_len) (8x at L=16k, proj_len=256) and saturate the softmax.

Shape suffixes: B batch, H heads, L sequence, P projected length, M max_len, K head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xpar.config.checks import bad, need_int
from xpar.models.attention import Attention, register


@dataclass
class LinformerOptions:
    proj_len: int = 128  # rows keys and values are projected to (the paper's k)
    # Columns of E and F: the longest sequence; set to model.max_seq_len by the config file.
    max_len: int = 0

    def validate(self, prefix: str) -> None:
        need_int(prefix, self, "proj_len", 1, "use an integer >= 1, e.g. 128 or 256")
        need_int(
            prefix,
            self,
            "max_len",
            1,
            "set it to model.max_seq_len (attention=linformer writes max_len: "
            "${model.max_seq_len})",
        )


class _SeqProject(torch.autograd.Function):
    """M x per head: [P, L] @ [B, H, L, K] -> [B, H, P, K], saving only x (alive anyway).

    Autograd's matmul would keep a contiguous [B H K, L] copy of x for the gradient of M
    (the size of k or v again); here that gradient is summed head by head from x's own
    [L, K] slices, so nothing of size L is kept. Every product is a GEMM per head with M
    broadcast (stride 0, not copied)."""

    @staticmethod
    def forward(ctx, m_PL, x_BHLK):
        ctx.save_for_backward(m_PL, x_BHLK)
        B, H, L, K = x_BHLK.shape
        # bmm with M broadcast (m @ x would copy x transposed, to fold it into one GEMM)
        y_GPK = torch.bmm(m_PL.expand(B * H, -1, -1), x_BHLK.reshape(B * H, L, K))
        return y_GPK.view(B, H, -1, K)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_BHPK):
        m_PL, x_BHLK = ctx.saved_tensors
        dx_BHLK = None
        if ctx.needs_input_grad[1]:
            # One GEMM per head (M broadcast, not copied): a contiguous [B, H, L, K], where
            # m.t() @ dy would give a transposed layout that a leaf's grad copies once more.
            B, H, P, K = dy_BHPK.shape
            mt_GLP = m_PL.t().expand(B * H, -1, -1)
            dx_BHLK = torch.bmm(mt_GLP, dy_BHPK.reshape(B * H, P, K)).view(B, H, -1, K)
        dm_PL = None
        if ctx.needs_input_grad[0]:
            dm_PL = torch.zeros_like(m_PL)
            for b in range(x_BHLK.shape[0]):  # B * H GEMMs of [P, K] @ [K, L]
                for h in range(x_BHLK.shape[1]):
                    dm_PL.addmm_(dy_BHPK[b, h], x_BHLK[b, h].t())
        return dm_PL, dx_BHLK


@register
class LinformerAttention(Attention):
    name = "linformer"
    causal_ok = False
    exact = False
    Options = LinformerOptions

    def __init__(self, n_heads: int, head_dim: int, options: LinformerOptions) -> None:
        super().__init__(n_heads, head_dim, options)
        std = 1.0 / math.sqrt(options.max_len)
        # Drawn from the global RNG at construction: the model's seed fixes them, and the
        # draws do not depend on the EP layout (expert banks are drawn whole).
        self.E_PM = nn.Parameter(torch.randn(options.proj_len, options.max_len) * std)
        self.F_PM = nn.Parameter(torch.randn(options.proj_len, options.max_len) * std)

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        L, M = k_BHLK.shape[-2], self.options.max_len
        if causal:
            raise ValueError("linformer attention cannot be causal: use it with causal=False")
        if L > M:
            raise ValueError(
                f"a sequence of {L} tokens is longer than linformer's max_len={M} (the width "
                "of its projections); keep sequences <= model.max_seq_len"
            )
        k_BHPK = _SeqProject.apply(self.E_PM[:, :L].to(k_BHLK.dtype), k_BHLK)
        v_BHPK = _SeqProject.apply(self.F_PM[:, :L].to(v_BHLK.dtype), v_BHLK)
        return F.scaled_dot_product_attention(q_BHLK, k_BHPK, v_BHPK)

    @classmethod
    def check(cls, model_cfg, prefix: str) -> None:
        if model_cfg.causal:
            raise bad(
                prefix,
                "attention",
                cls.name,
                f"linformer is not causal (each projected key mixes every position, the "
                f"future too) but {prefix}.causal=True; set {prefix}.causal=false (a "
                "bidirectional encoder) or use a causal attention such as attention=dense",
            )
        opts = model_cfg.attention_opts(prefix)
        where, n = f"{prefix}.attention_options", model_cfg.max_seq_len
        if opts.proj_len > n:
            raise bad(
                where,
                "proj_len",
                opts.proj_len,
                f"it must be <= {prefix}.max_seq_len={n} (projecting to more rows than "
                "tokens adds nothing); lower proj_len",
            )
        if opts.max_len < n:
            raise bad(
                where,
                "max_len",
                opts.max_len,
                f"E and F must cover {prefix}.max_seq_len={n} positions; set max_len to "
                f"{n} (attention=linformer writes ${{{prefix}.max_seq_len}})",
            )

    @classmethod
    def num_params(cls, n_heads: int, head_dim: int, options: LinformerOptions) -> int:
        return 2 * options.proj_len * options.max_len  # E and F

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: LinformerOptions) -> float:
        # E K and F V (2 P D per token each), then QK'^T and AV' over P rows (2 P D each).
        return 4 * 2 * options.proj_len * d_model

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: LinformerOptions) -> float:
        return n_heads * options.proj_len
