"""Typed, self-validating config tree and its Hydra plumbing (see schema.py and store.py)."""

from xpar.config.schema import (
    LoggerConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    XparConfig,
    looks_like_secret,
)
from xpar.config.store import (
    CONFIG_DIR,
    XparConfigWarning,
    compose_config,
    compose_dictconfig,
    current_rank,
    find_config_dir,
    hydra_rank_overrides,
    load_and_validate,
    register_configs,
    to_plain_dict,
)

__all__ = [
    "CONFIG_DIR",
    "LoggerConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "XparConfig",
    "XparConfigWarning",
    "compose_config",
    "compose_dictconfig",
    "current_rank",
    "find_config_dir",
    "hydra_rank_overrides",
    "load_and_validate",
    "looks_like_secret",
    "register_configs",
    "to_plain_dict",
]
