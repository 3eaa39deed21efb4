"""Progress counts updates decomposed, from inside the tasks: in this process under the synchronous scheduler, as
Dask events from the workers otherwise (a task-count bar sat at 1% for minutes on the demo, then jumped)."""

from __future__ import annotations

from typing import Any

import pytest

import engine
from engine import progress


def _bars(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The bars attribute() opens (real tqdm bars), with every increment they got."""
    made: list[Any] = []
    real = progress.bar

    def spy(total: int, desc: str) -> Any:
        b = real(total, desc)
        b.steps = []
        inner = b.update

        def update(n: int = 1) -> Any:
            b.steps.append(n)
            return inner(n)

        b.update = update
        made.append(b)
        return b

    monkeypatch.setattr(progress, "bar", spy)
    return made


def test_pass_2_ticks_once_per_update_and_query_group(digits_store):
    ticks: list[int] = []
    with progress.reporting(ticks.append):
        ds = engine.attribute(digits_store, queries="val[:3]", by="sample,step", steps=(2, 9), client="sync",
                              progress=False)
    assert sum(ticks) == ds.attrs["query_groups"] * 7 and set(ticks) == {1}
    assert not progress.active()  # the sink ends with the block


def test_the_synchronous_bar_counts_updates(digits_store, monkeypatch):
    bars = _bars(monkeypatch)
    engine.attribute(digits_store, queries="val[:3]", by="sample", client="sync", progress=True)
    (bar,) = bars
    assert bar.unit == "update" and bar.total == 12
    assert bar.steps[:12] == [1] * 12  # one tick per update, before any fill at the end


def test_workers_report_updates_as_events_the_bar_follows(digits_store, cluster, monkeypatch):
    bars = _bars(monkeypatch)
    before = set(cluster.get_events())
    ds = engine.attribute(digits_store, queries="val[:3]", by="sample,step", client=cluster, progress=True)
    topics = [t for t in cluster.get_events() if t not in before and str(t).startswith("explaind-progress-")]
    assert len(topics) == 1, topics  # one topic per call
    sent = sum(msg["n"] for _, msg in cluster.get_events(topics[0]))
    total = ds.attrs["query_groups"] * 12
    assert sent == total  # every update of every query group, reported by the workers
    (bar,) = bars
    assert bar.total == total and bar.n == total and sum(bar.steps) == total
