"""MoE layer benchmark: xpar (capacity and dropless) vs DeepSpeed's MoE vs the bound.

    torchrun --nproc-per-node 2 -m xpar.bench moe [--rounds 5] [--iters 3] [--device cuda --dtype bf16]
    python -m xpar.bench moe --help      (every option, and the rows)

The bound is this rank's routed rows (T*k) pushed through ONE dense expert MLP
as a single matrix: the expert FLOPs with no routing, permutation or
communication. Candidates run interleaved in rounds in the same processes; the
median forward+backward time per step is reported, with ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

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


class _DenseMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_model, d_ff) * 0.02)
        self.w2 = nn.Parameter(torch.randn(d_ff, d_model) * 0.02)

    def forward(self, x):
        return expert_mlp(x, self.w1, self.w2, None, "gelu")


class _DSExpert(nn.Module):
    """The same expert MLP shape, as DeepSpeed's MoE wants an nn.Module per expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=False)
        self.fc2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _build(row: Row, world: int, device, dtype):
    cands = {}
    for name, cf in (("xpar_capacity", CAPACITY_FACTOR), ("xpar_dropless", None)):
        cfg = MoEConfig(
            num_experts=row.E, top_k=row.k, d_ff=row.d_ff, capacity_factor=cf, activation="gelu"
        )
        layer = MoELayer(row.d_model, cfg, ep_group=None).to(device=device, dtype=dtype)
        cands[name] = lambda x, m=layer: m(x)[0]
    from deepspeed.moe.layer import MoE

    ds = MoE(
        hidden_size=row.d_model,
        expert=_DSExpert(row.d_model, row.d_ff),
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


def _time(fn, x, iters: int, device) -> float:
    def step():
        x.grad = None
        y = fn(x)
        y.float().sum().backward()

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
    return ap


def require_torchrun() -> None:
    """Exit 2 with one line naming the fix unless torchrun (or srun) started this process."""
    # Checked before deepspeed is imported: outside torchrun it fails on mpi4py, far from here.
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return
    print(
        f"{PROG} needs torchrun (one process per rank; WORLD_SIZE and RANK are not set): "
        "torchrun --standalone --nproc-per-node 2 -m xpar.bench moe [options], "
        "or bash launch/dev.sh bench [options]",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("RANK", "0") != "0" and {"-h", "--help"} & set(argv):
        raise SystemExit(0)  # under torchrun: rank 0 prints the help, once
    args = _parser().parse_args(argv)
    require_torchrun()
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
    rows = args.rows
    order = ["xpar_capacity", "xpar_dropless", "deepspeed", "bound"]
    table = []
    for row in rows:
        torch.manual_seed(1234 + rank)
        cands = _build(row, world, device, dtype)
        x = torch.randn(row.tokens, row.d_model, device=device, dtype=dtype, requires_grad=True)
        times: dict[str, list[float]] = {n: [] for n in order}
        for _ in range(args.rounds):
            for n in order:
                times[n].append(_time(cands[n], x, args.iters, device))
        med = {n: statistics.median(v) for n, v in times.items()}
        # Report the slowest rank: a step is only done when every rank is.
        t = torch.tensor([med[n] for n in order], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        med = dict(zip(order, t.tolist(), strict=True))
        table.append((row, med))
    if rank == 0:
        print(_format(table, world, device, args.dtype), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _format(table, world: int, device, dtype: str) -> str:
    thr = torch.get_num_threads()
    lines = [
        f"MoE layer fwd+bwd, {world} ranks, EP={world}, {device.type} {dtype}, "
        f"{thr} thread(s)/rank, capacity_factor={CAPACITY_FACTOR} (capacity rows), median of rounds",
        "",
        "| E | k | d_model | d_ff | tokens/rank | xpar cap ms | xpar dropless ms | DeepSpeed ms "
        "| bound ms | xpar cap tok/s | DS tok/s | DS/xpar cap | xpar cap/bound | xpar dropless/bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, m in table:
        cap, dl, ds, bd = (m["xpar_capacity"], m["xpar_dropless"], m["deepspeed"], m["bound"])
        lines.append(
            f"| {row.E} | {row.k} | {row.d_model} | {row.d_ff} | {row.tokens} | {cap * 1e3:.1f} | "
            f"{dl * 1e3:.1f} | {ds * 1e3:.1f} | {bd * 1e3:.1f} | {row.tokens / cap:,.0f} | "
            f"{row.tokens / ds:,.0f} | {ds / cap:.2f}x | {cap / bd:.2f}x | {dl / bd:.2f}x |"
        )
    return "\n".join(lines)
