"""A recorder keeps freed heap memory in the training process (explaind_store.heap): the writer thread's heap is
no longer trimmed and regrown every chunk, which flushed the training thread's TLB. Checked in fresh processes,
because the tuning is per process and once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Records a tiny run, then frees 256 MiB in 8 MiB blocks from a thread and reports the resident memory before and after the free.
_SCRIPT = r"""
import json, sys, threading
import numpy as np, psutil, torch
from explaind_store import Recorder
from explaind_store import heap

model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
with Recorder(sys.argv[1], model, opt, data=(x, y), loss="cross_entropy") as rec:
    for s in range(3):
        opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step(); rec.record(range(8))
out = {}
def churn():
    a = [np.ones(1 << 20) for _ in range(32)]  # 32 blocks of 8 MiB (a chunk's size), written so they are resident
    out["with"] = psutil.Process().memory_info().rss
    del a
    out["after"] = psutil.Process().memory_info().rss
t = threading.Thread(target=churn); t.start(); t.join()
out["tuned"] = heap._TUNED["heap"]
print(json.dumps(out))
"""


def _run(tmp_path: Path, mallopt: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EXPLAIND_MALLOPT"}
    if mallopt is not None:
        env["EXPLAIND_MALLOPT"] = mallopt
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    store = tmp_path / f"run-{mallopt}.zarr"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(store)], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_recorder_keeps_freed_heap_memory_and_the_setting_turns_it_off(tmp_path):
    if not sys.platform.startswith("linux"):
        return
    kept = _run(tmp_path, None)
    assert kept["tuned"]
    # freed, but kept for the next chunk's buffers: resident memory does not fall back
    assert kept["with"] - kept["after"] < 64 << 20, kept
    off = _run(tmp_path, "0")
    assert not off["tuned"]
    assert off["with"] - off["after"] > 200 << 20, off  # glibc's default hands a large block back at once
