"""The one adapter to DeepSpeed: MoE-aware param groups, the engine, and its wrapper.

This is the only module in xpar that imports deepspeed. The config dict is built by
xpar.parallel.ds_config (pure), the grad norm by xpar.parallel.grad_norm, and the
checkpoint files by xpar.train.checkpoint, which reach the engine through `XparEngine`.

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
  `clip_fp32_gradients` hook with xpar.parallel.grad_norm. bf16 without ZeRO goes
  through DeepSpeed's unfused fp16/bf16 optimizer, whose norm leaves out expert
  grads: refused (use ZeRO 1 or 2 with bf16).
* Checkpoints: with `has_moe_layers` DeepSpeed's save/load follow the native MoE
  file layout: `engine.save_checkpoint` writes one `mp_rank_00_model_states.pt`
  from rank 0 (with rank 0's experts; the other EP ranks' experts are lost) and
  `load_checkpoint` looks for per-expert `layer_*_expert_*` files (FileNotFoundError;
  both seen on 2 gloo ranks). Do not use them. `XparEngine.state_dict()` gives one
  rank's state instead (module incl. local experts, the optimizer's own per-rank
  state, LR scheduler, engine counters); xpar.train.checkpoint writes it per rank.
  For a checkpoint that loads into another layout (xpar.train.reshard), `master_state()`
  assembles each parameter's fp32 master value and Adam moments whole from the ZeRO
  partitions (each rank's fragment at its `_hp_mapping` addresses, summed onto one owner
  rank) and `set_master_state()` writes them back into whatever partitions this engine has.
* ZeRO-3 is refused (DeepSpeed's native MoE refuses it too).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.utils import groups as _ds_groups
from torch import nn

from xpar.errors import XparConfigError, XparDistributedError
from xpar.parallel.ds_config import SUPPORTED_ZERO_STAGES
from xpar.parallel.grad_norm import clip_grad_norm_, is_expert_param
from xpar.parallel.groups import ParallelGroups

# by name: the attribute deepspeed.comm.torch is torch itself (deepspeed.comm imports it)
_ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

# the DeepSpeed engine's step counters, saved and restored with the rest of its state
_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step


def _entry(value: torch.Tensor, moments: list, step: Any) -> dict:
    """One parameter's master state; moments not made yet (no step taken) are zeros."""
    full = [torch.zeros_like(value) if m is None else m.detach().float().view_as(value).clone()
            for m in moments]  # fmt: skip
    step = 0 if step is None else int(step.item() if torch.is_tensor(step) else step)
    return {"value": value.clone(), "exp_avg": full[0], "exp_avg_sq": full[1], "step": step}


# --------------------------------------------------------------------------- start-up


@contextlib.contextmanager
def _without_shm_op() -> Iterator[None]:
    """DeepSpeed's comm backend without its shared-memory op, which xpar never calls.

    On CPU, `deepspeed.init_distributed` JIT-builds `deepspeed_shm_comm` (used only by
    `inference_all_reduce`) on every run: first a gcc probe of every op (the compiler lines
    on the console), then a ninja build into ~/.cache/torch_extensions, which every other
    venv sharing that cache builds again (5 to 50 s here). Without it DeepSpeed's all_reduce
    is torch.distributed's, which is what training calls anyway.
    """
    build = _ds_comm_torch.build_shm_op
    _ds_comm_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        _ds_comm_torch.build_shm_op = build


def init_comm(backend: str) -> None:
    """deepspeed.init_distributed without the shared-memory op (see _without_shm_op).

    Every caller of DeepSpeed's comm goes through here: ranks that JIT-build that op at
    once on a fresh machine wait on one lock for minutes (a killed build leaves the lock,
    and every later run waits on it for good)."""
    with _without_shm_op():
        deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)


# --------------------------------------------------------------------------- groups


def register_groups(groups: ParallelGroups) -> None:
    """Put our EP / expert-DP groups into DeepSpeed's registry under `groups.expert_group_name`.

    If DeepSpeed already has groups under that name (e.g. created by its own MoE
    layer), they must have our rank layout; then ours replace nothing.
    """
    init_comm(groups.backend)
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
) -> XparEngine:
    """Build the DeepSpeed engine with expert params reduced over the expert-DP group only.

    `model` holds this rank's experts (params with `xpar_expert=True`). `lr_lambda(step)`
    multiplies lr (see xpar.train.schedule.make_lr_lambda); None keeps lr constant.
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
    with warnings.catch_warnings(), _without_shm_op():
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
    _check_engine(engine, groups, bool(experts), stage)
    if stage == 0:
        # DeepSpeed's fp32 clip averages per-rank norms; count each expert once instead.
        # DeepSpeed calls this method of its own from inside step() and takes no clip
        # function, so the instance's method is replaced: the one patch of the engine.
        engine.clip_fp32_gradients = functools.partial(_clip_fp32_gradients, engine, groups)
    return XparEngine(engine, groups)


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


def _clip_fp32_gradients(engine, groups: ParallelGroups) -> None:
    norm = clip_grad_norm_(list(engine.module.parameters()), engine.gradient_clipping(), groups)
    engine._global_grad_norm = norm  # what engine.get_global_grad_norm() reports


class XparEngine:
    """xpar's handle on one rank's DeepSpeed engine; nothing else in xpar touches the engine.

    Training: call it (forward), `backward(loss)`, `step()`, `train()` / `eval()`.
    Logging: `grad_norm()`, `lr()`. Checkpoints (xpar.train.checkpoint): `layout()`,
    `versions()`, `state_dict()` / `load_state_dict()`, `safe_globals()`.
    """

    def __init__(self, engine: Any, groups: ParallelGroups) -> None:
        self.raw = engine  # the DeepSpeed engine, for tests that check what DeepSpeed did
        self.groups = groups

    @property
    def module(self) -> nn.Module:
        return self.raw.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw(*args, **kwargs)

    __call__ = forward

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of one micro batch; gradients are reduced at the accumulation boundary."""
        return self.raw.backward(loss)

    def step(self, skip: bool = False) -> bool:
        """Optimizer and LR step at the accumulation boundary (DeepSpeed counts micro steps).

        skip=True (every rank alike: a non-finite loss or gradient somewhere) leaves the
        weights and optimizer moments as they are. Returns whether the update was applied:
        False also when DeepSpeed's own overflow check (ZeRO 1/2) skipped it. A skipped step
        still advances the LR schedule, as the step counter and the data do, at every stage.
        """
        e = self.raw
        if skip and not e.zero_optimization():
            # AdamW leaves a parameter without a gradient untouched (no moment, no decay).
            for p in e.module.parameters():
                p.grad = None
        skipped_before = e.skipped_steps
        e.step()
        ds_skipped = e.skipped_steps > skipped_before
        if ds_skipped and e.lr_scheduler is not None:
            e.lr_scheduler.step()  # DeepSpeed holds the schedule back on a skip; xpar does not
        if skip and e.zero_optimization() and not ds_skipped:
            raise XparDistributedError(
                "DeepSpeed applied an optimizer step that xpar skipped (non-finite loss) "
                "without finding non-finite gradients; the weights may be damaged"
            )
        return not (skip or ds_skipped)

    def train(self, mode: bool = True) -> XparEngine:
        self.raw.train(mode)
        return self

    def eval(self) -> XparEngine:
        return self.train(False)

    def grad_norm(self) -> float | None:
        """Pre-clip global grad norm of the last optimizer step (None before the first step)."""
        norm = self.raw.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    @property
    def zero_stage(self) -> int:
        return int(self.raw.zero_optimization_stage())

    @property
    def lr_scheduler(self):
        """The LR scheduler the engine steps (torch LambdaLR), or None."""
        return self.raw.lr_scheduler

    def lr(self) -> float | None:
        """The learning rate of the next optimizer step (None if the optimizer hides it)."""
        opt = self.raw.optimizer
        return opt.param_groups[0]["lr"] if hasattr(opt, "param_groups") else None

    def layout(self) -> dict:
        """What a checkpoint of this engine must match to load: ranks, EP, ZeRO stage, precision."""
        return {
            "world_size": self.groups.world_size,
            "ep_size": self.groups.ep_size,
            "zero_stage": self.raw.zero_optimization_stage(),
            "precision": "bf16" if self.raw.bfloat16_enabled() else "fp32",
        }

    def versions(self) -> dict:
        return {"deepspeed": deepspeed.__version__, "torch": torch.__version__}

    @staticmethod
    def safe_globals() -> list:
        """The non-tensor classes in a ZeRO 1/2 optimizer state dict (DeepSpeed 0.19.8), for
        torch.load(weights_only=True)."""
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def state_dict(self) -> dict:
        """This rank's state: module (dense + local experts), optimizer, LR scheduler, counters."""
        e = self.raw
        return {
            "module": e.module.state_dict(),
            "optimizer": e.optimizer.state_dict(),
            "lr_scheduler": e.lr_scheduler.state_dict() if e.lr_scheduler else None,
            "engine": {k: getattr(e, k) for k in _COUNTERS},
        }

    # ------------------------------------------------------------- per-parameter state

    @torch.no_grad()
    def master_state(self, owner: Callable[[str, nn.Parameter], int]) -> dict[str, dict]:
        """Collective: every parameter's fp32 master value, Adam moments and step, whole,
        for the parameters `owner(name, param)` (a global rank in the param's data-parallel
        group, the same on each of its ranks) gives to this rank: {name: {"value",
        "exp_avg", "exp_avg_sq": fp32 tensors of the param's shape, "step": int}}.

        ZeRO 1/2: each rank copies its fragment (fp32 partition and the base optimizer's
        moments) into a zero buffer at the param's address, one reduce onto the owner
        assembles it (x + 0 = x: exact). ZeRO 0 (fp32): the param and the AdamW state as
        they are, no collective. Before the first step the moments are zeros, step 0.
        """
        e, rank, out = self.raw, self.groups.rank, {}
        if not e.zero_optimization():
            for name, p in e.module.named_parameters():
                if owner(name, p) == rank:
                    st = e.optimizer.state.get(p, {})
                    moments = [st.get(k) for k in _MOMENTS]
                    out[name] = _entry(p.detach().float(), moments, st.get("step"))
            return out
        opt = e.optimizer
        group_of = {id(p): i for i, ps in enumerate(opt.bit16_groups) for p in ps}
        for name, p in e.module.named_parameters():
            i = group_of[id(p)]
            flat = opt.single_partition_of_fp32_groups[i]
            st = opt.optimizer.state.get(flat, {})
            buf = torch.zeros(3, p.numel(), dtype=torch.float32, device=flat.device)
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                for row, src in zip(buf, [flat, *(st.get(k) for k in _MOMENTS)], strict=True):
                    if src is not None:
                        row.narrow(0, lp.start, lp.numel).copy_(src.narrow(0, hp.start, hp.numel))
            dst = owner(name, p)
            dist.reduce(buf, dst=dst, group=opt.real_dp_process_group[i])
            if dst == rank:
                full = [t.view_as(p) for t in buf]  # _entry copies them out of buf
                out[name] = _entry(full[0], full[1:], st.get("step"))
        return out

    @torch.no_grad()
    def set_master_state(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Rank-local: set every parameter (this rank's shape: experts already sliced), its
        fp32 master fragment, Adam moments and step from `entries` as master_state gives
        them; the module's weights become the master values in the module's dtype."""
        e = self.raw
        names = {id(p): n for n, p in e.module.named_parameters()}
        missing = sorted(set(names.values()) - set(entries))
        if missing:
            raise XparConfigError(f"it has no state for the parameters {missing[:6]}")
        if not e.zero_optimization():
            for name, p in e.module.named_parameters():
                ent = entries[name]
                p.copy_(ent["value"].to(p.dtype).view_as(p))
                e.optimizer.state[p] = {
                    "step": torch.tensor(float(ent["step"]), dtype=torch.float32),
                    **{k: ent[k].to(p.device, torch.float32).view_as(p).clone() for k in _MOMENTS},
                }
            return
        opt = e.optimizer
        for i, params in enumerate(opt.bit16_groups):
            flat = opt.single_partition_of_fp32_groups[i]
            st = opt.optimizer.state[flat]
            for k in _MOMENTS:
                if k not in st:  # a fresh engine: AdamW makes its state at the first step
                    st[k] = torch.zeros_like(flat)
            steps = {int(entries[names[id(p)]]["step"]) for p in params}
            if len(steps) != 1:
                raise XparDistributedError(
                    f"ZeRO param group {i} has parameters at different optimizer steps {steps}"
                )
            st["step"] = torch.tensor(float(steps.pop()), dtype=torch.float32)
            for p in params:
                ent = entries[names[id(p)]]
                p.data.copy_(ent["value"].to(p.dtype).view_as(p))  # a view into the flat buffer
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    continue
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                for key, dst in (("value", flat), *((k, st[k]) for k in _MOMENTS)):
                    src = ent[key].to(dst.device, torch.float32).reshape(-1)
                    dst.data.narrow(0, hp.start, hp.numel).copy_(src.narrow(0, lp.start, lp.numel))

    def schedule_state(self) -> dict:
        """What is not per parameter: LR scheduler, step counters, gradient accumulation."""
        e = self.raw
        return {
            "lr_scheduler": e.lr_scheduler.state_dict() if e.lr_scheduler else None,
            "engine": {k: getattr(e, k) for k in _COUNTERS},
            "grad_accum": int(e.gradient_accumulation_steps()),
        }

    def load_schedule_state(self, state: Mapping[str, Any]) -> None:
        """Restore schedule_state() saved by an engine of any layout. The micro-step counter
        is rescaled to this engine's gradient accumulation (DeepSpeed finds the step boundary
        from it), the rest is layout-free."""
        e = self.raw
        if e.lr_scheduler is not None:
            if state["lr_scheduler"] is None:
                raise XparConfigError("it has no LR scheduler state but this run has one")
            e.lr_scheduler.load_state_dict(state["lr_scheduler"])
            # A scheduler's state holds the next step's lr but does not set it; the rank
            # files' optimizer state carries it in its param groups, this fresh one does not.
            groups = e.lr_scheduler.optimizer.param_groups
            for g, lr in zip(groups, e.lr_scheduler.get_last_lr(), strict=True):
                g["lr"] = lr
        counters = dict(state["engine"])
        saved_ga, ga = int(state["grad_accum"]), int(e.gradient_accumulation_steps())
        counters["micro_steps"] = counters["micro_steps"] // saved_ga * ga
        for k in _COUNTERS:
            setattr(e, k, counters[k])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned, into an engine built like the one that saved."""
        e = self.raw
        e.module.load_state_dict(state["module"])
        if e.zero_optimization():
            # ZeRO 1/2 (non-elastic) read only their own entry of the per-dp-rank list
            group = e.optimizer.dp_process_group
            sd_list: list = [None] * dist.get_world_size(group=group)
            sd_list[dist.get_rank(group=group)] = state["optimizer"]
            e.optimizer.load_state_dict(
                state_dict_list=sd_list,
                load_optimizer_states=True,
                load_from_fp32_weights=True,
            )
        else:
            e.optimizer.load_state_dict(state["optimizer"])
        if e.lr_scheduler is not None:
            if state["lr_scheduler"] is None:
                raise XparConfigError("it has no LR scheduler state but this run has one")
            e.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for k in _COUNTERS:
            setattr(e, k, state["engine"][k])
