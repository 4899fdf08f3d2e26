"""Peak extra CPU memory of a callable, from torch's profiler (tests and benchmarks of the fused ops).

torch's CPU tensors do not go through Python's allocator, so tracemalloc cannot see them; the profiler with
``profile_memory=True`` records every allocation (attributed to the op that made it) and every free. The running
sum of those, in time order, gives the peak bytes allocated above the level at the start of the call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_cpu_bytes"]


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated by ``fn()`` above what was allocated before it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return int(peak)


if __name__ == "__main__":  # pragma: no cover - a quick self-check
    print(peak_cpu_bytes(lambda: torch.empty(1 << 20)))
