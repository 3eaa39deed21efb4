"""The trajectory store: exact round trip, laziness, verify, crash safety, resume, and bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from tests.support.store_helpers import arrays_of, batch_for, digits, make_mlp, make_optimizer, train
from torch import nn

from explaind_store import Recorder, RecorderError, open_run, schema
from explaind_store.storage import StoreError
from explaind_store.optim import UnsupportedOptimizerError
from explaind_store.reader import CorruptChunkError
from explaind_store.specs import UntrustedFactoryError, model_spec

HERE = Path(__file__).parent
SUPPORT = HERE.parent / "support"


def test_round_trip_is_exact_and_lazy_views_have_named_dims(tmp_path):
    snaps: list[dict[str, torch.Tensor]] = []
    train(tmp_path / "r", 11, kind="adamw", snapshots=snaps)
    run = open_run(tmp_path / "r")
    assert run.committed_updates == 11
    for s, snap in enumerate(snaps):
        for name, value in snap.items():
            np.testing.assert_array_equal(run.params[name].sel(step=s).values, value.numpy())
    # learning rates actually used, per group: LambdaLR halves after 5 updates; group 1 has its own base lr
    lr = run.updates["lr"].values
    assert np.isnan(lr[0]).all()
    np.testing.assert_allclose(lr[1:6], [[1e-2, 3e-3]] * 5)
    np.testing.assert_allclose(lr[6:], [[5e-3, 1.5e-3]] * 6)
    np.testing.assert_allclose(run.updates["weight_decay"].values[1], [0.1, 0.0])
    # variable batch sizes come back exactly
    for s in range(1, 12):
        row = run.updates["batch"].sel(step=s).values
        np.testing.assert_array_equal(row[row >= 0], batch_for(s, 120).numpy())
        assert int(run.updates["batch_size"].sel(step=s)) == len(batch_for(s, 120))
    assert list(run.params.dims)[0] == schema.STEP
    assert run.params["0.weight"].dims == ("step", "0.weight.d0", "0.weight.d1")
    assert isinstance(run.params["0.weight"].data, __import__("dask").array.Array)
    x, y = run.split("val")
    assert x.shape == (10, 64) and y.dtype == torch.int64


def test_plain_xarray_opens_every_group_without_this_package(tmp_path):
    train(tmp_path / "r", 6, kind="adamw")
    for group in ["params", "exp_avg", "exp_avg_sq", "updates", "data/train"]:
        ds = xr.open_zarr(tmp_path / "r", group=group, consolidated=False)
        assert len(ds.data_vars) > 0
    ds = xr.open_zarr(tmp_path / "r", group="params", consolidated=False)
    assert list(ds["step"].values) == list(range(7))


def test_selection_reads_only_needed_chunks(tmp_path):
    train(tmp_path / "r", 23, kind="adamw", chunk_updates=4)
    log = zarr.storage.LoggingStore(zarr.storage.LocalStore(str(tmp_path / "r"), read_only=True))
    run = open_run(tmp_path / "r", store=log)

    def chunk_reads(prefix: str) -> set[str]:
        return {k for k in read_keys if k.startswith(prefix) and "/c/" in k}

    read_keys: list[str] = []
    orig_get = log._store.get

    async def counting_get(key, *a, **k):
        read_keys.append(key)
        return await orig_get(key, *a, **k)

    log._store.get = counting_get
    tree = run.sel(step=slice(9, 11), tensor="0.weight")
    assert not chunk_reads("params/")  # lazy: nothing read yet
    vals = tree["params"]["0.weight"].values
    assert vals.shape == (3, 6, 64)
    # steps 9..11 live in chunk 2 (steps 8..11) only, and only the requested tensor is touched
    assert chunk_reads("params/") == {"params/0.weight/c/2/0/0"}
    read_keys.clear()
    run.params["2.bias"].sel(step=20).values
    assert chunk_reads("params/") == {"params/2.bias/c/5/0"}


@pytest.mark.parametrize("kind", ["adamw", "adam", "adam_nowd", "sgd_momentum", "sgd_nesterov", "sgd"])
def test_verify_passes_for_every_supported_optimizer(tmp_path, kind):
    train(tmp_path / "r", 9, kind=kind, clip=1.0 if kind == "adamw" else None)
    rep = open_run(tmp_path / "r", model_factory=make_mlp).verify()
    assert rep.ok, rep.table()
    assert rep.gradient_checked and rep.checked_updates == 9
    assert rep.gradient_max_rel_error < 1e-4
    assert rep.replay_max_residual < 1e-3
    assert rep.chunks_checked > 0


def test_verify_catches_a_wrong_batch_record(tmp_path):
    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer("adamw", model)
    with Recorder(tmp_path / "r", model, opt, data=(x, y)) as rec:
        for s in range(1, 6):
            idx = batch_for(s, len(x))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(idx if s != 3 else idx + 1, loss=loss.item())  # update 3 lies about its batch
    rep = open_run(tmp_path / "r", model_factory=make_mlp).verify()
    assert not rep.ok
    assert rep.gradient_worst_update == 3
    assert "batch" in rep.table()


def test_cli_info_and_verify_json(tmp_path):
    train(tmp_path / "r", 5, kind="sgd_momentum")
    exe = Path(sys.executable).parent / "explaind"
    out = subprocess.run([exe, "info", str(tmp_path / "r"), "--json"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["committed_updates"] == 5 and info["optimizer"]["type"] == "SGD"
    assert info["compression_ratio"] > 0
    out = subprocess.run([exe, "verify", str(tmp_path / "r"), "--json"], capture_output=True, text=True)
    rep = json.loads(out.stdout)
    assert rep["checked_updates"] == 5
    # the store's model spec is absent, so the gradient check is skipped with a warning, not a failure
    assert out.returncode == 0 and rep["warnings"]
    bad = subprocess.run([exe, "info", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not an explaind store" in bad.stderr


def test_corrupt_chunk_is_reported_by_array_and_index(tmp_path):
    train(tmp_path / "r", 10, kind="adamw", chunk_updates=4)
    chunk = tmp_path / "r" / "params" / "0.weight" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    run = open_run(tmp_path / "r", model_factory=make_mlp)
    rep = run.verify()
    assert not rep.ok
    assert {"array": "params/0.weight", "chunk": [1, 0, 0]} in [
        {k: b[k] for k in ("array", "chunk")} for b in rep.bad_chunks
    ]
    with pytest.raises(CorruptChunkError, match="explaind verify"):
        run.block(4, 8)
    run.block(0, 3)  # chunks before the damage still read


def test_nan_parameters_are_recorded_and_flagged(tmp_path):
    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "r", model, opt, data=(x, y), chunk_updates=4) as rec:
        for s in range(1, 6):
            idx = batch_for(s, len(x))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if s == 4:
                model[0].weight.grad[0, 0] = float("nan")
            opt.step()
            rec.record(idx, loss=loss.item())
    run = open_run(tmp_path / "r", model_factory=make_mlp)
    assert run.nonfinite_updates == [4, 5]
    assert np.isnan(run.params["0.weight"].sel(step=4).values[0, 0])
    rep = run.verify(gradients=False)
    assert not rep.ok and "NaN" in rep.problems[0]


def test_bad_usage_gets_clear_errors_and_loses_nothing(tmp_path):
    x, y = digits()
    model = make_mlp()
    with pytest.raises(UnsupportedOptimizerError, match="AdamW, Adam .* SGD"):
        Recorder(tmp_path / "a", model, torch.optim.RMSprop(model.parameters()), data=(x, y))
    with pytest.raises(UnsupportedOptimizerError, match="amsgrad"):
        Recorder(tmp_path / "a", model, torch.optim.Adam(model.parameters(), amsgrad=True), data=(x, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "a", model, opt, data=(x, y))
    with pytest.raises(RecorderError, match="without an optimizer.step"):
        rec.record([0, 1])
    loss = nn.functional.cross_entropy(model(x[:4]), y[:4])
    loss.backward()
    opt.step()
    rec.record([0, 1, 2, 3])
    with pytest.raises(RecorderError, match="without an optimizer.step"):
        rec.record([0, 1, 2, 3])  # twice for one update
    opt.step()
    with pytest.raises(RecorderError, match="batch index out of range"):
        rec.record([0, 500])
    # one writer per store
    m2 = make_mlp()
    with pytest.raises(RecorderError, match="already writing"):
        Recorder(tmp_path / "a", m2, torch.optim.SGD(m2.parameters(), lr=0.1), data=(x, y), resume=True)
    rec.close()
    # an existing store is never replaced silently
    with pytest.raises(RecorderError, match="overwrite=True"):
        Recorder(tmp_path / "a", model, torch.optim.SGD(model.parameters(), lr=0.1), data=(x, y))
    assert open_run(tmp_path / "a").committed_updates == 1
    # resuming with another model or optimizer is refused, naming the difference
    other = nn.Sequential(nn.Linear(64, 7), nn.Tanh(), nn.Linear(7, 10))
    with pytest.raises(RecorderError, match="0.weight: store shape"):
        Recorder(tmp_path / "a", other, torch.optim.SGD(other.parameters(), lr=0.1), data=(x, y), resume=True)
    with pytest.raises(RecorderError, match="optimizer is AdamW"):
        Recorder(tmp_path / "a", model, torch.optim.AdamW(model.parameters()), data=(x, y), resume=True)
    assert open_run(tmp_path / "a").committed_updates == 1
    # not a store / newer format / no such path
    with pytest.raises(StoreError, match="does not exist"):
        open_run(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a Zarr"):
        open_run(tmp_path / "plain")
    g = zarr.open_group(str(tmp_path / "a"), mode="r+")
    g.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="newer"):
        open_run(tmp_path / "a")
    # a step outside the run
    g.attrs["format_version"] = 1
    with pytest.raises(IndexError, match="outside the recorded steps"):
        open_run(tmp_path / "a").sel(step=slice(0, 7))


class _Opaque:
    """An lr-lambda object whose state (its ``__dict__``) is not JSON."""

    def __init__(self) -> None:
        self.handle = object()

    def __call__(self, epoch: int) -> float:
        return 1.0


def test_changed_hyperparameters_and_opaque_scheduler_are_refused_at_the_step(tmp_path):
    """Both checks run in the step hook (cheaply, every step): the error comes from the offending optimizer.step()
    itself, and what was committed before stays."""
    x, y = digits()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Recorder(tmp_path / "a", model, opt, data=(x, y), chunk_updates=2) as rec:
        for s in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
            opt.step()
            rec.record(list(range(8)))
        opt.param_groups[0]["momentum"] = 0.5
        with pytest.raises(RecorderError, match="group 0 momentum: now 0.5, in the store 0.9"):
            opt.step()
        opt.param_groups[0]["momentum"] = 0.9  # put back: recording goes on
        opt.step()
        rec.record(list(range(8)))
    assert open_run(tmp_path / "a").committed_updates == 4

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _Opaque())
    with Recorder(tmp_path / "b", model, opt, data=(x, y), scheduler=sched) as rec:
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        with pytest.raises(RecorderError, match="not JSON-serialisable"):
            opt.step()


def _params_now(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _record_steps(rec, model, opt, forward, x, y, steps: int, before_step=None) -> list[dict[str, torch.Tensor]]:
    """``steps`` recorded updates on the first 16 samples; the parameters at every step (0 included)."""
    snaps = [_params_now(model)]
    for s in range(steps):
        if before_step is not None:
            before_step(s)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x[:16]), y[:16]).backward()
        opt.step()
        rec.record(list(range(16)))
        snaps.append(_params_now(model))
    return snaps


def _assert_params_are(run, snaps: list[dict[str, torch.Tensor]]) -> None:
    for step, snap in enumerate(snaps):
        got = run.load_params(step)
        for k, v in snap.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (step, k)


def test_mixed_dtype_parameters_are_recorded_exactly(tmp_path):
    """Tensors of one dtype are copied as one packed row per step; a model mixing dtypes falls back to a copy per
    tensor. Both paths give the exact values."""
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))
    model[2].double()

    def forward(xb: torch.Tensor) -> torch.Tensor:
        return model[2](model[1](model[0](xb)).double())

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Recorder(tmp_path / "m", model, opt, data=(x, y), chunk_updates=3) as rec:
        snaps = _record_steps(rec, model, opt, forward, x, y, 5)
    run = open_run(tmp_path / "m")
    _assert_params_are(run, snaps)
    m = run.state(schema.EXP_AVG)["2.weight"].sel(step=5).values
    assert np.array_equal(m, opt.state[model[2].weight]["exp_avg"].numpy())


def test_a_chunk_mixing_packed_and_per_tensor_rows_is_written_exactly(tmp_path):
    """The writer unpacks whatever mix of packed and per-tensor rows a chunk holds (here: packing switched off
    mid-chunk)."""
    x, y = digits()
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def pack_off_after_two(step: int) -> None:
        if step == 2:
            rec._packs = {}  # rows 3.. are copied tensor by tensor

    with Recorder(tmp_path / "p", model, opt, data=(x, y), chunk_updates=4) as rec:
        snaps = _record_steps(rec, model, opt, model, x, y, 6, before_step=pack_off_after_two)
    _assert_params_are(open_run(tmp_path / "p"), snaps)


def test_model_factories_are_only_imported_when_trusted(tmp_path, monkeypatch):
    spec = {"factory": "os:system", "kwargs": {"command": "echo pwned"}}
    train(tmp_path / "r", 2, kind="sgd", model_spec=spec)
    run = open_run(tmp_path / "r")
    with pytest.raises(UntrustedFactoryError, match="not trusted"):
        run.model(1)
    # the caller can vouch for a factory explicitly
    train(tmp_path / "m", 2, kind="sgd", model_spec=model_spec("tests.support.store_helpers:make_mlp", hidden=6), overwrite=True)
    with pytest.raises(UntrustedFactoryError, match="EXPLAIND_TRUSTED_MODULES"):
        open_run(tmp_path / "m").model(2)
    monkeypatch.setenv("EXPLAIND_TRUSTED_MODULES", "some.other,tests.support.store_helpers")
    m = open_run(tmp_path / "m").model(2)
    assert isinstance(m, nn.Module) and not m.training
    snaps: list = []
    train(tmp_path / "m2", 2, kind="sgd", snapshots=snaps)
    m2 = open_run(tmp_path / "m2", model_factory=make_mlp).model(2)
    torch.testing.assert_close(dict(m2.named_parameters())["0.weight"], snaps[2]["0.weight"], rtol=0, atol=0)


def test_lossy_option_is_opt_in_and_recorded(tmp_path):
    snaps: list = []
    train(tmp_path / "r", 4, kind="adamw", snapshots=snaps, lossy_keepbits=10)
    run = open_run(tmp_path / "r")
    lossy = run.attrs["codec"]["lossy"]
    assert lossy["bitround_keepbits"] == 10
    got = run.params["0.weight"].sel(step=3).values
    want = snaps[3]["0.weight"].numpy()
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    assert rel.max() <= lossy["max_relative_error"] * 1.0001 and rel.max() > 0
    train(tmp_path / "e", 2, kind="adamw")
    assert open_run(tmp_path / "e").attrs["codec"]["lossy"] is None


def _committed(path: Path) -> int:
    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["committed_updates"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return -2


def test_kill_9_at_any_moment_then_resume_is_bit_identical(tmp_path):
    steps = 30
    ref = tmp_path / "ref"
    # the reference runs in the same kind of process (same torch thread count) without interruption
    subprocess.run([sys.executable, str(SUPPORT / "crash_worker.py"), str(ref), str(steps), "0", "0"], check=True)
    path = tmp_path / "crash"
    rng = random.Random(1)
    worker = [sys.executable, str(SUPPORT / "crash_worker.py"), str(path), str(steps)]
    kills = 0
    for attempt in range(8):
        before = _committed(path)
        proc = subprocess.Popen([*worker, "1" if attempt else "0", "0.01"], stderr=subprocess.PIPE)
        deadline = time.time() + 60
        target = rng.uniform(0.05, 0.6)  # kill at an arbitrary moment: mid-update, mid-flush or between
        start = time.time()
        while time.time() - start < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()
        c = _committed(path)
        if c >= 0:
            run = open_run(path)  # opens and reads cleanly up to the commit point
            assert run.committed_updates == c >= max(before, 0)
            assert not np.isnan(run.params["0.weight"].values).any()
            run.block(0, c) if c > 0 else None
        if c == steps:
            break
    assert kills >= 2
    if _committed(path) < steps:
        subprocess.run([*worker, "1", "0"], check=True)
    a, b = arrays_of(ref), arrays_of(path)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_refresh_sees_updates_committed_after_a_block_was_read(tmp_path):
    """``Run.block`` caches opened arrays (their shapes); ``refresh()`` must drop them, or the updates committed
    since would read as missing."""
    path = tmp_path / "grow.zarr"
    train(path, 4, chunk_updates=2)
    run = open_run(path)
    first = run.block(0, 4)
    train(path, 8, resume=True, chunk_updates=2)
    assert run.committed_updates == 4  # not yet refreshed
    run.refresh()
    assert run.committed_updates == 8
    blk = run.block(2, 8)
    assert len(blk.batches) == 6 and all(len(b) > 0 for b in blk.batches)
    name = run.tensor_names[0]
    assert blk.params[name].shape[0] == 7 and np.isfinite(blk.params[name].numpy()).all()
    torch.testing.assert_close(blk.params[name][:3], first.params[name][2:5], rtol=0, atol=0)


class MaskedLinear(torch.nn.Module):
    """A model with a non-persistent buffer (not in its state dict), as causal masks often are."""

    def __init__(self, with_mask: bool = True) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
        if with_mask:
            self.register_buffer("mask", (torch.arange(64) % 3 != 0).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.mask if hasattr(self, "mask") else x)


def test_a_model_with_a_non_persistent_buffer_records_and_rebuilds(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data[:64], dtype=torch.float32), torch.tensor(d.target[:64])
    torch.manual_seed(0)
    model = MaskedLinear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with Recorder(tmp_path / "m.zarr", model, opt, data=(x, y)) as rec:
        for s in range(3):
            idx = torch.arange(16 * s, 16 * s + 16)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.record(idx)
    run = open_run(tmp_path / "m.zarr", model_factory=MaskedLinear)
    rebuilt = run.model(3)
    assert torch.equal(rebuilt.mask, model.mask)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert run.verify(chunks=False).ok
    # a factory that builds another model (no such buffer) is named, not a KeyError
    other = open_run(tmp_path / "m.zarr", model_factory=lambda: MaskedLinear(with_mask=False))
    with pytest.raises(StoreError, match="static tensor 'mask'"):
        other.model(3)


def test_tensor_batches_are_range_checked_at_both_ends_and_stored_as_copies(tmp_path):
    """record() takes a CPU index tensor on a fast path: a negative or too large index (any integer dtype) is still
    refused before anything of the update is written, and the stored batch is a copy, so a loop that reuses its
    index tensor in place cannot change a recorded batch."""
    x, y = digits()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "r", model, opt, data=(x, y), chunk_updates=4)  # update 1 stays staged until close
    idx = torch.arange(4)
    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.step()
    for bad in (torch.tensor([0, -1, 2]), torch.tensor([3, len(x)], dtype=torch.int32),
                torch.tensor([-(2**62), 1])):
        with pytest.raises(RecorderError, match="batch index out of range"):
            rec.record(bad)
    rec.record(idx)
    idx += 7  # the loop reuses its index tensor
    rec.close()
    run = open_run(tmp_path / "r")
    assert run.committed_updates == 1
    np.testing.assert_array_equal(run.root["updates/batch"][1][:4], [0, 1, 2, 3])
