"""global_grad_norm and clip_grad_norm_ on real gloo ranks (EP=2 x DP=2), no DeepSpeed.

Each rank reduces its toy-model gradients as the engine does (dense over all ranks,
experts over their expert-DP group); the norm must then equal the norm of one process
holding every expert and seeing every rank's data, with each expert counted once.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
from parallel_toy import CLIP, E, Toy, batch, battery, part
from torch import nn

from xpar.parallel.grad_norm import clip_grad_norm_, global_grad_norm, is_expert_param
from xpar.testing import run_distributed

WORLD = 4


def _reference_grads(world: int, ep_size: int) -> nn.Module:
    model = Toy(0, E)
    for r in range(world):
        (model(batch(r, ep_size, 0, 0)) / world).backward()
    return model


def _reduced_rank_grads(rank: int, world: int, groups) -> nn.Module:
    n_local = E // groups.ep_size
    model = Toy(groups.ep_rank * n_local, n_local)
    (model(batch(rank, groups.ep_size, 0, 0)) / world).backward()
    for p in model.parameters():
        group = groups.expert_dp_group if is_expert_param(p) else groups.dp_group
        dist.all_reduce(p.grad, group=group)
    return model


def _norm_part(rank, world, groups, grad_accum, root):
    ref = _reference_grads(world, groups.ep_size)
    ref_norm = float(nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    model = _reduced_rank_grads(rank, world, groups)
    out = {"ref": ref_norm, "ours": global_grad_norm(model, groups).item()}
    # what DeepSpeed's fp32 clip does: the mean of per-rank norms over all ranks
    local_sq = torch.tensor(sum(p.grad.double().square().sum().item() for p in model.parameters()))
    dist.all_reduce(local_sq)
    out["averaged"] = (local_sq / world).sqrt().item()

    pre = clip_grad_norm_(list(model.parameters()), CLIP, groups).item()
    coef = CLIP / (ref_norm + 1e-6)
    n_local = E // groups.ep_size
    sl = slice(groups.ep_rank * n_local, (groups.ep_rank + 1) * n_local)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    out["clip"] = {
        "pre": pre,
        "post": global_grad_norm(model, groups).item(),
        "grad_diff": max(
            (p.grad - coef * ref_grads[n][sl if is_expert_param(p) else slice(None)])
            .abs()
            .max()
            .item()
            for n, p in model.named_parameters()
        ),
    }
    out["no_grads"] = global_grad_norm([nn.Parameter(torch.ones(3))], groups).item()
    out["device"] = str(groups.device)
    out["deepspeed_imported"] = "deepspeed" in sys.modules
    return out


@pytest.fixture(scope="module")
def world4():
    return run_distributed(battery, WORLD, {"norm": _norm_part}, 1, "", timeout=300)


def test_norm_counts_each_expert_once(world4):
    for rank, o in enumerate(part(world4, "norm")):
        assert o["ours"] == pytest.approx(o["ref"], rel=1e-6), rank
        # averaging per-rank norms (ranks hold different experts) misses the reference
        assert abs(o["averaged"] - o["ref"]) > 1e-3 * o["ref"], rank


def test_clip_scales_to_max_norm_like_deepspeeds_zero_clip(world4):
    for rank, o in enumerate(part(world4, "norm")):
        c = o["clip"]
        assert o["ref"] > CLIP, "clipping must be active for this test to bite"
        assert c["pre"] == pytest.approx(o["ref"], rel=1e-6), rank
        assert c["post"] == pytest.approx(CLIP, rel=1e-5), rank
        assert c["grad_diff"] < 1e-6, rank


def test_gloo_ranks_compute_on_cpu_without_deepspeed(world4):
    for o in part(world4, "norm"):
        assert o["no_grads"] == 0.0
        assert o["device"] == "cpu"
        assert o["deepspeed_imported"] is False


def test_is_expert_param():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    p.xpar_expert = True
    assert is_expert_param(p) and not is_expert_param(q)
