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
from xpar.moe.expert_gemm import ExpertMLP, How, resolve_gemm


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


class GroupedExperts(nn.Module):
    """w1_eDF, w2_eFD (+ w3_eDF for gated activations), no biases.

    Holds the experts `ids` (see `local_experts`; default: all of them). Every draw is of
    the whole bank, sliced afterwards, so an expert's initial weights (and the RNG
    stream after them) do not depend on how the bank is sharded.
    gemm: how the GEMMs run (moe.expert_gemm: auto, loop, grouped, padded; see
    xpar.moe.expert_gemm). recompute: keep only the input rows for backward and redo the
    hidden activations there (moe.recompute=experts).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str,
        ids: range | None = None,
        init_std: float = 0.02,
        gemm: str = "auto",
        recompute: bool = False,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.ids = range(num_experts) if ids is None else ids  # global ids of these experts
        self.num_local = len(self.ids)
        self.activation = activation
        self.gemm, self.recompute = gemm, recompute
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
        x_RD = rows_RD.contiguous()
        w1 = self.w1
        gemm = resolve_gemm(
            self.gemm,
            self.num_local,
            x_RD.shape[0],
            w1.shape[1],
            w1.shape[2],
            x_RD.device,
            x_RD.dtype,
        )
        how = How(self.activation, gemm, self.recompute)
        return ExpertMLP.apply(x_RD, list(counts_e), how, w1, self.w2, self.w3)
