"""Checkpoints: the atomic writer, `latest` and pruning, per-rank files, the resume guard.

- files and guard: plain functions, no process group.
- engines (4 gloo ranks, EP=2 x DP=2, real DeepSpeed engines, ZeRO 0/1/2): save / load
  into a fresh engine restores params, optimizer state, LR, counters exactly and
  training continues identically; the rank file keeps the format of tests/fixtures/ckpt_v1;
  a checkpoint of another ZeRO stage reshards to the saved weights (tests/train/test_reshard.py).
- trainer (slow, 2 ranks): the committed ckpt_v1 checkpoint (from before the guard
  recorded the tokenizer and the training config) refuses a changed hyperparameter unless
  train.resume=force (then one warning line), and is refused, naming the parameters, when
  the shapes change, force or not.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.fixtures import golden
from tests.parallel.parallel_toy import (
    battery,
    build_engine,
    params_diff,
    params_of,
    part,
    train,
)
from xpar.errors import XparConfigError
from xpar.testing import run_distributed
from xpar.train import checkpoint as ckpt
from xpar.train import resume_guard

STAGES = (0, 1, 2)
FIXTURE_STEP = golden.CKPT_FIXTURE / "step_00000002"
RANK_FILE_KEYS = ["client_state", "engine", "layout", "lr_scheduler", "module", "optimizer", "rank"]

# ------------------------------------------------------------------ atomic files, latest


def test_write_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    ckpt.write_atomic(path, "old")
    ckpt.write_atomic(path, "new")
    assert path.read_text() == "new"
    ckpt.write_atomic(tmp_path / "t.pt", lambda p: torch.save({"x": torch.ones(2)}, p))
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["x"], torch.ones(2))

    def half_then_crash(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.write_atomic(path, half_then_crash)
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "t.pt"]


def test_latest_publish_and_prune(tmp_path):
    assert ckpt.latest(tmp_path) is None
    for step in (3, 6, 9):
        ckpt.step_dir(tmp_path, step).mkdir()
        ckpt.write_client_state(ckpt.step_dir(tmp_path, step), {"step": step})
    ckpt.publish(tmp_path, 6)
    assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, 6)
    assert ckpt.read_client_state(ckpt.latest(tmp_path)) == {"step": 6}
    # step 9 is newer than `latest`: a crashed run's partial write, never the one kept
    assert ckpt.prune(tmp_path, keep=1) == [ckpt.step_dir(tmp_path, 3)]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000006", "step_00000009"]
    (tmp_path / ckpt.LATEST).write_text("step_00000042\n")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.latest(tmp_path)


# ------------------------------------------------------------------ the resume guard


def _fixture_module_state() -> dict:
    from xpar.parallel.deepspeed import XparEngine

    with torch.serialization.safe_globals(XparEngine.safe_globals()):
        state = torch.load(FIXTURE_STEP / "rank00000.pt", map_location="cpu", weights_only=True)
    assert sorted(state) == RANK_FILE_KEYS
    return state["module"]


def _fixture_run() -> dict:
    return ckpt.read_client_state(FIXTURE_STEP)


def _now_run(**changes) -> dict:
    """The fixture's recorded configs as a run of today would record them, plus changes."""
    saved = _fixture_run()["model"]
    run = {
        "model": {"model": dict(saved["model"]), "moe": dict(saved["moe"])},
        "tokenizer": {"spec": "byte", "fingerprint": "byte-v1", "vocab_size": 257},
    }
    for key, value in changes.items():
        group, name = key.split("__")
        run["model"][group][name] = value
    return run


def test_old_client_state_without_the_new_fields_is_judged_by_its_shapes():
    saved = _fixture_module_state()
    assert "tokenizer" not in _fixture_run()  # written before the tokenizer was recorded
    # a config field added since the checkpoint was written is not a change
    now = _now_run(moe__a_field_added_later=1)
    assert ckpt.check_resumable("ck", saved, saved, _fixture_run(), now) == []


def test_changed_hyperparameters_that_keep_the_shapes_are_refused_unless_forced():
    saved = _fixture_module_state()
    now = _now_run(moe__aux_loss_weight=0.0, moe__capacity_factor=2.0, model__init_std=0.01)
    changes = [
        "model.init_std: checkpoint 0.02, now 0.01",
        "moe.aux_loss_weight: checkpoint 0.01, now 0.0",
        "moe.capacity_factor: checkpoint 1.25, now 2.0",
    ]
    with pytest.raises(XparConfigError) as e:
        ckpt.check_resumable("ck", saved, saved, _fixture_run(), now)
    msg = str(e.value)
    assert msg.startswith("train.resume: the checkpoint ck was written with a different config: ")
    assert "; ".join(changes) in msg and "set train.resume=force" in msg
    assert "train.out_dir" in msg
    assert ckpt.check_resumable("ck", saved, saved, _fixture_run(), now, force=True) == changes


def _training(**changes) -> dict:
    run = {
        "data": {"files": ["a.txt"], "seq_len": 64, "cache_dir": "/c", "tokenizer": "byte"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "parallel": {"zero_stage": 1, "timeout_s": 600},
        "train": {"steps": 6, "seed": 0, "out_dir": "a", "eval_every": 3, "ckpt_every": 3},
    }
    for key, value in changes.items():
        group, name = key.split("__")
        run[group][name] = value
    return {"training": run}


def test_the_training_config_is_compared_except_what_may_differ():
    state = {"w": torch.zeros(2)}
    saved = _training()
    may_differ = _training(
        train__steps=60,
        train__out_dir="b",
        train__eval_every=1,
        train__ckpt_every=1,
        parallel__timeout_s=60,
        data__cache_dir="/elsewhere",
        data__tokenizer="/moved/byte",  # its content is compared instead
        parallel__zero_stage=2,  # the layout: the checkpoint reshards
    )
    assert ckpt.check_resumable("ck", state, state, saved, may_differ) == []
    differs = _training(data__files=["b.txt"], optim__lr=1e-3, train__seed=1)
    assert ckpt.check_resumable("ck", state, state, saved, differs, force=True) == [
        "data.files: checkpoint ['a.txt'], now ['b.txt']",
        "optim.lr: checkpoint 0.003, now 0.001",
        "train.seed: checkpoint 0, now 1",
    ]
    # a field the checkpoint did not record (added to the config since) is no difference
    added = _training()
    added["training"]["optim"]["new_knob"] = 1
    assert ckpt.check_resumable("ck", state, state, saved, added) == []


def test_changed_shapes_are_refused_naming_parameters_fields_and_fix():
    saved = _fixture_module_state()
    now = {k: v for k, v in saved.items() if k != "norm.weight"}
    now["blocks.0.ffn.experts.w1"] = torch.zeros(2, 32, 16)
    now["blocks.9.extra"] = torch.zeros(3)
    with pytest.raises(XparConfigError) as e:  # force or not
        ckpt.check_resumable("ck", saved, now, _fixture_run(), _now_run(moe__d_ff=16), force=True)
    msg = str(e.value)
    assert "written by a different model (moe.d_ff: checkpoint 32, now 16)" in msg
    assert "blocks.0.ffn.experts.w1 saved [2, 32, 32], now [2, 32, 16]" in msg
    assert "blocks.9.extra saved absent, now [3]" in msg
    assert "norm.weight saved [32], now absent" in msg
    assert "train.out_dir" in msg and "train.resume=never train.overwrite=true" in msg


def test_a_deep_model_names_a_few_parameters_and_counts_the_rest():
    saved = {f"p{i:02d}": torch.zeros(2) for i in range(20)}
    now = {k: torch.zeros(3) for k in saved}
    with pytest.raises(
        XparConfigError, match=r"p05 saved \[2\], now \[3\]; and 14 more parameters"
    ):
        ckpt.check_resumable("ck", saved, now, None, None)


def test_another_tokenizer_is_refused_a_moved_one_is_not_a_difference():
    state = {"tok_emb.weight": torch.zeros(320, 8)}
    saved = _now_run()
    moved = _now_run()
    moved["tokenizer"]["spec"] = "/elsewhere/byte"  # the same content (fingerprint)
    assert ckpt.check_resumable("ck", state, state, saved, moved) == []
    other = _now_run()
    other["tokenizer"].update(spec="/tok", fingerprint="hf-123", vocab_size=300)
    with pytest.raises(XparConfigError) as e:  # same padded embedding, other token ids
        ckpt.check_resumable("ck", state, state, saved, other)
    msg = str(e.value)
    assert "(data.tokenizer: checkpoint 'byte', now '/tok')" in msg
    assert "tokenizer content saved 'byte-v1', now 'hf-123'" in msg
    assert "vocabulary size saved 257, now 300" in msg


def test_run_record_is_what_client_state_records():
    from xpar.config.store import compose_config
    from xpar.data.tokenizer import ByteTokenizer

    cfg = compose_config(["experiment=tiny"], world_size=1, cuda_available=False)
    rec = resume_guard.run_record(cfg, cfg.model, ByteTokenizer())
    assert sorted(rec) == ["model", "tokenizer", "training"]
    assert sorted(rec["model"]) == ["model", "moe"]
    assert sorted(rec["training"]) == ["data", "optim", "parallel", "train"]
    assert rec["model"]["moe"]["d_ff"] == 64
    assert rec["training"]["train"]["steps"] == 6 and rec["training"]["optim"]["lr"] == 3e-3
    assert rec["tokenizer"] == {"spec": "byte", "fingerprint": "byte-v1", "vocab_size": 257}
    assert json.loads(json.dumps(rec)) == rec


# ------------------------------------------------------------------ engines


def _tensors(obj, path=""):
    """(path, tensor) pairs of a nested state dict, in a stable order."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{path}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def _snapshot(state_dict) -> dict:
    return {k: t.detach().clone() for k, t in _tensors(state_dict)}


def _max_diff(ta: dict, tb: dict) -> float:
    assert ta.keys() == tb.keys(), set(ta) ^ set(tb)
    return max(((x.double() - tb[k].double()).abs().max().item() for k, x in ta.items()), default=0)


def _round_trip(rank, groups, stage, d):
    from xpar.parallel.deepspeed import XparEngine

    a = build_engine(groups, stage, 1)
    train(a, groups, range(2), 1)
    client = {"step": 2, "rng": torch.get_rng_state(), "who": f"rank{rank}", "x": [1, 2.5]}
    ckpt.save(a, d, client)
    saved_params, saved_opt = params_of(a), _snapshot(a.state_dict()["optimizer"])
    saved_lr = a.lr()
    cont_a = train(a, groups, range(2, 4), 1)

    b = build_engine(groups, stage, 1, seed=1)  # starts from other weights
    init_diff = params_diff(b, saved_params)
    got = ckpt.load(b, d)
    res = {
        "init_diff": init_diff,
        "param_diff": params_diff(b, saved_params),
        "opt_diff": _max_diff(saved_opt, _snapshot(b.state_dict()["optimizer"])),
        "opt_numel": sum(t.numel() for t in saved_opt.values()),
        "lr": (saved_lr, b.lr()),
        "steps": b.state_dict()["engine"]["global_steps"],
        "client_ok": got["who"] == f"rank{rank}"
        and got["step"] == 2
        and got["x"] == [1, 2.5]
        and torch.equal(got["rng"], client["rng"]),
    }
    cont_b = train(b, groups, range(2, 4), 1)
    res["cont"] = (cont_a, cont_b)
    res["final_diff"] = params_diff(b, params_of(a))
    with torch.serialization.safe_globals(XparEngine.safe_globals()):
        state = torch.load(ckpt.rank_file(d, rank), map_location="cpu", weights_only=True)
    res["file"] = {"keys": sorted(state), "layout": state["layout"], "rank": state["rank"]}
    return res


def _guarded_load(rank, groups, d):
    """load(run=...) against a client_state.json: refused on every rank; with force, one
    warning on rank 0, then it resumes."""
    rec = {"model": {"model": {"d_model": 8}, "moe": {"aux_loss_weight": 0.01}}}
    if rank == 0:
        ckpt.write_client_state(d, {"step": 2, **rec})
    dist.barrier()
    now = {"model": {"model": {"d_model": 8}, "moe": {"aux_loss_weight": 0.0, "new": 1}}}
    engine = build_engine(groups, 1, 1, seed=1)
    try:
        ckpt.load(engine, d, run=now)
        refused = None
    except XparConfigError as e:
        refused = str(e)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ckpt.load(engine, d, run=now, force=True)
    return refused, [str(w.message) for w in seen]


def _checkpoint_part(rank, world, groups, grad_accum, root):
    out = {}
    for stage in STAGES:
        out[stage] = _round_trip(rank, groups, stage, f"{root}/zero{stage}")
    out["warning"] = _guarded_load(rank, groups, f"{root}/zero1")
    # a checkpoint from another ZeRO stage reshards (xpar.train.reshard): the saved weights
    from xpar.parallel.deepspeed import XparEngine

    with torch.serialization.safe_globals(XparEngine.safe_globals()):
        saved = torch.load(ckpt.rank_file(f"{root}/zero1", rank), weights_only=True)["module"]
    other = build_engine(groups, 2, 1, seed=1)
    ckpt.load(other, f"{root}/zero1")
    out["restaged"] = params_diff(other, saved)
    return out


def _fallback_part(rank, world, groups, grad_accum, root):
    """Two trainer-like checkpoints; rank 3's file of the newest has a flipped byte: every rank
    agrees to fall back (auto), or refuses (the damaged one named); with none left, an error."""
    from xpar.config.store import compose_config
    from xpar.train import resume

    out = Path(root) / "fallback"
    ck = out / "checkpoints"
    engine = build_engine(groups, 1, 1)
    for step in (2, 4):
        d = ckpt.step_dir(ck, step)
        ckpt.save(engine, d, {"rng": torch.get_rng_state()})
        if rank == 0:
            ckpt.write_client_state(d, {"step": step, "world_size": world, "schedule_steps": 6})
            ckpt.publish(ck, step)
        dist.barrier()
    newest = ckpt.step_dir(ck, 4) / "rank00003.pt"
    if rank == 0:
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    dist.barrier()

    def plan(*overrides):
        cfg = compose_config(
            ["experiment=tiny", f"train.out_dir={out}", *overrides],
            world_size=world,
            cuda_available=False,
        )
        return cfg, resume.plan_start(cfg)

    res = {}
    cfg, start = plan()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        used, state = resume.loadable(cfg, start, engine)
    res["planned"], res["used"], res["step"] = start.resume.name, used.resume.name, used.step
    res["lines"] = [str(w.message) for w in seen]
    res["loaded"] = ckpt.load(build_engine(groups, 1, 1, seed=1), used.resume, state=state)
    res["loaded"] = sorted(res["loaded"])
    cfg, start = plan(f"train.resume={ckpt.step_dir(ck, 4)}")
    try:
        resume.loadable(cfg, start, engine)
    except ckpt.DamagedCheckpoint as e:
        res["named"] = str(e)
    if rank == 2:  # the older one is damaged too: nothing left
        ckpt.rank_file(ckpt.step_dir(ck, 2), 2).unlink()
    dist.barrier()
    cfg, start = plan()
    try:
        resume.loadable(cfg, start, engine)
    except ckpt.DamagedCheckpoint as e:
        res["none"] = str(e)
    return res


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def world4(ckpt_root):
    parts = {"checkpoint": _checkpoint_part, "fallback": _fallback_part}
    return run_distributed(battery, 4, parts, 1, str(ckpt_root), timeout=600)


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_restores_params_and_optimizer_state_exactly(world4, stage):
    for rank, out in enumerate(part(world4, "checkpoint")):
        r = out[stage]
        assert r["init_diff"] > 1e-2, "the fresh engine must start elsewhere"
        assert r["param_diff"] == 0, (rank, stage)
        assert r["opt_numel"] > 0 and r["opt_diff"] == 0, (rank, stage)
        assert r["lr"][0] == r["lr"][1]
        assert r["steps"] == 2
        assert r["client_ok"], (rank, stage)


@pytest.mark.parametrize("stage", STAGES)
def test_training_continues_identically_after_load(world4, stage):
    for rank, out in enumerate(part(world4, "checkpoint")):
        (losses_a, norms_a), (losses_b, norms_b) = out[stage]["cont"]
        assert losses_b == losses_a and norms_b == norms_a, (rank, stage)
        assert out[stage]["final_diff"] == 0, (rank, stage)


@pytest.mark.parametrize("stage", STAGES)
def test_rank_files_keep_the_format_of_the_committed_fixture(world4, stage):
    fixture_layout = json.loads((FIXTURE_STEP / ckpt.LAYOUT_FILE).read_text())
    for rank, out in enumerate(part(world4, "checkpoint")):
        f = out[stage]["file"]
        assert f["keys"] == RANK_FILE_KEYS and f["rank"] == rank
        assert f["layout"] == {"format": 1, "world_size": 4, "ep_size": 2, "zero_stage": stage,
                               "precision": "fp32"}  # fmt: skip
        assert set(f["layout"]) <= set(fixture_layout)


def test_checkpoint_files_and_another_zero_stage_reshards(world4, ckpt_root):
    outs = part(world4, "checkpoint")
    meta = json.loads((ckpt_root / "zero1" / "xpar_parallel.json").read_text())
    assert (meta["world_size"], meta["ep_size"], meta["zero_stage"]) == (4, 2, 1)
    names = sorted(p.name for p in (ckpt_root / "zero0").iterdir())
    files = [f"rank{r:05d}.pt" for r in range(4)] + ["xpar_parallel.json"]
    files += [f"universal{r:05d}.pt" for r in range(4)] + ["universal.json"]
    assert names == sorted(files + [f + ckpt.SUMS for f in files])  # each with its checksum
    for f in files:
        assert ckpt.file_problem(ckpt_root / "zero0" / f) is None
    for out in outs:
        assert out["restaged"] == 0


def test_load_refuses_changed_hyperparameters_and_force_warns_once(world4):
    outs = [out["warning"] for out in part(world4, "checkpoint")]
    for refused, _ in outs:  # on every rank, before any collective
        assert "different config: moe.aux_loss_weight: checkpoint 0.01, now 0.0" in refused
    assert [seen for _, seen in outs[1:]] == [[], [], []]
    (line,) = outs[0][1]
    assert line.startswith("train.resume=force: resuming ") and "zero1" in line
    assert "(moe.aux_loss_weight: checkpoint 0.01, now 0.0)" in line


# ------------------------------------------------------------------ the trainer, end to end


def _resume_fixture(tmp_path, *overrides, check=True):
    out = tmp_path / "resumed"
    shutil.copytree(golden.CKPT_FIXTURE, out / "checkpoints")
    args = golden.SMALL + golden.data_overrides(tmp_path / "cache")
    args += ["train.steps=3", "train.ckpt_every=3", *overrides]
    return out, golden.torchrun(out, args, check=check)


@pytest.mark.slow
def test_old_checkpoint_refuses_a_changed_hyperparameter_unless_forced(tmp_path):
    out, p = _resume_fixture(tmp_path, "moe.aux_loss_weight=0.0", check=False)
    assert p.returncode != 0
    assert "different config: moe.aux_loss_weight: checkpoint 0.01, now 0.0" in p.stderr
    assert not (out / "metrics.jsonl").exists() or not golden.losses(out)
    shutil.rmtree(out)
    out, p = _resume_fixture(tmp_path, "moe.aux_loss_weight=0.0", "train.resume=force")
    assert "at step 2" in p.stdout
    lines = [x for x in p.stderr.splitlines() if "train.resume=force: resuming" in x]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "(moe.aux_loss_weight: checkpoint 0.01, now 0.0)" in lines[0]
    assert sorted(golden.losses(out)) == [3]
    # from now on the tokenizer, the training config and the schedule's length are recorded
    shared = ckpt.read_client_state(out / "checkpoints" / "step_00000003")
    assert shared["tokenizer"] == {"spec": "byte", "fingerprint": "byte-v1", "vocab_size": 257}
    assert shared["training"]["optim"]["lr"] == 3e-3 and shared["schedule_steps"] == 3


@pytest.mark.slow
def test_old_checkpoint_with_other_shapes_is_refused_naming_the_parameters(tmp_path):
    out, p = _resume_fixture(tmp_path, "moe.d_ff=16", "train.resume=force", check=False)
    assert p.returncode != 0, p.stderr[-3000:]  # torchrun: 1 when a rank fails
    assert "different model (moe.d_ff: checkpoint 32, now 16)" in p.stderr
    assert "blocks.0.ffn.experts.w1 saved [2, 32, 32], now [2, 32, 16]" in p.stderr
    assert "train.resume=never" in p.stderr
    assert not (out / "metrics.jsonl").exists() or not golden.losses(out)
    assert sorted(os.listdir(out / "checkpoints")) == sorted(os.listdir(golden.CKPT_FIXTURE))


def test_a_rank_file_that_fails_its_checksum_makes_every_rank_fall_back(world4, ckpt_root):
    ck = ckpt_root / "fallback" / "checkpoints"
    bad = ck / "step_00000004" / "rank00003.pt"
    outs = part(world4, "fallback")
    for rank, out in enumerate(outs):
        assert (out["planned"], out["used"], out["step"]) == ("step_00000004", "step_00000002", 2)
        assert out["loaded"] == ["rng"], rank
        assert out["named"].startswith(
            f"train.resume='{ck / 'step_00000004'}': checkpoint step_00000004 is damaged "
            f"(rank 3: {bad} has sha256 "
        )
        assert "expected" in out["named"] and "name an older one" in out["named"]
        assert out["none"].startswith(f"train.resume=auto: no checkpoint under {ck} loads on ")
        assert "checkpoint step_00000004 is damaged (rank 3: " in out["none"]
        assert f"(rank 2: {ck / 'step_00000002' / 'rank00002.pt'} is missing" in out["none"]
    (line,) = outs[0]["lines"]  # rank 0 only, one line
    assert line.startswith("train.resume=auto: checkpoint step_00000004 is damaged (rank 3: ")
    assert "(its bytes changed after it was written)); resuming " in line
    assert line.endswith(f"{ck / 'step_00000002'} instead")
    assert [out["lines"] for out in outs[1:]] == [[], [], []]
