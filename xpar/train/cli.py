"""`python -m xpar.train [hydra overrides]` / `xpar-train`: compose, validate, train.

The config is composed and validated on every rank before any process group
starts; a config error prints one clear line and exits with status 2.

`--help` is xpar's own page (groups, options, keys with their descriptions from the schema),
not Hydra's generic one; `--hydra-help` is still Hydra's. Start-up is timed from the process
start (xpar.train.phases); xpar's warnings are one line each (xpar.train.sinks.warning_log)
and other libraries stay off the console unless train.verbose=true (xpar.train.sinks.quiet).
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from xpar.config.check import check_or_exit, exit_config_error
from xpar.config.store import CONFIG_DIR, current_rank, load_and_validate, register_configs
from xpar.errors import XparConfigError
from xpar.redact import redact_hydra_output
from xpar.train import phases
from xpar.train.help import HELP_FLAGS, help_text
from xpar.train.sinks.quiet import quiet_third_party
from xpar.train.sinks.warning_log import WarningLog, active


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    _console_policy(dcfg)
    redact_hydra_output()  # Hydra wrote .hydra/ from the raw overrides: secrets out first
    phases.mark("config")  # Hydra's compose and job set-up
    from xpar.train.trainer import train

    phases.mark("imports")  # torch, deepspeed, the model: after the console policy is set
    try:
        cfg = load_and_validate(dcfg, _world_size())
        phases.mark("config")
        result = train(cfg)
    except XparConfigError as e:
        # Hydra would bury this under a traceback; it is the user's to fix, say it plainly.
        exit_config_error(e)
    if result.exit_code:
        sys.exit(result.exit_code)


def _console_policy(dcfg: DictConfig) -> None:
    # Before the trainer's imports: DeepSpeed warns as it is imported.
    verbose = bool(OmegaConf.select(dcfg, "train.verbose", default=False))
    quiet_third_party(verbose)
    log = active()
    if log is not None:
        log.verbose = verbose


def _start() -> None:
    phases.start()  # from the process start: the interpreter and every import count
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        if current_rank() == 0:  # under torchrun: one page, not one per rank
            print(help_text())
        sys.exit(0)
    WarningLog(rank=current_rank()).install()  # before the config: its warnings are xpar's


def main() -> None:
    _start()
    from xpar.parallel.groups import env_from_slurm

    env_from_slurm()  # srun/submitit tasks without torchrun: before WORLD_SIZE is read
    register_configs()
    phases.mark("imports")
    # Compose and validate before Hydra does: its own message for a mistyped key or option
    # is several lines per rank and exit 1; ours is one line from rank 0 and exit 2.
    check_or_exit(sys.argv[1:], _world_size())
    _hydra_main()


if __name__ == "__main__":
    main()
