"""The reverse chain's carries are chains of small tasks: whatever the number of chunks, at most two chunks' carries
(the momentum folded so far and the one being folded) are alive at once, the forward momentum goes through a Zarr
scratch store bit for bit, and the scores do not change (issue 14: worker memory flat in the number of updates)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import zarr
from dask.callbacks import Callback
from tests.support.compare import assert_results_close

import engine
from engine import plan
from engine.cluster import graph as engine_graph
from engine.cluster.worker import make_job
from engine.scan import Context, Problem, attribute_local, result_meta
from engine.scan.problem import context
from explaind_store import open_run

# every task result that holds one or more chunks' carries or pass-1 totals (today's keys and the old ones)
_CARRY_KEY = re.compile(r"^explaind-(pass1|summary|momentum|carries|carry)-")


def _count(key: object, value: object) -> int:
    return len(value) if str(key).startswith("explaind-carries-") else 1  # type: ignore[arg-type]


def compute_counting_carries(thunk):
    """``thunk()`` under the synchronous scheduler, and the most chunk carries its cache held at once."""
    peak = [0]

    def post(key, result, dsk, state, worker_id):
        cache = state["cache"]
        peak[0] = max(peak[0], sum(_count(k, v) for k, v in cache.items() if _CARRY_KEY.match(str(k))))

    with Callback(posttask=post):
        out = thunk()
    return out, peak[0]


def test_chain_holds_two_chunks_carries_and_spills_the_momentum_exactly(digits_store, tmp_path):
    run = open_run(digits_store)
    x, y = run.split("val")
    problem = Problem(x[:1], y[:1], by=frozenset({"step", "tensor"}), window=(0, 12))
    meta = result_meta(run, problem, Context(run, problem))
    bounds = plan.plan_chunks((0, 12), store_chunk=run.chunk_updates)  # 6 chunks of 2 updates
    assert len(bounds) == 6
    scratch = tmp_path / "scratch"

    def lazy(scratch_at):
        job = make_job(run, problem, by_reference=True)
        return job, engine_graph.lazy_result(job, meta, bounds, keep_u=False, chain=True, scratch=scratch_at)

    job, spilled = lazy(scratch)
    graph = dict(spilled.__dask_graph__())
    # no task takes more than one chunk's carries (today's code had one task taking all six summaries)
    for key, task in graph.items():
        deps = [d for d in getattr(task, "dependencies", ()) if _CARRY_KEY.match(str(d))]
        assert len(deps) <= 1, f"{key} depends on {deps}"
    got, peak = compute_counting_carries(lambda: spilled.compute(scheduler="sync"))
    assert peak <= 2, f"{peak} chunks' carries alive at once (6 chunks)"
    # chunks 1..4 read their incoming momentum back from the scratch store (SGD with coupled decay: two parts)
    ctx = context(run, problem)
    for part in ("data", "weight_decay"):
        rows = np.asarray(zarr.open_array(str(scratch / job.token / part), mode="r")[:])
        assert rows.shape == (6, ctx.n_params)
        assert np.all(rows[0] == 0) and np.all(rows[5] == 0)  # chunk 0 needs none, chunk 5 takes it directly
        assert all(np.any(rows[c] != 0) for c in range(1, 5))
    # bit for bit what the chain computes with the carries held in memory
    held = lazy(None)[1].compute(scheduler="sync")
    for name in got.data_vars:
        np.testing.assert_array_equal(got[name].values, held[name].values, err_msg=name)


def test_attribute_sync_keeps_carries_flat_and_removes_its_scratch(adamw_store, tmp_path, monkeypatch):
    """End to end on the synchronous scheduler: 5 chunks, at most two chunks' carries alive, the same scores as
    the in-process reference, and no scratch left behind (in the temporary directory, or next to ``out``)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = open_run(adamw_store)
    (res, peak) = compute_counting_carries(lambda: engine.attribute(
        adamw_store, queries="val[:2]", output="loss", by=("step", "tensor"), client="sync", chunk_updates=2,
        progress=False))
    assert res.attrs["scan"] == "reverse chain" and res.attrs["n_chunks"] == 5
    assert peak <= 2, f"{peak} chunks' carries alive at once (5 chunks)"
    x, y = run.split("val")
    ref = attribute_local(run, Problem(x[:2], y[:2], output="loss", by=frozenset({"step", "tensor"})),
                          chunk_updates=2)
    assert_results_close(res, ref)
    out = tmp_path / "out" / "result.zarr"
    engine.attribute(adamw_store, queries="val[:2]", output="loss", by=("step", "tensor"), client="sync",
                     chunk_updates=2, progress=False, out=out)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["out"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.zarr"]
