"""MoE layer benchmark: xpar (capacity and dropless) vs DeepSpeed's MoE vs the bound.

    torchrun --nproc-per-node 2 -m xpar.bench moe [--rounds 5] [--iters 3] [--contended]
    python -m xpar.bench moe --help      (every option, and the rows)

The bound is this rank's routed rows (T*k) pushed through ONE dense expert MLP
as a single matrix: the expert FLOPs with no routing, permutation or
communication. Candidates run interleaved in rounds in the same processes; the
median forward+backward time per step is reported, with ratios and the targets'
verdicts. --contended runs every row again while a process the benchmark starts burns
one core (real clusters are never idle) and reports both tables. The peak memory of
xpar's step is measured with and without moe.recompute=experts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from xpar.bench.torchrun import help_on_other_ranks, require_torchrun
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.experts import expert_mlp


@dataclass
class Row:
    E: int
    k: int
    d_model: int
    d_ff: int
    tokens: int


ROWS = [
    Row(8, 2, 256, 1024, 4096),
    Row(8, 2, 256, 1024, 512),
    Row(32, 1, 256, 1024, 4096),
    Row(64, 2, 128, 256, 2048),
]
CAPACITY_FACTOR = 1.25
PROG = "python -m xpar.bench moe"
# The targets: xpar capacity / bound per row (the fine-grained row is the last),
# DeepSpeed / xpar on every row, and xpar / bound on a machine with one core busy.
BOUND_TARGET = (1.10, 1.10, 1.10, 1.25)
DS_TARGET = 1.15
CONTENDED_TARGET = 1.5


class _DenseMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_model, d_ff) * 0.02)
        self.w2 = nn.Parameter(torch.randn(d_ff, d_model) * 0.02)

    def forward(self, x):
        return expert_mlp(x, self.w1, self.w2, None, "gelu")


class DSExpert(nn.Module):
    """One expert MLP (gelu, no biases) as DeepSpeed's MoE wants it: an nn.Module it
    deep-copies per expert (also the step benchmark's)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=False)
        self.fc2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _xpar_layer(row: Row, cf: float | None, device, dtype, **perf) -> MoELayer:
    cfg = MoEConfig(
        num_experts=row.E, top_k=row.k, d_ff=row.d_ff, capacity_factor=cf, activation="gelu",
        **perf,
    )  # fmt: skip
    return MoELayer(row.d_model, cfg, ep_group=None).to(device=device, dtype=dtype)


def _build(row: Row, world: int, device, dtype):
    cands = {}
    for name, cf in (("xpar_capacity", CAPACITY_FACTOR), ("xpar_dropless", None)):
        layer = _xpar_layer(row, cf, device, dtype)
        cands[name] = lambda x, m=layer: m(x)[0]
    from deepspeed.moe.layer import MoE

    ds = MoE(
        hidden_size=row.d_model,
        expert=DSExpert(row.d_model, row.d_ff),
        num_experts=row.E,
        ep_size=world,
        k=row.k,
        capacity_factor=CAPACITY_FACTOR,
        eval_capacity_factor=CAPACITY_FACTOR,
        min_capacity=0,
        drop_tokens=True,
    ).to(device=device, dtype=dtype)
    cands["deepspeed"] = lambda x, m=ds: m(x)[0]
    bound = _DenseMLP(row.d_model, row.d_ff).to(device=device, dtype=dtype)
    cands["bound"] = lambda x, m=bound: m(x.repeat(row.k, 1))
    return cands


def _step(fn, x) -> None:
    x.grad = None
    y = fn(x)
    y.float().sum().backward()


def _time(fn, x, iters: int, device) -> float:
    def step():
        _step(fn, x)

    step()  # warm-up, also aligns the ranks
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return (time.perf_counter() - t0) / iters


def _rows(text: str) -> list[Row]:
    """--rows 0,2 -> those rows of ROWS (argparse reports a bad index as a usage error)."""
    try:
        idx = [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of row numbers"
        ) from None
    bad = [i for i in idx if not 0 <= i < len(ROWS)]
    if bad or not idx:
        raise argparse.ArgumentTypeError(
            f"{text!r} names no row or a row outside 0..{len(ROWS) - 1}; the rows are listed "
            "in --help"
        )
    return [ROWS[i] for i in idx]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    listed = "\n".join(
        f"  {i}: E={r.E} k={r.k} d_model={r.d_model} d_ff={r.d_ff} tokens/rank={r.tokens}"
        for i, r in enumerate(ROWS)
    )
    ap = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MoE layer forward+backward per step: xpar (capacity and dropless) vs\n"
        "DeepSpeed's MoE vs the bound (the routed rows through one dense expert MLP).\n"
        "Every rank holds E/world experts; the slowest rank's median is reported, with ratios.",
        epilog=f"rows (--rows picks some):\n{listed}\n\n"
        "Runs under torchrun, one process per rank, e.g.\n"
        "  torchrun --standalone --nproc-per-node 2 -m xpar.bench moe --rows 0,1\n"
        "  bash launch/dev.sh bench --rows 1",
    )
    ap.add_argument("--rounds", type=_positive, default=5,
                    help="interleaved rounds over the candidates; the median is reported "
                    "(default: 5)")  # fmt: skip
    ap.add_argument("--iters", type=_positive, default=3,
                    help="timed steps per candidate per round, after one warm-up (default: 3)")  # fmt: skip
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu (gloo) or cuda (NCCL, one GPU per rank by LOCAL_RANK) (default: cpu)")  # fmt: skip
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="parameter and activation dtype (default: fp32)")  # fmt: skip
    ap.add_argument("--rows", type=_rows, default=ROWS, metavar="I,J,...",
                    help="comma-separated row numbers from the table below (default: all)")  # fmt: skip
    ap.add_argument("--contended", action="store_true",
                    help="also run every row while a process started by the benchmark burns "
                    "one core, and report both tables (default: quiet only)")  # fmt: skip
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile xpar's capacity step per row and rank: rows its experts "
                    "computed vs the bound's T*k, and time in GEMMs, the activation, the "
                    "exchanges (waiting included) and the rest (routing, permutation)")  # fmt: skip
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory measurement of xpar's step with and without "
                    "moe.recompute=experts (it profiles one step per row)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    help_on_other_ranks(argv)
    args = _parser().parse_args(argv)
    require_torchrun(PROG, "moe")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        raise SystemExit(2)
    _run(args)


def _run(args: argparse.Namespace) -> None:
    from xpar.parallel.deepspeed import init_comm

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    init_comm(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    quiet = _measure(args, device, dtype, world)
    memory = _memory(args.rows, device, dtype) if args.memory else None
    breakdown = _breakdown(args.rows, device, dtype) if args.breakdown else None
    contended = None
    if args.contended:
        with _burner(int(os.environ.get("LOCAL_RANK", rank)) == 0):
            contended = _measure(args, device, dtype, world)
    if rank == 0:
        print(_format(quiet, world, device, args.dtype, memory=memory), flush=True)
        if contended is not None:
            print("\n" + _format(contended, world, device, args.dtype, busy=True), flush=True)
        if breakdown is not None:
            print("\n" + breakdown, flush=True)
        print("\n" + _verdicts(quiet, contended), flush=True)
    dist.barrier()
    dist.destroy_process_group()


ORDER = ["xpar_capacity", "xpar_dropless", "deepspeed", "bound"]


def _measure(args: argparse.Namespace, device, dtype, world: int) -> list:
    """[(row, {candidate: seconds})]: medians over rounds, the slowest rank's."""
    rank, table = dist.get_rank(), []
    for row in args.rows:
        torch.manual_seed(1234 + rank)
        cands = _build(row, world, device, dtype)
        x = torch.randn(row.tokens, row.d_model, device=device, dtype=dtype, requires_grad=True)
        times: dict[str, list[float]] = {n: [] for n in ORDER}
        for _ in range(args.rounds):
            for n in ORDER:
                times[n].append(_time(cands[n], x, args.iters, device))
        med = {n: statistics.median(v) for n, v in times.items()}
        # Report the slowest rank: a step is only done when every rank is.
        t = torch.tensor([med[n] for n in ORDER], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        table.append((row, dict(zip(ORDER, t.tolist(), strict=True))))
    return table


def _memory(rows: list[Row], device, dtype) -> dict:
    """{row: (kept, kept with moe.recompute=experts, peak, peak with it)}: what xpar's
    capacity forward holds for backward, and the fwd+bwd peak, on the rank that holds most.
    A model of many blocks holds every block's `kept` at once: that is what recompute cuts
    (one layer's own backward still rebuilds its activations, so its peak barely moves)."""
    from xpar.bench.memory import memory_use

    out = {}
    for row in rows:
        torch.manual_seed(1234 + dist.get_rank())
        x = torch.randn(row.tokens, row.d_model, device=device, dtype=dtype, requires_grad=True)
        kept, peak = [], []
        for recompute in ("none", "experts"):
            layer = _xpar_layer(row, CAPACITY_FACTOR, device, dtype, recompute=recompute)

            def step(m=layer, x=x):
                _step(lambda h: m(h)[0], x)

            step()  # warm: the shape check's collective, lazily built state
            # Free the warm step's gradients outside the profiled calls, which would count
            # their allocation again (and cannot see a free of what they never saw allocated).
            x.grad = None
            layer.zero_grad(set_to_none=True)
            y = memory_use(lambda m=layer, x=x: m(x)[0], device)[1]
            kept.append(y)
            peak.append(memory_use(step, device)[0])
            x.grad = None
        t = torch.tensor(kept + peak, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[id(row)] = tuple(int(v) for v in t.tolist())
    return out


# Profiler op names -> where xpar's step spends its time (self time; the rest is routing,
# permutation, the combine's scatter and autograd bookkeeping).
_PARTS = {
    "GEMM": ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm"),
    "activation": ("aten::gelu", "aten::gelu_backward"),
    "exchange": ("_AllToAll", "_AllToAllBackward", "c10d::alltoall_base_", "_PipelinedExperts"),
}


def _breakdown(rows: list[Row], device, dtype, steps: int = 3) -> str:
    """Where xpar's capacity step goes, per row and rank (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    rank, world = dist.get_rank(), dist.get_world_size()
    lines = [
        "xpar capacity step, profiled (ms per step, self time; exchange includes waiting "
        "for the other rank)",
        "",
        "| E | k | tokens/rank | rank | rows computed / T*k | GEMM | activation | exchange "
        "| rest | total |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        torch.manual_seed(1234 + rank)
        layer = _xpar_layer(row, CAPACITY_FACTOR, device, dtype)
        x = torch.randn(row.tokens, row.d_model, device=device, dtype=dtype, requires_grad=True)
        computed: list[int] = []

        def count(module, args, seen=computed):
            seen.append(args[0].shape[0])

        def fn(h, m=layer):
            return m(h)[0]

        layer.experts.register_forward_pre_hook(count)
        _step(fn, x)
        computed.clear()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                _step(fn, x)
        ms = dict.fromkeys(_PARTS, 0.0)
        total = 0.0
        for ev in prof.key_averages():
            t = ev.self_cpu_time_total / 1e3 / steps
            total += t
            for part, names in _PARTS.items():
                if ev.key in names:
                    ms[part] += t
        mine = [sum(computed) / steps / (row.tokens * row.k), *ms.values(), total]
        everyone = [torch.empty(len(mine), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(everyone, torch.tensor(mine, dtype=torch.float64))
        for r, v in enumerate(everyone):
            imb, gemm, act, exch, tot = v.tolist()
            lines.append(
                f"| {row.E} | {row.k} | {row.tokens} | {r} | {imb:.2f} | {gemm:.1f} | {act:.1f} "
                f"| {exch:.1f} | {tot - gemm - act - exch:.1f} | {tot:.1f} |"
            )
    return "\n".join(lines)


@contextlib.contextmanager
def _burner(start: bool):
    """A process burning one core for the duration (started by one rank per machine)."""
    proc = None
    if start:
        proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    dist.barrier()
    try:
        yield
    finally:
        dist.barrier()
        if proc is not None:
            proc.kill()
            proc.wait()


def _verdicts(quiet: list, contended: list | None) -> str:
    """One line per row: each target, met or not, with the figure."""
    lines = ["Targets (xpar capacity mode):"]
    busy = {id(r): m for r, m in (contended or [])}
    for row, m in quiet:
        i = next((j for j, r in enumerate(ROWS) if r == row), len(ROWS) - 1)
        bound, cap, ds = m["bound"], m["xpar_capacity"], m["deepspeed"]
        parts = [
            _check(f"xpar/bound {cap / bound:.2f}x", cap / bound <= BOUND_TARGET[i],
                   f"<= {BOUND_TARGET[i]:.2f}x"),
            _check(f"DS/xpar {ds / cap:.2f}x", ds / cap >= DS_TARGET, f">= {DS_TARGET:.2f}x"),
        ]  # fmt: skip
        if id(row) in busy:
            b = busy[id(row)]
            r = b["xpar_capacity"] / b["bound"]
            parts.append(_check(f"contended xpar/bound {r:.2f}x", r <= CONTENDED_TARGET,
                                f"<= {CONTENDED_TARGET:.1f}x"))  # fmt: skip
        lines.append(f"  E={row.E} k={row.k} tokens={row.tokens}: " + "; ".join(parts))
    return "\n".join(lines)


def _check(figure: str, ok: bool, target: str) -> str:
    return f"{figure} ({'met' if ok else 'NOT met'}, target {target})"


def _format(
    table, world: int, device, dtype: str, busy: bool = False, memory: dict | None = None
) -> str:
    thr = torch.get_num_threads()
    state = "one core busy (--contended)" if busy else "quiet"
    mem_head = (
        " fwd kept MB | kept, recompute=experts | fwd+bwd peak MB | peak, recompute=experts |"
        if memory
        else ""
    )
    lines = [
        f"MoE layer fwd+bwd, {world} ranks, EP={world}, {device.type} {dtype}, "
        f"{thr} thread(s)/rank, capacity_factor={CAPACITY_FACTOR} (capacity rows), "
        f"median of rounds, {state}",
        "",
        "| E | k | d_model | d_ff | tokens/rank | xpar cap ms | xpar dropless ms | DeepSpeed ms "
        "| bound ms | xpar cap tok/s | DS tok/s | DS/xpar cap | xpar cap/bound | "
        f"xpar dropless/bound |{mem_head}",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (4 * bool(memory)),
    ]
    for row, m in table:
        cap, dl, ds, bd = (m["xpar_capacity"], m["xpar_dropless"], m["deepspeed"], m["bound"])
        mem = ""
        if memory:
            mem = "".join(f" {v / 2**20:.1f} |" for v in memory[id(row)])
        lines.append(
            f"| {row.E} | {row.k} | {row.d_model} | {row.d_ff} | {row.tokens} | {cap * 1e3:.1f} | "
            f"{dl * 1e3:.1f} | {ds * 1e3:.1f} | {bd * 1e3:.1f} | {row.tokens / cap:,.0f} | "
            f"{row.tokens / ds:,.0f} | {ds / cap:.2f}x | {cap / bd:.2f}x | {dl / bd:.2f}x |{mem}"
        )
    return "\n".join(lines)
