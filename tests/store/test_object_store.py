"""Stores in an object store: record, open, verify and attribute a run at an ``s3://`` URL served by a real
S3-compatible server (moto's server mode on 127.0.0.1, started by the fixture), ``out=`` to a URL, ``memory://``,
credentials that never reach the store, a missing object as a named error, and bad URLs as clear errors.

Credentials reach s3fs only through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL),
as on a real machine; the Dask workers of the cluster test inherit them from this process.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.support.compare import MLP_SPEC, assert_results_close
from tests.support.store_helpers import arrays_of, train

import engine
from engine.topk import open_result
from explaind_store import open_run, storage
from explaind_store.cli import main as cli_main
from explaind_store.integrity import MissingChunkError
from explaind_store.storage import StoreError

s3fs = pytest.importorskip("s3fs", reason="object-store tests need the [s3] extra (s3fs, moto[server])")
moto_server = pytest.importorskip("moto.server", reason="object-store tests need moto[server] (the [s3] extra)")

UPDATES = 6
SECRET = f"explaind-test-secret-{uuid.uuid4().hex}"  # must never appear in any object of any store
KEY_ID = f"EXPLAINDKEY{uuid.uuid4().hex[:12].upper()}"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A real S3 server on loopback, the credentials and endpoint in the environment, and one empty bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir("runs")
        try:
            yield {"fs": fs, "bucket": "runs"}
        finally:
            server.stop()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run recorded to a local directory: what the S3 copy must equal bit for bit."""
    path = tmp_path_factory.mktemp("objstore") / "local.zarr"
    train(path, UPDATES, kind="sgd_momentum", chunk_updates=2, model_spec=MLP_SPEC)
    return path


@pytest.fixture(scope="module")
def s3_run(s3: dict[str, Any]) -> str:
    """The run recorded straight to S3, killed after 4 updates and resumed to 6 (the resume path reads, resizes
    and appends through the object store)."""
    url = "s3://runs/digits.zarr"
    train(url, 4, kind="sgd_momentum", chunk_updates=2, model_spec=MLP_SPEC)
    train(url, UPDATES, kind="sgd_momentum", chunk_updates=2, model_spec=MLP_SPEC, resume=True)
    return url


def objects(fs: Any, prefix: str) -> list[str]:
    return [p for p in fs.find(prefix) if not p.endswith("/")]


def test_record_open_verify_round_trip_on_s3(s3, s3_run, local_run):
    run = open_run(s3_run)
    assert run.path == s3_run and run.committed_updates == UPDATES
    got, want = arrays_of(s3_run), arrays_of(local_run)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert run.params[run.tensor_names[0]].shape[0] == UPDATES + 1  # the lazy xarray view reads through s3 too
    assert run.nbytes_on_disk() == s3["fs"].du("runs/digits.zarr", total=True) > 0
    rep = run.verify(progress=False)
    assert rep.ok and rep.chunks_checked > 0 and rep.gradient_checked, rep.table()


@pytest.fixture(scope="module")
def s3_result(s3, s3_run) -> str:
    """``attribute`` on a process cluster: the workers open the run's URL themselves (the job carries only the URL)
    and write the result to another URL."""
    from distributed import Client, LocalCluster

    url = "s3://runs/result.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        ds = engine.attribute(s3_run, queries="val[:2]", by="sample,tensor", client=client, progress=False, out=url)
        assert ds.attrs["scheduler"].endswith("(1 workers)")  # ran on the cluster, not in this process
    return url


@pytest.mark.distributed
def test_attribute_on_workers_from_s3_with_out_to_s3(s3, s3_result, s3_run, local_run):
    ref = engine.attribute(str(local_run), queries="val[:2]", by="sample,tensor", client="sync", progress=False)
    assert "runs/result.zarr/zarr.json" in objects(s3["fs"], "runs/result.zarr")
    assert_results_close(open_result(s3_result), ref)
    # out= over a run is refused and deletes nothing
    before = objects(s3["fs"], "runs/digits.zarr")
    with pytest.raises(ValueError, match="not an earlier attribution result"):
        engine.attribute(s3_run, queries="val[:1]", client="sync", progress=False, out=s3_run)
    assert objects(s3["fs"], "runs/digits.zarr") == before


def test_cli_records_attributes_and_reads_results_at_urls(s3, s3_run, capsys):
    from explaind_app.cli import main as app_main

    url = "s3://runs/cli/modadd.zarr"
    assert cli_main(["record", "modadd", "--out", url, "--steps", "2", "--p", "7", "--quiet"]) == 0
    assert "modadd.zarr" in capsys.readouterr().out  # the summary (sizes listed from the bucket)
    assert open_run(url).committed_updates == 2
    assert "runs/cli/modadd.zarr/zarr.json" in objects(s3["fs"], "runs/cli/modadd.zarr")  # in the bucket, not ./s3:
    assert cli_main(["record", "modadd", "--out", url, "--steps", "2", "--p", "7", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    res = "s3://runs/cli/result.zarr"
    assert app_main(["attribute", s3_run, "--queries", "val[:1]", "--sync", "--quiet", "--out", res]) == 0
    assert "runs/cli/result.zarr/zarr.json" in objects(s3["fs"], "runs/cli/result.zarr")
    assert app_main(["top", res]) == 0
    assert "query 0" in capsys.readouterr().out.lower()


@pytest.mark.distributed  # it reads the result the cluster wrote too
def test_credentials_are_never_written_into_a_store(s3, s3_run, s3_result):
    fs = s3["fs"]
    keys = objects(fs, "runs")
    assert any(k.startswith("runs/digits.zarr/") for k in keys) and any(k.startswith("runs/result.zarr/") for k in keys)
    port = os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    for key, body in fs.cat(keys).items():  # fetched concurrently
        assert SECRET.encode() not in body and KEY_ID.encode() not in body, key
        assert f"127.0.0.1:{port}".encode() not in body, key  # nor the endpoint


def test_a_missing_object_is_a_named_error(s3, local_run):
    url = "s3://runs/damaged.zarr"
    s3["fs"].put(str(local_run), "runs/damaged.zarr", recursive=True)
    s3["fs"].rm("runs/damaged.zarr/params/0.weight/c/1/0/0")  # steps 2..3
    run = open_run(url)
    with pytest.raises(MissingChunkError, match=r"params/0\.weight \(1 chunk, steps 2\.\.3\)"):
        run.load_params(3)
    rep = run.verify(progress=False, gradients=False, chunks=False)
    assert not rep.ok and "params/0.weight" in rep.table()
    with pytest.raises(StoreError, match=r"params/0\.weight"):
        engine.attribute(url, queries="val[:1]", client="sync", progress=False)
    meta = "runs/damaged.zarr/momentum_buffer/2.weight/zarr.json"
    s3["fs"].pipe_file(meta, s3["fs"].cat_file(meta)[:40])  # a truncated upload of one array's metadata
    with pytest.raises(StoreError, match=r"metadata is damaged: s3://runs/damaged\.zarr/momentum_buffer/2\.weight/"):
        open_run(url)
    s3["fs"].rm("runs/damaged.zarr/zarr.json")
    with pytest.raises(StoreError, match="not a Zarr v3 group"):
        open_run(url)


def test_memory_urls_record_overwrite_and_attribute_in_process():
    url = f"memory://explaind-{uuid.uuid4().hex}/run.zarr"
    train(url, 4, kind="sgd", chunk_updates=2, model_spec=MLP_SPEC)
    assert open_run(url).committed_updates == 4
    train(url, 2, kind="sgd", chunk_updates=2, model_spec=MLP_SPEC, overwrite=True)
    run = open_run(url)
    assert run.committed_updates == 2
    ds = engine.attribute(run, queries="val[:1]", client="sync", progress=False)
    assert ds.attrs["n_chunks"] >= 1
    from engine.cluster.worker import make_job

    with pytest.raises(StoreError, match="client='sync'"):
        make_job(run, None, by_reference=False)  # type: ignore[arg-type]
    storage.remove_tree(storage.location(url))
    assert not storage.exists(url)


def test_bad_urls_say_what_to_fix(s3, tmp_path):
    with pytest.raises(StoreError, match="unknown storage protocol 'nosuch'"):
        open_run("nosuch://bucket/run.zarr")
    with pytest.raises(StoreError, match="names no store"):
        open_run("s3://")
    with pytest.raises(StoreError, match="does not exist"):
        open_run("s3://no-such-bucket/run.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        open_run("s3://runs/never-recorded.zarr")
    with pytest.raises(StoreError, match="unknown storage protocol"):
        train("nosuch://bucket/run.zarr", 2, kind="sgd", chunk_updates=2)
    # a filesystem package that is not installed is named with what to install
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StoreError, match="needs gcsfs"):
            open_run("gs://bucket/run.zarr")
    # file:// URLs are local paths
    assert storage.location(f"file://{tmp_path}/x.zarr") == tmp_path / "x.zarr"
