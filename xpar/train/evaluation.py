"""Validation: the mean loss over this rank's validation batches averaged over ranks, and
for an MoE model the expert load over the whole validation set (MaxVio).

MaxVio (Wang et al. 2024): max load / mean load - 1 per MoE layer, over every validation
token, averaged over layers; 0 is perfectly even. Logged as val/max_vio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xpar.train.step import autocast, sum_over_ranks

if TYPE_CHECKING:
    from xpar.train.trainer import Run


def max_vio(load_LE: torch.Tensor) -> float:
    """Mean over layers of max_i load_i / mean_i load_i - 1 (load [layers, experts])."""
    load_LE = load_LE.double()
    mean_L = load_LE.mean(dim=1).clamp_min(1e-12)
    return float((load_LE.max(dim=1).values / mean_L - 1.0).mean())


def evaluate(run: Run) -> tuple[float, dict[str, float]]:
    """(validation loss, other val/ metrics), the same on every rank: each metric the task
    reports per batch (xpar.train.task) averaged over this rank's batches, then over ranks."""
    run.engine.eval()
    sums: dict[str, float] = {}
    load_LE = None
    with torch.no_grad():
        for batch in run.val_batches:
            with autocast(run):
                metrics, auxes = run.task.val_metrics(run, batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            if auxes:
                # Per layer, over the EP group already; the sum over all ranks only scales it.
                now = torch.stack([a.tokens_per_expert.detach().double().cpu() for a in auxes])
                load_LE = now if load_LE is None else load_LE + now
    run.engine.train()
    n, keys = max(len(run.val_batches), 1), sorted(sums)
    values = [sums[k] / n for k in keys]
    if load_LE is not None:
        values += load_LE.reshape(-1).tolist()
    reduced = sum_over_ranks(values, run.device)
    means = {k: v / run.groups.world_size for k, v in zip(keys, reduced, strict=False)}
    means = run.task.val_summary(means)
    extra = {f"val/{k}": v for k, v in means.items() if k != "loss"}
    if load_LE is not None:
        extra["val/max_vio"] = max_vio(torch.tensor(reduced[len(keys) :]).view(load_LE.shape))
    return means["loss"], extra


def validate(run: Run) -> float:
    """Evaluate and log val/loss, val/ppl and the extra metrics at the run's step."""
    loss, extra = evaluate(run)
    run.monitor.log_val(run.step, loss, extra)
    return loss
