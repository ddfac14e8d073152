"""Typed config tree: optim, parallel, logger, train nodes and the root XparConfig.

Every node validates itself in __post_init__ (so OmegaConf.to_object and plain
construction both check it). Checks that need two nodes, or the world size,
live in XparConfig.validate(world_size): pure Python, no process group, no
device probing unless asked, so every rank reaches the same verdict.

Errors are XparConfigError "<group>.<field>=<value> ...: <fix>". Things that
are legal but probably not what the user meant come back as warning strings
(XparConfig.validate returns them) so the caller decides who prints them
(rank 0 only, see xpar.config.store.load_and_validate).

DeepSpeed: validate() also builds the DeepSpeed config with the pure builder
(xpar.parallel.ds_config.build_ds_config, no deepspeed import), so its refusals (keys xpar owns,
ZeRO-3, bf16 with ZeRO-0, offload, unreadable deepspeed_json) come up front too.

Precision: parallel.precision=bf16 on a machine without CUDA is allowed with a
warning, not refused: torch runs bf16 on CPU (autocast), which is how one
checks bf16 numerics on a laptop, but it is slow on most CPUs. "auto" picks
fp32 on CPU and bf16 on GPU. backend=nccl without CUDA is refused (NCCL cannot
run on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xpar.config.checks import bad, is_finite, is_int, need_bool, need_choice, need_int, need_number
from xpar.data.config import DataConfig
from xpar.errors import XparConfigError
from xpar.models.config import ModelConfig, check_causal, moe_block_ids
from xpar.moe.config import MoEConfig
from xpar.redact import looks_like_secret
from xpar.train.task_config import DistillConfig, TaskConfig

OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "constant", "linear")
BACKENDS = ("auto", "gloo", "nccl")
PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("offline", "online", "disabled")
PROGRESS_BARS = ("auto", "always", "never")
ZERO_STAGES = (0, 1, 2, 3)
RESUME_MODES = ("auto", "force", "never")

# W&B rejects these characters in entity/project names.
_WANDB_BAD_CHARS = set("/\\#?%:")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule. min_lr is the floor of cosine/linear decay."""

    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    schedule: str = "cosine"

    # A peak lr above this is legal but diverges with AdamW (its steps are ~lr per weight;
    # 1e-4..1e-2 is the useful range): a warning at config time. Not a field (no annotation).
    LR_WARN_ABOVE = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "optim") -> None:
        need_choice(prefix, self, "name", OPTIMIZERS)
        if not is_finite(self.lr) or not self.lr > 0:
            raise bad(prefix, "lr", self.lr, "use a finite learning rate > 0, e.g. 3e-3")
        need_number(prefix, self, "min_lr", 0, "use a finite number >= 0")
        if self.min_lr > self.lr:
            raise bad(
                prefix,
                "min_lr",
                self.min_lr,
                f"min_lr must be <= optim.lr={self.lr!r}; lower min_lr or raise lr",
            )
        need_int(prefix, self, "warmup_steps", 0, "use an integer >= 0 (0 = no warmup)")
        need_number(prefix, self, "weight_decay", 0, "use a number >= 0, e.g. 0.1")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not is_finite(v) or not 0 <= v < 1:
                raise bad(prefix, name, v, "use a number in [0, 1), e.g. 0.9 / 0.95")
        if not is_finite(self.eps) or not self.eps > 0:
            raise bad(prefix, "eps", self.eps, "use a small number > 0, e.g. 1e-8")
        need_number(prefix, self, "grad_clip", 0, "use a max grad norm > 0, or 0 for off")
        need_choice(prefix, self, "schedule", SCHEDULES)


@dataclass
class ParallelConfig:
    """How ranks split the work. ep_size=0: experts sharded over all ranks.

    The defaults are the CPU main job's (gloo, fp32); backend/precision "auto" pick
    nccl + bf16 on GPU and gloo + fp32 on CPU (parallel=zero1, zero2).

    deepspeed: extra DeepSpeed config keys merged in; deepspeed_json: a JSON file merged in
    (the dict wins). Keys that xpar derives from typed fields are refused (by validate of
    XparConfig, which builds the DeepSpeed config once without a process group).
    """

    ep_size: int = 0  # expert-parallel group size (0: all ranks)
    zero_stage: int = 1  # DeepSpeed ZeRO stage: 0, 1 or 2
    backend: str = "gloo"
    precision: str = "fp32"
    deepspeed: dict[str, Any] = field(default_factory=dict)
    deepspeed_json: str = ""
    timeout_s: int = 600

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "parallel") -> None:
        need_int(prefix, self, "ep_size", 0, "use 0 (all ranks) or a group size >= 1")
        if not is_int(self.zero_stage) or self.zero_stage not in ZERO_STAGES:
            raise bad(prefix, "zero_stage", self.zero_stage, "choose a ZeRO stage 0, 1, 2 or 3")
        need_choice(prefix, self, "backend", BACKENDS)
        need_choice(prefix, self, "precision", PRECISIONS)
        need_int(prefix, self, "timeout_s", 1, "use a collective timeout in seconds >= 1")
        if not isinstance(self.deepspeed, Mapping):
            raise bad(prefix, "deepspeed", self.deepspeed, "use a mapping of DeepSpeed keys")
        if not isinstance(self.deepspeed_json, str):
            raise bad(prefix, "deepspeed_json", self.deepspeed_json, "use a path or ''")
        if self.deepspeed_json and not os.path.isfile(os.path.expanduser(self.deepspeed_json)):
            raise bad(
                prefix,
                "deepspeed_json",
                self.deepspeed_json,
                "file not found; give the path of a DeepSpeed JSON config, or '' for none",
            )
        # What the keys inside may say is checked by XparConfig.validate, through the
        # DeepSpeed config builder itself (xpar.parallel.ds_config.build_ds_config).

    def resolved_backend(self, cuda_available: bool) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if cuda_available else "gloo"

    def resolved_precision(self, cuda_available: bool) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if cuda_available else "fp32"


@dataclass
class LoggerConfig:
    """Console and W&B logging. Secrets never go here: W&B reads WANDB_API_KEY or `wandb login`."""

    wandb_mode: str = "offline"
    project: str = "xpar"
    entity: str = ""
    run_name: str = "main"
    log_every: int = 10  # steps between console/W&B lines
    hist_every: int = 50
    progress_bar: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "logger") -> None:
        need_choice(prefix, self, "wandb_mode", WANDB_MODES)
        for name in ("project", "entity", "run_name"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise bad(prefix, name, v, "use a string")
            if looks_like_secret(v):
                # Do not echo the value: it may be a real key.
                raise XparConfigError(
                    f"{prefix}.{name}=<redacted> looks like an API key or token: never put keys "
                    "in configs (they end up in logs, W&B and checkpoints); remove it and use "
                    "the WANDB_API_KEY environment variable or `wandb login`"
                )
        if not self.project:
            raise bad(prefix, "project", self.project, "name the W&B project, e.g. xpar")
        for name in ("project", "entity"):
            v = getattr(self, name)
            chars = sorted(_WANDB_BAD_CHARS.intersection(v))
            if chars:
                fix = f"W&B names cannot contain {' '.join(chars)}; remove them"
                raise bad(prefix, name, v, fix)
        need_int(prefix, self, "log_every", 1, "log every n >= 1 steps")
        need_int(
            prefix,
            self,
            "hist_every",
            0,
            "log expert-load histograms every n >= 1 steps, or 0 for none",
        )
        need_choice(prefix, self, "progress_bar", PROGRESS_BARS)


@dataclass
class TrainConfig:
    """The loop: steps, batch shape, eval/checkpoint cadence, resume, output directory.

    global_batch_size=0 derives micro_batch_size * grad_accum * world_size. out_dir is
    relative to the launch directory and deterministic (no timestamps): every rank agrees
    on it and a rerun finds its checkpoints (resume=auto).

    resume: auto (the latest checkpoint in out_dir, if any), force (the same, accepting a
    config that differs from the checkpoint's), never, or a checkpoint directory.
    overwrite: let resume=never start over in an out_dir that holds a run.
    init_from: a checkpoint directory, or hf:<dir> (a local Hugging Face MoE model), to take
    the weights from (a new run at step 0); moe.upcycle=true upcycles a dense checkpoint.
    noop_ok: exit 0 when resume finds the run already finished (nothing to do).
    max_bad_steps: a step whose loss or gradients are not finite on any rank is skipped on
    every rank; this many in a row (or this many with a loss above max_loss) stop the run.
    print_config: print the resolved config (it always goes to a file and to W&B).
    verbose: let third-party libraries' messages through to the console.
    compile: torch.compile the model's non-MoE parts (attention, dense FFN, norms, head).
    """

    steps: int = 200  # optimizer steps to train to
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    global_batch_size: int = 0
    eval_every: int = 50  # steps between validation evaluations
    eval_batches: int = 8  # validation batches per evaluation
    ckpt_every: int = 100  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: str = "auto"
    seed: int = 0  # model init and RNG seed
    out_dir: str = "outputs/main"  # where checkpoints, metrics.jsonl and W&B go
    deterministic: bool = True
    max_time_s: float = 0.0
    overwrite: bool = False
    init_from: str = ""
    noop_ok: bool = False
    print_config: bool = False
    verbose: bool = False
    max_bad_steps: int = 3  # consecutive non-finite or diverged steps before the run stops
    max_loss: float = 0.0  # a loss above this is a diverged step; 0 = 4 x ln(vocab size)
    compile: bool = False
    # A config for `xpar plan` only (too big to train here): training refuses it.
    plan_only: bool = False
    # A frozen teacher's soft targets in the loss (teacher "" = off).
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "train") -> None:
        self.distill.validate(f"{prefix}.distill")
        need_int(prefix, self, "steps", 1, "train for >= 1 optimizer steps")
        need_int(prefix, self, "micro_batch_size", 1, "use >= 1 sequences per rank per micro step")
        need_int(prefix, self, "grad_accum", 1, "use >= 1 micro steps per optimizer step")
        need_int(
            prefix,
            self,
            "global_batch_size",
            0,
            "use 0 (= micro_batch_size * grad_accum * world_size) or that product",
        )
        need_int(prefix, self, "eval_every", 1, "evaluate every n >= 1 steps")
        need_int(prefix, self, "eval_batches", 1, "use >= 1 validation batches per evaluation")
        need_int(prefix, self, "ckpt_every", 1, "checkpoint every n >= 1 steps")
        need_int(prefix, self, "keep_checkpoints", 1, "keep >= 1 checkpoints")
        self._check_checkpoint_paths(prefix)
        need_int(prefix, self, "seed", 0, "use an integer seed >= 0")
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise bad(prefix, "out_dir", self.out_dir, "name an output directory, e.g. outputs/x")
        for name in ("deterministic", "overwrite", "noop_ok", "print_config", "verbose", "compile"):
            need_bool(prefix, self, name)
        need_bool(prefix, self, "plan_only")
        need_number(prefix, self, "max_time_s", 0, "use seconds >= 0 (0 = no limit)")
        need_int(prefix, self, "max_bad_steps", 1, "stop after n >= 1 consecutive bad steps")
        need_number(prefix, self, "max_loss", 0, "use a loss bound > 0, or 0 (4 x ln(vocab))")

    def _check_checkpoint_paths(self, prefix: str) -> None:
        if not isinstance(self.resume, str) or not self.resume:
            raise bad(
                prefix, "resume", self.resume, "use auto, force, never, or a checkpoint directory"
            )
        if self.resume not in RESUME_MODES and not os.path.isdir(os.path.expanduser(self.resume)):
            raise bad(
                prefix,
                "resume",
                self.resume,
                "no such checkpoint directory; use auto (latest in out_dir, if any), force, "
                "never, or an existing checkpoint directory",
            )
        from xpar.train.init_source import check_value

        why = check_value(self.init_from)
        if why is not None:
            raise bad(prefix, "init_from", self.init_from, why)


@dataclass
class XparConfig:
    """The whole run. Nodes validate themselves; validate(world_size) adds cross-field checks."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        self._check_static()

    # -- derived quantities (the trainer should use these, not re-derive them) --

    @property
    def moe_layer_ids(self) -> list[int]:
        """Blocks whose FFN is an MoE layer (the model's own rule)."""
        return moe_block_ids(self.model, self.moe)

    @property
    def has_moe(self) -> bool:
        return bool(self.moe_layer_ids)

    def ep_size(self, world_size: int) -> int:
        """Expert-parallel group size: parallel.ep_size, 0 meaning all ranks; 1 for dense models."""
        if not self.has_moe:
            return 1
        return self.parallel.ep_size or world_size

    def global_batch_size(self, world_size: int) -> int:
        """Sequences per optimizer step over all ranks."""
        t = self.train
        return t.micro_batch_size * t.grad_accum * world_size

    # -- validation --

    def validate(self, world_size: int, cuda_available: bool | None = None) -> list[str]:
        """Cross-field checks for a job of `world_size` ranks.

        Raises XparConfigError on the first error; returns warnings (strings) for the caller
        to print once. cuda_available=None asks torch (the same answer on every rank of a
        homogeneous job); pass it explicitly to keep this a pure function.
        """
        for node in (
            self.model,
            self.moe,
            self.data,
            self.optim,
            self.parallel,
            self.logger,
            self.train,
            self.task,
        ):
            node.validate()
        self._check_static()
        if not is_int(world_size) or world_size < 1:
            raise XparConfigError(
                f"world_size={world_size!r} is invalid: the job needs >= 1 rank "
                "(check WORLD_SIZE / torchrun --nproc-per-node)"
            )
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        warnings: list[str] = []
        self._check_parallel(world_size, warnings)
        self._check_batch(world_size)
        self._check_device(cuda_available, warnings)
        self._check_deepspeed(cuda_available)
        self._check_soft(warnings)
        return warnings

    def _check_static(self) -> None:
        m, moe, d = self.model, self.moe, self.data
        if moe.every > m.n_layers:
            raise XparConfigError(
                f"moe.every={moe.every} is invalid: greater than model.n_layers={m.n_layers}, "
                "so no block would get an MoE layer; use moe.every <= model.n_layers, "
                "or moe.every=0 (moe=dense) for a dense model"
            )
        check_causal(m, moe)
        self._check_task()
        if moe.upcycle:
            from xpar.train.init_source import check_upcycle

            check_upcycle(self.train.init_from, m, moe)
        if m.max_seq_len < d.seq_len:
            raise XparConfigError(
                f"model.max_seq_len={m.max_seq_len} is smaller than data.seq_len={d.seq_len}: "
                f"raise model.max_seq_len to >= {d.seq_len} or lower data.seq_len"
            )
        if d.tokenizer == "byte" and m.vocab_size != 0:
            from xpar.data.tokenizer import ByteTokenizer

            need = ByteTokenizer.vocab_size
            if m.vocab_size < need:
                raise XparConfigError(
                    f"model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's "
                    f"{need} ids: use model.vocab_size=0 (take it from the tokenizer) or >= {need}"
                )

    def _check_task(self) -> None:
        t, distill = self.task, self.train.distill
        if t.kind == "classify" and distill.enabled:
            raise XparConfigError(
                f"train.distill.teacher={distill.teacher!r} is set with task.kind=classify: "
                "distillation matches the teacher's token distributions (an LM task); "
                "set train.distill.teacher='' or task.kind=lm"
            )
        if distill.enabled:
            from xpar.train.teacher import saved_run

            run = saved_run(distill.teacher)
            theirs = run.get("tokenizer", {}).get("spec")
            # A checkpoint without a tokenizer record (an old one) is checked at build time.
            if theirs is not None and theirs != self.data.tokenizer:
                raise XparConfigError(
                    f"train.distill.teacher={distill.teacher!r} was trained with "
                    f"data.tokenizer={theirs!r}, this run has {self.data.tokenizer!r}: the "
                    "teacher's vocabulary must be the student's; set data.tokenizer to the "
                    "teacher's or choose a teacher trained on this tokenizer"
                )

    def _check_parallel(self, world_size: int, warnings: list[str]) -> None:
        p, moe = self.parallel, self.moe
        if not self.has_moe:
            if p.ep_size > 1:
                warnings.append(
                    f"parallel.ep_size={p.ep_size} is ignored: the model has no MoE layers "
                    "(moe.every=0); set parallel.ep_size=0"
                )
            return
        ep = self.ep_size(world_size)
        shown = f"parallel.ep_size={p.ep_size}" + (
            f" (= world size {world_size})" if p.ep_size == 0 else ""
        )
        if world_size % ep != 0:
            divisors = [n for n in range(1, world_size + 1) if world_size % n == 0]
            raise XparConfigError(
                f"{shown} does not divide the world size {world_size}: expert-parallel groups "
                f"must tile the ranks; choose parallel.ep_size in {divisors} (0 = all ranks)"
            )
        if moe.num_experts % ep != 0:
            ok = [
                n
                for n in range(1, world_size + 1)
                if world_size % n == 0 and moe.num_experts % n == 0
            ]
            raise XparConfigError(
                f"moe.num_experts={moe.num_experts} is not divisible by {shown}: each rank of "
                f"an expert-parallel group holds num_experts/ep_size experts; choose "
                f"parallel.ep_size in {ok} or a multiple of {ep} experts"
            )
        if p.zero_stage == 3:
            raise XparConfigError(
                "parallel.zero_stage=3 with MoE layers is not supported: DeepSpeed cannot "
                "partition expert-parallel parameters with ZeRO-3; use zero_stage 0, 1 or 2"
            )

    def _check_batch(self, world_size: int) -> None:
        t = self.train
        gbs = t.global_batch_size
        if gbs == 0:
            return
        per_micro = t.micro_batch_size * world_size
        if gbs % per_micro != 0:
            raise XparConfigError(
                f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size * "
                f"world_size = {t.micro_batch_size} * {world_size} = {per_micro}: use a multiple "
                f"of {per_micro}, or global_batch_size=0 to derive it"
            )
        derived = per_micro * t.grad_accum
        if gbs != derived:
            raise XparConfigError(
                f"train.global_batch_size={gbs} does not equal train.micro_batch_size * "
                f"train.grad_accum * world_size = {t.micro_batch_size} * {t.grad_accum} * "
                f"{world_size} = {derived}: set train.grad_accum={gbs // per_micro}, "
                "or global_batch_size=0 to derive it"
            )

    def _check_device(self, cuda_available: bool, warnings: list[str]) -> None:
        p = self.parallel
        if not cuda_available and p.backend == "nccl":
            raise XparConfigError(
                "parallel.backend='nccl' is invalid on a machine without CUDA: NCCL needs GPUs; "
                "use parallel.backend=gloo (or auto)"
            )
        if not cuda_available and p.precision == "bf16":
            warnings.append(
                "parallel.precision='bf16' on a machine without CUDA runs bf16 on the CPU, "
                "which is slow on most CPUs; use parallel.precision=auto (fp32 on CPU) "
                "unless you are checking bf16 numerics"
            )

    def _check_deepspeed(self, cuda_available: bool) -> None:
        # Build the DeepSpeed config now, as the adapter will at startup (pure: no process
        # group), so that every DeepSpeed-level refusal (owned keys, ZeRO stage, bf16 with
        # ZeRO-0, unreadable deepspeed_json, ...) surfaces before any rank starts.
        from xpar.parallel.ds_config import build_ds_config

        p, t = self.parallel, self.train
        build_ds_config(
            zero_stage=p.zero_stage,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
            grad_clip=self.optim.grad_clip,
            precision=p.resolved_precision(cuda_available),
            extra=dict(p.deepspeed),
            extra_json=p.deepspeed_json,
        )

    def _check_soft(self, warnings: list[str]) -> None:
        o, t = self.optim, self.train
        if o.lr > o.LR_WARN_ABOVE:
            warnings.append(
                f"optim.lr={o.lr:g} is above {o.LR_WARN_ABOVE:g}: AdamW will diverge at such a "
                "learning rate (useful: 1e-4..1e-2); lower it, e.g. optim.lr=3e-3"
            )
        if o.warmup_steps >= t.steps:
            warnings.append(
                f"optim.warmup_steps={o.warmup_steps} >= train.steps={t.steps}: the learning rate "
                f"never reaches optim.lr={o.lr}; lower warmup_steps"
            )
