"""A store's root attributes are untrusted: a damaged or hostile zarr.json is refused when the store is opened, with
a StoreError naming the attribute (never a bare KeyError/TypeError from deep inside, a hang, or a path outside the
store), by ``open_run``, ``explaind verify`` and ``engine.attribute``; names that cannot be paths are refused when
recording."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.support.store_helpers import digits, make_mlp, train
from torch import nn

import engine
from explaind_app.cli import main as cli_main
from explaind_store import Recorder, open_run
from explaind_store.recorder import RecorderError
from explaind_store.metadata import valid_name
from explaind_store.storage import StoreError


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("attrs") / "r.zarr"
    train(path, 6, kind="adamw", chunk_updates=2)
    return path


def _edit(recorded: Path, tmp_path: Path, edit: Any) -> Path:
    dst = tmp_path / "edited.zarr"
    shutil.copytree(recorded, dst)
    doc = json.loads((dst / "zarr.json").read_text())
    edit(doc["attributes"])
    (dst / "zarr.json").write_text(json.dumps(doc))
    return dst


def _set(key: str, value: Any) -> Any:
    def edit(a: dict[str, Any]) -> None:
        if value is _DELETE:
            a.pop(key)
        else:
            a[key] = value
    return edit


_DELETE = object()


def _first_tensor(**changes: Any) -> Any:
    def edit(a: dict[str, Any]) -> None:
        a["tensors"][0] = {**a["tensors"][0], **changes}
    return edit


def _group(**changes: Any) -> Any:
    def edit(a: dict[str, Any]) -> None:
        a["optimizer"]["groups"][0] = {**a["optimizer"]["groups"][0], **changes}
    return edit


def _drop_last_tensor(a: dict[str, Any]) -> None:
    a["tensors"] = a["tensors"][:-1]


def _split(name: str) -> Any:
    def edit(a: dict[str, Any]) -> None:
        a["data"]["splits"][name] = a["data"]["splits"].pop("val")
    return edit


# (edit, the attribute the message must name)
DAMAGE = [
    (_set("format_version", "x"), "format_version"),
    (_set("committed_updates", None), "committed_updates"),
    (_set("committed_updates", 10**12), "committed_updates"),  # hung (loops sized by it) before
    (_set("committed_updates", True), "committed_updates"),
    (_set("chunk_updates", 0), "chunk_updates"),
    (_set("chunk_updates", 3), "chunk_updates"),  # not the arrays' chunking
    (_set("checkpoint_every", -1), "checkpoint_every"),
    (_set("tensors", _DELETE), "tensors"),
    (_first_tensor(name="../../escape"), "tensors[0].name"),
    (_first_tensor(name="w/x"), "tensors[0].name"),
    (_first_tensor(shape="8,8"), "tensors[0].shape"),
    (_first_tensor(shape=[-1]), "tensors[0].shape[0]"),
    (_first_tensor(dtype="object"), "tensors[0].dtype"),
    (_drop_last_tensor, "optimizer.groups"),
    (_set("state_names", []), "state_names"),
    (_set("state_names", ["exp_avg", "../x"]), "state_names[1]"),
    (_set("optimizer", {"type": "Evil", "groups": []}), "optimizer.type"),
    (_group(lr="0.1"), "optimizer.groups[0].lr"),
    (_group(betas=[0.9]), "optimizer.groups[0].betas"),
    (_group(eps=float("inf")), "optimizer.groups[0].eps"),
    (_set("loss", {"kind": "hinge"}), "loss.kind"),
    (_set("data", {"splits": {}}), "data.splits"),
    (_split("../val"), "data.splits"),
    (_set("nonfinite_updates", "all"), "nonfinite_updates"),
    (_set("train_mode", {}), "train_mode.training"),
    (_set("rng", {"device": "cpu; rm -rf", "dtype": "float32"}), "rng.device"),
    (_set("scheduler_state", [1, 2]), "scheduler_state"),
]


@pytest.mark.parametrize("edit,key", DAMAGE, ids=[k for _, k in DAMAGE])
def test_damaged_root_attributes_are_a_named_store_error(recorded, tmp_path, edit, key):
    store = _edit(recorded, tmp_path, edit)
    with pytest.raises(StoreError) as info:
        open_run(store)
    msg = str(info.value)
    assert f"'{key}'" in msg or f"{key} in its zarr.json" in msg, msg
    assert "record the run again" in msg and msg.isprintable() and len(msg) < 1000


@pytest.mark.parametrize("edit,key", [DAMAGE[2], DAMAGE[8]], ids=["commit-past-arrays", "name-traversal"])
def test_verify_and_attribute_refuse_them_too(recorded, tmp_path, edit, key, capsys):
    store = _edit(recorded, tmp_path, edit)
    assert cli_main(["verify", str(store)]) != 0
    assert key.split("[")[0] in capsys.readouterr().err
    with pytest.raises(StoreError):
        engine.attribute(store, queries="val[:1]", by="step", client="sync", progress=False)


def test_the_recorded_store_and_a_store_killed_while_created_still_open(recorded, tmp_path):
    assert open_run(recorded).committed_updates == 6
    # a kill during creation leaves only the first attributes: still recognised (resume/overwrite start over)
    def created_only(a: dict[str, Any]) -> None:
        for k in [k for k in a if k not in ("format", "format_version")]:
            a.pop(k)
        a["committed_updates"] = -1

    killed = _edit(recorded, tmp_path, created_only)
    with pytest.raises(StoreError, match="no committed step yet"):
        open_run(killed)
    train(killed, 2, kind="adamw", chunk_updates=2, resume=True)
    assert open_run(killed).committed_updates == 2


def test_names_that_cannot_be_paths_are_refused_when_recording(tmp_path):
    assert valid_name("blocks.0.attn.W_Q") and valid_name("layer-1.weight")
    for bad in ("", ".", "..", "a..b", ".a", "a/b", "a\\b", "a\nb", 5, "x" * 600):
        assert not valid_name(bad), bad
    model = make_mlp()
    model.add_module("a/b", nn.Linear(2, 2))  # torch allows '/' in a module name
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits()
    with pytest.raises(RecorderError, match="cannot name arrays"):
        Recorder(tmp_path / "r.zarr", model, opt, data=(x, y))
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="split names"):
        Recorder(tmp_path / "s.zarr", model, opt, data=(x, y), splits={"../val": (x[:4], y[:4])})
    assert not (tmp_path / "s.zarr").exists()


def _edit_array(recorded: Path, tmp_path: Path, path: str, edit: Any) -> Path:
    dst = tmp_path / "edited.zarr"
    shutil.copytree(recorded, dst)
    doc = json.loads((dst / path / "zarr.json").read_text())
    edit(doc)
    (dst / path / "zarr.json").write_text(json.dumps(doc))
    return dst


def _arr(**changes: Any) -> Any:
    return lambda d: d.update(changes)


P0 = "params/0.weight"
ARRAY_DAMAGE = [
    (P0, lambda d: d["codecs"].insert(0, {"name": "numcodecs.pickle"}), "codecs"),
    (P0, lambda d: d["codecs"].insert(0, {"name": "mypkg.codec", "configuration": {}}), "codecs"),
    (P0, _arr(data_type="string"), "data type"),
    (P0, _arr(data_type="float64"), "data type"),
    (P0, lambda d: d.update(shape=[d["shape"][0], 1, d["shape"][1] * d["shape"][2]]), "shape"),
    (P0, lambda d: d.update(shape=[2, *d["shape"][1:]]), "shape"),
    (P0, lambda d: d.update(shape=[d["shape"][0], 10**9, 10**9]), "chunk count"),  # hung before
    (P0, _arr(dimension_names=["step", None, None]), "dimension names"),
    (P0, _arr(dimension_names=["x", "y", "z"]), "dimension names"),
    (P0, _arr(storage_transformers=[{"name": "mypkg.transformer"}]), "storage transformers"),
    ("updates/lr", lambda d: d.update(shape=[2, *d["shape"][1:]]), "committed_updates"),
    ("updates/batch_size", _arr(fill_value="NaN"), "fill value"),
    ("data/val/inputs", lambda d: d.update(shape=[d["shape"][0] + 1, *d["shape"][1:]]), "shape"),
]


@pytest.mark.parametrize("path,edit,what", ARRAY_DAMAGE, ids=[f"{p}:{w}" for p, _, w in ARRAY_DAMAGE])
def test_damaged_array_metadata_is_a_named_store_error_before_zarr_reads_it(recorded, tmp_path, path, edit, what):
    """No codec, data type or shape from a store reaches zarr unchecked: an unknown codec (the only way a store could
    ask for unpickling), a variable-length type, a shape the root attributes contradict or too many chunks to
    enumerate is refused at open, naming the array."""
    store = _edit_array(recorded, tmp_path, path, edit)
    with pytest.raises(StoreError) as info:
        open_run(store)
    msg = str(info.value)
    assert what in msg and (path in msg or what == "committed_updates"), msg
    assert msg.isprintable() and len(msg) < 1000


def _edit_values(recorded: Path, tmp_path: Path, path: str, sel: Any, value: Any) -> Path:
    import zarr

    dst = tmp_path / "values.zarr"
    shutil.copytree(recorded, dst)
    arr = zarr.open_array(str(dst / path), mode="r+")
    arr[sel] = value
    return dst


VALUE_DAMAGE = [
    ("updates/batch", (3, 0), -7, "sample index -7"),  # python would read it from the end of the data
    ("updates/batch", (3, 0), 10**12, "sample index 1000000000000"),
    ("updates/opt_step", 3, 0, "step counter reads 0"),  # Adam's bias correction divided by zero
    ("updates/opt_step", 4, 99, "step counter reads 99"),
    ("updates/lr", (3, 0), float("nan"), "its lr is [nan"),
    ("updates/weight_decay", (3, 1), -1.0, "its weight_decay is"),
    ("updates/grad_scale", 3, float("inf"), "its grad_scale is [inf]"),
]


@pytest.mark.parametrize("path,sel,value,match", VALUE_DAMAGE, ids=[m for *_, m in VALUE_DAMAGE])
def test_per_update_records_are_checked_before_they_index_or_scale_anything(recorded, tmp_path, path, sel, value,
                                                                             match):
    store = _edit_values(recorded, tmp_path, path, sel, value)
    run = open_run(store)  # the metadata is fine; the values are read per block
    match = re.escape(match)
    with pytest.raises(StoreError, match=match) as info:
        run.update_records(0, 6)
    assert "update" in str(info.value) and "record the run again" in str(info.value)
    with pytest.raises(StoreError, match=match):
        run.verify()
    with pytest.raises(StoreError, match=match):
        engine.attribute(store, queries="val[:1]", by="step", client="sync", progress=False)
