"""Progress in updates decomposed, reported from inside the tasks.

A task-count bar misleads on this workload: a few chunk tasks hold nearly all the work and hundreds of small tasks
(carries, blocks, writes) finish in a blink around them, so such a bar sat at 1% for minutes and then jumped, with
an ETA of hours. Pass 2 instead calls :func:`tick` after each update it decomposes; whoever runs the tasks decides
where the ticks go (:func:`reporting`): a tqdm bar in this process (the synchronous scheduler), or, in a Dask
worker, events on a topic the caller's client subscribes to (:class:`EventSink`). Nothing is reported when no sink
is set, so the scan itself knows nothing of bars or schedulers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

Sink = Callable[[int], None]

_SINK: ContextVar[Sink | None] = ContextVar("explaind_progress_sink", default=None)
UNIT = "update"


def topic(call: str) -> str:
    """The Dask event topic of one call's progress (one per call: a client keeps one handler per topic, and
    calls may run side by side)."""
    return f"explaind-progress-{call}"


def tick(n: int = 1) -> None:
    """Report ``n`` more updates decomposed (a no-op unless a sink is set for this thread's context)."""
    sink = _SINK.get()
    if sink is not None:
        sink(n)


@contextmanager
def reporting(sink: Sink | None) -> Iterator[None]:
    """Send the ticks of the code run inside to ``sink`` (None: keep whatever sink is set)."""
    if sink is None:
        yield
        return
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def active() -> bool:
    """Whether ticks go anywhere (the caller asked for progress)."""
    return _SINK.get() is not None


class EventSink:
    """Ticks batched into messages ``{"n": count}`` handed to ``send`` at most every ``interval`` seconds (and by
    :meth:`flush`): a Dask worker's ``log_event`` costs a message to the scheduler, too much per update."""

    def __init__(self, send: Callable[[dict[str, Any]], None], interval: float = 0.5) -> None:
        self._send = send
        self._interval = interval
        self._pending = 0
        self._last = time.monotonic()

    def __call__(self, n: int) -> None:
        self._pending += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._pending:
            n, self._pending = self._pending, 0
            self._send({"n": n})
        self._last = time.monotonic() if now is None else now


def bar(total: int, desc: str) -> Any:
    """The tqdm bar the runners show: updates decomposed out of ``total``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=UNIT, leave=False, mininterval=0.5)


__all__ = ["EventSink", "UNIT", "active", "bar", "reporting", "tick", "topic"]
