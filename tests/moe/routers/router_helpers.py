"""A router with uneven weights, so capacity bites (shared by the router tests)."""

import torch

from xpar.moe.config import MoEConfig
from xpar.moe.routers import get_router


def make_router(E, K, D=8, seed=0, policy="probs", renormalize=True, router="topk", cf=1.0):
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        d_ff=4,
        router=router,
        drop_policy=policy,
        renormalize=renormalize,
        capacity_factor=cf,
    )
    r = get_router(router)(D, cfg)
    # Larger weights make routing uneven, so capacity actually bites.
    with torch.no_grad():
        r.weight.normal_(0, 1.0)
    return r
