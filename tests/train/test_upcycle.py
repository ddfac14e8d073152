"""Sparse upcycling (xpar.train.upcycle through train.init_from with moe.upcycle=true).

- exact start: a dense model's checkpoint upcycled into dropless top-2 and top-3 (renormalised)
  MoE models computes the dense model's logits (atol 1e-6) in one process and at EP=2
  on 2 gloo ranks; every expert bank is the dense FFN transposed, the routers their fresh init.
- noise: the experts differ from each other and from the dense FFN by about noise x std,
  and the same experts come out at EP=1 and EP=2 (drawn for the whole bank from the seed).
- refusals at config time: no init_from, an MoE checkpoint, hf:, a model without MoE layers,
  a d_ff or activation that is not the dense FFN's, a shared expert.
- the trainer (slow): a dense run, then an upcycled run from its checkpoint on 2 ranks at
  EP=2 that says what it upcycled and trains.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures import golden
from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.interop.checkpoint_io import write_checkpoint
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig
from xpar.testing import run_distributed
from xpar.train import model_setup
from xpar.train.init_source import InitSource

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)
MOE = dict(num_experts=4, d_ff=48, capacity_factor=None, activation="swiglu")


def _dense_checkpoint(directory: Path) -> Path:
    """A dense swiglu model with trained-looking (not init-std) weights, as a checkpoint."""
    model_cfg = ModelConfig(**MODEL, activation="swiglu")
    moe_cfg = MoEConfig(every=0)
    torch.manual_seed(0)
    dense = MoETransformer(model_cfg, moe_cfg)
    with torch.no_grad():
        for p in dense.parameters():
            p.mul_(1 + torch.rand_like(p))
    record = {"model": {"model": dataclasses.asdict(model_cfg), "moe": dataclasses.asdict(moe_cfg)}}
    return write_checkpoint(directory, dense.state_dict(), record)


def _tokens() -> torch.Tensor:
    return torch.randint(
        0, MODEL["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(1)
    )


def _upcycled(src: Path, ep_group, rank: int, **moe) -> MoETransformer:
    moe_cfg = MoEConfig(**{**MOE, **moe, "upcycle": True})
    torch.manual_seed(5)  # the routers' fresh init, the same on every rank
    model = MoETransformer(ModelConfig(**MODEL, activation="swiglu"), moe_cfg, ep_group=ep_group)
    run = json.loads((src / "client_state.json").read_text())
    model_setup.init_from(model, InitSource(src), SimpleNamespace(rank=rank), run, moe_cfg, 3)
    return model.eval()


def _dense_logits(src: Path) -> torch.Tensor:
    from xpar.train.saved_model import build_model

    dense, _ = build_model(src, "test")
    with torch.no_grad():
        return dense(_tokens())[0]


@pytest.mark.parametrize("top_k", [2, 3])
def test_upcycled_model_computes_the_dense_model_exactly(tmp_path, top_k):
    src = _dense_checkpoint(tmp_path / "dense")
    model = _upcycled(src, "local", 0, top_k=top_k)
    with torch.no_grad():
        got = model(_tokens())[0]
    torch.testing.assert_close(got, _dense_logits(src), atol=1e-6, rtol=0)
    dense = json.loads((src / "client_state.json").read_text())
    from xpar.train.saved_model import full_state

    want = full_state(src)
    state = model.state_dict()
    for i in range(MODEL["n_layers"]):
        for w in ("w1", "w2", "w3"):
            bank = state[f"blocks.{i}.ffn.experts.{w}"]
            for e in range(MOE["num_experts"]):
                assert torch.equal(bank[e], want[f"blocks.{i}.ffn.{w}.weight"].t())
        torch.manual_seed(5)
        fresh = MoETransformer(ModelConfig(**MODEL, activation="swiglu"), MoEConfig(**MOE))
        key = f"blocks.{i}.ffn.router.weight"
        assert torch.equal(state[key], fresh.state_dict()[key])  # fresh, not copied
        assert torch.equal(
            state[f"blocks.{i}.attn.wqkv.weight"], want[f"blocks.{i}.attn.wqkv.weight"]
        )
    assert dense["model"]["moe"]["every"] == 0


def _ep2_worker(rank: int, world: int, src: str, noise: float):
    model = _upcycled(Path(src), None, rank, top_k=2, upcycle_noise=noise)
    with torch.no_grad():
        logits = model(_tokens())[0]
    banks = {k: v.numpy() for k, v in model.state_dict().items() if ".experts.w" in k}
    return logits.numpy(), banks  # arrays: a tensor's shared memory dies with its worker


def test_upcycled_at_ep2_computes_the_dense_model_and_noise_is_layout_free(tmp_path):
    src = _dense_checkpoint(tmp_path / "dense")
    want = _dense_logits(src)
    exact = run_distributed(_ep2_worker, 2, str(src), 0.0)
    for logits, _ in exact:
        torch.testing.assert_close(torch.from_numpy(logits), want, atol=1e-6, rtol=0)

    noisy = run_distributed(_ep2_worker, 2, str(src), 0.01)
    one = _upcycled(src, "local", 0, top_k=2, upcycle_noise=0.01).state_dict()
    for key in noisy[0][1]:
        joined = torch.cat([torch.from_numpy(noisy[r][1][key]) for r in range(2)])
        assert torch.equal(joined, one[key]), key  # the same experts at EP=1 and EP=2
        exact_bank = torch.cat([torch.from_numpy(exact[r][1][key]) for r in range(2)])
        rel = (joined - exact_bank).std() / exact_bank[0].std()
        assert 0.005 < rel < 0.02, (key, rel)  # about noise x std
        assert not torch.equal(joined[0], joined[1])  # experts no longer identical
    assert not torch.allclose(torch.from_numpy(noisy[0][0]), want, atol=1e-6)


# ------------------------------------------------------------------ refusals


def _compose(*overrides):
    return compose_config(
        ["experiment=tiny", "train.out_dir=/tmp/xpar-upcycle-unused", *overrides],
        world_size=1,
        cuda_available=False,
    )


def _tiny_dense(tmp_path: Path, **model) -> Path:
    cfg = _compose("moe=dense")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=64, **model)
    record = {"model": {"model": dataclasses.asdict(model_cfg), "moe": dataclasses.asdict(cfg.moe)}}
    torch.manual_seed(0)
    dense = MoETransformer(model_cfg, cfg.moe)
    return write_checkpoint(tmp_path / "dense", dense.state_dict(), record)


def test_upcycle_refusals_name_the_field_and_the_fix(tmp_path):
    cfg = _compose()
    src = _tiny_dense(tmp_path, d_ff=cfg.moe.d_ff, activation=cfg.moe.activation)
    _compose("moe.upcycle=true", f"train.init_from={src}")  # accepted

    cases = [
        ([], r"moe.upcycle=true without train.init_from.*set train.init_from=<dense"),
        (
            [f"train.init_from={golden.CKPT_FIXTURE}"],
            r"already has MoE layers .*starts from a dense model",
        ),
        ([f"train.init_from=hf:{tmp_path}"], r"hf:<dir> names a local Hugging Face model"),
        (
            [f"train.init_from={src}", "moe.d_ff=7"],
            r"moe.d_ff=7 with moe.upcycle=true.*set moe.d_ff=",
        ),
        (
            [f"train.init_from={src}", "moe.activation=relu"],
            r"moe.activation='relu' .* set moe.activation=",
        ),
        (
            [f"train.init_from={src}", "moe.shared_expert_d_ff=8"],
            r"moe.shared_expert_d_ff=8 .*set moe.shared_expert_d_ff=0",
        ),
        ([f"train.init_from={src}", "moe=dense"], r"moe.every=0: this model has no MoE layer"),
    ]
    for extra, match in cases:
        with pytest.raises(XparConfigError, match=match):
            _compose("moe.upcycle=true", *extra)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(XparConfigError, match=r"Hugging Face import reads MoE models"):
        _compose("moe.upcycle=true", f"train.init_from=hf:{tmp_path / 'hf'}")


# ------------------------------------------------------------------ the trainer


@pytest.mark.slow
def test_trainer_upcycles_a_dense_run_at_ep2(tmp_path):
    cache = golden.data_overrides(tmp_path / "cache")
    common = [*golden.TINY, *cache, "train.steps=2", "train.ckpt_every=2"]
    dense = tmp_path / "dense"
    golden.torchrun(dense, [*common, "moe=dense"], nproc=1)
    model = _compose().model
    p = golden.torchrun(
        tmp_path / "moe",
        [
            *common,
            "parallel.ep_size=2",
            "moe.upcycle=true",
            "moe.capacity_factor=null",
            f"moe.d_ff={model.d_ff}",
            f"moe.activation={model.activation}",
            f"train.init_from={dense}",
        ],
    )
    out = p.stdout + p.stderr
    assert f"upcycled {dense / 'checkpoints' / 'step_00000002'}: " in out
    assert "each expert a copy of its block's dense FFN" in out
    assert out.count("upcycled ") == 1  # rank 0 speaks
    losses = golden.losses(tmp_path / "moe")
    assert sorted(losses) == [1, 2] and all(x == x for x in losses.values())
