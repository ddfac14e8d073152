"""conf/ ships inside the package: a non-editable install composes from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")


def _setuptools_cfg() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_xpar_package_is_listed_in_pyproject():
    st = _setuptools_cfg()
    listed = set(st["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "xpar").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(on_disk - listed)
    assert not missing, (
        f"add {missing} to [tool.setuptools] packages in pyproject.toml "
        "(an explicit list because xpar.conf is mapped from conf/)"
    )
    assert st["package-dir"]["xpar.conf"] == "conf"
    assert "xpar.conf" in listed


def _tracked_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(".venv"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.mark.slow
def test_wheel_install_composes_from_another_cwd(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git to list the source files")
    src, dist, target, elsewhere = (tmp_path / n for n in ("src", "dist", "site", "elsewhere"))
    for d in (src, elsewhere):
        d.mkdir()
    _tracked_tree(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("xpar-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import xpar, xpar.config as c; "
        "cfg = c.compose_config(['experiment=tiny'], world_size=2, cuda_available=False); "
        "print('RESULT', xpar.__file__, c.CONFIG_DIR, cfg.model.d_model)"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    _, mod, conf, d_model = line.split()
    assert Path(mod).is_relative_to(target)  # the installed copy, not the source tree
    assert Path(conf) == target / "xpar" / "conf"
    assert d_model == "64"
