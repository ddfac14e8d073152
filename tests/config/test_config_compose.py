"""Every file under conf/ composes and validates; unknown keys and bad options fail clearly."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from xpar.config import (
    CONFIG_DIR,
    XparConfig,
    compose_config,
    to_plain_dict,
)
from xpar.errors import XparConfigError
from xpar.models.attention import attention_names, get_attention
from xpar.models.config import ModelConfig
from xpar.models.cost import model_cost

GROUPS = ("model", "attention", "moe", "data", "optim", "parallel", "logger", "task", "experiment")

# Options that need something from the command line to be complete: an encoder-only
# attention needs the encoder.
EXTRA = {("data", "files"): ["data.files=[corpus/*.jsonl]"]} | {
    ("attention", n): ["model.causal=false"]
    for n in attention_names()
    if not get_attention(n).causal_ok
}
# Options that compose but must be refused in this (causal, decoder-only) model.
REFUSED = {
    ("moe", n): f"moe.router='{n}' is not allowed" for n in ("expert_choice", "base", "soft")
}


def _options() -> list[tuple[str, str]]:
    found = sorted(
        (p.parent.name, p.stem) for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name != "hydra"
    )
    return found


def test_config_dir_is_the_repo_conf_and_complete():
    assert (CONFIG_DIR / "config.yaml").is_file()
    groups = {g for g, _ in _options()}
    assert groups == set(GROUPS), groups
    # The brief's files exist (discovery below covers whatever else is added).
    for g, n in [
        ("model", "tiny"),
        ("model", "small"),
        ("moe", "topk"),
        ("moe", "switch"),
        ("moe", "expert_choice"),
        ("moe", "dense"),
        ("data", "stdlib"),
        ("data", "files"),
        ("optim", "adamw"),
        ("parallel", "cpu_ep"),
        ("parallel", "zero0"),
        ("parallel", "zero1"),
        ("parallel", "zero2"),
        ("logger", "wandb_offline"),
        ("logger", "wandb_online"),
        ("logger", "none"),
        ("experiment", "tiny"),
        ("experiment", "quality_dense"),
        ("experiment", "quality_moe"),
    ]:
        assert (g, n) in _options(), (g, n)


@pytest.mark.parametrize("group,name", _options(), ids=lambda x: str(x))
def test_every_option_composes_and_validates(group, name):
    overrides = [f"{group}={name}", *EXTRA.get((group, name), [])]
    if (group, name) in REFUSED:
        with pytest.raises(XparConfigError, match=REFUSED[(group, name)]):
            compose_config(overrides, world_size=2, cuda_available=False)
        return
    cfg = compose_config(overrides, world_size=2, cuda_available=False)
    assert isinstance(cfg, XparConfig)
    for world_size in (1, 2, 4):  # the CPU job, a single process, a 4-GPU node
        cfg.validate(world_size, cuda_available=world_size == 4)
    json.dumps(to_plain_dict(cfg))


@pytest.mark.parametrize("name", [n for g, n in _options() if g == "experiment"])
def test_experiments_compose_on_several_world_sizes(name):
    cfg = compose_config([f"experiment={name}"], world_size=2, cuda_available=False)
    for world_size in (1, 2, 4):
        cfg.validate(world_size, cuda_available=False)
    assert cfg.logger.run_name == name
    assert cfg.train.out_dir == f"outputs/{name}"


def test_default_is_the_main_job():
    """No overrides: small MoE LM, EP over both of 2 CPU ranks, ZeRO 1, capped stdlib corpus."""
    cfg = compose_config([], world_size=2, cuda_available=False)
    assert cfg.has_moe and cfg.moe_layer_ids == list(range(cfg.model.n_layers))
    assert cfg.moe.router == "topk" and cfg.moe.is_causal
    assert cfg.ep_size(2) == 2
    assert cfg.parallel.zero_stage == 1
    assert cfg.parallel.resolved_backend(cuda_available=False) == "gloo"
    assert cfg.parallel.resolved_precision(cuda_available=False) == "fp32"
    assert cfg.data.files == [] and 0 < cfg.data.max_files <= 200
    assert cfg.logger.wandb_mode == "offline"
    assert cfg.train.out_dir == "outputs/main"  # deterministic, no timestamp
    assert cfg.validate(2, cuda_available=False) == []  # no warnings either


def test_tiny_is_small_and_short():
    cfg = compose_config(["experiment=tiny"], world_size=2, cuda_available=False)
    cost = model_cost(dataclasses.replace(cfg.model, vocab_size=257), cfg.moe, cfg.data.seq_len)
    assert cost.total_params < 300_000
    assert cfg.train.steps <= 10 and cfg.data.max_files <= 10
    assert cfg.train.eval_every <= cfg.train.steps and cfg.train.ckpt_every <= cfg.train.steps


def test_quality_pair_has_equal_active_params_and_differs_only_in_the_ffn():
    dense = compose_config(["experiment=quality_dense"], world_size=2, cuda_available=False)
    moe = compose_config(["experiment=quality_moe"], world_size=2, cuda_available=False)
    assert not dense.has_moe and moe.has_moe
    model = dataclasses.replace(moe.model, vocab_size=257)
    assert dataclasses.replace(dense.model, vocab_size=257) == model
    a_dense = model_cost(model, dense.moe, dense.data.seq_len).active_params
    c_moe = model_cost(model, moe.moe, moe.data.seq_len)
    routers = c_moe.n_moe_layers * moe.moe.num_experts * model.d_model
    assert c_moe.active_params - routers == a_dense
    assert c_moe.total_params > 2 * a_dense  # and the MoE really has more parameters in all
    d, m = to_plain_dict(dense), to_plain_dict(moe)
    for x in (d, m):
        x.pop("moe")
        x["logger"].pop("run_name")
        x["train"].pop("out_dir")
    assert d == m


def test_compose_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["experiment=tiny"], world_size=2, cuda_available=False)
    assert cfg.model.d_model == 64


def test_no_process_group_is_needed(monkeypatch):
    assert not dist.is_initialized()

    def refuse(*a, **k):
        raise AssertionError("config validation must not create a process group")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setattr(dist, "new_group", refuse)
    cfg = compose_config([], world_size=8, cuda_available=False)
    cfg.validate(8, cuda_available=False)
    with pytest.raises(XparConfigError):
        compose_config(["parallel.ep_size=3"], world_size=8, cuda_available=False)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (["model.nonexistent=1"], ["model.nonexistent is not a key of model", "d_model"]),
        (["+model.nonexistent=1"], ["model.nonexistent is not a key of model", "d_model"]),
        (["nonexistent=1"], ["nonexistent is not a top-level key or config group", "model, moe"]),
        (["+train.stepz=3"], ["train.stepz is not a key of train; did you mean train.steps?"]),
        (["train.steps=abc"], ["train.steps", "abc"]),
        (["model=huge"], ["model/huge", "small", "tiny"]),
        (["experiment=tinyy"], ["experiment/tinyy", "tiny"]),
    ],
)
def test_bad_keys_and_options_fail_clearly(overrides, expect):
    with pytest.raises(XparConfigError) as ei:
        compose_config(overrides, world_size=2, cuda_available=False)
    for s in expect:
        assert s in str(ei.value), (s, str(ei.value))


def test_group_file_with_unknown_key_is_rejected(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    (conf / "model" / "typo.yaml").write_text(
        "defaults:\n  - schema\n  - _self_\n\nd_modle: 128\n", encoding="utf-8"
    )
    with pytest.raises(XparConfigError, match="d_modle"):
        compose_config(["model=typo"], config_dir=conf, world_size=1, cuda_available=False)
    # The copy itself is fine: config_dir is honoured.
    assert compose_config([], config_dir=conf, world_size=1, cuda_available=False).has_moe


def test_group_schemas_are_registered_and_first_in_every_group_file():
    for group, name in _options():
        if group == "experiment":
            text = (CONFIG_DIR / group / f"{name}.yaml").read_text(encoding="utf-8")
            assert text.startswith("# @package _global_"), name
            continue
        if group == "attention":  # writes into the (typed) model node, its own name
            text = (CONFIG_DIR / group / f"{name}.yaml").read_text(encoding="utf-8")
            assert text.startswith("# @package model\n"), name
            assert f"\nattention: {name}\n" in text, name
            continue
        text = (CONFIG_DIR / group / f"{name}.yaml").read_text(encoding="utf-8")
        assert "defaults:\n  - schema\n  - _self_\n" in text, (group, name)


def test_compose_restores_an_initialised_hydra():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        before = compose(config_name="config", overrides=["experiment=tiny"])
        cfg = compose_config(["model=small"], world_size=1, cuda_available=False)
        after = compose(config_name="config", overrides=["experiment=tiny"])
        assert cfg.model.d_model == 256
        assert before == after
    assert not GlobalHydra.instance().is_initialized()


def test_plain_dict_is_json_and_redacts_secrets():
    cfg = compose_config(
        ["+parallel.deepspeed.comms_logger.auth_token=abc", "+parallel.deepspeed.wall_clock=1"],
        world_size=2,
        cuda_available=False,
    )
    d = to_plain_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["parallel"]["deepspeed"]["comms_logger"]["auth_token"] == "<redacted>"
    assert d["parallel"]["deepspeed"]["wall_clock"] == 1
    assert d["model"] == dataclasses.asdict(cfg.model)
    # Entity/run names are refused when key-like, so values only get here another way.
    cfg.train.out_dir = "runs/" + "ab12" * 10
    assert to_plain_dict(cfg)["train"]["out_dir"] == "<redacted>"


def test_model_config_node_is_the_models_own_class():
    cfg = compose_config([], world_size=1, cuda_available=False)
    assert type(cfg.model) is ModelConfig
    assert Path(CONFIG_DIR).is_absolute()
