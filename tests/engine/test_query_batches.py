"""Query rows bounded by the ``query_bytes`` budget: a group whose rows would not fit runs its queries in batches,
one after another in its slot (the graph orders them), with the same numbers as one batch; the in-process call
hands its freed heap back to the OS."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import dask
import pytest

import engine
from engine import plan, settings
from engine.api import QueryMemoryWarning
from engine.cluster import graph as engine_graph
from engine.cluster.worker import make_job
from engine.result import BY_KEYS
from engine.scan import Context, Problem, result_meta
from explaind_store import open_run
from tests.support.compare import assert_results_close, identity_error

ROOT = Path(__file__).resolve().parents[2]


def _budget_for(store: Path, queries: int) -> int:
    """A ``query_bytes`` budget that holds ``queries`` queries of the store's model (per the plan's estimate)."""
    run = open_run(store)
    x, y = run.split("val")
    problem = Problem(x[:1], y[:1], window=(0, 1))
    meta = result_meta(run, problem, Context(run, problem))
    n_params = sum(math.prod(s) for s in meta.tensor_shapes)
    return queries * meta.n_outputs * plan.query_row_bytes(n_params)


def test_plan_splits_queries_into_batches_only_over_the_budget():
    row = plan.query_row_bytes(1000)
    assert row == plan.QUERY_ROW_VECTORS * 1000 * 8 < plan.query_row_bytes(1000, in_process=False)
    # 10 queries of 5 outputs; room for 3 queries a batch -> 4 nearly equal consecutive batches
    assert plan.query_batches(slice(0, 10), 5, 1000, 3 * 5 * row) == [slice(0, 2), slice(2, 5), slice(5, 8),
                                                                       slice(8, 10)]
    assert plan.query_batches(slice(4, 10), 5, 1000, 6 * 5 * row) == [slice(4, 10)]  # fits: not split
    assert plan.query_batches(slice(0, 3), 5, 1000, None) == [slice(0, 3)]
    assert plan.query_batches(slice(0, 3), 5, 1000, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # one query each


def _digits(store: Path, q: int, by: frozenset[str] = frozenset(BY_KEYS)):
    run = open_run(store)
    x, y = run.split("val")
    problem = Problem(x[:q], y[:q], by=by, window=(0, 12))
    return run, problem, result_meta(run, problem, Context(run, problem))


def test_batches_match_one_batch_and_report_in_attrs(digits_store):
    """5 queries with room for 2: three batches (attrs), numbers as one batch to 1e-12, the identity closes."""
    kw = dict(queries="val[:5]", by=("sample", "step", "tensor"), client="sync", progress=False)
    with settings.override(query_bytes=10**15):
        one = engine.attribute(digits_store, **kw)
    with settings.override(query_bytes=_budget_for(digits_store, 2)), warnings.catch_warnings():
        warnings.simplefilter("error", QueryMemoryWarning)  # every batch fits: no warning
        got = engine.attribute(digits_store, **kw)
    assert one.attrs["query_batches"] == 1 and one.attrs["query_groups"] == 1
    assert got.attrs["query_batches"] == 3 and got.attrs["query_groups"] == 1
    assert_results_close(got, one)
    assert identity_error(got) < 1e-10
    # the argument beats the setting, as max_result_bytes= does
    with settings.override(query_bytes=10**15):
        arg = engine.attribute(digits_store, query_bytes=_budget_for(digits_store, 2), **kw)
    assert arg.attrs["query_batches"] == 3
    assert_results_close(arg, got, rtol=0)
    with pytest.raises(ValueError, match="query_bytes: .*as a size in bytes"):
        engine.attribute(digits_store, query_bytes="lots", **kw)


@pytest.mark.parametrize("chain", [True, False])
def test_graph_runs_a_slots_batches_one_after_another(digits_store, chain):
    """Every task of batch b + 1 that holds query-row state (pass 1 of parallel chunks, the reverse chain's first
    task) depends on every last such task of batch b (pass 2 of every chunk / of the chain's first chunk), on any
    scheduler; the joined result equals one batch's."""
    run, problem, meta = _digits(digits_store, 4)
    bounds = plan.plan_chunks((0, 12), store_chunk=run.chunk_updates, chunk_updates=4)
    n = len(bounds)
    jobs = [make_job(run, engine_graph.group_problem(problem, s), by_reference=True)
            for s in (slice(0, 1), slice(1, 3), slice(3, 4))]
    ds = engine_graph.lazy_result([jobs], meta, bounds, keep_u=False, chain=chain)
    graph = dict(ds.__dask_graph__())
    deps = {k: dask.core.get_dependencies(graph, k) for k in graph}

    def ancestors(key):
        seen, todo = set(), [key]
        while todo:
            for d in deps[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    for prev, nxt in zip(jobs, jobs[1:]):
        a, b = prev.token, nxt.token
        if chain:
            firsts, lasts = [f"explaind-chain-{b}-{n - 1}"], [f"explaind-chain-{a}-0"]
        else:
            firsts = [f"explaind-pass1-{b}-{c}" for c in range(n)]
            lasts = [f"explaind-pass2-{a}-{c}" for c in range(n)]
        for first in firsts:
            assert set(lasts) <= ancestors(first), f"{first} may run before batch {a} ended"
    with settings.override(query_bytes=10**15):
        one = engine_graph.lazy_result(make_job(run, problem, by_reference=True), meta, bounds, keep_u=False,
                                       chain=chain)
        assert_results_close(ds.compute(scheduler="sync"), one.compute(scheduler="sync"))


def test_out_streams_batches_and_keeps_their_write_gates(digits_store, tmp_path):
    """out= with batches: the written result equals the in-memory one, and the reverse chain of every batch (not
    only the first) keeps waiting for its blocks to be written (engine.cluster.graph.gate_writes)."""
    kw = dict(queries="val[:3]", by=("sample", "step"), client="sync", progress=False, chunk_updates=2)
    with settings.override(query_bytes=_budget_for(digits_store, 1)):
        mem = engine.attribute(digits_store, **kw)
        disk = engine.attribute(digits_store, out=tmp_path / "r.zarr", **kw)
    assert disk.attrs["query_batches"] == 3
    assert_results_close(disk.load(), mem)

    run, problem, meta = _digits(digits_store, 2, frozenset({"sample", "step"}))
    bounds = plan.plan_chunks((0, 12), store_chunk=run.chunk_updates)
    jobs = [make_job(run, engine_graph.group_problem(problem, slice(i, i + 1)), by_reference=True) for i in range(2)]
    ds = engine_graph.lazy_result([jobs], meta, bounds, keep_u=False, chain=True)
    gated = engine_graph.gate_writes(ds.to_zarr(tmp_path / "g.zarr", compute=False))
    keys = [str(k) for k in dict(gated.__dask_graph__())]
    for j in jobs:
        assert any(k.startswith(f"explaind-gate-{j.token}-") for k in keys), f"batch {j.token} lost its gates"


def test_one_query_over_the_budget_warns_naming_the_setting(digits_store):
    """A query's outputs are not split: one query over the budget runs (a batch per query) with a warning that says
    what to do."""
    with settings.override(query_bytes=1), pytest.warns(QueryMemoryWarning, match="EXPLAIND_QUERY_BYTES") as rec:
        ds = engine.attribute(digits_store, queries="val[:2]", by=("step",), client="sync", progress=False)
    assert "target_logprob" in str(rec[0].message)
    assert ds.attrs["query_batches"] == 2
    assert identity_error(ds) < 1e-10


RSS_SCRIPT = """
import gc, resource
import psutil, torch
torch.set_num_threads(1)
from explaind_store import open_run
from explaind_store.examples import modadd
import engine
modadd.train({store!r}, steps=3, p=31, d_model=32, n_heads=2, d_mlp=128, progress=False, eval_every=0)
run = open_run({store!r})
proc = psutil.Process()
gc.collect()
before = proc.memory_info().rss
ds = engine.attribute(run, queries="val[:8]", by=("step",), client="sync", progress=False)
del ds
gc.collect()
after = proc.memory_info().rss
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RSS", before, after, peak)
"""


def test_in_process_attribute_hands_freed_memory_back(tmp_path):
    """After a synchronous attribute the process's resident memory falls back near where it started (the engine's
    glibc tuning keeps freed heap otherwise: it stayed at the call's peak)."""
    pytest.importorskip("psutil")
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc heap tuning and malloc_trim are Linux-only")
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT.format(store=str(tmp_path / "m.zarr"))],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    before, after, peak = (int(v) for v in r.stdout.split("RSS")[1].split())
    assert peak - before > 50 << 20, "the call must allocate enough for the check to mean something"
    assert after - before < 0.5 * (peak - before), (before >> 20, after >> 20, peak >> 20)


def test_batches_on_the_local_cluster_and_an_in_process_client(digits_store, cluster):
    """The default LocalCluster (worker processes) and a threads-only distributed client run the batches too, with
    the one-batch numbers."""
    from distributed import Client, LocalCluster

    kw = dict(queries="val[:4]", by=("sample", "step"), progress=False)
    with settings.override(query_bytes=10**15):
        one = engine.attribute(digits_store, client="sync", **kw)
    # a budget for one query in process is less than one in a worker: every batch holds one query
    with settings.override(query_bytes=_budget_for(digits_store, 1)), warnings.catch_warnings():
        warnings.simplefilter("ignore", QueryMemoryWarning)  # one query is over the budget in a worker
        local = engine.attribute(digits_store, client=None, **kw)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, \
                Client(lc, set_as_default=False) as threads:
            inproc = engine.attribute(digits_store, client=threads, **kw)
    for got in (local, inproc):
        assert got.attrs["query_batches"] == 4
        assert_results_close(got, one)


def test_the_bar_counts_every_batchs_updates(digits_store, monkeypatch):
    """Each batch's pass 2 visits every update: the bar's total is batches x updates, reached by the ticks alone."""
    from tests.engine.cluster.test_progress import _bars

    bars = _bars(monkeypatch)
    with settings.override(query_bytes=_budget_for(digits_store, 1)):
        ds = engine.attribute(digits_store, queries="val[:3]", by="sample", client="sync", progress=True)
    (bar,) = bars
    assert ds.attrs["query_batches"] == 3
    assert bar.total == 3 * 12 and bar.steps[: 3 * 12] == [1] * (3 * 12)


def test_queries_that_are_not_independent_stay_one_batch_with_a_warning(digits_store):
    """Queries integrated as one function (``Problem.per_query`` False) cannot be split: one batch, and a warning
    naming the setting when it exceeds the budget."""
    from engine.api import warn_query_memory

    run, problem, meta = _digits(digits_store, 4)
    kw = dict(store_chunk=run.chunk_updates, chunk_updates=None, sync=True, same_host=False, n_workers=1,
              query_bytes=1)
    split = plan.plan_attribution(meta, (0, 12), per_query=True, **kw)
    whole = plan.plan_attribution(meta, (0, 12), per_query=False, **kw)
    assert [len(b) for b in split.group_batches] == [4] and whole.batches is None
    assert whole.query_estimate == 4 * split.query_estimate > 1
    with pytest.warns(QueryMemoryWarning, match="per_query=False.*EXPLAIND_QUERY_BYTES"):
        warn_query_memory(whole, meta, False)


def test_plan_bounds_each_group_by_its_share_and_by_one_tasks_memory(digits_store):
    """Each group gets ``query_bytes / groups``, at most ``task_bytes`` (a worker's memory per task): the smaller
    bound decides the batches, and ``over_budget`` says when a batch could not be split below it."""
    run, problem, meta = _digits(digits_store, 4)
    one = _budget_for(digits_store, 1) * plan.QUERY_ROW_VECTORS_WORKER // plan.QUERY_ROW_VECTORS  # a query, worker
    kw = dict(store_chunk=run.chunk_updates, chunk_updates=None, sync=False, same_host=False, n_workers=1,
              per_query=True)
    only_task = plan.plan_attribution(meta, (0, 12), task_bytes=2 * one, **kw)
    assert only_task.query_share == 2 * one and [len(b) for b in only_task.group_batches] == [2]
    assert not only_task.over_budget
    both = plan.plan_attribution(meta, (0, 12), query_bytes=10**15, task_bytes=one, **kw)
    assert both.query_share == one and [len(b) for b in both.group_batches] == [4]
    assert plan.plan_attribution(meta, (0, 12), query_bytes=one, task_bytes=10**15, **kw).query_share == one
    unbounded = plan.plan_attribution(meta, (0, 12), **kw)
    assert unbounded.query_share is None and unbounded.batches is None and not unbounded.over_budget
    assert plan.plan_attribution(meta, (0, 12), task_bytes=one - 1, **kw).over_budget


def test_workers_memory_limits_bound_the_query_batches(digits_store):
    """A client whose workers have a memory limit: each task's query rows get a quarter of the limit per worker
    thread (``Runner.task_memory``), not a share of this machine's memory; the batches give the one-batch numbers.
    The caller's query_bytes= still wins."""
    from distributed import Client, LocalCluster

    from engine.api import MAX_RESULT_FRACTION
    from engine.cluster.runners import ClientRunner

    per_query = _budget_for(digits_store, 1) * plan.QUERY_ROW_VECTORS_WORKER // plan.QUERY_ROW_VECTORS
    limit = int(12 * per_query)  # two threads, a quarter each: 1.5 queries a task -> batches of one query
    kw = dict(queries="val[:3]", by=("sample", "step"), progress=False)
    with settings.override(query_bytes=10**15):
        one = engine.attribute(digits_store, client="sync", **kw)
    # the limit is far below what the test process holds: the worker must not pause, spill or restart over it
    quiet = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with dask.config.set(quiet), LocalCluster(n_workers=1, threads_per_worker=2, processes=False, memory_limit=limit,
                                              dashboard_address=":0") as lc, Client(lc, set_as_default=False) as c:
        assert ClientRunner(c).task_memory() == limit // 2
        got = engine.attribute(digits_store, client=c, **kw)
        assert got.attrs["query_budget"] == int(limit // 2 * MAX_RESULT_FRACTION)
        assert got.attrs["query_batches"] == 3 and got.attrs["query_groups"] == 1
        assert_results_close(got, one)
        given = engine.attribute(digits_store, client=c, query_bytes=10**15, **kw)
        assert given.attrs["query_batches"] == 1 and given.attrs["query_budget"] == 10**15
