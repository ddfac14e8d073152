"""Validate a config once, before any rank starts, and the one way a config error ends a process.

    python -m xpar.config.check [--world-size N] [--] [OVERRIDE ...]

launch/torchrun.sh and launch/slurm.sbatch run this in the launching process with the world
size they are about to start. Under torchrun a config error would be one message per rank
followed by torchrun's ChildFailedError report, and torchrun exits 1 whatever its workers'
status; checked here it is one line on stderr and exit status 2, and no rank starts.

It composes and validates exactly as the trainer does (xpar.config.store.compose_config),
then plans the start as the trainer will (xpar.train.resume.plan_start: a finished run exits
4, an out_dir the run may not use or a live run holds exits 2, each with the trainer's one
line), and prints nothing when all is fine (exit 0): warnings are the trainer's to print, once.
Arguments that are not overrides (Hydra flags: --cfg, --help, -m, ...) make it step aside,
exit 0: the trainer handles them.

The trainer (xpar.train.cli) ends on a config error through `exit_config_error` (before
training; one raised while training goes through xpar.train.fatal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import NoReturn

from xpar.config.store import XparConfigWarning, compose_config, current_rank
from xpar.errors import XparConfigError

EXIT_CONFIG_ERROR = 2
# A rank other than 0 waits this long before it speaks: every rank composes the same config,
# so rank 0 fails too, exits first, and torchrun (or srun) stops the others; torchrun then
# names rank 0 as the root cause. A rank that alone is wrong still reports after the wait.
PEER_GRACE_S = 10.0


def is_overrides(args: Sequence[str]) -> bool:
    """Whether every argument is a Hydra override (none is a flag such as --cfg or -m)."""
    return not any(a.startswith("-") for a in args)


def check(overrides: Sequence[str], world_size: int | None = None):
    """Compose and validate as the trainer would; raise XparConfigError on a mistake."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XparConfigWarning)
        cfg = compose_config(list(overrides), world_size=world_size)
    if cfg.train.plan_only:
        raise XparConfigError(
            "train.plan_only=true: this config is for `xpar plan` only (a model far too big "
            "for this machine); plan it with `xpar plan <overrides> --gpus N`, or set "
            "train.plan_only=false to train it anyway"
        )
    return cfg


def check_start_or_exit(overrides: Sequence[str], world_size: int | None = None) -> None:
    """In the launcher: the config, then where the run would start (its out_dir's files).

    A finished run (nothing to do) or an out_dir the run may not use ends here with the
    trainer's own line and exit status, before any rank starts.
    """
    if not is_overrides(overrides):
        return
    from xpar.train.lock import check_free
    from xpar.train.resume import plan_start, say_finished

    try:
        cfg = check(overrides, world_size)
        check_free(cfg.train.out_dir)  # a live run holds out_dir (xpar.train.lock)
        start = plan_start(cfg)
    except XparConfigError as e:
        exit_config_error(e, rank=0)
    if start.finished and start.exit_code:
        say_finished(start)
        sys.exit(start.exit_code)


def check_or_exit(
    overrides: Sequence[str], world_size: int | None = None, *, rank: int | None = None
) -> None:
    """check(), ending the process with one line and status 2 on a config error."""
    if not is_overrides(overrides):
        return
    try:
        check(overrides, world_size)
    except XparConfigError as e:
        exit_config_error(e, rank=rank)


def exit_config_error(e: XparConfigError, *, rank: int | None = None) -> NoReturn:
    """One line on stderr (rank 0; another rank only if rank 0 did not end it first), exit 2.

    rank=None reads this process's rank from the launcher's environment.
    """
    rank = current_rank() if rank is None else rank
    if rank != 0:
        time.sleep(PEER_GRACE_S)
    where = "" if rank == 0 else f" (rank {rank})"
    line = f"xpar: config error{where}: {e}"
    print(line, file=sys.stderr, flush=True)
    tell_torchrun(line)
    sys.exit(EXIT_CONFIG_ERROR)


def tell_torchrun(line: str) -> None:
    # torchrun's failure report shows a worker's error file as its "traceback": with this it
    # repeats our line at the bottom of the report instead of a link to the docs.
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()))
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        pass  # the line is on stderr already; the report just stays generic


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m xpar.config.check",
        description="Compose and validate an xpar config as the trainer would, before any rank "
        "starts. Prints nothing and exits 0 when it is fine; prints one line and exits 2 when "
        "it is not.",
    )
    ap.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="ranks the launcher will start (default: WORLD_SIZE, else 1)",
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides as the trainer gets them; after -- anything goes, and a Hydra "
        "flag among them (--cfg, -m, ...) skips the check",
    )
    args = ap.parse_args(argv)
    check_start_or_exit(args.overrides, args.world_size)  # the launcher: not one of the ranks


if __name__ == "__main__":
    main()
