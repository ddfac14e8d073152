"""The collective watchdog (xpar.parallel.watchdog): real gloo ranks, real SIGSTOP.

Each rank is a fresh `python tests/parallel/watchdog_ranks.py` (see there): one rank stops
itself, the others wait in an all_to_all whose gloo timeout (120 s) is far away, so only the
watchdog can end them. The slow test stops a rank of a real torchrun training run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.fixtures.golden import TINY, data_overrides
from xpar.parallel import watchdog
from xpar.parallel.groups import free_port
from xpar.testing.processes import LAUNCH_VARS

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def start_ranks(port: int, world: int, stopper: int, timeout_s: float, agent: bool) -> list:
    """agent: the store lives outside the ranks (in this test, as torchrun's agent store);
    otherwise rank 0 hosts it, as in a plain env:// launch."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if agent:
        env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    cmd = [sys.executable, str(HERE / "watchdog_ranks.py"), str(stopper), str(timeout_s)]
    return [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def wait_live(procs: list, stopper: int) -> dict[int, tuple[int, float, str]]:
    """rank -> (exit code, seconds from its 'ready' to its exit, stderr), but the stopper's."""
    ready_at = {}
    for r, p in enumerate(procs):
        if r != stopper:
            assert p.stdout.readline().strip() == f"rank {r} ready", p.stderr.read()
            ready_at[r] = time.monotonic()
    out = {}
    for r, t0 in ready_at.items():
        procs[r].wait(timeout=60)
        out[r] = (procs[r].returncode, time.monotonic() - t0, procs[r].stderr.read())
    return out


def kill_all(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()  # SIGKILL ends a stopped process too
        p.wait()


def timeout_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith(watchdog.PREFIX)]


def test_a_stopped_rank_ends_every_live_rank_within_the_timeout():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    procs = start_ranks(port, world=3, stopper=2, timeout_s=3, agent=True)
    try:
        live = wait_live(procs, stopper=2)
        time.sleep(0.2)
        stopped_rc = procs[2].poll()
    finally:
        kill_all(procs)
        del store
    lines = {}
    for r, (rc, took, err) in live.items():
        assert rc == watchdog.EXIT_COLLECTIVE_TIMEOUT, err
        assert took < 3 + 3, f"rank {r} exited {took:.1f}s after the hang"
        (lines[r],) = timeout_lines(err)  # one line per live rank
        for part in (f"on rank {r} ", "at step 12", "all_to_all (test)", "did not arrive: rank"):
            assert part in lines[r], lines[r]
        assert " 2 (" in lines[r], lines[r]
    detailed = [x for x in lines.values() if "no heartbeat for" in x]
    assert len(detailed) == 1 and "stopped or hung; killed" in detailed[0], lines
    assert stopped_rc == -signal.SIGKILL, "a live rank on this machine kills the stopped one"


def test_a_stopped_store_host_still_ends_the_others():
    # rank 0 hosts the store (plain env:// launch) and stops: nobody can read heartbeats
    procs = start_ranks(free_port(), world=2, stopper=0, timeout_s=2, agent=False)
    try:
        ((rc, took, err),) = wait_live(procs, stopper=0).values()
    finally:
        kill_all(procs)
    assert rc == watchdog.EXIT_COLLECTIVE_TIMEOUT, err
    assert took < 2 + 4, f"exited {took:.1f}s after the hang"
    (line,) = timeout_lines(err)
    assert "on rank 1 " in line and "at step 12" in line and "all_to_all (test)" in line, line
    assert "job store" in line and "does not answer" in line, line


# --------------------------------------------------------------------------- in-process


def test_marks_nest_and_cost_nothing_without_a_watchdog():
    outer, inner = watchdog.waiting_in("backward (test)"), watchdog.collective("all_reduce (t)")
    with outer, inner:  # no watchdog: plain no-ops
        pass
    wd = watchdog.Watchdog(rank=0, world_size=2, timeout_s=5)  # not started: no threads
    watchdog._active = wd
    try:
        with outer:
            with inner:
                assert wd.current()[0] == "all_reduce (t)" and wd.current()[2]
                assert wd._verdict(wd.current()[1] + 6).startswith("all_reduce (t) has waited")
            assert wd.current()[0] == "backward (test)" and not wd.current()[2]
            later = wd.current()[1] + 6
            wd.read_at = later  # the store answers, no peer is silent: it may be compute
            assert wd._verdict(later) is None
            wd.read_at = later - 5.5  # the store has not answered for longer than timeout_s
            wd.has_store = False  # none to answer (MASTER_ADDR unset): only durations count
            assert wd._verdict(later) is None
            wd.has_store = True
            assert wd._verdict(later).startswith("in backward (test) for 6.0s")
        assert wd.current() is None and wd.entered == 2
        try:
            with inner:
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert wd.failed[0] == "all_reduce (t)"
    finally:
        watchdog._active = None


def test_not_arrived_names_silent_and_late_ranks():
    def beat(entered, where):
        return {"host": "h", "pid": 7, "step": 12, "entered": entered, "in": where}

    peers = {1: (9.0, beat(5, "all_to_all (x)")), 2: (0.2, beat(4, None)), 3: (0.1, beat(5, "y"))}
    missing = watchdog.not_arrived(0, 5, entered=5, peers=peers, stale_s=3)
    text = ", ".join(m.describe() for m in missing)
    assert [m.rank for m in missing] == [1, 2, 4], text
    assert "rank 1 (host h, pid 7, step 12, no heartbeat for 9.0s: stopped or hung)" in text
    assert "rank 2 (host h, pid 7, step 12, has not reached it, not in a collective)" in text
    assert "rank 4 (no heartbeat seen)" in text


def test_hot_path_cost_is_reported():
    """Entering and leaving a mark with a watchdog active (no timed assertion: a figure)."""
    wd = watchdog.Watchdog(rank=0, world_size=2, timeout_s=600)
    mark, n = watchdog.collective("all_to_all (bench)"), 200_000
    watchdog._active = wd
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with mark:
                pass
        on = (time.perf_counter() - t0) / n
    finally:
        watchdog._active = None
    t0 = time.perf_counter()
    for _ in range(n):
        with mark:
            pass
    off = (time.perf_counter() - t0) / n
    print(f"watchdog mark: {on * 1e9:.0f} ns per collective active, {off * 1e9:.0f} ns inactive")
    assert wd.entered == n and not wd.marks


# --------------------------------------------------------------------------- under torchrun


def worker_pid(torchrun: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (its direct child), if it runs yet."""
    for child in Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def metrics_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(x)["step"] for x in rows if x.endswith("}")), default=0)


def stop_rank_1_mid_run(job: subprocess.Popen, out: Path, console: Path) -> list[int]:
    """SIGSTOP rank 1 once a few steps are written; returns the workers' pids."""
    deadline = time.monotonic() + 120
    while metrics_step(out) < 3:
        assert job.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
        time.sleep(0.05)
    workers = [worker_pid(job, 0), worker_pid(job, 1)]
    os.kill(workers[1], signal.SIGSTOP)
    return workers


@pytest.mark.slow
def test_a_stopped_rank_ends_a_torchrun_job_within_30s(tmp_path):
    out, console = tmp_path / "run", tmp_path / "console.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "xpar.train", f"train.out_dir={out}", *TINY, *data_overrides(tmp_path / "c")]
    cmd += ["train.steps=500", "train.eval_every=1000", "train.ckpt_every=1000"]
    cmd += ["parallel.timeout_s=10"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["OMP_NUM_THREADS"] = "1"
    workers: list = []
    with open(console, "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            workers = stop_rank_1_mid_run(job, out, console)
            stopped_at = time.monotonic()
            job.wait(timeout=60)
            took = time.monotonic() - stopped_at
        finally:  # workers run in sessions of their own: kill each, a stopped one too
            for pid in [job.pid, *workers]:
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(pid, signal.SIGKILL)
            job.wait()
    text = console.read_text()
    print(f"SIGSTOP of rank 1 to the end of torchrun: {took:.1f}s")
    assert job.returncode != 0 and took < 30, text[-3000:]
    (line,) = timeout_lines(text)
    for part in ("on rank 0 ", "at step ", "did not arrive: rank 1 (", "stopped or hung; killed"):
        assert part in line, line
