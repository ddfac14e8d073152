"""GroupedExperts: a bank of expert MLPs computed over contiguous row groups.

Experts never know how many ranks exist: they get rows grouped by local expert
and the per-expert counts.

Legend: R routed rows, D model dim, F ffn dim, E experts, e local experts.
"""

from __future__ import annotations

import torch
from torch import nn

from xpar.activations import get_activation
from xpar.errors import XparConfigError


def local_experts(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global ids of the experts that EP rank `ep_rank` of `ep_size` holds: a contiguous slice.

    The one statement of the expert layout; dispatch, init and the process groups use it.
    """
    if num_experts % ep_size:
        raise XparConfigError(
            f"moe.num_experts={num_experts} is not divisible by parallel.ep_size={ep_size}; "
            f"choose an ep_size that divides {num_experts}"
        )
    n_local = num_experts // ep_size
    return range(ep_rank * n_local, (ep_rank + 1) * n_local)


def expert_mlp(
    x_RD: torch.Tensor,
    w1_DF: torch.Tensor,
    w2_FD: torch.Tensor,
    w3_DF: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """One expert on its rows; swiglu is silu(x w1) * (x w3)."""
    h3_RF = x_RD @ w3_DF if w3_DF is not None else None
    return get_activation(activation).forward(x_RD @ w1_DF, h3_RF) @ w2_FD


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
        a_RF = get_activation(activation).forward(h1_RF, h3_RF)
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
        g_h1_RF, g_h3_RF = get_activation(ctx.activation).backward(g_a_RF, h1_RF, h3_RF)
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
    """w1_eDF, w2_eFD (+ w3_eDF for gated activations), no biases.

    Holds the experts `ids` (see `local_experts`; default: all of them). Every draw is of
    the whole bank, sliced afterwards, so an expert's initial weights (and the RNG
    stream after them) do not depend on how the bank is sharded.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str,
        ids: range | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.ids = range(num_experts) if ids is None else ids  # global ids of these experts
        self.num_local = len(self.ids)
        self.activation = activation
        self.w1 = self._bank(d_model, d_ff, init_std)
        self.w2 = self._bank(d_ff, d_model, init_std)
        self.w3 = self._bank(d_model, d_ff, init_std) if get_activation(activation).gated else None
        for p in self.parameters():
            p.xpar_expert = True  # the parallel code reduces these over the expert-DP group

    @property
    def first(self) -> int:
        return self.ids.start

    def _draw(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        full_EXY = torch.empty(self.num_experts, *shape)
        nn.init.normal_(full_EXY, std=std)
        return full_EXY[self.ids.start : self.ids.stop]

    def _bank(self, rows: int, cols: int, std: float) -> nn.Parameter:
        return nn.Parameter(self._draw((rows, cols), std).clone())

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Input banks (w1, w3) at std, the output bank (w2) at out_std, in that order."""
        for w_eXY, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            if w_eXY is not None:
                w_eXY.copy_(self._draw(tuple(w_eXY.shape[1:]), s).to(w_eXY))

    def forward(self, rows_RD: torch.Tensor, counts_e: list[int]) -> torch.Tensor:
        """rows_RD are grouped by local expert; counts_e[i] rows belong to expert i."""
        assert len(counts_e) == self.num_local and sum(counts_e) == rows_RD.shape[0]
        # Experts with no rows still get a (zero) gradient, so every rank reduces the same set.
        return _GroupedMLP.apply(
            rows_RD.contiguous(), list(counts_e), self.activation, self.w1, self.w2, self.w3
        )
