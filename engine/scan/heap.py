"""glibc heap tuning for the scan's processes: keep freed memory, one malloc arena for all threads."""

from __future__ import annotations

import ctypes
import sys

from engine import settings

_HEAP_TUNED = False


def keep_heap() -> bool:
    """glibc only: serve allocations up to 1 GiB from the heap and keep freed memory there.

    Every update allocates fresh ``R x P`` tensors (the Jacobians); by default glibc maps each one over 32 MiB
    freshly and returns it on free, so every update page-faults all of it again (the path integrals of the larger
    benchmark model run several times slower; docs/benchmarks.md). Peak memory is unchanged (freed blocks are
    reused); the process just keeps its peak. Also one malloc arena for all threads: pass 2's producer thread
    (:mod:`engine.scan.pipeline`) would otherwise keep a heap of its own at its own peak. Once per process; the
    ``mallopt`` setting (``EXPLAIND_MALLOPT=0``) turns it off.
    """
    global _HEAP_TUNED
    if _HEAP_TUNED or not sys.platform.startswith("linux") or not settings.get("mallopt"):
        return _HEAP_TUNED
    _HEAP_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        ok = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) or bool(libc.mallopt(m_mmap_threshold, 1 << 25))
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        libc.mallopt(m_arena_max, 1)
        return ok
    except (OSError, AttributeError):  # not glibc
        return False


__all__ = ["keep_heap"]
