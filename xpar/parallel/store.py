"""The job's key-value store, for what must reach other ranks when collectives cannot.

A hung or failed rank cannot take part in a collective, so the watchdog's heartbeats and a
rank's first fatal error travel through the rendezvous store instead: torchrun's agent
store (or the store rank 0 hosts for a plain env:// launch), found from MASTER_ADDR and
MASTER_PORT. Keys live under `xpar/<restart>/`, so a group that torchrun restarted never
reads the previous attempt's keys. No store for a world of one.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

PREFIX = "xpar"


def restart_count(env: dict | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def job_store(timeout_s: float = 10.0, env: dict | None = None) -> dist.Store | None:
    """A client of the job's store under `xpar/<restart>/`, or None (world of one, no env).

    `timeout_s` bounds every get/wait: a caller asking about a dead store must not hang.
    """
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in env:
        return None
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"{PREFIX}/{restart_count(env)}/", store)
