"""Two-stage pipelining of a chunk's updates over two threads of one process.

Pass 2 does two kinds of work per update: the ``torch.func`` transforms (the path integral ``phi_s`` and the batch's
per-sample gradients, which depend only on the stored parameters) and the plain tensor ops that chain the updates
(the reverse accumulator ``U``, the per-sample dot products, the scalars). :func:`run_two_stage` runs the first kind
for update ``s-1`` in a producer thread while the calling thread does the second kind for update ``s``.

Why threads rather than more torch threads: on small models the transforms are bound by Python and dispatch
overhead, which a second intra-op thread does not split, so two one-thread stages side by side beat one stage
with two torch threads (numbers: docs/benchmarks.md).

Safety: every ``torch.func`` transform runs in the producer thread only (torch keeps the transform stack per
thread, but forward-mode AD is not thread-safe); the consumer runs plain tensor ops on tensors the producer no
longer touches. ``torch.set_num_threads`` is per thread (OpenMP), so each side gets its own thread count.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from engine import settings

T = TypeVar("T")
W = TypeVar("W")

_POLL_S = 0.1


def pipeline_threads(device: str, threads: int | None = None) -> tuple[int, int] | None:
    """Torch threads for (producer, consumer) when the calling thread's ``threads`` (default: its current torch
    thread count) are split over a two-stage pipeline; None when it should run in one thread (fewer than 2 torch
    threads, a GPU device, or the ``pipeline`` setting off: ``EXPLAIND_PIPELINE=0``)."""
    n = torch.get_num_threads() if threads is None else int(threads)
    if not settings.get("pipeline") or device != "cpu" or n < 2:
        return None
    return n - n // 2, n // 2


class _Done:
    pass


_DONE = _Done()


def run_two_stage(
    items: Iterable[T],
    produce: Callable[[T], W],
    consume: Callable[[T, W], Any],
    threads: tuple[int, int] | None,
    *,
    ahead: int = 1,
) -> None:
    """``consume(item, produce(item))`` for every item in order; with ``threads`` (producer, consumer torch
    threads), ``produce`` runs in a second thread, at most ``ahead`` items ahead of the one being consumed (so at
    most ``ahead + 1`` produced items hold memory at once). An exception on either side stops both and is raised
    here."""
    if threads is None:
        for it in items:
            consume(it, produce(it))
        return
    q: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
    slots = threading.Semaphore(max(1, ahead) + 1)
    stop = threading.Event()

    def work() -> None:
        torch.set_num_threads(threads[0])
        try:
            for it in items:
                while not slots.acquire(timeout=_POLL_S):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                q.put((it, produce(it)))
            q.put((_DONE, None))
        except BaseException as e:  # noqa: BLE001  # handed to the consumer, which raises it
            q.put((_DONE, e))

    before = torch.get_num_threads()
    torch.set_num_threads(threads[1])
    producer = threading.Thread(target=work, name="explaind-pipeline-producer", daemon=True)
    producer.start()
    try:
        while True:
            it, value = q.get()
            if it is _DONE:
                if value is not None:
                    raise value
                return
            consume(it, value)
            del it, value  # before the producer may start another item
            slots.release()
    finally:
        stop.set()
        producer.join()
        torch.set_num_threads(before)


__all__ = ["pipeline_threads", "run_two_stage"]
