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
        outs = []
        for i, x_rD in enumerate(rows_RD.split(counts_e)):
            w3 = self.w3[i] if self.w3 is not None else None
            # Empty groups still run, so every expert gets a (zero) gradient.
            outs.append(expert_mlp(x_rD, self.w1[i], self.w2[i], w3, self.activation))
        return torch.cat(outs) if outs else rows_RD
