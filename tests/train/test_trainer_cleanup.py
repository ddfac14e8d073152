"""An exception inside the loop still closes W&B, restores signal handlers and ends the
process group (train's cleanup runs in a finally); test-only faults come from one place."""

import json
import os
import subprocess
import sys

import pytest

from xpar.train.faults import FaultHooks, InjectedFault

SCRIPT = r"""
import json, signal, sys
import torch.distributed as dist
from xpar.config.store import compose_config
from xpar.train.faults import InjectedFault
from xpar.train.trainer import train
from xpar.train.wandb_reader import has_exit_record, read_offline_run

before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
cfg = compose_config(["experiment=tiny", "train.resume=never", f"train.out_dir={sys.argv[1]}",
                      "train.steps=4", "parallel.ep_size=1"], world_size=1)
try:
    train(cfg)
    raised = None
except InjectedFault as e:
    raised = str(e)
run = read_offline_run(sys.argv[1])
print(json.dumps({
    "raised": raised,
    "handlers_restored": (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before,
    "process_group_alive": dist.is_initialized(),
    "wandb_closed": all(has_exit_record(f) for f in run["files"]),
    "steps_logged": sorted({r["_step"] for r in run["history"] if "train/loss" in r}),
}))
"""


@pytest.mark.slow
def test_exception_in_the_loop_cleans_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", XPAR_TEST_RAISE_AFTER_STEP="2")
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {
        "raised": "XPAR_TEST_RAISE_AFTER_STEP=2",
        "handlers_restored": True,
        "process_group_alive": False,
        "wandb_closed": True,
        "steps_logged": [1, 2],
    }


def test_fault_hooks_are_off_unless_set():
    hooks = FaultHooks.from_env({})
    assert hooks == FaultHooks()
    for step in range(1, 5):
        hooks.after_step(step)
        hooks.before_publish(step)
    with pytest.raises(InjectedFault, match="XPAR_TEST_RAISE_AFTER_STEP=3"):
        FaultHooks.from_env({"XPAR_TEST_RAISE_AFTER_STEP": "3"}).after_step(3)
