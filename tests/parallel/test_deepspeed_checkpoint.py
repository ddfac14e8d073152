"""save / load of expert-sharded params + optimizer state through real DeepSpeed engines.

4 gloo ranks, EP=2 x DP=2, ZeRO 0, 1, 2: train 2 steps, save, train 2 more (A);
a fresh engine with *different* initial weights loads the checkpoint and trains
the same 2 steps (B). Params, optimizer state, LR and counters must match exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from parallel_toy import build_engine, train

from xpar.testing import run_distributed

STAGES = (0, 1, 2)


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


def _params(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _roundtrip(rank, world, root):
    from xpar.errors import XparConfigError
    from xpar.parallel.deepspeed import load, save
    from xpar.parallel.groups import init_parallel

    groups = init_parallel(ep_size=2, backend="gloo")
    out = {}
    for stage in STAGES:
        d = f"{root}/zero{stage}"
        a = build_engine(groups, stage, 1)
        train(a, groups, range(2), 1)
        client = {"step": 2, "rng": torch.get_rng_state(), "who": f"rank{rank}", "x": [1, 2.5]}
        save(a, d, client)
        saved_params, saved_opt = _params(a), _snapshot(a.optimizer.state_dict())
        saved_lr = a.get_lr()
        losses_a, norms_a = train(a, groups, range(2, 4), 1)

        b = build_engine(groups, stage, 1, seed=1)
        init_diff = max((p - saved_params[n]).abs().max().item() for n, p in _params(b).items())
        got = load(b, d)
        res = {
            "init_diff": init_diff,
            "param_diff": max(
                (p - saved_params[n]).abs().max().item() for n, p in _params(b).items()
            ),
            "opt_diff": _max_diff(saved_opt, _snapshot(b.optimizer.state_dict())),
            "opt_numel": sum(t.numel() for t in saved_opt.values()),
            "lr": (saved_lr, b.get_lr()),
            "steps": b.global_steps,
            "client_ok": got["who"] == f"rank{rank}"
            and got["step"] == 2
            and got["x"] == [1, 2.5]
            and torch.equal(got["rng"], client["rng"]),
        }
        losses_b, norms_b = train(b, groups, range(2, 4), 1)
        res["cont"] = (losses_a, losses_b, norms_a, norms_b)
        res["final_diff"] = max(
            (p - _params(a)[n]).abs().max().item() for n, p in _params(b).items()
        )
        out[stage] = res

    # a checkpoint from another ZeRO stage is refused with a clear error
    c = build_engine(groups, 2, 1)
    try:
        load(c, f"{root}/zero1")
        out["mismatch"] = None
    except XparConfigError as e:
        out["mismatch"] = str(e)
    return out


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def roundtrip(ckpt_root):
    return run_distributed(_roundtrip, 4, str(ckpt_root), timeout=600)


@pytest.mark.parametrize("stage", STAGES)
def test_load_restores_params_and_optimizer_state_exactly(roundtrip, stage):
    for rank, out in enumerate(roundtrip):
        r = out[stage]
        assert r["init_diff"] > 1e-2, "the fresh engine must start elsewhere"
        assert r["param_diff"] == 0, (rank, stage)
        assert r["opt_diff"] == 0, (rank, stage)
        assert r["opt_numel"] > 0
        assert r["lr"][0] == r["lr"][1]
        assert r["steps"] == 2
        assert r["client_ok"], (rank, stage)


@pytest.mark.parametrize("stage", STAGES)
def test_training_continues_identically_after_load(roundtrip, stage):
    for rank, out in enumerate(roundtrip):
        losses_a, losses_b, norms_a, norms_b = out[stage]["cont"]
        assert losses_b == losses_a, (rank, stage)
        assert norms_b == norms_a, (rank, stage)
        assert out[stage]["final_diff"] == 0, (rank, stage)


def test_checkpoint_files_and_layout_mismatch(roundtrip, ckpt_root):
    meta = json.loads((ckpt_root / "zero1" / "xpar_parallel.json").read_text())
    assert (meta["world_size"], meta["ep_size"], meta["zero_stage"]) == (4, 2, 1)
    names = sorted(p.name for p in (ckpt_root / "zero1").iterdir())
    assert names == [f"rank{r:05d}.pt" for r in range(4)] + ["xpar_parallel.json"]
    for out in roundtrip:
        assert out["mismatch"] is not None and "parallel.zero_stage" in out["mismatch"]
