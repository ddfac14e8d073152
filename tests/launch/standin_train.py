"""A seconds-long stand-in for `python -m xpar.train`, for the launch tests.

It keeps the trainer's contract with the launch scripts: Hydra-style
`key=value` overrides (train.out_dir, train.resume=auto, train.steps, ...),
torchrun's environment, gloo, PreemptionWatcher, checkpoints under
<out_dir>/checkpoints/ with a `latest` pointer, a run id that survives
requeues, metrics on rank 0. The "model" is a vector fitted by SGD on data
drawn from the step number, so a resumed run ends with exactly the loss of an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import torch
import torch.distributed as dist

from xpar.train.preempt import PreemptionWatcher

DEFAULTS = {
    "train.out_dir": "outputs/standin",
    "train.resume": "auto",
    "train.steps": "40",
    "train.ckpt_every": "10",
    "standin.step_sleep": "0.0",
    "standin.sleep_only_first": "false",  # sleep only before the first requeue
    "standin.log": "",  # a file: rank 0 appends one line per step (what tests poll)
}


def parse_overrides(argv: list[str]) -> dict[str, str]:
    cfg = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"standin: expected key=value, got {arg!r}")
        if key == "+experiment":
            # as the real trainer does: the defaults list already has experiment: null
            raise SystemExit(f"standin: {arg!r} cannot compose; use experiment=...")
        key = key.lstrip("+")
        if key == "experiment":
            continue  # experiment=tiny: the stand-in is always tiny
        cfg[key] = value
    return cfg


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    return x, y


def save(ckpt_root: str, step: int, w: torch.Tensor, run_id: str) -> None:
    name = f"step_{step:06d}"
    tmp = os.path.join(ckpt_root, name + ".tmp")
    os.makedirs(tmp, exist_ok=True)
    torch.save({"w": w}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, "run_id": run_id}, f)
    os.replace(tmp, os.path.join(ckpt_root, name))
    with open(os.path.join(ckpt_root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(ckpt_root, "latest.tmp"), os.path.join(ckpt_root, "latest"))


def step_sleep(cfg: dict[str, str]) -> float:
    if (
        cfg["standin.sleep_only_first"] == "true"
        and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    ):
        return 0.0
    return float(cfg["standin.step_sleep"])


def resume(cfg: dict[str, str], ckpt_root: str) -> tuple[torch.Tensor, int, str]:
    """(w, first step, run id): from the latest checkpoint, else fresh."""
    w = torch.zeros(4, dtype=torch.float64)
    start, run_id = 0, uuid.uuid4().hex[:8]
    latest = os.path.join(ckpt_root, "latest")
    if cfg["train.resume"] == "auto" and os.path.exists(latest):
        with open(latest) as f:
            d = os.path.join(ckpt_root, f.read().strip())
        w = torch.load(os.path.join(d, "state.pt"), weights_only=True)["w"]
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        start, run_id = meta["step"] + 1, meta["run_id"]
    # every rank must use rank 0's run id (fresh runs draw one at random)
    ids = [run_id]
    dist.broadcast_object_list(ids, src=0)
    return w, start, ids[0]


def sgd_step(w: torch.Tensor, step: int, rank: int, world: int) -> float:
    """One data-parallel step on w (in place); returns the mean loss over ranks."""
    x, y = batch(step, rank)
    err = x @ w - y
    grad = 2 * x.T @ err / len(y)
    stats = torch.cat([grad, (err**2).mean().reshape(1)])
    dist.all_reduce(stats)
    stats /= world
    w -= 0.05 * stats[:4]
    return float(stats[4])


def log_step(cfg: dict[str, str], out: str, step: int, loss: float, run_id: str) -> None:
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "loss": loss, "run_id": run_id}) + "\n")
    if cfg["standin.log"]:
        with open(cfg["standin.log"], "a") as f:
            f.write(f"{step}\n")


def main(argv: list[str]) -> int:
    cfg = parse_overrides(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = cfg["train.out_dir"]
    ckpt_root = os.path.join(out, "checkpoints")
    steps = int(cfg["train.steps"])
    sleep = step_sleep(cfg)
    watcher = PreemptionWatcher()

    w, start, run_id = resume(cfg, ckpt_root)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"standin: run {run_id} world {world} start step {start} restarts {restarts}")
        if os.environ.get("XPAR_PREFIXED"):
            print("standin: launched through XPAR_LAUNCH_PREFIX")

    loss = float("nan")
    step = start - 1
    for step in range(start, steps):
        loss = sgd_step(w, step, rank, world)
        if rank == 0:
            log_step(cfg, out, step, loss, run_id)
        stop = watcher.should_stop(step)
        if rank == 0 and (stop or (step + 1) % int(cfg["train.ckpt_every"]) == 0):
            save(ckpt_root, step, w, run_id)
        if stop:
            break
        time.sleep(sleep)
    dist.barrier()  # the checkpoint is on disk before anyone asks for a requeue
    if watcher.stopped_by is not None:
        if rank == 0:
            print(f"standin: stopped by {watcher.stopped_by.name} at step {step}", flush=True)
    elif rank == 0:
        print(f"standin: finished step {step} final loss {loss:.12e} run {run_id}", flush=True)
    watcher.requeue_if_slurm()
    watcher.uninstall()
    dist.destroy_process_group()
    return watcher.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
