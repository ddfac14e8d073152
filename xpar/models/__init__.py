"""Decoder-only Transformer language model (single-device code).

Names load on first use: xpar.moe imports xpar.models.mlp, and an eager import of the
transformer here would import xpar.moe back while it is half-initialised.
"""

from __future__ import annotations

from xpar.lazy import lazy_getattr

_EXPORTS = {
    "ModelConfig": "config",
    "moe_block_ids": "config",
    "ModelCost": "cost",
    "describe_cost": "cost",
    "model_cost": "cost",
    "MoETransformer": "transformer",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
