"""The whole training step: the same MoE decoder with xpar's MoE layer vs DeepSpeed's.

    torchrun --standalone --nproc-per-node 2 -m xpar.bench step [--rounds 3] [--steps 3] [--compile]
    python -m xpar.bench step --help      (every option, and the presets)

One decoder (xpar.models.MoETransformer), built twice from the same seed: once as it is,
once with DeepSpeed's `deepspeed.moe.layer.MoE` swapped into its MoE blocks (an adapter with
the block's interface, weights copied from xpar's: the same initial model). Both train on
the same token ids with the same Adam, LR and ZeRO-2 config (xpar.parallel.ds_config):
xpar's arm through xpar's own engine code (xpar.parallel.deepspeed.initialize), DeepSpeed's
arm through deepspeed.initialize with its expert param groups
(split_params_into_different_moe_groups_for_optimizer), as a DeepSpeed user would.
--compile adds xpar with train.compile=true (xpar.train.model_setup.compile_model).

Arms run interleaved in rounds in the same processes; each round times --steps optimizer
steps per arm after one untimed step. Reported: median tokens/s over rounds (the slowest
rank's), xpar/DS, MFU against a dense fp32 (bf16 on GPU) GEMM of the model's FFN size
measured on one thread per rank in the same run, and where the step's time goes
(forward, of it the MoE layers, backward with the gradient reduction, optimizer step).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from xpar.bench.moe import DSExpert as _DSExpert
from xpar.bench.torchrun import help_on_other_ranks, require_torchrun
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig

PROG = "python -m xpar.bench step"
LR = 1e-3
BETAS = (0.9, 0.95)
SEED = 1234
TARGET = 1.2  # the issue's: xpar's tokens/s >= 1.2 x DeepSpeed's
POOL = 4  # distinct batches per rank, cycled


@dataclass(frozen=True)
class Preset:
    d_model: int
    n_layers: int
    n_heads: int
    num_experts: int
    top_k: int
    d_ff: int  # expert (and dense FFN) width
    vocab: int
    seq_len: int
    batch: int  # sequences per rank per step
    capacity_factor: float = 1.25

    def describe(self) -> str:
        return (
            f"d_model={self.d_model} layers={self.n_layers} heads={self.n_heads} "
            f"E={self.num_experts} k={self.top_k} d_ff={self.d_ff} vocab={self.vocab} "
            f"seq_len={self.seq_len} batch/rank={self.batch} cf={self.capacity_factor}"
        )


PRESETS = {
    "small": Preset(256, 4, 4, 8, 2, 512, 4096, 256, 8),
    "tiny": Preset(64, 2, 2, 4, 2, 64, 256, 32, 2),
}
DEFAULT_PRESET = "small"


# --------------------------------------------------------------------------- the DS arm


@dataclass
class DeepSpeedAux:
    """What the decoder's loss reads of an MoE layer's report: the weighted balance loss."""

    loss: torch.Tensor


class DeepSpeedMoEFFN(nn.Module):
    """DeepSpeed's MoE with the interface a Block expects of its FFN: (x, token_ids) ->
    (y, aux with .loss). Top-k with capacity, no random token selection and no sampled
    second expert (xpar's top-k keeps the highest weights and picks deterministically)."""

    def __init__(self, d_model: int, cfg: MoEConfig, ep_size: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.aux_loss_weight = cfg.aux_loss_weight
        self.moe = MoE(
            hidden_size=d_model,
            expert=_DSExpert(d_model, cfg.d_ff),
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.capacity_factor,
            min_capacity=0,
            drop_tokens=True,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )

    @torch.no_grad()
    def copy_from(self, layer) -> None:
        """The weights of xpar's MoELayer (same local experts): router [E, D] is the gate,
        expert e's w1 [D, F] / w2 [F, D] are fc1 / fc2 transposed."""
        self.moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        experts = self.moe.deepspeed_moe.experts.deepspeed_experts
        assert len(experts) == layer.experts.w1.shape[0], "local expert counts differ"
        for e, ex in enumerate(experts):
            ex.fc1.weight.copy_(layer.experts.w1[e].T)
            ex.fc2.weight.copy_(layer.experts.w2[e].T)

    def forward(self, x_BLD, token_ids=None):
        y_BLD, l_aux, _ = self.moe(x_BLD)
        return y_BLD, DeepSpeedAux(loss=self.aux_loss_weight * l_aux)


# --------------------------------------------------------------------------- build


def configs(p: Preset) -> tuple[ModelConfig, MoEConfig]:
    model_cfg = ModelConfig(
        vocab_size=p.vocab, d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads,
        d_ff=p.d_ff, max_seq_len=p.seq_len, activation="gelu",
    )  # fmt: skip
    # No z-loss: DeepSpeed's gate has none, so both arms minimise the same objective.
    moe_cfg = MoEConfig(
        num_experts=p.num_experts, top_k=p.top_k, d_ff=p.d_ff, capacity_factor=p.capacity_factor,
        activation="gelu", z_loss_weight=0.0,
    )  # fmt: skip
    return model_cfg, moe_cfg


def _xpar_model(p: Preset, groups):
    from xpar.models import MoETransformer

    model_cfg, moe_cfg = configs(p)
    torch.manual_seed(SEED)  # the same on every rank: dense params agree, experts sliced
    return MoETransformer(model_cfg, moe_cfg, ep_group=groups.ep_group)


def _ds_model(p: Preset, groups):
    """xpar's decoder with every MoE layer replaced by DeepSpeed's, holding the same weights."""
    model = _xpar_model(p, groups)
    _, moe_cfg = configs(p)
    for block in model.blocks:
        if block.is_moe:
            ds_ffn = DeepSpeedMoEFFN(p.d_model, moe_cfg, groups.ep_size)
            ds_ffn.copy_from(block.ffn)
            block.ffn = ds_ffn
    return model


def _ds_config(p: Preset, precision: str) -> dict:
    from xpar.parallel.ds_config import build_ds_config

    return build_ds_config(zero_stage=2, micro_batch_size=p.batch, precision=precision)


def _xpar_engine(model, groups, ds_config: dict):
    from xpar.parallel import deepspeed as xds

    return xds.initialize(model, groups, ds_config=ds_config, lr=LR, betas=BETAS)


def _ds_engine(model, ds_config: dict):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from xpar.parallel.deepspeed import _without_shm_op

    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"}
    )
    optimizer = torch.optim.AdamW(param_groups, lr=LR, betas=BETAS, weight_decay=0.0)
    with _without_shm_op():  # as xpar's engine does: no JIT build of an op nobody calls
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
    return engine


@dataclass
class Arm:
    name: str
    engine: object  # XparEngine or DeepSpeed's engine: both are called, backward(), step()
    model: nn.Module
    times: dict  # phase -> [seconds per step, one per round]; "first": the first step
    losses: list
    error: str = ""


PHASES = ("step", "forward", "moe_forward", "backward", "moe_backward", "optimizer", "first")


def _arm(name: str, build: Callable[[], tuple]) -> Arm:
    try:
        engine, model = build()
    except Exception as e:  # a compiler that cannot run here: the table says so
        return Arm(name, None, None, {}, [], error=_one_line(e))
    return Arm(name, engine, model, {k: [] for k in PHASES}, [])


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


# --------------------------------------------------------------------------- run


def _batches(p: Preset, rank: int, device) -> list[torch.Tensor]:
    """POOL batches [B, L+1] of token ids, this rank's own, the same for every arm."""
    gen = torch.Generator().manual_seed(SEED + 1 + rank)
    return [
        torch.randint(0, p.vocab, (p.batch, p.seq_len + 1), generator=gen).to(device)
        for _ in range(POOL)
    ]


class _MoETimer:
    """Wall time inside the MoE layers, forward (pre/post hooks on each block's FFN) and
    backward: from the gradient of the layer's output to that of its input (tensor hooks);
    between the two only the layer's own backward runs (the block's residual branch needs
    the input's gradient first)."""

    def __init__(self, model: nn.Module, sync: Callable[[], None]):
        self.forward = self.backward = self._t0 = self._b0 = 0.0
        self.sync = sync
        for block in model.blocks:
            if block.is_moe:
                block.ffn.register_forward_pre_hook(self._pre)
                block.ffn.register_forward_hook(self._post)

    def reset(self) -> None:
        self.forward = self.backward = 0.0

    def _pre(self, *_):
        self.sync()
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        self.sync()
        self.forward += time.perf_counter() - self._t0
        x, y = args[0], output[0]
        if torch.is_grad_enabled() and x.requires_grad and y.requires_grad:
            y.register_hook(self._grad_out)
            x.register_hook(self._grad_in)

    def _grad_out(self, grad):
        self.sync()
        self._b0 = time.perf_counter()

    def _grad_in(self, grad):
        self.sync()
        self.backward += time.perf_counter() - self._b0


def _train_step(arm: Arm, tokens_BL1: torch.Tensor, sync, timer: _MoETimer) -> dict:
    """One optimizer step (forward, LM loss + aux, backward, step), each phase timed."""
    t0 = time.perf_counter()
    timer.reset()
    inputs, targets = tokens_BL1[:, :-1], tokens_BL1[:, 1:]
    logits_BLV, auxes = arm.engine(inputs)
    ce = F.cross_entropy(logits_BLV.float().flatten(0, 1), targets.flatten())
    loss = ce + sum(a.loss.float() for a in auxes)
    sync()
    t1 = time.perf_counter()
    arm.engine.backward(loss)
    sync()
    t2 = time.perf_counter()
    arm.engine.step()
    sync()
    t3 = time.perf_counter()
    arm.losses.append(ce.item())
    return {"step": t3 - t0, "forward": t1 - t0, "moe_forward": timer.forward,
            "moe_backward": timer.backward,
            "backward": t2 - t1, "optimizer": t3 - t2}  # fmt: skip


def _gemm_peak(p: Preset, device, dtype, repeats: int = 5) -> float:
    """FLOP/s of a dense [tokens, D] x [D, F] GEMM (the FFN's first matmul at this preset's
    size) on this rank's one thread: best of `repeats`, every rank at once."""
    t = p.batch * p.seq_len
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(t, p.d_model, generator=gen).to(device, dtype)
    b = torch.randn(p.d_model, p.d_ff, generator=gen).to(device, dtype)
    sync = _sync(device)
    torch.matmul(a, b)
    sync()
    dist.barrier()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2.0 * t * p.d_model * p.d_ff / best


def _sync(device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _parser() -> argparse.ArgumentParser:
    listed = "\n".join(f"  {name}: {p.describe()}" for name, p in PRESETS.items())
    ap = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The whole training step (forward, loss, backward, ZeRO-2 optimizer step)\n"
        "of one MoE decoder with xpar's MoE layer vs DeepSpeed's MoE swapped into the same\n"
        "blocks: tokens/s, xpar/DS, MFU vs a GEMM measured in the same run, and the phases.",
        epilog=f"presets (--preset picks one):\n{listed}\n\n"
        "Runs under torchrun, one process per rank, e.g.\n"
        "  torchrun --standalone --nproc-per-node 2 -m xpar.bench step --compile",
    )
    ap.add_argument("--steps", type=_positive, default=3,
                    help="timed optimizer steps per arm per round, after one untimed "
                    "(default: 3)")  # fmt: skip
    ap.add_argument("--rounds", type=_positive, default=3,
                    help="interleaved rounds over the arms; the median is reported (default: 3)")  # fmt: skip
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                    help=f"model and batch shape, listed below (default: {DEFAULT_PRESET})")  # fmt: skip
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu (gloo, one thread per rank) or cuda (NCCL, one GPU per rank by "
                    "LOCAL_RANK) (default: cpu)")  # fmt: skip
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="training precision: fp32, or bf16 (DeepSpeed's bf16 with ZeRO-2; "
                    "for cuda) (default: fp32)")  # fmt: skip
    ap.add_argument("--compile", action="store_true",
                    help="also run xpar with train.compile=true (torch.compile of attention, "
                    "dense FFN and norms); its compilation is in its first, untimed step")  # fmt: skip
    return ap


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    help_on_other_ranks(argv)
    args = _parser().parse_args(argv)
    require_torchrun(PROG, "step")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        raise SystemExit(2)
    if args.device == "cpu" and args.dtype == "bf16":
        print(f"{PROG}: --dtype bf16 is for --device cuda; use fp32 on cpu", file=sys.stderr)
        raise SystemExit(2)
    _run(args)


def _run(args: argparse.Namespace) -> None:
    from xpar.parallel.deepspeed import init_comm
    from xpar.parallel.groups import init_parallel
    from xpar.train.model_setup import compile_model

    # DeepSpeed 0.19 calls a collective torch deprecated; it says nothing the reader can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per rank, as the trainer's ranks on this machine
    backend = "nccl" if device.type == "cuda" else "gloo"
    world = int(os.environ["WORLD_SIZE"])
    groups = init_parallel(world, backend, timeout_s=600)  # EP over every rank
    init_comm(backend)
    device = groups.device
    rank = groups.rank
    p = PRESETS[args.preset]
    precision = args.dtype
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ds_config = _ds_config(p, precision)

    def xpar_arm(compiled: bool):
        model = _xpar_model(p, groups).to(device)
        if compiled:
            compile_model(model, device, rank=1)  # the bench prints its own lines
        return _xpar_engine(model, groups, ds_config), model

    def ds_arm():
        model = _ds_model(p, groups).to(device)
        return _ds_engine(model, ds_config), model

    arms = [_arm("xpar", lambda: xpar_arm(False)), _arm("deepspeed", ds_arm)]
    if args.compile:
        arms.insert(1, _arm("xpar compile", lambda: xpar_arm(True)))
    batches = _batches(p, rank, device)
    peak = _gemm_peak(p, device, dtype)
    _measure(arms, batches, args, device)
    table = _reduce(arms, peak)
    if rank == 0:
        print(_format(table, p, args, world, device), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _measure(arms: list[Arm], batches, args, device) -> None:
    sync = _sync(device)
    live = [a for a in arms if a.engine is not None]
    timers = {a.name: _MoETimer(a.model, sync) for a in live}
    i = 0
    for _ in range(args.rounds):
        for arm in live:
            timer = timers[arm.name]
            try:
                t0 = time.perf_counter()
                _train_step(arm, batches[i % POOL], sync, timer)  # untimed
                if not arm.times["first"]:  # compilation, lazily built state: once per arm
                    arm.times["first"].append(time.perf_counter() - t0)
            except Exception as e:  # compilation happens here: report it, keep the others
                arm.error, arm.engine = _one_line(e), None
                dist.barrier()
                continue
            i += 1
            sync()
            dist.barrier()
            per = {k: 0.0 for k in PHASES[:-1]}
            for _ in range(args.steps):
                got = _train_step(arm, batches[i % POOL], sync, timer)
                i += 1
                for k in PHASES[:-1]:
                    per[k] += got[k] / args.steps
            dist.barrier()
            for k in PHASES[:-1]:
                arm.times[k].append(per[k])
        live = [a for a in live if a.engine is not None]


def _reduce(arms: list[Arm], peak: float) -> dict:
    """{name: {phase: median seconds (slowest rank), "loss": last loss (mean over ranks),
    "error": ...}} and the GEMM peak (the mean over ranks)."""
    out = {"peak": 0.0, "arms": {}}
    world = dist.get_world_size()
    vals = []
    for a in arms:
        ok = not a.error and a.times.get("step")
        vals += [statistics.median(a.times[k]) if ok else 0.0 for k in PHASES]
    t = torch.tensor(vals, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is done when the slowest rank is
    last = torch.tensor([a.losses[-1] if a.losses else 0.0 for a in arms], dtype=torch.float64)
    dist.all_reduce(last)
    p = torch.tensor([peak], dtype=torch.float64)
    dist.all_reduce(p)
    out["peak"] = p.item() / world
    errors = [None] * world
    dist.all_gather_object(errors, [a.error for a in arms])
    for j, a in enumerate(arms):
        row = dict(zip(PHASES, t[j * len(PHASES) : (j + 1) * len(PHASES)].tolist(),
                       strict=True))  # fmt: skip
        row["loss"] = last[j].item() / world
        row["error"] = next((e[j] for e in errors if e[j]), "")
        out["arms"][a.name] = row
    return out


def _format(table: dict, p: Preset, args, world: int, device) -> str:
    from xpar.models.cost import model_cost

    model_cfg, moe_cfg = configs(p)
    fpt = model_cost(model_cfg, moe_cfg, p.seq_len).flops_per_token
    tokens = p.batch * p.seq_len  # per rank per step
    peak = table["peak"]
    thr = torch.get_num_threads() if device.type == "cpu" else "-"
    lines = [
        f"Training step (fwd + loss + bwd + ZeRO-2 Adam step), {world} ranks, EP={world}, "
        f"{device.type} {args.dtype}, {thr} thread(s)/rank; {p.describe()}; "
        f"median of {args.rounds} rounds x {args.steps} steps, slowest rank",
        f"MFU vs measured GEMM peak: {fpt / 1e6:.1f} MFLOP/token (xpar.models.cost, fwd+bwd, "
        f"active experts) against {peak / 1e9:.1f} GFLOP/s per rank ([{tokens}x{p.d_model}] x "
        f"[{p.d_model}x{p.d_ff}] GEMM, this run)",
        "",
        "| arm | step ms | tokens/s | vs DeepSpeed | MFU | fwd ms | of it MoE ms | bwd ms "
        "| of it MoE ms | optimizer ms | first step s | last loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    arms = table["arms"]
    ds = arms.get("deepspeed", {})
    ds_tps = world * tokens / ds["step"] if ds.get("step") else 0.0
    for name, m in arms.items():
        if m["error"] or not m["step"]:
            lines.append(f"| {name} | failed: {m['error'] or 'no steps'} |" + " |" * 10)
            continue
        tps = world * tokens / m["step"]
        ratio = f"{tps / ds_tps:.2f}x" if ds_tps and name != "deepspeed" else "1.00x"
        mfu = fpt * tps / world / peak if peak else 0.0
        lines.append(
            f"| {name} | {m['step'] * 1e3:.1f} | {tps:,.0f} | {ratio} | {mfu:.1%} | "
            f"{m['forward'] * 1e3:.1f} | {m['moe_forward'] * 1e3:.1f} | "
            f"{m['backward'] * 1e3:.1f} | {m['moe_backward'] * 1e3:.1f} | "
            f"{m['optimizer'] * 1e3:.1f} | {m['first']:.1f} | {m['loss']:.4f} |"
        )
    lines += ["", _verdict(arms, world * tokens, ds_tps)]
    return "\n".join(lines)


def _verdict(arms: dict, tokens: int, ds_tps: float) -> str:
    parts = []
    for name in ("xpar", "xpar compile"):
        m = arms.get(name)
        if not m or m["error"] or not m["step"] or not ds_tps:
            continue
        r = tokens / m["step"] / ds_tps
        parts.append(f"{name}/DS {r:.2f}x ({'met' if r >= TARGET else 'NOT met'}, "
                     f"target >= {TARGET:.1f}x)")  # fmt: skip
    x, c = arms.get("xpar"), arms.get("xpar compile")
    if x and c and x["step"] and c["step"] and not c["error"]:
        parts.append(f"train.compile gain {x['step'] / c['step']:.2f}x tokens/s")
    return "Target: " + "; ".join(parts) if parts else "Target: not measured (an arm failed)"
