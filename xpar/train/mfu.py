"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peak is, in order: the XPAR_PEAK_FLOPS override, the datasheet bf16 peak of a known GPU,
or a matmul measured once on the device (so CPU MFU is a fraction of what this CPU reaches).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

from xpar.errors import XparConfigError

__all__ = ["PEAK_FLOPS_BF16", "PEAK_FLOPS_ENV", "measure_matmul_flops", "mfu", "peak_flops"]

# Dense (no 2:4 sparsity) bf16 tensor-core peaks per device from the vendor datasheets.
# Matched as case-insensitive substrings of the device name, first hit wins, so the more
# specific names come first ("H100 PCIe" before "H100", "L40S" before "L4").
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16 tensor cores; V100 has no bf16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]

PEAK_FLOPS_ENV = "XPAR_PEAK_FLOPS"


def _table_peak(name: str) -> float | None:
    low = name.lower()
    for pattern, flops in PEAK_FLOPS_BF16:
        if pattern.lower() in low:
            return flops
    return None


@functools.lru_cache(maxsize=8)
def measure_matmul_flops(device: str = "cpu", n: int = 0, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of one n x n matmul (fp32 on CPU, bf16 on GPU).

    Cached per process: measured once, at startup. n=0 picks 1024 on CPU, 8192 on GPU."""
    import torch

    dev = torch.device(device)
    on_cpu = dev.type == "cpu"
    n = n or (1024 if on_cpu else 8192)
    dtype = torch.float32 if on_cpu else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dev, dtype)
    b = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dev, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.matmul(a, b)  # warm-up: allocator, kernel selection
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def _env_peak() -> float | None:
    env = os.environ.get(PEAK_FLOPS_ENV, "").strip()
    if not env:
        return None
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise XparConfigError(
            f"{PEAK_FLOPS_ENV}={env!r} is invalid: give peak FLOP/s per device as a "
            "positive number, e.g. 989e12"
        )
    return value


def peak_flops(device: Any = None) -> float:
    """Peak FLOP/s of one device, the denominator of MFU.

    In order: the env override XPAR_PEAK_FLOPS (e.g. "989e12"); for a GPU whose name is
    in PEAK_FLOPS_BF16, its dense bf16 datasheet peak; otherwise a measurement: the best
    rate of a large matmul on that device, taken once at startup (fp32 1024^3 on CPU,
    bf16 8192^3 on GPU). So CPU MFU reads as "fraction of what this CPU reaches on a big
    fp32 GEMM", not of a theoretical peak.

    device: None (the current CUDA device if there is one, else CPU), "cpu", "cuda",
    "cuda:1" or a torch.device."""
    env = _env_peak()
    if env is not None:
        return env
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        known = _table_peak(torch.cuda.get_device_name(dev))
        if known is not None:
            return known
    return measure_matmul_flops(str(dev))


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over peak, per device.

    flops_per_token counts forward + backward (about 3x the forward FLOPs) for the *active*
    parameters only (top-k experts, not all of them)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0")
    return flops_per_token * tokens_per_s_per_device / peak_flops
