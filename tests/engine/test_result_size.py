"""Result size: the in-memory limit (``max_result_bytes``), streaming to ``out=`` past it, and the per-task memory
budget that caps updates per task below the store's chunk length (issue 11, defect 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.compare import MLP_SPEC, assert_results_close

import engine
from engine import plan
from engine.cluster import graph as engine_graph
from engine.scan.problem import Context, Problem, result_meta
from engine.result import result_bytes
from engine.settings import format_bytes, parse_bytes
from explaind_app.cli import main as cli_main
from explaind_store.reader import open_run

BY = ("sample", "step")


@pytest.fixture(scope="module")
def long_chunk_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 updates of SGD with momentum recorded in store chunks of 8 updates."""
    from tests.support.store_helpers import train

    path = tmp_path_factory.mktemp("size") / "digits-chunks-of-8.zarr"
    train(path, 16, kind="sgd_momentum", chunk_updates=8, model_spec=MLP_SPEC)
    return path


def _meta(path: Path, queries: int):
    run = open_run(path)
    x, y = run.split("val")
    problem = Problem(x[:queries], y[:queries], by=frozenset(BY), window=(0, run.committed_updates))
    return result_meta(run, problem, Context(run, problem))


def test_result_size_is_known_before_any_task(digits_store):
    meta = _meta(digits_store, 2)
    ds = engine.attribute(digits_store, queries="val[:2]", by=BY, client="sync", progress=False)
    assert result_bytes(meta) == sum(v.nbytes for v in ds.data_vars.values())
    assert result_bytes(meta, step_bins=3) == sum(v.nbytes for v in engine_graph.bin_steps(ds, 3).data_vars.values())


def test_a_result_over_the_limit_refuses_without_out_and_streams_with_it(digits_store, tmp_path):
    size = result_bytes(_meta(digits_store, 2))
    with pytest.raises(engine.ResultTooLargeError) as err:
        engine.attribute(digits_store, queries="val[:2]", by=BY, client="sync", progress=False,
                         max_result_bytes=size // 2)
    msg = str(err.value)
    assert f"take {format_bytes(size)} in memory" in msg and format_bytes(size // 2) in msg
    assert "out=" in msg and "max_result_bytes" in msg and "step_bins" in msg
    assert isinstance(err.value, ValueError)  # the CLI prints it as one line and exits 2
    ref = engine.attribute(digits_store, queries="val[:2]", by=BY, client="sync", progress=False)
    got = engine.attribute(digits_store, queries="val[:2]", by=BY, client="sync", progress=False,
                           max_result_bytes=size // 2, out=tmp_path / "r.zarr")
    assert_results_close(got, ref, rtol=0.0)  # bit for bit
    # the limit also comes from the environment, in the same units
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPLAIND_MAX_RESULT_BYTES", f"{size // 2000}kB")
        with pytest.raises(engine.ResultTooLargeError):
            engine.attribute(digits_store, queries="val[:2]", by=BY, client="sync", progress=False)


def test_plan_caps_updates_per_task_below_the_store_chunk():
    chunks = plan.plan_chunks
    two = [(lo, lo + 2) for lo in range(0, 16, 2)]
    assert chunks((0, 16), store_chunk=8, max_updates=2) == two  # the reverse chain
    assert chunks((0, 16), store_chunk=8, max_updates=2, fill=False, n_workers=2) == two  # parallel chunks
    assert chunks((0, 16), store_chunk=8, chunk_updates=8, max_updates=3) == [
        (0, 3), (3, 6), (6, 8), (8, 11), (11, 14), (14, 16)]
    assert chunks((0, 16), store_chunk=8, max_updates=20) == [(0, 16)]  # chain: whole store chunks when they fit


def test_tasks_follow_the_memory_budget_not_the_store_chunk(long_chunk_store, monkeypatch, tmp_path):
    """A budget of 2 updates' result blocks per task on a store with chunks of 8: tasks of 2 updates (a sub-range
    of a store chunk), in memory and streamed to disk, with the numbers of the default plan."""
    ref = engine.attribute(long_chunk_store, queries="val[:1]", by=BY, client="sync", progress=False)
    assert ref.attrs["chunk_updates"] >= 8
    per_update = plan.step_bytes(_meta(long_chunk_store, 1), 10)
    monkeypatch.setenv("EXPLAIND_BLOCK_BYTES", str(2 * per_update + per_update // 2))
    small = engine.attribute(long_chunk_store, queries="val[:1]", by=BY, client="sync", progress=False)
    assert small.attrs["chunk_updates"] == 2 and small.attrs["n_chunks"] == 8
    assert small.attrs["scan"] == "reverse chain"
    assert_results_close(small, ref)
    out = engine.attribute(long_chunk_store, queries="val[:1]", by=BY, client="sync", progress=False,
                           out=tmp_path / "r.zarr")
    assert out["data"].encoding["chunks"][-1] == 2  # output step chunks no longer than a task
    assert_results_close(out, small, rtol=0.0)
    # sums over chunks (by sample, no step) are carried down the chain: equal to the one-task result
    summed = engine.attribute(long_chunk_store, queries="val[:1]", by="sample", client="sync", progress=False)
    monkeypatch.delenv("EXPLAIND_BLOCK_BYTES")
    whole = engine.attribute(long_chunk_store, queries="val[:1]", by="sample", client="sync", progress=False)
    assert_results_close(summed, whole)


def test_sizes_read_with_units():
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(123) == 123
    assert parse_bytes("1.5g") == 1_500_000_000 and format_bytes(16_100_000_000) == "16.10 GB"
    for bad in ("x", "-1", "0", "4XB"):
        with pytest.raises(ValueError, match="4GB" if bad != "0" else "positive"):
            parse_bytes(bad)


def test_cli_max_result_bytes(digits_store, tmp_path, capsys):
    base = ["attribute", str(digits_store), "--queries", "val[:2]", "--by", "sample,step", "--sync", "--quiet"]
    assert cli_main([*base, "--max-result-bytes", "10kB"]) == 2
    err = capsys.readouterr().err
    assert "explaind: error:" in err and "--out" in err and "limit of 10.0 kB" in err
    assert cli_main([*base, "--max-result-bytes", "10kB", "--out", str(tmp_path / "r.zarr")]) == 0
    assert cli_main([*base, "--max-result-bytes", "1GB"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        cli_main([*base, "--max-result-bytes", "4XB"])
    assert bad.value.code == 2
    assert "4GB" in capsys.readouterr().err  # says which forms it accepts


@pytest.mark.filterwarnings("ignore:The data type")  # the fixed-width 'part' labels (attribute() writes objects)
def test_the_chain_waits_for_the_writes_of_its_blocks(long_chunk_store, tmp_path):
    """In the write graph, the chain's task for chunk c starts after the writes of chunk c + 2: a query group never
    holds more than three chunks' blocks, however far the chain could run ahead of the writes."""
    import dask
    from dask.core import get_dependencies

    from engine.cluster.worker import make_job

    run = open_run(long_chunk_store)
    x, y = run.split("val")
    problem = Problem(x[:1], y[:1], by=frozenset(BY), window=(0, 16))
    meta = result_meta(run, problem, Context(run, problem))
    bounds = plan.plan_chunks((0, 16), store_chunk=8, max_updates=2)
    job = make_job(run, problem, by_reference=True)
    ds = engine_graph.lazy_result(job, meta, bounds, keep_u=False, chain=True)
    store = ds.to_zarr(tmp_path / "r.zarr", mode="w", compute=False, consolidated=False)
    graph = dict(engine_graph.gate_writes(store).__dask_graph__())
    for c in range(len(bounds) - 2):
        gate = f"explaind-gate-{job.token}-{c}"
        assert gate in get_dependencies(graph, f"explaind-chain-{job.token}-{c}")
        writes = [k for k in get_dependencies(graph, gate) if not str(k).startswith("explaind-")]
        assert writes, f"chunk {c} waits for no write"
    dask.compute(engine_graph.gate_writes(store), scheduler="synchronous")  # no cycle
