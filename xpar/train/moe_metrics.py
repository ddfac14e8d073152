"""Per-layer MoE numbers for the log: drop fraction, max/mean expert load, router entropy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["layer_loads", "moe_layer_metrics", "moe_step_metrics", "to_float"]

# Per-layer scalars logged as moe/layer_<i>/<name>, in this order.
LAYER_SCALARS = (
    "dropped_fraction",
    "max_load",
    "mean_load",
    "max_over_mean_load",
    "router_entropy",
    "a2a_bytes_per_step",  # expert parallel only: rows this rank sent to other ranks' experts
)


def _get(stats: Any, name: str) -> Any:
    if isinstance(stats, Mapping):
        return stats.get(name)
    return getattr(stats, name, None)


def to_float(x: Any) -> float | None:
    """A tensor, numpy or Python scalar as a float; None stays None."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().float().cpu()
    if hasattr(x, "item"):
        x = x.item()
    return float(x)


def _to_list(x: Any) -> list[float]:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu()
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [float(v) for v in x]


def moe_layer_metrics(stats: Any) -> dict[str, Any]:
    """Per-layer numbers from an MoEAux-like object or dict.

    Reads `tokens_per_expert` ([E] counts before dropping), `dropped_fraction` and
    `router_entropy` where present (tensors, numpy or floats). Returns dropped_fraction,
    max_load and mean_load (tokens per expert), max_over_mean_load (1.0 = perfect balance),
    router_entropy, and tokens_per_expert as a list."""
    out: dict[str, Any] = {}
    for name in ("dropped_fraction", "router_entropy", "lb_loss", "z_loss", "a2a_bytes_per_step"):
        value = to_float(_get(stats, name))
        if value is not None:
            out[name] = value
    counts = _get(stats, "tokens_per_expert")
    if counts is not None:
        counts = _to_list(counts)
        if counts:
            max_load = max(counts)
            mean_load = sum(counts) / len(counts)
            out["max_load"] = max_load
            out["mean_load"] = mean_load
            out["max_over_mean_load"] = max_load / mean_load if mean_load > 0 else 0.0
            out["tokens_per_expert"] = counts
    return out


def _layer_items(moe_layers: Any) -> list[tuple[int, Any]]:
    if moe_layers is None:
        return []
    if isinstance(moe_layers, Mapping):
        return sorted((int(i), s) for i, s in moe_layers.items())
    return list(enumerate(moe_layers))


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def moe_step_metrics(
    moe_layers: Any, *, aux_loss: Any = None, z_loss: Any = None, with_hist: bool = False
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One log step's MoE metrics, keyed as logged, and the expert-load histograms.

    moe_layers: a list (or {index: stats}) of MoEAux-like objects / dicts. aux_loss / z_loss:
    the unweighted load-balance / router z-loss; None -> the mean of the layers' `lb_loss` /
    `z_loss` where they carry them. with_hist: also return each layer's tokens per expert."""
    layers = [(i, moe_layer_metrics(s)) for i, s in _layer_items(moe_layers)]
    if aux_loss is None:
        aux_loss = _mean([lm.get("lb_loss") for _, lm in layers])
    if z_loss is None:
        z_loss = _mean([lm.get("z_loss") for _, lm in layers])
    m: dict[str, float] = {}
    if aux_loss is not None:
        m["moe/aux_loss"] = to_float(aux_loss)
    if z_loss is not None:
        m["moe/z_loss"] = to_float(z_loss)
    hists: dict[str, list[float]] = {}
    for i, lm in layers:
        m.update({f"moe/layer_{i}/{name}": lm[name] for name in LAYER_SCALARS if name in lm})
        if with_hist and "tokens_per_expert" in lm:
            hists[f"moe/layer_{i}/tokens_per_expert"] = lm["tokens_per_expert"]
    return m, hists


def layer_loads(moe_layers: Any) -> list[list[float]]:
    """Tokens per expert of every layer that reports them, in layer order."""
    loads = []
    for _, stats in _layer_items(moe_layers):
        counts = _get(stats, "tokens_per_expert")
        if counts is not None:
            loads.append(_to_list(counts))
    return loads
