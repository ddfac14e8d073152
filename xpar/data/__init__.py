"""Data pipeline: corpus discovery, tokenizer, packing, rank sharding, resumable position.

    bundle = build_data(cfg.data, rank, world_size, micro_batch_size)
    x, y = bundle.train.next_batch()          # [B, seq_len] LongTensors, y = x shifted by one
    state = bundle.train.state_dict()         # JSON-able position; load_state_dict to resume
    val = bundle.val_batches(n)               # fixed list of this rank's validation batches
    bundle.tokenizer.vocab_size, bundle.stats

Only DataConfig is imported eagerly, so config code does not pay for torch/datasets.
"""

from xpar.data.config import DataConfig

_LAZY = {
    "build_data": "xpar.data.build",
    "DataBundle": "xpar.data.build",
    "DataStats": "xpar.data.build",
    "SplitStats": "xpar.data.build",
    "TrainLoader": "xpar.data.loader",
    "ValLoader": "xpar.data.loader",
    "ByteTokenizer": "xpar.data.tokenizer",
    "HFTokenizer": "xpar.data.tokenizer",
    "build_tokenizer": "xpar.data.tokenizer",
}

__all__ = ["DataConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xpar.data' has no attribute {name!r}")
