"""One training step: grad_accum micro-batches, the step guard, one optimizer step, the
routers' balance state, the step's log row; and the reductions over ranks the loop shares.

A step whose loss or gradients are not finite on any rank is skipped on every rank
(xpar.train.health); the watchdog (xpar.parallel.watchdog) knows each collective by name.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from xpar.parallel import watchdog
from xpar.train import health

if TYPE_CHECKING:
    from xpar.train.trainer import Run

# The watchdog's names (xpar.parallel.watchdog) for the collectives of every step.
_BACKWARD = watchdog.waiting_in("backward (MoE all_to_all, DeepSpeed gradient reduction)")
_OPTIMIZER_STEP = watchdog.waiting_in("optimizer step (DeepSpeed: gradient norm, ZeRO)")
_SUM_OVER_RANKS = watchdog.collective("all_reduce (loss, step health, MoE metrics or val loss)")


def autocast(run: Run):
    return torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)


def train_step(run: Run) -> tuple[float, list]:
    """grad_accum micro-batches, one optimizer step; returns the global mean loss and the
    last micro-batch's MoE reports. A step whose loss or gradients are not finite on any
    rank is skipped on every rank (xpar.train.health)."""
    accum, rank = run.cfg.train.grad_accum, run.groups.rank
    loss_sum, ce_sum, auxes, loads = 0.0, 0.0, [], None
    for micro in range(accum):
        batch = run.data.train.next_batch()
        with autocast(run):
            ce, auxes = run.task.train_loss(run, batch, micro)
        if run.faults.loss_is_nan(rank, run.step):
            ce = ce * float("nan")
        aux = sum((a.loss for a in auxes), ce.new_zeros(()))
        total = ce + aux
        with _BACKWARD:
            run.engine.backward(total)
        if micro < accum - 1:
            # DeepSpeed finds the accumulation boundary by counting step() calls, one per
            # micro batch; before the last one step() only counts (no update)
            run.engine.step()
        if run.stateful_routers:
            loads = _add_loads(loads, auxes)
        ce_sum += ce.item()
        loss_sum += total.item()
    verdict, name = health.OK, None
    if not math.isfinite(loss_sum):
        verdict, name = health.BAD_LOSS, "the loss"
    elif not run.engine.zero_stage:  # ZeRO 1/2 hold reduced gradients in their partitions
        name = health.first_nonfinite_grad(run.engine.module)
        verdict = health.OK if name is None else health.BAD_GRADS
    # One all-reduce: the mean loss and every rank's verdict in its own slot.
    slots = [0.0] * run.groups.world_size
    slots[rank] = float(verdict)
    reduced = sum_over_ranks([ce_sum / accum, *slots], run.device)
    loss, verdicts = reduced[0] / run.groups.world_size, [int(v) for v in reduced[1:]]
    bad = None
    if any(verdicts):
        names = [None] * run.groups.world_size
        with watchdog.collective("all_gather_object (a bad step's tensor names)"):
            dist.all_gather_object(names, name)  # only on a bad step: which tensor, for the line
        bad = health.describe(verdicts, names)
    with _OPTIMIZER_STEP:
        stepped = run.engine.step(skip=bad is not None)
    if not stepped and bad is None:
        bad = health.describe([], [])  # DeepSpeed's overflow check skipped it
    if stepped:
        _after_optimizer_step(run, loads)
    run.tokens_seen += run.tokens_per_step
    run.result.losses[run.step] = loss
    line = run.health.record(run.step, loss, bad)
    if line is not None:
        run.monitor.print(line)
    if run.groups.rank == 0:
        run.drops.record([a.dropped_fraction.item() for a in auxes])
    return loss, auxes


def _add_loads(loads: list | None, auxes: list) -> list:
    # Assignments per expert of every MoE layer (already summed over the EP group).
    now = [a.tokens_per_expert.detach() for a in auxes]
    return now if loads is None else [a + b for a, b in zip(loads, now, strict=True)]


def _after_optimizer_step(run: Run, loads: list | None) -> None:
    """The routers' balance state (e.g. the aux-loss-free bias) moves once per applied step,
    from the step's load over every rank: one all-reduce over the expert-DP group (the EP
    group's sum is in the MoE report already), only when a router keeps such state."""
    if not run.stateful_routers:
        return
    load_LE = torch.stack(loads).to(device=run.device, dtype=torch.float64)
    if run.groups.expert_dp_size > 1:
        with watchdog.collective("all_reduce (expert load for the routers' balance state)"):
            dist.all_reduce(load_LE, group=run.groups.expert_dp_group)
    for router, load_E in zip(run.stateful_routers, load_LE, strict=True):
        router.after_optimizer_step(load_E)


def log_step(run: Run, loss: float, auxes: list) -> None:
    """Progress bar every step; on log steps the reduced metrics go to console and W&B;
    one metrics.jsonl row every step."""
    mon, step = run.monitor, run.step
    mon.tick(step)
    row = {"step": step, "loss": loss}
    if mon.should_log(step):
        gn, lr = run.engine.grad_norm(), run.engine.lr()
        logged = mon.log_train(
            step,
            loss=loss,
            lr=lr,
            grad_norm=gn,
            tokens_seen=run.tokens_seen,
            aux_loss=_mean([a.lb_loss.item() for a in auxes]),
            z_loss=_mean([a.z_loss.item() for a in auxes]),
            moe_layers=_moe_layers(run, auxes),
        )
        row.update(lr=lr, grad_norm=gn)
        row.update({k: v for k, v in logged.items() if isinstance(v, (int, float))})
    mon.write_metrics(row)  # rank 0 only


def _moe_layers(run: Run, auxes: list) -> list[dict]:
    """Every layer's drop fraction and router entropy, and under expert parallelism the
    all-to-all bytes this rank sent per step since the last log (forward, the rows' way
    out; the way back is as large), all means over ranks: one all-reduce for all of it."""
    flat = [v for a in auxes for v in (a.dropped_fraction.item(), a.router_entropy.item())]
    ep = len(run.moe_layers) == len(auxes) and run.groups.ep_size > 1
    if ep:
        steps = max(run.step - max(run.traffic_mark[0], run.start_step), 1)
        sent = [layer.dispatcher.traffic.bytes_sent for layer in run.moe_layers]
        last = run.traffic_mark[1] or [0] * len(sent)
        flat += [(s - p) / steps for s, p in zip(sent, last, strict=True)]
        run.traffic_mark = (run.step, sent)
    means = mean_over_ranks(flat, run.device) if flat else []
    n = 2 * len(auxes)
    layers = [
        {
            "tokens_per_expert": a.tokens_per_expert.cpu(),
            "dropped_fraction": means[2 * i],
            "router_entropy": means[2 * i + 1],
        }
        for i, a in enumerate(auxes)
    ]
    if ep:
        for i, layer in enumerate(layers):
            layer["a2a_bytes_per_step"] = means[n + i]
    return layers


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mean_over_ranks(values: list[float], device) -> list[float]:
    return [v / dist.get_world_size() for v in sum_over_ranks(values, device)]


def sum_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    with _SUM_OVER_RANKS:  # .tolist() waits for the result (NCCL returns before it ends)
        dist.all_reduce(t)
        return t.tolist()
