"""torchrun --max-restarts: one rank SIGKILLed mid-run, the restarted group resumes from the
latest checkpoint and ends on exactly the loss of a run that was never interrupted."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures import golden

pytestmark = pytest.mark.slow

STEPS = ["train.steps=40", "train.ckpt_every=10", "train.eval_every=100"]


def _worker_pid(torchrun_pid: int, local_rank: int) -> int | None:
    """The worker torchrun started for `local_rank` (read from each child's environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun_pid and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(entry.name)
    return None


def _step_reached(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return len(metrics.read_text().splitlines())


def test_a_killed_rank_is_restarted_and_the_run_ends_on_the_uninterrupted_loss(tmp_path):
    # resume=auto: the restarted group must find the checkpoint (TINY says never)
    tiny = [o for o in golden.TINY if not o.startswith("train.resume=")]
    overrides = tiny + golden.data_overrides(tmp_path / "cache") + STEPS
    straight = tmp_path / "straight"
    golden.torchrun(straight, overrides)
    want = golden.losses(straight)

    out = tmp_path / "restarted"
    cmd = golden.torchrun_cmd(out, overrides, launcher_args=("--max-restarts", "1"))
    env = golden.launch_env()
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _step_reached(out) < 15 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        victim = _worker_pid(p.pid, 1)
        assert victim is not None and _step_reached(out) < 40, "the run ended before the kill"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    resumed = [ln for ln in stdout.splitlines() if ln.startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].endswith(("at step 10", "at step 20")), stdout
    got = golden.losses(out)  # the rows the restarted group wrote replace the lost ones
    assert got[40] == want[40], (got[40], want[40])
    assert got == want
