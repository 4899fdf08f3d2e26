"""Peak extra CPU memory of a callable (tests and benchmarks of the fused ops).

torch's CPU tensors do not go through Python's allocator, so tracemalloc cannot see them, and the profiler's
memory records are per op, net of the frees inside it (a chunked loop inside one autograd function then looks
like one allocation). This measures the resident-set size instead: glibc is told to serve every allocation of
>= 256 KiB by mmap (so a freed tensor leaves the RSS at once), and a thread samples /proc/self/statm every
0.2 ms while ``fn`` runs. Tensors are written when computed, so their pages are resident; short-lived buffers
that live < 0.2 ms may be missed (figures are a slight under-estimate for both sides of a comparison).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable

__all__ = ["force_mmap_for_large_allocations", "peak_cpu_bytes"]


def force_mmap_for_large_allocations() -> None:
    """glibc: allocations >= 256 KiB always via mmap, so freed buffers leave the RSS (measurable peaks)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (fixing it also disables the dynamic threshold)
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


class _RssPeak:
    """Peak resident-set growth (bytes) while the context is open, sampled by a background thread."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.base = self.peak = 0

    def _rss(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0002)

    def __enter__(self) -> _RssPeak:
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        os.close(self._fd)


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak resident bytes above the level at the start of ``fn()`` (see the module doc)."""
    force_mmap_for_large_allocations()
    with _RssPeak() as probe:
        fn()
    return max(0, probe.peak - probe.base)
