"""The writer's own whole-chunk path (explaind_store/chunkio.py): same bytes as zarr's, without zarr's setitem."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.core.array
from tests.support.store_helpers import batch_for, digits, make_mlp, make_optimizer, train
from torch import nn

from explaind_store import Recorder, open_run, schema


def _chunk_files(array_dir: Path) -> dict[tuple[int, ...], Path]:
    """Chunk coordinates -> file, for nested keys (``c/1/0``) and flat ones (``c.1.0``, sparse checkpoints)."""
    out = {}
    for f in (array_dir / "c").rglob("*"):
        if f.is_file():
            out[tuple(int(p) for p in f.relative_to(array_dir / "c").parts)] = f
    for f in array_dir.glob("c.*"):
        out[tuple(int(p) for p in f.name.split(".")[1:])] = f
    return out


@pytest.mark.parametrize("checkpoint_every", [1, 3])
def test_chunk_files_are_byte_identical_to_zarrs_own(tmp_path, checkpoint_every):
    """Every chunk file the recorder wrote equals the file zarr writes for the same values (the batch array's edge
    chunk, padded with the fill value, included)."""
    path = tmp_path / "r"
    train(path, 11, kind="adamw", checkpoint_every=checkpoint_every)
    run = open_run(path)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    groups = [schema.PARAMS, *run.state_names, schema.UPDATES]
    compared = 0
    for g in groups:
        for name, arr in run.root[g].arrays():
            src = path / g / name
            dst = copy / g / name
            for f in _chunk_files(dst).values():
                f.unlink()
            out = zarr.open_array(str(dst), mode="r+").with_config({"write_empty_chunks": True})
            chunks = arr.chunks
            files = _chunk_files(src)
            for coords in files:
                region = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, chunks, arr.shape))
                out[region] = arr[region]
            for coords, f in files.items():
                assert f.read_bytes() == _chunk_files(dst)[coords].read_bytes(), f"{g}/{name} chunk {coords}"
                compared += 1
    assert compared > 40


def test_whole_chunks_do_not_go_through_zarr_setitem(tmp_path, monkeypatch):
    """Chunks the writer fills completely are encoded and stored by the writer itself (zarr's setitem costs more
    Python, under the GIL the training thread needs, than encoding the small chunks does); only a chunk shared
    with steps written earlier (theta_0's) goes through zarr. Values read back exactly."""
    calls = []
    setitem = zarr.core.array.AsyncArray.setitem

    async def counting(self, *args, **kwargs):
        calls.append(self.path)
        return await setitem(self, *args, **kwargs)

    monkeypatch.setattr(zarr.core.array.AsyncArray, "setitem", counting)
    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer("adamw", model)
    snaps = []
    with Recorder(tmp_path / "r", model, opt, data=(x, y), chunk_updates=4, checkpoint_every=2) as rec:
        for s in range(1, 12):
            idx = batch_for(s, len(x))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.record(idx)
            snaps.append(model[0].weight.detach().clone())
            if s == 3:  # updates 1..3 share chunk 0 with theta_0: zarr merges them
                rec.flush()
                assert calls
                calls.clear()
        rec.flush()
        assert calls == []  # updates 4..11: whole chunks, and the checkpoints' one-step chunks
    run = open_run(tmp_path / "r")
    assert run.committed_updates == 11
    for s in (4, 8, 11):
        np.testing.assert_array_equal(run.root[schema.PARAMS]["0.weight"][s], snaps[s - 1].numpy())


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_arrays_grow_ahead_and_end_at_the_committed_update(tmp_path, writer):
    """The writer grows the step arrays several chunks at a time (each resize rewrites every array's metadata
    document, which cost as much as a small chunk's data), so most chunks leave the metadata alone; when the
    recorder closes, every step array ends at the last committed update again."""
    path = tmp_path / "r"
    meta = path / schema.PARAMS / "0.weight" / "zarr.json"
    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer("adamw", model)
    seen = []
    with Recorder(path, model, opt, data=(x, y), chunk_updates=4, writer=writer) as rec:
        for s in range(1, 14):
            idx = batch_for(s, len(x))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.record(idx)
            if s in (3, 7, 11):
                rec.flush()
                seen.append(meta.stat().st_ino)  # zarr replaces the file (a new inode) when it rewrites it
    assert seen[0] == seen[1] == seen[2]
    run = open_run(path)
    assert run.committed_updates == 13
    for g in [schema.PARAMS, *run.state_names, schema.UPDATES]:
        for name, arr in zarr.open_group(str(path), mode="r")[g].arrays():
            assert arr.shape[0] == 14, f"{g}/{name}"


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_rows_are_copied_into_a_bounded_set_of_reused_chunk_buffers(tmp_path, writer):
    """Each update's parameters and optimizer state are copied straight into a preallocated chunk buffer (one
    foreach copy, no fresh memory per update; for the writer process the buffer is shared memory it reads the rows
    from); the writer encodes the buffer's blocks as they lie and hands the buffer back. However many chunks a run
    has, at most queue_chunks + 2 buffers ever exist (memory stays bounded), and every step reads back exactly as it
    was trained, flushes in mid-chunk included."""
    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer("sgd_momentum", model)
    snaps = {}
    with Recorder(tmp_path / "r", model, opt, data=(x, y), chunk_updates=4, queue_chunks=2, writer=writer) as rec:
        for s in range(1, 42):
            idx = batch_for(s, len(x))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.record(idx)
            snaps[s] = (model[0].weight.detach().clone(), opt.state[model[0].weight]["momentum_buffer"].clone())
            if s in (6, 17):
                rec.flush()  # a partial chunk: the next rows go into another buffer
        assert 1 <= rec._writer._buffers_made <= 4
    run = open_run(tmp_path / "r")
    assert run.committed_updates == 41
    w = run.root[schema.PARAMS]["0.weight"][:]
    m = run.root[schema.MOMENTUM_BUFFER]["0.weight"][:]
    for s, (weight, momentum) in snaps.items():
        np.testing.assert_array_equal(w[s], weight.numpy(), err_msg=f"step {s}")
        np.testing.assert_array_equal(m[s], momentum.numpy(), err_msg=f"step {s}")


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_state_tensor_of_another_shape_is_never_broadcast_into_a_buffer(tmp_path, writer):
    """A foreach copy broadcasts silently: a state tensor whose shape is not its parameter's (here one element)
    must not be stored as that value repeated. The row takes the per-tensor path, and the writer refuses it."""
    from explaind_store.writer import WriterError

    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer("sgd_momentum", model)
    rec = Recorder(tmp_path / "r", model, opt, data=(x, y), chunk_updates=4, writer=writer)
    with pytest.raises(WriterError):
        for s in range(1, 6):
            idx = batch_for(s, len(x))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if s == 5:
                opt.state[model[0].weight]["momentum_buffer"] = torch.ones(1)
            rec.record(idx)
        rec.flush()
    with pytest.raises(WriterError):
        rec.close()
    run = open_run(tmp_path / "r")
    assert run.committed_updates == 3  # the chunk of updates 4..7 was refused; what was committed stays
    assert not np.any(run.root[schema.MOMENTUM_BUFFER]["0.weight"][:4] == 1.0)
