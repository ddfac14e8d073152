"""launch/slurm.sbatch on a real one-node Slurm cluster (started by the fixture, as root).

1. The trainer (`experiment=tiny`, 2 CPU ranks) runs to COMPLETED and writes
   checkpoints, metrics and an offline W&B run.
2. The trainer is warned with USR1 the way `--signal=B:USR1@...` warns it:
   every rank stops at one step, saves, the job is requeued, resumes from that
   step in the same run directory and W&B run, and ends with the same loss as 1.
3. Slurm's own time-limit warning (`--signal=B:USR1@50`, `--time=1`) drives the
   same cycle with no help from the test. It runs tests/launch/standin_train.py
   (seconds-long, mostly asleep, same contract as the trainer), submitted first
   so that its waiting overlaps the other jobs.
4. A bad config fails the job with one line and exit status 2 before any torchrun starts
   (the batch script's config check, with the job's world size).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmUnavailable, down, slurm_env, up

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "launch" / "slurm.sbatch"
STANDIN = Path(__file__).resolve().parent / "standin_train.py"
TRAINER = "-m xpar.train"
# experiment=tiny trained long enough (a few seconds) that a signal sent after step 2
# always lands before the last step; at tiny's own 6 steps it sometimes came too late.
TINY_STEPS = 40
TINY = ("experiment=tiny", f"train.steps={TINY_STEPS}")
STANDIN_STEPS = 40
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


class Cluster:
    def __init__(self, root: Path, work: Path):
        self.root = root
        self.work = work  # submit directory: job logs and runs/ land here
        self.env = slurm_env(root)
        venv_bin = os.path.dirname(sys.executable)
        self.env.update(
            PATH=f"{venv_bin}:{self.env.get('PATH', '')}",
            PYTHON=sys.executable,
            PYTHONPATH=f"{REPO}:{self.env.get('PYTHONPATH', '')}".rstrip(":"),
            OMP_NUM_THREADS="1",
            WANDB_MODE="offline",
        )
        self.jobs: list[str] = []
        self._stop = threading.Event()
        self._releaser = threading.Thread(target=self._release_requeued, daemon=True)
        self._releaser.start()

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> str:
        p = subprocess.run(
            cmd, env=env or self.env, cwd=self.work, capture_output=True, text=True, timeout=60
        )
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr}")
        return p.stdout

    def sbatch(
        self, name: str, entry: str, *args: str, opts: tuple[str, ...] = (), **env_extra: str
    ) -> str:
        # one CPU each: two jobs fit on this 2-core node at once (no binding: ranks share both)
        env = dict(self.env, XPAR_ENTRY=entry, **env_extra)
        out = self.run("sbatch", "--parsable", "-J", name, "--cpus-per-task=1", *opts,
                       str(SBATCH_SCRIPT), *args, env=env)  # fmt: skip
        jid = out.strip().split(";")[0]
        self.jobs.append(jid)
        return jid

    def job(self, jid: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", jid)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def log(self, name: str, jid: str) -> str:
        p = self.work / f"{name}-{jid}.out"
        return p.read_text() if p.exists() else "(no log)"

    def run_dir(self, name: str, jid: str) -> Path:
        return self.work / "runs" / f"{name}-{jid}"

    def _release_requeued(self) -> None:
        """Slurm holds a requeued job back for two minutes (BeginTime); the tests
        need not wait that long. A start in the same second as the requeue fails
        ("Job credential revoked"), so each hold is kept for 3 s."""
        held_since: dict[str, float] = {}
        while not self._stop.wait(0.5):
            p = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], env=self.env,
                               capture_output=True, text=True)  # fmt: skip
            held = {
                j for j, r in (line.split() for line in p.stdout.splitlines()) if r == "BeginTime"
            }
            for jid in held:
                since = held_since.setdefault(jid, time.time())
                if time.time() - since >= 3:
                    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"],
                                   env=self.env, capture_output=True)  # fmt: skip
            held_since = {j: t for j, t in held_since.items() if j in held}

    def wait(self, jid: str, name: str, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job ends (or until(info) holds); return its scontrol record."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(jid)
            if (until is not None and until(info)) or info.get("JobState") in DONE:
                return info
            time.sleep(0.5)
        raise AssertionError(
            f"job {jid} not done after {timeout:.0f}s: {info.get('JobState')} "
            f"{info.get('Reason')}\n{self.log(name, jid)}"
        )

    def close(self) -> None:
        self._stop.set()
        self._releaser.join(timeout=5)
        for jid in self.jobs:
            self.run("scancel", jid, check=False)


@pytest.fixture(scope="session")
def cluster():
    # short paths: slurmd's socket paths must stay under ~100 characters
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
        c.close()
        down(root)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def timelimit_job(cluster):
    """Submitted before anything else: it mostly sleeps, waiting for Slurm's warning."""
    return cluster.sbatch(
        "tl", str(STANDIN), f"train.steps={STANDIN_STEPS}", "standin.step_sleep=1.0",
        "standin.sleep_only_first=true", opts=("--time=1", "--signal=B:USR1@50"),
        # the container hooks, exercised with harmless stand-ins for pyxis/apptainer words
        XPAR_SRUN_ARGS="--quiet --job-name=tl-step", XPAR_LAUNCH_PREFIX="env XPAR_PREFIXED=1",
    )  # fmt: skip


@pytest.fixture(scope="session")
def reference(cluster, timelimit_job):
    """An uninterrupted tiny run of the trainer: (job id, scontrol record, log)."""
    jid = cluster.sbatch("ref", TRAINER, *TINY, opts=("--time=10",))
    info = cluster.wait(jid, "ref", timeout=240)
    return jid, info, cluster.log("ref", jid)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_run_ids(run_dir: Path) -> set[str]:
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {run_dir / 'wandb'}"
    return {p.name.rsplit("-", 1)[-1] for p in runs}


def test_batch_job_completes(cluster, reference):
    jid, info, log = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "0"
    assert "1 node(s) x 2 rank(s)" in log and "world=2" in log, log
    rd = cluster.run_dir("ref", jid)
    latest = (rd / "checkpoints" / "latest").read_text().strip()
    assert (rd / "checkpoints" / latest).is_dir() and latest.endswith(f"{TINY_STEPS:08d}"), latest
    ms = metrics(rd)
    assert [m["step"] for m in ms] == list(range(1, TINY_STEPS + 1))
    assert ms[-1]["loss"] < ms[0]["loss"]
    assert len(wandb_run_ids(rd)) == 1
    # the job completion log (no slurmdbd here) saw it complete too
    comp = (cluster.root / "log" / "jobcomp.txt").read_text()
    assert re.search(rf"JobId={jid} .*JobState=COMPLETED", comp), comp


def test_warning_signal_saves_requeues_and_resumes(cluster, reference):
    c = cluster
    jid = c.sbatch("pre", TRAINER, *TINY, opts=("--time=10",))
    rd = c.run_dir("pre", jid)

    def trained_two_steps(info):
        path = rd / "metrics.jsonl"
        return path.exists() and len(path.read_text().splitlines()) >= 2

    info = c.wait(jid, "pre", timeout=240, until=trained_two_steps)
    assert info["JobState"] == "RUNNING", c.log("pre", jid)
    # what Slurm does at --signal=B:USR1@<s>: signal the batch shell only
    c.run("scancel", "--batch", "--signal=USR1", jid)
    info = c.wait(jid, "pre", timeout=300)
    log = c.log("pre", jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    stop = int(re.search(r"SIGUSR1 received: all ranks stop after step (\d+)", log).group(1))
    assert 2 <= stop < TINY_STEPS, log
    requeues = (rd / "slurm" / "requeues.log").read_text().splitlines()
    assert len(requeues) == 1 and f'"step": {stop}' in requeues[0], requeues
    assert re.search(rf"resumed from \S+ at step {stop}\b", log), log
    ms = metrics(rd)
    assert [m["step"] for m in ms] == list(range(1, TINY_STEPS + 1)), "a step lost or repeated"
    assert len(wandb_run_ids(rd)) == 1, "the requeued job must continue the same W&B run"
    ref_ms = metrics(c.run_dir("ref", reference[0]))
    assert ms[-1]["loss"] == ref_ms[-1]["loss"], "preempt + resume changed the final loss"
    assert not (rd / "slurm" / "preempt.flag").exists()


def test_time_limit_warning_from_slurm(cluster, timelimit_job):
    """Slurm checks time limits on a coarse tick (~30 s here), so its warning
    comes 10 to ~40 s into an allocation. The first allocation trains slowly
    enough to be caught; a warning in a resumed allocation would just add a
    requeue, which the checks below allow."""
    c, jid = cluster, timelimit_job
    info = c.wait(jid, "tl", timeout=240)
    log = c.log("tl", jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "warning signal: asking every rank to save and stop" in log, log
    assert "launched through XPAR_LAUNCH_PREFIX" in log, log
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR1 at step (\d+)", log)]
    assert stops and int(info["Restarts"]) == len(stops), log
    rd = c.run_dir("tl", jid)
    requeues = (rd / "slurm" / "requeues.log").read_text().splitlines()
    assert [json.loads(line.split(" ", 3)[3])["step"] for line in requeues] == stops
    starts = re.findall(r"run (\w+) world 2 start step (\d+) restarts (\d+)", log)
    expected = [("0", "0")] + [(str(s + 1), str(i + 1)) for i, s in enumerate(stops)]
    assert [(s, r) for _, s, r in starts] == expected, log
    assert len({run for run, _, _ in starts}) == 1, "a requeued job must continue the same run"
    assert [m["step"] for m in metrics(rd)] == list(range(STANDIN_STEPS))
    assert re.search(rf"finished step {STANDIN_STEPS - 1} final loss", log), log


def test_a_bad_config_fails_the_job_in_one_line_before_any_rank(cluster):
    """The batch script's config check: with the job's world (1 node x 2 ranks), in one srun
    task, before torchrun. ep_size=4 is fine for tiny's 4 experts but not for 2 ranks."""
    jid = cluster.sbatch("bad", TRAINER, "experiment=tiny", "parallel.ep_size=4",
                         opts=("--time=5",))  # fmt: skip
    info = cluster.wait(jid, "bad", timeout=120)
    log = cluster.log("bad", jid)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert info["Restarts"] == "0", log
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert errors == [
        "xpar: config error: parallel.ep_size=4 does not divide the world size 2: "
        "expert-parallel groups must tile the ranks; choose parallel.ep_size in [1, 2] "
        "(0 = all ranks)"
    ], log
    assert "stopped before any rank started, exit 2" in log, log
    assert "Traceback" not in log and "torch.distributed" not in log and "world=" not in log, log
    assert not (cluster.run_dir("bad", jid) / "checkpoints").exists()


if __name__ == "__main__":  # debugging: python tests/launch/test_slurm.py
    sys.exit(pytest.main([__file__, "-v", "-s"]))
