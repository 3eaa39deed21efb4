"""Integrity: a missing chunk file, changed data or a NaN result is a named error, never a quiet wrong answer.

Each test damages a copy of one small real run (the digits MLP, SGD with momentum, store chunks of 2 updates, a val
split) and expects ``verify``, the CLI, the reader and ``engine.attribute`` to name what is wrong.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tests.support.compare import MLP_SPEC
from tests.support.store_helpers import digits, train

import engine
from explaind_store import storage
from explaind_store import open_run, schema
from explaind_store.cli import main as cli_main
from explaind_store.storage import StoreError

UPDATES = 8  # steps 0..8: chunk rows 0..4 of 2 steps each

# one chunk file of each kind of array, and the array path the error must name
CHUNKS = {
    "parameter": ("params/0.weight", "c/2/0/0"),  # steps 4..5
    "optimizer state": ("momentum_buffer/2.weight", "c/1/0/0"),  # steps 2..3
    "per-update lr": ("updates/lr", "c/3/0"),  # updates 6..7
    "per-update batch": ("updates/batch", "c/1/0"),
    "train data": ("data/train/inputs", "c/0/0"),
    "val inputs": ("data/val/inputs", "c/0/0"),
    "val targets": ("data/val/targets", "c/0"),
}


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "digits.zarr"
    train(path, UPDATES, kind="sgd_momentum", chunk_updates=2, model_spec=MLP_SPEC)
    return path


@pytest.fixture
def store(clean_store: Path, tmp_path: Path) -> Path:
    """A private copy of the clean run, to damage."""
    dst = tmp_path / "copy.zarr"
    shutil.copytree(clean_store, dst)
    return dst


def delete_chunk(store: Path, array: str, key: str) -> None:
    f = store / array / key
    assert f.is_file(), f"{f} should exist in a freshly recorded store"
    f.unlink()


def attribute(path: Path, **kw):
    return engine.attribute(str(path), queries="val[:3]", by="sample", client="sync", progress=False, **kw)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli_main(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("kind", list(CHUNKS))
def test_a_missing_chunk_is_a_named_error_in_verify_cli_and_attribute(store, kind, capsys):
    array, key = CHUNKS[kind]
    delete_chunk(store, array, key)
    rep = open_run(store).verify()
    assert not rep.ok, rep.table()
    assert any(array in p for p in rep.problems), rep.problems
    assert "missing chunk" in rep.table() and array in rep.table()
    rc, text = cli(["verify", str(store)], capsys)
    assert rc != 0 and array in text, text
    with pytest.raises(StoreError, match=array.replace(".", r"\.")):
        attribute(store)


def test_missing_step_chunks_fail_the_readers_and_name_the_steps(store):
    delete_chunk(store, "params/0.weight", "c/2/0/0")
    run = open_run(store)
    with pytest.raises(StoreError, match=r"params/0\.weight .*steps 4\.\.5"):
        run.block(4, 6)
    with pytest.raises(StoreError, match=r"params/0\.weight"):
        run.load_params(5)
    with pytest.raises(StoreError, match=r"params/0\.weight"):
        run.params  # noqa: B018 - the lazy view checks its chunks when opened
    with pytest.raises(StoreError, match=r"steps=slice\(0, 3\)"):
        run.block(2, 4)  # the message suggests a window that avoids the damage
    run.load_params(3)  # steps outside the missing chunk still read
    run.block(0, 3)


def test_a_window_that_avoids_a_missing_chunk_still_decomposes(store, clean_store):
    delete_chunk(store, "params/0.weight", "c/3/0/0")  # steps 6..7
    got = attribute(store, steps=slice(0, 5))
    ref = attribute(clean_store, steps=slice(0, 5))
    np.testing.assert_allclose(got["data"].values, ref["data"].values, rtol=0, atol=0)


def test_changed_data_fails_its_checksum(store, capsys):
    arr = zarr.open_array(str(store / "data/val/inputs"), mode="r+")
    arr[0, 5] = float(arr[0, 5]) + 1.0  # a valid chunk (its CRC matches) holding different data
    rep = open_run(store).verify()
    assert not rep.ok and rep.data_checksums["val"] == "mismatch", rep.table()
    assert any("'val'" in p and "checksum" in p for p in rep.problems), rep.problems
    rc, text = cli(["verify", str(store)], capsys)
    assert rc != 0 and "data checksums" in text and "FAIL" in text, text
    with pytest.raises(StoreError, match=r"split 'val'.*checksum"):
        attribute(store)
    with pytest.raises(StoreError, match=r"split 'val'"):
        open_run(store).split("val")


def test_a_flipped_byte_in_a_data_chunk_is_an_error(store):
    chunk = store / "data/train/inputs/c/0/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    rep = open_run(store).verify()
    assert not rep.ok and any(b["array"] == "data/train/inputs" for b in rep.bad_chunks), rep.table()
    with pytest.raises(StoreError, match=r"data/train/inputs"):
        attribute(store)


def test_a_clean_store_verifies_and_attributes(store):
    rep = open_run(store).verify()
    assert rep.ok and not rep.missing_chunks, rep.table()
    assert rep.data_checksums == {"train": "ok", "val": "ok"}
    ds = attribute(store)
    assert np.isfinite(ds["data"].values).all()


def test_foreign_files_in_the_store_folder_are_skipped_quietly(store, recwarn):
    """A README or .DS_Store someone drops into a store folder holds no data of the run: no zarr warning about it,
    and a missing chunk elsewhere is still found."""
    (store / "README.txt").write_text("notes on this run")
    (store / "params" / ".DS_Store").write_bytes(b"\x00\x01")
    rep = open_run(store).verify()
    assert rep.ok and rep.chunks_checked > 0, rep.table()
    attribute(store)
    assert not [w for w in recwarn if "Zarr hierarchy" in str(w.message)], [str(w.message) for w in recwarn]
    delete_chunk(store, *CHUNKS["parameter"])
    assert open_run(store).verify().missing_chunks


def test_every_chunk_is_written_even_when_it_equals_the_fill_value(tmp_path):
    # chunk_updates=1: row 0 of the per-update arrays is all fill (index 0 is empty on purpose); zarr's default
    # skips writing such a chunk, so a deleted file could not be told from it
    train(tmp_path / "r", 2, kind="sgd", chunk_updates=1, model_spec=MLP_SPEC)
    for name in (schema.LR, schema.BATCH_SIZE, schema.GRAD_SCALE):
        assert (tmp_path / "r" / schema.UPDATES / name / "c" / "0").exists() or \
            (tmp_path / "r" / schema.UPDATES / name / "c" / "0" / "0").exists(), name
    assert (tmp_path / "r" / schema.UPDATES / schema.BATCH / "c" / "0" / "0").exists()
    assert open_run(tmp_path / "r").attrs[schema.ATTR_EVERY_CHUNK] is True


def test_older_stores_with_legitimately_absent_fill_chunks_still_read(store):
    """Stores from writers that skipped all-fill chunks: an all-zero targets chunk and the loss record (all NaN when
    no loss was given) had no file. They verify and decompose; the data is still covered by its checksum."""
    root = zarr.open_group(str(store), mode="r+")
    x_val = np.asarray(root["data/val/inputs"][...])
    zeros = np.zeros(len(x_val), dtype=np.int64)
    data_attrs = root.attrs[schema.ATTR_DATA]
    data_attrs["splits"]["val"]["fingerprint"] = storage.fingerprint(x_val, zeros)
    attrs = {schema.ATTR_DATA: data_attrs}
    root.attrs.update(attrs)
    root.attrs.__delitem__(schema.ATTR_EVERY_CHUNK)
    delete_chunk(store, "data/val/targets", "c/0")  # all zeros = the fill value
    for key in ("c/0", "c/2"):
        delete_chunk(store, "updates/loss", key)
    run = open_run(store)
    rep = run.verify()
    assert rep.ok, rep.table()
    assert (run.split("val")[1] == 0).all()
    ds = attribute(store)
    assert np.isfinite(ds["data"].values).all()
    # but a missing parameter chunk is damage in any store
    delete_chunk(store, "params/0.bias", "c/1/0")
    assert not open_run(store).verify().ok


def test_nan_in_a_result_is_an_error_not_a_quiet_total(store, tmp_path):
    x, y = digits()
    xq = x[:3].clone()
    xq[1, 7] = float("nan")
    kw = dict(by="sample,step", client="sync", progress=False)
    with pytest.raises(FloatingPointError, match=r"NaN/inf in \[.*'data'.*query 1") as err:
        engine.attribute(str(store), xq, y[:3], output="target_logprob", **kw)
    assert np.isnan(err.value.result["data"].values).any()  # kept for inspection
    out = tmp_path / "res.zarr"
    with pytest.raises(FloatingPointError, match=str(out)):
        engine.attribute(str(store), xq, y[:3], output="target_logprob", out=str(out), **kw)


def test_summaries_do_not_skip_nan(store):
    from explaind_app.cli import summarize
    from engine.result import finalize_attrs

    ds = attribute(store)
    ds["data"][0, 0, 3] = np.nan
    ds["residual"][1, 0, 2] = np.nan
    text = summarize(ds)
    assert "data +nan" in text and "not ranked" in text
    assert np.isnan(finalize_attrs(ds).attrs["max_abs_residual"])


def test_a_store_read_through_a_store_object_is_checked_too(store):
    delete_chunk(store, "updates/lr", "c/1/0")
    from zarr.storage import LocalStore, LoggingStore

    run = open_run(store, store=LoggingStore(LocalStore(str(store), read_only=True)))
    with pytest.raises(StoreError, match=r"updates/lr .*steps 2\.\.3"):
        run.block(1, 3)
    assert torch.is_tensor(run.block(4, 6).lr)
