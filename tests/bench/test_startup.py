"""The start-up benchmark: its table from the trainer's startup.json, and one real launch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from xpar.bench import startup
from xpar.train.phases import PhaseTimer


def test_help_describes_every_option():
    p = subprocess.run(
        [sys.executable, "-m", "xpar.bench.startup", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    for option in ("--runs", "--nproc", "--target-s", "--out", "--workdir", "OVERRIDE"):
        assert option in p.stdout


def test_a_run_is_read_from_the_trainers_startup_file(tmp_path):
    timer = PhaseTimer(start=1000.0)
    timer.phases, timer._last = {"imports": 2.0, "first step": 0.5}, 1002.5
    path = timer.write(tmp_path / "startup.json")
    run = startup.read_run(path, t_launch=999.0, t_end=1005.0, output="", exit_code=0, load=0.5)
    assert (run.launcher_s, run.first_step_s, run.total_s) == (1.0, 3.5, 6.0)
    assert run.phases == {"imports": 2.0, "first step": 0.5} and not run.compiled
    built = startup.read_run(path, 999.0, 1005.0, "op foo built successfully", 0, 0.5)
    assert built.compiled
    table = startup.report([run, built], target_s=10.0, nproc=2)
    for row in (
        r"  imports +2\.00 +2\.00",
        r"launcher \(torchrun\) +1\.00 +1\.00",
        r"first step done +3\.50 +3\.50",
        r"  / target 10s +0\.35 +0\.35",
        r"compiled anything +no +yes",
    ):
        assert re.search(rf"^{row}$", table, re.M), (row, table)


def test_a_missing_startup_file_says_what_the_run_printed(tmp_path):
    with pytest.raises(RuntimeError, match="wrote no .*exit 2.*\nxpar: config error"):
        startup.read_run(tmp_path / "none.json", 0.0, 1.0, "xpar: config error: x\n", 2, 0.0)


@pytest.mark.slow
def test_one_real_launch_reports_every_phase_and_compiles_nothing(tmp_path, capsys):
    startup.main(["--runs", "1", "--out", str(tmp_path), "logger=none"])
    table = capsys.readouterr().out
    for phase in ("launcher (torchrun)", "imports", "config", "engine", "first step done"):
        assert phase in table, table
    assert re.search(r"^compiled anything +no$", table, re.M), table
    assert not any((tmp_path / "torch_extensions").iterdir())
