"""Quality benchmark framework: steps-to-target arithmetic, targets, tables, plan checks, the
arm scheduler (a stand-in trainer), reuse of finished runs, and one tiny real suite."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

from xpar.bench import quality
from xpar.bench.quality import (
    Arm,
    ArmRun,
    ArmRunner,
    Mark,
    Outcome,
    Suite,
    at_least,
    at_most,
    collect_arms,
    format_curves,
    format_table,
    judge,
    main,
    report,
    steps_to_reach,
    unfair_fields,
    write_plot,
)

DENSE = {0: 5.0, 10: 3.0, 20: 2.5, 30: 2.0}
MOE = {0: 5.0, 10: 2.8, 20: 2.2, 30: 1.8}


def run_of(name: str, **series: dict[int, float]) -> ArmRun:
    """An ArmRun whose W&B history holds these series (keys with / spelt __)."""
    rows: dict[int, dict] = {}
    for key, curve in series.items():
        for step, v in curve.items():
            rows.setdefault(step, {"_step": step})[key.replace("__", "/")] = v
    line = "params 4.56M total, 0.89M active (4/4 MoE blocks, 4/32 experts per token)"
    return ArmRun(name, f"exp_{name}", f"/runs/{name}", [], 1.0, False, line, list(rows.values()))


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


def test_targets_compare_inclusively_and_refuse_what_was_not_measured():
    assert at_most("x", 0.7, 0.7).met and not at_most("x", 0.7001, 0.7).met
    assert at_least("x", 0.3, 0.3).met and not at_least("x", 0.2999, 0.3).met
    for bad in (None, math.nan, math.inf):
        assert not at_most("x", bad, 0.7).met
    assert not at_least("x", None, 0.3).met and not at_least("x", math.nan, 0.3).met
    assert at_most("x", 1.0, 1.005, digits=4).goal == "<= 1.005"
    assert at_least("x", 1.0, 0.3).goal == ">= 0.3"


def test_series_reads_numbers_only_at_the_steps_that_logged_them():
    r = run_of("a", val__loss={0: 3.0, 10: 2.0}, train__loss={5: 2.5, 10: 2.1})
    r.history.append({"_step": 12, "val/loss": None, "flag": True, "hist": [1, 2]})
    assert r.series("val/loss") == {0: 3.0, 10: 2.0}
    assert r.series("train/loss") == {5: 2.5, 10: 2.1}
    assert r.series("flag") == {} and r.series("hist") == {}
    assert r.final() == 2.0 and r.final("train/loss") == 2.1
    with pytest.raises(RuntimeError, match="no val/accuracy"):
        r.final("val/accuracy")
    assert r.params() == "4.56M / 0.89M"
    assert r.to_json()["curves"] == {"val/loss": {0: 3.0, 10: 2.0}}  # val/* only


def test_format_curves_lists_every_step_of_any_arm():
    t = format_curves({"dense": DENSE, "moe": {**MOE, 40: 1.5}})
    rows = t.splitlines()[3:]
    assert [int(r.split("|")[0]) for r in rows] == [0, 10, 20, 30, 40]
    assert rows[1].split("|")[1].strip() == "3.0000"
    assert rows[1].split("|")[2].strip() == "2.8000"
    assert rows[-1].split("|")[1].strip() == "-"


def test_format_table_pads_columns_to_the_widest_cell():
    t = format_table(["a", "bbb"], [["xxxx", "1"], ["y", "22"]]).splitlines()
    assert t == ["a    | bbb", "-----+----", "xxxx | 1  ", "y    | 22 "]


def test_collect_arms_shares_arms_by_name_and_checks_the_plan():
    a, b = Arm("a", "quality_dense"), Arm("b", "quality_moe", after=("a",))
    s1 = Suite("s1", "t", "r", (a, b), evaluate=lambda runs: None)
    s2 = Suite("s2", "t", "r", (Arm("c", "tiny"), a), evaluate=lambda runs: None)
    assert [x.name for x in collect_arms([s1, s2])] == ["a", "b", "c"]
    other = Suite("s3", "t", "r", (Arm("a", "quality_moe"),), evaluate=lambda runs: None)
    with pytest.raises(ValueError, match="define arm 'a' twice"):
        collect_arms([s1, other])
    lonely = Suite("s4", "t", "r", (b,), evaluate=lambda runs: None)
    with pytest.raises(ValueError, match=r"waits for \['a'\]"):
        collect_arms([lonely])


def test_unfair_fields_names_what_differs_except_what_may():
    base = {
        "train": {"steps": 10, "out_dir": "x", "distill": {"teacher": "", "alpha": 0.0}},
        "data": {"seq_len": 64},
        "optim": {"lr": 1e-3},
        "model": {"d_model": 32},
    }
    other = json.loads(json.dumps(base))
    other["train"].update(out_dir="y", distill={"teacher": "/t", "alpha": 0.25})
    other["optim"]["lr"] = 2e-3
    other["model"]["d_model"] = 64  # models may differ: that is what the arms compare
    assert unfair_fields({"a": base, "b": other}) == [
        "optim.lr",
        "train.distill.alpha",
        "train.distill.teacher",
    ]
    assert unfair_fields({"a": base, "b": other}, ("optim.lr", "train.distill")) == []
    # a field one arm lacks differs too
    other["task"] = {"kind": "classify"}
    assert unfair_fields({"a": base, "b": other}, ("optim.lr", "train.distill")) == ["task.kind"]


def _result(tmp_path):
    suite = Suite(
        "demo",
        "dense vs moe",
        "nobody 2024",
        (Arm("dense", "d"), Arm("moe", "m")),
        evaluate=lambda runs: Outcome(
            columns=["final"],
            rows={n: [f"{r.final():.3f}"] for n, r in runs.items()},
            targets=[at_most("moe/dense final", runs["moe"].final() / runs["dense"].final(), 0.7)],
            marks=[Mark("val/loss", "h", 2.0), Mark("val/loss", "v", 25.0, "moe")],
        ),
    )
    runs = {"dense": run_of("dense", val__loss=DENSE), "moe": run_of("moe", val__loss=MOE)}
    return suite, judge(suite, runs, overrides=["train.steps=30"])


def test_report_shows_arms_curves_targets_and_verdicts(tmp_path):
    _, r = _result(tmp_path)
    assert r.met is False and r.targets[0].value == pytest.approx(0.9)
    text = report(r)
    assert "== quality suite demo: dense vs moe" in text and "after: nobody 2024" in text
    arm_rows = [ln for ln in text.splitlines() if ln.startswith(("dense ", "moe "))]
    assert [c.strip() for c in arm_rows[1].split("|")] == [
        "moe",
        "exp_moe",
        "4.56M / 0.89M",
        "1.800",
        "1",
    ]
    target = next(ln for ln in text.splitlines() if ln.startswith("moe/dense final"))
    assert [c.strip() for c in target.split("|")][1:4] == ["0.900", "<= 0.7", "NOT met"]
    assert "suite demo: NOT all targets met" in text


def test_plot_is_a_small_png(tmp_path):
    pytest.importorskip("matplotlib")
    suite, r = _result(tmp_path)
    path = write_plot(r, suite.panels + (("val/accuracy", "acc"),), tmp_path / "sub" / "q.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 200_000


def test_progress_reads_the_last_complete_row(tmp_path):
    m = tmp_path / "metrics.jsonl"
    assert quality._last_step(m) == 0  # not written yet
    big = {"step": 7, "loss": 1.0, **{f"moe/layer{i}/x": 0.5 for i in range(200)}}
    m.write_text(
        json.dumps({"step": 6, "loss": 1.0}) + "\n" + json.dumps(big) + '\n{"step": 8, "lo'
    )
    assert quality._last_step(m) == 7


def test_latest_checkpoint_reads_the_pointer(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RuntimeError, match="no latest checkpoint"):
        quality.latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    assert quality.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000004"


def test_code_fingerprint_is_stable_and_hex():
    a, b = quality.code_fingerprint(), quality.code_fingerprint()
    assert a == b and len(a) == 64 and int(a, 16) >= 0


# ----------------------------------------------------------------- the scheduler, no trainer

STAND_IN = """
import json, sys, time, pathlib
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
t0 = time.time(); time.sleep(float(sys.argv[2]))
if sys.argv[3] != "ok": sys.exit(3)
(out / "span.json").write_text(json.dumps([t0, time.time(), sys.argv[4:]]))
"""


class _StandIn(ArmRunner):
    """The runner with a stand-in for the trainer: each arm sleeps, then records its span."""

    sleep = {"a": 0.6, "b": 0.6, "c": 0.2, "d": 0.2}
    fail: tuple[str, ...] = ()

    def _command(self, arm):
        late = list(arm.late({n: self.out / n for n in arm.after})) if arm.late else []
        ok = "fail" if arm.name in self.fail else "ok"
        return [sys.executable, "-c", STAND_IN, str(self.out / arm.name),
                str(self.sleep[arm.name]), ok, *late]  # fmt: skip

    def _read(self, arm, cmd, wall_s, reused):
        span = json.loads((self.out / arm.name / "span.json").read_text())
        return ArmRun(arm.name, arm.experiment, str(self.out / arm.name), cmd, wall_s,
                      reused, "", [{"_step": 0, "span0": span[0], "span1": span[1]}])  # fmt: skip


def _arms():
    return [
        Arm("a", "x"),
        Arm("b", "x"),
        Arm("c", "x", after=("a",), late=lambda dirs: [f"teacher={dirs['a']}"]),
        Arm("d", "x", after=("c", "b")),
    ]


def test_runner_keeps_jobs_running_and_starts_an_arm_after_those_it_waits_for(tmp_path):
    steps = dict.fromkeys("abcd", 1)
    runs = _StandIn(tmp_path, [], steps, jobs=2, progress_every_s=1e9).run_all(_arms())
    span = {n: (r.history[0]["span0"], r.history[0]["span1"]) for n, r in runs.items()}
    assert span["a"][0] < span["b"][1] and span["b"][0] < span["a"][1]  # side by side
    assert span["c"][0] >= span["a"][1]  # after its teacher
    assert span["d"][0] >= max(span["c"][1], span["b"][1])
    assert runs["c"].cmd[-1] == f"teacher={tmp_path / 'a'}"
    # at most 2 at once: c and d never overlap a and b both
    events = sorted([(s, 1) for s, _ in span.values()] + [(e, -1) for _, e in span.values()])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2
    # one job at a time: strictly one after another
    t0 = time.time()
    runs = _StandIn(tmp_path / "one", [], steps, jobs=1, progress_every_s=1e9).run_all(_arms())
    spans = sorted((r.history[0]["span0"], r.history[0]["span1"]) for r in runs.values())
    assert all(s1 >= e0 for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False))
    assert time.time() - t0 >= sum(_StandIn.sleep.values())


def test_a_failed_arm_stops_the_run_naming_its_log(tmp_path):
    class Failing(_StandIn):
        fail = ("a",)

    with pytest.raises(RuntimeError, match=r"the a run failed \(exit 3\); last lines of .*a\.log"):
        Failing(tmp_path, [], dict.fromkeys("abcd", 1), jobs=2, progress_every_s=1e9).run_all(
            _arms()
        )


def test_a_finished_arm_is_reused_only_with_the_same_command_and_code(tmp_path, monkeypatch):
    steps = dict.fromkeys("abcd", 1)
    first = _StandIn(tmp_path, [], steps, jobs=2, progress_every_s=1e9).run_all(_arms())
    again = _StandIn(tmp_path, [], steps, jobs=2, progress_every_s=1e9).run_all(_arms())
    assert all(r.reused for r in again.values())
    assert {n: r.history for n, r in again.items()} == {n: r.history for n, r in first.items()}
    assert again["a"].wall_s == pytest.approx(first["a"].wall_s)
    # another command for b: b and d (which waits for it) train again, a and c do not
    monkeypatch.setattr(_StandIn, "sleep", {**_StandIn.sleep, "b": 0.61})
    third = _StandIn(tmp_path, [], steps, jobs=2, progress_every_s=1e9).run_all(_arms())
    assert {n: r.reused for n, r in third.items()} == {"a": True, "c": True, "b": False, "d": False}
    # other trainer code: nothing is reused, unless the command alone is asked to match
    monkeypatch.setattr(quality, "code_fingerprint", lambda: "changed")
    by_command = _StandIn(tmp_path, [], steps, jobs=2, reuse="command", progress_every_s=1e9)
    assert all(r.reused for r in by_command.run_all(_arms()).values())
    fourth = _StandIn(tmp_path, [], steps, jobs=2, progress_every_s=1e9).run_all(_arms())
    assert not any(r.reused for r in fourth.values())
    never = _StandIn(tmp_path, [], steps, jobs=2, reuse="never", progress_every_s=1e9)
    assert not any(r.reused for r in never.run_all(_arms()).values())
    with pytest.raises(ValueError, match="reuse='sometimes'"):
        _StandIn(tmp_path, [], steps, jobs=2, reuse="sometimes")


# ----------------------------------------------------------------- one real suite


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path, capsys, monkeypatch):
    """Both aux_free arms really train (two trainer processes), curves and MaxVio come back
    from W&B, the table, targets, JSON and PNG are written; a second call reuses the runs."""
    pytest.importorskip("matplotlib")
    # The code's own fingerprint is tested above; here a checkout edited during the test
    # (a shared working tree) must not turn reuse off.
    monkeypatch.setattr(quality, "code_fingerprint", lambda: "this checkout")
    out = tmp_path / "q"
    main(["--suite", "aux_free", "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads((out / "aux_free.json").read_text())
    assert list(summary["arms"]) == ["moe", "moe_bias"]
    for arm in summary["arms"].values():
        curve = {int(k): v for k, v in arm["curves"]["val/loss"].items()}
        assert sorted(curve) == [0, 2, 4]  # before training, every eval_every, final
        assert all(math.isfinite(v) for v in curve.values())
        assert curve[4] < curve[0]  # it learned something in 4 steps
        assert sorted(int(k) for k in arm["curves"]["val/max_vio"]) == [0, 2, 4]
        assert "experts per token" in arm["model_summary"] and not arm["reused"]
    assert summary["arms"]["moe_bias"]["experiment"] == "quality_moe_auxfree"
    vio = {n: a["curves"]["val/max_vio"]["4"] for n, a in summary["arms"].items()}
    assert vio["moe"] > 0  # top-2 of 4 experts on 64 tokens: some imbalance to measure
    assert summary["targets"][0]["what"].startswith("MaxVio bias / aux-loss")
    ratio = summary["targets"][0]["value"]
    assert ratio == pytest.approx(vio["moe_bias"] / vio["moe"])
    assert summary["targets"][0]["met"] == (ratio <= 0.5) and summary["quick"]
    assert (out / "aux_free.png").read_bytes()[:4] == b"\x89PNG"
    assert "== quality suite aux_free" in printed and "MaxVio bias / aux-loss" in printed
    # a second call reuses both finished runs and reports the same figures
    main(["--suite", "aux_free", "--quick", "--out", str(out)])
    again = json.loads((out / "aux_free.json").read_text())
    assert all(a["reused"] for a in again["arms"].values())
    assert again["targets"] == summary["targets"]
    # another step count is another command: trained again, not resumed
    main(["--suite", "aux_free", "--quick", "--steps", "2", "--out", str(out)])
    third = json.loads((out / "aux_free.json").read_text())
    assert sorted(int(k) for k in third["arms"]["moe"]["curves"]["val/loss"]) == [0, 2]
    assert not any(a["reused"] for a in third["arms"].values())
    assert Path(third["arms"]["moe"]["out_dir"]).is_dir()


def test_suite_option_takes_names_a_list_or_all():
    ap = quality._parser()
    assert ap.parse_args([]).suite == ["moe_vs_dense"]
    assert ap.parse_args(["--suite", "aux_free,moe_vs_dense,aux_free"]).suite == [
        "aux_free",
        "moe_vs_dense",
    ]
    assert ap.parse_args(["--suite", "all"]).suite == ["all"]
    assert ap.parse_args(["--steps", "3", "x=1"]).overrides == ["x=1"]
    for bad in ("auxfree", "all,aux_free", ","):
        with pytest.raises(SystemExit):
            ap.parse_args(["--suite", bad])
