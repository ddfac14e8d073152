"""Bad configs fail with a message naming field, value and fix; soft problems warn (rank 0)."""

from __future__ import annotations

import json
import warnings

import pytest

from xpar.config import (
    LoggerConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    XparConfig,
    XparConfigWarning,
    compose_config,
    compose_dictconfig,
    load_and_validate,
)
from xpar.errors import XparConfigError

KEY = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B API key

# (overrides, world_size, substrings the message must contain: field, value, fix)
BAD = [
    (
        ["moe.num_experts=6", "parallel.ep_size=4"],
        4,
        ["moe.num_experts=6 is not divisible by parallel.ep_size=4", "choose parallel.ep_size"],
    ),
    (
        ["moe.num_experts=6", "parallel.ep_size=3"],
        4,
        ["parallel.ep_size=3 does not divide the world size 4", "[1, 2, 4]"],
    ),
    (
        [],
        3,
        ["moe.num_experts=8 is not divisible by parallel.ep_size=0 (= world size 3)", "[1]"],
    ),
    (["moe.top_k=9"], 2, ["moe.top_k=9", "top_k must be <= moe.num_experts=8"]),
    (["moe.capacity_factor=0"], 2, ["moe.capacity_factor=0.0", "> 0"]),
    (["moe.capacity_factor=-1.5"], 2, ["moe.capacity_factor=-1.5", "> 0"]),
    (["moe=expert_choice"], 2, ["moe.router='expert_choice'", "causal", "moe=topk"]),
    (
        ["parallel.zero_stage=3"],
        2,
        [
            "parallel.zero_stage=3 with MoE layers is not supported: DeepSpeed cannot partition "
            "expert-parallel parameters with ZeRO-3; use zero_stage 0, 1 or 2"
        ],
    ),
    (["parallel.zero_stage=4"], 2, ["parallel.zero_stage=4", "0, 1, 2 or 3"]),
    (
        ["train.global_batch_size=20"],
        2,
        ["train.global_batch_size=20 is not divisible", "8 * 2 = 16", "multiple of 16"],
    ),
    (
        ["train.global_batch_size=64"],
        2,
        ["train.global_batch_size=64 does not equal", "8 * 1 * 2 = 16", "train.grad_accum=4"],
    ),
    (
        ["model.max_seq_len=64", "data.seq_len=128"],
        2,
        ["model.max_seq_len=64 is smaller than data.seq_len=128", "raise model.max_seq_len"],
    ),
    (["model.n_heads=3"], 2, ["model.n_heads=3", "d_model=256", "divisible"]),
    (["train.eval_every=0"], 2, ["train.eval_every=0", ">= 1"]),
    (["train.ckpt_every=-5"], 2, ["train.ckpt_every=-5", ">= 1"]),
    (["logger.log_every=0"], 2, ["logger.log_every=0", ">= 1"]),
    (["logger.hist_every=-1"], 2, ["logger.hist_every=-1", "or 0 for none"]),
    (["logger.wandb_mode=cloud"], 2, ["logger.wandb_mode='cloud'", "offline, online, disabled"]),
    (["parallel.backend=nccl"], 2, ["parallel.backend='nccl'", "without CUDA", "gloo"]),
    (["parallel.precision=fp16"], 2, ["parallel.precision='fp16'", "fp32, bf16"]),
    ([f"logger.entity={KEY}"], 2, ["logger.entity=<redacted>", "API key", "WANDB_API_KEY"]),
    ([f"logger.run_name=sk-{KEY}"], 2, ["logger.run_name=<redacted>", "wandb login"]),
    (["logger.run_name='api_key=SECRET123'"], 2, ["logger.run_name=<redacted>", "wandb login"]),
    (["logger.project=team/xpar"], 2, ["logger.project='team/xpar'", "cannot contain /"]),
    (["moe.every=5"], 2, ["moe.every=5", "model.n_layers=4", "moe.every=0"]),
    (["optim.min_lr=0.1"], 2, ["optim.min_lr=0.1", "<= optim.lr=0.003"]),
    (["optim.beta2=1.0"], 2, ["optim.beta2=1.0", "[0, 1)"]),
    (["optim.schedule=step"], 2, ["optim.schedule='step'", "cosine, constant, linear"]),
    (["optim.lr=0"], 2, ["optim.lr=0.0", "> 0"]),
    (["model.vocab_size=100"], 2, ["model.vocab_size=100", "257", "model.vocab_size=0"]),
    (
        ["+parallel.deepspeed.train_batch_size=32"],
        2,
        ["parallel.deepspeed.train_batch_size=32 is not allowed", "train.global_batch_size"],
    ),
    (
        ["+parallel.deepspeed.zero_optimization.stage=2"],
        2,
        ["parallel.deepspeed.zero_optimization.stage=2 contradicts parallel.zero_stage=1"],
    ),
    (["parallel.deepspeed_json=/nonexistent/ds.json"], 2, ["parallel.deepspeed_json=", "found"]),
    (
        ["+parallel.deepspeed.optimizer.type=Adam"],
        2,
        ["parallel.deepspeed.optimizer=", "not allowed", "optim.*"],
    ),
    (
        ["+parallel.deepspeed.zero_optimization.offload_optimizer.device=cpu"],
        2,
        ["parallel.deepspeed.zero_optimization.offload_optimizer is not supported", "remove it"],
    ),
    (
        ["parallel=zero0", "parallel.precision=bf16"],
        2,
        ["parallel.zero_stage=0 with parallel.precision='bf16' is not supported", "fp32"],
    ),
    (["train.resume=/nonexistent/ckpt"], 2, ["train.resume='/nonexistent/ckpt'", "auto", "never"]),
    (["train.steps=0"], 2, ["train.steps=0", ">= 1"]),
    (["train.micro_batch_size=0"], 2, ["train.micro_batch_size=0", ">= 1"]),
    (["train.max_time_s=-1"], 2, ["train.max_time_s=-1", ">= 0"]),
    (["data=files"], 2, ["data.files is required", "data.files=[corpus/*.jsonl]"]),
    (["data.val_fraction=0"], 2, ["data.val_fraction=0"]),
    ([], 0, ["world_size=0", ">= 1 rank"]),
]


@pytest.mark.parametrize(
    "overrides,world_size,expect", BAD, ids=[" ".join(o) or f"ws{w}" for o, w, _ in BAD]
)
def test_bad_config_message(overrides, world_size, expect):
    assert len(BAD) >= 15
    with pytest.raises(XparConfigError) as ei:
        compose_config(overrides, world_size=world_size, cuda_available=False)
    msg = str(ei.value)
    for s in expect:
        assert s in msg, f"{s!r} not in {msg!r}"


@pytest.mark.parametrize(
    "override, secret", [(f"logger.entity={KEY}", KEY), ("logger.run_name='token: x1y2'", "x1y2")]
)
def test_secret_is_never_echoed(override, secret):
    with pytest.raises(XparConfigError) as ei:
        compose_config([override], world_size=2, cuda_available=False)
    assert secret not in str(ei.value)
    assert secret not in repr(ei.value.__cause__ or "")


def test_zero3_is_refused_by_the_deepspeed_adapter_even_for_a_dense_model():
    with pytest.raises(XparConfigError, match="parallel.zero_stage=3 is not supported"):
        compose_config(["moe=dense", "parallel.zero_stage=3"], world_size=2, cuda_available=False)


def test_nccl_and_bf16_fine_with_cuda():
    cfg = compose_config(
        ["parallel=zero2", "parallel.backend=nccl", "parallel.precision=bf16"],
        world_size=4,
        cuda_available=True,
    )
    assert cfg.validate(4, cuda_available=True) == []
    assert cfg.parallel.resolved_precision(cuda_available=True) == "bf16"


def test_global_batch_size_matching_product_is_fine():
    cfg = compose_config(
        ["train.global_batch_size=64", "train.grad_accum=4"], world_size=2, cuda_available=False
    )
    assert cfg.global_batch_size(2) == 64


def test_deepspeed_json_is_checked(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"steps_per_print": 5, "zero_optimization": {"stage": 1}}))
    cfg = compose_config([f"parallel.deepspeed_json={good}"], world_size=2, cuda_available=False)
    assert cfg.parallel.deepspeed_json == str(good)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(XparConfigError, match="gradient_accumulation_steps=4 is not allowed"):
        compose_config([f"parallel.deepspeed_json={bad}"], world_size=2, cuda_available=False)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(XparConfigError, match="cannot be read as JSON"):
        compose_config([f"parallel.deepspeed_json={broken}"], world_size=2, cuda_available=False)


def test_resume_from_existing_dir(tmp_path):
    cfg = compose_config([f"train.resume={tmp_path}"], world_size=2, cuda_available=False)
    assert cfg.train.resume == str(tmp_path)


@pytest.mark.parametrize(
    "overrides,cuda,expect",
    [
        (["parallel.precision=bf16"], False, "parallel.precision='bf16' on a machine without CUDA"),
        (["moe=dense", "parallel.ep_size=2"], False, "parallel.ep_size=2 is ignored"),
        (["optim.warmup_steps=500"], False, "optim.warmup_steps=500 >= train.steps=200"),
        (["optim.lr=1e6"], False, "optim.lr=1e+06 is above 1: AdamW will diverge"),
    ],
)
def test_soft_problems_warn_on_rank_zero_only(overrides, cuda, expect):
    cfg = compose_dictconfig(overrides)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        load_and_validate(cfg, 2, rank=0, cuda_available=cuda)
    assert [str(w.message) for w in rec if w.category is XparConfigWarning] != []
    assert any(expect in str(w.message) for w in rec), [str(w.message) for w in rec]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        load_and_validate(cfg, 2, rank=1, cuda_available=cuda)
    assert not [w for w in rec if w.category is XparConfigWarning]


def test_a_high_but_sane_lr_does_not_warn():
    assert OptimConfig.LR_WARN_ABOVE == 1.0
    for lr in (1.0, 0.05):
        cfg = compose_config([f"optim.lr={lr}"], world_size=2, cuda_available=False)
        assert not [n for n in cfg.validate(2, cuda_available=False) if "optim.lr" in n]


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: OptimConfig(lr=float("nan")), "optim.lr"),
        (lambda: OptimConfig(name="sgd"), "optim.name"),
        (lambda: OptimConfig(grad_clip=-1.0), "optim.grad_clip"),
        (lambda: ParallelConfig(ep_size=-1), "parallel.ep_size"),
        (lambda: ParallelConfig(timeout_s=0), "parallel.timeout_s"),
        (lambda: ParallelConfig(deepspeed=[1]), "parallel.deepspeed"),
        (lambda: ParallelConfig(deepspeed_json="/nonexistent.json"), "parallel.deepspeed_json"),
        (lambda: LoggerConfig(progress_bar="sometimes"), "logger.progress_bar"),
        (lambda: LoggerConfig(project=""), "logger.project"),
        (lambda: TrainConfig(grad_accum=0), "train.grad_accum"),
        (lambda: TrainConfig(keep_checkpoints=0), "train.keep_checkpoints"),
        (lambda: TrainConfig(seed=-1), "train.seed"),
        (lambda: TrainConfig(out_dir=" "), "train.out_dir"),
        (lambda: TrainConfig(steps=True), "train.steps"),
    ],
)
def test_nodes_validate_on_construction(make, field):
    with pytest.raises(XparConfigError, match=field.replace(".", r"\.")):
        make()


def test_defaults_are_valid_python_objects():
    cfg = XparConfig()
    assert cfg.validate(1, cuda_available=False) == []
    assert cfg.validate(2, cuda_available=False) == []


@pytest.mark.parametrize(
    "value,secret",
    [
        (KEY, True),
        ("local-" + KEY, True),
        ("hf_" + "aBcD" * 8, True),
        ("ghp_" + "x1" * 10, True),
        ("Ab1" * 12, True),
        ("quality_moe", False),
        ("my-team", False),
        ("openwebtext_2024_shard_00001_of_00128.jsonl", False),
        ("run-3f2a9c1d7e", False),
        ("outputs/main", False),
    ],
)
def test_secret_shapes(value, secret):
    from xpar.redact import looks_like_secret

    assert looks_like_secret(value) is secret
