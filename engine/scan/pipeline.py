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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from engine import settings

T = TypeVar("T")
W = TypeVar("W")

_POLL_S = 0.1
PRODUCER_NAME = "explaind-pipeline-producer"


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


def producer_count(threads: tuple[int, int] | None) -> int:
    """Producer threads for a pipeline with ``threads`` (:func:`pipeline_threads`): the ``pipeline_producers``
    setting (1 without a pipeline)."""
    return 1 if threads is None else int(settings.get("pipeline_producers"))


def run_two_stage(
    items: Iterable[T],
    produce: Callable[[T], W] | Sequence[Callable[[T], W]],
    consume: Callable[[T, W], Any],
    threads: tuple[int, int] | None,
    *,
    ahead: int = 1,
) -> None:
    """``consume(item, produce(item))`` for every item in order; with ``threads`` (producer side, consumer torch
    threads), ``produce`` runs in other threads, each at most ``ahead`` of its items ahead of the one being
    consumed (so at most ``ahead + 1`` produced items per producer hold memory at once). An exception on any side
    stops all of them and is raised here.

    ``produce`` may be a list: one function per producer thread (each with its own model: ``functional_call``
    swaps a module's parameters in place, so two threads must not call one module). Of ``k`` producers, producer
    ``p`` takes items ``p, p + k, ...``, with ``threads[0] // k`` torch threads (at least one); the consumer
    still takes the results strictly in order. Without ``threads`` only the first function runs, here."""
    fns = list(produce) if isinstance(produce, Sequence) else [produce]
    if not fns:
        raise ValueError("run_two_stage needs at least one produce function")
    if threads is None:
        for it in items:
            consume(it, fns[0](it))
        return
    todo = list(items)
    k = len(fns)
    queues: list[queue.SimpleQueue[tuple[Any, Any]]] = [queue.SimpleQueue() for _ in range(k)]
    slots = [threading.Semaphore(max(1, ahead) + 1) for _ in range(k)]
    stop = threading.Event()

    def work(p: int) -> None:
        torch.set_num_threads(max(1, threads[0] // k))
        q, fn = queues[p], fns[p]
        try:
            for it in todo[p::k]:
                while not slots[p].acquire(timeout=_POLL_S):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                q.put((it, fn(it)))
            q.put((_DONE, None))
        except BaseException as e:  # noqa: BLE001  # handed to the consumer, which raises it
            q.put((_DONE, e))

    before = torch.get_num_threads()
    torch.set_num_threads(threads[1])
    workers = [threading.Thread(target=work, args=(p,), name=f"{PRODUCER_NAME}-{p}" if p else PRODUCER_NAME,
                                daemon=True) for p in range(k)]
    for w in workers:
        w.start()
    try:
        for i in range(len(todo)):
            o = i % k
            it, value = queues[o].get()
            if it is _DONE:
                if value is not None:
                    raise value
                raise RuntimeError("a pipeline producer stopped before its items were done")  # not reached
            consume(it, value)
            del it, value  # before the producer may start another item
            slots[o].release()
        for o in range(k):  # every producer's end mark (or its late error)
            it, value = queues[o].get()
            if value is not None:
                raise value
    finally:
        stop.set()
        for w in workers:
            w.join()
        torch.set_num_threads(before)


__all__ = ["PRODUCER_NAME", "pipeline_threads", "producer_count", "run_two_stage"]
