"""`python -m xpar.train [hydra overrides]` / `xpar-train`: compose, validate, train.

The config is composed and validated on every rank before any process group
starts; a config error prints one clear line and exits with status 2. Then rank 0 takes
the out_dir's lock (xpar.train.lock: a live run there is refused, exit 2) before Hydra
writes into it, and the other ranks check it. Under torchrun a worker dies with torchrun
(xpar.train.launcher). An error while training reaches the console once, with its rank
(xpar.train.fatal).

`--help` is xpar's own page (groups, options, keys with their descriptions from the schema),
not Hydra's generic one; `--hydra-help` is still Hydra's. Start-up is timed from the process
start (xpar.train.phases); xpar's warnings are one line each (xpar.train.sinks.warning_log)
and other libraries stay off the console unless train.verbose=true (xpar.train.sinks.quiet).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import hydra
from omegaconf import DictConfig, OmegaConf

from xpar.config.check import check, exit_config_error, is_overrides
from xpar.config.schema import XparConfig
from xpar.config.store import CONFIG_DIR, current_rank, load_and_validate, register_configs
from xpar.errors import XparConfigError
from xpar.redact import redact_hydra_output
from xpar.train import fatal, lock, phases
from xpar.train.help import HELP_FLAGS, help_text
from xpar.train.launcher import die_with_launcher
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
    except Exception as e:
        # A config error is the user's to fix: one plain line, not Hydra's traceback; and a
        # rank that fails because another did leaves the word to that one.
        fatal.fail(e)
        _crashed(e)
    if result.exit_code:
        sys.exit(result.exit_code)


def _crashed(e: Exception) -> None:
    """This rank's own error: one line for the failures xpar names fully (a full disk, weights
    gone bad), else the traceback; exit 1. Not Hydra's report: it prints the raw overrides."""
    from xpar.errors import XparUnhealthyError
    from xpar.train.checkpoint import CheckpointWriteError

    if isinstance(e, (CheckpointWriteError, XparUnhealthyError)):
        print(f"xpar: error: {e}", file=sys.stderr, flush=True)
    else:
        traceback.print_exc()
    sys.exit(1)


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


def _checked(args: list[str]) -> XparConfig | None:
    """The config, composed and validated before Hydra does: its own message for a mistyped
    key or option is several lines per rank and exit 1; ours is one line from rank 0, exit 2.
    None when the arguments are Hydra flags (--cfg, -m, ...): Hydra handles them."""
    if not is_overrides(args):
        return None
    try:
        return check(args, _world_size())
    except XparConfigError as e:
        exit_config_error(e)


def _out_dir(cfg: XparConfig | None) -> contextlib.AbstractContextManager:
    """Rank 0 holds the out_dir's lock until the process ends; other ranks look at it."""
    if cfg is None:
        return contextlib.nullcontext()
    try:
        if current_rank() == 0:
            return lock.acquire(cfg.train.out_dir)
        lock.check_free(cfg.train.out_dir)
    except XparConfigError as e:
        exit_config_error(e)
    return contextlib.nullcontext()


def main() -> None:
    die_with_launcher()  # first: from here a killed torchrun takes this worker with it
    _start()
    from xpar.parallel.groups import env_from_slurm

    env_from_slurm()  # srun/submitit tasks without torchrun: before WORLD_SIZE is read
    register_configs()
    phases.mark("imports")
    cfg = _checked(sys.argv[1:])
    with _out_dir(cfg):  # before Hydra writes .hydra/ and its log into out_dir
        _hydra_main()


if __name__ == "__main__":
    main()
