"""The one adapter to DeepSpeed: config dict, MoE-aware param groups, engine, grad norm, checkpoints.

This is the only module in xpar that imports deepspeed.

How expert parameters get the right treatment (DeepSpeed 0.19.8, read from its source):

* A parameter is an expert ("MoE") parameter for DeepSpeed when it has
  `allreduce=False`; `group_name` names its expert-DP group in
  `deepspeed.utils.groups`. We set both on every parameter that carries
  `xpar_expert=True` and register *our* groups (xpar.parallel.groups) in that
  registry under DeepSpeed's own name `ep_size_<n>` before the engine is built.
* The engine only turns its MoE paths on (`engine.has_moe_layers`) when it finds a
  `deepspeed.moe.layer.MoE` module in the model. Flagged params without that make
  ZeRO 1/2 fail in backward (`expert_dp_process_group` is None: TypeError) and
  ZeRO-0 fail in its all-reduce (KeyError); unflagged expert params are silently
  treated as dense: broadcast from rank 0 at init (every rank gets rank 0's
  experts) and averaged over all ranks. We attach one parameter-free `MoE`
  subclass (`_DeepSpeedMoEMarker`) to the model: it owns nothing, is never
  called, and only makes DeepSpeed's own detection true. After the engine is built
  we check that it reduces each expert param group over our expert-DP group.
* Optimizer: torch AdamW (no op builds), param groups split dense/expert x
  decay/no-decay; expert groups carry `moe=True, name=<group name>` as ZeRO 1/2
  require. LR: a LambdaLR over a pure function of the step, stepped by the engine
  and saved in the checkpoint, so resume is exact.
* Gradient norm / clipping: ZeRO 1/2 sum the squared partition norms over all
  ranks and each expert lives in exactly one partition of one expert-DP group, so
  their norm counts every expert once (tested against a single process). The
  non-ZeRO fp32 path calls `deepspeed.runtime.utils.clip_grad_norm_`, which
  *averages* per-rank norms (wrong with experts sharded); we replace the engine's
  `clip_fp32_gradients` hook with our `global_grad_norm`. bf16 without ZeRO goes
  through DeepSpeed's unfused fp16/bf16 optimizer, whose norm leaves out expert
  grads: refused (use ZeRO 1 or 2 with bf16).
* Checkpoints: with `has_moe_layers` DeepSpeed's save/load follow the native MoE
  file layout: `engine.save_checkpoint` writes one `mp_rank_00_model_states.pt`
  from rank 0 (with rank 0's experts; the other EP ranks' experts are lost) and
  `load_checkpoint` looks for per-expert `layer_*_expert_*` files (FileNotFoundError;
  both seen on 2 gloo ranks). Do not use them. We write one file per rank
  instead (module state incl. local experts, the optimizer's own per-rank state,
  LR scheduler, engine counters, client state) plus a JSON layout record; see
  `save` / `load`.
* ZeRO-3 is refused (DeepSpeed's native MoE refuses it too).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.utils import groups as _ds_groups
from torch import nn

from xpar.errors import XparConfigError, XparDistributedError
from xpar.parallel.groups import ParallelGroups

SUPPORTED_ZERO_STAGES = (0, 1, 2)
CHECKPOINT_FORMAT = 1
CHECKPOINT_META = "xpar_parallel.json"
# top-level DeepSpeed keys xpar derives from its typed config; extra configs must not set them
_OWNED_KEYS = {
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
_REQUIRED_ZERO = {"reduce_scatter": True, "contiguous_gradients": True, "elastic_checkpoint": False}


# --------------------------------------------------------------------------- config


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


_BUCKET_CPU = 5_000_000
_BUCKET_GPU = 50_000_000


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

    No optimizer or scheduler section: xpar passes its own (see `initialize`).
    grad_clip=0 turns clipping off.
    """
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

    user = load_extra_config(extra, extra_json)
    where = "parallel.deepspeed"
    for key, owner in _OWNED_KEYS.items():
        if key in user:
            raise XparConfigError(
                f"{where}.{key}={user[key]!r} is not allowed: xpar sets it from {owner}; "
                f"remove it and set {owner.split(' ')[0]} instead"
            )
    user_zero = user.get("zero_optimization", {})
    if not isinstance(user_zero, Mapping):
        raise XparConfigError(f"{where}.zero_optimization={user_zero!r} must be a mapping")
    if "stage" in user_zero and user_zero["stage"] != zero_stage:
        raise XparConfigError(
            f"{where}.zero_optimization.stage={user_zero['stage']!r} contradicts "
            f"parallel.zero_stage={zero_stage}: remove it and set parallel.zero_stage"
        )
    for key, value in _REQUIRED_ZERO.items():
        if key in user_zero and user_zero[key] != value:
            raise XparConfigError(
                f"{where}.zero_optimization.{key}={user_zero[key]!r} is not supported with "
                f"expert-parallel params: DeepSpeed's MoE path needs {key}={value}; remove it"
            )
    for key in ("offload_optimizer", "offload_param"):
        if key in user_zero:
            raise XparConfigError(
                f"{where}.zero_optimization.{key} is not supported by xpar (untested with "
                "expert-parallel params and torch AdamW); remove it"
            )
    data_types = user.get("data_types", {})
    if isinstance(data_types, Mapping) and "grad_accum_dtype" in data_types:
        # fp32 accumulation with bf16 ZeRO-1 switches DeepSpeed to its BF16_Optimizer, a
        # different (untested here) expert path
        raise XparConfigError(
            f"{where}.data_types.grad_accum_dtype={data_types['grad_accum_dtype']!r} is not "
            "supported: xpar keeps gradients in the model precision; remove it"
        )

    base = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # ZeRO-0 fp32 clipping goes through our hook, which DeepSpeed only calls when this
        # is > 0: inf clips nothing but still yields the true norm for logging
        "gradient_clipping": float(grad_clip) if grad_clip > 0 or zero_stage else math.inf,
        "zero_optimization": {
            "stage": zero_stage,
            **_REQUIRED_ZERO,
            # DeepSpeed's default buckets (5e8 elements = 2 GB in fp32) are allocated
            # afresh every step on CPU: 17 s of a 21 s run of the tiny model went there.
            # On GPU the caching allocator makes them cheap, so keep them larger there.
            "reduce_bucket_size": _BUCKET_GPU if precision == "bf16" else _BUCKET_CPU,
            "allgather_bucket_size": _BUCKET_GPU if precision == "bf16" else _BUCKET_CPU,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # xpar logs itself
        "wall_clock_breakdown": False,
    }
    cfg = _deep_merge(base, user)
    cfg["zero_optimization"].update({"stage": zero_stage, **_REQUIRED_ZERO})
    return cfg


def _deep_merge(a: dict, b: Mapping) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def make_lr_lambda(
    *,
    schedule: str,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (a pure function: resume is exact).

    Linear warmup from lr/(warmup+1) to lr over warmup_steps, then "constant",
    "cosine" (to min_lr at total_steps) or "linear" (to min_lr at total_steps).
    """
    if schedule not in ("cosine", "constant", "linear"):
        raise XparConfigError(
            f"optim.schedule={schedule!r} is invalid: use 'cosine', 'constant' or 'linear'"
        )
    return functools.partial(
        _lr_multiplier,
        schedule=schedule,
        floor=min_lr / lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
    )


def _lr_multiplier(
    step: int, *, schedule: str, floor: float, warmup_steps: int, total_steps: int
) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return floor + (1 - floor) * (1 - t)


# --------------------------------------------------------------------------- groups


def register_groups(groups: ParallelGroups) -> None:
    """Put our EP / expert-DP groups into DeepSpeed's registry under `groups.expert_group_name`.

    If DeepSpeed already has groups under that name (e.g. created by its own MoE
    layer), they must have our rank layout; then ours replace nothing.
    """
    deepspeed.init_distributed(dist_backend=groups.backend, dist_init_required=False)
    name = groups.expert_group_name
    have = _ds_groups._get_expert_parallel_group_dict()
    if name in have:
        ep_ranks = list(_ds_groups._get_expert_parallel_group_ranks(name))
        edp_ranks = list(_ds_groups._get_expert_data_parallel_group_ranks(name))
        if ep_ranks != list(groups.ep_ranks) or edp_ranks != list(groups.expert_dp_ranks):
            raise XparDistributedError(
                f"rank {groups.rank}: DeepSpeed already has groups {name!r} with EP ranks "
                f"{ep_ranks} / expert-DP ranks {edp_ranks}, but xpar's layout is "
                f"{list(groups.ep_ranks)} / {list(groups.expert_dp_ranks)}"
            )
        if (
            _ds_groups._get_expert_parallel_group(name) is groups.ep_group
            and _ds_groups._get_expert_data_parallel_group(name) is groups.expert_dp_group
        ):
            return
        # same ranks, other handles (another init_parallel): take ours, consistently
    _ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    _ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep_ranks)
    _ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.expert_dp_group
    _ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.expert_dp_ranks)
    if _ds_groups._WORLD_GROUP is None:
        # DeepSpeed's dense data-parallel group is a clone of the world; use ours
        _ds_groups._WORLD_GROUP = groups.dp_group


class _DeepSpeedMoEMarker(_DeepSpeedMoE):
    """Parameter-free stand-in that makes DeepSpeed's `isinstance(m, MoE)` detection true.

    It skips MoE.__init__ (which would build a gate and experts), holds no
    parameters or buffers (the model's state_dict is unchanged) and is never called.
    """

    def __init__(self, groups: ParallelGroups, num_experts: int):
        nn.Module.__init__(self)
        self.ep_size = groups.ep_size
        self.expert_group_name = groups.expert_group_name
        self.num_experts = num_experts
        self.num_local_experts = num_experts // groups.ep_size
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # DeepSpeed calls this to create its groups; ours are registered already
        if use_data_before_expert_parallel_:
            raise XparConfigError(
                "parallel.deepspeed.use_data_before_expert_parallel_=True is not supported: "
                "xpar's EP groups are contiguous ranks; remove the key"
            )
        if self.expert_group_name not in _ds_groups._get_expert_parallel_group_dict():
            raise XparDistributedError(
                f"DeepSpeed group {self.expert_group_name!r} is not registered"
            )

    def forward(self, *args, **kwargs):
        raise RuntimeError("_DeepSpeedMoEMarker is a marker for DeepSpeed, not a layer")

    def extra_repr(self) -> str:
        return f"group={self.expert_group_name}, num_experts={self.num_experts}"


MARKER_NAME = "xpar_deepspeed_moe_marker"


# --------------------------------------------------------------------------- params


def is_expert_param(p: torch.Tensor) -> bool:
    return bool(getattr(p, "xpar_expert", False))


def mark_expert_params(model: nn.Module, groups: ParallelGroups) -> list[nn.Parameter]:
    """Tell DeepSpeed which params to reduce over the expert-DP group only. Returns them."""
    experts = []
    for p in model.parameters():
        if is_expert_param(p):
            p.allreduce = False
            p.group_name = groups.expert_group_name
            experts.append(p)
    return experts


def optimizer_param_groups(
    model: nn.Module, expert_group_name: str, weight_decay: float
) -> list[dict]:
    """dense/expert x decay/no-decay; empty groups left out.

    Decay: params with ndim >= 2 (matrices, expert banks, embeddings), unless they
    carry `xpar_no_decay = True`; biases and norm gains are not decayed. Expert
    groups carry `moe=True, name=<group>` (DeepSpeed ZeRO 1/2 look them up by name).
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (e, d): [] for e in (False, True) for d in (True, False)
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not getattr(p, "xpar_no_decay", False)
        buckets[(is_expert_param(p), decay)].append(p)
    out = []
    for (expert, decay), params in buckets.items():
        if not params:
            continue
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if expert:
            group.update(moe=True, name=expert_group_name)
        else:
            group["name"] = "dense_decay" if decay else "dense_no_decay"
        out.append(group)
    return out


# --------------------------------------------------------------------------- engine


def initialize(
    model: nn.Module,
    groups: ParallelGroups,
    *,
    ds_config: dict,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    lr_lambda: Callable[[int], float] | None = None,
):
    """Build the DeepSpeed engine with expert params reduced over the expert-DP group only.

    `model` holds this rank's experts (params with `xpar_expert=True`). `lr_lambda(step)`
    multiplies lr (see `make_lr_lambda`); None keeps lr constant.
    Returns the engine (forward / backward / step as usual; `grad_norm(engine)`).
    """
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage not in SUPPORTED_ZERO_STAGES:
        raise XparConfigError(
            f"parallel.zero_stage={stage} is not supported with expert-parallel params "
            "(DeepSpeed's MoE support refuses ZeRO-3); choose 0, 1 or 2"
        )
    register_groups(groups)
    experts = mark_expert_params(model, groups)
    if experts:
        if not hasattr(model, MARKER_NAME):
            e_local = experts[0].shape[0]
            model.add_module(MARKER_NAME, _DeepSpeedMoEMarker(groups, e_local * groups.ep_size))
    param_groups = optimizer_param_groups(model, groups.expert_group_name, weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
    engine.xpar_groups = groups
    _check_engine(engine, groups, bool(experts), stage)
    if stage == 0:
        # DeepSpeed's fp32 clip averages per-rank norms; count each expert once instead
        engine.clip_fp32_gradients = functools.partial(_clip_fp32_gradients, engine, groups)
    return engine


def _check_engine(engine, groups: ParallelGroups, has_experts: bool, stage: int) -> None:
    """Fail loudly if DeepSpeed would not treat our expert params as expert params."""
    if engine.has_moe_layers != has_experts:
        raise XparDistributedError(
            f"DeepSpeed has_moe_layers={engine.has_moe_layers} but the model "
            f"{'has' if has_experts else 'has no'} expert params"
        )
    if not has_experts:
        return
    edp = engine.expert_data_parallel_group.get(groups.expert_group_name)
    if edp is not groups.expert_dp_group:
        raise XparDistributedError("DeepSpeed's expert-DP group is not xpar's expert-DP group")
    if stage in (1, 2):
        opt = engine.optimizer
        # bit16_groups[i] are the model params of optimizer group i (the optimizer itself
        # now holds flat fp32 partitions)
        for i, params in enumerate(opt.bit16_groups):
            kinds = {is_expert_param(p) for p in params}
            if len(kinds) != 1:
                raise XparDistributedError(f"ZeRO param group {i} mixes expert and dense params")
            expert = kinds.pop()
            want = groups.expert_dp_group if expert else opt.dp_process_group
            if (
                opt.real_dp_process_group[i] is not want
                or bool(opt.is_moe_param_group[i]) != expert
            ):
                raise XparDistributedError(
                    f"ZeRO param group {i} ({'expert' if expert else 'dense'}) is not reduced "
                    "over its group (expert params: expert-DP group; dense: all ranks)"
                )


# --------------------------------------------------------------------------- grad norm


def global_grad_norm(
    params: nn.Module | Iterable[torch.Tensor], groups: ParallelGroups
) -> torch.Tensor:
    """L2 norm of all gradients with each expert counted once (a collective over the EP group).

    For gradients already reduced (dense identical on every rank, expert identical
    across an expert-DP group): dense counted once, expert squares summed over the
    EP group, whose ranks hold disjoint experts covering all of them.
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    dense_sq = expert_sq = None
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().to(torch.float64).square().sum()
        if is_expert_param(p):
            expert_sq = sq if expert_sq is None else expert_sq + sq
        else:
            dense_sq = sq if dense_sq is None else dense_sq + sq
    device = _comm_device(groups)
    dense_sq = torch.zeros((), dtype=torch.float64, device=device) if dense_sq is None else dense_sq
    expert_sq = (
        torch.zeros((), dtype=torch.float64, device=device) if expert_sq is None else expert_sq
    )
    expert_sq = expert_sq.to(device)
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    return (dense_sq.to(device) + expert_sq).sqrt().to(torch.float32)


def _comm_device(groups: ParallelGroups) -> torch.device:
    if groups.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _clip_fp32_gradients(engine, groups: ParallelGroups) -> None:
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = global_grad_norm(params, groups)
    max_norm = engine.gradient_clipping()
    coef = max_norm / (norm.item() + 1e-6)  # same form as DeepSpeed's ZeRO clip
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    engine._global_grad_norm = norm


def grad_norm(engine) -> float | None:
    """Pre-clip global grad norm of the last optimizer step (None before the first step)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


# --------------------------------------------------------------------------- checkpoints


def _rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank:05d}.pt")


def _layout(engine) -> dict:
    g: ParallelGroups = engine.xpar_groups
    return {
        "format": CHECKPOINT_FORMAT,
        "world_size": g.world_size,
        "ep_size": g.ep_size,
        "zero_stage": engine.zero_optimization_stage(),
        "precision": "bf16" if engine.bfloat16_enabled() else "fp32",
    }


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(engine, directory: str, client_state: dict | None = None) -> None:
    """Collective: every rank writes `rank<NNNNN>.pt` into `directory`; rank 0 adds a layout record.

    A rank file holds the full module state dict (dense params + this rank's
    experts), the optimizer's own per-rank state (ZeRO partition or torch AdamW),
    the LR scheduler, the engine's step counters and this rank's `client_state`
    (tensors, numbers, strings, lists, dicts: loaded with weights_only=True).
    Works on a shared or a per-node file system (each rank reads back its own file).
    """
    g: ParallelGroups = engine.xpar_groups
    os.makedirs(directory, exist_ok=True)
    state = {
        "layout": _layout(engine),
        "rank": g.rank,
        "module": engine.module.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
        "engine": {
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
            "micro_steps": engine.micro_steps,
        },
        "client_state": client_state or {},
    }
    _atomic_write(_rank_file(directory, g.rank), lambda p: torch.save(state, p))
    if g.rank == 0:
        meta = {**_layout(engine), "deepspeed": deepspeed.__version__, "torch": torch.__version__}

        def write_meta(p: str) -> None:
            with open(p, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)

        _atomic_write(os.path.join(directory, CHECKPOINT_META), write_meta)
    dist.barrier()


def _safe_globals() -> list:
    # the non-tensor objects in a ZeRO 1/2 optimizer state dict (DeepSpeed 0.19.8)
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load(engine, directory: str) -> dict:
    """Collective: restore what `save` wrote into this engine; returns this rank's client_state.

    The engine must be built like the one that saved (same model, world size,
    ep_size, ZeRO stage, precision); a different layout raises XparConfigError.
    """
    g: ParallelGroups = engine.xpar_groups
    path = _rank_file(directory, g.rank)
    if not os.path.isfile(path):
        raise XparConfigError(
            f"train.resume={directory!r}: no checkpoint file {os.path.basename(path)} for rank "
            f"{g.rank}; resume with the world size the checkpoint was saved with"
        )
    with torch.serialization.safe_globals(_safe_globals()):
        state = torch.load(path, map_location="cpu", weights_only=True)
    want, have = _layout(engine), state["layout"]
    if want != have or state["rank"] != g.rank:
        raise XparConfigError(
            f"train.resume={directory!r} was saved with {have} (rank {state['rank']}) but this "
            f"run is {want} (rank {g.rank}); resume with the same world size, parallel.ep_size, "
            "parallel.zero_stage and parallel.precision"
        )
    engine.module.load_state_dict(state["module"])
    if engine.zero_optimization():
        # ZeRO 1/2 (non-elastic) read only their own entry of the per-dp-rank list
        sd_list: list = [None] * dist.get_world_size(group=engine.optimizer.dp_process_group)
        sd_list[dist.get_rank(group=engine.optimizer.dp_process_group)] = state["optimizer"]
        engine.optimizer.load_state_dict(
            state_dict_list=sd_list,
            load_optimizer_states=True,
            load_from_fp32_weights=True,
        )
    else:
        engine.optimizer.load_state_dict(state["optimizer"])
    if engine.lr_scheduler is not None:
        if state["lr_scheduler"] is None:
            raise XparConfigError(
                f"train.resume={directory!r} has no LR scheduler state but this run has one"
            )
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for k, v in state["engine"].items():
        setattr(engine, k, v)
    dist.barrier()
    return state["client_state"]
