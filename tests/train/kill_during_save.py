"""Kill a real trainer at random moments while it saves; after each kill `latest` must name
a checkpoint that loads, and the next run resumes it.

    python tests/train/kill_during_save.py OUT_DIR KILLS SEED     (prints one JSON line)

The trainer (a world of one, a checkpoint every step) is imported once; each run is a fork
of this process, so a run costs its start-up (data, engine) and not the imports. Nothing
here touches torch before a fork but torch.load of the files checked between kills.
`latest_problem` is the check, shared with the 2-rank kill test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from tests.fixtures import golden


def latest_problem(root: Path) -> str | None:
    """What is wrong with the checkpoint `latest` names (None: it loads, or there is none):
    every file verifies against its checksum and torch.load reads every rank file."""
    import torch

    from xpar.parallel.deepspeed import XparEngine
    from xpar.train import checkpoint as ckpt

    try:
        d = ckpt.latest(root)
    except FileNotFoundError as e:
        return str(e)
    if d is None:
        return None
    ranks = sorted(d.glob("rank*.pt"))
    if not ranks:
        return f"{d} has no rank file"
    for f in [d / ckpt.CLIENT_STATE, d / ckpt.LAYOUT_FILE, *ranks]:
        problem = ckpt.file_problem(f)
        if problem is not None:
            return problem
    for f in ranks:
        with torch.serialization.safe_globals(XparEngine.safe_globals()):
            torch.load(f, map_location="cpu", weights_only=True)
    return None


def pointer(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def mid_save(root: Path) -> bool:
    """Whether the last kill hit a save: a temp file, or a step newer than `latest`."""
    name = pointer(root) or ""
    return any(root.glob("step_*/.*.tmp-*")) or any(
        p.name > name for p in root.glob("step_*") if p.is_dir()
    )


def _run(train, cfg, log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        code = train(cfg).exit_code
    finally:
        os._exit(code)


def _wait_for_save(root: Path, before: str | None, pid: int, log: Path, timeout: float) -> None:
    """Until the child (which resumed `before`) has published a checkpoint of its own."""
    t0 = time.monotonic()
    while pointer(root) == before:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise SystemExit(
                f"the run ended ({status}) before it saved:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            raise SystemExit(f"no checkpoint after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)


def main(out: Path, kills: int, seed: int) -> dict:
    from xpar.config.store import compose_config
    from xpar.train.trainer import train

    rng = random.Random(seed)
    base = [
        "experiment=tiny",
        "data=files",
        *golden.data_overrides(out.parent / "cache"),
        "logger.wandb_mode=disabled",
        f"train.out_dir={out}",
        "train.ckpt_every=1",
        "train.eval_every=100000",
        "parallel.ep_size=1",
    ]
    cfg = compose_config([*base, "train.steps=100000"], world_size=1, cuda_available=False)
    root = out / "checkpoints"
    report = {"kills": 0, "mid_save": 0, "steps": [], "problems": []}
    t0 = time.monotonic()
    for i in range(kills):
        before, log = pointer(root), out.parent / f"run{i}.log"
        pid = os.fork()
        if pid == 0:
            _run(train, cfg, log)
        _wait_for_save(root, before, pid, log, timeout=120)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report["kills"] += 1
        report["mid_save"] += mid_save(root)
        report["steps"].append(pointer(root))
        problem = latest_problem(root)
        if problem is not None:
            report["problems"].append(problem)
    # One more run, left to finish: it resumes the last kill's checkpoint and trains on.
    step = int((pointer(root) or "step_0").split("_")[1])
    end = compose_config([*base, f"train.steps={step + 2}"], world_size=1, cuda_available=False)
    log = out.parent / "final.log"
    pid = os.fork()
    if pid == 0:
        _run(train, end, log)
    _, status = os.waitpid(pid, 0)
    report["final_exit"] = os.waitstatus_to_exitcode(status)
    report["final_resumed"] = f"at step {step}" in log.read_text()
    report["final_latest"] = pointer(root)
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


if __name__ == "__main__":
    out_dir, n, seed_ = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(main(out_dir, n, seed_)))
