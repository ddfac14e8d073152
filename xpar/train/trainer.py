"""The training loop, readable top to bottom.

train(cfg) -> TrainResult. Every rank runs it. Order: seeds, process groups,
data, model, DeepSpeed engine, monitor, resume, eval, loop (step, log, eval,
checkpoint, preemption), final eval and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from xpar.config.schema import XparConfig
from xpar.config.store import to_plain_dict
from xpar.data.build import build_data
from xpar.models import MoETransformer
from xpar.models.cost import describe_cost, flops_per_token
from xpar.parallel import deepspeed as ds
from xpar.parallel.ds_config import build_ds_config, resolve_precision
from xpar.parallel.groups import init_parallel
from xpar.train import checkpoint as ckpt
from xpar.train.monitor import Monitor
from xpar.train.preempt import PreemptionWatcher
from xpar.train.schedule import make_lr_lambda

METRICS_FILE = "metrics.jsonl"


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": [version, list(internal), gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.seed(0)
    np_state = list(np.random.get_state())
    np_state[1] = np.asarray(state["numpy"], dtype=np.uint32)
    np.random.set_state(tuple(np_state))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _padded_vocab(n: int, multiple: int = 64) -> int:
    # A multiple of 64 keeps the LM head GEMM aligned; unused ids just learn low logits.
    return int(math.ceil(n / multiple) * multiple)


def _mean_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def evaluate(engine, batches, device, precision_dtype) -> float:
    """Mean validation CE over this rank's batches, averaged over ranks."""
    engine.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.autocast(
                device.type, dtype=precision_dtype, enabled=precision_dtype != torch.float32
            ):
                logits, _ = engine(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
            n += 1
    engine.train()
    return _mean_over_ranks([total / max(n, 1)], device)[0]


def train(cfg: XparConfig) -> TrainResult:
    t_start = time.perf_counter()
    tc = cfg.train
    # DeepSpeed 0.19 calls a collective torch deprecated; it says nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(tc.seed)

    owns_process_group = not (dist.is_available() and dist.is_initialized())
    # Data before any process group: a corpus that yields no sequence is a config error
    # and must not leave ranks waiting in a rendezvous. Every rank builds (or loads the
    # cached) token stream, under a file lock, and takes its own shard.
    env_rank = dist.get_rank() if not owns_process_group else int(os.environ.get("RANK", "0"))
    env_world = (
        dist.get_world_size() if not owns_process_group else int(os.environ.get("WORLD_SIZE", "1"))
    )
    data = build_data(
        cfg.data, rank=env_rank, world_size=env_world, micro_batch_size=tc.micro_batch_size
    )
    vocab = cfg.model.vocab_size or _padded_vocab(data.tokenizer.vocab_size)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    groups = init_parallel(
        cfg.ep_size(int(os.environ.get("WORLD_SIZE", "1"))),
        cfg.parallel.backend,
        cfg.parallel.timeout_s,
    )
    rank, world = groups.rank, groups.world_size
    assert (rank, world) == (env_rank, env_world), "launcher env disagrees with the process group"
    device = groups.device
    out_dir = Path(tc.out_dir).resolve()
    ckpt_root = out_dir / "checkpoints"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)

    # Model: same seed on every rank, so dense params agree and experts are sliced consistently.
    torch.manual_seed(tc.seed)
    model = MoETransformer(model_cfg, cfg.moe, ep_group=groups.ep_group).to(device)
    precision = resolve_precision(cfg.parallel.precision)
    ds_config = build_ds_config(
        zero_stage=cfg.parallel.zero_stage,
        micro_batch_size=tc.micro_batch_size,
        grad_accum=tc.grad_accum,
        grad_clip=cfg.optim.grad_clip,
        precision=precision,
        extra=cfg.parallel.deepspeed,
        extra_json=cfg.parallel.deepspeed_json,
    )
    o = cfg.optim
    engine = ds.initialize(
        model,
        groups,
        ds_config=ds_config,
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        lr_lambda=make_lr_lambda(
            schedule=o.schedule,
            lr=o.lr,
            min_lr=o.min_lr,
            warmup_steps=o.warmup_steps,
            total_steps=tc.steps,
        ),
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    run_record = ckpt.run_record(model_cfg, cfg.moe, data.tokenizer, cfg.data.tokenizer)

    # Resume: the newest complete checkpoint (or an explicit directory).
    start_step, tokens_seen, run_id = 0, 0, None
    resume_dir = None
    if tc.resume == "auto":
        resume_dir = ckpt.latest(ckpt_root)
    elif tc.resume != "never":
        resume_dir = Path(tc.resume)
    if resume_dir is not None:
        shared = ckpt.read_client_state(resume_dir)
        rank_state = ckpt.load(engine, resume_dir, run=run_record)
        start_step, tokens_seen, run_id = (
            shared["step"],
            shared["tokens_seen"],
            shared["wandb_run_id"],
        )
        data.train.load_state_dict(shared["data"])
        _set_rng_state(rank_state["rng"])

    seq_len = cfg.data.seq_len
    fpt = flops_per_token(model_cfg, cfg.moe, seq_len)
    plain = to_plain_dict(cfg)
    monitor = Monitor(
        cfg.logger,
        rank=rank,
        total_steps=tc.steps,
        run_dir=out_dir,
        config=plain,
        run_id=run_id,
        world_size=world,
        flops_per_token=fpt,
        device=device,
    )
    monitor.print_config(plain)
    cost = describe_cost(model_cfg, cfg.moe, seq_len)
    monitor.print(f"model: {cost['summary']}")
    monitor.print(
        f"parallel: world={world} ep_size={groups.ep_size} expert_dp={groups.expert_dp_size} "
        f"zero_stage={cfg.parallel.zero_stage} precision={precision} backend={groups.backend}"
    )
    st = data.stats
    monitor.print(
        f"data: {st.corpus} corpus split by {st.split_by}; train {st.train.docs} docs "
        f"{st.train.tokens:,} tokens {st.train.blocks:,} blocks; val {st.validation.docs} docs "
        f"{st.validation.tokens:,} tokens; cache {'hit' if st.cache_hit else 'built'} in {st.load_s:.1f}s"
    )
    if resume_dir is not None:
        monitor.print(f"resumed from {resume_dir} at step {start_step}")

    val_batches = data.val_batches(tc.eval_batches)
    result = TrainResult(step=start_step)
    result.val_loss_before = evaluate(engine, val_batches, device, dtype)
    monitor.log_val(start_step, result.val_loss_before)
    monitor.print(f"val loss before: {result.val_loss_before:.4f}")

    watcher = PreemptionWatcher(group=groups.dp_group)
    tokens_per_step = tc.micro_batch_size * tc.grad_accum * world * seq_len
    monitor.start(step=start_step, tokens_seen=tokens_seen)
    t_loop = time.perf_counter()
    step = start_step
    last_saved = start_step if resume_dir is not None else None
    crash_after = int(os.environ.get("XPAR_TEST_CRASH_AFTER_STEP", "0"))

    def save(step_: int) -> str:
        d = ckpt.step_dir(ckpt_root, step_)
        rng = _rng_state()
        ckpt.save(engine, d, client_state={"rng": rng})  # collective; ends with a barrier
        if rank == 0:
            ckpt.write_client_state(
                d,
                {
                    "step": step_,
                    "tokens_seen": tokens_seen,
                    "data": data.train.state_dict(),
                    "wandb_run_id": monitor.run_id,
                    "world_size": world,
                    **run_record,
                },
            )
            if os.environ.get("XPAR_TEST_CRASH_BEFORE_PUBLISH") == str(step_):
                os._exit(3)  # test hook: a crash after writing, before the pointer moves
            ckpt.publish(ckpt_root, step_)
            ckpt.prune(ckpt_root, tc.keep_checkpoints)
        dist.barrier()
        return str(d)

    while step < tc.steps:
        step += 1
        ce_sum, aux_sum = 0.0, 0.0
        auxes = None
        for _ in range(tc.grad_accum):
            x, y = data.train.next_batch()
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits, aux_list = engine(x)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            aux = sum((a.loss for a in aux_list), ce.new_zeros(()))
            engine.backward(ce + aux)
            ce_sum += ce.item()
            aux_sum += aux.item()
            auxes = aux_list
        engine.step()
        tokens_seen += tokens_per_step
        loss = _mean_over_ranks([ce_sum / tc.grad_accum], device)[0]
        result.losses[step] = loss
        monitor.tick(step)
        row = {"step": step, "loss": loss}
        if monitor.should_log(step):
            lb = [a.lb_loss.item() for a in auxes]
            zl = [a.z_loss.item() for a in auxes]
            # One all-reduce for every layer's drop fraction and router entropy.
            means = (
                _mean_over_ranks(
                    [
                        v
                        for a in auxes
                        for v in (a.dropped_fraction.item(), a.router_entropy.item())
                    ],
                    device,
                )
                if auxes
                else []
            )
            per_layer = [
                {
                    "tokens_per_expert": a.tokens_per_expert.cpu(),
                    "dropped_fraction": means[2 * i],
                    "router_entropy": means[2 * i + 1],
                }
                for i, a in enumerate(auxes)
            ]
            gn = engine.grad_norm()
            lr = engine.lr()
            logged = monitor.log_train(
                step,
                loss=loss,
                lr=lr,
                grad_norm=gn,
                tokens_seen=tokens_seen,
                aux_loss=(sum(lb) / len(lb)) if lb else None,
                z_loss=(sum(zl) / len(zl)) if zl else None,
                moe_layers=per_layer,
            )
            row.update(lr=lr, grad_norm=gn)
            row.update({k: v for k, v in logged.items() if isinstance(v, (int, float))})
        monitor.write_metrics(row)  # rank 0 only
        if step % tc.eval_every == 0 and step < tc.steps:
            vl = evaluate(engine, val_batches, device, dtype)
            monitor.log_val(step, vl)
        if step % tc.ckpt_every == 0 or step == tc.steps:
            result.checkpoint = save(step)
            last_saved = step
        if crash_after and step == crash_after:
            os.kill(os.getpid(), 9)  # test hook: die like a preempted node, no cleanup
        # A warning on the last step needs no requeue: the run is done.
        if step < tc.steps and watcher.should_stop(step):
            if last_saved != step:
                result.checkpoint = save(step)
            monitor.print(f"stopping at step {step} on {watcher.stopped_by.name}: checkpoint saved")
            break
    result.step = step
    elapsed = time.perf_counter() - t_loop
    result.tokens_per_s = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
    stopped = watcher.stopped_by is not None
    if not stopped:
        result.val_loss_after = evaluate(engine, val_batches, device, dtype)
        monitor.log_val(step, result.val_loss_after)
        monitor.print(f"val loss after: {result.val_loss_after:.4f}")
    monitor.print(
        f"trained steps {start_step + 1}..{step} in {elapsed:.1f}s: "
        f"{result.tokens_per_s:,.0f} tokens/s ({result.tokens_per_s / world:,.0f} per rank); "
        f"total wall time {time.perf_counter() - t_start:.1f}s"
    )
    monitor.print_summary(checkpoint_dir=result.checkpoint)
    wandb_dir = monitor.finish()
    result.wandb_dir = str(wandb_dir) if wandb_dir else None
    if rank == 0:
        print(f"metrics: {monitor.metrics_path}", flush=True)
    watcher.requeue_if_slurm()
    watcher.uninstall()
    result.exit_code = watcher.exit_code()
    dist.barrier()
    if owns_process_group:
        dist.destroy_process_group()
    return result
