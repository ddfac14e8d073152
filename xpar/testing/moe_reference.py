"""A naive per-token MoE written independently of xpar.moe's sort-based code.

The routing comes from each router's own `naive_route` (a token-by-token loop written
beside its vectorised forward); experts run one token at a time. Slow, obvious, and used
only to check the real layer (forward values and, through autograd, every gradient).
"""

from __future__ import annotations

import torch

from xpar.moe.experts import expert_mlp
from xpar.moe.layer import MoELayer


def naive_moe(
    layer: MoELayer,
    x_TD: torch.Tensor,
    capacity_factor: float | None,
    token_ids_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Returns (y_TD, weighted aux loss, kept (token, expert) pairs) for a one-process layer."""
    cfg, ex = layer.cfg, layer.experts
    assert ex.num_local == cfg.num_experts, "the reference needs every expert in this process"
    T, D = x_TD.shape
    kept, lb = layer.router.naive_route(x_TD, capacity_factor, token_ids_T)

    def mlp(e: int, t: int) -> torch.Tensor:
        w3 = ex.w3[e] if ex.w3 is not None else None
        return expert_mlp(x_TD[t : t + 1], ex.w1[e], ex.w2[e], w3, cfg.activation)[0]

    rows = [x_TD.new_zeros(D) for _ in range(T)]
    for t, e, w in kept:
        rows[t] = rows[t] + w * mlp(e, t)
    if layer.shared_expert is not None:
        rows = [r + layer.shared_expert(x_TD[t : t + 1])[0] for t, r in enumerate(rows)]
    z = layer.router.naive_z_loss(x_TD)
    y_TD = torch.stack(rows) if T else x_TD.new_zeros(0, D)
    aux = cfg.aux_loss_weight * lb + cfg.z_loss_weight * z
    return y_TD, aux, [(t, e) for t, e, _ in kept]
