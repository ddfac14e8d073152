"""`python -m xpar.search` end to end: a real Hydra multirun with the Optuna sweeper, real
(tiny) training runs, the study in SQLite, the Pareto report, and resuming.

Run A trains a 2-trial study. Then a trial is left RUNNING in the study, as an interrupted
search leaves it. Run B (the study's total raised to 3) marks it failed and runs exactly the
one trial still missing, as trial 3 in its own directory; run C, the same command as B,
finds the study complete and only writes the report again.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "hydra_plugins.hydra_optuna_sweeper", reason="the search extra: pip install -e .[search]"
)
optuna = pytest.importorskip("optuna")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Trials of 4 steps of 2 x 64 tokens at the smallest width and depth (fixed on the command
# line, which takes them out of the search); no budget unless a test sets one.
TINY = [
    "train.steps=4",
    "train.micro_batch_size=2",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.ckpt_every=4",
    "logger.log_every=4",
    "model.d_model=64",
    "model.n_layers=2",
]


def _search(tmp: Path, n_trials: int, budget: float = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "xpar.search", f"hydra.sweep.dir={tmp / 'search'}",
           f"hydra.sweeper.n_trials={n_trials}", f"hydra.callbacks.search.flops_budget={budget}",
           *TINY]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _study(tmp: Path):
    storage = f"sqlite:///{tmp / 'search' / 'search.db'}"
    return optuna.load_study(study_name="xpar-search", storage=storage)


def _check_trained(study, out: Path) -> list:
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    for t in done:  # a real loss and speed, the cost recorded, the run in its own directory
        assert len(t.values) == 2 and 0 < t.values[0] < 10 and t.values[1] > 0, t
        assert t.user_attrs["flops_per_token"] > 0 and "not_trained" not in t.user_attrs
        assert (out / f"trial_{t.number}" / "metrics.jsonl").is_file()
        assert "model.d_model" not in t.params  # fixed on the command line: not searched
    return done


def test_search_end_to_end_and_resume(tmp_path):
    a = _search(tmp_path, 2)
    out = tmp_path / "search"
    assert "0 complete trials of 2, running 2" in a.stdout
    study = _study(tmp_path)
    assert len(_check_trained(study, out)) == 2
    assert len(study.trials) == 2
    table = (out / "pareto.md").read_text()
    assert "| trial |" in table and "val_loss" in table and "tokens_per_s" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front in" in a.stdout

    study.ask()  # trial 2: left running, as by a search killed during it

    b = _search(tmp_path, 3)
    assert "2 complete trials of 3, running 1" in b.stdout, b.stdout[-2000:]
    study = _study(tmp_path)
    states = [t.state.name for t in study.trials]
    assert states[:2] == ["COMPLETE", "COMPLETE"] and states[2] == "FAIL"
    assert states[3] == "COMPLETE" and len(states) == 4
    assert len(_check_trained(study, out)) == 3
    assert not (out / "trial_2").exists()  # the interrupted trial's number is not reused

    c = _search(tmp_path, 3)
    assert "3 complete trials of 3, running 0" in c.stdout
    assert len(_study(tmp_path).trials) == 4
    assert "3 complete trials" in (out / "pareto.md").read_text()


def test_xpar_train_multirun_refuses_the_search(tmp_path):
    """The trainer's main neither checks the budget nor returns the objectives: one line."""
    cmd = [sys.executable, "-m", "xpar.train", "-m", "experiment=search",
           f"hydra.sweep.dir={tmp_path / 'search'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "xpar: config error: experiment=search runs its trials through" in p.stderr
    assert not (tmp_path / "search" / "search.db").exists()


def test_trial_over_budget_is_not_trained(tmp_path):
    p = _search(tmp_path, 1, budget=1)
    assert "search: trial 0: not trained: " in p.stdout
    assert "training FLOPs/token is over the budget of 1 " in p.stdout
    (t,) = _study(tmp_path).trials
    assert t.state.name == "COMPLETE" and t.values == [math.inf, 0.0]
    assert t.user_attrs["not_trained"] == "over budget" and t.user_attrs["flops_per_token"] > 1
    assert not (tmp_path / "search" / "trial_0" / "metrics.jsonl").exists()
    assert (
        "1 complete trials (1 of them not trained"
        in (tmp_path / "search" / "pareto.md").read_text()
    )
