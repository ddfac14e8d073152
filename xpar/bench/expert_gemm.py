"""Expert GEMM benchmark: the experts' MLP forward+backward under each moe.expert_gemm way.

    python -m xpar.bench.expert_gemm [--threads 1] [--rounds 3] [--dtype float32]
                                     [--activation gelu]

What is measured: one ExpertMLP node (xpar.moe.expert_gemm) on the rows one EP rank's
experts get, forward then backward of a random upstream gradient, for each way (loop,
grouped, padded), at the shapes of the MoE benchmarks: E experts over P=2 ranks (e = E/P
local), `tokens` per rank, top-k, so R = tokens*k rows per rank. Counts are balanced
(R/e each) or skewed (a ramp from 0.5x to 1.5x the mean: what padding pays for).
Interleaved rounds (loop, grouped, padded, then again), the median per way; ratios are to
loop in the same run. Not a test: the numbers behind choose_expert_gemm's rule.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from xpar.moe.expert_gemm import GEMMS, ExpertMLP, How, choose_expert_gemm, grouped_unsupported

# (name, E, k, D, F, tokens per rank); P = 2 ranks.
SHAPES = (
    ("E8 k2 T4096", 8, 2, 256, 1024, 4096),
    ("E8 k2 T512", 8, 2, 256, 1024, 512),
    ("E32 k1 T4096", 32, 1, 256, 1024, 4096),
    ("E64 k2 T2048 fine", 64, 2, 128, 256, 2048),
)
RANKS = 2


def counts_for(rows: int, e: int, skewed: bool) -> list[int]:
    if not skewed or e == 1:
        return [rows // e + (i < rows % e) for i in range(e)]
    ramp = [0.5 + i / (e - 1) for i in range(e)]  # 0.5x .. 1.5x the mean
    counts = [int(rows * r / sum(ramp)) for r in ramp]
    counts[-1] += rows - sum(counts)
    return counts


def step_ms(gemm: str, x, counts, ws, g, activation: str) -> float:
    x = x.detach().requires_grad_(True)
    ws = [w.detach().requires_grad_(True) if w is not None else None for w in ws]
    t0 = time.perf_counter()
    out = ExpertMLP.apply(x, counts, How(activation, gemm), *ws)
    out.backward(g)
    return (time.perf_counter() - t0) * 1e3


def measure(shape, skewed: bool, rounds: int, dtype, activation: str) -> dict:
    _, E, k, D, F_, tokens = shape
    e, R = E // RANKS, tokens * k
    counts = counts_for(R, e, skewed)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(R, D, generator=gen).to(dtype)
    ws = [torch.randn(e, D, F_, generator=gen).to(dtype) * 0.02]
    ws.append(torch.randn(e, F_, D, generator=gen).to(dtype) * 0.02)
    ws.append(
        torch.randn(e, D, F_, generator=gen).to(dtype) * 0.02 if activation == "swiglu" else None
    )
    g = torch.randn(R, D, generator=gen).to(dtype)
    ways = [
        w for w in GEMMS if w != "grouped" or grouped_unsupported(x.device, dtype, D, F_) is None
    ]
    times = {w: [] for w in ways}
    for w in ways:  # warm-up
        step_ms(w, x, counts, ws, g, activation)
    for _ in range(rounds):
        for w in ways:
            times[w].append(step_ms(w, x, counts, ws, g, activation))
    ms = {w: statistics.median(t) for w, t in times.items()}
    auto = choose_expert_gemm(e, R, D, F_, x.device, dtype)
    return {"e": e, "rows_per_expert": R // e, "ms": ms, "auto": auto}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m xpar.bench expert_gemm", description=__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds; the median is reported (default: 3)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and rows (default: float32)")  # fmt: skip
    p.add_argument("--activation", default="gelu", help="expert activation (default: gelu)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"expert MLP fwd+bwd, {args.threads} thread(s), {args.dtype}, {args.activation}, "
        f"P={RANKS} ranks, median of {args.rounds} interleaved rounds"
    )
    head = f"{'shape':<20}{'counts':<10}{'e':>4}{'rows/e':>8}"
    head += "".join(f"{w + ' ms':>12}" for w in GEMMS)
    head += "".join(f"{w + '/loop':>14}" for w in GEMMS[1:]) + f"{'auto':>9}"
    print(head)
    for shape in SHAPES:
        for skewed in (False, True):
            r = measure(shape, skewed, args.rounds, dtype, args.activation)
            ms = r["ms"]
            line = f"{shape[0]:<20}{'skewed' if skewed else 'balanced':<10}{r['e']:>4}"
            line += f"{r['rows_per_expert']:>8}"
            line += "".join(f"{ms[w]:>12.1f}" if w in ms else f"{'n/a':>12}" for w in GEMMS)
            line += "".join(
                f"{ms[w] / ms['loop']:>14.2f}" if w in ms else f"{'n/a':>14}" for w in GEMMS[1:]
            )
            print(line + f"{r['auto']:>9}", flush=True)


if __name__ == "__main__":
    main()
