"""Query-memory benchmark: peak memory and time of ``engine.attribute`` as the number of queries grows, with the
query rows bounded by the ``query_bytes`` budget (batches of queries run one after another) or not.

    python bench/query_memory.py [--queries 1,4,16,32] [--updates 6] [--small 1GB] [--unbounded-max 16]
                                 [--baseline PATH] [--workdir DIR]

The paper's modular-addition model (``explaind_store.examples.modadd``, p = 113, ~97k parameters) trained for
``--updates`` full-batch AdamW updates; every case attributes ``queries="val[:Q]"`` with ``output="log_softmax"``
(113 outputs, so 113 query rows a query) and ``by=("step", "tensor")`` on the synchronous scheduler with one torch
thread, in a fresh subprocess that reports its own peak RSS (``ru_maxrss``), wall and CPU seconds (user + system)
of the call, and the batches it ran. Budgets: "unbounded" (``EXPLAIND_QUERY_BYTES=1TB``: no batches, the engine's
behaviour before the budget; only up to ``--unbounded-max`` queries, as it needs about 2 MB a row), "default" (a
quarter of the memory available when the call starts) and "small" (``--small``). ``--baseline PATH`` also runs an
older checkout (e.g. the main branch) unbounded, first on ``PYTHONPATH``.

Prints a Markdown table (docs/benchmarks.md) with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/engine.py would shadow the engine package when this script's folder leads sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]


def child(args: dict[str, Any]) -> None:
    """One case, in this fresh process: prints a JSON line."""
    import torch

    torch.set_num_threads(1)
    from explaind_store import open_run

    import engine

    run = open_run(args["store"])
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ds = engine.attribute(run, queries=f"val[:{args['queries']}]", by=("step", "tensor"), client="sync",
                          progress=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print("RESULT " + json.dumps({"peak_mib": after.ru_maxrss / 1024, "wall": wall, "cpu": cpu,
                                  "batches": int(ds.attrs.get("query_batches", 1))}))


def run_case(store: str, queries: int, budget: str | None, pythonpath: str) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    env.pop("EXPLAIND_QUERY_BYTES", None)
    if budget is not None:
        env["EXPLAIND_QUERY_BYTES"] = budget
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps({"store": store, "queries": queries})],
                       capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout)[-300:].strip().replace("\n", " ")}
    return json.loads(lines[-1][len("RESULT "):])


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--queries", default="1,4,16,32")
    ap.add_argument("--updates", type=int, default=6)
    ap.add_argument("--small", default="1GB", help="the explicit small budget (EXPLAIND_QUERY_BYTES)")
    ap.add_argument("--unbounded-max", type=int, default=16, help="largest query count run without a budget")
    ap.add_argument("--baseline", help="an older checkout to run unbounded too (first on PYTHONPATH)")
    ap.add_argument("--workdir")
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    from explaind_store.examples import modadd

    work = Path(a.workdir or tempfile.mkdtemp(prefix="query-memory-"))
    store = work / f"modadd-{a.updates}.zarr"
    if not store.exists():
        modadd.train(str(store), steps=a.updates, progress=False)
    here = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    engines = [("this checkout", here)]
    if a.baseline:
        engines.insert(0, (f"baseline ({a.baseline})", os.pathsep.join([a.baseline, here])))
    print(f"paper modular-addition model, {a.updates} updates, by step and tensor, sync, 1 torch thread; "
          f"load average at start {load()}\n")
    print("| engine | budget | queries (rows) | batches | peak RSS (MiB) | wall (s) | CPU (s) | load |")
    print("|---|---|---|---|---|---|---|---|")
    for q in (int(v) for v in a.queries.split(",")):
        cases = []
        if q <= a.unbounded_max:
            cases += [(name, "unbounded", "1TB", path) for name, path in engines]
        cases += [("this checkout", "default", None, here), ("this checkout", f"small ({a.small})", a.small, here)]
        for name, label, budget, path in cases:
            r = run_case(str(store), q, budget, path)
            if "error" in r:
                print(f"| {name} | {label} | {q} ({113 * q}) | - | failed: {r['error']} | | | {load()} |")
            else:
                print(f"| {name} | {label} | {q} ({113 * q}) | {r['batches']} | {r['peak_mib']:,.0f} | "
                      f"{r['wall']:.1f} | {r['cpu']:.1f} | {load()} |", flush=True)


if __name__ == "__main__":
    main()
