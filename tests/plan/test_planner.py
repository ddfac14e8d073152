"""xpar plan against measurement and the published models.

Measured on real gloo ranks from the trainer's own build (xpar.train.trainer.build_run: data,
groups, model, DeepSpeed engine) and one optimizer step (xpar.train.step.train_step):
- parameter bytes per rank (the module's params, and DeepSpeed's padded flat buffers) and
  optimizer bytes per rank (ZeRO 1/2: the fp32 partitions + exp_avg + exp_avg_sq; ZeRO 0:
  AdamW's exp_avg + exp_avg_sq) equal the planner's exactly;
- activation bytes: xpar.bench.memory.peak_bytes of one forward + backward of the model (built
  as the trainer builds it, on the run's EP group) on one micro-batch, minus the bytes of the
  parameter gradients that backward makes, within 15% of the planner's;
- all-to-all: the dispatchers' Traffic.bytes_sent of that forward equals the planner's
  capacity bound (capacity routing with every expert full, capacity_factor 0.25).
"""

from __future__ import annotations

import contextlib

import pytest

from xpar.config.check import check
from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.plan.cli import compose_for_plan, main
from xpar.plan.estimate import Cluster, estimate
from xpar.testing import run_distributed

# (world size, overrides): 2 and 4 ranks, EP 2 and 4, ZeRO 0/1/2, capacity routing (full).
SMALL = {
    "ep2_zero1": (2, ["parallel.ep_size=2", "parallel.zero_stage=1"]),
    "dp2ep2_zero2": (4, ["parallel.ep_size=2", "parallel.zero_stage=2"]),
    "ep4_zero0_e8": (4, ["parallel.ep_size=4", "parallel.zero_stage=0", "moe.num_experts=8"]),
}
BASE = ["experiment=tiny", "moe.capacity_factor=0.25", "logger.wandb_mode=disabled"]


def _overrides(name: str, out_dir: str) -> tuple[int, list[str]]:
    world, extra = SMALL[name]
    return world, [*BASE, *extra, f"train.out_dir={out_dir}/{name}"]


def _measure(rank, world, overrides):
    import torch

    from xpar.bench.memory import peak_bytes
    from xpar.models import MoETransformer
    from xpar.train import resume, trainer
    from xpar.train.objective import lm_loss
    from xpar.train.step import train_step

    cfg = compose_config(overrides, world_size=world, cuda_available=False)
    out = {}
    with contextlib.ExitStack() as cleanup:
        run = trainer.build_run(cfg, cleanup, resume.plan_start(cfg))
        run.step = 1
        train_step(run)  # AdamW makes its moments at the first step
        e = run.engine.raw
        params = list(e.module.parameters())
        out["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
        if e.zero_optimization():
            opt = e.optimizer
            flats = opt.single_partition_of_fp32_groups
            states = [opt.optimizer.state[f] for f in flats]
            out["flat_param_bytes"] = sum(
                t.numel() * t.element_size() for t in opt.bit16_groups_flat
            )
        else:
            flats = []
            states = [e.optimizer.state[p] for p in params]
            out["flat_param_bytes"] = out["param_bytes"]
        tensors = flats + [s[k] for s in states for k in ("exp_avg", "exp_avg_sq")]
        out["optimizer_bytes"] = sum(t.numel() * t.element_size() for t in tensors)

        torch.manual_seed(cfg.train.seed)
        model = MoETransformer(run.model_cfg, cfg.moe, ep_group=run.groups.ep_group).train()
        x, y = run.data.train.next_batch()

        def step():
            logits, auxes = model(x)
            (lm_loss(logits, y) + sum(a.loss for a in auxes)).backward()

        peak = peak_bytes(step)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        out["activation_bytes"] = peak - grads
        layers = [m for m in model.modules() if hasattr(m, "dispatcher")]
        out["a2a_bytes"] = sum(m.dispatcher.traffic.bytes_sent for m in layers)
    return out


def _planned(world: int, overrides: list[str]):
    cfg = compose_config(overrides, world_size=world, cuda_available=False)
    return estimate(cfg, Cluster(gpus=world, nodes=1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_plan_equals_measurement(name, tmp_path):
    world, overrides = _overrides(name, str(tmp_path))
    measured = run_distributed(_measure, world, overrides, timeout=600)
    plan = _planned(world, overrides)
    z = plan.zero[plan.stage]
    act = plan.activation(plan.micro_batch, "none").total
    rows = []
    for rank, m in enumerate(measured):
        assert m["param_bytes"] == z.param_bytes, (rank, m)
        assert m["flat_param_bytes"] == z.flat_param_bytes, (rank, m)
        assert m["optimizer_bytes"] == z.optimizer_bytes, (rank, m)
        assert m["a2a_bytes"] == plan.all_to_all.dispatch_bytes, (rank, m)
        err = (act - m["activation_bytes"]) / m["activation_bytes"]
        rows.append(f"rank {rank}: activation planned {act} measured {m['activation_bytes']} "
                    f"({err:+.1%})")  # fmt: skip
        assert abs(err) <= 0.15, rows[-1]
    print(name, z, plan.all_to_all.dispatch_bytes, *rows, sep="\n")


def test_published_totals():
    mix = compose_for_plan(["experiment=plan_mixtral_8x7b", "parallel.ep_size=8"], 64)
    p = estimate(mix, Cluster(gpus=64, nodes=8)).params
    assert round(p.total / 1e9, 1) == 46.7 and round(p.active / 1e9, 1) == 12.9
    ds = compose_for_plan(["experiment=plan_deepseek_v3", "parallel.ep_size=64"], 2048)
    p = estimate(ds, Cluster(gpus=2048, nodes=256)).params
    # 3 dense blocks of V3 are MoE here and attention is MHA, not MLA (the config's header)
    assert 671e9 < p.total < 671e9 * 1.06 and 37e9 < p.active < 37e9 * 1.06


def test_zero_partitions_pad_like_deepspeed():
    cfg = compose_config([*BASE, "parallel.ep_size=2"], world_size=4, cuda_available=False)
    plan = estimate(cfg, Cluster(gpus=4))
    for name, n, expert in plan.params.groups():
        dp = 2 if expert else 4
        padded = -(-n // (2 * dp)) * 2 * dp  # a multiple of 2 x dp, then dp equal parts
        assert plan.zero[1].partition_elements[name] == padded // dp
    assert plan.zero[1].optimizer_bytes == 12 * sum(plan.zero[1].partition_elements.values())
    assert plan.zero[0].optimizer_bytes == 8 * plan.params.local


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["experiment=tiny", "--gpus", "0"], "--gpus='0' is invalid"),
        (["experiment=tiny", "--gpus", "8", "--nodes", "3"], "--nodes=3 does not divide"),
        (["experiment=tiny", "--gpus", "2", "--gpu-mem", "lots"], "--gpu-mem='lots'"),
        (["experiment=tiny", "--gpus", "2", "--dtype", "fp16"], "--dtype='fp16'"),
        (["experiment=tiny", "--gpus", "2", "--micro-batch", "0"], "--micro-batch='0'"),
        (["experiment=tiny", "--gpus", "3"], "moe.num_experts=4 is not divisible"),
        (["experiment=tiny", "--gpus", "2", "--dtype", "bf16", "parallel.zero_stage=0"], "bf16"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_plan_prints_a_verdict(capsys):
    assert main(["experiment=plan_mixtral_8x7b", "parallel.ep_size=8", "--gpus", "64",
                 "--nodes", "8", "--micro-batch", "1", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "FIT" in out and "ZeRO stage" in out and "all-to-all" in out


def test_the_trainer_refuses_plan_only_configs():
    with pytest.raises(XparConfigError, match="train.plan_only=true"):
        check(["experiment=plan_mixtral_8x7b"], world_size=2)
