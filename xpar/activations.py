"""The activation table: name -> forward, backward and matrix count, used by every FFN.

The dense MLP, the MoE shared expert, the grouped experts (which do their own backward)
and the cost report all read this one table, so an activation is added in one place.
Gated activations (swiglu) take a second pre-activation h3 = x w3: act(h1, h3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Activation:
    name: str
    # a = forward(h1, h3); h3 is None unless gated
    forward: Callable[[Tensor, Tensor | None], Tensor]
    # (d h1, d h3 or None) = backward(d a, h1, h3)
    backward: Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
    gated: bool = False

    @property
    def matrices(self) -> int:
        """Weight matrices of one FFN: w1, w2 (+ w3 when gated)."""
        return 3 if self.gated else 2


def _swiglu_backward(g: Tensor, h1: Tensor, h3: Tensor | None) -> tuple[Tensor, Tensor]:
    # a = silu(h1) * h3
    return torch.ops.aten.silu_backward(g * h3, h1), g * F.silu(h1)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        # exact erf form, like torch.nn.GELU()
        Activation(
            "gelu",
            lambda h1, h3: F.gelu(h1),
            lambda g, h1, h3: (torch.ops.aten.gelu_backward(g, h1), None),
        ),
        Activation("relu", lambda h1, h3: F.relu(h1), lambda g, h1, h3: (g * (h1 > 0), None)),
        Activation(
            "squared_relu",
            lambda h1, h3: F.relu(h1).square(),
            lambda g, h1, h3: (g * 2 * F.relu(h1), None),
        ),
        Activation("swiglu", lambda h1, h3: F.silu(h1) * h3, _swiglu_backward, gated=True),
    )
}


def get_activation(name: str) -> Activation:
    # Configs are validated against ACTIVATIONS first; a miss here is a bug.
    assert name in ACTIVATIONS, f"unvalidated activation {name!r}"
    return ACTIVATIONS[name]
