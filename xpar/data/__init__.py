"""Data pipeline: corpus discovery, tokenizer, packing, rank sharding, resumable position."""

from xpar.data.config import DataConfig

__all__ = ["DataConfig"]
