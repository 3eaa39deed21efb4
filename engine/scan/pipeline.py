"""Two-stage pipelining of a chunk's updates over threads of one process.

Pass 2 does two kinds of work per update: the ``torch.func`` transforms (the path integral ``phi_s`` and the batch's
per-sample gradients, which depend only on the stored parameters) and the plain tensor ops that chain the updates
(the reverse accumulator ``U``, the per-sample dot products, the scalars). :func:`run_two_stage` runs the first kind
for later updates in a producer thread while the calling thread does the second kind for update ``s``, in order.

Why threads rather than more torch threads: on small models the transforms are bound by Python and dispatch
overhead, which a second intra-op thread does not split, so two one-thread stages side by side beat one stage
with two torch threads (numbers: docs/benchmarks.md).

Balance: on models whose transforms cost more than the consumer's work (a per-head transformer: about twice) the
producer is the bottleneck and the consumer waits. The calling thread then *helps*: instead of waiting for an
update a producer is still working on, it takes the next unstarted update's transforms itself (``helper``, the
``pipeline_help`` setting), so both threads stay busy and the thread count stays the budget's. More producer
threads (the ``pipeline_producers`` setting) are possible but cost CPU: the transforms hold the GIL between
their many small torch calls, and three threads handing it over on two cores cost more CPU seconds than the
third thread saved (numbers: docs/benchmarks.md).

Safety: each thread that produces has its own model (``functional_call`` swaps a module's parameters in place
while it runs, so two threads must not call one module; see ``Context.twins``); torch keeps the ``torch.func``
transform stack per thread; forward-mode AD is process-wide, so every ``jvp`` goes through the lock in
:mod:`engine.ops.forward_mode`; the consumer's plain tensor ops touch tensors no producer holds any more.
``torch.set_num_threads`` is per thread (OpenMP), so each side gets its own thread count, and producer work runs
with the producer's count in whichever thread takes it (the numbers do not depend on which thread did).
"""

from __future__ import annotations

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
    helper: Callable[[T], W] | None = None,
) -> None:
    """``consume(item, produce(item))`` for every item in order. With ``threads`` (producer side, consumer torch
    threads) ``produce`` runs in other threads, taking the items in turn, at most ``ahead + 1`` produced or
    started items per producer thread (one more with ``helper``) ahead of the one being consumed (bounded memory).
    With ``helper`` (the same work as ``produce`` on objects of its own) the calling thread, instead of waiting for
    an item a producer is still working on, takes the next unstarted item itself, so a producer side slower than
    the consumer gets the consumer's spare time. Results are consumed strictly in order; an exception on any side
    stops all of them and is raised here.

    ``produce`` may be a list: one function per producer thread. Each producer thread, and the caller when it
    helps, must have its own model (``functional_call`` swaps a module's parameters in place, so two threads must
    not call one module). Producer work runs with ``threads[0] // k`` torch threads for ``k`` producers (at least
    one), in whichever thread takes it, so the numbers do not depend on who took an item. Without ``threads``
    only the first function runs, here."""
    fns = list(produce) if isinstance(produce, Sequence) else [produce]
    if not fns:
        raise ValueError("run_two_stage needs at least one produce function")
    if threads is None:
        for it in items:
            consume(it, fns[0](it))
        return
    todo = list(items)
    n, k = len(todo), len(fns)
    per_producer = max(1, threads[0] // k)
    # items started but not yet consumed; the one the caller helps with is extra, so that the producers do not
    # stall behind it (they would: the caller consumes nothing while it produces)
    limit = k * (max(1, ahead) + 1) + (helper is not None)
    cond = threading.Condition()
    done: dict[int, tuple[bool, Any]] = {}  # item index -> (ok, value or exception)
    state = {"next": 0, "consumed": 0, "stop": False}

    def claim(bound: int) -> int | None:  # under cond: the next unstarted item, if within the bound
        i = state["next"]
        if i >= n or i - state["consumed"] >= bound:
            return None
        state["next"] = i + 1
        return i

    def run(fn: Callable[[T], W], i: int) -> None:  # not under cond
        try:
            result: tuple[bool, Any] = (True, fn(todo[i]))
        except BaseException as e:  # noqa: BLE001  # handed to the consumer, which raises it
            result = (False, e)
        with cond:
            done[i] = result
            cond.notify_all()

    def work(p: int) -> None:
        torch.set_num_threads(per_producer)
        while True:
            with cond:
                while not state["stop"] and (i := claim(limit)) is None:
                    if state["next"] >= n:
                        return
                    cond.wait(_POLL_S)
                if state["stop"]:
                    return
            run(fns[p], i)

    def help_with(i: int) -> None:
        if per_producer == threads[1]:
            run(helper, i)
            return
        torch.set_num_threads(per_producer)
        try:
            run(helper, i)
        finally:
            torch.set_num_threads(threads[1])

    before = torch.get_num_threads()
    torch.set_num_threads(threads[1])
    workers = [threading.Thread(target=work, args=(p,), name=f"{PRODUCER_NAME}-{p}" if p else PRODUCER_NAME,
                                daemon=True) for p in range(k)]
    for w in workers:
        w.start()
    try:
        for i in range(n):
            while True:
                with cond:
                    if i in done:
                        ok, value = done.pop(i)
                        break
                    j = claim(limit) if helper is not None else None
                    if j is None:
                        cond.wait(_POLL_S)
                        continue
                help_with(j)  # item i is not ready: take the next unstarted one (maybe i) here meanwhile
            if not ok:
                raise value
            consume(todo[i], value)
            del value  # before a producer may start another item
            with cond:
                state["consumed"] = i + 1
                cond.notify_all()
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for w in workers:
            w.join()
        torch.set_num_threads(before)


__all__ = ["PRODUCER_NAME", "pipeline_threads", "producer_count", "run_two_stage"]
