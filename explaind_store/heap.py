"""glibc heap tuning for the processes that record or analyse runs: keep freed memory in the heap instead of handing
it back to the OS and faulting it in again.

By default glibc maps large blocks freshly and trims a heap whose free top grows past a threshold (for the heap of a
thread other than the main one, with ``madvise``). A recording's writer thread frees a chunk's encoded buffers every
chunk, so its heap was trimmed and regrown all the time; each trim flushes the TLBs of every core running a thread of
the process, the training thread's included, and the pages fault in again. On the paper model that cost the training
thread 2.7 ms per 50 ms update (docs/benchmarks.md, "Recording overhead (issue 14)"). Kept heap memory is reused by
the next chunk; the process just keeps its peak. ``EXPLAIND_MALLOPT=0`` turns the tuning off (the engine's
``mallopt`` setting is the same variable).
"""

from __future__ import annotations

import ctypes
import os
import sys

MALLOPT_ENV = "EXPLAIND_MALLOPT"
OFF_VALUES = ("0", "false", "off", "no")
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8

_TUNED = {"heap": False, "one_arena": False}


def tuning_enabled() -> bool:
    """Whether ``$EXPLAIND_MALLOPT`` allows the tuning (anything but 0/false/off/no; unset: yes)."""
    return os.environ.get(MALLOPT_ENV, "1").strip().lower() not in OFF_VALUES


def keep_heap(*, one_arena: bool = False, enabled: bool | None = None) -> bool:
    """glibc only, once per process: serve allocations up to 1 GiB (32 MiB where glibc allows no more) from the heap
    and never trim it; with ``one_arena`` also one malloc arena for all threads (a thread of its own would keep a
    heap at its own peak). ``enabled``: the caller's setting (None: :func:`tuning_enabled`). Returns whether the
    heap is tuned."""
    if not sys.platform.startswith("linux") or not (tuning_enabled() if enabled is None else enabled):
        return _TUNED["heap"]
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not _TUNED["heap"]:
            _TUNED["heap"] = True
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) or bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 25))
            libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
            _TUNED["heap"] = ok
        if one_arena and not _TUNED["one_arena"]:
            _TUNED["one_arena"] = bool(libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc
        return False
    return _TUNED["heap"]


__all__ = ["MALLOPT_ENV", "OFF_VALUES", "keep_heap", "tuning_enabled"]
