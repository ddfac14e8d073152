"""Workers die with their launcher (xpar.train.launcher), and the next run takes the lock.

- fast: a real process that set the death signal dies when its parent is SIGKILLed;
- slow (real torchrun, 2 ranks): while a run trains, a second run into its out_dir refuses
  (exit 2, one line naming the holder) and writes nothing; `kill -KILL` of torchrun's
  process group takes both workers with it at once and no checkpoint appears afterwards;
  the next resume=auto run takes over the lock the killed rank 0 left and trains on.
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

import psutil
import pytest

from tests.fixtures import golden
from xpar.testing.processes import REPO, run_python
from xpar.train import lock

CHILD = (
    "import os, time; os.environ['TORCHELASTIC_RUN_ID'] = 'test'; "
    "from xpar.train.launcher import die_with_launcher; print(os.getpid(), die_with_launcher(), "
    "flush=True); time.sleep(60)"
)
PARENT = (
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
    "time.sleep(60)"
)


def _gone(pids: list[int], within_s: float) -> float | None:
    """Seconds until every pid has exited (a zombie counts), or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        alive = [p for p in pids if psutil.pid_exists(p)]
        try:
            if all(psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in alive):
                return time.monotonic() - t0
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.05)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_worker_dies_with_its_parent():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], env=env, stdout=subprocess.PIPE, text=True
    )
    pid, armed = parent.stdout.readline().split()
    assert armed == "True"
    parent.kill()
    parent.wait()
    assert _gone([int(pid)], 5.0) is not None
    # outside torchrun nothing is armed: a nohup'd run outlives its shell
    p = run_python("-c", "from xpar.train.launcher import die_with_launcher as d; print(d())")
    assert p.stdout == "False\n", p.stderr


def _rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _saved(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(os.listdir(root)) if root.exists() else []


@pytest.mark.slow
def test_killing_torchrun_stops_its_workers_and_the_next_run_takes_over(tmp_path):
    out = tmp_path / "run"
    base = [*golden.TINY[:-1], *golden.data_overrides(tmp_path / "cache"), "train.eval_every=1000"]
    env = golden.launch_env()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            golden.torchrun_cmd(out, [*base, "train.steps=400", "train.ckpt_every=2"]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    workers: list[int] = []
    try:
        t0 = time.monotonic()
        while _rows(out) == 0:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 120, "the run never trained"
            time.sleep(0.2)
        workers = [c.pid for c in psutil.Process(first.pid).children()]
        assert len(workers) == 2
        holder = lock.Holder.parse((out / lock.LOCK_FILE).read_text())
        assert holder.pid in workers

        # A second run into the same out_dir, while the first trains: refused, nothing written.
        p = run_python(
            "-m",
            "xpar.train",
            "experiment=tiny",
            f"train.out_dir={out}",
            "train.seed=7",
            "train.resume=auto",
        )
        assert p.returncode == 2, p.stderr[-3000:]
        assert p.stderr.startswith(f"xpar: config error: train.out_dir='{out}' is in use by ")
        assert p.stderr.count("\n") == 1 and f"(pid {holder.pid} on " in p.stderr, p.stderr
        assert "train.seed=7" not in (out / ".hydra" / "overrides.yaml").read_text()

        os.killpg(first.pid, signal.SIGKILL)  # torchrun's process group; workers have their own
        first.wait()
        took = _gone(workers, 5.0)
        assert took is not None, "workers outlived torchrun"
        print(f"workers gone {took:.2f}s after the kill")
    finally:  # whatever failed, leave no process behind
        for pid in [first.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    saved, rows = _saved(out), _rows(out)
    time.sleep(2.0)
    assert (_saved(out), _rows(out)) == (saved, rows)  # nobody trains on
    latest = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])

    # The killed rank 0 left its lock; the next resume=auto run takes it over and trains.
    p = golden.torchrun(out, [*base, "train.resume=auto", f"train.steps={latest + 1}"])
    assert f"its process {holder.pid} is gone" in p.stderr, p.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}" in p.stdout
    assert not (out / lock.LOCK_FILE).exists()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == latest + 1
