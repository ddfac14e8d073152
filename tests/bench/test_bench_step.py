"""`python -m xpar.bench step`: the whole training step, xpar vs DeepSpeed's MoE, under a
real torchrun with two gloo ranks and real DeepSpeed engines."""

import argparse

import pytest

from xpar.bench import step
from xpar.testing.processes import run_python


def test_every_option_is_described():
    ap = step._parser()
    for action in ap._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    assert "tiny:" in ap.format_help()


def test_outside_torchrun_it_is_one_line_naming_the_fix():
    p = run_python("-m", "xpar.bench", "step", "--steps", "1", timeout=120)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    assert "needs torchrun" in p.stderr and "torchrun --standalone" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_both_arms_train_and_the_table_has_a_ratio():
    p = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "xpar.bench", "step", "--preset", "tiny", "--steps", "2", "--rounds", "1",
        timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in p.stdout.splitlines()
            if line.startswith("| xpar ") or line.startswith("| deepspeed ")}  # fmt: skip
    assert set(rows) == {"xpar", "deepspeed"}, p.stdout
    assert "failed" not in p.stdout, p.stdout
    cells = [c.strip() for c in rows["xpar"].split("|")[1:-1]]
    assert cells[3].endswith("x") and float(cells[3][:-1]) > 0, rows["xpar"]  # vs DeepSpeed
    assert cells[4].endswith("%"), rows["xpar"]  # MFU
    assert "MFU vs measured GEMM peak" in p.stdout and "xpar/DS " in p.stdout, p.stdout
    assert p.stdout.count("| arm |") == 1, "rank 0 prints the table, once"
