"""A real @hydra.main run per rank: deterministic run dir, cwd kept, only rank 0 writes .hydra/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from xpar.testing.processes import run_python

APP = Path(__file__).with_name("config_hydra_app.py")
REPO = Path(__file__).resolve().parents[2]


def _run(rank: int, cwd: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE="2", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("SLURM_PROCID", None)
    return subprocess.run(
        [sys.executable, str(APP), "experiment=tiny", f"train.out_dir={out_dir}", *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _result(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, p.stdout
    return json.loads(lines[0][len("RESULT ") :])


def test_ranks_share_the_run_dir_and_only_rank0_writes_hydra(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    p1 = _run(1, elsewhere, out)
    r1 = _result(p1)
    assert not (out / ".hydra").exists()  # rank 1 wrote no .hydra/
    assert r1["cwd"] == str(elsewhere)  # hydra.job.chdir=False
    assert "composed run tiny" not in p1.stdout  # other ranks are quiet...
    assert "a warning every rank shows" in p1.stdout  # ...unless something is wrong
    assert "composed run tiny" in (out / "config_hydra_app.rank1.log").read_text()

    p0 = _run(0, elsewhere, out)
    r0 = _result(p0)
    assert (out / ".hydra" / "config.yaml").is_file()
    assert (out / ".hydra" / "overrides.yaml").is_file()
    assert "composed run tiny" in p0.stdout
    assert "composed run tiny" in (out / "config_hydra_app.log").read_text()
    assert r0["cfg"] == r1["cfg"]  # every rank composes the same config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "run"]  # no timestamp dirs


def test_default_run_dir_is_outputs_run_name_under_launch_dir(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", PYTHONPATH=str(REPO))
    p = subprocess.run(
        [sys.executable, str(APP), "experiment=tiny", "logger.run_name=smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert _result(p)["cfg"]["train"]["out_dir"] == "outputs/smoke"
    assert (tmp_path / "outputs" / "smoke" / ".hydra" / "config.yaml").is_file()


def test_bad_override_fails_the_app_with_the_field_named(tmp_path):
    p = _run(0, tmp_path, tmp_path / "run", "parallel.zero_stage=3")
    assert p.returncode != 0
    assert "parallel.zero_stage=3 with MoE layers is not supported" in p.stderr


SECRETS = ("abc123xyz", "SECRET123")
SECRET_OVERRIDES = [
    "+parallel.deepspeed.comet.api_key=abc123xyz",
    "logger.run_name='api_key=SECRET123'",
]


def _files_holding(root: Path, secrets=SECRETS) -> list[str]:
    return [
        str(p)
        for p in root.rglob("*")
        if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)
    ]


def test_hydra_files_are_redacted(tmp_path):
    # Hydra writes .hydra/ from the raw overrides before the app's code runs: the app (as the
    # trainer) redacts them first. The run name is then refused, never echoed.
    out = tmp_path / "run"
    p = _run(0, tmp_path, out, *SECRET_OVERRIDES)
    # (Hydra's own "Error executing job with overrides: [...]" on stderr still has them; the
    # trainer ends on a config error itself, without it.)
    assert p.returncode != 0 and "logger.run_name=<redacted> looks like an API key" in p.stderr
    overrides = (out / ".hydra" / "overrides.yaml").read_text()
    assert overrides.count("<redacted>") == 2 and "experiment=tiny" in overrides
    assert "api_key: <redacted>" in (out / ".hydra" / "config.yaml").read_text()
    assert _files_holding(out) == []


def test_the_trainer_keeps_secrets_out_of_its_files(tmp_path):
    # A secret-shaped run name (it would name the out_dir, outputs/${logger.run_name}) is
    # refused before Hydra writes anything.
    p = run_python("-m", "xpar.train", "experiment=tiny", f"hydra.run.dir={tmp_path}/x",
                   "logger.run_name='api_key=SECRET123'", timeout=120)  # fmt: skip
    assert p.returncode == 2 and p.stderr.startswith("xpar: config error: logger.run_name=<red")
    assert "SECRET123" not in p.stdout + p.stderr and list(tmp_path.iterdir()) == []
    # An allowed secret (a DeepSpeed comet key) reaches the trainer: its .hydra/ is redacted
    # before anything else (here the data build refuses a binary, after Hydra's files).
    shutil.copy(sys.executable, tmp_path / "x.txt")
    out = tmp_path / "run"
    p = run_python("-m", "xpar.train", "experiment=tiny", f"train.out_dir={out}",
                   f"data.files=[{tmp_path / 'x.txt'}]", f"data.cache_dir={tmp_path / 'cache'}",
                   SECRET_OVERRIDES[0], timeout=120)  # fmt: skip
    assert p.returncode == 2 and "1 file(s) not text" in p.stderr, p.stderr
    assert (out / ".hydra" / "overrides.yaml").is_file() and _files_holding(out) == []


def test_a_crash_prints_its_traceback_without_the_raw_overrides(tmp_path):
    # Hydra's own report of a failed job lists the overrides as typed, secrets too; the
    # trainer prints the traceback itself and exits 1.
    p = run_python(
        "-m", "xpar.train", "experiment=tiny", f"hydra.run.dir={tmp_path}/x",
        f"train.out_dir={tmp_path}/x", "logger.wandb_mode=disabled",
        "+parallel.deepspeed.comet.api_key=abc123xyz",
        timeout=120, XPAR_TEST_RAISE_AFTER_STEP="1",
    )  # fmt: skip
    assert p.returncode == 1, p.stderr[-2000:]
    assert "InjectedFault: XPAR_TEST_RAISE_AFTER_STEP=1" in p.stderr
    assert "Error executing job" not in p.stderr
    assert "abc123xyz" not in p.stdout + p.stderr
    assert _files_holding(tmp_path) == []
