"""Attention benchmark: every registered variant vs dense, forward+backward time and peak memory.

    python -m xpar.bench attention [--lengths 1024,2048,4096,8192,16384] [--repeats 3]
    python -m xpar.bench attention --quick          (L = 256, 512; one round: the test's run)
    python -m xpar.bench attention --model          (the experiment=tiny model, L = 256..2048)
    python -m xpar.bench attention --report outputs/bench/attention.json   (reprint, replot)
    python -m xpar.bench attention --help           (every option)

What is measured: ONE attention layer (B=1, 8 heads, head dim 64; fp32 on CPU, bf16 with
--device cuda): the variant's forward on q, k, v (requires_grad) then the backward of a random
upstream gradient, with the variant's default options (conf/attention/<name>.yaml, with the
benchmark's L for ${model.max_seq_len}). --model measures the whole experiment=tiny
MoETransformer with each attention instead (fwd+bwd of one batch of LM loss).

Tables: by default a causal (decoder) table of every variant that can be causal, and a
non-causal (encoder) table of the variants that cannot (linformer), each against dense run
the same way; --non-causal runs every variant non-causal in one table. Dense is SDPA: on CPU
torch picks its flash-attention kernel for fp32 too (no L x L score matrix, O(L) memory, the
causal half skipped), so dense's memory is linear in L here and the memory targets are held
to that; the header also gives what an L x L score matrix would hold.

Method: every (variant, L) measurement runs in a fresh process (forked from a server that
imported torch and xpar once, so each starts at the same memory), in interleaved rounds:
at each L, dense, v1, v2, ... then again, the median of the rounds is reported. In a process:
one warm-up step, then timed steps until --min-time-s (a warm-up longer than --long-step-s is
the one sample: first-call costs are noise at that size). Peak memory is the rise of the
process's peak RSS (ru_maxrss, its high-water mark reset when the inputs are allocated) over
those steps on CPU, torch.cuda.max_memory_allocated above the inputs on CUDA. A measurement
predicted (from the smaller L) to exceed --max-mem-gb or --max-step-s is skipped and the table
says so (dense is only ever skipped for memory: it is every ratio's 1.00); the process also
runs under an address-space limit of --max-mem-gb beyond its start. Sub-quadratic is what the
class declares: a `subquadratic` class flag, else its flops_per_token growing slower than
L^0.9 per token (SUBQUADRATIC_GROWTH).

Printed, like Long Range Arena's efficiency table: per variant and L the time (ms) and
speed-up dense/variant, peak memory (MB) and variant/dense, the growth per doubling of L, the
achieved GFLOP/s (3x the declared forward flops_per_token) against a matmul measured here, and
a verdict per target (TARGETS, MEMORY_RULE). Written to --out (JSON) and the same name .png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xpar.models.attention import attention_names, get_attention

PROG = "python -m xpar.bench attention"
BATCH, HEADS, HEAD_DIM = 1, 8, 64
LENGTHS = (1024, 2048, 4096, 8192, 16384)
MODEL_LENGTHS = (256, 512, 1024, 2048)
QUICK_LENGTHS = (256, 512)
QUICK_MODEL_LENGTHS = QUICK_LENGTHS
DENSE = "dense"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SEED = 1234
# Imported once by the process server: torch's backward with an explicit gradient imports
# sympy (2 s, tens of MB) on first use, which would land in every measurement.
PRELOAD = ("xpar.bench.attention", "torch.fx.experimental.symbolic_shapes")
_GB = 2**30
# Per-token forward flops growth over 4x the length below which a variant is sub-quadratic.
SUBQUADRATIC_GROWTH = 4**0.9


@dataclass(frozen=True)
class Target:
    """dense_ms / variant_ms at the top L reaches min_speedup (strictly above it when strict),
    and, when max_growth is set, the time grows at most that much per doubling of L over the
    last two doublings (top/4 -> top, the geometric mean)."""

    min_speedup: float
    strict: bool = False
    max_growth: float | None = None

    def describe(self) -> str:
        if self.strict:
            text = f"faster than dense (speed-up > {self.min_speedup:g}x)"
        else:
            text = f"speed-up >= {self.min_speedup:g}x over dense"
        if self.max_growth is not None:
            text += f" and time growth <= {self.max_growth:g}x per doubling"
        return text


# Issue 12's targets, at L = 16384 (the top of --lengths: at another top they are indicative).
LINEAR_TIME = Target(4.0, max_growth=2.3)
BEATS_DENSE = Target(1.0, strict=True)
TARGETS: dict[str, Target] = {
    "sliding_window": LINEAR_TIME,
    "linear": LINEAR_TIME,
    "performer": LINEAR_TIME,
    "linformer": LINEAR_TIME,
    "lsh": BEATS_DENSE,
    "routing": BEATS_DENSE,
    "sinkhorn": BEATS_DENSE,
}
MEMORY_RULE = "peak memory below dense's"  # for every variant that declares itself sub-quadratic


# --------------------------------------------------------------------------- the variants


def variant_options(
    name: str, seq_len: int, conf_dir: Path = CONF_DIR
) -> tuple[dict[str, Any], list[str]]:
    """The variant's default attention_options from conf/attention/<name>.yaml at this L.

    Interpolations see model.max_seq_len = seq_len, n_heads, d_model and head_dim of the
    benchmark; an option whose interpolation still does not resolve is left to the Options
    default, and said so in the notes."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = conf_dir / "attention" / f"{name}.yaml"
    if not path.is_file():
        return {}, [f"no conf/attention/{name}.yaml: the Options defaults"]
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    model = {"max_seq_len": seq_len, "n_heads": HEADS, "d_model": HEADS * HEAD_DIM}
    model.update({k: v for k, v in node.items() if k not in model})
    root = OmegaConf.create({"model": model, "head_dim": HEAD_DIM})
    opts_node = root.model.get("attention_options") or {}
    opts, notes = {}, []
    for key in list(opts_node.keys()):
        try:
            value = opts_node[key]
            opts[str(key)] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except OmegaConfBaseException as e:
            notes.append(f"attention_options.{key} left at its default ({type(e).__name__})")
    return opts, notes


def model_config_for(name: str, seq_len: int, causal: bool, options: dict[str, Any]):
    """The ModelConfig of the benchmarked layer (validates the variant's options at this L)."""
    from xpar.models.config import ModelConfig

    return ModelConfig(
        vocab_size=1,
        d_model=HEADS * HEAD_DIM,
        n_heads=HEADS,
        max_seq_len=seq_len,
        attention=name,
        attention_options=dict(options),
        causal=causal,
    )


def declared_subquadratic(name: str, options_at: dict[int, Any] | None = None) -> bool:
    """The class's own `subquadratic` flag if it has one, else from its declared cost: forward
    flops_per_token grows less than 4**0.9 (3.5x) from L=4096 to 16384, i.e. the layer's
    cost grows slower than L^1.9 (dense's per-token cost grows 4x: L^2)."""
    cls = get_attention(name)
    flag = getattr(cls, "subquadratic", None)
    if flag is not None:
        return bool(flag)
    options_at = options_at or {}
    default = cls.Options()
    lo, hi = 4096, 16384
    d = HEADS * HEAD_DIM
    f_lo = cls.flops_per_token(lo, d, options_at.get(lo, default))
    f_hi = cls.flops_per_token(hi, d, options_at.get(hi, default))
    return f_hi < SUBQUADRATIC_GROWTH * f_lo


# --------------------------------------------------------------------------- one measurement
# Runs in a fresh process (_child); returns a plain dict.


class _PeakMemory:
    """Peak memory of what runs between start() and peak(), in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:  # Linux: reset the high-water mark to the current RSS ("5": peak RSS only)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # elsewhere the baseline is the high-water mark so far: a lower bound
        self.base = _maxrss_bytes()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _maxrss_bytes() - self.base


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _limit_address_space(max_bytes: int) -> None:
    """Refuse allocations beyond max_bytes more than now (CPU: torch raises a RuntimeError)."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            vm_now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return
    slack = 2 * _GB  # thread stacks and malloc arenas are address space too
    limit = vm_now + max_bytes + slack
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _layer_step(spec: dict, device: torch.device, dtype: torch.dtype):
    L, causal = spec["L"], spec["causal"]
    cfg = model_config_for(spec["name"], L, causal, spec["options"])
    kernel = get_attention(spec["name"])(HEADS, HEAD_DIM, cfg.attention_opts())
    kernel = kernel.to(device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(spec["seed"])
    shape = (BATCH, HEADS, L, HEAD_DIM)
    q_BHLK, k_BHLK, v_BHLK, g_BHLK = (
        torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4)
    )
    inputs = [t.requires_grad_(True) for t in (q_BHLK, k_BHLK, v_BHLK)]

    def step() -> None:
        for t in inputs:
            t.grad = None
        kernel.zero_grad(set_to_none=True)
        kernel(*inputs, causal=causal).backward(g_BHLK)

    return step


def _model_step(spec: dict, device: torch.device, dtype: torch.dtype):
    import torch.nn.functional as F

    from xpar.models.transformer import MoETransformer

    model_cfg, moe_cfg, batch = spec["model_cfg"], spec["moe_cfg"], spec["batch"]
    torch.manual_seed(spec["seed"])
    model = MoETransformer(model_cfg, moe_cfg).to(device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(spec["seed"])
    V = model_cfg.vocab_size
    tokens_BL = torch.randint(V, (batch, spec["L"]), generator=gen).to(device)
    targets_BL = torch.randint(V, (batch, spec["L"]), generator=gen).to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits_BLV, aux_list = model(tokens_BL)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten())
        loss = loss + sum(a.loss for a in aux_list)
        loss.backward()

    return step


def measure(spec: dict) -> dict:
    """Time (median over steps, ms) and peak memory (MB) of one fwd+bwd, in this process."""
    for module in spec.get("imports", ()):
        importlib.import_module(module)
    device = torch.device(spec["device"])
    dtype = _dtype(spec["dtype"])
    if device.type == "cpu" and spec.get("max_mem_bytes"):
        _limit_address_space(spec["max_mem_bytes"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    mem = _PeakMemory(device)
    build = _model_step if spec["kind"] == "model" else _layer_step
    step = build(spec, device, dtype)
    mem.start()  # after the inputs (and the module's parameters) exist
    modules = len(sys.modules)
    t0 = time.perf_counter()
    step()
    sync()
    warmup_s = time.perf_counter() - t0
    lazy_imports = len(sys.modules) - modules  # their memory is in the peak: said so
    times: list[float] = []
    if warmup_s >= spec["long_step_s"]:
        times.append(warmup_s)
    else:
        budget_end = time.perf_counter() + spec["min_time_s"]
        while not times or (time.perf_counter() < budget_end and len(times) < 50):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    return {
        "status": "ok",
        "ms": statistics.median(times) * 1e3,
        "steps": len(times),
        "warmup_ms": warmup_s * 1e3,
        "peak_mb": max(mem.peak(), 0) / 2**20,
        "threads": torch.get_num_threads(),
        "lazy_imports": lazy_imports,
    }


def _child(spec: dict, conn) -> None:
    try:
        result = measure(spec)
    except (RuntimeError, MemoryError) as e:
        text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        over = "allocate" in text or isinstance(e, MemoryError)
        result = {"status": "over_mem" if over else "failed", "reason": text}
    except Exception as e:  # a variant's own error: reported in the table, not a crash
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    conn.send(result)
    conn.close()


class _Runner:
    """Starts each measurement in a fresh process forked from one preloaded server."""

    def __init__(self, imports: Sequence[str]) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([*PRELOAD, *imports])
        from multiprocessing import forkserver

        forkserver.ensure_running()  # it imports torch while this process gets on

    def run(self, spec: dict, timeout_s: float) -> dict:
        recv, send = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_child, args=(spec, send), daemon=True)
        p.start()
        send.close()
        try:
            if recv.poll(timeout_s):
                return recv.recv()
            p.kill()
            return {"status": "timeout", "reason": f"no result within {timeout_s:.0f} s"}
        except EOFError:
            p.join()
            code = p.exitcode
            why = " (killed: likely out of memory)" if code == -9 else ""
            return {"status": "failed", "reason": f"the process died, exit code {code}{why}"}
        finally:
            p.join(10)
            recv.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Cand:
    """One line of a table: a variant, run causal or not."""

    table: str  # "causal" or "non-causal"
    name: str
    causal: bool


def plan_tables(names: Sequence[str], non_causal: bool) -> dict[str, list[str]]:
    """Table -> variants, dense first. Default: the causal table holds every variant that can
    be causal; the non-causal table (dense + the encoder-only variants) exists when some
    cannot. --non-causal: one non-causal table of every variant."""
    others = [n for n in names if n != DENSE]
    if non_causal:
        return {"non-causal": [DENSE, *others]}
    tables = {"causal": [DENSE, *[n for n in others if get_attention(n).causal_ok]]}
    encoder_only = [n for n in others if not get_attention(n).causal_ok]
    if encoder_only:
        tables["non-causal"] = [DENSE, *encoder_only]
    return tables


def _predict(prev: list[float], floor: float, ceiling: float) -> float | None:
    """The next doubling's value from the last two: their growth, clamped to [floor, ceiling]."""
    if not prev:
        return None
    growth = prev[-1] / prev[-2] if len(prev) >= 2 and prev[-2] > 0 else floor
    return prev[-1] * min(max(growth, floor), ceiling)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _peak_flops(device: torch.device) -> tuple[float, str]:
    from xpar.train.mfu import PEAK_FLOPS_ENV, measure_matmul_flops, peak_flops

    if os.environ.get(PEAK_FLOPS_ENV) or device.type == "cuda":
        src = PEAK_FLOPS_ENV if os.environ.get(PEAK_FLOPS_ENV) else "datasheet bf16 / measured"
        return peak_flops(device), src
    # Measured fresh (not the cached one): the best of this run's rounds is kept.
    return measure_matmul_flops.__wrapped__(str(device)), "fp32 1024^3 matmul, measured here"


def _sdpa_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The SDPA backend torch picks here for this benchmark's dense call: what dense costs
    (FLASH_ATTENTION on CPU: torch's flash kernel, no L x L score matrix, O(L) memory)."""
    from torch.nn.attention import SDPBackend

    q = torch.zeros(BATCH, HEADS, 128, HEAD_DIM, device=device, dtype=dtype)
    try:
        choice = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
    except (AttributeError, RuntimeError, ValueError) as e:  # a private API: say so, go on
        return f"unknown ({type(e).__name__})"
    where = {"FLASH_ATTENTION": "flash attention", "MATH": "math path: an L x L score matrix"}
    return f"SDPBackend.{choice}" + (f" ({where[choice]})" if choice in where else "")


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    for module in args.imports:
        importlib.import_module(module)
    names = _selected(args.variants)
    tables = plan_tables(names, args.non_causal)
    cands = [Cand(t, n, t == "causal") for t, ns in tables.items() for n in ns]
    lengths = sorted(args.lengths)
    kind = "model" if args.model else "layer"
    load_before = os.getloadavg()
    header = {
        "benchmark": "attention",
        "kind": kind,
        "device": str(device),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "lengths": lengths,
        "repeats": args.repeats,
        "quick": args.quick,
        "max_mem_gb": args.max_mem_gb,
        "max_step_s": args.max_step_s,
        "min_time_s": args.min_time_s,
        "long_step_s": args.long_step_s,
        "load_before": load_before,
        "sdpa_kernel": _sdpa_kernel(device, _dtype(dtype_name)),
    }
    if kind == "layer":
        header.update(batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)
    runner = _Runner(args.imports)
    info = {(c.table, c.name): _variant_info(c, lengths, kind) for c in cands}
    cells, peaks, peak_src = _measure_all(
        runner, cands, lengths, info, args, device, dtype_name, kind
    )
    result = dict(header)
    result["load_after"] = os.getloadavg()
    result["peak_flops"] = max(peaks) if peaks else None
    result["peak_flops_source"] = peak_src
    result["tables"] = [
        _table(t, ns, info, cells, result["peak_flops"], kind) for t, ns in tables.items()
    ]
    return result


def _measure_all(runner, cands, lengths, info, args, device, dtype_name: str, kind: str):
    """Interleaved: at each L, every candidate once per round. Returns cells, peaks, source."""
    cells: dict[tuple[str, str], dict[int, dict]] = {(c.table, c.name): {} for c in cands}
    peaks: list[float] = []
    peak_src = ""
    timeout_s = 4 * args.max_step_s + 120
    for L in lengths:
        for r in range(args.repeats):
            p, peak_src = _peak_flops(device)
            peaks.append(p)
            for c in cands:
                key = (c.table, c.name)
                if L not in cells[key]:
                    cells[key][L] = _first_look(c, L, cells[key], info[key], args)
                cell = cells[key][L]
                if cell["status"] != "ok":
                    continue
                spec = _spec(c, L, info[key], args, device, dtype_name, kind)
                t0 = time.perf_counter()
                res = runner.run(spec, timeout_s if c.name != DENSE else 10 * timeout_s)
                _progress(c, L, r, args.repeats, res, time.perf_counter() - t0)
                if res["status"] != "ok":
                    cell.update(status=res["status"], reason=res.get("reason", ""))
                    continue
                for field in ("ms", "peak_mb", "steps", "warmup_ms"):
                    cell.setdefault(f"{field}_rounds", []).append(res[field])
                cell["threads"] = res["threads"]
                if res["lazy_imports"]:
                    cell["lazy_imports"] = res["lazy_imports"]
    return cells, peaks, peak_src


def _table(t: str, names, info, cells, peak_flops, kind: str) -> dict:
    table = {"name": t, "causal": t == "causal", "variants": {}}
    for n in names:
        v = {k: x for k, x in info[(t, n)].items() if k != "models"}
        v["cells"] = {}
        for L, cell in cells[(t, n)].items():
            cell = dict(cell)
            cell["ms"] = _median(cell.get("ms_rounds", []))
            cell["peak_mb"] = _median(cell.get("peak_mb_rounds", []))
            v["cells"][L] = cell
        table["variants"][n] = v
    summarize(table, peak_flops, kind)
    if kind == "layer":
        table["verdicts"] = judge(table)
    return table


def _selected(text: str | None) -> list[str]:
    names = list(attention_names())
    if not text:
        return names
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise SystemExit(
            f"{PROG}: --variants names {unknown[0]!r}, which is not a registered attention; "
            f"choose from {', '.join(names)}"
        )
    return [DENSE, *[n for n in chosen if n != DENSE]]


def _variant_info(c: Cand, lengths: Sequence[int], kind: str) -> dict:
    """Options per L (or why the variant refuses that L), its declarations and its target."""
    from xpar.config.checks import build_options
    from xpar.errors import XparConfigError

    cls = get_attention(c.name)
    options, refused, notes, typed, models = {}, {}, [], {}, {}
    for L in sorted({*lengths, 4096, 16384}):
        opts, why = variant_options(c.name, L)
        notes.extend(n for n in why if n not in notes)
        try:
            typed[L] = build_options(cls.Options, opts, "model.attention_options")
            if L in lengths:
                options[L] = opts
                if kind == "model":  # refused or not by the tiny model's own config
                    models[L] = _tiny_model(c.name, L, c.causal)
                else:
                    model_config_for(c.name, L, c.causal, opts)
        except XparConfigError as e:
            if L in lengths:
                refused[L] = str(e)
                options.pop(L, None)
    return {
        "options": options,
        "refused": refused,
        "notes": notes,
        "exact": bool(cls.exact),
        "causal_ok": bool(cls.causal_ok),
        "subquadratic": c.name != DENSE and declared_subquadratic(c.name, typed),
        "target": TARGETS.get(c.name).describe() if c.name in TARGETS else None,
        "flops_per_token": {
            L: float(cls.flops_per_token(L, HEADS * HEAD_DIM, typed[L])) for L in options
        },
        "kind": kind,
        "models": models,
    }


def _first_look(c: Cand, L: int, done: dict[int, dict], info: dict, args) -> dict:
    """A new cell: refused by the config, skipped (predicted too big or slow, or the smaller
    L already failed), or to be run."""
    if L in info["refused"]:
        return {"status": "refused", "reason": info["refused"][L]}
    smaller = [done[s] for s in sorted(done) if s < L]
    if smaller and smaller[-1]["status"] in ("skipped", "over_mem", "timeout", "failed"):
        s = max(x for x in done if x < L)
        return {"status": "skipped", "reason": f"not run: at L={s} it was {smaller[-1]['status']}"}
    ok = [x for x in smaller if x["status"] == "ok" and x.get("ms_rounds")]
    mem = _predict([_median(x["peak_mb_rounds"]) for x in ok], 2.0, 4.0)
    if mem is not None and mem / 1024 > args.max_mem_gb:
        why = f"predicted {mem / 1024:.1f} GB peak > --max-mem-gb {args.max_mem_gb:g}"
        return {"status": "skipped", "reason": why}
    ms = _predict([_median(x["ms_rounds"]) for x in ok], 2.0, 4.5)
    if ms is not None and ms / 1e3 > args.max_step_s and c.name != DENSE:  # dense: the 1.00
        why = f"predicted {ms / 1e3:.0f} s a step > --max-step-s {args.max_step_s:g}"
        return {"status": "skipped", "reason": why}
    return {"status": "ok"}


def _spec(c: Cand, L: int, info: dict, args, device, dtype_name: str, kind: str) -> dict:
    spec = {
        "kind": kind,
        "name": c.name,
        "L": L,
        "causal": c.causal,
        "options": info["options"][L],
        "device": str(device),
        "dtype": dtype_name,
        "seed": SEED + L,
        "min_time_s": args.min_time_s,
        "long_step_s": args.long_step_s,
        "max_mem_bytes": int(args.max_mem_gb * _GB),
        "imports": list(args.imports),
    }
    if kind == "model":
        cfg = info["models"][L]
        spec.update(model_cfg=cfg.model, moe_cfg=cfg.moe, batch=cfg.train.micro_batch_size)
    return spec


def _tiny_model(name: str, L: int, causal: bool):
    """experiment=tiny's model with this attention (its conf/attention yaml when it has one)."""
    from xpar.config.store import compose_config

    pick = (
        f"attention={name}"
        if (CONF_DIR / "attention" / f"{name}.yaml").is_file()
        else (f"model.attention={name}")
    )
    return compose_config(
        [
            "experiment=tiny",
            pick,
            "model.vocab_size=512",
            f"model.max_seq_len={L}",
            f"data.seq_len={L}",
            f"model.causal={str(causal).lower()}",
        ],
        world_size=1,
    )


def _progress(c: Cand, L: int, r: int, repeats: int, res: dict, wall_s: float) -> None:
    what = (
        f"{res['ms']:.1f} ms, {res['peak_mb']:.1f} MB, {res['steps']} step(s)"
        if res["status"] == "ok"
        else f"{res['status']}: {res.get('reason', '')}"
    )
    print(
        f"attention: L={L} round {r + 1}/{repeats} {c.name} ({c.table}): {what} [{wall_s:.1f} s]",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------- analysis (pure)


def growth_per_doubling(ms_by_L: dict[int, float | None]) -> dict[str, float]:
    """'L->2L': time(2L) / time(L), for each doubling where both were measured."""
    out = {}
    for L in sorted(ms_by_L):
        a, b = ms_by_L.get(L), ms_by_L.get(2 * L)
        if a and b:
            out[f"{L}->{2 * L}"] = b / a
    return out


def mean_growth(ms_by_L: dict[int, float | None], top: int) -> tuple[float | None, int | None]:
    """Geometric-mean growth per doubling from top/4 (or the smallest measured L above it) to
    top, and that starting L; (None, None) with fewer than two measured lengths."""
    measured = sorted(L for L, ms in ms_by_L.items() if ms and L <= top)
    if top not in measured or len(measured) < 2:
        return None, None
    lo = next((L for L in measured if L >= top // 4), None)
    if lo is None or lo == top:
        lo = measured[-2]
    doublings = math.log2(top / lo)
    return (ms_by_L[top] / ms_by_L[lo]) ** (1 / doublings), lo


def summarize(table: dict, peak_flops: float | None, kind: str = "layer") -> None:
    """Adds to each cell speed-up (dense/variant), mem_ratio (variant/dense), GFLOP/s and the
    fraction of the peak; to each variant its growth per doubling."""
    dense = table["variants"][DENSE]["cells"]
    for v in table["variants"].values():
        for L, cell in v["cells"].items():
            d = dense.get(L, {})
            ms, dms = cell.get("ms"), d.get("ms")
            cell["speedup"] = dms / ms if ms and dms else None
            mb, dmb = cell.get("peak_mb"), d.get("peak_mb")
            cell["mem_ratio"] = mb / dmb if mb is not None and dmb else None
            fpt = v.get("flops_per_token", {}).get(L)
            if kind == "layer" and ms and fpt:
                gflops = 3 * fpt * BATCH * L / (ms / 1e3) / 1e9
                cell["gflops"] = gflops
                cell["of_peak"] = gflops * 1e9 / peak_flops if peak_flops else None
        v["growth"] = growth_per_doubling({L: c.get("ms") for L, c in v["cells"].items()})


def judge(table: dict, at: int | None = None) -> list[dict]:
    """Each target of each variant in the table: met True/False, or None when not measured.

    table["variants"][name] has "target" (a TARGETS key's description or None: looked up by
    name here), "subquadratic" and "cells" {L: {"ms", "peak_mb"}}; at: the L judged (default
    the largest in the table)."""
    variants = table["variants"]
    dense = variants[DENSE]["cells"]
    at = at or max(L for v in variants.values() for L in v["cells"])
    out = []
    for name, v in variants.items():
        if name == DENSE:
            continue
        cells = v["cells"]
        ms = {L: c.get("ms") for L, c in cells.items()}
        target = TARGETS.get(name)
        if target is not None:
            out.append(_judge_time(name, table, target, ms, dense, at))
        if v.get("subquadratic"):
            out.append(_judge_memory(name, table, cells, dense, at))
    return out


def _judge_time(name, table, target: Target, ms, dense, at) -> dict:
    row = {"variant": name, "table": table["name"], "target": target.describe(), "at": at}
    v_ms, d_ms = ms.get(at), dense.get(at, {}).get("ms")
    if not v_ms or not d_ms:
        who = "the variant" if not v_ms else "dense"
        return {**row, "met": None, "measured": f"{who} not measured at L={at}"}
    speedup = d_ms / v_ms
    met = speedup > target.min_speedup if target.strict else speedup >= target.min_speedup
    measured = f"{speedup:.2f}x"
    if target.max_growth is not None:
        growth, lo = mean_growth(ms, at)
        if growth is None:
            return {**row, "met": None, "measured": f"{measured}; growth: one length only"}
        met = met and growth <= target.max_growth
        measured += f", {growth:.2f}x per doubling {lo}->{at}"
    return {**row, "met": bool(met), "measured": measured}


def _judge_memory(name, table, cells, dense, at) -> dict:
    row = {"variant": name, "table": table["name"], "target": MEMORY_RULE, "at": at}
    mb, dmb = cells.get(at, {}).get("peak_mb"), dense.get(at, {}).get("peak_mb")
    if mb is None or dmb is None:
        who = "the variant" if mb is None else "dense"
        return {**row, "met": None, "measured": f"{who} not measured at L={at}"}
    return {**row, "met": mb < dmb, "measured": f"{mb:.1f} MB vs dense {dmb:.1f} MB"}


# --------------------------------------------------------------------------- output


def _size(nbytes: float) -> str:
    return f"{nbytes / _GB:.1f} GB" if nbytes >= _GB else f"{nbytes / 2**20:.1f} MB"


def _k(L: int) -> str:
    return f"{L // 1024}k" if L % 1024 == 0 else str(L)


def format_result(result: dict) -> str:
    lengths = result["lengths"]
    what = (
        f"one attention layer, B={BATCH} H={HEADS} K={HEAD_DIM}"
        if result["kind"] == "layer"
        else "the experiment=tiny MoETransformer, one batch of LM loss"
    )
    load = ", ".join(f"{x:.2f}" for x in result["load_before"])
    lines = [
        f"Attention fwd+bwd: {what}; {result['device']} {result['dtype']}, "
        f"{result['threads']} thread(s), torch {result['torch']}; median of "
        f"{result['repeats']} interleaved round(s), a fresh process per measurement",
        f"load average before: {load}; after: "
        + ", ".join(f"{x:.2f}" for x in result["load_after"]),
        f"dense = SDPA, here {result['sdpa_kernel']}",
    ]
    if result["kind"] == "layer":
        top = max(lengths)
        nbytes = {"fp32": 4, "bf16": 2}[result["dtype"]]
        held = get_attention(DENSE).memory_per_token(top, HEADS, None) * top * BATCH * nbytes
        lines.append(
            f"dense's declared scores (H x L x L, what SDPA's math path holds): "
            f"{_size(held)} at L={top}; the measured peak below is what this kernel holds"
        )
    if result.get("peak_flops"):
        lines.append(
            f"peak: {result['peak_flops'] / 1e9:.1f} GFLOP/s ({result['peak_flops_source']})"
        )
    notes: list[str] = []
    for table in result["tables"]:
        lines += _format_table(table, lengths, result, notes)
    lines.append("")
    lines.append(
        "* sub-quadratic by its declared flops_per_token; dense's declared flops count the full "
        "L x L product (causal kernels skip half), so dense's causal GFLOP/s reads 2x its work."
    )
    if len({*notes}) > 0:
        lines.append("notes:")
        lines += [f"- {x}" for x in dict.fromkeys(notes)]
    if result["tables"] and result["tables"][0].get("verdicts") is not None:
        if max(lengths) != 16384:
            lines.append(
                f"- the targets are stated at L=16384; judged here at L={max(lengths)}, "
                "indicative only"
            )
    return "\n".join(lines)


def _format_table(table: dict, lengths, result: dict, notes: list[str]) -> list[str]:
    lines: list[str] = []
    vs = table["variants"]
    cols = " | ".join(_k(L) for L in lengths)
    sep = "|---" * (len(lengths) + 1)
    lines += ["", f"## {table['name']} ({'decoder' if table['causal'] else 'encoder'})", ""]
    pairs = [(L, 2 * L) for L in lengths if 2 * L in lengths][-2:]
    heads = "".join(f" x {_k(a)}->{_k(b)} |" for a, b in pairs)
    lines += [
        "time ms (speed-up = dense / variant, higher is faster; x: growth per doubling)",
        f"| variant | {cols} |{heads}",
        sep + "|---" * len(pairs) + "|",
    ]
    for n, v in vs.items():
        row = [_time_cell(v["cells"].get(L), notes, n, L) for L in lengths]
        g = v.get("growth", {})
        row += [f"{g[f'{a}->{b}']:.2f}" if f"{a}->{b}" in g else "-" for a, b in pairs]
        lines.append(f"| {_label(n, v)} | " + " | ".join(row) + " |")
    lines += ["", "peak memory MB (ratio = variant / dense)", f"| variant | {cols} |", sep + "|"]
    for n, v in vs.items():
        row = [_mem_cell(v["cells"].get(L)) for L in lengths]
        lines.append(f"| {_label(n, v)} | " + " | ".join(row) + " |")
    if result["kind"] == "layer" and result.get("peak_flops"):
        lines += [
            "",
            "achieved GFLOP/s (3x the declared forward flops_per_token) and its fraction of "
            "the peak",
            f"| variant | {cols} |",
            sep + "|",
        ]
        for n, v in vs.items():
            row = [_flops_cell(v["cells"].get(L)) for L in lengths]
            lines.append(f"| {n} | " + " | ".join(row) + " |")
    if table.get("verdicts"):
        lines += ["", "| variant | target | at L | measured | met |", "|---|---|---|---|---|"]
        for vd in table["verdicts"]:
            met = {True: "yes", False: "NO", None: "n/a"}[vd["met"]]
            lines.append(
                f"| {vd['variant']} | {vd['target']} | {vd['at']} | {vd['measured']} | {met} |"
            )
    for n, v in vs.items():
        notes.extend(f"{n}: {x}" for x in v.get("notes", []))
    return lines


def _label(n: str, v: dict) -> str:
    return f"{n}*" if v.get("subquadratic") else n


def _time_cell(cell: dict | None, notes: list[str], name: str, L: int) -> str:
    if not cell:
        return "-"
    if cell["status"] != "ok":
        notes.append(f"{name} at L={L}: {cell['status']}: {cell.get('reason', '')}")
    if cell.get("lazy_imports"):
        notes.append(
            f"{name} at L={L}: its first step imported {cell['lazy_imports']} module(s), "
            "counted in its peak memory"
        )
    if cell.get("ms") is None:
        return cell["status"]
    sp = cell.get("speedup")
    return f"{cell['ms']:.1f} ({sp:.2f}x)" if sp else f"{cell['ms']:.1f}"


def _mem_cell(cell: dict | None) -> str:
    if not cell or cell.get("peak_mb") is None:
        return "-" if not cell else cell["status"]
    r = cell.get("mem_ratio")
    return f"{cell['peak_mb']:.1f} ({r:.2f})" if r is not None else f"{cell['peak_mb']:.1f}"


def _flops_cell(cell: dict | None) -> str:
    if not cell or cell.get("gflops") is None:
        return "-"
    frac = cell.get("of_peak")
    return f"{cell['gflops']:.1f} ({frac:.0%})" if frac is not None else f"{cell['gflops']:.1f}"


def to_json(result: dict) -> dict:
    """JSON-safe: integer L keys become strings."""

    def conv(x):
        if isinstance(x, dict):
            return {str(k): conv(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [conv(v) for v in x]
        return x

    return conv(result)


def from_json(data: dict) -> dict:
    """A result read back from its JSON: length keys as integers again (for --report)."""
    for table in data["tables"]:
        for v in table["variants"].values():
            for key in ("cells", "options", "refused", "flops_per_token"):
                v[key] = {int(L): x for L, x in v.get(key, {}).items()}
    return data


def write_plot(result: dict, path: Path) -> Path | None:
    """Time vs L, log-log, one line per variant, a panel per table. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: matplotlib is not installed, no plot written", file=sys.stderr)
        return None
    tables = result["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(6.4 * len(tables), 4.4), squeeze=False)
    for ax, table in zip(axes[0], tables, strict=True):
        for i, (n, v) in enumerate(table["variants"].items()):
            pts = sorted((L, c["ms"]) for L, c in v["cells"].items() if c.get("ms"))
            if pts:
                xs, ys = zip(*pts, strict=True)
                style = "-" if n == DENSE else "--" if not v.get("subquadratic") else "-"
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=n, linewidth=1.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["lengths"], [_k(L) for L in result["lengths"]])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_title(f"{table['name']}: {result['device']} {result['dtype']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    what = "one layer B=1 H=8 K=64" if result["kind"] == "layer" else "tiny model"
    fig.suptitle(f"attention fwd+bwd vs L ({what})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- CLI


def _lengths(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of lengths"
        ) from None
    if not out or any(L < 16 for L in out):
        raise argparse.ArgumentTypeError(f"{text!r}: give lengths >= 16, e.g. 1024,2048,4096")
    return out


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    targets = "\n".join(f"  {n:<15} {t.describe()}" for n, t in TARGETS.items())
    ap = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Forward+backward time and peak memory of every registered attention\n"
        "variant vs dense, interleaved in rounds, a fresh process per measurement.\n"
        "Default: a causal table (every variant that can be causal) and a non-causal\n"
        "table (dense and the encoder-only variants, e.g. linformer).",
        epilog=f"targets at L=16384 (vs dense in the same table):\n{targets}\n"
        f"  every sub-quadratic variant: {MEMORY_RULE}\n\n"
        "examples:\n"
        f"  {PROG}\n  {PROG} --quick\n  {PROG} --lengths 4096,8192 --variants linear,performer\n"
        f"  {PROG} --model\n  {PROG} --device cuda",
    )
    ap.add_argument("--lengths", type=_lengths, default=None, metavar="L,L,...",
                    help=f"sequence lengths (default: {','.join(map(str, LENGTHS))}; with "
                    f"--model {','.join(map(str, MODEL_LENGTHS))})")  # fmt: skip
    ap.add_argument("--repeats", type=_positive(int), default=3,
                    help="interleaved rounds; the median is reported (default: 3)")  # fmt: skip
    ap.add_argument("--variants", default=None, metavar="NAME,...",
                    help="only these registered variants, with dense (default: every one)")  # fmt: skip
    ap.add_argument("--non-causal", action="store_true",
                    help="one non-causal (encoder) table of every variant, instead of the causal "
                    "table plus the encoder-only variants' table")  # fmt: skip
    ap.add_argument("--model", action="store_true",
                    help="measure the whole experiment=tiny MoETransformer with each attention "
                    "(one batch, LM loss) instead of one layer")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help=f"L={','.join(map(str, QUICK_LENGTHS))} (--model: "
                    f"{','.join(map(str, QUICK_MODEL_LENGTHS))}), one round, short timing: a "
                    "smoke run")  # fmt: skip
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where to run (default: cpu)")  # fmt: skip
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                    help="default: fp32 on cpu, bf16 on cuda")  # fmt: skip
    ap.add_argument("--max-mem-gb", type=_positive(float), default=16.0,
                    help="skip a measurement predicted to need more, and limit each process's "
                    "address space to this much beyond its start (default: 16)")  # fmt: skip
    ap.add_argument("--max-step-s", type=_positive(float), default=300.0,
                    help="skip a variant's measurement predicted to take longer a step; dense "
                    "is always run (default: 300)")  # fmt: skip
    ap.add_argument("--min-time-s", type=_positive(float), default=None,
                    help="timed steps per measurement until this long (default: 1; --quick 0.05)")  # fmt: skip
    ap.add_argument("--long-step-s", type=_positive(float), default=None,
                    help="a warm-up step this long is the one sample (default: 5; --quick 0.2)")  # fmt: skip
    ap.add_argument("--out", default="outputs/bench/attention.json",
                    help="the JSON written (the plot: same name, .png) "
                    "(default: outputs/bench/attention.json)")  # fmt: skip
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="measure nothing: print the table of an earlier run's JSON and write "
                    "its plot beside it")  # fmt: skip
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE first: a module of your own that registers more "
                    "attention variants (repeatable)")  # fmt: skip
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.report:
        result = from_json(json.loads(Path(args.report).read_text()))
        print(format_result(result), flush=True)
        png = write_plot(result, Path(args.report).with_suffix(".png"))
        print(f"written: {png}" if png else "", flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        raise SystemExit(2)
    if args.lengths is None:
        if args.quick:
            args.lengths = QUICK_MODEL_LENGTHS if args.model else QUICK_LENGTHS
        else:
            args.lengths = MODEL_LENGTHS if args.model else LENGTHS
    if args.quick:
        args.repeats = 1
    if args.min_time_s is None:
        args.min_time_s = 0.05 if args.quick else 1.0
    if args.long_step_s is None:
        args.long_step_s = 0.2 if args.quick else 5.0
    result = run(args)
    print(format_result(result), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(result), indent=1) + "\n")
    png = write_plot(result, out.with_suffix(".png"))
    print(f"written: {out}" + (f", {png}" if png else ""), flush=True)


if __name__ == "__main__":
    main()
