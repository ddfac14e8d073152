"""Checkpoints that reshard (xpar.train.reshard): saved at one layout, loaded at another.

- rules: the resume guard accepts another ep_size / ZeRO stage and a new split of the same
  global batch, refuses a changed global batch; the resume line says what carries over.
- engines (the toy model, real DeepSpeed engines on gloo): saved at EP=4 x DP=1 ZeRO-2 on 4
  ranks, loaded at EP=2 (2 ranks, ZeRO-1), EP=1 x DP=2 (ZeRO-0) and in one process (ZeRO-2):
  weights, fp32 masters, Adam moments and steps bitwise the saved ones per global expert
  (read back through a save at the new layout, and the module weights through the rank
  files, which do not go through the universal state); LR schedule and counters kept.
- trainer (slow, torchrun, the committed corpus): experiment=tiny with the aux-loss-free bias,
  8 steps at EP=4 ZeRO-2 on 4 ranks, saved at step 4; from that checkpoint train.resume=auto
  at EP=2 ZeRO-1 on 2 ranks, EP=1 ZeRO-0 on 2 ranks and ZeRO-2 in one process, the same
  global batch (micro batches of 2, accumulated): the resume line says it resharded, the
  continued losses of every layout are within 1e-5 of one process's and of the run that never
  stopped, and the router bias ends bitwise where that run's does.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch

from tests.parallel.parallel_toy import build_engine, train
from xpar.errors import XparConfigError
from xpar.testing import run_distributed
from xpar.train import checkpoint as ckpt
from xpar.train import reshard, resume_guard

# ------------------------------------------------------------------ what is read back


def _entries(directory: Path) -> dict[str, dict]:
    """Every entry of a checkpoint's universal state, by key."""
    index = reshard.read_index(directory)
    out = {}
    for s in range(index["layout"]["world_size"]):
        out.update(torch.load(reshard.shard_file(directory, s), weights_only=True)["entries"])
    assert sorted(out) == sorted(index["entries"])
    return out


def _assert_same_entries(saved: dict, loaded: dict) -> None:
    assert sorted(saved) == sorted(loaded)
    for key, want in saved.items():
        got = loaded[key]
        assert sorted(got) == sorted(want), key
        for field, value in want.items():
            if torch.is_tensor(value):
                assert torch.equal(got[field], value), (key, field)
            else:
                assert got[field] == value, (key, field)


# ------------------------------------------------------------------ rules


def _run(mb, ga=1, world=None, **extra):
    run = {"training": {"train": {"micro_batch_size": mb, "grad_accum": ga}}}
    run["training"]["parallel"] = {"ep_size": extra.get("ep", 0), "zero_stage": extra.get("z", 2)}
    if world is not None:
        run["world_size"] = world
    return run


def test_guard_accepts_a_new_layout_and_a_new_split_of_the_same_global_batch():
    saved = _run(2, world=4, ep=4, z=2)
    state = {"w": torch.zeros(2)}
    # 2 ranks x 4 sequences, or 1 rank x 4 x 2 accumulation: 8 sequences per step as saved
    for now, world in ((_run(4, ep=2, z=1), 2), (_run(4, 2, ep=1, z=0), 1)):
        assert ckpt.check_resumable("ck", state, state, saved, now, world_size=world) == []
    # the world size alone changes the global batch: no config change (the line says it)
    assert ckpt.check_resumable("ck", state, state, saved, _run(2), world_size=2) == []
    # a changed split that changes the global batch is refused unless forced
    with pytest.raises(XparConfigError) as e:
        ckpt.check_resumable("ck", state, state, saved, _run(4), world_size=4)
    msg = str(e.value)
    assert "train.micro_batch_size: checkpoint 2, now 4" in msg
    assert "train.global_batch (micro_batch_size x grad_accum x ranks): checkpoint 8 " in msg
    assert "(2 x 1 x 4 ranks), now 16 (4 x 1 x 4 ranks)" in msg
    assert "train.resume=force" in msg
    assert {"parallel.ep_size", "parallel.zero_stage"} <= resume_guard.MAY_DIFFER


def test_the_resume_line_says_what_was_resharded_and_what_carries_over():
    four = {"world_size": 4, "ep_size": 4, "zero_stage": 2, "precision": "fp32"}
    two = {"world_size": 2, "ep_size": 1, "zero_stage": 0, "precision": "fp32"}
    shared = {"data": {"epoch": 0, "index": 16}, **_run(2, world=4)}
    line = reshard.describe("/c/step_00000002", four, two, shared, _run(4))
    assert line.startswith(
        "train.resume: resharding step_00000002 from 4 ranks (ep_size 4, expert-DP 1, "
        "ZeRO-2, fp32) to 2 ranks (ep_size 1, expert-DP 2, ZeRO-0, fp32): weights, Adam "
        "moments and steps, LR schedule, step counters and buffers (router balance state)"
    )
    assert "the data position is the global stream's and is kept (epoch 0, block 16), 8 " in line
    assert "sequences per step as saved" in line
    assert line.endswith(
        "RNG: ranks 0-1 continue the streams of saved ranks 0-1, those of saved ranks 2-3 "
        "are dropped"
    )
    grown = reshard.describe("s", two, four, {"data": {"epoch": 1, "index": 0}, **_run(4, world=2)},
                             _run(4))  # fmt: skip
    assert "the global batch changes from 8 to 16 sequences per step" in grown
    assert grown.endswith(
        "RNG: ranks 0-1 continue their saved streams, ranks 2-3 are new and start from the "
        "stream a fresh run has (train.seed)"
    )
    assert "\n" not in line + grown


# ------------------------------------------------------------------ engines (the toy)

TOY_LOADS = {"ep2_z1": (2, 2, 1), "ep1_z0": (2, 1, 0), "one_z2": (1, 1, 2)}  # world, ep, ZeRO


def _toy_save(rank, world, root):
    from xpar.parallel.groups import init_parallel

    groups = init_parallel(ep_size=4, backend="gloo")
    engine = build_engine(groups, 2, 1)
    # 3 steps: the LR is then not a fresh engine's (the toy's lr_lambda(2) == lr_lambda(0))
    train(engine, groups, range(3), 1)
    ckpt.save(engine, f"{root}/saved", {"rank": rank, "rng": torch.get_rng_state()})
    return engine.state_dict()["engine"], engine.lr()


def _toy_load(rank, world, root, tags):
    from xpar.parallel.groups import init_parallel

    out = {}
    for tag in tags:
        _, ep, stage = TOY_LOADS[tag]
        groups = init_parallel(ep_size=ep, backend="gloo")
        engine = build_engine(groups, stage, 1, seed=1)  # other weights to start from
        lines = io.StringIO()
        with contextlib.redirect_stdout(lines):
            client = ckpt.load(engine, f"{root}/saved")
        lr, counters = engine.lr(), engine.state_dict()["engine"]
        ckpt.save(engine, f"{root}/{tag}", client)
        losses, _ = train(engine, groups, range(3, 4), 1)  # it trains on
        out[tag] = {
            "client_rank": client.get("rank"),
            "counters": counters,
            "stepped": engine.state_dict()["engine"]["global_steps"],
            "lr": lr,
            "lines": lines.getvalue().splitlines(),
            "finite": all(map(torch.isfinite, torch.tensor(losses))),
        }
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    saved = run_distributed(_toy_save, 4, str(root), timeout=300)
    two = run_distributed(_toy_load, 2, str(root), ["ep2_z1", "ep1_z0"], timeout=300)
    one = run_distributed(_toy_load, 1, str(root), ["one_z2"], timeout=300)
    loads = {tag: [r[tag] for r in (one if tag.startswith("one") else two)] for tag in TOY_LOADS}
    return root, saved, loads


@pytest.mark.parametrize("tag", list(TOY_LOADS))
def test_toy_state_is_bitwise_the_saved_one_at_another_layout(toy, tag):
    root, saved, loads = toy
    saved_entries = _entries(root / "saved")
    assert any(k.endswith("/expert_3") for k in saved_entries)  # per global expert
    assert all(e["step"] == 3 for e in saved_entries.values() if "step" in e)
    _assert_same_entries(saved_entries, _entries(root / tag))
    # the module weights, through the rank files alone
    old, new = _toy_module(root / "saved"), _toy_module(root / tag)
    assert sorted(old) == sorted(new)
    for k in old:
        assert torch.equal(old[k], new[k]), k
    (counters, lr), *_ = saved
    for rank, out in enumerate(loads[tag]):
        assert out["client_rank"] == rank  # rank r continues saved rank r's client state
        assert out["lr"] == lr and out["finite"]
        assert out["counters"] == counters
        assert out["stepped"] == counters["global_steps"] + 1
    (line,) = loads[tag][0]["lines"]
    world, ep, stage = TOY_LOADS[tag]
    assert line.startswith(
        "train.resume: resharding saved from 4 ranks (ep_size 4, expert-DP 1, ZeRO-2, fp32) "
        f"to {world} rank"
    )
    assert f"(ep_size {ep}, expert-DP {world // ep}, ZeRO-{stage}, fp32)" in line
    assert all(out["lines"] == [] for out in loads[tag][1:])  # rank 0 only


def _toy_module(directory: Path) -> dict[str, torch.Tensor]:
    import json

    from xpar.parallel.deepspeed import XparEngine

    ep = json.loads((directory / ckpt.LAYOUT_FILE).read_text())["ep_size"]
    with torch.serialization.safe_globals(XparEngine.safe_globals()):
        parts = [
            torch.load(ckpt.rank_file(directory, r), weights_only=True)["module"] for r in range(ep)
        ]
    full = dict(parts[0])
    for key in ("experts", "expert_bias"):
        full[key] = torch.cat([p[key] for p in parts])
    return full


def test_a_checkpoint_without_universal_state_still_refuses_another_layout(toy, tmp_path):
    root, _, _ = toy
    old = tmp_path / "old"
    shutil.copytree(root / "saved", old)
    for f in old.glob("universal*"):
        f.unlink()
    assert not reshard.has_universal(old)
    out = run_distributed(_refused, 1, str(old), timeout=300)[0]
    assert "it has no universal state (written before resharding)" in out
    assert "resume with the same world size, parallel.ep_size" in out


def _refused(rank, world, directory):
    from xpar.parallel.groups import init_parallel

    groups = init_parallel(ep_size=1, backend="gloo")
    engine = build_engine(groups, 2, 1)
    try:
        ckpt.load(engine, directory)
    except XparConfigError as e:
        return str(e)
    return "loaded"


# ------------------------------------------------------------------ trainer (slow)

# experiment=tiny (4 experts top-2, capacity 1.25) with the aux-loss-free bias; no mid-run eval.
# Every layout keeps micro batches of 2 sequences, so each micro batch holds the same tokens
# as one of the 4-rank run's ranks (a token's drop depends on its micro batch): 8 sequences
# per step as 4 ranks x 1, 2 ranks x 2 accumulated, 1 process x 4.
TRAINER = [
    "experiment=tiny",
    "data=files",
    "+moe.router_options.bias_update_rate=0.01",
    "train.steps=8",
    "train.ckpt_every=4",
    "train.eval_every=100",
    "logger.wandb_mode=disabled",
]
SAVED = ["parallel.ep_size=4", "parallel.zero_stage=2"]  # on 4 ranks
# tag: (ranks, ep_size, ZeRO stage, grad_accum)
TRAINER_LOADS = {"ep2_z1": (2, 2, 1, 2), "ep1_z0": (2, 1, 0, 2), "one_z2": (1, 1, 2, 4)}
BIAS = "expert_bias_E"


def _stopped_at_4(src: Path, dst: Path) -> None:
    """src's run as a run stopped after its step-4 checkpoint: no step 8, nor its rows."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("step_00000008"))
    ckpt.publish(dst / "checkpoints", 4)
    rows = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(r + "\n" for r in rows[:4]))


def _module(step_dir: Path) -> dict[str, torch.Tensor]:
    from xpar.parallel.deepspeed import XparEngine

    with torch.serialization.safe_globals(XparEngine.safe_globals()):
        return torch.load(ckpt.rank_file(step_dir, 0), weights_only=True)["module"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from tests.fixtures import golden

    root = tmp_path_factory.mktemp("trainer")
    data = golden.data_overrides(root / "cache")
    # the run that never stops; its step-4 checkpoint is the one every layout resumes
    golden.torchrun(root / "straight", [*TRAINER, *data, *SAVED], nproc=4)
    runs = {}
    for tag, (world, ep, stage, accum) in TRAINER_LOADS.items():
        out = root / tag
        _stopped_at_4(root / "straight", out)
        layout = [f"parallel.ep_size={ep}", f"parallel.zero_stage={stage}"]
        more = [*layout, f"train.grad_accum={accum}", "train.resume=auto"]
        runs[tag] = golden.torchrun(out, [*TRAINER, *data, *more], nproc=world).stdout
    return root, runs


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(TRAINER_LOADS))
def test_trainer_resumes_a_4_rank_ep4_zero2_run_at_another_layout(trainer, tag):
    from tests.fixtures import golden

    root, runs = trainer
    world, ep, stage, _ = TRAINER_LOADS[tag]
    (line,) = [x for x in runs[tag].splitlines() if x.startswith("train.resume: ")]
    assert line.startswith(
        "train.resume: resharding step_00000004 from 4 ranks (ep_size 4, expert-DP 1, ZeRO-2, "
        f"fp32) to {world} rank{'s' * (world > 1)} (ep_size {ep}, expert-DP {world // ep}, "
        f"ZeRO-{stage}, fp32): weights, Adam moments and steps, LR schedule, step counters and "
        "buffers (router balance state)"
    )
    assert "8 sequences per step as saved" in line
    assert f"resumed from {root / tag}/checkpoints/step_00000004 at step 4" in runs[tag]
    # the continued losses: those of one process and of the run that never stopped
    got, one = golden.losses(root / tag), golden.losses(root / "one_z2")
    straight = golden.losses(root / "straight")
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(one[step], abs=1e-5), step
        assert got[step] == pytest.approx(straight[step], abs=1e-5), step
    # The router bias: the saved one (moved from 0 by step 4) plus one sign step of
    # bias_update_rate per step from the step's loads over all ranks (integer counts), so a
    # resumed run that loaded it bitwise ends bitwise where the straight run does; one that
    # started from zeros would not.
    saved = _module(root / "straight/checkpoints/step_00000004")
    want = _module(root / "straight/checkpoints/step_00000008")
    ended = _module(root / tag / "checkpoints/step_00000008")
    keys = [k for k in saved if k.endswith(BIAS)]
    assert len(keys) == 2 and all(saved[k].abs().sum() > 0 for k in keys)
    for k in keys:
        assert not torch.equal(want[k], saved[k]), k  # it moved after step 4 too
        assert torch.equal(ended[k], want[k]), k
