"""Sparse checkpoints: parameters and optimizer state stored every K updates, the steps between replayed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.support.store_helpers import arrays_of, make_mlp, train

from explaind_store import RecorderError, open_run, schema
from explaind_store.cli import main as cli_main
from explaind_store.integrity import MissingChunkError

ROOT = Path(__file__).resolve().parents[2]



def _chunk_steps(path: Path, array: str) -> list[int]:
    """Steps that have a chunk file (``params`` arrays of a sparse run hold one step per chunk, in flat-named files
    ``c.<step>.<i>...``, so that a stored step makes no directories)."""
    assert not (path / array / "c").exists()
    return sorted(int(c.name.split(".")[1]) for c in (path / array).glob("c.*"))


def test_sparse_store_writes_parameters_and_state_only_at_checkpoints(tmp_path, one_thread):
    train(tmp_path / "k1", 10, kind="adamw", chunk_updates=4)
    train(tmp_path / "k4", 10, kind="adamw", chunk_updates=4, checkpoint_every=4)
    run = open_run(tmp_path / "k4", model_factory=make_mlp)
    assert run.attrs[schema.ATTR_CHECKPOINT_EVERY] == 4 and run.checkpoint_every == 4
    assert run.checkpoint_steps.tolist() == [0, 4, 8, 10]  # 0, every K, and the end (close)
    np.testing.assert_array_equal(run.updates[schema.CHECKPOINT].values,
                                  [s in (0, 4, 8, 10) for s in range(11)])
    for group in (schema.PARAMS, schema.EXP_AVG, schema.EXP_AVG_SQ):
        assert _chunk_steps(tmp_path / "k4", f"{group}/0.weight") == [0, 4, 8, 10]
    # every update keeps what replay needs
    dense = open_run(tmp_path / "k1")
    for name in (schema.LR, schema.WEIGHT_DECAY, schema.BATCH, schema.GRAD_SCALE, schema.OPT_STEP, schema.LOSS):
        np.testing.assert_array_equal(run.updates[name].values, dense.updates[name].values)
    sizes = {k: sum(f.stat().st_size for f in (tmp_path / k / "params").rglob("*") if f.is_file()) for k in ("k1", "k4")}
    assert sizes["k4"] < 0.6 * sizes["k1"]
    assert open_run(tmp_path / "k1").checkpoint_every == 1 and not dense.sparse


@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum"])
@pytest.mark.parametrize("k", [4, 16])
def test_replay_reproduces_a_dense_recording_bit_for_bit(tmp_path, one_thread, kind, k):
    steps = 20
    train(tmp_path / "dense", steps, kind=kind, chunk_updates=4)
    train(tmp_path / "sparse", steps, kind=kind, chunk_updates=4, checkpoint_every=k)
    dense = open_run(tmp_path / "dense", model_factory=make_mlp)
    run = open_run(tmp_path / "sparse", model_factory=make_mlp)
    assert run.sparse and run.checkpoint_steps.tolist() == sorted({*range(0, steps + 1, k), steps})
    stored = run.params.coords[schema.STORED].values
    assert stored.tolist() == [run.is_stored(s) for s in range(steps + 1)] and not stored.all()
    for group in (schema.PARAMS, *run.state_names):
        a = dense.params if group == schema.PARAMS else dense.state(group)
        b = run.params if group == schema.PARAMS else run.state(group)
        for name in run.tensor_names:
            np.testing.assert_array_equal(b[name].values, a[name].values, err_msg=f"{group}/{name}")
    for s in (1, k - 1, steps - 1):
        for name, value in run.load_params(s).items():
            torch.testing.assert_close(value, dense.load_params(s)[name], rtol=0, atol=0)
        sel = run.sel(step=s, tensor=run.tensor_names[0])[schema.PARAMS][run.tensor_names[0]].values
        np.testing.assert_array_equal(sel, dense.load_params(s)[run.tensor_names[0]].numpy())
    x = torch.randn(3, 64)
    torch.testing.assert_close(run.model(steps - 1)(x), dense.model(steps - 1)(x), rtol=0, atol=0)
    for lo, hi in [(0, k), (1, steps), (k, steps)]:
        a, b = dense.block(lo, hi), run.block(lo, hi)
        for name in run.tensor_names:
            torch.testing.assert_close(b.params[name], a.params[name], rtol=0, atol=0)
            for sn in run.state_names:
                torch.testing.assert_close(b.state[sn][name], a.state[sn][name], rtol=0, atol=0)
        assert b.stored_end is not None if run.is_stored(hi) else b.stored_end is None


def test_killed_sparse_recording_resumes_from_its_last_checkpoint(tmp_path, one_thread):
    ref, path = tmp_path / "ref", tmp_path / "crash"
    train(ref, 20, kind="adamw", chunk_updates=3, checkpoint_every=4)
    # a recording killed after update 14 was committed (flushed), before close: its last checkpoint is update 12
    script = (
        "import os, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from explaind_store import recorder\n"
        "def die(self):\n"
        "    self._writer.flush()\n"
        "    os._exit(0)\n"
        "recorder.Recorder.close = die\n"
        "from tests.support.store_helpers import train\n"
        f"train({str(path)!r}, 14, kind='adamw', chunk_updates=3, checkpoint_every=4)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)
    run = open_run(path, model_factory=make_mlp)
    assert run.committed_updates == 14 and run.checkpoint_steps.tolist() == [0, 4, 8, 12]
    full = open_run(ref, model_factory=make_mlp)
    for name, value in run.load_params(14).items():  # the updates after the last checkpoint read by replay
        torch.testing.assert_close(value, full.load_params(14)[name], rtol=0, atol=0)
    with pytest.raises(RecorderError, match="checkpoint_every=4"):
        train(path, 20, kind="adamw", chunk_updates=3, resume=True, checkpoint_every=2)
    train(path, 20, kind="adamw", chunk_updates=3, resume=True)
    a, b = arrays_of(ref), arrays_of(path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert open_run(path).checkpoint_steps.tolist() == [0, 4, 8, 12, 16, 20]


def test_missing_checkpoint_chunk_is_reported_and_steps_between_are_not(tmp_path, one_thread):
    train(tmp_path / "r", 10, kind="adamw", chunk_updates=4, checkpoint_every=4)
    run = open_run(tmp_path / "r", model_factory=make_mlp)
    assert run.verify(gradients=False).ok  # steps 1-3, 5-7, 9 have no chunk files, on purpose
    key = run.root["params/0.weight"].metadata.encode_chunk_key((8, 0, 0))  # c.8.0.0 (flat keys)
    (tmp_path / "r" / "params" / "0.weight" / key).unlink()
    run = open_run(tmp_path / "r", model_factory=make_mlp)
    report = run.verify(gradients=False)
    assert [(m["array"], m["first"]) for m in report.missing_chunks] == [("params/0.weight", 8)]
    with pytest.raises(MissingChunkError, match="params/0.weight"):
        run.load_params(8)


def test_cli_records_with_checkpoint_every(tmp_path, one_thread):
    out = str(tmp_path / "m.zarr")
    assert cli_main(["record", "modadd", "--p", "7", "--steps", "5", "--checkpoint-every", "2", "--out", out,
                     "--quiet"]) == 0
    run = open_run(out)
    assert run.checkpoint_every == 2 and run.checkpoint_steps.tolist() == [0, 2, 4, 5]
    assert np.isfinite(run.load_params(3)[run.tensor_names[0]].numpy()).all()


def test_verify_reports_the_replay_residual_per_checkpoint(tmp_path, one_thread, capsys):
    import json

    import zarr

    from tests.support.compare import MLP_SPEC

    train(tmp_path / "r", 10, kind="adamw", chunk_updates=4, checkpoint_every=4, model_spec=MLP_SPEC)
    report = open_run(tmp_path / "r").verify()
    assert report.ok and [c["step"] for c in report.checkpoint_replay] == [4, 8, 10]
    assert all(c["max_abs"] == 0.0 for c in report.checkpoint_replay)  # one thread: bit-exact
    arr = zarr.open_array(str(tmp_path / "r" / "params" / "0.weight"), mode="r+")
    value = np.asarray(arr[8])
    value[0] += 1e-2  # a checkpoint changed after recording
    arr[8] = value
    report = open_run(tmp_path / "r").verify(gradients=False)
    assert not report.ok and "checkpoint 8" in report.problems[-1]
    by_step = {c["step"]: c for c in report.checkpoint_replay}
    assert by_step[4]["max_abs"] == 0.0 and by_step[8]["max_abs"] == pytest.approx(1e-2, rel=1e-4)
    assert "checkpoint 8: replayed - stored" in report.table()
    assert cli_main(["verify", str(tmp_path / "r"), "--json", "--no-gradients"]) != 0
    out = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in out["checkpoint_replay"]] == [4, 8, 10]
    train(tmp_path / "nospec", 6, kind="adamw", chunk_updates=4, checkpoint_every=4)
    report = open_run(tmp_path / "nospec").verify(gradients=False)
    assert not report.ok and "could not be replayed" in report.problems[-1] and "model_factory" in report.problems[-1]
