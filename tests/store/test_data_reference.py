"""Data by reference: a store names its training data with a trusted dataset factory plus a fingerprint instead of
holding it (issue 16, point 3), here the built-in byte-level corpus of the standard library's own source files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.store.test_trust import HOSTILE_FACTORIES, hostile_dir  # noqa: F401 - the same battery and fixture

import engine
from explaind_app.cli import main as cli_main
from explaind_store import Recorder, RecorderError, open_run
from explaind_store.examples import corpus
from explaind_store.integrity import DataChecksumError
from explaind_store.specs import (
    BUILTIN_DATASET_FACTORIES,
    FactorySpecError,
    UntrustedFactoryError,
    data_spec,
    load_factory,
    load_trusted,
    model_spec,
)

REFUSED = (UntrustedFactoryError, FactorySpecError)
STDLIB = "explaind_store.examples.corpus:stdlib_bytes"
CONTEXT = 32
TRAIN_KW = {"split": "train", "context": CONTEXT, "max_sequences": 512}
VAL_KW = {"split": "val", "context": CONTEXT, "max_sequences": 8}


def record(path: Path, steps: int = 3, **rec_kwargs) -> None:
    torch.manual_seed(0)
    train = corpus.stdlib_bytes(**TRAIN_KW)
    val = corpus.stdlib_bytes(**VAL_KW)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    with Recorder(path, model, opt, data=train, splits={"val": val}, loss="causal_lm",
                  model_spec=model_spec("explaind_store.examples.tiny:make_byte_lm"), **rec_kwargs) as rec:
        for s in range(1, steps + 1):
            idx = torch.arange(8 * s, 8 * s + 8)
            logits = model(x[idx])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), y[idx][:, 1:].reshape(-1),
                                                     ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(idx, loss=loss.item())


SPECS = {"train": data_spec(STDLIB, **TRAIN_KW), "val": data_spec(STDLIB, **VAL_KW)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dataref") / "r.zarr"
    record(path, store_data=False, data_specs=SPECS)
    return path


def _set_data_spec(store: Path, split: str, spec: object) -> None:
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["data"]["splits"][split]["spec"] = spec
    meta.write_text(json.dumps(doc))


def _copy(recorded: Path, tmp_path: Path, split: str, spec: object) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(recorded, dst)
    _set_data_spec(dst, split, spec)
    return dst


def test_the_store_holds_no_data_and_reads_it_through_the_factory(recorded, tmp_path):
    assert not (recorded / "data").exists()
    info = open_run(recorded).attrs["data"]["splits"]["train"]
    assert info["mode"] == "reference" and info["spec"] == {"factory": STDLIB, "kwargs": TRAIN_KW}
    # the same run with its data stored is larger by about the data's size
    stored = tmp_path / "stored.zarr"
    record(stored)
    x, y = corpus.stdlib_bytes(**TRAIN_KW)
    run = open_run(recorded)
    assert open_run(stored).nbytes_on_disk() - run.nbytes_on_disk() > (x.nbytes + y.nbytes) / 20
    got_x, got_y = run.split("train")
    assert torch.equal(got_x, torch.from_numpy(x)) and torch.equal(got_y, torch.from_numpy(y))
    assert run.split("train")[0] is got_x  # built once per Run
    assert open_run(recorded).split("train")[0] is got_x  # and once per process (a Dask worker opens it per task)
    assert run.split("val")[0].shape == (8, CONTEXT)
    rep = run.verify()
    assert rep.ok, rep.problems
    assert rep.gradient_checked and rep.data_checksums["train"].startswith("ok")


def test_explicit_data_wins_and_is_checked(recorded):
    x, y = corpus.stdlib_bytes(**TRAIN_KW)
    run = open_run(recorded, data={"train": (x, y)})
    assert run.split("train")[0] is run._attached["train"][0]
    with pytest.raises(Exception, match="not the data this run was trained on"):
        open_run(recorded, data={"train": (x[1:], y[1:])})


def test_cli_verify_info_and_attribute(recorded, capsys):
    assert cli_main(["verify", str(recorded)]) == 0
    assert "RESULT: OK" in capsys.readouterr().out
    assert cli_main(["info", str(recorded)]) == 0
    assert f"train: 512 samples (reference to '{STDLIB}')" in capsys.readouterr().out
    res = engine.attribute(recorded, queries="val[:2]", output="loss", client="sync", progress=False)
    # the engine reads the training data through run.split, built from the data spec: every sample is scored
    assert res.sizes["sample"] == 512 and float(abs(res["data"]).sum()) > 0
    assert res.attrs["max_abs_residual"] < 1e-6


def test_tampered_kwargs_give_other_data_and_a_named_error(recorded, tmp_path, capsys):
    store = _copy(recorded, tmp_path, "train", {"factory": STDLIB, "kwargs": {**TRAIN_KW, "max_sequences": 511}})
    with pytest.raises(DataChecksumError, match=r"split 'train'.*factory gives other data on this machine"):
        open_run(store).split("train")
    rep = open_run(store).verify(max_updates=1)
    assert not rep.ok and rep.data_checksums["train"] == "mismatch"
    assert cli_main(["verify", str(store)]) == 1
    assert "RESULT: FAILED" in capsys.readouterr().out
    # the caller's own data still wins
    x, y = corpus.stdlib_bytes(**TRAIN_KW)
    assert torch.equal(open_run(store, data={"train": (x, y)}).split("train")[1], torch.from_numpy(y))


# the model battery's strings, plus names that are trusted for models but are not dataset factories
DATASET_HOSTILE = [*HOSTILE_FACTORIES, "explaind_store.examples.tiny:make_mlp",
                   "explaind_store.integrations.hf:causal_lm_from_config", "explaind_store.examples.corpus:stdlib_files",
                   "explaind_store.examples.corpus:stdlib_root", "mymodels:Net", "mymodels:NotAModule"]


@pytest.mark.parametrize("factory", DATASET_HOSTILE, ids=lambda f: ascii(f)[:60])
def test_hostile_dataset_factory_is_refused(recorded, hostile_dir, factory, monkeypatch):  # noqa: F811
    marker = hostile_dir / "PWNED"
    if str(factory).startswith("mymodels:"):
        monkeypatch.setenv("EXPLAIND_TRUSTED_MODULES", "mymodels")  # trusted module, but a class is no data factory
    store = _copy(recorded, hostile_dir, "train", {"factory": factory, "kwargs": {"command": f"touch {marker}"}})
    with pytest.raises(REFUSED) as info:
        open_run(store).split("train")
    assert len(str(info.value)) < 1500 and str(info.value).isprintable()
    rep = open_run(store).verify(max_updates=1)
    assert not rep.ok and rep.data_checksums["train"] == "refused"
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["explaind_store.examples.corpus:stdlib_bytes", [1], 3,
                                  {"factory": STDLIB, "kwargs": [1, 2]}])
def test_malformed_data_spec_is_refused(recorded, tmp_path, spec):
    store = _copy(recorded, tmp_path, "val", spec)
    with pytest.raises(FactorySpecError, match="data spec"):
        open_run(store).split("val")
    assert open_run(store).split("train")[0].shape == (512, CONTEXT)  # the other split is unaffected


def test_dataset_and_model_factories_are_trusted_separately():
    assert STDLIB in BUILTIN_DATASET_FACTORIES
    assert load_trusted(STDLIB, "dataset") is corpus.stdlib_bytes
    with pytest.raises(UntrustedFactoryError):
        load_factory(STDLIB)
    with pytest.raises(UntrustedFactoryError, match="dataset factory"):
        load_trusted("explaind_store.examples.tiny:make_byte_lm", "dataset")


def test_recorder_checks_the_spec_before_writing(tmp_path):
    path = tmp_path / "bad.zarr"
    with pytest.raises(RecorderError, match="gives other data"):
        record(path, data_specs={"train": data_spec(STDLIB, **{**TRAIN_KW, "context": 16})})
    assert not path.exists()
    with pytest.raises(UntrustedFactoryError):
        record(path, data_specs={"train": data_spec("os:listdir")})
    assert not path.exists()
    with pytest.raises(RecorderError, match="not given"):
        record(path, data_specs={"test": SPECS["train"]})


def test_corpus_is_deterministic_and_split_by_file():
    a = corpus.stdlib_bytes(**TRAIN_KW)
    b = corpus.stdlib_bytes(**TRAIN_KW)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    x, y = a
    assert x.dtype == np.int64 and x.shape == (512, CONTEXT) and x.min() >= 0 and x.max() < 256
    train, val = corpus.stdlib_files("train"), corpus.stdlib_files("val")
    assert train == sorted(train) and not set(train) & set(val)
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.2
    assert not any("site-packages" in f for f in train + val)
    assert "os.py" in train + val
    # the first file's bytes open the first sequence
    first = (corpus.stdlib_root() / train[0]).read_bytes()[:CONTEXT]
    assert bytes(x[0, : len(first)].astype(np.uint8)) == first
    # the last short piece is padded: id 0 in inputs, -100 (not predicted) in targets
    xs, ys = corpus.stdlib_bytes("val", context=CONTEXT, max_files=1)
    n = len((corpus.stdlib_root() / val[0]).read_bytes())
    pad = xs.size - n
    assert 0 <= pad < CONTEXT and (ys.reshape(-1)[n:] == -100).all() and (xs.reshape(-1)[n:] == 0).all()
    assert np.array_equal(ys.reshape(-1)[:n], xs.reshape(-1)[:n])
