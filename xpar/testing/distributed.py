"""run_distributed(fn, world_size): spawn real gloo ranks on a free port.

Each rank runs fn(rank, world_size, *args) inside an initialised gloo process
group and puts its return value (which must be picklable) in the result list.
A rank that raises makes the whole call raise with that rank's traceback; a
hang is cut off after `timeout` seconds.
"""

from __future__ import annotations

import datetime
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xpar.parallel.groups import free_port


def _worker(rank, world_size, port, fn, args, results, pg_timeout):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:  # report every failure, including SystemExit
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    pg_timeout: float = 60.0,
) -> list[Any]:
    """Run fn on world_size gloo ranks; return the per-rank results in rank order.

    fn must be importable at module level (spawn pickles it by name).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, results, pg_timeout),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        errors_if_none = _collect(procs, results, timeout, outs, errors)
    finally:
        _reap(procs, quick=bool(errors))
    if not errors and len(outs) < world_size:
        errors.append(errors_if_none)
    if errors:
        raise RuntimeError("run_distributed: a rank failed\n" + "\n".join(errors))
    return [outs[r] for r in range(world_size)]


def _collect(procs: list, results: Any, timeout: float, outs: dict, errors: list[str]) -> str:
    """Fill outs / errors from the ranks' reports; returns what to say of a rank that sent none.

    After a failure, waits briefly for the other ranks' own errors, then stops.
    """
    world_size = len(procs)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    errors_if_none = "a rank ended without a result"
    grace_until = None
    while len(outs) + len(errors) < world_size:
        now = datetime.datetime.now()
        if grace_until is not None and now >= grace_until:
            break
        left = (deadline - now).total_seconds()
        if left <= 0:
            raise TimeoutError(
                f"run_distributed: {world_size - len(outs) - len(errors)} rank(s) still "
                f"running after {timeout:.0f}s (hang?); errors so far: {errors}"
            )
        try:
            rank, ok, payload = results.get(timeout=min(left, 0.5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and grace_until is None:
                # A rank can die in C++ (abort) when a peer vanished; its peers' Python
                # errors may still be in flight.
                grace_until = now + datetime.timedelta(seconds=3)
                errors_if_none = f"a rank process died with exit code {dead[0].exitcode}"
            continue
        if ok:
            outs[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
            if grace_until is None:
                grace_until = datetime.datetime.now() + datetime.timedelta(seconds=5)
    return errors_if_none


def _reap(procs: list, quick: bool) -> None:
    for p in procs:
        p.join(timeout=0.5 if quick else 5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
