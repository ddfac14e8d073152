"""A naive per-token MoE written independently of xpar.moe's sort-based code.

Loops over tokens and choices in Python; slow, obvious, and used only to check
the real layer (forward values and, through autograd, every gradient).
"""

from __future__ import annotations

import math

import torch

from xpar.moe.config import MoEConfig
from xpar.moe.experts import expert_mlp


def naive_moe(
    x_TD: torch.Tensor,
    router_w_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    w3_EDF: torch.Tensor | None,
    cfg: MoEConfig,
    capacity_factor: float | None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Returns (y_TD, weighted aux loss, kept (token, expert) pairs)."""
    T, D = x_TD.shape
    E, K = cfg.num_experts, cfg.top_k
    logits_TE = x_TD.float() @ router_w_ED.float().t()
    probs_TE = torch.softmax(logits_TE, dim=-1)

    def mlp(e: int, t: int) -> torch.Tensor:
        w3 = w3_EDF[e] if w3_EDF is not None else None
        return expert_mlp(x_TD[t : t + 1], w1_EDF[e], w2_EFD[e], w3, cfg.activation)[0]

    rows = [x_TD.new_zeros(D) for _ in range(T)]
    kept: list[tuple[int, int]] = []
    if cfg.router == "topk":
        top_p, top_e = probs_TE.topk(K, dim=-1)
        w = top_p / top_p.sum(-1, keepdim=True) if (K > 1 and cfg.renormalize) else top_p
        cap = math.inf if capacity_factor is None else math.ceil(capacity_factor * K * T / E)
        load = [0] * E
        for k in range(K):
            order = list(range(T))
            if cfg.drop_policy == "probs":
                order = sorted(order, key=lambda t: -w[t, k].item())
            for t in order:
                e = int(top_e[t, k])
                if load[e] < cap:
                    load[e] += 1
                    kept.append((t, e))
                    rows[t] = rows[t] + w[t, k] * mlp(e, t)
        lb = x_TD.new_zeros((), dtype=torch.float32)
        for i in range(E):
            f_i = sum(1 for t in range(T) for k in range(K) if int(top_e[t, k]) == i) / max(
                T * K, 1
            )
            lb = lb + f_i * probs_TE[:, i].mean()
        lb = E * lb
    else:
        C = min(math.ceil(capacity_factor * T / E), T)
        for e in range(E):
            for t in probs_TE[:, e].topk(C).indices.tolist():
                kept.append((t, e))
                rows[t] = rows[t] + probs_TE[t, e] * mlp(e, t)
        lb = logits_TE.sum() * 0.0
    z = torch.stack([torch.logsumexp(logits_TE[t], 0) ** 2 for t in range(T)]).mean()
    y_TD = torch.stack(rows) if T else x_TD.new_zeros(0, D)
    return y_TD, cfg.aux_loss_weight * lb + cfg.z_loss_weight * z, kept
