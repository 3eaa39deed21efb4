"""Result-size benchmark: peak memory of ``attribute(..., out=)`` as the result grows (1, 4, 16 GB by default).

    python bench/result_memory.py [--sizes 1,4,16] [--workdir DIR] [--updates 256] [--store-chunk 256]
                                  [--samples 16384] [--in-memory]

Builds one store for it: the scikit-learn digits (64 features) tiled to ``--samples`` samples with a little noise,
a Tanh MLP 64-16-10 trained with SGD + momentum for ``--updates`` updates (batches of 32) and recorded in store
chunks of ``--store-chunk`` updates (default: the whole run in one chunk, on purpose: a task used to cover at
least one store chunk). Each size then runs
``attribute(run, queries="train[:Q]", output="logits", by=("sample", "step"), out=...)`` on the default
LocalCluster in a fresh subprocess, with Q chosen so the result (``Q x 10 x N x updates`` float64 scores plus
small per-update arrays; N = ``--samples``) reaches the size; a thread samples the RSS of that process and of its
workers (psutil) every 50 ms. RSS counts pages shared between processes (the /dev/shm hand-off of in-memory
results) in every process that maps them, so "memory used" adds up each page once: the private pages of all the
processes (RSS - shared) plus the growth of the machine's shared memory (``Shmem``; other jobs' /dev/shm use
would show here too). The output store is deleted after each size. ``--in-memory`` keeps the result in memory
instead (no ``out=``, the size limit lifted) for comparison.

Prints a Markdown table (docs/benchmarks.md, section "Result size and streaming to disk") with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# bench/engine.py would shadow the engine package when this script's folder leads sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

N_OUTPUTS = 10
HIDDEN = 16


def build_store(path: Path, updates: int, store_chunk: int, n_samples: int) -> None:
    """The digits MLP store: the 1797 digits tiled to ``n_samples`` with a little noise (more samples make a larger
    result per query and update, for the same math), SGD + momentum, batches of 32."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from explaind_store import Recorder
    from explaind_store.examples.tiny import make_mlp
    from explaind_store.specs import model_spec

    torch.manual_seed(0)
    d = load_digits()
    reps = -(-n_samples // len(d.data))
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).repeat(reps, 1)[:n_samples]
    x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor(d.target, dtype=torch.int64).repeat(reps)[:n_samples]
    spec = model_spec("explaind_store.examples.tiny:make_mlp", in_dim=64, hidden=HIDDEN, out_dim=N_OUTPUTS, depth=1,
                      act="tanh")
    model = make_mlp(in_dim=64, hidden=HIDDEN, out_dim=N_OUTPUTS, depth=1, act="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with Recorder(path, model, opt, data=(x, y), splits={"val": (x[:64], y[:64])}, chunk_updates=store_chunk,
                  model_spec=spec) as rec:
        for _ in range(updates):
            idx = torch.randperm(len(x), generator=g)[:32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(idx, loss=loss.item())


def result_gb(n_queries: int, n_samples: int, updates: int) -> float:
    return n_queries * N_OUTPUTS * n_samples * updates * 8 / 1e9


def _shmem() -> int:
    """Bytes of shared memory (tmpfs such as /dev/shm) in use on the machine (/proc/meminfo ``Shmem``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak RSS of this process and of each of its descendants (the LocalCluster's nanny and worker processes)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak_self = 0
        self.peak_child: dict[int, int] = {}
        self.peak_total = 0
        self.peak_private = 0  # private pages of all processes + shared-memory growth: each page counted once
        self.shm0 = _shmem()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                info = self.me.memory_info()
                own, private = info.rss, info.rss - info.shared
                total = own
                for p in self.me.children(recursive=True):
                    try:
                        full = p.memory_info()
                    except psutil.Error:
                        continue
                    self.peak_child[p.pid] = max(self.peak_child.get(p.pid, 0), full.rss)
                    total += full.rss
                    private += full.rss - full.shared
                self.peak_self = max(self.peak_self, own)
                self.peak_total = max(self.peak_total, total)
                self.peak_private = max(self.peak_private, private + max(0, _shmem() - self.shm0))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import engine

    out = None if spec["in_memory"] else Path(spec["out"])
    with Sampler() as s:
        t0 = time.perf_counter()
        ds = engine.attribute(spec["store"], queries=f"train[:{spec['queries']}]", output="logits",
                              by=("sample", "step"), out=out, progress=False, max_result_bytes="1TB")
        seconds = time.perf_counter() - t0
    written = 0 if out is None else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    n_bytes = int(sum(v.nbytes for v in ds.data_vars.values()))
    engine.close_local_client()
    workers = sorted(s.peak_child.values(), reverse=True)
    return {"result_bytes": n_bytes, "peak_parent": s.peak_self, "peak_workers": workers, "peak_total": s.peak_total,
            "peak_private": s.peak_private,
            "seconds": seconds, "written": written, "n_chunks": ds.attrs["n_chunks"],
            "chunk_updates": ds.attrs["chunk_updates"], "scan": ds.attrs["scan"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16", help="result sizes in GB (default 1,4,16)")
    ap.add_argument("--updates", type=int, default=256)
    ap.add_argument("--store-chunk", type=int, default=256, help="updates per store chunk (default: the whole run)")
    ap.add_argument("--samples", type=int, default=16384, help="training samples (default 16384)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--in-memory", action="store_true", help="keep the result in memory instead (no out=)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="explaind-result-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"digits-{args.samples}-{args.updates}-{args.store_chunk}.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        build_store(store, args.updates, args.store_chunk, args.samples)
        print(f"built {store} ({args.updates} updates, store chunks of {args.store_chunk}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    n_samples = args.samples
    rows = []
    for gb in (float(v) for v in args.sizes.split(",")):
        q = max(1, round(gb * 1e9 / (N_OUTPUTS * n_samples * args.updates * 8)))
        out = work / f"result-{gb:g}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"store": str(store), "queries": q, "out": str(out), "in_memory": args.in_memory}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, check=False)
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode:
            raise SystemExit(f"size {gb} GB failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(gb=gb, queries=q, load=os.getloadavg())
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    where = "in memory (no out=)" if args.in_memory else "out="
    print(f"\n{where}; store: digits MLP 64-{HIDDEN}-10, {n_samples} samples, {args.updates} updates in store "
          f"chunks of {args.store_chunk}; by=(sample, step), output=logits, default LocalCluster, "
          f"EXPLAIND_BLOCK_BYTES={os.environ.get('EXPLAIND_BLOCK_BYTES', 'default (512 MiB)')}\n")
    print("| result | queries | tasks (updates each) | peak RSS parent | peak RSS per worker process | peak RSS all | "
          "peak memory used | time | written | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        workers = " / ".join(f"{w / 2**20:.0f}" for w in r["peak_workers"][:4])
        print(f"| {r['result_bytes'] / 1e9:.2f} GB | {r['queries']} | {r['n_chunks']} ({r['chunk_updates']}) | "
              f"{r['peak_parent'] / 2**20:.0f} MiB | {workers} MiB | {r['peak_total'] / 2**20:.0f} MiB | "
              f"{r['peak_private'] / 2**20:.0f} MiB | "
              f"{r['seconds']:.0f} s | {r['written'] / 1e9:.2f} GB | {r['load'][0]:.1f} |")


if __name__ == "__main__":
    main()
