"""Peak memory of one call, measured: what the allocator really held above the start.

CUDA: torch.cuda's peak counter. CPU has no such counter, so the profiler records every
allocation and free of the call and the peak is read off their running sum. Costs a few
times the call's own time; for benchmarks and the planner's check, not for training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes allocated at the call's peak beyond those allocated when it started."""
    return memory_use(fn, device)[0]


def memory_use(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, int]:
    """(peak, kept): bytes allocated at the call's peak and when it returned, beyond those
    allocated when it started. Of a forward, `kept` is what it holds for backward (its
    output included, while the caller keeps it)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        use = torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated() - start
        del out
        return use
    return _cpu_use(fn)


def _cpu_use(fn: Callable[[], object]) -> tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()  # alive until the profile ends, so its bytes count as kept
    del out
    # Every allocation (+bytes) and free (-bytes) of the call, replayed in time order.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak, held
