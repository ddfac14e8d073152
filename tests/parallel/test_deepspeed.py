"""Real DeepSpeed engines on real gloo ranks against a single-process reference.

Toy model: a dense part (embedding, gain, head) and an expert bank [E_local, D, D]
(+ a no-decay expert bias). Token t goes to expert t % E; each rank draws tokens
only for its own experts, so no all-to-all is needed and a single process holding
all experts and seeing all ranks' data computes the exact reference:
    loss = mean over ranks and micro steps of the rank losses.
If DeepSpeed averaged expert gradients over the wrong ranks, expert params would
leave the reference (the unmarked control below shows that it does).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from parallel_toy import (
    CLIP,
    LR,
    STEPS,
    TOL,
    WD,
    B,
    E,
    Toy,
    batch,
    build_engine,
    lr_lambda,
    param_diff,
    reference,
    train,
)

from xpar.testing import run_distributed


def _parity(rank, world, ep_size, grad_accum, stages):
    from xpar.parallel.groups import init_parallel

    groups = init_parallel(ep_size=ep_size, backend="gloo")
    ref, ref_losses, ref_norms = reference(world, ep_size, grad_accum, STEPS)
    out = {"ref_losses": [ls[rank] for ls in ref_losses], "ref_norms": ref_norms}
    for stage in stages:
        engine = build_engine(groups, stage, grad_accum)
        losses, norms = train(engine, groups, range(STEPS), grad_accum)
        out[stage] = {
            "losses": losses,
            "norms": norms,
            "diff": param_diff(engine, ref, groups),
            "lr": engine.get_lr()[0],
        }
    out["ref_lr"] = LR * lr_lambda(STEPS)
    return out


@functools.cache
def parity_results(world: int, ep_size: int, grad_accum: int):
    return run_distributed(_parity, world, ep_size, grad_accum, (0, 1, 2), timeout=600)


CASES = [(2, 2, 1), (4, 2, 2)]  # (world, ep_size, grad_accum): EP=2, and EP=2 x DP=2 with accum


@pytest.mark.parametrize("world,ep_size,grad_accum", CASES)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_params_match_single_process_reference(world, ep_size, grad_accum, stage):
    for rank, res in enumerate(parity_results(world, ep_size, grad_accum)):
        diff = res[stage]["diff"]
        assert set(diff) == {"embed.weight", "gain", "head.weight", "head.bias", "experts",
                             "expert_bias"}  # fmt: skip
        bad = {k: v for k, v in diff.items() if not v < TOL}
        assert not bad, f"rank {rank} ZeRO-{stage}: params left the reference: {bad}"
        assert res[stage]["lr"] == pytest.approx(res["ref_lr"], rel=1e-12)


@pytest.mark.parametrize("world,ep_size,grad_accum", CASES)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_clipping_norm_is_the_true_global_norm(world, ep_size, grad_accum, stage):
    results = parity_results(world, ep_size, grad_accum)
    ref_norms = results[0]["ref_norms"]
    assert all(n > CLIP for n in ref_norms), "clipping must be active for this test to bite"
    for rank, res in enumerate(results):
        assert res[stage]["norms"] == pytest.approx(ref_norms, rel=1e-5, abs=0), (rank, stage)


@pytest.mark.parametrize("world,ep_size,grad_accum", CASES)
def test_zero_stages_give_the_same_losses(world, ep_size, grad_accum):
    for rank, res in enumerate(parity_results(world, ep_size, grad_accum)):
        assert res[0]["losses"] == pytest.approx(res["ref_losses"], abs=1e-6)
        for stage in (1, 2):
            assert res[stage]["losses"] == pytest.approx(res[0]["losses"], abs=1e-6), (rank, stage)


# ------------------------------------------------------------------ the trap, shown


def _unmarked(rank, world, flag):
    """ZeRO-1 with expert params flagged (allreduce=False) but no MoE module for
    DeepSpeed to find: has_moe_layers stays False and experts are reduced and
    partitioned over all ranks. Also DeepSpeed's own fp32 clip norm (ZeRO-0)."""
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_

    from xpar.parallel.deepspeed import (
        build_ds_config,
        global_grad_norm,
        mark_expert_params,
        optimizer_param_groups,
        register_groups,
    )
    from xpar.parallel.groups import init_parallel

    groups = init_parallel(ep_size=world, backend="gloo")
    ref, _, _ = reference(world, world, 1, STEPS)
    register_groups(groups)
    model = Toy(groups.ep_rank * (E // world), E // world)
    if flag:
        mark_expert_params(model, groups)
    else:  # plain params: DeepSpeed treats the expert bank as dense
        del model.experts.xpar_expert, model.expert_bias.xpar_expert
    opt = torch.optim.AdamW(
        optimizer_param_groups(model, groups.expert_group_name, WD), lr=LR, betas=(0.9, 0.95)
    )
    cfg = build_ds_config(zero_stage=1, micro_batch_size=B, grad_clip=CLIP, precision="fp32")
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, config=cfg, dist_init_required=False,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )  # fmt: skip
    has_moe = engine.has_moe_layers
    train(engine, groups, range(STEPS), 1)
    diff = param_diff(engine, ref, groups)

    # DeepSpeed's fp32 (non-ZeRO) clip norm vs ours, on the same reduced gradients
    engine0 = build_engine(groups, 0, 1)
    loss = engine0(batch(rank, world, 0, 0))
    engine0.backward(loss)  # gradients are all-reduced here (boundary)
    ours = global_grad_norm(engine0.module, groups).item()
    theirs = float(clip_grad_norm_(list(engine0.module.parameters()), max_norm=math.inf))
    return has_moe, diff, ours, theirs


def test_without_the_marker_experts_are_averaged_wrongly_and_ds_fp32_norm_is_wrong():
    _, _, ref_norms = reference(2, 2, 1, 1)
    for rank, (has_moe, diff, ours, theirs) in enumerate(run_distributed(_unmarked, 2, False)):
        assert has_moe is False
        assert diff["experts"] > 1e-3, f"rank {rank}: the control should leave the reference"
        assert ours == pytest.approx(ref_norms[0], rel=1e-5)
        # DeepSpeed averages per-rank norms that each see only their own experts
        assert abs(theirs - ref_norms[0]) > 1e-3 * ref_norms[0]
