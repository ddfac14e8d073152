"""Typed, self-validating config tree and its Hydra plumbing (see schema.py and store.py).

Names load on first use: config nodes elsewhere (moe, models, data) import
xpar.config.checks, which must not pull in the schema that imports them.
"""

from __future__ import annotations

from xpar.lazy import lazy_getattr

_EXPORTS = {
    "LoggerConfig": "schema",
    "OptimConfig": "schema",
    "ParallelConfig": "schema",
    "TrainConfig": "schema",
    "XparConfig": "schema",
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

__getattr__ = lazy_getattr(__name__, _EXPORTS)
