"""A store larger than memory (issue 14, part 4): does the engine's worker memory stay flat in the store size?

    python bench/larger_than_memory.py [--quick] [--workdir DIR] [--updates 100] [--hidden 1024] [--k10]
                                       [--memory-limit 3GB] [--keep]

Records a WIDE Tanh MLP (64 -> hidden -> hidden -> 10; 1.1M float32 parameters at hidden 1024, 13M at 2560)
trained with AdamW for ``--updates`` updates (batches of 64 random Gaussian samples, 10 classes) with parameters
and optimizer state stored after every update (K=1): about 12 bytes per parameter per update before compression
(13M parameters: 160 MB per update). The same model is also recorded for a tenth of the updates, and (``--k10``)
for all the updates with a checkpoint every 10 updates (the steps between are replayed by the workers).

For each store, ``engine.attribute(store, queries="val[:2]", output="loss", by=("step", "tensor"))`` (per-step,
per-tensor components, no per-sample axis) runs on a ``LocalCluster`` of 2 worker processes x 1 thread with an
explicit per-worker memory limit (``--memory-limit``; the nanny kills a worker at 95% of it, so a run that needed
more would fail, not just report more; pausing at 80% is turned off, as a paused worker would wait forever). A task
holds O(R x P) float64 for its R query rows and P parameters plus its chunk's rebuilt momentum and parameters
(bounded by the engine's budgets); R is kept small here: 4 queries x 10 logits of a 13M-parameter model need
more than 4 GB per worker (R x P alone is 4.3 GB). The carries between chunks are chains of small tasks (the
forward momentum spilled to a Zarr scratch store), so nothing grows with the number of chunks; the chunks' length
follows the engine's budgets (``EXPLAIND_LIGHT_BYTES`` bounds the reverse chain's rebuilt momentum per chunk).
A thread samples the RSS of the client and of every process it started (the nannies and the workers, psutil, every
50 ms). Each measurement runs in a fresh subprocess. The table gives the number of chunks, the peak RSS per worker
process, wall and CPU time (client + workers), the store size on disk and the largest replay residual. The stores go under ``--workdir`` (default /tmp/bigmem) and are deleted at the end unless
``--keep`` (``--reuse`` then skips recording them again).

``--quick`` shrinks everything (hidden 256, 10 updates) to run in about a minute (mostly cluster start-up).

Prints a Markdown table (docs/benchmarks.md, section "Larger than memory (issue 14)") with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# bench/engine.py would shadow the engine package when this script's folder leads sys.path; bench/ goes last so
# that result_memory (the RSS sampler) stays importable
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))  # the repo's engine package, ahead of an editable install's finder
sys.path.append(str(BENCH))

IN_DIM, N_OUT, BATCH, N_TRAIN = 64, 10, 64, 4096


def build_store(path: Path, updates: int, hidden: int, k: int) -> float:
    """Record the wide MLP (AdamW) for ``updates`` updates at ``checkpoint_every=k``; returns the seconds taken."""
    import torch
    from torch import nn

    from explaind_store import Recorder
    from explaind_store.examples.tiny import make_mlp
    from explaind_store.specs import model_spec

    torch.manual_seed(0)
    torch.set_num_threads(1)  # replay on the workers is then bit-exact, and K=1 and K=10 see the same run
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN, IN_DIM, generator=g)
    y = torch.randint(0, N_OUT, (N_TRAIN,), generator=g)
    kw = {"in_dim": IN_DIM, "hidden": hidden, "out_dim": N_OUT, "depth": 2, "act": "tanh"}
    model = make_mlp(**kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    t0 = time.perf_counter()
    with Recorder(path, model, opt, data=(x, y), splits={"val": (x[:16], y[:16])},
                  model_spec=model_spec("explaind_store.examples.tiny:make_mlp", **kw), checkpoint_every=k,
                  overwrite=True) as rec:
        for _ in range(updates):
            idx = torch.randint(0, N_TRAIN, (BATCH,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(idx, loss=loss.item())
    return time.perf_counter() - t0


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (run on each worker)."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One attribution on a fresh memory-limited LocalCluster; peak RSS per process and times."""
    import dask
    import psutil
    from distributed import Client, LocalCluster

    import engine
    from engine.cluster import runners
    from result_memory import Sampler

    # no pausing at 80%: a paused worker waits forever here instead of failing; the nanny still kills a worker at
    # 95% of the limit, so a run that needed more memory fails. Set for the whole process (not a context), so that
    # workers the nanny restarts later get it too.
    dask.config.set({"distributed.worker.memory.pause": False})
    with runners._own_environ(), dask.config.set(runners._cluster_config()):
        cluster = LocalCluster(n_workers=spec["workers"], threads_per_worker=1, processes=True,
                               memory_limit=spec["memory_limit"], dashboard_address=None,
                               env=dict(runners.WORKER_ENV))
        client = Client(cluster, set_as_default=False)
    worker_pids = set(client.run(os.getpid).values())
    me = psutil.Process()
    cpu0 = me.cpu_times()
    with Sampler() as s:
        t0 = time.perf_counter()
        ds = engine.attribute(spec["store"], queries=f"val[:{spec['queries']}]", output="loss",
                              by=("step", "tensor"), client=client, progress=False)
        wall = time.perf_counter() - t0
    worker_cpu = sum(client.run(_cpu_seconds).values())
    cpu1 = me.cpu_times()
    def total(name: str) -> Any:
        return ds[name].sum([d for d in ds[name].dims if d not in ("query", "output")])

    parts = ds["initial"] + total("data") + total("weight_decay") + total("momentum") + total("residual")
    closure = float(abs(parts - ds["final"]).max() / max(1e-300, float(abs(ds["final"] - ds["initial"]).max())))
    client.close()
    cluster.close()
    return {"wall": wall, "cpu_client": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "cpu_workers": worker_cpu, "peak_workers": sorted((s.peak_child.get(p, 0) for p in worker_pids),
                                                              reverse=True),
            "peak_client": s.peak_self, "max_replay_residual": ds.attrs.get("max_replay_residual", 0.0),
            "max_quadrature_residual": ds.attrs.get("max_quadrature_residual"), "closure": closure,
            "n_chunks": ds.attrs.get("n_chunks"), "steps": int(ds.sizes["step"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="hidden 256, 10 updates: about a minute")
    ap.add_argument("--workdir", default="/tmp/bigmem")
    ap.add_argument("--updates", type=int, default=None, help="updates of the long run (default 100; quick 10)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default 1024; quick 256)")
    ap.add_argument("--k10", action="store_true", help="also record the long run at checkpoint_every=10")
    ap.add_argument("--memory-limit", default=None, help="per-worker memory limit (default 3GB)")
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--reuse", action="store_true",
                    help="use stores a run with --keep left in --workdir (same hidden, updates and K) instead of "
                         "recording them again")
    ap.add_argument("--only-long", action="store_true", help="skip the short run (a tenth of the updates)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    updates = args.updates or (10 if args.quick else 100)
    hidden = args.hidden or (256 if args.quick else 1024)
    limit = args.memory_limit or "3GB"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    configs = ([] if args.only_long else [(max(1, updates // 10), 1)]) + [(updates, 1)] + (
        [(updates, 10)] if args.k10 else [])
    rows = []
    try:
        for n, k in configs:
            store = work / f"mlp{hidden}-{n}-k{k}.zarr"
            reused = args.reuse and (store / "zarr.json").exists()
            rec_s = 0.0 if reused else build_store(store, n, hidden, k)
            size = du(store)
            print(f"{'reused' if reused else 'recorded'} {store}: {n} updates, K={k}, {size / 1e9:.2f} GB in "
                  f"{rec_s:.0f} s", file=sys.stderr)
            spec = {"store": str(store), "workers": 2, "memory_limit": limit, "queries": args.queries}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"{n} updates at K={k} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(updates=n, k=k, store_bytes=size, record_s=rec_s, load=os.getloadavg())
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
            if not args.keep:
                shutil.rmtree(store, ignore_errors=True)
    finally:
        if not args.keep:
            for n, k in configs:
                shutil.rmtree(work / f"mlp{hidden}-{n}-k{k}.zarr", ignore_errors=True)
    import torch

    from explaind_store.examples.tiny import make_mlp

    n_params = sum(p.numel() for p in make_mlp(in_dim=IN_DIM, hidden=hidden, out_dim=N_OUT, depth=2).parameters())
    print(f"\nTanh MLP {IN_DIM}-{hidden}-{hidden}-{N_OUT} ({n_params / 1e6:.1f}M float32 parameters), AdamW, batches "
          f"of {BATCH}; attribute(queries=val[:{args.queries}], output=loss, by=(step, tensor)) on a LocalCluster "
          f"of 2 workers x 1 thread, memory_limit={limit} per worker; torch {torch.__version__}\n")
    print("| updates | K | chunks | store on disk | store / worker limit | peak RSS per worker | peak RSS client | "
          "wall | CPU (client + workers) | max replay residual | identity (rel.) | load avg (1/5/15 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    from dask.utils import parse_bytes

    for r in rows:
        workers = " / ".join(f"{b / 2**20:.0f} MiB" for b in r["peak_workers"])
        print(f"| {r['updates']} | {r['k']} | {r['n_chunks']} | {r['store_bytes'] / 1e9:.2f} GB | "
              f"{r['store_bytes'] / parse_bytes(limit):.1f}x | {workers} | {r['peak_client'] / 2**20:.0f} MiB | "
              f"{r['wall']:.0f} s | {r['cpu_client'] + r['cpu_workers']:.0f} s | {r['max_replay_residual']:.1e} | "
              f"{r['closure']:.1e} | {'/'.join(f'{v:.1f}' for v in r['load'])} |")


if __name__ == "__main__":
    main()
