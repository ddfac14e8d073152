"""Mixture-of-Experts core: router, dispatcher, grouped experts, layer."""

from xpar.moe.config import MoEConfig

__all__ = ["MoEConfig"]
