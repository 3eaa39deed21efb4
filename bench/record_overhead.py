"""Recording overhead: training wall time with the Recorder against without, for each writer kind, interleaved in one
run (issue 14).

    python bench/record_overhead.py [--repeats 2] [--modadd-steps 64] [--digits-steps 400] [--writers ...] [--quick]

Writer kinds (arms): ``thread`` (background thread), ``process`` (writer process fed through shared memory),
``thread+zarrs`` and ``process+zarrs`` (the same with zarr-python's codec pipeline replaced by the Rust ``zarrs``
one, if installed). Each repetition runs the plain loop and every arm at ``N`` and ``2N`` updates, the arms in a
rotated order, so noise on a shared machine hits all alike. Besides the ratio at each length the *steady-state*
ratio ``(rec(2N) - rec(N)) / (plain(2N) - plain(N))`` is reported: the overhead per update of a long run, without
the Recorder's fixed set-up and close cost, and the same ratio in CPU seconds. CPU seconds are the training
process's plus its reaped children's (the writer process). If ``Recorder`` accepts ``checkpoint_every``, K=10 is
measured too (else printed as n/a).

Prints Markdown tables (paste into docs/benchmarks.md) with the load average next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zarr

from explaind_store import Recorder
from explaind_store.examples import digits_cnn, modadd
from explaind_store.info import run_info

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
TARGETS = {("modadd", 1): 1.10, ("modadd", 10): 1.05, ("digits", 1): 1.3}


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (a writer process is reaped at close)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _arm_context(arm: str) -> contextlib.AbstractContextManager[Any]:
    if arm.endswith("+zarrs"):
        return zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE})
    return contextlib.nullcontext()


def _arm_kwargs(arm: str, k: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"writer": arm.split("+")[0]}
    if k != 1:
        kw["checkpoint_every"] = k
    return kw


def bench_task(name: str, train: Callable[..., Any], steps: int, repeats: int, tmp: Path, arms: list[str],
               **kw: Any) -> list[dict[str, Any]]:
    """Plain and recorded training of ``steps`` and ``2 * steps`` updates for each arm, interleaved."""
    wall: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    info: dict[str, Any] = {}
    common = {"progress": False, "eval_every": 0, **kw}
    train(None, steps=min(steps, 5), **common)  # warm-up: imports, data, allocator
    for r in range(repeats):
        order = arms[r % len(arms):] + arms[: r % len(arms)]
        for n in (steps, 2 * steps):
            for arm in ["plain", *order]:
                out = None if arm == "plain" else tmp / f"{name}-{r}-{n}"
                k = int(arm.split("@K=")[1]) if "@K=" in arm else 1
                kind = arm.split("@")[0]
                extra = {} if out is None else {"overwrite": True, "recorder_kwargs": _arm_kwargs(kind, k)}
                t0, c0 = time.perf_counter(), _cpu()
                with _arm_context(kind):
                    train(None if out is None else str(out), steps=n, **common, **extra)
                wall.setdefault((arm, n), []).append(time.perf_counter() - t0)
                cpu.setdefault((arm, n), []).append(_cpu() - c0)
                print(f"  {name} repeat {r} N={n} {arm}: {wall[(arm, n)][-1]:.2f} s wall, "
                      f"{cpu[(arm, n)][-1]:.2f} s CPU, load {_load()}", file=sys.stderr, flush=True)
                if out is not None:
                    info[arm] = run_info(out)
                    shutil.rmtree(out)
    med = {key: statistics.median(v) for key, v in wall.items()}
    cmed = {key: statistics.median(v) for key, v in cpu.items()}
    p1, p2 = med[("plain", steps)], med[("plain", 2 * steps)]
    rows = []
    for arm in arms:
        r1, r2 = med[(arm, steps)], med[(arm, 2 * steps)]
        marginal = (r2 - r1) / max(p2 - p1, 1e-9)
        # the same per update in CPU seconds: on a shared machine wall time also counts other jobs' time slices
        cpu_marginal = (cmed[(arm, 2 * steps)] - cmed[(arm, steps)]) / max(
            cmed[("plain", 2 * steps)] - cmed[("plain", steps)], 1e-9)
        rows.append({
            "task": name, "arm": arm, "updates": steps, "plain_s": p1, "recorded_s": r1,
            "ratio": r1 / p1, "ratio2": r2 / p2, "marginal": marginal, "fixed_s": r1 - marginal * p1,
            "cpu_plain": cmed[("plain", 2 * steps)], "cpu_rec": cmed[(arm, 2 * steps)], "cpu_marginal": cpu_marginal,
            "ms_per_update": 1000 * p1 / steps, "bytes_per_update": info[arm]["bytes_per_update"],
            "per_rep": [b / a for a, b in zip(wall[("plain", 2 * steps)], wall[(arm, 2 * steps)])],
        })
    return rows


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modadd-steps", type=int, default=64, help="N for modadd (2 chunks of its 32 updates)")
    ap.add_argument("--digits-steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--writers", default="thread,process,thread+zarrs",
                    help="comma-separated arms among thread, process, thread+zarrs, process+zarrs")
    ap.add_argument("--tasks", default="modadd,digits")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.writers.split(",") if a.strip()]
    if any(a.endswith("+zarrs") for a in arms):
        try:
            import zarrs  # noqa: F401
        except ImportError:
            print("zarrs is not installed (pip install zarrs): its arms are left out")
            arms = [a for a in arms if not a.endswith("+zarrs")]
    sparse = "checkpoint_every" in inspect.signature(Recorder).parameters
    mod_kw: dict[str, Any] = {}
    if args.quick:
        args.repeats, args.modadd_steps, args.digits_steps = 1, 10, 20
        mod_kw = {"p": 23, "d_model": 32, "d_mlp": 128, "n_train": 170, "n_val": 50}
    tmp = Path(tempfile.mkdtemp(prefix="explaind-bench-"))
    load_before = _load()
    rows: list[dict[str, Any]] = []
    try:
        tasks = args.tasks.split(",")
        if "modadd" in tasks:
            mod_arms = arms + ([f"{arms[0]}@K=10"] if sparse else [])
            rows += bench_task("modadd", modadd.train, args.modadd_steps, args.repeats, tmp, mod_arms, **mod_kw)
        if "digits" in tasks:
            rows += bench_task("digits", digits_cnn.train, args.digits_steps, args.repeats, tmp, arms)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nRecording overhead ({args.repeats} interleaved repeats, torch threads={args.threads}, medians; "
          f"load average 1/5/15 min before {load_before}, after {_load()}, on {os.cpu_count()} cores)\n")
    print("| task | writer | K | updates N | ms/update (plain) | ratio at N | ratio at 2N | steady-state ratio | "
          "target | fixed cost (s) | CPU s at 2N (plain / recorded) | steady-state CPU ratio | "
          "ratio at 2N per repeat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        task = "modadd (paper config, full batch)" if r["task"] == "modadd" else "digits CNN (SGD, minibatch 64)"
        k = int(r["arm"].split("@K=")[1]) if "@K=" in r["arm"] else 1
        target = TARGETS.get((r["task"], k))
        print(
            f"| {task} | {r['arm'].split('@')[0]} | {k} | {r['updates']} | {r['ms_per_update']:.1f} | "
            f"{r['ratio']:.3f}x | {r['ratio2']:.3f}x | **{r['marginal']:.3f}x** | "
            f"{'-' if target is None else f'{target:.2f}x'} | {r['fixed_s']:.2f} | "
            f"{r['cpu_plain']:.1f} / {r['cpu_rec']:.1f} | {r['cpu_marginal']:.3f}x | "
            f"{', '.join(f'{x:.2f}' for x in r['per_rep'])} |"
        )
    if not sparse:
        print("| modadd (paper config, full batch) | - | 10 | - | - | n/a | n/a | n/a | 1.05x | - | - | - | - |")
        print("\nK=10: n/a (this Recorder has no checkpoint_every).")


if __name__ == "__main__":
    main()
