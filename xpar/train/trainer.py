"""The training loop, readable top to bottom.

train(cfg) -> TrainResult, on every rank, is an outline of named steps:

    plan the start  resume, init_from or fresh (xpar.train.resume); a finished run stops here
    build the run   seeds, data (before any process group), groups, model, engine
    restore         the checkpoint the plan found, if any
    open            monitor (console, W&B, metrics.jsonl) and the preemption watcher
    evaluate        validation loss before training
    loop            step (xpar.train.step) -> log -> evaluate -> save -> stop on a signal,
                    train.max_time_s or train.max_bad_steps
    finish          final evaluation, summary, requeue if preempted

Whatever happens, the cleanup registered while building (W&B, signal handlers, the
process group this function started) runs in a `finally`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xpar.config.schema import XparConfig
from xpar.config.store import to_plain_dict
from xpar.data.build import DataBundle, build_data
from xpar.errors import XparUnhealthyError
from xpar.models import MoETransformer
from xpar.models.classifier import SequenceClassifier
from xpar.models.config import ModelConfig
from xpar.models.cost import describe_cost, flops_per_token
from xpar.parallel import deepspeed as ds
from xpar.parallel import watchdog
from xpar.parallel.ds_config import build_ds_config, resolve_precision
from xpar.parallel.groups import ParallelGroups, init_parallel
from xpar.train import checkpoint as ckpt
from xpar.train import health, init_source, lock, phases, resume, resume_guard
from xpar.train import model_setup as setup
from xpar.train.evaluation import validate
from xpar.train.faults import FaultHooks
from xpar.train.monitor import Monitor
from xpar.train.preempt import PreemptionWatcher
from xpar.train.rng import rng_state, seed_everything, set_rng_state
from xpar.train.schedule import make_lr_lambda
from xpar.train.sinks import warning_log
from xpar.train.step import log_step, sum_over_ranks, train_step
from xpar.train.task import build_classify_data, make_task


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean train loss
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    checkpoint: str | None = None
    wandb_dir: str | None = None
    exit_code: int = 0
    tokens_per_s: float = 0.0


@dataclass
class Run:
    """Everything one training run holds; the loop's steps read and advance it."""

    cfg: XparConfig
    model_cfg: ModelConfig
    data: DataBundle
    groups: ParallelGroups
    engine: ds.XparEngine
    precision: str
    ckpt_root: Path
    record: dict  # what the checkpoint records about the run (resume guard)
    faults: FaultHooks
    start: resume.Start  # resume, init_from or fresh; the LR schedule's length
    health: health.StepHealth  # bad steps in a row; why the run must stop
    drops: health.DropWatch  # warns once when routing drops most tokens
    # Every MoE layer's router when one keeps balance state (after_optimizer_step), else none.
    stateful_routers: list = field(default_factory=list)
    task: Any = None  # what the model is trained on (xpar.train.task)
    moe_layers: list = field(default_factory=list)
    traffic_mark: tuple[int, list] = (0, [])  # (step, bytes sent per layer) at the last log
    monitor: Monitor | None = None
    watcher: PreemptionWatcher | None = None
    val_batches: list = field(default_factory=list)
    resume_dir: Path | None = None
    wandb_run_id: str | None = None  # from the checkpoint: one W&B run across restarts
    step: int = 0
    start_step: int = 0
    tokens_seen: int = 0
    last_saved: int | None = None
    result: TrainResult = field(default_factory=lambda: TrainResult(step=0))

    @property
    def device(self) -> torch.device:
        return self.groups.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.groups.world_size * self.cfg.data.seq_len


def train(cfg: XparConfig) -> TrainResult:
    # The entry point's timer counts from the process start; called directly, from here.
    startup = phases.current() or phases.start(time.time())
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(phases.stop)  # a later run in this process times itself
        lock.hold(cfg.train.out_dir, cleanup)  # rank 0: out_dir is this run's (xpar.train.lock)
        start = resume.plan_start(cfg)  # before any process group: the same on every rank
        if start.finished:  # a finished run: nothing is built or written
            resume.say_finished(start)
            return TrainResult(
                step=start.step, checkpoint=str(start.resume), exit_code=start.exit_code
            )
        run = build_run(cfg, cleanup, start)
        # build_run's own marks (data, process group) leave the model and engine here
        startup.mark("engine" if "process group" in startup.phases else "data+group+engine")
        restore(run)
        startup.mark("restore")
        open_run(run, cleanup)
        startup.mark("monitor")
        watchdog.note_step(run.step)  # a resumed run's evaluation is at its step, not 0
        run.result.val_loss_before = validate(run)
        run.monitor.print(f"val loss before: {run.result.val_loss_before:.4f}")
        startup.mark("eval")
        run.monitor.start(step=run.step, tokens_seen=run.tokens_seen)  # tokens/s from here
        t_loop = time.perf_counter()
        run.watcher.limit_time(cfg.train.max_time_s)  # train.max_time_s counts from here
        while run.step < cfg.train.steps:
            run.step += 1
            watchdog.note_step(run.step)
            loss, auxes = train_step(run)
            first = run.step == run.start_step + 1
            if first:
                startup.mark("first step")
            log_step(run, loss, auxes)
            if first:
                _report_startup(run, startup)
            if not after_step(run):
                break
        return finish(run, startup, t_loop)


def _report_startup(run: Run, startup: phases.PhaseTimer) -> None:
    """The start-up phases in one line, and as JSON for the start-up benchmark (rank 0)."""
    if run.groups.rank == 0:
        run.monitor.print(startup.line())
        startup.write(Path(run.cfg.train.out_dir) / phases.STARTUP_FILE)


# --------------------------------------------------------------------------- build


def build_run(cfg: XparConfig, cleanup: contextlib.ExitStack, start: resume.Start) -> Run:
    tc = cfg.train
    # DeepSpeed 0.19 calls a collective torch deprecated; it says nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(tc.seed)
    data = _build_data(cfg)
    phases.mark("data")
    # The encoder's mask token and the classifier's padding take the first id past the
    # tokenizer's; the decoder needs none.
    extra_id = int(not cfg.model.causal or cfg.task.kind == "classify")
    vocab = cfg.model.vocab_size or _padded_vocab(data.tokenizer.vocab_size + extra_id)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    groups = _init_groups(cfg, cleanup)
    phases.mark("process group")
    resume.clear_old_run(start, groups.rank)  # train.overwrite=true: before anyone writes
    ckpt_root = Path(tc.out_dir).resolve() / "checkpoints"
    if groups.rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    # Same seed on every rank, so dense params agree and experts are sliced consistently.
    torch.manual_seed(tc.seed)
    model = MoETransformer(model_cfg, cfg.moe, ep_group=groups.ep_group)
    if cfg.task.kind == "classify":
        model = SequenceClassifier(model, data.num_classes, data.pad_id)
    layers = setup.moe_layers(model)
    setup.fit_routers_to_data(layers, data, vocab, groups.rank)  # resume/init_from overwrite
    record = resume_guard.run_record(cfg, model_cfg, data.tokenizer)
    if start.init_from is not None:  # weights only, before the engine copies them
        source = setup.init_from(model, start.init_from, groups, record, cfg.moe, tc.seed)
        if groups.rank == 0:
            print(
                f"initialised from {start.init_from} ({init_source.describe(source)}): "
                "a new run at step 0 with a new optimizer, LR schedule and data order",
                flush=True,
            )
    model = model.to(groups.device)
    if tc.compile:  # in place, before the engine: the params and their keys stay the same
        setup.compile_model(model, groups.device, groups.rank)
    precision = resolve_precision(cfg.parallel.precision)
    return Run(
        cfg=cfg,
        model_cfg=model_cfg,
        data=data,
        groups=groups,
        engine=_build_engine(cfg, model, groups, precision, start.schedule_steps),
        precision=precision,
        ckpt_root=ckpt_root,
        record=record,
        faults=FaultHooks.from_env(),
        start=start,
        health=health.StepHealth(tc.max_bad_steps, health.max_loss_for(tc.max_loss, vocab)),
        drops=health.DropWatch(cfg.moe.capacity_factor),
        stateful_routers=setup.stateful_routers(layers),
        task=make_task(cfg, model_cfg, data.tokenizer, setup.teacher_for(cfg, groups, record)),
        moe_layers=layers,
    )


def _build_data(cfg: XparConfig) -> DataBundle:
    # Data before any process group: a corpus that yields no sequence is a config error
    # and must not leave ranks waiting in a rendezvous. Every rank builds (or loads the
    # cached) token stream, under a file lock, and takes its own shard.
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.task.kind == "classify":
        return build_classify_data(cfg, rank, world)
    return build_data(
        cfg.data, rank=rank, world_size=world, micro_batch_size=cfg.train.micro_batch_size
    )


def _init_groups(cfg: XparConfig, cleanup: contextlib.ExitStack) -> ParallelGroups:
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    env = (dist.get_rank(), dist.get_world_size()) if not owns_process_group else None
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    groups = init_parallel(cfg.ep_size(world_env), cfg.parallel.backend, cfg.parallel.timeout_s)
    if owns_process_group:
        cleanup.callback(dist.destroy_process_group)
        env = (int(os.environ.get("RANK", "0")), world_env)
    assert (groups.rank, groups.world_size) == env, "launcher env disagrees with the process group"
    if groups.world_size > 1:  # a hung rank ends the job in parallel.timeout_s (stops first)
        t = cfg.parallel.timeout_s
        cleanup.enter_context(watchdog.Watchdog(groups.rank, groups.world_size, t))
    return groups


def _build_engine(
    cfg: XparConfig, model, groups: ParallelGroups, precision: str, schedule_steps: int
) -> ds.XparEngine:
    tc, o = cfg.train, cfg.optim
    ds_config = build_ds_config(
        zero_stage=cfg.parallel.zero_stage,
        micro_batch_size=tc.micro_batch_size,
        grad_accum=tc.grad_accum,
        grad_clip=o.grad_clip,
        precision=precision,
        extra=cfg.parallel.deepspeed,
        extra_json=cfg.parallel.deepspeed_json,
    )
    lr_lambda = make_lr_lambda(
        schedule=o.schedule,
        lr=o.lr,
        min_lr=o.min_lr,
        warmup_steps=o.warmup_steps,
        total_steps=schedule_steps,  # a resume keeps the checkpoint's (xpar.train.schedule)
    )
    return ds.initialize(
        model,
        groups,
        ds_config=ds_config,
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        lr_lambda=lr_lambda,
    )


def _padded_vocab(n: int, multiple: int = 64) -> int:
    # A multiple of 64 keeps the LM head GEMM aligned; unused ids just learn low logits.
    return int(math.ceil(n / multiple) * multiple)


# --------------------------------------------------------------------------- restore, open


def restore(run: Run) -> None:
    """Continue the checkpoint the start plan found (train.resume), if any: weights,
    optimizer moments, step, data position, RNG, W&B run; hyperparameters from the config.
    One that a rank cannot read (damaged) is passed over for the newest older one that every
    rank can (train.resume=auto|force, one line each: xpar.train.resume.loadable)."""
    if run.start.resume is None:
        return
    start, state = resume.loadable(run.cfg, run.start, run.engine)  # collective
    _use_schedule(run, start.schedule_steps)
    run.start, run.resume_dir = start, start.resume
    shared = ckpt.read_client_state(run.resume_dir)
    force = run.cfg.train.resume == "force"
    with resume.config_hyperparameters(run.engine.lr_scheduler):
        rank_state = ckpt.load(run.engine, run.resume_dir, run.record, force=force, state=state)
    run.step = run.start_step = run.last_saved = shared["step"]
    run.tokens_seen = shared["tokens_seen"]
    run.result.step = run.step
    run.data.train.load_state_dict(shared["data"])
    set_rng_state(rank_state["rng"])
    run.wandb_run_id = shared["wandb_run_id"]
    resume.announce(run.start)  # the plan's notes, once the checkpoint is accepted


def _use_schedule(run: Run, schedule_steps: int) -> None:
    """The engine's LR schedule has the plan's length; a checkpoint fallen back to may record
    another (its client_state.json's schedule_steps), and the resumed run keeps that one."""
    sched = run.engine.lr_scheduler
    if sched is None or schedule_steps == run.start.schedule_steps:
        return
    o = run.cfg.optim
    fn = make_lr_lambda(
        schedule=o.schedule,
        lr=o.lr,
        min_lr=o.min_lr,
        warmup_steps=o.warmup_steps,
        total_steps=schedule_steps,
    )
    sched.lr_lambdas = [fn] * len(sched.lr_lambdas)


def open_run(run: Run, cleanup: contextlib.ExitStack) -> None:
    """Monitor and watcher (both cleaned up however the run ends), then the start-up lines."""
    cfg, g = run.cfg, run.groups
    plain = to_plain_dict(cfg)
    run.monitor = Monitor(
        cfg.logger,
        rank=g.rank,
        total_steps=cfg.train.steps,
        run_dir=Path(cfg.train.out_dir).resolve(),
        config=plain,
        run_id=run.wandb_run_id,
        world_size=g.world_size,
        flops_per_token=flops_per_token(run.model_cfg, cfg.moe, cfg.data.seq_len),
        device=g.device,
    )
    cleanup.callback(run.monitor.finish, exit_code=1)  # a no-op after a clean finish
    run.monitor.print_config(plain)
    _announce(run)
    run.val_batches = run.task.prepare_val(run, run.data.val_batches(cfg.train.eval_batches))
    run.watcher = PreemptionWatcher(group=g.dp_group)
    cleanup.callback(run.watcher.uninstall)


def _announce(run: Run) -> None:
    cfg, g, say = run.cfg, run.groups, run.monitor.print
    say(f"model: {describe_cost(run.model_cfg, cfg.moe, cfg.data.seq_len)['summary']}")
    say(
        f"parallel: world={g.world_size} ep_size={g.ep_size} expert_dp={g.expert_dp_size} "
        f"zero_stage={cfg.parallel.zero_stage} precision={run.precision} backend={g.backend}"
    )
    from xpar.data.build import describe_cache

    st = run.data.stats
    # Every rank built or loaded the cache before the process group: ask them who built it.
    mine = torch.tensor([float(not st.cache_hit), st.build_s], dtype=torch.float64)
    every = [torch.empty_like(mine, device=run.device) for _ in range(g.world_size)]
    with watchdog.collective("all_gather (who built the data cache)"):
        dist.all_gather(every, mine.to(run.device))
    build_s = [float(t[1]) if t[0] else None for t in every]
    say(f"data: {st.summary()}; {describe_cache(build_s)}")
    if run.resume_dir is not None:
        say(f"resumed from {run.resume_dir} at step {run.step}")


def after_step(run: Run) -> bool:
    """Evaluate and save on their cadence; False when a scheduler signal or
    train.max_time_s stops the run."""
    tc, step = run.cfg.train, run.step
    if run.health.stop_reason is not None:  # every rank alike: the verdicts were all-reduced
        run.monitor.print(
            f"stopping at step {step}: {run.health.stop_reason} (newest checkpoint: "
            f"{'none' if run.last_saved is None else f'step {run.last_saved}'}; "
            f"exit {health.EXIT_UNHEALTHY})"
        )
        return False
    if step % tc.eval_every == 0 and step < tc.steps:
        validate(run)
    if step % tc.ckpt_every == 0 or step == tc.steps:
        save(run)
    run.faults.after_step(step)
    # A warning on the last step needs no requeue: the run is done.
    if step < tc.steps and run.watcher.should_stop(step):
        if run.last_saved != step:
            save(run)
        if run.watcher.stopped_by is not None:
            why = run.watcher.stopped_by.name
        else:
            why = f"train.max_time_s={tc.max_time_s:g} ({run.watcher.elapsed():.1f}s in the loop)"
        run.monitor.print(f"stopping at step {step} on {why}: checkpoint saved")
        return False
    return True


def save(run: Run) -> None:
    """Collective: every rank's file, then rank 0's client state, then the `latest` pointer."""
    step, root = run.step, run.ckpt_root
    bad = sum_over_ranks([float(not health.weights_finite(run.engine.module))], run.device)[0]
    if bad:  # the step guard skips non-finite updates, so this is a bug: never save it
        raise XparUnhealthyError(
            f"step {step}: the weights are not finite on {int(bad)} rank(s); no checkpoint "
            f"is written (`latest` still names step {run.last_saved})"
        )
    d = ckpt.step_dir(root, step)
    with watchdog.waiting_in(f"checkpoint {step} save (DeepSpeed, ends with a barrier)"):
        ckpt.save(run.engine, d, client_state={"rng": rng_state()})
    if run.groups.rank == 0:
        ckpt.write_client_state(
            d,
            {
                "step": step,
                "tokens_seen": run.tokens_seen,
                "data": run.data.train.state_dict(),
                "wandb_run_id": run.monitor.run_id,
                "world_size": run.groups.world_size,
                "schedule_steps": run.start.schedule_steps,
                **run.record,
            },
        )
        run.faults.before_publish(step)
        ckpt.publish(root, step)
        ckpt.prune(root, run.cfg.train.keep_checkpoints)
    with watchdog.collective(f"barrier (checkpoint {step} published)"):
        dist.barrier()
    run.result.checkpoint, run.last_saved = str(d), step


# --------------------------------------------------------------------------- finish


def finish(run: Run, startup: phases.PhaseTimer, t_loop: float) -> TrainResult:
    """Final evaluation (unless stopped by a signal), summary lines, W&B closed, the run's
    warnings again (they came at start-up and scrolled away), requeue."""
    res, mon, world = run.result, run.monitor, run.groups.world_size
    res.step = run.step
    elapsed = time.perf_counter() - t_loop
    res.tokens_per_s = (run.step - run.start_step) * run.tokens_per_step / max(elapsed, 1e-9)
    if run.watcher.stopped_by is None and run.health.stop_reason is None:
        res.val_loss_after = validate(run)
        mon.print(f"val loss after: {res.val_loss_after:.4f}")
    mon.print(
        f"trained steps {run.start_step + 1}..{run.step} in {elapsed:.1f}s: "
        f"{res.tokens_per_s:,.0f} tokens/s ({res.tokens_per_s / world:,.0f} per rank); "
        f"total wall time {startup.since_start():.1f}s (from {startup.origin})"
    )
    mon.print_summary(checkpoint_dir=res.checkpoint)
    wandb_dir = mon.finish()
    res.wandb_dir = str(wandb_dir) if wandb_dir else None
    if run.groups.rank == 0:
        print(f"metrics: {mon.metrics_path}", flush=True)
    log = warning_log.active()
    if log is not None:
        mon.print_warnings(log.lines(), warning_log.PREFIX)
    res.exit_code = _exit_code(run)
    run.watcher.uninstall()
    with watchdog.collective("barrier (end of run)"):
        dist.barrier()
    return res


def _exit_code(run: Run) -> int:
    """Requeue if a scheduler signal stopped the run early; a run that reached train.steps is
    done, even when the signal came during its last step (no requeue: nothing is left)."""
    if run.health.stop_reason:
        return health.EXIT_UNHEALTHY
    if run.step >= run.cfg.train.steps:
        if run.watcher.received is not None:
            run.monitor.print(
                f"{run.watcher.received.name} came during the last step: the run is complete, "
                "no requeue"
            )
        return 0
    run.watcher.requeue_if_slurm()
    return run.watcher.exit_code()
