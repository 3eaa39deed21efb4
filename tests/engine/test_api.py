"""The public engine API on real stores: Dask (sync and a process LocalCluster) against the in-process reference,
the decomposition identity, query parsing, windows, Zarr output, top_k, input checks and the CLI."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from tests.support.compare import MLP_SPEC, assert_results_close, identity_error
from torch import nn

import engine
from engine import plan, settings
from engine.cluster import graph as engine_graph
from engine.cluster.handoff import shm_root
from engine.cluster.runners import SyncRunner
from engine.cluster.worker import make_job
from engine.scan import Context, Problem, attribute_local, result_meta
from explaind_store import Recorder, open_run
from explaind_store.storage import StoreError
from explaind_store.specs import UntrustedFactoryError, model_spec

ROOT = Path(__file__).resolve().parents[2]


def reference(run, queries: str, *, chunk_updates: int = 4, **kw) -> xr.Dataset:
    """``attribute_local`` (the sequential reference) for a split selection of ``run``."""
    spec = engine.parse_queries(queries)
    x, y = run.split(spec.split)
    idx = torch.as_tensor(spec.indices(len(x)))
    return attribute_local(run, Problem(x[idx], y[idx], **kw), chunk_updates=chunk_updates)


# ==============================================================================================================
# Dask graph == in-process reference
# ==============================================================================================================
BY_ALL = ("sample", "step", "tensor")


@pytest.fixture(scope="module")
def sgd_reference(digits_store) -> xr.Dataset:
    return reference(open_run(digits_store), "val[:2]", by=frozenset(BY_ALL))


@pytest.mark.parametrize("chunk_updates", [2, 6])
def test_sync_scheduler_matches_reference_for_chunk_sizes(digits_store, sgd_reference, chunk_updates, monkeypatch):
    monkeypatch.setenv("EXPLAIND_HANDOFF_MIN_BYTES", "0")  # every variable assembled from its blocks (no dask copy)
    ds = engine.attribute(open_run(digits_store), queries="val[:2]", by=BY_ALL, client="sync",
                          chunk_updates=chunk_updates, progress=False)
    assert ds.attrs["n_chunks"] == 12 // chunk_updates
    assert dict(ds["data"].sizes) == {"query": 2, "output": 10, "sample": 120, "step": 12, "tensor": 4}
    assert_results_close(ds, sgd_reference)
    assert identity_error(ds) <= 1e-10


def test_windows_match_reference_and_carry_momentum(adamw_store):
    """An unaligned window (3, 9]: tasks start on store-chunk boundaries, and the carried-over momentum is used."""
    run = open_run(adamw_store)
    ref = reference(run, "val[2:5]", by=frozenset({"sample", "tensor"}), window=(3, 9), chunk_updates=3)
    ds = engine.attribute(run, queries="val[2:5]", by="sample,tensor", steps=slice(3, 9), client="sync",
                          chunk_updates=2, progress=False)
    assert ds.attrs["window"] == [3, 9] and ds.attrs["n_chunks"] == 4  # (3,4] (4,6] (6,8] (8,9]
    assert ds.attrs["scan"] == "reverse chain"
    assert_results_close(ds, ref)
    # by default the reverse chain takes the window in as few chunks as memory allows (here one)
    one = engine.attribute(run, queries="val[2:5]", by="sample,tensor", steps=slice(3, 9), client="sync",
                           progress=False)
    assert one.attrs["n_chunks"] == 1
    assert_results_close(one, ref)
    assert np.abs(np.asarray(ds["momentum"])).max() > 1e-6  # S_a != 0 for a > 0
    assert identity_error(ds) <= 1e-10
    # the window ends are the real model's outputs, evaluated directly
    x, _ = run.split("val")
    for step, var in ((3, "initial"), (9, "final")):
        model = run.model(step).double()
        with torch.no_grad():
            expect = torch.log_softmax(model(x[2:5].double()), dim=-1).numpy()
        np.testing.assert_allclose(np.asarray(ds[var]), expect, rtol=0, atol=1e-12)
    # negative window ends count from the end
    ds2 = engine.attribute(run, queries="val[2:5]", by=(), steps=slice(-2, None), client="sync", progress=False)
    assert ds2.attrs["window"] == [8, 10]
    assert identity_error(ds2) <= 1e-10


def test_local_cluster_matches_reference(digits_store, modadd_store, sgd_reference, cluster, monkeypatch):
    cores = os.cpu_count() or 1
    ds = engine.attribute(open_run(digits_store), queries="val[:2]", by=BY_ALL, client=cluster, chunk_updates=4,
                          progress=False)
    assert ds.attrs["n_chunks"] == 3 and "2 workers" in ds.attrs["scheduler"]
    # our own cluster: query groups of 2 torch threads each, each group a reverse chain over the 3 chunks
    groups = max(1, min(2, cores // 2))
    assert ds.attrs["query_groups"] == groups and ds.attrs["torch_threads"] == max(1, cores // groups)
    assert ds.attrs["scan"] == "reverse chain"
    assert_results_close(ds, sgd_reference)
    # one torch thread per group: a group per worker process; every result comes back through shared memory
    monkeypatch.setenv("EXPLAIND_THREADS_PER_GROUP", "1")
    monkeypatch.setenv("EXPLAIND_HANDOFF_MIN_BYTES", "0")
    # only our hand-off folders count: other processes on the machine may create semaphores there meanwhile
    before = {f for f in os.listdir("/dev/shm") if f.startswith("explaind-")} if shm_root() else set()
    two = engine.attribute(open_run(digits_store), queries="val[:2]", by=BY_ALL, client=cluster, chunk_updates=4,
                           progress=False)
    assert two.attrs["query_groups"] == min(2, cores) and two.attrs["scan"] == "reverse chain"
    assert_results_close(two, sgd_reference)
    two["data"][...] = 0.0  # the mapped results are the caller's own (copy-on-write), writable
    if shm_root():
        assert {f for f in os.listdir("/dev/shm") if f.startswith("explaind-")} <= before  # nothing left behind
    # the default client (None) is the module's LocalCluster (the fixture's): the transformer, element-wise scores
    mrun = open_run(modadd_store)
    by = frozenset({"sample", "tensor", "param"})
    mref = reference(mrun, "val[:2]", by=by, output="target_logprob", chunk_updates=3)
    mds = engine.attribute(str(modadd_store), queries="val[:2]", output="target_logprob", by=by, progress=False)
    assert mds.attrs["scheduler"].startswith(cluster.scheduler.address)
    assert "param_embed" in mds and "param_mlp_in__weight" in mds
    assert_results_close(mds, mref)
    assert identity_error(mds) <= 1e-10


def test_in_memory_trajectory_runs_on_workers(cluster):
    """An InMemoryTrajectory (no store) is pickled to the workers once (one graph key)."""
    from tests.support.oracle import train

    tr = train("mlp", "adamw", n_updates=5, batch_size=6)
    ref = attribute_local(tr.traj, Problem(tr.xq, tr.yq, by=frozenset({"sample"})), chunk_updates=2)
    ds = engine.attribute(tr.traj, tr.xq, tr.yq, client=cluster, chunk_updates=2, progress=False)
    assert ds.attrs["n_chunks"] == 3
    assert_results_close(ds, ref)


def test_local_cluster_is_quiet(cluster):
    """Our LocalCluster's scheduler and workers run with the quiet dask settings (no 10 ms profiler, 1 s event-loop
    checks): 2 torch threads on 2 cores lose ~10% whenever an idle worker wakes up."""
    from engine.cluster.runners import QUIET_CLUSTER_CONFIG

    def settings() -> dict:
        import dask

        return {k: dask.config.get(k) for k in QUIET_CLUSTER_CONFIG}

    got = cluster.run(settings)
    assert len(got) == 2
    for worker_settings in got.values():
        assert worker_settings == QUIET_CLUSTER_CONFIG
    assert cluster.run_on_scheduler(lambda dask_scheduler: dask_scheduler._tick_interval) == 1.0
    # and one malloc arena from their first allocation on (set before the nanny spawned them)
    assert set(cluster.run(lambda: __import__("os").environ.get("MALLOC_ARENA_MAX")).values()) == {"1"}


def test_workers_inherit_trusted_modules(tmp_path, cluster, monkeypatch):
    """A store whose factory is trusted only through EXPLAIND_TRUSTED_MODULES, set after the workers started."""
    from tests.support.store_helpers import train

    path = tmp_path / "trusted.zarr"
    train(path, 4, kind="sgd", chunk_updates=2, model_spec=model_spec("tests.support.store_helpers:make_mlp", hidden=6))
    with pytest.raises(UntrustedFactoryError, match="EXPLAIND_TRUSTED_MODULES"):
        engine.attribute(path, queries="val[:1]", client=cluster, progress=False)
    monkeypatch.setenv("EXPLAIND_TRUSTED_MODULES", "tests.support.store_helpers")
    ds = engine.attribute(path, queries="val[:1]", client=cluster, progress=False)
    ref = engine.attribute(path, queries="val[:1]", client="sync", progress=False)
    assert_results_close(ds, ref)


def test_plan_chunks_reads_whole_store_chunks():
    chunks = plan.plan_chunks
    assert chunks((0, 12), store_chunk=2) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    assert chunks((3, 9), store_chunk=2) == [(3, 4), (4, 6), (6, 8), (8, 9)]
    assert chunks((3, 11), store_chunk=2, chunk_updates=4) == [(3, 4), (4, 8), (8, 11)]
    # store chunks longer than the window: split evenly so every worker gets a task
    assert chunks((0, 10), store_chunk=1000, n_workers=4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert chunks((0, 10), store_chunk=1000, n_workers=1) == [(0, 10)]
    assert chunks((0, 5), store_chunk=None, chunk_updates=2) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ValueError, match="not a multiple of the store's chunk size"):
        chunks((0, 12), store_chunk=4, chunk_updates=6)


def test_graph_is_a_two_pass_scan_without_embedded_data(digits_store):
    """C pass-1 tasks, two chains of C-1 carry folds (no task gathering every chunk's summary), C pass-2 tasks; the
    step axis comes from per-chunk blocks; only the job key (store path + small Problem) is more than a few bytes:
    tasks load everything else from the store."""
    import cloudpickle

    run = open_run(digits_store)
    x, y = run.split("val")
    problem = Problem(x[:2], y[:2], by=frozenset(BY_ALL), window=(0, 12))
    meta = result_meta(run, problem, Context(run, problem))
    job = make_job(run, problem, by_reference=False)
    assert job.path == str(digits_store) and job.traj is None
    bounds = plan.plan_chunks((0, 12), store_chunk=run.chunk_updates)
    ds = engine_graph.lazy_result(job, meta, bounds, keep_u=False)
    assert ds["data"].data.chunks[3] == (2,) * 6  # step axis: one block per task, concatenated
    graph = dict(ds.__dask_graph__())
    kinds = [str(k[0] if isinstance(k, tuple) else k).split("-")[1] for k in graph if "explaind-" in str(k)]
    assert kinds.count("pass1") == 6 and kinds.count("pass2") == 6 and kinds.count("carries") == 0
    assert kinds.count("afold") == 5 and kinds.count("ufold") == 5
    sizes = {k: len(cloudpickle.dumps(v)) for k, v in graph.items()}
    job_key = f"explaind-job-{job.token}"
    assert sizes[job_key] < 20_000
    big = {k: n for k, n in sizes.items() if k != job_key and n > 4_000}
    assert not big, f"tasks embedding data: {big}"


def test_reverse_chain_graph_computes_each_path_integral_once(digits_store):
    """The reverse chain: pass 1 without path integrals (none for the last chunk), pass 2 chained from the last
    chunk to the first through the accumulator, same numbers as the parallel-chunk scan; one chunk = one task."""
    import engine.scan.forward as P1  # where the scan looks up the path integral

    run = open_run(digits_store)
    x, y = run.split("val")
    problem = Problem(x[:2], y[:2], by=frozenset(BY_ALL), window=(0, 12))
    meta = result_meta(run, problem, Context(run, problem))
    bounds = plan.plan_chunks((0, 12), store_chunk=run.chunk_updates, chunk_updates=4)
    job = make_job(run, problem, by_reference=True)
    chain = engine_graph.lazy_result(job, meta, bounds, keep_u=False, chain=True)
    graph = dict(chain.__dask_graph__())
    kinds = [str(k[0] if isinstance(k, tuple) else k).split("-")[1] for k in graph if "explaind-" in str(k)]
    # the forward momentum folded over every chunk but the last, no task taking every chunk's carries
    assert kinds.count("chain") == 3 and kinds.count("momentum") == 2 and kinds.count("carries") == 0
    calls = []
    real = P1.path_integral

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    P1.path_integral = counted
    try:
        got = chain.compute(scheduler="sync")
    finally:
        P1.path_integral = real
    assert len(calls) == 12  # once per update (the parallel scan needs 8 more for chunks 2 and 3)
    par = engine_graph.lazy_result(make_job(run, problem, by_reference=True), meta, bounds, keep_u=False)
    assert_results_close(got, par.compute(scheduler="sync"))
    one = engine_graph.lazy_result(make_job(run, problem, by_reference=True), meta, [(0, 12)], keep_u=False,
                                   chain=True)
    names = [str(k) for k in dict(one.__dask_graph__()) if "explaind-pass" in str(k) or "explaind-carr" in str(k)]
    assert len(names) == 1 and "pass2" in names[0]  # no pass 1, no carries
    assert_results_close(one.compute(scheduler="sync"), got)


def test_query_groups_and_parallelism_plan():
    from engine.plan import plan_parallelism, query_groups

    assert query_groups(10, 1, per_query=True) == [slice(0, 10)]
    assert query_groups(10, 3, per_query=True) == [slice(0, 3), slice(3, 7), slice(7, 10)]
    assert query_groups(2, 8, per_query=True) == [slice(0, 1), slice(1, 2)]
    assert query_groups(10, 4, per_query=False) == [slice(0, 10)]  # a query batch that mixes samples
    assert plan_parallelism(10, per_query=True, sync=True, same_host=True, n_workers=1) == (1, None)

    def ours(n_queries: int, n_workers: int) -> tuple[int, int | None]:  # our LocalCluster: same host
        return plan_parallelism(n_queries, per_query=True, sync=False, same_host=True, n_workers=n_workers)

    cores = os.cpu_count() or 1
    groups, threads = ours(10, cores)
    assert groups == max(1, cores // settings.get("threads_per_group")) and threads == max(1, cores // groups)
    with settings.override(threads_per_group=1):
        assert ours(10, cores) == (min(10, cores), 1)
    assert ours(1, cores) == (1, cores)  # one query: all cores as threads
    external = functools.partial(plan_parallelism, sync=False, same_host=False, n_workers=3)
    assert external(10, per_query=True) == (3, None)  # external workers: one group each
    assert external(2, per_query=False) == (1, None)


def test_batch_mean_grads_match_one_at_a_time(modadd_store):
    from engine.ops.persample import batch_mean_grad, batch_mean_grads

    run = open_run(modadd_store)
    model = run.build_model().double()
    blk = run.block(0, 5)
    x, y = run.split("train")
    names = list(run.tensor_names)
    params = {n: blk.params[n][:5].double() for n in names}
    xs = [x[b] for b in blk.batches]
    ys = [y[b] for b in blk.batches]
    got = batch_mean_grads(model, params, xs, ys, dict(run.loss), max_rows=2 * len(xs[0]))  # groups of 2 updates
    for i in range(5):
        ref = batch_mean_grad(model, {n: params[n][i] for n in names}, xs[i], ys[i], dict(run.loss))
        for n in names:
            torch.testing.assert_close(got[i][n], ref[n], rtol=1e-12, atol=1e-15)
    # unequal batch sizes: one at a time, same numbers
    mixed = batch_mean_grads(model, params, [xs[0], xs[1][:3]], [ys[0], ys[1][:3]], dict(run.loss))
    ref = batch_mean_grad(model, {n: params[n][1] for n in names}, xs[1][:3], ys[1][:3], dict(run.loss))
    torch.testing.assert_close(mixed[1][names[0]], ref[names[0]], rtol=1e-12, atol=1e-15)


# ==============================================================================================================
# Queries, outputs, bins
# ==============================================================================================================
def test_parse_queries():
    p = engine.parse_queries
    assert list(p("val[:4]").indices(10)) == [0, 1, 2, 3]
    assert list(p("val").indices(3)) == [0, 1, 2]
    assert list(p("val[5:8]").indices(10)) == [5, 6, 7]
    assert list(p("train[0:3]").indices(10)) == [0, 1, 2]
    assert list(p("val[[1,5,7]]").indices(10)) == [1, 5, 7]
    assert list(p("val[1, 5]").indices(10)) == [1, 5]
    assert list(p("val[3]").indices(10)) == [3]
    assert list(p("val[-2:]").indices(10)) == [8, 9]
    assert p("my-split[::2]").split == "my-split"
    with pytest.raises(ValueError, match="outside split 'val', which has 10"):
        p("val[:11]").indices(10)
    with pytest.raises(ValueError, match=r"indices \[12\] are outside"):
        p("val[[1,12]]").indices(10)
    with pytest.raises(ValueError, match="selects no samples"):
        p("val[4:4]").indices(10)
    for bad in ("val[", "val[a:b]", "[1]", "val[1:2:3:4]"):
        with pytest.raises(ValueError, match="cannot parse"):
            p(bad)


def test_split_queries_equal_explicit_tensors_and_outputs(digits_store):
    run = open_run(digits_store)
    x, y = run.split("val")
    kw = {"output": "loss", "by": (), "steps": slice(8, 12), "client": "sync", "progress": False}
    a = engine.attribute(run, queries="val[[1,5,7]]", **kw)
    b = engine.attribute(run, x[[1, 5, 7]], y[[1, 5, 7]], **kw)
    assert_results_close(a, b, rtol=0)
    assert a.attrs["queries"] == "val[[1,5,7]]" and list(a["output"].values) == ["loss"]
    assert identity_error(a) <= 1e-10
    # one query without its batch axis; margin output
    m = engine.attribute(run, x[4], y[4:5], output="margin", by=(), steps=slice(10, 12), client="sync",
                         progress=False)
    assert dict(m["final"].sizes) == {"query": 1, "output": 1}
    assert identity_error(m) <= 1e-10


def test_step_bins_sum_the_step_axis(digits_store, sgd_reference):
    binned = engine.attribute(digits_store, queries="val[:2]", by=BY_ALL, client="sync", progress=False, step_bins=5)
    assert list(binned["step"].values) == [3, 6, 8, 10, 12]  # array_split of 12 updates into 5 bins
    assert list(binned["step_start"].values) == [1, 4, 7, 9, 11]
    full = sgd_reference
    np.testing.assert_allclose(binned["data"].sel(step=6), full["data"].sel(step=[4, 5, 6]).sum("step"),
                               rtol=1e-12, atol=1e-15)
    for name in ("data", "weight_decay", "residual"):
        np.testing.assert_allclose(binned[name].sum("step"), full[name].sum("step"), rtol=1e-12, atol=1e-15)
    assert identity_error(binned) <= 1e-10


# ==============================================================================================================
# Zarr output and top_k
# ==============================================================================================================
def test_out_streams_to_zarr_and_top_k_streams_it(digits_store, sgd_reference, tmp_path):
    out = tmp_path / "result.zarr"
    ds = engine.attribute(digits_store, queries="val[:2]", by=BY_ALL, client="sync", out=out, progress=False)
    assert ds["data"].chunks is not None  # lazy, read from the store
    opened = xr.open_zarr(out)
    assert_results_close(opened, sgd_reference)
    assert_results_close(ds.compute(), opened.compute(), rtol=0)
    assert opened.attrs["max_abs_residual"] == pytest.approx(sgd_reference.attrs["max_abs_residual"], rel=1e-6)
    # aligned chunks: one store chunk (2 updates) per step block, one query per block of the big array
    arr = zarr.open_array(out / "data", mode="r")
    assert arr.chunks == (1, 10, 120, 2, 4)
    assert len([f for f in (out / "data" / "c").rglob("*") if f.is_file()]) == 2 * 6  # written chunk by chunk
    # an earlier result may be overwritten; a store may not
    engine.attribute(digits_store, queries="val[:1]", by=(), steps=slice(10, 12), client="sync", out=out,
                     progress=False)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        engine.attribute(digits_store, queries="val[:1]", client="sync", out=digits_store, progress=False)

    # top_k == numpy argsort of the in-memory result (summed over step and tensor), in memory and from zarr
    mem = sgd_reference
    k = 5
    total = np.asarray(mem["data"].sum(["step", "tensor"]))  # (query, output, sample)
    order = np.argsort(total, axis=-1)
    for res in (engine.top_k(mem, k), engine.top_k(_rewrite(mem, tmp_path), k)):
        assert dict(res.sizes) == {"query": 2, "output": 10, "rank": k}
        assert res.attrs["summed_over"] == ["step", "tensor"]
        np.testing.assert_array_equal(res["top_index"], order[..., ::-1][..., :k])
        np.testing.assert_array_equal(res["bottom_index"], order[..., :k])
        np.testing.assert_allclose(res["top_value"], np.take_along_axis(total, order[..., ::-1][..., :k], -1))
        np.testing.assert_allclose(res["bottom_value"], np.take_along_axis(total, order[..., :k], -1))
    by_step = engine.top_k(mem, 3, along="step")
    per_step = np.asarray(mem["data"].sum(["sample", "tensor"]))
    np.testing.assert_array_equal(by_step["top_label"], np.asarray(mem["step"])[np.argsort(-per_step, -1)[..., :3]])
    by_tensor = engine.top_k(mem, 2, along="tensor", part="weight_decay")
    assert by_tensor["top_label"].values[0, 0, 0] in list(mem["tensor"].values)
    with pytest.raises(ValueError, match="has no 'tensor' axis"):
        engine.top_k(engine.top_k(mem, 1), 3, along="tensor", part="top_value")
    with pytest.raises(KeyError, match="no variable 'nope'"):
        engine.top_k(mem, 3, part="nope")


def _rewrite(ds: xr.Dataset, tmp_path: Path) -> Path:
    """``ds`` written with small sample chunks, so top_k really merges candidates across chunks."""
    path = tmp_path / "small-chunks.zarr"
    small = ds[["data"]].drop_vars("tensor").chunk({"query": 1, "sample": 16, "step": 3})
    small.to_zarr(path, mode="w", consolidated=False)
    return path


# ==============================================================================================================
# Bad input: clear errors before any heavy work
# ==============================================================================================================
class NoHeavyWork(SyncRunner):
    """A runner (``client=``) that fails loudly when asked to compute: errors must come from the checks, before."""

    def compute(self, collections, *, progress, desc="explaind", updates=None):
        raise AssertionError("heavy work started before the input was rejected")


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory) -> Path:
    """SGD that diverges at update 4 (a NaN gradient): parameters are non-finite after updates 4 and 5."""
    from tests.support.store_helpers import batch_for, digits, make_mlp

    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path_factory.mktemp("bad") / "nan.zarr"
    with Recorder(path, model, opt, data=(x, y), splits={"val": (x[:10], y[:10])}, chunk_updates=2,
                  model_spec=MLP_SPEC) as rec:
        for s in range(1, 6):
            idx = batch_for(s, len(x))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if s == 4:
                model[0].weight.grad[0, 0] = float("nan")
            opt.step()
            rec.record(idx, loss=loss.item())
    return path


@pytest.fixture(scope="module")
def tampered_store(tmp_path_factory) -> Path:
    """A store whose parameters after update 3 were edited: the optimizer replay no longer matches."""
    from tests.support.store_helpers import train

    path = tmp_path_factory.mktemp("bad") / "tampered.zarr"
    train(path, 6, kind="adamw", chunk_updates=2, model_spec=MLP_SPEC)
    arr = zarr.open_array(path / "params" / "0.weight", mode="r+")
    arr[3] = arr[3] + 0.05
    return path


def test_bad_input_is_rejected_before_heavy_work(digits_store, nan_store, tampered_store):
    run = open_run(digits_store)
    x, y = run.split("val")
    cases = [
        ({"inputs": torch.zeros(2, 63)}, ValueError, r"query inputs have shape \(2, 63\).*\(N, 64\)"),
        ({"inputs": x[:2], "output": "loss"}, ValueError, "output='loss' needs the query targets"),
        ({"inputs": x[:2], "targets": y[:3], "output": "loss"}, ValueError, "targets has 3 entries but there are 2"),
        ({"queries": "val[:2]", "steps": slice(5, 40)}, ValueError, r"outside this run: it has updates 1\.\.12"),
        ({"queries": "val[:2]", "steps": slice(6, 6)}, ValueError, "needs 0 <= a < b <= 12"),
        ({"queries": "val[:2]", "steps": "x:y"}, ValueError, "cannot parse steps"),
        ({"queries": "test[:2]"}, KeyError, r"no data split 'test'; it has \['train', 'val'\]"),
        ({"queries": "val[:50]"}, ValueError, "outside split 'val', which has 10 samples"),
        ({"queries": "val[:2]", "inputs": x[:2]}, ValueError, "not both"),
        ({}, ValueError, "nothing to explain"),
        ({"queries": "val[:2]", "output": "probs"}, ValueError, "unknown output='probs'"),
        ({"queries": "val[:2]", "by": ("sample", "layer")}, ValueError, r"unknown by=\['layer'\]"),
        ({"queries": "val[:2]", "chunk_updates": 3}, ValueError, "not a multiple of the store's chunk size"),
        ({"queries": "val[:2]", "quadrature": "simpson"}, ValueError, "quadrature rule .simpson."),
        ({"queries": "val[:2]", "device": "gpu"}, ValueError, "device must be 'cpu', 'cuda'"),
        ({"queries": "val[:2]", "client": "threads"}, ValueError, "threads scheduler is not supported"),
        ({"queries": "val[:2]", "method": "fast"}, ValueError, "unknown method"),
        ({"queries": "val[:2]", "step_bins": 0}, ValueError, "step_bins must be a positive integer"),
        ({"queries": "val[:2]", "out": digits_store}, ValueError, "refusing to overwrite"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"queries": "val[:2]", "device": "cuda"}, ValueError, "CUDA is not available"))
    for kwargs, exc, msg in cases:
        kwargs = {"client": NoHeavyWork(), **kwargs}
        with pytest.raises(exc, match=msg):
            engine.attribute(run, progress=False, **kwargs)
    with pytest.raises(StoreError, match="no store at"):
        engine.attribute(digits_store.parent / "missing.zarr", queries="val", client="sync")
    # a store that diverged: refused inside the window, accepted before it (the checks pass: graph building starts)
    with pytest.raises(StoreError, match=r"NaN/inf after update\(s\) \[4, 5\].*steps=slice\(0, 3\)"):
        engine.attribute(nan_store, queries="val[:2]", client="sync")
    with pytest.raises(AssertionError, match="heavy work started"):
        engine.attribute(nan_store, queries="val[:2]", steps=slice(0, 3), client=NoHeavyWork())
    # a store whose parameters and optimizer state disagree fails the up-front verify
    with pytest.raises(StoreError, match="fails its verify check.*explaind verify"):
        engine.attribute(tampered_store, queries="val[:2]", client="sync")
    # an untrusted model factory is refused in the driver, before any task
    untrusted = open_run(digits_store)
    untrusted.attrs["model_spec"] = model_spec("somewhere.else:make", hidden=6)
    with pytest.raises(UntrustedFactoryError, match="not trusted"):
        engine.attribute(untrusted, queries="val[:2]", client="sync")


# ==============================================================================================================
# CLI
# ==============================================================================================================
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explaind_app.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=180, check=False)


def test_top_k_refuses_a_result_with_nan(sgd_reference):
    """A NaN in a (damaged) result must not vanish in the sums over step and tensor, nor be ranked."""
    bad = sgd_reference.copy(deep=True)
    bad["data"][0, 0, 3, 1, 0] = np.nan
    with pytest.raises(engine.NonFiniteResultError, match="NaN or inf"):
        engine.top_k(bad, 3)
    engine.top_k(sgd_reference, 3)  # the clean result ranks


def test_cli_attribute_and_top(digits_store, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    r = _cli("attribute", str(digits_store), "--queries", "val[:2]", "--by", "sample,step", "--steps", "2:10",
             "--out", str(out), "--sync", "--chunk-updates", "4", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "window         updates (2, 10]" in r.stdout
    assert "max |residual|" in r.stdout and "totals         data" in r.stdout
    assert "top 3 samples by data" in r.stdout and "query 1 output" in r.stdout
    ds = xr.open_zarr(out)
    assert ds.attrs["window"] == [2, 10] and identity_error(ds) <= 1e-10
    r = _cli("top", str(out), "-k", "4", "--query", "1", "--output", "all")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("query 1 output") == 10 and "query 0" not in r.stdout
    best = engine.top_k(out, 4)["top_label"].values[1, 0]
    assert f"top [{best[0]}: " in r.stdout
    # errors: one clear line on stderr, exit status 2 (in-process: the same main() the script runs)
    from explaind_app.cli import main

    assert main(["attribute", str(digits_store), "--queries", "val[:2]", "--steps", "0:99", "--sync"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("explaind: error: steps='0:99' asks for the window (0, 99]")
    assert main(["top", str(out), "--query", "7"]) == 2
    assert "out of range: the result has 2 queries" in capsys.readouterr().err
    assert main(["attribute", str(digits_store), "--queries", "nope[:2]", "--sync"]) == 2
    assert "no data split 'nope'" in capsys.readouterr().err


def test_a_trainer_run_of_a_causal_lm_decomposes_exactly_with_token_weights(tmp_path):
    """A Trainer run of GPT-2 (clipping, accumulation 2, warm-up, padded sequences of different lengths): the batch
    loss is the mean over all the batch's tokens, so each sequence weighs by its token count. Unweighted, an update's
    rounding residual is O(its change); weighted, it is float32 rounding and the identity closes."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import warnings

    from transformers import GPT2LMHeadModel, Trainer

    from explaind_store.integrations.hf import ExplaindCallback
    from tests.store.test_hf import _args, _config, _dataset

    torch.manual_seed(0)
    Trainer(model=GPT2LMHeadModel(_config()), args=_args(tmp_path, max_steps=3), train_dataset=_dataset(),
            callbacks=[ExplaindCallback(tmp_path / "lm.zarr")]).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.InexactWarning)  # the guard must not even suspect it
        ds = engine.attribute(tmp_path / "lm.zarr", queries="train[:3]", output="loss", by=("sample", "step"),
                              client="sync", progress=False)
    assert identity_error(ds) <= 1e-10
    assert float(np.abs(ds["rounding_residual"]).max()) <= 1e-6 * float(np.abs(ds["delta"]).max())
    lens = np.asarray([int((r["labels"] != -100).sum()) for r in _dataset()])
    assert len(set(lens)) > 3  # the sequences really differ in length
    with pytest.raises(ValueError, match="output='loss'"):
        engine.attribute(tmp_path / "lm.zarr", queries="train[:2]", output="log_softmax", client="sync",
                         progress=False)
    # the log-probability of a chosen next token, through the public API; the tied embedding is one tensor
    x = torch.stack([r["input_ids"] for r in _dataset()[:2]])
    y = engine.next_token_targets(x, positions=[3, 4], tokens=[7, 9])
    tok = engine.attribute(tmp_path / "lm.zarr", x, y, output="token_logprob", by=("tensor",), client="sync",
                           progress=False)
    assert identity_error(tok) <= 1e-10 and list(tok["output"].values) == ["token_logprob"]
    names = [str(t) for t in tok["tensor"].values]
    assert names.count("transformer.wte.weight") == 1 and not any("lm_head" in n for n in names)
    with pytest.raises(ValueError, match="no labelled next token"):
        engine.attribute(tmp_path / "lm.zarr", x, torch.full_like(x, -100), output="token_logprob", client="sync",
                         progress=False)


def test_token_logprob_is_for_causal_lm_runs(digits_store):
    with pytest.raises(ValueError, match="use output='target_logprob'"):
        engine.attribute(digits_store, queries="val[:2]", output="token_logprob", client="sync", progress=False)
