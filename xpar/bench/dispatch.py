"""Expert-parallel exchange: counts vs padded, and comm_chunks 1/2/4, on the MoE layer.

`torchrun --standalone --nproc-per-node 2 -m xpar.bench dispatch [--iters 10]`

For each benchmark shape, every arm (moe.exchange x moe.comm_chunks, capacity factor
1.25) runs the layer's forward + backward on the same tokens; arms are interleaved
round by round and the median per arm is printed (ms, rank 0), with the ratio to
counts/1 chunk measured in the same run. Then two figures behind choose_exchange: one
small all_to_all (what the count exchange costs) and the all_to_all bandwidth, so
"a count exchange costs as much as N bytes of padding" is their product.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from xpar.bench.torchrun import help_on_other_ranks, require_torchrun
from xpar.moe import MoEConfig, MoELayer

# (name, E, k, D, F, tokens per rank)
SHAPES = [
    ("E8k2_T4096", 8, 2, 256, 1024, 4096),
    ("E8k2_T512", 8, 2, 256, 1024, 512),
    ("E32k1_T4096", 32, 1, 256, 1024, 4096),
    ("E64k2_T2048", 64, 2, 128, 256, 2048),
]
ARMS = [("counts", 1), ("counts", 2), ("counts", 4), ("padded", 1), ("padded", 2), ("padded", 4)]


def _layer(E, k, D, F, exchange, chunks, cf):
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=E, top_k=k, d_ff=F, capacity_factor=cf, exchange=exchange, comm_chunks=chunks
    )
    return MoELayer(D, cfg)


def _step(layer, x):
    y, aux = layer(x)
    (y.float().square().mean() + aux.loss).backward()


def _time_shape(shape, iters, cf, rounds_warm=2):
    _, E, k, D, F, T = shape
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1 + dist.get_rank()))
    x.requires_grad_(True)
    layers = {arm: _layer(E, k, D, F, *arm, cf) for arm in ARMS}
    times = {arm: [] for arm in ARMS}
    for r in range(rounds_warm + iters):
        for arm, layer in layers.items():
            dist.barrier()
            t0 = time.perf_counter()
            _step(layer, x)
            dist.barrier()
            if r >= rounds_warm:
                times[arm].append(time.perf_counter() - t0)
    pad = layers[("padded", 1)].dispatcher.traffic
    cnt = layers[("counts", 1)].dispatcher.traffic
    calls = max(pad.calls, 1)
    return {a: statistics.median(v) * 1e3 for a, v in times.items()}, (
        pad.pad_bytes_sent / calls,
        cnt.bytes_sent / max(cnt.calls, 1),
    )


def _a2a_figures(iters=50):
    """(ms of a [P, 10] int64 all_to_all, bytes/s of a 4 MiB-per-rank all_to_all)."""
    P = dist.get_world_size()
    small = torch.zeros(P, 10, dtype=torch.long)
    out = torch.empty_like(small)
    big = torch.zeros(P * (4 << 20) // 4)
    big_out = torch.empty_like(big)
    res = []
    for t_in, t_out in ((small, out), (big, big_out)):
        ts = []
        for _ in range(iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(t_out, t_in)
            ts.append(time.perf_counter() - t0)
        res.append(statistics.median(ts))
    nbytes = big.numel() * 4 * (P - 1) / P
    return res[0] * 1e3, nbytes / res[1]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xpar.bench dispatch", description=__doc__)
    ap.add_argument("--iters", type=int, default=10,
                    help="timed steps per arm and shape; the median is reported (default: 10)")  # fmt: skip
    ap.add_argument("--capacity-factor", type=float, default=1.25,
                    help="the capacity factor of the routed rows (default: 1.25)")  # fmt: skip
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    argv = list(sys.argv[1:] if argv is None else argv)
    help_on_other_ranks(argv)
    args = ap.parse_args(argv)
    require_torchrun(ap.prog, "dispatch")
    torch.set_num_threads(int(os.environ.get("XPAR_BENCH_THREADS", "1")))
    dist.init_process_group("gloo")
    rank0 = dist.get_rank() == 0
    wanted = set(filter(None, args.shapes.split(",")))
    if rank0:
        head = "  ".join(f"{ex:>7}/{n}{'':<5}" for ex, n in ARMS)
        print(f"{dist.get_world_size()} gloo ranks, cf={args.capacity_factor}, fwd+bwd ms (median)")
        print(f"{'shape':<13} {head}  pad MB/call  rows MB/call")
    for shape in SHAPES:
        if wanted and shape[0] not in wanted:
            continue
        ms, (pad_b, row_b) = _time_shape(shape, args.iters, args.capacity_factor)
        if rank0:
            base = ms[("counts", 1)]
            cells = "  ".join(f"{ms[a]:>7.1f}({ms[a] / base:4.2f})" for a in ARMS)
            print(f"{shape[0]:<13} {cells}  {pad_b / 2**20:>11.2f}  {row_b / 2**20:>12.2f}")
    lat_ms, bw = _a2a_figures()
    if rank0:
        print(
            f"small all_to_all {lat_ms:.3f} ms; all_to_all {bw / 2**30:.2f} GiB/s; "
            f"a count exchange ~ {lat_ms * 1e-3 * bw / 2**10:.0f} KiB of padding"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
