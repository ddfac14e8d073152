"""Decoder-only Transformer language model (single-device code)."""

from xpar.models.config import ModelConfig
from xpar.models.cost import ModelCost, describe_cost, model_cost
from xpar.models.transformer import MoETransformer, moe_block_ids

__all__ = [
    "ModelConfig",
    "ModelCost",
    "MoETransformer",
    "describe_cost",
    "model_cost",
    "moe_block_ids",
]
