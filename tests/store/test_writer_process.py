"""The writer process (``Recorder(writer="process")``): same bytes as the thread writer, failures surface in the
training process, committed updates survive a killed writer, and close() leaves no process or shared memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.support.compare import MLP_SPEC
from tests.support.store_helpers import arrays_of, batch_for, digits, lr_factor, make_mlp, make_optimizer, train
from torch import nn

from explaind_store import Recorder, RecorderError, open_run
from explaind_store.verify import verify
from explaind_store.writer import WriterError



def _memfds() -> list[str]:
    """The writer's shared memory still open or mapped in this process."""
    with open("/proc/self/maps") as f:
        out = [line.split()[-2] if line.rstrip().endswith("(deleted)") else line.split()[-1] for line in f]
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [p for p in out if "explaind-writer" in p]


def _named_shm() -> set[str]:
    """Named shared memory in /dev/shm, but other processes' semaphores (``sem.*``: a Dask cluster's workers or
    any other job on the machine make them at any time)."""
    return {f for f in os.listdir("/dev/shm") if not f.startswith("sem.")}


def _recorder(path: Path) -> tuple[Recorder, nn.Module, torch.optim.Optimizer, Any]:
    """What ``store_helpers.train`` records (so that it can resume the run), with the writer process."""
    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer("sgd_momentum", model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rec = Recorder(path, model, opt, data=(x, y), splits={"val": (x[:10], y[:10])}, scheduler=sched,
                   chunk_updates=2, writer="process")
    return rec, model, opt, sched


def _steps(rec: Recorder, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, upto: int) -> None:
    x, y = digits()
    for s in range(rec.updates_done + 1, upto + 1):
        idx = batch_for(s, len(x))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record(idx, loss=loss.item())
        sched.step()


def test_process_writer_stores_the_same_bytes_as_the_thread_writer(tmp_path, one_thread):
    shm_before = _named_shm()
    train(tmp_path / "thread", 11, kind="adamw", chunk_updates=3, writer="thread")
    train(tmp_path / "process", 11, kind="adamw", chunk_updates=3, writer="process")
    a, b = arrays_of(tmp_path / "thread"), arrays_of(tmp_path / "process")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    ra, rb = open_run(tmp_path / "thread"), open_run(tmp_path / "process")
    assert rb.committed_updates == 11
    for key in ("scheduler_state", "nonfinite_updates", "train_mode"):
        assert ra.attrs.get(key) == rb.attrs.get(key), key
    np.testing.assert_array_equal(ra.root["updates/batch"][...], rb.root["updates/batch"][...])
    assert verify(rb).ok
    # nothing left behind: no process (close joined it), no named or anonymous shared memory
    assert _named_shm() <= shm_before
    assert _memfds() == []


def test_killed_writer_process_is_a_clear_error_and_the_committed_updates_resume(tmp_path, one_thread):
    path = tmp_path / "killed.zarr"
    rec, model, opt, sched = _recorder(path)
    _steps(rec, model, opt, sched, 4)
    rec.flush()
    assert rec.committed_updates == 4
    os.kill(rec._writer.pid, signal.SIGKILL)
    with pytest.raises(WriterError) as err:
        _steps(rec, model, opt, sched, 10)  # the next chunk handed over finds the process gone
        rec.flush()
    assert "killed by signal SIGKILL" in str(err.value) and "committed_updates=4" in str(err.value)
    assert "resume=True" in str(err.value) and err.value.__cause__ is not None
    with pytest.raises(WriterError):
        rec.close()  # still says so, and releases the store
    assert _memfds() == []
    run = open_run(path)
    assert run.committed_updates == 4 and not np.isnan(run.params[run.tensor_names[0]].values).any()
    train(path, 10, resume=True, chunk_updates=2, writer="process")
    train(tmp_path / "ref", 10, chunk_updates=2, writer="thread")
    a, b = arrays_of(tmp_path / "ref"), arrays_of(path)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_an_error_inside_the_writer_process_surfaces_with_its_cause(tmp_path):
    path = tmp_path / "broken.zarr"
    rec, model, opt, sched = _recorder(path)
    name = rec.names[0]
    (path / "params" / name / "c" / "1").write_text("a file where the second chunk's directory goes")
    with pytest.raises(WriterError) as err:
        _steps(rec, model, opt, sched, 4)
        rec.flush()
    cause = str(err.value.__cause__)
    assert "Error" in cause and "Traceback" in cause  # the writer process's own traceback
    assert "NotADirectoryError" in str(err.value) and "committed_updates=1" in str(err.value)
    with pytest.raises(WriterError):
        rec.close()
    assert open_run(path).committed_updates == 1  # the first chunk (updates 0 and 1) was committed


def test_the_writers_traceback_survives_it_exiting_with_messages_unread(tmp_path):
    """A process that exits with messages of ours unread resets the connection, and the kernel reports the reset
    before the traceback the process sent first: the error must still carry that traceback (this raced in CI)."""
    path = tmp_path / "reset.zarr"
    rec, model, opt, sched = _recorder(path)
    (path / "params" / rec.names[0] / "c" / "1").write_text("a file where the second chunk's directory goes")
    writer = rec._writer
    try:
        _steps(rec, model, opt, sched, 3)  # hands over the broken second chunk
    except WriterError:
        pass
    for token in range(1000, 1064):  # queued behind the broken chunk, never read by the failing process
        try:
            writer._sock.send(json.dumps({"op": "flush", "token": token}).encode())
        except OSError:
            break
    assert writer._proc.wait(timeout=60) == 1
    with pytest.raises(WriterError) as err:
        rec.flush()
    assert "Traceback" in str(err.value.__cause__) and "NotADirectoryError" in str(err.value)
    with pytest.raises(WriterError):
        rec.close()
    assert _memfds() == []


def test_a_script_without_a_main_guard_records_with_the_writer_process(tmp_path):
    """The writer process never imports the training script (spawn would, and recurse without a main guard)."""
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(f"""
        from tests.support.store_helpers import train
        train({str(tmp_path / "s.zarr")!r}, 6, chunk_updates=2, writer="process")
    """))
    repo = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert open_run(tmp_path / "s.zarr").committed_updates == 6


def test_an_unknown_writer_kind_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    x, y = digits()
    model = make_mlp()
    with pytest.raises(RecorderError, match="'process'.*'thread'"):
        Recorder(tmp_path / "w", model, torch.optim.SGD(model.parameters(), lr=0.1), data=(x, y), writer="fork")
    monkeypatch.setenv("EXPLAIND_WRITER", "threads")
    with pytest.raises(RecorderError, match="EXPLAIND_WRITER"):
        Recorder(tmp_path / "w", model, torch.optim.SGD(model.parameters(), lr=0.1), data=(x, y))
    assert not (tmp_path / "w").exists()


def test_close_joins_the_writer_process_and_unmaps_its_shared_memory(tmp_path):
    rec, model, opt, sched = _recorder(tmp_path / "closed.zarr")
    _steps(rec, model, opt, sched, 5)  # two chunks handed over, the fifth update still staged
    assert _memfds() != [] and rec._writer._proc.poll() is None
    rec.close()
    assert rec._writer._proc.returncode == 0  # exited by itself after the last commit, not killed
    assert _memfds() == []
    assert open_run(tmp_path / "closed.zarr").committed_updates == 5


def test_sparse_run_asked_for_the_process_writer_is_written_whole(tmp_path, one_thread):
    """Rows between sparse checkpoints carry no parameters; the recorder writes such runs with the thread writer
    (the process writer stacks every array of every row), so the store equals one written with the thread."""
    train(tmp_path / "thread", 10, kind="adamw", chunk_updates=4, checkpoint_every=4, writer="thread",
          model_spec=MLP_SPEC)
    train(tmp_path / "process", 10, kind="adamw", chunk_updates=4, checkpoint_every=4, writer="process",
          model_spec=MLP_SPEC)
    a, b = open_run(tmp_path / "thread"), open_run(tmp_path / "process")
    assert b.checkpoint_steps.tolist() == a.checkpoint_steps.tolist() == [0, 4, 8, 10]
    for path, arr in arrays_of(tmp_path / "thread").items():
        np.testing.assert_array_equal(arrays_of(tmp_path / "process")[path], arr, err_msg=path)
    assert verify(b).ok
