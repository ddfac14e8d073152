"""The global gradient norm over expert-sharded params, each expert counted once.

Dense params are replicated, so their (already reduced) gradients are the same on
every rank and count once. The ranks of an EP group hold disjoint experts that
together cover all of them, so the expert squares are summed over the EP group.
Averaging per-rank norms instead (DeepSpeed's fp32 `clip_grad_norm_`) is wrong as
soon as ranks hold different experts. torch.distributed only: no deepspeed here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from xpar.parallel.groups import ParallelGroups
from xpar.parallel.watchdog import collective

_EXPERT_NORM = collective("all_reduce (expert gradient norm over the EP group)")


def is_expert_param(p: torch.Tensor) -> bool:
    """Expert params carry `xpar_expert=True` (set by the MoE experts module)."""
    return bool(getattr(p, "xpar_expert", False))


def global_grad_norm(
    params: nn.Module | Iterable[torch.Tensor], groups: ParallelGroups
) -> torch.Tensor:
    """L2 norm of all gradients with each expert counted once (a collective over the EP group).

    For gradients already reduced (dense identical on every rank, expert identical
    across an expert-DP group): dense counted once, expert squares summed over the
    EP group, whose ranks hold disjoint experts covering all of them.
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    dense_sq = expert_sq = None
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().to(torch.float64).square().sum()
        if is_expert_param(p):
            expert_sq = sq if expert_sq is None else expert_sq + sq
        else:
            dense_sq = sq if dense_sq is None else dense_sq + sq
    device = groups.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    dense_sq = zero if dense_sq is None else dense_sq
    expert_sq = (zero.clone() if expert_sq is None else expert_sq).to(device)
    if groups.ep_size > 1:
        with _EXPERT_NORM:
            dist.all_reduce(expert_sq, group=groups.ep_group)
    return (dense_sq.to(device) + expert_sq).sqrt().to(torch.float32)


def clip_grad_norm_(
    params: Sequence[torch.Tensor], max_norm: float, groups: ParallelGroups
) -> torch.Tensor:
    """Scale the gradients so their global norm is at most max_norm; returns the pre-clip norm.

    Collective over the EP group. The coefficient has the form of DeepSpeed's ZeRO clip
    (max_norm / (norm + 1e-6), applied only when below 1), so ZeRO-0 and ZeRO 1/2 clip alike.
    """
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, groups)
    coef = max_norm / (norm.item() + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return norm
