"""Decoder-only Transformer language model (single-device code).

Names load on first use: xpar.moe imports xpar.models.mlp, and an eager import of the
transformer here would import xpar.moe back while it is half-initialised.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "config",
    "moe_block_ids": "config",
    "ModelCost": "cost",
    "describe_cost": "cost",
    "model_cost": "cost",
    "MoETransformer": "transformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xpar.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xpar.models.{_EXPORTS[name]}"), name)
