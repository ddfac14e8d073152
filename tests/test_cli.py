"""The `xpar` console script, as installed: every subcommand answers --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xpar.cli import COMMANDS

XPAR = shutil.which("xpar") or str(Path(sys.executable).with_name("xpar"))


def _xpar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([XPAR, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_own_help(command):
    p = _xpar(command, "--help")
    assert p.returncode == 0, p.stderr
    assert "usage" in p.stdout.lower(), p.stdout


def test_no_command_lists_them_all_and_exits_2():
    p = _xpar()
    assert p.returncode == 2
    for command in COMMANDS:
        assert command in p.stdout


def test_unknown_command_names_the_choices():
    p = _xpar("trian")
    assert p.returncode == 2
    assert "unknown command 'trian'" in p.stderr and "train" in p.stderr


def test_a_command_that_reads_a_rank_file_keeps_deepspeed_quiet(tmp_path):
    from tests.interop.test_hf_interop import _save, _xpar_model

    ckpt = _save(_xpar_model(), tmp_path / "ckpt")
    p = _xpar("export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines() == [f"wrote {tmp_path / 'hf'} (MixtralForCausalLM)"]
    assert "accelerator" not in p.stderr.lower(), p.stderr
