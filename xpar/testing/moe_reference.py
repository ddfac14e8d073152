"""A naive per-token MoE written independently of xpar.moe's sort-based code.

The routing comes from each router's own `naive_route` (a token-by-token loop written
beside its vectorised forward); experts run one row at a time. Token choice: each kept
(token, expert, weight) adds weight * expert(token). Soft routing (a `SlotRoute`): each
slot's input is built token by token, each expert runs on its slots one at a time, and each
token mixes its slots' outputs with its combine weights. Slow, obvious, and used only to
check the real layer (forward values and, through autograd, every gradient).
"""

from __future__ import annotations

import torch

from xpar.moe.experts import expert_mlp
from xpar.moe.layer import MoELayer
from xpar.moe.routers.soft import SlotRoute


def naive_moe(
    layer: MoELayer,
    x_TD: torch.Tensor,
    capacity_factor: float | None,
    token_ids_T: torch.Tensor | None = None,
    seq_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Returns (y_TD, weighted aux loss, kept pairs) for a one-process layer: (token, expert)
    for token choice, (slot, expert) for soft routing. x_TD is sequence-major with seq_len
    tokens per sequence (0: no sequences), as MoELayer sees a [B, L, D] input."""
    cfg, ex = layer.cfg, layer.experts
    assert ex.num_local == cfg.num_experts, "the reference needs every expert in this process"
    T, D = x_TD.shape
    kept, lb = layer.router.naive_route(x_TD, capacity_factor, token_ids_T, seq_len)

    def mlp(e: int, row_D: torch.Tensor) -> torch.Tensor:
        w3 = ex.w3[e] if ex.w3 is not None else None
        return expert_mlp(row_D.unsqueeze(0), ex.w1[e], ex.w2[e], w3, cfg.activation)[0]

    rows = [x_TD.new_zeros(D) for _ in range(T)]
    if isinstance(kept, SlotRoute):
        outs = [mlp(e, u.to(x_TD.dtype)) for e, u in zip(kept.experts, kept.inputs, strict=True)]
        for t in range(T):
            for n, w in kept.combine[t]:
                rows[t] = rows[t] + w * outs[n]
        pairs = list(enumerate(kept.experts))
    else:
        for t, e, w in kept:
            rows[t] = rows[t] + w * mlp(e, x_TD[t])
        pairs = [(t, e) for t, e, _ in kept]
    if layer.shared_expert is not None:
        rows = [r + layer.shared_expert(x_TD[t : t + 1])[0] for t, r in enumerate(rows)]
    z = layer.router.naive_z_loss(x_TD)
    y_TD = torch.stack(rows) if T else x_TD.new_zeros(0, D)
    aux = cfg.aux_loss_weight * lb + cfg.z_loss_weight * z
    return y_TD, aux, pairs
