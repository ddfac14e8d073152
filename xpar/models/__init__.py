"""Decoder-only Transformer language model (single-device code)."""

from xpar.models.config import ModelConfig

__all__ = ["ModelConfig"]
