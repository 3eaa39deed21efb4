"""Smaller failure modes of issue 11: a store killed during creation resumes, damaged metadata is named, Ctrl-C
and CLI messages speak CLI, tiny modadd tables keep a validation split, reversed queries and fractional step
windows, and ``explaind record --seed`` reproduces bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.support.compare import MLP_SPEC
from tests.support.store_helpers import arrays_of, train

from engine.api import parse_queries, parse_steps, resolve_queries
from explaind_store import open_run
from explaind_store.cli import main as cli_main
from explaind_store.examples import modadd
from explaind_store.storage import StoreError

ROOT = Path(__file__).resolve().parents[2]  # the repository root: `tests` is a package


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explaind_store.cli", *args], capture_output=True, text=True, **kw)


# --- (a) kill -9 while the store is being created ----------------------------------------------------------------
KILL_DURING_CREATION = """
import os, signal, sys
sys.path.insert(0, {root!r})
import explaind_store.storage as storage
import explaind_store.recorder as rec
calls, static_calls = [0], [0]
orig_make, orig_create, orig_static = rec.Recorder._make_arrays, storage.create_stepped, storage.write_static

def make_arrays(self, root, *, create, **kw):
    if create and {at} == 0:  # right after the root attributes were written
        os.kill(os.getpid(), signal.SIGKILL)
    return orig_make(self, root, create=create, **kw)

def create_stepped(*a, **kw):
    calls[0] += 1
    if calls[0] == {at}:  # some step arrays exist, others do not
        os.kill(os.getpid(), signal.SIGKILL)
    return orig_create(*a, **kw)

def write_static(*a, **kw):
    static_calls[0] += 1
    if {at} < 0 and static_calls[0] == -{at}:  # while the training data is written, before the root attributes
        os.kill(os.getpid(), signal.SIGKILL)
    return orig_static(*a, **kw)

rec.Recorder._make_arrays = make_arrays
storage.create_stepped = create_stepped
storage.write_static = write_static
from tests.support.store_helpers import train
train({path!r}, 3, kind="adamw")
"""


@pytest.mark.parametrize("at", [-2, 0, 3])  # -2: during the data writes; 0: after them; 3: among the step arrays
def test_store_killed_during_creation_resumes(tmp_path, at):
    path = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_CREATION.format(root=str(ROOT), path=str(path), at=at)],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # info says what to do, in CLI words
    with pytest.raises(StoreError, match="--resume"):
        open_run(path)
    train(path, 5, kind="adamw", resume=True)
    train(tmp_path / "clean.zarr", 5, kind="adamw")
    got, want = arrays_of(path), arrays_of(tmp_path / "clean.zarr")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert open_run(path).verify().ok


# --- (b) damaged metadata names its file -------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["params/0.weight", "updates", "."])
def test_truncated_metadata_is_named(tmp_path, node, capsys):
    path = tmp_path / "r.zarr"
    train(path, 2, kind="sgd", model_spec=MLP_SPEC)
    meta = path / node / "zarr.json"
    raw = meta.read_bytes()
    meta.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StoreError, match="metadata is damaged") as info:
        open_run(path)
    assert str(meta) in str(info.value) and "Restore this file" in str(info.value)
    for cmd in (["info", str(path)], ["verify", str(path)]):
        assert cli_main(cmd) == 2
        err = capsys.readouterr().err
        assert str(meta) in err and "Unterminated" not in err.split("(")[0]


# --- (c) Ctrl-C ----------------------------------------------------------------------------------------------------
def test_ctrl_c_during_record_prints_one_line_and_exits_130(tmp_path):
    path = tmp_path / "int.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "explaind_store.cli", "record", "digits-cnn", "--steps", "100000", "--out", str(path),
         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the first committed chunk (128 updates)
        try:
            if json.loads((path / "zarr.json").read_text())["attributes"]["committed_updates"] > 0:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    committed = open_run(path).committed_updates
    assert committed > 0
    assert f"holds updates 1..{committed} committed" in err and "--resume" in err


# --- (d) CLI messages name CLI flags -------------------------------------------------------------------------------
def test_existing_store_message_names_the_cli_flags(tmp_path, capsys):
    out = str(tmp_path / "m.zarr")
    args = ["record", "modadd", "--p", "5", "--steps", "2", "--out", out, "--quiet"]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err


# --- (e) modadd with a small table keeps a validation split --------------------------------------------------------
def test_small_modadd_table_keeps_a_validation_split(tmp_path):
    d = modadd.make_data(p=23)
    (xt, _), (xv, _) = d["train"], d["val"]
    assert len(xv) > 0 and len(xt) + len(xv) == 23 * 23
    pairs = lambda x: set((x[:, 0] * 23 + x[:, 1]).tolist())  # noqa: E731
    assert not pairs(xt) & pairs(xv)
    assert open_run_after_record(tmp_path, "--p", "23").attrs["data"]["splits"]["val"]["n"] > 0
    assert [len(v[0]) for v in modadd.make_data().values()] == [4000, 2000]  # the paper config is unchanged


def open_run_after_record(tmp_path: Path, *extra: str):
    out = str(tmp_path / "small.zarr")
    assert cli_main(["record", "modadd", "--steps", "1", "--out", out, "--quiet", *extra]) == 0
    return open_run(out)


# --- (f) reversed query selections --------------------------------------------------------------------------------
def test_negative_step_queries(digits_store):
    idx = parse_queries("val[::-1]").indices(10)
    np.testing.assert_array_equal(idx, np.arange(10)[::-1])
    x, y, _ = resolve_queries(open_run(digits_store), None, None, "val[::-2]")
    vx, vy = open_run(digits_store).split("val")
    assert torch.equal(x, vx.flip(0)[::2]) and torch.equal(y, vy.flip(0)[::2])


# --- (g) step windows must be integers -----------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [slice(2.7, 5), slice(2, 5.0), (np.float64(1), 3), (True, 3), slice(None, 4.5)])
def test_fractional_step_windows_are_refused(steps):
    with pytest.raises(ValueError, match="must be integers"):
        parse_steps(steps, 10)


def test_integer_step_windows_are_accepted():
    assert parse_steps(slice(np.int64(2), np.int32(5)), 10) == (2, 5)
    assert parse_steps((2, -1), 10) == (2, 9)
    assert parse_steps("1:4", 10) == (1, 4)


# --- (h) --seed reproduces bit for bit ------------------------------------------------------------------------------
def test_record_with_the_same_seed_is_bit_identical(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for name in ("a", "b"):
        # modadd's full-batch matmuls sum in a thread-dependent order: at two threads runs differ from update 2
        proc = _cli("record", "modadd", "--steps", "4", "--seed", "3", "--out", str(tmp_path / name), "--quiet",
                    env=env)
        assert proc.returncode == 0, proc.stderr
    a, b = arrays_of(tmp_path / "a"), arrays_of(tmp_path / "b")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
