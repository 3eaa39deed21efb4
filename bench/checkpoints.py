"""Sparse checkpoints (issue 14): bytes per update and engine time at K = 1, 10, 100 on the paper model.

    python bench/checkpoints.py [--updates 200] [--ks 1,10,100] [--queries 4] [--repeats 2] [--workdir DIR]

Records the paper's modular-addition transformer (p=113, d_model 64, 4 heads, MLP 512, ~96k parameters; full-batch
AdamW, lr 1e-3, betas (0.9, 0.98), weight decay 4.0; ``explaind_store.examples.modadd.train``) for ``--updates``
updates once per K with ``checkpoint_every=K``, all at one torch thread (so replay is bit-exact), then runs
``engine.attribute(store, queries="val[:Q]", by=("step", "tensor"))`` (all 113 log-softmax outputs) on the
synchronous scheduler at one torch thread for every K, interleaved ``--repeats`` times after one untimed warm-up
call (median wall and CPU). Reports the store's bytes on disk per update, the engine's time, ``max_replay_residual``,
the largest |result - K=1 result| of the data part, and the identity's relative error.

Prints a Markdown table (docs/benchmarks.md, section "Sparse checkpoints (issue 14)") with the load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]  # bench/engine.py shadows the engine


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _identity_rel(ds: Any) -> float:
    import numpy as np

    def total(name: str) -> Any:
        v = ds[name]
        return np.asarray(v.sum([d for d in v.dims if d not in ("query", "output")]))

    lhs = total("initial") + total("data") + total("weight_decay") + total("momentum") + total("residual")
    change = float(np.abs(total("final") - total("initial")).max())
    return float(np.abs(lhs - total("final")).max()) / max(change, 1e-300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--ks", default="1,10,100")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    import engine
    from explaind_store.examples import modadd

    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="explaind-checkpoints-"))
    stores: dict[int, Path] = {}
    rec_s: dict[int, float] = {}
    try:
        for k in ks:
            stores[k] = work / f"modadd-{args.updates}-k{k}.zarr"
            t0 = time.perf_counter()
            modadd.train(str(stores[k]), steps=args.updates, seed=0, progress=False, overwrite=True, eval_every=0,
                         recorder_kwargs={"checkpoint_every": k})
            rec_s[k] = time.perf_counter() - t0
            print(f"recorded K={k}: {_du(stores[k]) / 1e6:.1f} MB in {rec_s[k]:.1f} s", file=sys.stderr)

        def attribute(k: int) -> Any:
            return engine.attribute(str(stores[k]), queries=f"val[:{args.queries}]", by=("step", "tensor"),
                                    client="sync", progress=False)

        attribute(ks[0])  # warm-up: lazy imports, torch dispatch caches
        walls: dict[int, list[float]] = {k: [] for k in ks}
        cpus: dict[int, list[float]] = {k: [] for k in ks}
        results: dict[int, Any] = {}
        for _ in range(args.repeats):
            for k in ks:
                c0, t0 = _cpu_s(), time.perf_counter()
                results[k] = attribute(k)
                walls[k].append(time.perf_counter() - t0)
                cpus[k].append(_cpu_s() - c0)
        ref = results[ks[0]]
        n_params = sum(p.numel() for p in modadd.make_model().parameters())
        print(f"\nmodadd p=113, d_model 64, MLP 512 ({n_params / 1e3:.0f}k parameters), {args.updates} full-batch "
              f"AdamW updates at 1 torch thread; attribute(val[:{args.queries}], log_softmax, by=(step, tensor)), "
              f"synchronous scheduler, 1 torch thread, median of {args.repeats} interleaved; torch "
              f"{torch.__version__}; load avg {'/'.join(f'{x:.1f}' for x in os.getloadavg())}\n")
        print("| K | store on disk | bytes per update | record time | engine wall | engine CPU | max replay residual | "
              "max abs(data - data at K=1) | identity (rel.) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k in ks:
            size = _du(stores[k])
            diff = float(np.abs(np.asarray(results[k]["data"]) - np.asarray(ref["data"])).max())
            print(f"| {k} | {size / 1e6:.1f} MB | {size / args.updates / 1e3:.0f} kB | {rec_s[k]:.1f} s | "
                  f"{statistics.median(walls[k]):.1f} s | {statistics.median(cpus[k]):.1f} s | "
                  f"{float(results[k].attrs.get('max_replay_residual', 0.0)):.1e} | {diff:.1e} | "
                  f"{_identity_rel(results[k]):.1e} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
