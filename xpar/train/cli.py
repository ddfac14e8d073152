"""`python -m xpar.train [hydra overrides]` / `xpar-train`: compose, validate, train.

The config is composed and validated on every rank before any process group
starts; a config error prints one clear line and exits with status 2.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from xpar.config.store import CONFIG_DIR, load_and_validate, register_configs
from xpar.errors import XparConfigError

EXIT_CONFIG_ERROR = 2


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    from xpar.train.trainer import train

    try:
        cfg = load_and_validate(dcfg, _world_size())
        result = train(cfg)
    except XparConfigError as e:
        # Hydra would bury this under a traceback; it is the user's to fix, say it plainly.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"xpar: config error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG_ERROR)
    if result.exit_code:
        sys.exit(result.exit_code)


def main() -> None:
    from xpar.parallel.groups import env_from_slurm

    env_from_slurm()  # srun/submitit tasks without torchrun: before WORLD_SIZE is read
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
