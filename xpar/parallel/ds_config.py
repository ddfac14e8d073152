"""The DeepSpeed config dict, built from xpar's typed fields: pure, no deepspeed import.

Config validation (xpar.config.schema) builds it before any process group, so every
DeepSpeed-level refusal (keys xpar owns, ZeRO-3, bf16 with ZeRO-0, offload, an
unreadable deepspeed_json) comes up front; the engine adapter builds the same dict at
startup. Importing deepspeed takes seconds and pulls in its accelerator probing, which
validating a config must not pay.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from xpar.errors import XparConfigError

SUPPORTED_ZERO_STAGES = (0, 1, 2)
# top-level DeepSpeed keys xpar derives from its typed config; extra configs must not set them
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.* (xpar builds the MoE-aware optimizer itself)",
    "scheduler": "optim.schedule / optim.warmup_steps",
    "fp16": "parallel.precision (fp32 or bf16; fp16 is not supported)",
    "bf16": "parallel.precision",
}
# ZeRO settings the expert-parallel paths of DeepSpeed need (stage_1_and_2._configure_moe_settings)
REQUIRED_ZERO = {"reduce_scatter": True, "contiguous_gradients": True, "elastic_checkpoint": False}
# DeepSpeed's default buckets (5e8 elements = 2 GB in fp32) are allocated afresh every
# step on CPU: 17 s of a 21 s run of the tiny model went there. On GPU the caching
# allocator makes them cheap, so keep them larger there.
BUCKET_CPU = 5_000_000
BUCKET_GPU = 50_000_000
_WHERE = "parallel.deepspeed"


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on CUDA, fp32 otherwise."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise XparConfigError(
            f"parallel.precision={precision!r} is invalid: use 'auto', 'fp32' or 'bf16'"
        )
    return precision


def load_extra_config(extra: Mapping[str, Any] | None = None, extra_json: str = "") -> dict:
    """The JSON file (if any) deep-merged with the dict; the dict wins."""
    merged: dict = {}
    if extra_json:
        path = os.path.expanduser(extra_json)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise XparConfigError(
                f"parallel.deepspeed_json={extra_json!r} cannot be read as JSON ({e}); "
                "give the path of a DeepSpeed JSON config, or '' for none"
            ) from e
        if not isinstance(data, dict):
            raise XparConfigError(f"parallel.deepspeed_json={extra_json!r} must hold a JSON object")
        merged = _deep_merge(merged, data)
    if extra:
        merged = _deep_merge(merged, dict(extra))
    return merged


def build_ds_config(
    *,
    zero_stage: int = 1,
    micro_batch_size: int,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    precision: str = "auto",
    extra: Mapping[str, Any] | None = None,
    extra_json: str = "",
) -> dict:
    """The DeepSpeed config dict. `extra` / `extra_json` add DeepSpeed keys xpar does not own.

    No optimizer or scheduler section: xpar passes its own (see the adapter's `initialize`).
    grad_clip=0 turns clipping off.
    """
    precision = _check_typed(zero_stage, precision, micro_batch_size, grad_accum, grad_clip)
    user = load_extra_config(extra, extra_json)
    _check_user(user, zero_stage)
    bucket = BUCKET_GPU if precision == "bf16" else BUCKET_CPU
    base = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # ZeRO-0 fp32 clipping goes through our hook, which DeepSpeed only calls when this
        # is > 0: inf clips nothing but still yields the true norm for logging
        "gradient_clipping": float(grad_clip) if grad_clip > 0 or zero_stage else math.inf,
        "zero_optimization": {
            "stage": zero_stage,
            **REQUIRED_ZERO,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # xpar logs itself
        "wall_clock_breakdown": False,
    }
    cfg = _deep_merge(base, user)
    cfg["zero_optimization"].update({"stage": zero_stage, **REQUIRED_ZERO})
    return cfg


def _check_typed(
    zero_stage: int, precision: str, micro_batch_size: int, grad_accum: int, grad_clip: float
) -> str:
    """Refuse typed values DeepSpeed cannot run with experts; returns the resolved precision."""
    if zero_stage not in SUPPORTED_ZERO_STAGES:
        raise XparConfigError(
            f"parallel.zero_stage={zero_stage!r} is not supported: xpar's expert-sharded params "
            "need ZeRO 0, 1 or 2 (DeepSpeed's MoE support refuses ZeRO-3); choose 0, 1 or 2"
        )
    precision = resolve_precision(precision)
    if precision == "bf16" and zero_stage == 0:
        raise XparConfigError(
            "parallel.zero_stage=0 with parallel.precision='bf16' is not supported: DeepSpeed's "
            "non-ZeRO bf16 optimizer leaves expert gradients out of the clipping norm; "
            "use parallel.zero_stage=1 or 2 with bf16, or precision='fp32'"
        )
    if not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
        raise XparConfigError(f"train.micro_batch_size={micro_batch_size!r} is invalid: use >= 1")
    if not (isinstance(grad_accum, int) and grad_accum >= 1):
        raise XparConfigError(f"train.grad_accum={grad_accum!r} is invalid: use >= 1")
    if not (grad_clip >= 0 and math.isfinite(grad_clip)):
        raise XparConfigError(
            f"optim.grad_clip={grad_clip!r} is invalid: use a max grad norm > 0, or 0 for off"
        )
    return precision


def _check_user(user: Mapping[str, Any], zero_stage: int) -> None:
    """Refuse extra DeepSpeed keys that xpar owns or that its expert paths do not support."""
    for key, owner in OWNED_KEYS.items():
        if key in user:
            raise XparConfigError(
                f"{_WHERE}.{key}={user[key]!r} is not allowed: xpar sets it from {owner}; "
                f"remove it and set {owner.split(' ')[0]} instead"
            )
    user_zero = user.get("zero_optimization", {})
    if not isinstance(user_zero, Mapping):
        raise XparConfigError(f"{_WHERE}.zero_optimization={user_zero!r} must be a mapping")
    _check_user_zero(user_zero, zero_stage)
    data_types = user.get("data_types", {})
    if isinstance(data_types, Mapping) and "grad_accum_dtype" in data_types:
        # fp32 accumulation with bf16 ZeRO-1 switches DeepSpeed to its BF16_Optimizer, a
        # different (untested here) expert path
        raise XparConfigError(
            f"{_WHERE}.data_types.grad_accum_dtype={data_types['grad_accum_dtype']!r} is not "
            "supported: xpar keeps gradients in the model precision; remove it"
        )


def _check_user_zero(user_zero: Mapping[str, Any], zero_stage: int) -> None:
    where = f"{_WHERE}.zero_optimization"
    if "stage" in user_zero and user_zero["stage"] != zero_stage:
        raise XparConfigError(
            f"{where}.stage={user_zero['stage']!r} contradicts "
            f"parallel.zero_stage={zero_stage}: remove it and set parallel.zero_stage"
        )
    for key, value in REQUIRED_ZERO.items():
        if key in user_zero and user_zero[key] != value:
            raise XparConfigError(
                f"{where}.{key}={user_zero[key]!r} is not supported with "
                f"expert-parallel params: DeepSpeed's MoE path needs {key}={value}; remove it"
            )
    for key in ("offload_optimizer", "offload_param"):
        if key in user_zero:
            raise XparConfigError(
                f"{where}.{key} is not supported by xpar (untested with "
                "expert-parallel params and torch AdamW); remove it"
            )


def _deep_merge(a: dict, b: Mapping) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
