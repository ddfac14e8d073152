"""A real @hydra.main run per rank: deterministic run dir, cwd kept, only rank 0 writes .hydra/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
