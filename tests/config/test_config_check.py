"""`python -m xpar.config.check` and the trainer's config-error exit: one line, status 2.

Real subprocesses of the real entry points; the torchrun side (the launch scripts, plain
torchrun) is in tests/launch/test_scripts.py.
"""

import json
import subprocess
import sys

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from xpar.config import check
from xpar.errors import XparConfigError
from xpar.testing.processes import run_python

TYPO = "xpar: config error: train.stpes is not a key of train; did you mean train.steps?"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_python(*args, timeout=120, **env)


def test_a_good_config_prints_nothing_not_even_its_warnings():
    # warmup >= steps is a warning the trainer prints; the check leaves it to the trainer
    p = _run("-m", "xpar.config.check", "--world-size", "2", "--",
             "experiment=tiny", "optim.warmup_steps=50", "train.steps=10")  # fmt: skip
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_a_bad_config_is_one_line_and_status_2():
    p = _run("-m", "xpar.config.check", "--world-size", "2", "--", "train.stpes=3")
    assert (p.returncode, p.stdout, p.stderr) == (2, "", TYPO + "\n")


def test_the_world_size_is_the_launchers():
    # tiny's 4 experts split over 2 ranks, not over 3
    assert _run("-m", "xpar.config.check", "--world-size", "2", "experiment=tiny").returncode == 0
    p = _run("-m", "xpar.config.check", "--world-size", "3", "experiment=tiny")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("xpar: config error: ") and "world size 3" in p.stderr, p.stderr


def test_hydra_flags_are_left_to_the_trainer():
    p = _run("-m", "xpar.config.check", "--world-size", "2", "--", "--cfg", "job", "train.x=1")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_the_trainer_says_a_typo_once_in_one_line_before_hydra_and_deepspeed():
    p = _run("-m", "xpar.train", "experiment=tiny", "train.stpes=3")
    # no Hydra message, no DeepSpeed import warning: checked before either runs
    assert (p.returncode, p.stdout, p.stderr) == (2, "", TYPO + "\n")


def test_exit_config_error_tells_torchrun(tmp_path, monkeypatch, capsys):
    err = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as ei:
        check.exit_config_error(XparConfigError("train.steps=-1 is invalid; use >= 1"))
    assert ei.value.code == check.EXIT_CONFIG_ERROR == 2
    line = "xpar: config error: train.steps=-1 is invalid; use >= 1"
    assert capsys.readouterr().err == line + "\n"
    json.loads(err.read_text())  # what torchrun's own reader gets:
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(err))
    assert failure.message["extraInfo"]["py_callstack"] == line


def test_another_rank_speaks_only_after_the_grace(monkeypatch, capsys):
    waited = []
    monkeypatch.setattr(check.time, "sleep", waited.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit):
        check.exit_config_error(XparConfigError("bad"))
    assert waited == [check.PEER_GRACE_S]
    assert capsys.readouterr().err == "xpar: config error (rank 1): bad\n"


def test_the_launcher_check_stops_a_finished_run_and_an_occupied_out_dir(tmp_path):
    """What the trainer would refuse at its start, the launcher's check refuses before any
    rank starts: a finished run (exit 4) and resume=never into a run's out_dir (exit 2)."""
    import shutil

    from tests.fixtures import golden

    out = tmp_path / "out"
    shutil.copytree(golden.CKPT_FIXTURE, out / "checkpoints")  # a run at step 2
    base = [*golden.SMALL, *golden.data_overrides(tmp_path / "cache"), f"train.out_dir={out}"]

    def run_check(*extra):
        cmd = [sys.executable, "-m", "xpar.config.check", "--world-size", "2", "--", *base]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)

    done = run_check("train.steps=2")
    assert done.returncode == 4 and "xpar: nothing to do:" in done.stderr, done.stderr
    assert run_check("train.steps=2", "train.noop_ok=true").returncode == 0
    never = run_check("train.steps=3", "train.resume=never")
    assert never.returncode == 2 and "train.overwrite=true" in never.stderr, never.stderr
    assert run_check("train.steps=3").returncode == 0
