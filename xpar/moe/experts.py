"""GroupedExperts: a bank of expert MLPs computed over contiguous row groups.

Experts never know how many ranks exist: they get rows grouped by local expert
and the per-expert counts.

Legend: R routed rows, D model dim, F ffn dim, e local experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h)  # exact erf form, like torch.nn.GELU()
    if activation == "relu":
        return F.relu(h)
    if activation == "squared_relu":
        return F.relu(h).square()
    raise AssertionError(f"unvalidated activation {activation!r}")


def expert_mlp(
    x_RD: torch.Tensor,
    w1_DF: torch.Tensor,
    w2_FD: torch.Tensor,
    w3_DF: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """One expert on its rows; swiglu is silu(x w1) * (x w3)."""
    h_RF = x_RD @ w1_DF
    if activation == "swiglu":
        h_RF = F.silu(h_RF) * (x_RD @ w3_DF)
    else:
        h_RF = activate(h_RF, activation)
    return h_RF @ w2_FD


def _act_fwd(h1, h3, activation):
    if activation == "swiglu":
        return F.silu(h1) * h3
    return activate(h1, activation)


def _act_bwd(grad_a, h1, h3, activation):
    """Gradients w.r.t. the pre-activations h1 (and h3 for swiglu)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_a, h1), None
    if activation == "relu":
        return grad_a * (h1 > 0), None
    if activation == "squared_relu":
        return grad_a * 2 * F.relu(h1), None
    # swiglu: a = silu(h1) * h3
    return torch.ops.aten.silu_backward(grad_a * h3, h1), grad_a * F.silu(h1)


class _GroupedMLP(torch.autograd.Function):
    """All local experts in one autograd node.

    Outputs and weight gradients are written straight into preallocated
    buffers: no per-expert autograd nodes, no cat of outputs, no stack of
    per-expert gradients (which cost as much as the GEMMs on small batches).
    """

    @staticmethod
    def forward(ctx, x_RD, counts_e, activation, w1_eDF, w2_eFD, w3_eDF):
        R, F_ = x_RD.shape[0], w1_eDF.shape[2]
        groups = _row_groups(counts_e)
        h1_RF = x_RD.new_empty(R, F_)
        h3_RF = torch.empty_like(h1_RF) if w3_eDF is not None else None
        for i, sl in groups:
            torch.mm(x_RD[sl], w1_eDF[i], out=h1_RF[sl])
            if h3_RF is not None:
                torch.mm(x_RD[sl], w3_eDF[i], out=h3_RF[sl])
        # Elementwise work once over all rows, not once per expert.
        a_RF = _act_fwd(h1_RF, h3_RF, activation)
        out_RD = x_RD.new_empty(R, w2_eFD.shape[2])
        for i, sl in groups:
            torch.mm(a_RF[sl], w2_eFD[i], out=out_RD[sl])
        ctx.save_for_backward(x_RD, h1_RF, h3_RF, a_RF, w1_eDF, w2_eFD, w3_eDF)
        ctx.counts_e, ctx.activation = counts_e, activation
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD):
        x_RD, h1_RF, h3_RF, a_RF, w1, w2, w3 = ctx.saved_tensors
        groups = _row_groups(ctx.counts_e)
        grad_RD = grad_RD.contiguous()
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gw3 = torch.empty_like(w3) if w3 is not None else None
        # Experts with no rows still get an explicit zero gradient.
        for i, n in enumerate(ctx.counts_e):
            if n == 0:
                for g in (gw1, gw2, gw3):
                    if g is not None:
                        g[i].zero_()
        g_a_RF = torch.empty_like(a_RF)
        for i, sl in groups:
            torch.mm(a_RF[sl].t(), grad_RD[sl], out=gw2[i])
            torch.mm(grad_RD[sl], w2[i].t(), out=g_a_RF[sl])
        g_h1_RF, g_h3_RF = _act_bwd(g_a_RF, h1_RF, h3_RF, ctx.activation)
        # Every row belongs to one expert, so gx is fully written.
        gx_RD = torch.empty_like(x_RD)
        for i, sl in groups:
            x = x_RD[sl]
            torch.mm(x.t(), g_h1_RF[sl], out=gw1[i])
            torch.mm(g_h1_RF[sl], w1[i].t(), out=gx_RD[sl])
            if g_h3_RF is not None:
                torch.mm(x.t(), g_h3_RF[sl], out=gw3[i])
                gx_RD[sl] += g_h3_RF[sl] @ w3[i].t()  # not addmm_: FLOP counters skip it
        return gx_RD, None, None, gw1, gw2, gw3


def _row_groups(counts_e: list[int]) -> list[tuple[int, slice]]:
    """(expert, row slice) for every expert that has rows."""
    out, start = [], 0
    for i, n in enumerate(counts_e):
        if n:
            out.append((i, slice(start, start + n)))
            start += n
    return out


class GroupedExperts(nn.Module):
    """w1_eDF, w2_eFD (+ w3_eDF for swiglu), no biases.

    Built with all `num_experts` initialised from the current RNG state and then
    sliced to [first, first + num_local), so an expert's initial weights do not
    depend on how the bank is sharded.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str,
        first: int = 0,
        num_local: int | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        num_local = num_experts if num_local is None else num_local
        self.activation = activation
        self.num_local = num_local
        self.first = first
        sl = slice(first, first + num_local)

        def make(*shape: int) -> nn.Parameter:
            full = torch.empty(num_experts, *shape)
            nn.init.normal_(full, std=init_std)
            p = nn.Parameter(full[sl].clone())
            p.xpar_expert = True  # the parallel code reduces these over the expert-DP group
            return p

        self.w1 = make(d_model, d_ff)
        self.w2 = make(d_ff, d_model)
        self.w3 = make(d_model, d_ff) if activation == "swiglu" else None

    def forward(self, rows_RD: torch.Tensor, counts_e: list[int]) -> torch.Tensor:
        """rows_RD are grouped by local expert; counts_e[i] rows belong to expert i."""
        assert len(counts_e) == self.num_local and sum(counts_e) == rows_RD.shape[0]
        # Experts with no rows still get a (zero) gradient, so every rank reduces the same set.
        return _GroupedMLP.apply(
            rows_RD.contiguous(), list(counts_e), self.activation, self.w1, self.w2, self.w3
        )
