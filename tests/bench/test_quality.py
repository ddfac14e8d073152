"""Quality benchmark: steps-to-target arithmetic, report, plot, and one tiny real run."""

from __future__ import annotations

import json
import math

import pytest

from xpar.bench.quality import (
    ArmResult,
    QualityResult,
    format_table,
    main,
    report,
    steps_to_reach,
    write_plot,
)

DENSE = {0: 5.0, 10: 3.0, 20: 2.5, 30: 2.0}
MOE = {0: 5.0, 10: 2.8, 20: 2.2, 30: 1.8}


def test_steps_to_reach_interpolates_between_eval_points():
    # 2.2 at 20, 1.8 at 30: 2.0 is half way
    assert steps_to_reach(MOE, 2.0) == pytest.approx(25.0)
    assert steps_to_reach(DENSE, 2.0) == pytest.approx(30.0)
    assert steps_to_reach(DENSE, 2.75) == pytest.approx(15.0)
    # keys out of order are fine; the first crossing counts, not a later one
    assert steps_to_reach({20: 1.0, 0: 3.0, 10: 2.0, 30: 3.0}, 1.5) == pytest.approx(15.0)


def test_steps_to_reach_edge_cases():
    assert steps_to_reach(DENSE, 1.0) is None  # never gets there
    assert steps_to_reach({}, 1.0) is None
    assert steps_to_reach({0: 1.0, 5: 0.5}, 2.0) == 0.0  # already below at the start
    assert steps_to_reach({0: 3.0, 10: 2.0}, 2.0) == 10.0  # exactly on an eval point


def test_format_table_lists_every_step_of_either_curve():
    t = format_table(DENSE, {**MOE, 40: 1.5})
    rows = t.splitlines()[2:]
    assert [int(r.split("|")[0]) for r in rows] == [0, 10, 20, 30, 40]
    assert rows[1].split("|")[1].strip() == "3.0000"
    assert rows[1].split("|")[2].strip() == "2.8000"
    assert rows[-1].split("|")[1].strip() == "-"


def _result(tmp_path) -> QualityResult:
    target = DENSE[30]
    d, m = steps_to_reach(DENSE, target), steps_to_reach(MOE, target)
    return QualityResult(
        dense=ArmResult("dense", "quality_dense", str(tmp_path / "dense"), DENSE, 1.0, "d"),
        moe=ArmResult("moe", "quality_moe", str(tmp_path / "moe"), MOE, 1.0, "m"),
        steps=30,
        tokens_per_step=64,
        target_loss=target,
        dense_steps=d,
        moe_steps=m,
        ratio=m / d,
        wall_s=2.0,
    )


def test_report_states_target_steps_and_ratio(tmp_path):
    text = report(_result(tmp_path))
    assert "dense final validation loss 2.0000" in text
    assert "steps to reach it: dense 30.0, moe 25.0" in text
    assert "ratio moe/dense: 0.833 (goal <= 0.7: NOT met)" in text


def test_plot_is_a_small_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = write_plot(_result(tmp_path), tmp_path / "sub" / "q.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 200_000


TINY = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.d_ff=64",
    "moe.d_ff=32",
    "moe.num_experts=4",
    "data.seq_len=32",
    "data.max_files=4",
    "train.micro_batch_size=2",
    "train.eval_every=2",
    "train.eval_batches=1",
    "optim.warmup_steps=1",
]


@pytest.mark.slow
def test_tiny_benchmark_end_to_end(tmp_path, capsys):
    """Both arms really train (two trainer processes), curves come back from W&B."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "q"
    main(["--steps", "4", "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    summary = json.loads((out / "quality.json").read_text())
    for arm in ("dense", "moe"):
        curve = {int(k): v for k, v in summary[arm]["val_curve"].items()}
        assert sorted(curve) == [0, 2, 4]  # before training, every eval_every, final
        assert all(math.isfinite(v) for v in curve.values())
        assert curve[4] < curve[0]  # it learned something in 4 steps
    assert "experts per token" in summary["moe"]["model_summary"]
    assert "(dense)" in summary["dense"]["model_summary"]
    assert summary["target_loss"] == summary["dense"]["val_curve"]["4"]
    assert summary["dense_steps"] == pytest.approx(4.0)
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "ratio moe/dense" in printed and "step | dense val loss | moe val loss" in printed
    # a second call replaces the runs instead of resuming them
    main(["--steps", "2", "--out", str(out), *TINY])
    summary = json.loads((out / "quality.json").read_text())
    assert sorted(int(k) for k in summary["dense"]["val_curve"]) == [0, 2]


def test_progress_reads_the_last_complete_row(tmp_path):
    from xpar.bench.quality import _last_step

    m = tmp_path / "metrics.jsonl"
    assert _last_step(m) == 0  # not written yet
    big = {"step": 7, "loss": 1.0, **{f"moe/layer{i}/x": 0.5 for i in range(200)}}
    m.write_text(
        json.dumps({"step": 6, "loss": 1.0}) + "\n" + json.dumps(big) + '\n{"step": 8, "lo'
    )
    assert _last_step(m) == 7
