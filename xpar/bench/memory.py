"""Peak memory of one call, measured: what the allocator really held above the start.

CUDA: torch.cuda's peak counter. CPU has no such counter, so the profiler records every
allocation and free of the call and the peak is read off its memory timeline (the
profiler's own memory model, the same one `export_memory_timeline` draws). Costs a few
times the call's own time; for benchmarks and the planner's check, not for training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes allocated at the call's peak beyond those allocated when it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    if not sizes:
        return 0
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]
