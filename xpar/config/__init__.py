"""Typed, self-validating config tree and its Hydra plumbing (see schema.py and store.py).

Names load on first use: config nodes elsewhere (moe, models, data) import
xpar.config.checks, which must not pull in the schema that imports them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoggerConfig": "schema",
    "OptimConfig": "schema",
    "ParallelConfig": "schema",
    "TrainConfig": "schema",
    "XparConfig": "schema",
    "looks_like_secret": "schema",
    "CONFIG_DIR": "store",
    "XparConfigWarning": "store",
    "compose_config": "store",
    "compose_dictconfig": "store",
    "current_rank": "store",
    "find_config_dir": "store",
    "load_and_validate": "store",
    "register_configs": "store",
    "to_plain_dict": "store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xpar.config' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xpar.config.{_EXPORTS[name]}"), name)
