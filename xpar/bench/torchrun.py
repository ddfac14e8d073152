"""What the benchmarks that run one process per rank share: refusing to start without
torchrun, and one help page under it."""

from __future__ import annotations

import os
import sys


def help_on_other_ranks(argv: list[str]) -> None:
    """Under torchrun, ranks other than 0 exit quietly on --help: rank 0 prints it once."""
    if os.environ.get("RANK", "0") != "0" and {"-h", "--help"} & set(argv):
        raise SystemExit(0)


def require_torchrun(prog: str, name: str) -> None:
    """Exit 2 with one line naming the fix unless torchrun (or srun) started this process."""
    # Checked before deepspeed is imported: outside torchrun it fails on mpi4py, far from here.
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return
    print(
        f"{prog} needs torchrun (one process per rank; WORLD_SIZE and RANK are not set): "
        f"torchrun --standalone --nproc-per-node 2 -m xpar.bench {name} [options]",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(2)
