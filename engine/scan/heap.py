"""glibc heap tuning for the scan's processes: keep freed memory, one malloc arena for all threads
(:func:`explaind_store.heap.keep_heap`, governed here by the engine's ``mallopt`` setting)."""

from __future__ import annotations

from engine import settings
from explaind_store import heap


def keep_heap() -> bool:
    """glibc only: serve allocations up to 1 GiB from the heap and keep freed memory there.

    Every update allocates fresh ``R x P`` tensors (the Jacobians); by default glibc maps each one over 32 MiB
    freshly and returns it on free, so every update page-faults all of it again (the path integrals of the larger
    benchmark model run several times slower; docs/benchmarks.md). Peak memory is unchanged (freed blocks are
    reused); the process just keeps its peak. Also one malloc arena for all threads: pass 2's producer thread
    (:mod:`engine.scan.pipeline`) would otherwise keep a heap of its own at its own peak. Once per process; the
    ``mallopt`` setting (``EXPLAIND_MALLOPT=0``) turns it off.
    """
    return heap.keep_heap(one_arena=True, enabled=settings.get("mallopt"))


__all__ = ["keep_heap"]
