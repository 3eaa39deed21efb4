"""A real dask scheduler and two workers started as subprocesses (``dask scheduler`` / ``dask worker``): the engine
on an external cluster by address (API and CLI) reproduces the in-process result to 1e-12."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xarray as xr
from tests.support.compare import assert_results_close, identity_error

import engine

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the repository root (workers import `tests.support` from it)
DASK = Path(sys.executable).parent / "dask"


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process group we started, then SIGKILL what is still alive after a grace period."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``dask scheduler`` on a free port and two single-threaded ``dask worker`` processes; torn down reliably."""
    from distributed import Client

    d = tmp_path_factory.mktemp("dask-cluster")
    sfile = d / "scheduler.json"
    log = open(d / "cluster.log", "w")  # noqa: SIM115 - closed in the finally below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        procs.append(subprocess.Popen([str(DASK), *args], cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # own process group: killpg takes the nanny's child

    try:
        start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(sfile))
        deadline = time.monotonic() + 60
        while not sfile.exists() or not sfile.read_text().strip():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{(d / 'cluster.log').read_text()[-3000:]}")
            time.sleep(0.1)
        for i in range(2):
            start("worker", "--scheduler-file", str(sfile), "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                  "--name", f"w{i}", "--local-directory", str(d / f"w{i}"))
        with Client(scheduler_file=str(sfile), timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
            address = client.scheduler.address
            # let the workers import torch and the engine while this process computes the sync reference
            from engine.cluster.runners import warm_worker

            client.run(warm_worker, wait=False)
        yield address
    finally:
        _stop(procs)
        log.close()


@pytest.fixture(scope="module")
def sync_result(digits_store) -> xr.Dataset:
    return engine.attribute(digits_store, queries="val[:2]", by="sample,step", steps=slice(2, 12), client="sync",
                            progress=False)


def test_attribute_on_external_scheduler_matches_sync(digits_store, scheduler_address, sync_result):
    assert scheduler_address.startswith("tcp://127.0.0.1:")
    ds = engine.attribute(digits_store, queries="val[:2]", by="sample,step", steps=slice(2, 12),
                          client=scheduler_address, progress=True)
    assert ds.attrs["scheduler"] == f"{scheduler_address} (2 workers)"
    assert ds.attrs["query_groups"] == 2 and ds.attrs["scan"] == "reverse chain"
    # the query-row budget comes from the workers' memory limits (a quarter per task), not from this machine's
    from distributed import Client

    from engine.api import MAX_RESULT_FRACTION
    from engine.cluster.runners import ClientRunner

    with Client(scheduler_address, set_as_default=False) as c:
        task = ClientRunner(c).task_memory()
    assert task is not None and ds.attrs["query_budget"] == int(task * MAX_RESULT_FRACTION)
    assert_results_close(ds, sync_result)
    # one query: the two workers take chunks of updates in parallel instead
    one = engine.attribute(digits_store, queries="val[:1]", by="sample,step", steps=slice(2, 12),
                           client=scheduler_address, progress=False)
    assert one.attrs["n_chunks"] == 5 and one.attrs["scan"] == "parallel chunks"
    assert_results_close(one, sync_result.isel(query=[0]))
    assert identity_error(ds) <= 1e-10


def test_cli_on_external_scheduler_streams_to_zarr(digits_store, scheduler_address, sync_result, tmp_path):
    out = tmp_path / "dist.zarr"
    r = subprocess.run(
        [sys.executable, "-m", "explaind_app.cli", "attribute", str(digits_store), "--queries", "val[:2]",
         "--by", "sample,step", "--steps", "2:12", "--scheduler", scheduler_address, "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=180, check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"scheduler      {scheduler_address} (2 workers)" in r.stdout
    assert "top 5 samples by data" in r.stdout
    assert_results_close(xr.open_zarr(out), sync_result)
