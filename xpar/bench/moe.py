"""MoE layer benchmark: xpar (capacity and dropless) vs DeepSpeed's MoE vs the bound.

    torchrun --nproc-per-node 2 -m xpar.bench moe [--rounds 5] [--iters 3] [--device cuda --dtype bf16]

The bound is this rank's routed rows (T*k) pushed through ONE dense expert MLP
as a single matrix: the expert FLOPs with no routing, permutation or
communication. Candidates run interleaved in rounds in the same processes; the
median forward+backward time per step is reported, with ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m xpar.bench moe")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rows", default="", help="comma-separated row indices (default: all)")
    args = ap.parse_args(argv)

    import deepspeed

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = ROWS if not args.rows else [ROWS[int(i)] for i in args.rows.split(",")]
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
