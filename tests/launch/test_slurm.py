"""launch/slurm.sbatch on a real one-node Slurm cluster (started by the fixture, as root).

1. A job runs to COMPLETED with 2 CPU ranks and writes checkpoints and metrics.
2. A job is warned with USR1 (as `--signal=B:USR1@...` does before the time
   limit): every rank stops at one step, saves, the job is requeued, resumes
   from that step in the same run directory and ends with the same loss as 1.
3. Slurm's own time-limit warning (`--signal=B:USR1@50` with `--time=1`)
   drives the same cycle without any help from the test.

The job runs tests/launch/standin_train.py (a seconds-long trainer that keeps
xpar.train's contract) unless XPAR_SLURM_TEST_ENTRY names another entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmUnavailable, down, slurm_env, up

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "launch" / "slurm.sbatch"
STANDIN = Path(__file__).resolve().parent / "standin_train.py"
STEPS = 40


class Cluster:
    def __init__(self, root: Path, work: Path):
        self.root = root
        self.work = work  # submit directory: logs and runs/ land here
        self.env = slurm_env(root)
        venv_bin = os.path.dirname(sys.executable)
        self.env.update(
            PATH=f"{venv_bin}:{self.env.get('PATH', '')}",
            PYTHON=sys.executable,
            PYTHONPATH=f"{REPO}:{self.env.get('PYTHONPATH', '')}".rstrip(":"),
            XPAR_ENTRY=os.environ.get("XPAR_SLURM_TEST_ENTRY", str(STANDIN)),
            OMP_NUM_THREADS="1",
        )
        self.jobs: list[str] = []

    def run(self, *cmd: str, check: bool = True) -> str:
        p = subprocess.run(
            cmd, env=self.env, cwd=self.work, capture_output=True, text=True, timeout=60
        )
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr}")
        return p.stdout

    def sbatch(self, name: str, *args: str, sbatch_opts: tuple[str, ...] = ()) -> str:
        jid = self.run(
            "sbatch", "--parsable", "-J", name, "--cpus-per-task=2", *sbatch_opts,
            str(SBATCH_SCRIPT), *args,
        ).strip().split(";")[0]  # fmt: skip
        self.jobs.append(jid)
        return jid

    def job(self, jid: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", jid)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def log(self, name: str, jid: str) -> str:
        p = self.work / f"{name}-{jid}.out"
        return p.read_text() if p.exists() else "(no log)"

    def wait(self, jid: str, name: str, timeout: float, skip_requeue_delay: bool = True,
             until=None) -> dict[str, str]:  # fmt: skip
        """Poll until the job ends (or until(info) is true); return its scontrol record."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        held_since: float | None = None
        while time.time() < deadline:
            info = self.job(jid)
            if until is not None and until(info):
                return info
            state = info.get("JobState")
            if state in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                return info
            held = state == "PENDING" and info.get("Reason") == "BeginTime"
            if skip_requeue_delay and held:
                # Slurm holds a requeued job back for two minutes; a test need not
                # wait that long, but a start in the same second as the requeue
                # fails ("Job credential revoked"), so leave it a few seconds.
                held_since = held_since or time.time()
                if time.time() - held_since >= 3:
                    self.run("scontrol", "update", f"JobId={jid}", "StartTime=now")
            else:
                held_since = None
            time.sleep(0.5)
        raise AssertionError(
            f"job {jid} not done after {timeout:.0f}s: {info.get('JobState')} "
            f"{info.get('Reason')}\n{self.log(name, jid)}"
        )


@pytest.fixture(scope="session")
def cluster():
    # a short root: slurmd's socket paths must stay under ~100 characters
    root = Path(tempfile.mkdtemp(prefix="xpar-slurm-"))
    work = Path(tempfile.mkdtemp(prefix="xpar-slurm-work-"))
    try:
        up(root)
    except SlurmUnavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no Slurm cluster: {e}")
    c = Cluster(root, work)
    try:
        yield c
    finally:
        for jid in c.jobs:
            c.run("scancel", jid, check=False)
        down(root)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def run_dir(c: Cluster, name: str, jid: str) -> Path:
    return c.work / "runs" / f"{name}-{jid}"


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def final_loss(log: str) -> str:
    m = re.findall(r"final loss (\S+)", log)
    assert len(m) == 1, log
    return m[0]


@pytest.fixture(scope="session")
def reference(cluster):
    """An uninterrupted run: (job id, its log)."""
    c = cluster
    jid = c.sbatch("ref", "+experiment=tiny", f"train.steps={STEPS}", sbatch_opts=("--time=5",))
    info = c.wait(jid, "ref", timeout=120)
    return jid, info, c.log("ref", jid)


def test_batch_job_completes(cluster, reference):
    c = cluster
    jid, info, log = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "0"
    assert "1 node(s) x 2 rank(s)" in log
    rd = run_dir(c, "ref", jid)
    latest = (rd / "checkpoints" / "latest").read_text().strip()
    assert (rd / "checkpoints" / latest).is_dir()
    assert latest == f"step_{STEPS - 1:06d}"
    steps = [m["step"] for m in metrics(rd)]
    assert steps == list(range(STEPS))
    assert float(final_loss(log)) < metrics(rd)[0]["loss"]
    # the job completion log (no slurmdbd here) saw it complete too
    comp = (c.root / "log" / "jobcomp.txt").read_text()
    assert re.search(rf"JobId={jid} .*JobState=COMPLETED", comp), comp


def check_resumed(c: Cluster, name: str, jid: str, info: dict, ref_log: str) -> list[int]:
    """The job was stopped, requeued and resumed (maybe more than once) and still
    trained every step exactly once, in one run, to the reference's final loss."""
    log = c.log(name, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR1 at step (\d+)", log)]
    assert stops and int(info["Restarts"]) == len(stops), log
    rd = run_dir(c, name, jid)
    requeues = (rd / "slurm" / "requeues.log").read_text().splitlines()
    assert len(requeues) == len(stops), requeues
    for line, stop in zip(requeues, stops, strict=True):
        assert f'"step": {stop}' in line, requeues
    starts = re.findall(r"run (\w+) world 2 start step (\d+) restarts (\d+)", log)
    expected = [("0", "0")] + [(str(s + 1), str(i + 1)) for i, s in enumerate(stops)]
    assert [(s, r) for _, s, r in starts] == expected, log
    assert len({run for run, _, _ in starts}) == 1, "a requeued job must continue the same run"
    ms = metrics(rd)
    assert [m["step"] for m in ms] == list(range(STEPS)), "a step was lost or repeated"
    assert {m["run_id"] for m in ms} == {starts[0][0]}
    assert final_loss(log) == final_loss(ref_log), "resume changed the result"
    assert not (rd / "slurm" / "preempt.flag").exists()
    return stops


def test_warning_signal_saves_requeues_and_resumes(cluster, reference):
    c = cluster
    steps_log = c.work / "pre-steps.log"
    jid = c.sbatch(
        "pre", "+experiment=tiny", f"train.steps={STEPS}", "standin.step_sleep=0.1",
        f"standin.log={steps_log}", sbatch_opts=("--time=5",),
    )  # fmt: skip

    def trained_a_few_steps(info):
        return steps_log.exists() and len(steps_log.read_text().split()) >= 8

    info = c.wait(jid, "pre", timeout=90, until=trained_a_few_steps)
    assert info["JobState"] == "RUNNING", c.log("pre", jid)
    # what Slurm does at --signal=B:USR1@<s>: signal the batch shell only
    c.run("scancel", "--batch", "--signal=USR1", jid)
    info = c.wait(jid, "pre", timeout=150)
    stops = check_resumed(c, "pre", jid, info, reference[2])
    assert len(stops) == 1 and 8 <= stops[0] < STEPS - 1


def test_time_limit_warning_from_slurm(cluster, reference):
    """No help from the test: Slurm itself sends USR1 when 50 s of --time=1 are left.

    Slurm checks time limits on a coarse tick (~30 s here), so the warning comes
    between 10 and ~40 s into each allocation. The first allocation trains
    slowly enough to be caught; a later warning during a resumed allocation
    just adds another requeue, which check_resumed accepts.
    """
    c = cluster
    jid = c.sbatch(
        "tl", "+experiment=tiny", f"train.steps={STEPS}", "standin.step_sleep=1.0",
        "standin.sleep_only_first=true", sbatch_opts=("--time=1", "--signal=B:USR1@50"),
    )  # fmt: skip
    info = c.wait(jid, "tl", timeout=150)
    log = c.log("tl", jid)
    assert "warning signal: asking every rank to save and stop" in log, log
    check_resumed(c, "tl", jid, info, reference[2])


if __name__ == "__main__":  # debugging: python tests/launch/test_slurm.py
    sys.exit(pytest.main([__file__, "-v", "-s"]))
