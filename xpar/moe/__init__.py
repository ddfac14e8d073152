"""Mixture-of-Experts core: router, dispatcher, grouped experts, layer."""

from xpar.moe.config import MoEConfig
from xpar.moe.layer import MoEAux, MoELayer

__all__ = ["MoEAux", "MoEConfig", "MoELayer"]
