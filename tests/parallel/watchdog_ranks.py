"""One rank of the watchdog tests: `python watchdog_ranks.py STOPPER TIMEOUT_S`.

Launcher variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) come from the test. Every
rank starts the watchdog, tells it step 12 and meets the others in a barrier; then rank
STOPPER stops itself (SIGSTOP) and the others enter an all_to_all it never joins. gloo's
own timeout is 120 s, so only the watchdog can end them.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from xpar.parallel import watchdog


def main() -> None:
    stopper, timeout_s = int(sys.argv[1]), float(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    with watchdog.Watchdog(rank, world, timeout_s):
        watchdog.note_step(12)
        with watchdog.collective("barrier (test start)"):
            dist.barrier()
        print(f"rank {rank} ready", flush=True)
        if rank == stopper:
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(600)
        with watchdog.collective("all_to_all (test)"):
            dist.all_to_all_single(torch.empty(world), torch.ones(world))
    print(f"rank {rank}: the all_to_all returned", flush=True)


if __name__ == "__main__":
    main()
