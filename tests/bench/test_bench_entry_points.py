"""`python -m xpar.bench [NAME] [options]` and each benchmark's own argument parsing.

Real subprocesses (plain python, and real torchrun for moe); every option has a description.
"""

import argparse
import subprocess

import pytest

from xpar.bench import moe, quality
from xpar.bench.__main__ import BENCHMARKS, split
from xpar.testing.processes import run_python


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_python(*args, timeout=300, **env)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args)


def test_help_lists_every_benchmark():
    p = _run("-m", "xpar.bench", "--help")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    for name in BENCHMARKS:
        assert f"\n  {name} " in p.stdout, p.stdout
    assert "unknown benchmark" not in p.stdout


@pytest.mark.parametrize("parser", [moe._parser, quality._parser], ids=["moe", "quality"])
def test_every_option_is_described(parser):
    ap = parser()
    for action in ap._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    assert ap.format_help()  # and the whole page renders


def test_an_option_first_means_moe():
    assert split([]) == ("moe", [])
    assert split(["--rows", "1"]) == ("moe", ["--rows", "1"])
    assert split(["quality", "--steps", "3"]) == ("quality", ["--steps", "3"])


def test_moe_outside_torchrun_is_one_line_naming_the_fix():
    for args in ([], ["moe"], ["--rows", "1"], ["dispatch"]):
        p = _run("-m", "xpar.bench", *args)
        assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
        assert "needs torchrun" in p.stderr and "torchrun --standalone" in p.stderr, p.stderr
        # refused before deepspeed is imported: no mpi4py traceback, no accelerator warning
        assert "Traceback" not in p.stderr and "accelerator" not in p.stderr


def test_a_bad_option_is_a_usage_error_not_a_traceback():
    p = _run("-m", "xpar.bench", "moe", "--rows", "9")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "argument --rows: '9' names no row or a row outside 0..3" in p.stderr


def test_an_unknown_benchmark_suggests_one():
    p = _run("-m", "xpar.bench", "qualty")
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr.startswith("xpar.bench: unknown benchmark 'qualty': did you mean quality? ")


def test_quality_refuses_to_run_once_per_rank():
    p = _run("-m", "xpar.bench", "quality", "--steps", "3", WORLD_SIZE="2", RANK="0")
    assert p.returncode == 2 and "without torchrun" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1


def test_startup_is_dispatched():
    pytest.importorskip("xpar.bench.startup", reason="xpar/bench/startup.py not written yet")
    p = _run("-m", "xpar.bench", "startup", "--help")
    assert p.returncode == 0 and "usage:" in p.stdout, p.stdout + p.stderr


def test_under_torchrun_help_is_printed_once_and_options_reach_moe():
    p = _torchrun("-m", "xpar.bench", "--help")
    assert p.returncode == 0 and p.stdout.count("benchmarks:") == 1, p.stdout + p.stderr
    p = _torchrun("-m", "xpar.bench", "moe", "--help")
    assert p.returncode == 0 and p.stdout.count("rows (--rows picks some):") == 1, p.stdout


@pytest.mark.slow
def test_moe_runs_under_torchrun_with_the_options_it_was_given():
    p = _torchrun("-m", "xpar.bench", "--rows", "1", "--rounds", "1", "--iters", "1")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| 8 ")]
    assert len(rows) == 1 and rows[0].startswith("| 8 | 2 | 256 | 1024 | 512 |"), p.stdout
