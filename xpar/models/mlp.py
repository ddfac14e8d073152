"""The dense FFN: w2(act(w1 x)), or w2(act(w1 x, w3 x)) for gated activations.

Dense blocks use it, and so does the MoE layer's shared expert (one MLP, one init).
"""

from __future__ import annotations

import torch
from torch import nn

from xpar.activations import get_activation


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.act = get_activation(activation)
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if self.act.gated else None

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        for w, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            if w is not None:
                nn.init.normal_(w.weight, std=s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h3 = self.w3(x) if self.w3 is not None else None
        return self.w2(self.act.forward(self.w1(x), h3))
