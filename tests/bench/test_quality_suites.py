"""The quality suites' figures and targets on synthetic curves (exact values, both verdicts),
and their arms' configs: every experiment composes, each suite's arms are fair, and the arms
that claim equal active parameters have them."""

from __future__ import annotations

import dataclasses

import pytest

from xpar.bench import quality_suites as qs
from xpar.bench.quality import ArmRun, collect_arms, judge, unfair_fields
from xpar.config import compose_config, to_plain_dict
from xpar.models.cost import model_cost


def run_of(name: str, history: dict[int, dict[str, float]] | None = None, **series) -> ArmRun:
    """An ArmRun whose W&B history holds these series (keyword keys spell / as __) and rows."""
    rows: dict[int, dict] = {}
    for key, curve in series.items():
        for step, v in curve.items():
            rows.setdefault(step, {"_step": step})[key.replace("__", "/")] = v
    for step, row in (history or {}).items():
        rows.setdefault(step, {"_step": step}).update(row)
    return ArmRun(name, name, f"/r/{name}", [], 1.0, False, "", list(rows.values()))


def target(outcome, what: str):
    (t,) = [t for t in outcome.targets if t.what.startswith(what)]
    return t


# --------------------------------------------------------------------------- moe_vs_dense


def test_moe_vs_dense_steps_ratio_and_verdict():
    dense = run_of("dense", val__loss={0: 5.0, 10: 3.0, 20: 2.5, 30: 2.0})
    moe = run_of("moe", val__loss={0: 5.0, 10: 2.8, 20: 2.2, 30: 1.8})
    o = qs.moe_vs_dense({"dense": dense, "moe": moe})
    t = target(o, "moe/dense steps")
    assert t.value == pytest.approx(25 / 30) and not t.met  # 2.0 half way from 20 to 30
    assert o.rows["moe"] == ["5.000 / 1.800", "25.0"] and o.columns[1] == "steps to 2.0000"
    fast = run_of("moe", val__loss={0: 5.0, 10: 3.0, 20: 2.0, 30: 1.5})
    t = target(qs.moe_vs_dense({"dense": dense, "moe": fast}), "moe/dense steps")
    assert t.value == pytest.approx(20 / 30) and t.met
    never = run_of("moe", val__loss={0: 5.0, 30: 2.1})
    o = qs.moe_vs_dense({"dense": dense, "moe": never})
    assert target(o, "moe/dense").value is None and not o.targets[0].met
    assert o.rows["moe"][1] == "-"


# --------------------------------------------------------------------------- encoder_mlm


def test_encoder_mlm_expert_choice_speed_and_top2_vs_top1():
    top2 = run_of("enc_top2", val__loss={0: 6.0, 100: 3.0, 200: 2.0})
    ec = run_of("enc_ec", val__loss={0: 6.0, 100: 2.5, 200: 1.8})  # 2.0 at 100 + 50/0.5*..
    top1 = run_of("enc_top1", val__loss={0: 6.0, 100: 3.2, 200: 2.1})
    o = qs.encoder_mlm({"enc_ec": ec, "enc_top2": top2, "enc_top1": top1})
    # ec: 2.5 at 100, 1.8 at 200 -> 2.0 at 100 + 0.5/0.7*100
    assert target(o, "expert choice / top-2").value == pytest.approx((100 + 50 / 0.7) / 200)
    assert target(o, "expert choice / top-2").met is False  # 0.857 > 0.8
    assert target(o, "top-2 / top-1").value == pytest.approx(2.0 / 2.1)
    assert target(o, "top-2 / top-1").met
    ec = run_of("enc_ec", val__loss={0: 6.0, 100: 2.0, 200: 1.5})
    worse2 = run_of("enc_top1", val__loss={0: 6.0, 100: 3.0, 200: 1.99})
    o = qs.encoder_mlm({"enc_ec": ec, "enc_top2": top2, "enc_top1": worse2})
    assert target(o, "expert choice").value == pytest.approx(0.5) and o.targets[0].met
    assert not target(o, "top-2 / top-1").met


# --------------------------------------------------------------------------- aux_free


def test_aux_free_reads_val_max_vio_and_compares_loss_within_half_a_percent():
    aux = run_of("moe", val__loss={0: 6.0, 50: 2.0}, val__max_vio={0: 0.1, 50: 0.40})
    bias = run_of("moe_bias", val__loss={0: 6.0, 50: 2.009}, val__max_vio={0: 0.1, 50: 0.18})
    o = qs.aux_free({"moe": aux, "moe_bias": bias})
    vio, loss = target(o, "MaxVio"), target(o, "val loss")
    assert vio.value == pytest.approx(0.45) and vio.met and vio.note == ""
    assert loss.value == pytest.approx(1.0045) and loss.met  # "equal": within 0.5%
    assert o.rows["moe_bias"] == ["6.000 / 2.009", "0.180"]
    bias = run_of("moe_bias", val__loss={0: 6.0, 50: 2.011}, val__max_vio={0: 0.1, 50: 0.21})
    o = qs.aux_free({"moe": aux, "moe_bias": bias})
    assert not target(o, "MaxVio").met and not target(o, "val loss").met


def test_max_vio_falls_back_to_the_last_training_batch():
    # two layers; the last step both logged is 20 (layer 1 logged nothing at 30)
    rows = {
        10: {"moe/layer_0/max_load": 8, "moe/layer_0/mean_load": 4, "moe/layer_1/max_load": 4,
             "moe/layer_1/mean_load": 4},
        20: {"moe/layer_0/max_load": 6, "moe/layer_0/mean_load": 4, "moe/layer_1/max_load": 5,
             "moe/layer_1/mean_load": 4},
        30: {"moe/layer_0/max_load": 9, "moe/layer_0/mean_load": 4},
    }  # fmt: skip
    run = run_of("moe", rows, val__loss={0: 3.0, 30: 2.0})
    vio, where = qs.max_vio_of(run)
    assert vio == pytest.approx(((6 / 4 - 1) + (5 / 4 - 1)) / 2) and "no val/max_vio" in where
    assert qs.layer_load_ratios(run) == {0: {10: 2.0, 20: 1.5}, 1: {10: 1.0, 20: 1.25}}
    assert qs.max_vio_of(run_of("dense", val__loss={0: 3.0})) == (None, "no expert load logged")
    o = qs.aux_free({"moe": run, "moe_bias": run})
    assert "MaxVio from the last training batch" in target(o, "MaxVio").note


# --------------------------------------------------------------------------- hash_base


def _loads(per_step: dict[int, list[float]]) -> dict[int, dict[str, float]]:
    """step -> history row with max_load = ratio * 10 and mean_load 10 per layer."""
    return {
        s: {
            **{f"moe/layer_{i}/max_load": r * 10 for i, r in enumerate(ratios)},
            **{f"moe/layer_{i}/mean_load": 10.0 for i in range(len(ratios))},
        }
        for s, ratios in per_step.items()
    }


def test_hash_within_three_percent_and_base_balance():
    top1 = run_of("dec_top1", _loads({1: [2.0, 1.5]}), val__loss={0: 6.0, 100: 2.0})
    hsh = run_of("dec_hash", _loads({1: [1.1, 1.2]}), val__loss={0: 6.0, 100: 2.058})
    base = run_of(
        "enc_base", _loads({1: [1.3, 1.0], 10: [1.0, 1.01], 20: [1.015, 1.0]}), val__loss={0: 6.0}
    )
    o = qs.hash_base({"dec_top1": top1, "dec_hash": hsh, "enc_base": base})
    assert target(o, "hash / top-1").value == pytest.approx(1.029) and o.targets[0].met
    b = target(o, "BASE")
    # the last step's worst layer; the worst after the first logged step is 1.015
    assert b.value == pytest.approx(1.015) and b.met and "worst over training 1.015" in b.note
    assert o.rows["dec_hash"][1] == "1.200 / 1.200"
    assert qs.worst_load(base) == (pytest.approx(1.015), pytest.approx(1.015))
    assert o.curves["enc_base"][qs.WORST_LOAD] == pytest.approx({1: 1.3, 10: 1.01, 20: 1.015})
    assert o.curves["dec_top1"][qs.WORST_LOAD] == pytest.approx({1: 2.0})
    hsh = run_of("dec_hash", val__loss={0: 6.0, 100: 2.062})
    base = run_of("enc_base", _loads({1: [1.0], 5: [1.03]}), val__loss={0: 6.0})
    o = qs.hash_base({"dec_top1": top1, "dec_hash": hsh, "enc_base": base})
    assert not target(o, "hash / top-1").met and not target(o, "BASE").met
    assert target(o, "BASE").value == pytest.approx(1.03)


# --------------------------------------------------------------------------- distill


def test_distill_share_of_the_gain_kept():
    assert qs.kept_gain(2.0, 1.8, 1.92) == pytest.approx(0.4)
    assert qs.kept_gain(2.0, 1.8, 2.05) == pytest.approx(-0.25)  # worse than dense alone
    assert qs.kept_gain(2.0, 2.0, 1.9) is None and qs.kept_gain(2.0, 2.1, 1.9) is None
    runs = {
        "dense": run_of("dense", val__loss={0: 6.0, 100: 2.0}),
        "moe": run_of("moe", val__loss={0: 6.0, 100: 1.8}),
        "student": run_of("student", val__loss={0: 6.0, 100: 1.95}),
    }
    o = qs.distill(runs)
    t = target(o, "share of the MoE")
    assert t.value == pytest.approx(0.25) and not t.met
    assert o.rows["student"] == ["6.000 / 1.950", "+0.0500"]
    runs["student"] = run_of("student", val__loss={0: 6.0, 100: 1.93})
    assert target(qs.distill(runs), "share").met
    runs["moe"] = run_of("moe", val__loss={0: 6.0, 100: 2.01})
    t = target(qs.distill(runs), "share")
    assert t.value is None and not t.met and "not better than dense" in t.note


def test_distill_and_finetune_point_at_the_latest_checkpoint(tmp_path):
    for arm in ("moe", "enc_top2"):
        (tmp_path / arm / "checkpoints").mkdir(parents=True)
        (tmp_path / arm / "checkpoints" / "latest").write_text("step_00001500\n")
    dirs = {"moe": tmp_path / "moe", "enc_top2": tmp_path / "enc_top2"}
    teacher = tmp_path / "moe" / "checkpoints" / "step_00001500"
    assert qs.teacher_overrides(dirs) == [f"train.distill.teacher={teacher}"]
    assert qs.pretrained_overrides(dirs) == [
        f"train.init_from={tmp_path / 'enc_top2' / 'checkpoints' / 'step_00001500'}"
    ]


# --------------------------------------------------------------------------- finetune


def test_finetune_beats_scratch_on_final_accuracy():
    def runs(acc_scratch, acc_tuned):
        return {
            "enc_top2": run_of("enc_top2", val__loss={0: 6.0, 10: 3.0}),
            "cls_scratch": run_of("cls_scratch", val__loss={0: 2.0, 10: 1.0},
                                  val__accuracy={0: 0.1, 10: acc_scratch}),
            "cls_finetune": run_of("cls_finetune", val__loss={0: 2.0, 10: 0.8},
                                   val__accuracy={0: 0.1, 10: acc_tuned}),
        }  # fmt: skip

    o = qs.finetune(runs(0.5, 0.625))
    t = target(o, "val accuracy")
    assert t.value == pytest.approx(0.125) and t.met and t.goal == "> 0"
    assert o.rows["cls_finetune"] == ["2.000 / 0.800", "0.100 / 0.625"]
    assert not target(qs.finetune(runs(0.5, 0.5)), "val accuracy").met  # a tie does not beat
    assert not target(qs.finetune(runs(0.6, 0.5)), "val accuracy").met


# --------------------------------------------------------------------------- upcycle


def test_upcycle_counts_further_steps_to_the_continued_dense_loss(tmp_path):
    def runs(upcycled):
        return {
            "dense": run_of("dense", val__loss={0: 6.0, 1500: 2.0}),
            "dense_more": run_of("dense_more", val__loss={0: 2.0, 250: 1.95, 500: 1.9}),
            "upcycled": run_of("upcycled", val__loss=upcycled),
        }

    o = qs.upcycle(runs({0: 2.0, 100: 1.9, 500: 1.8}))
    t = target(o, "upcycled")
    assert t.value == pytest.approx(100 / 500) and t.met and t.goal == "< 1"
    assert o.rows["dense_more"] == ["2.000 / 1.900", "500.0"]
    assert "from 2.0000" in o.columns[1]
    assert not target(qs.upcycle(runs({0: 2.0, 500: 1.9})), "upcycled").met  # a tie
    assert target(qs.upcycle(runs({0: 2.0, 500: 1.95})), "upcycled").value is None
    (tmp_path / "dense" / "checkpoints").mkdir(parents=True)
    (tmp_path / "dense" / "checkpoints" / "latest").write_text("step_00001500\n")
    src = tmp_path / "dense" / "checkpoints" / "step_00001500"
    dirs = {"dense": tmp_path / "dense"}
    assert qs.dense_checkpoint_overrides(dirs) == [f"train.init_from={src}"]
    assert qs.upcycle_overrides(dirs) == [f"train.init_from={src}", "moe.upcycle=true"]


# --------------------------------------------------------------------------- attention


def test_attention_arms_are_dense_and_every_causal_variant():
    from xpar.models.attention import attention_names, get_attention

    arms = qs.attention_arms()
    assert arms[0].name == "attn_dense" and arms[0].overrides == ("attention=dense",)
    causal = {n for n in attention_names() if get_attention(n).causal_ok}
    assert {a.name.removeprefix("attn_") for a in arms} == causal


def test_attention_compares_loss_and_tokens_per_s_with_dense():
    tps = "train/tokens_per_s"
    runs = {
        "attn_dense": run_of("attn_dense", val__loss={0: 5.0, 300: 2.0}, **{tps: {10: 100.0, 20: 120.0, 30: 110.0}}),
        "attn_fast": run_of("attn_fast", val__loss={0: 5.0, 300: 2.08}, **{tps: {10: 330.0}}),
        "attn_bad": run_of("attn_bad", val__loss={0: 5.0, 300: 2.2}, **{tps: {10: 55.0}}),
    }  # fmt: skip
    o = qs.attention(runs)
    assert o.rows["attn_dense"][1:] == ["1.000", "110", "1.00"]
    assert o.rows["attn_fast"][1:] == ["1.040", "330", "3.00"]
    fast, bad = target(o, "fast"), target(o, "bad")
    assert fast.met and fast.value == pytest.approx(1.04) and fast.goal == "<= 1.05"
    assert not bad.met and bad.value == pytest.approx(1.1)


# --------------------------------------------------------------------------- the suites


def test_the_suites_in_order_and_what_they_share():
    assert list(qs.SUITES) == [
        "moe_vs_dense",
        "encoder_mlm",
        "aux_free",
        "hash_base",
        "distill",
        "finetune",
        "upcycle",
        "attention",
    ]
    arms = collect_arms(list(qs.SUITES.values()))
    names = [a.name for a in arms]
    assert len(names) == len(set(names)) == 14 + len(qs.attention_arms())
    for s in qs.SUITES.values():
        assert s.reference and s.title
        for group in s.fair:
            assert set(group) <= {a.name for a in s.arms}
    # judge() runs each suite's evaluate on its own arms only
    r = judge(
        qs.SUITES["moe_vs_dense"],
        {
            "dense": run_of("dense", val__loss={0: 3.0, 10: 2.0}),
            "moe": run_of("moe", val__loss={0: 3.0, 10: 1.9}),
            "other": run_of("other"),
        },
    )
    assert list(r.arms) == ["dense", "moe"] and r.targets[0].value == pytest.approx(
        (10 * 1.0 / 1.1) / 10
    )


def _cfg(arm):
    return compose_config(
        [f"experiment={arm.experiment}", *arm.overrides], world_size=1, cuda_available=False
    )


@pytest.mark.parametrize("name", list(qs.SUITES))
def test_each_suites_arms_compose_and_train_alike(name):
    suite = qs.SUITES[name]
    cfgs = {a.name: _cfg(a) for a in suite.arms}
    for group in suite.fair:
        assert unfair_fields({n: to_plain_dict(cfgs[n]) for n in group}, suite.may_differ) == []


def _active(cfg) -> tuple[int, int]:
    """(active params without the router weights, router weights) at the byte vocabulary."""
    model = dataclasses.replace(cfg.model, vocab_size=257)
    cost = model_cost(model, cfg.moe, cfg.data.seq_len)
    routers = cost.n_moe_layers * cfg.moe.num_experts * model.d_model if cfg.has_moe else 0
    if cfg.has_moe and cfg.moe.router == "hash":
        routers = 0  # a table, no weights
    return cost.active_params - routers, routers


def test_arms_that_claim_equal_active_params_have_them():
    dense = compose_config(["experiment=quality_dense"], world_size=1, cuda_available=False)
    want = _active(dense)[0]
    for exp in (
        "quality_moe",
        "quality_moe_auxfree",
        "quality_encoder",
        "quality_encoder_ec",
        "quality_top1",
        "quality_hash",
    ):
        cfg = compose_config([f"experiment={exp}"], world_size=1, cuda_available=False)
        assert _active(cfg)[0] == want, exp
        assert dataclasses.replace(cfg.model, causal=True) == dense.model, exp
    # top-1 and BASE encoders: half of top-2's expert columns
    for exp in ("quality_encoder_top1", "quality_encoder_base"):
        cfg = compose_config([f"experiment={exp}"], world_size=1, cuda_available=False)
        assert want - _active(cfg)[0] == 4 * 2 * 128 * 256, exp
