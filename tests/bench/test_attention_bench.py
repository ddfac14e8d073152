"""`python -m xpar.bench attention`: the --quick run end to end through the CLI (a real
subprocess, every registered variant), and the pure parts: verdicts on synthetic timings,
growth per doubling, options from conf/attention, what is skipped before it runs.
"""

import argparse
import json

import pytest

from xpar.bench import attention as A
from xpar.models.attention import attention_names, get_attention
from xpar.testing.processes import run_python


def test_quick_runs_every_registered_variant_against_dense(tmp_path):
    out = tmp_path / "attention.json"
    p = run_python("-m", "xpar.bench", "attention", "--quick", "--out", str(out), timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (tmp_path / "attention.png").stat().st_size > 0
    assert res["lengths"] == list(A.QUICK_LENGTHS) and res["repeats"] == 1
    assert res["peak_flops"] > 0 and "sdpa_kernel" in res
    tables = {t["name"]: t for t in res["tables"]}
    seen = set()
    for t in tables.values():
        variants = t["variants"]
        assert "dense" in variants
        dense = variants["dense"]["cells"]
        for name, v in variants.items():
            seen.add(name)
            assert get_attention(name).causal_ok or not t["causal"], (name, t["name"])
            for L in res["lengths"]:
                cell = v["cells"][str(L)]
                assert cell["status"] == "ok", (name, L, cell)
                d = dense[str(L)]
                assert cell["ms"] > 0 and cell["peak_mb"] >= 0
                assert cell["speedup"] == pytest.approx(d["ms"] / cell["ms"])
                if d["peak_mb"] > 0:
                    assert cell["mem_ratio"] == pytest.approx(cell["peak_mb"] / d["peak_mb"])
                assert cell["gflops"] > 0
            assert set(v["growth"]) == {"256->512"}
        assert dense[str(res["lengths"][0])]["speedup"] == 1.0
        judged = {(vd["variant"], vd["target"]) for vd in t["verdicts"]}
        for name, v in variants.items():
            if name in A.TARGETS:
                assert (name, A.TARGETS[name].describe()) in judged
            if v["subquadratic"]:
                assert (name, A.MEMORY_RULE) in judged
    assert seen == set(attention_names())
    # The encoder-only variants are in the non-causal table, against a non-causal dense.
    if any(not get_attention(n).causal_ok for n in attention_names()):
        assert tables["non-causal"]["causal"] is False
    assert "| dense | " in p.stdout and "speed-up" in p.stdout
    # --report prints the same table again from the JSON alone
    again = A.format_result(A.from_json(json.loads(out.read_text())))
    table_lines = [x for x in p.stdout.splitlines() if x.startswith("| ")]
    assert table_lines == [x for x in again.splitlines() if x.startswith("| ")]


def _table(rows: dict, name: str = "causal") -> dict:
    """A judge() input from {variant: (subquadratic, {L: (ms, peak_mb)})}."""
    return {
        "name": name,
        "variants": {
            n: {
                "subquadratic": sq,
                "cells": {L: {"ms": ms, "peak_mb": mb} for L, (ms, mb) in cells.items()},
            }
            for n, (sq, cells) in rows.items()
        },
    }


def _verdicts(table) -> dict:
    return {(v["variant"], v["target"] == A.MEMORY_RULE): v for v in A.judge(table)}


DENSE_CELLS = {4096: (100.0, 50.0), 8192: (400.0, 100.0), 16384: (1600.0, 200.0)}


def test_linear_time_target_needs_4x_and_slow_growth():
    table = _table(
        {
            "dense": (False, DENSE_CELLS),
            # 4.0x at 16k, growth exactly 2.0 per doubling: met
            "sliding_window": (True, {4096: (100.0, 5), 8192: (200.0, 10), 16384: (400.0, 20)}),
            # 5.3x at 16k but 2.5x per doubling (4k -> 16k): growth fails
            "linear": (True, {4096: (48.0, 5), 8192: (120.0, 10), 16384: (300.0, 300)}),
            # growth fine (2.0) but 3.9x: speed fails
            "performer": (True, {4096: (102.6, 5), 8192: (205.1, 10), 16384: (410.3, 20)}),
        }
    )
    v = _verdicts(table)
    assert v[("sliding_window", False)]["met"] is True
    assert v[("sliding_window", False)]["measured"] == "4.00x, 2.00x per doubling 4096->16384"
    assert v[("linear", False)]["met"] is False
    assert "2.50x per doubling" in v[("linear", False)]["measured"]
    assert v[("performer", False)]["met"] is False
    # memory: below dense's 200 MB at 16k, or not
    assert v[("sliding_window", True)]["met"] is True
    assert v[("linear", True)]["met"] is False


def test_beats_dense_target_is_strict_and_quadratic_variants_get_no_memory_rule():
    table = _table(
        {
            "dense": (False, DENSE_CELLS),
            "lsh": (True, {16384: (1599.0, 10)}),
            "routing": (True, {16384: (1600.0, 10)}),  # equal to dense: not faster
            "topk": (False, {16384: (3000.0, 900)}),  # no target, not sub-quadratic
        }
    )
    v = _verdicts(table)
    assert v[("lsh", False)]["met"] is True
    assert v[("routing", False)]["met"] is False
    assert not any(name == "topk" for name, _ in v)
    assert v[("lsh", True)]["met"] is True


def test_a_variant_or_dense_not_measured_at_the_top_length_is_no_verdict():
    table = _table(
        {
            "dense": (False, {**DENSE_CELLS, 16384: (None, None)}),
            "sinkhorn": (True, {4096: (50.0, 1), 8192: (90.0, 2), 16384: (170.0, 3)}),
            "linformer": (True, {4096: (10.0, 1), 8192: (20.0, 2), 16384: (None, None)}),
        },
        name="non-causal",
    )
    v = _verdicts(table)
    assert v[("sinkhorn", False)]["met"] is None
    assert v[("sinkhorn", False)]["measured"] == "dense not measured at L=16384"
    assert v[("linformer", False)]["measured"] == "the variant not measured at L=16384"
    assert v[("sinkhorn", True)]["met"] is None
    assert {x["table"] for x in v.values()} == {"non-causal"}


def test_growth_per_doubling_and_its_mean_over_the_last_two():
    ms = {1024: 1.0, 2048: 3.0, 4096: 9.0, 8192: 18.0, 16384: 72.0}
    g = A.growth_per_doubling(ms)
    assert g == {
        "1024->2048": 3.0,
        "2048->4096": 3.0,
        "4096->8192": 2.0,
        "8192->16384": 4.0,
    }
    growth, lo = A.mean_growth(ms, 16384)
    assert lo == 4096 and growth == pytest.approx(8.0**0.5)
    assert A.mean_growth({256: 1.0, 512: 3.0}, 512) == (3.0, 256)
    assert A.mean_growth({512: 3.0}, 512) == (None, None)
    assert A.growth_per_doubling({1024: 1.0, 4096: 2.0, 8192: None}) == {}


def test_options_come_from_the_yaml_with_the_benchmarks_length(tmp_path):
    (tmp_path / "attention").mkdir()
    (tmp_path / "attention" / "mine.yaml").write_text(
        "# @package model\nattention: mine\n"
        "attention_options:\n  max_len: ${model.max_seq_len}\n  k: 3\n"
        "  heads: ${model.n_heads}\n  other: ${train.steps}\n"
    )
    opts, notes = A.variant_options("mine", 4096, conf_dir=tmp_path)
    assert opts == {"max_len": 4096, "k": 3, "heads": A.HEADS}
    assert len(notes) == 1 and "attention_options.other left at its default" in notes[0]
    assert A.variant_options("absent", 64, conf_dir=tmp_path) == (
        {},
        ["no conf/attention/absent.yaml: the Options defaults"],
    )


def test_a_measurement_predicted_too_big_or_slow_is_skipped_and_says_why():
    args = argparse.Namespace(max_mem_gb=1.0, max_step_s=10.0)
    cand = A.Cand("causal", "dense", True)
    info = {"refused": {}}

    def done(*cells):
        return {
            L: {"status": "ok", "ms_rounds": [ms], "peak_mb_rounds": [mb]} for L, ms, mb in cells
        }

    assert A._first_look(cand, 2048, done((1024, 100.0, 10.0)), info, args)["status"] == "ok"
    # memory growing 4x per doubling: 300 MB -> 1.2 GB predicted
    big = A._first_look(cand, 4096, done((1024, 1.0, 75.0), (2048, 2.0, 300.0)), info, args)
    assert big == {"status": "skipped", "reason": "predicted 1.2 GB peak > --max-mem-gb 1"}
    timed = done((1024, 1000.0, 1.0), (2048, 4000.0, 2.0))
    slow = A._first_look(A.Cand("causal", "topk", True), 4096, timed, info, args)
    assert slow["status"] == "skipped"
    assert slow["reason"] == "predicted 16 s a step > --max-step-s 10"
    assert A._first_look(cand, 4096, timed, info, args)["status"] == "ok"  # dense always runs
    after = {1024: {"status": "over_mem", "reason": "x"}}
    assert A._first_look(cand, 2048, after, info, args) == {
        "status": "skipped",
        "reason": "not run: at L=1024 it was over_mem",
    }
    refused = A._first_look(cand, 2048, {}, {"refused": {2048: "model.x=1 ..."}}, args)
    assert refused == {"status": "refused", "reason": "model.x=1 ..."}


def test_tables_put_encoder_only_variants_beside_a_non_causal_dense():
    names = attention_names()
    tables = A.plan_tables(names, non_causal=False)
    assert tables["causal"][0] == "dense"
    assert all(get_attention(n).causal_ok for n in tables["causal"])
    assert sorted({*tables["causal"], *tables.get("non-causal", [])}) == sorted(names)
    assert list(A.plan_tables(names, non_causal=True)) == ["non-causal"]


def test_every_option_is_described():
    ap = A._parser()
    for action in ap._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    assert "linformer" in ap.format_help()
