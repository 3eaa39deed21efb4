"""Recording overhead: training wall time with the Recorder against without, for each writer kind, interleaved in one
run (issue 14).

    python bench/record_overhead.py [--repeats 2] [--modadd-steps 64] [--digits-steps 400] [--writers ...] [--quick]
    python bench/record_overhead.py --pairs 15 --tasks digits --writers thread --threads 1,2

Writer kinds (arms): ``thread`` (background thread), ``process`` (writer process fed through shared memory),
``thread+zarrs`` and ``process+zarrs`` (the same with zarr-python's codec pipeline replaced by the Rust ``zarrs``
one, if installed). Each repetition runs the plain loop and every arm at ``N`` and ``2N`` updates, the arms in a
rotated order, so noise on a shared machine hits all alike. Besides the ratio at each length the *steady-state*
ratio ``(rec(2N) - rec(N)) / (plain(2N) - plain(N))`` is reported: the overhead per update of a long run, without
the Recorder's fixed set-up and close cost, and the same ratio in CPU seconds. CPU seconds are the training
process's plus its reaped children's (the writer process). If ``Recorder`` accepts ``checkpoint_every``, K=10 is
measured too (else printed as n/a).

**Paired windows** (``--pairs P``, the stable measurement on a shared machine): instead of subtracting runs of N
from runs of 2N, every run trains 2N updates and only its last N are timed (a callback marks updates N and 2N, so
the Recorder's set-up, the first chunk and the final flush are outside the window). ``P`` pairs are run, each a
plain run and a recorded run per arm of identical training (same seed, so the same initialisation, data order and
losses, checked), plain first in even pairs and last in odd ones, after one untimed warm-up run of every arm. The
result per arm is the median of the P per-pair ratios with their interquartile range, and CPU milliseconds per
update in the window split by thread (read from ``/proc/self/task/*/schedstat``, nanoseconds): the training
thread, the recorder's writer thread, the process's other threads (torch's intra-op pool, zarr's event loop) and a
writer process. ``--threads 1,2`` repeats everything for each torch thread count (at one thread the writer has the
second core of a 2-core machine to itself).

Prints Markdown tables (paste into docs/benchmarks.md) with the load average next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
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


def bench_task(name: str, train: Callable[..., Any], steps: int, *, repeats: int, tmp: Path, arms: list[str],
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


WRITER_THREAD = "explaind-writer"  # the thread writer's name (explaind_store.writer.ChunkWriter)


def _task_ns(pid: int | str, tid: int | str) -> int:
    """CPU nanoseconds one thread has run (``/proc/.../schedstat``: exact, unlike the 10 ms ticks of ``stat``)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _children() -> list[int]:
    """Pids of this process's children (a writer process), from ``/proc/*/stat``."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out.append(int(d))
    return out


def _cpu_split(children: list[int]) -> dict[str, int]:
    """CPU nanoseconds so far: ``train`` (the main thread, which trains), ``writer`` (the writer thread),
    ``other`` (the process's other threads) and ``child`` (child processes, all their threads)."""
    me = os.getpid()
    writer = {t.native_id for t in threading.enumerate() if t.name == WRITER_THREAD}
    out = {"train": 0, "writer": 0, "other": 0, "child": 0}
    for tid in os.listdir(f"/proc/{me}/task"):
        key = "train" if int(tid) == me else "writer" if int(tid) in writer else "other"
        out[key] += _task_ns(me, tid)
    for pid in children:
        with contextlib.suppress(OSError):
            out["child"] += sum(_task_ns(pid, tid) for tid in os.listdir(f"/proc/{pid}/task"))
    return out


class _Window:
    """Callback for ``train(..., callback=)``: marks wall time and per-thread CPU after updates ``start`` and ``end``
    (the timed window is updates ``start + 1 .. end``)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.children: list[int] = []
        self.marks: dict[int, tuple[float, dict[str, int]]] = {}
        self.losses: list[float] = []

    def __call__(self, s: int, loss: float, model: Any) -> None:
        self.losses.append(loss)
        if s == self.start:
            self.children = _children()
            cpu = _cpu_split(self.children)
            self.marks[s] = (time.perf_counter(), cpu)  # wall last: the readings above are outside the window
        elif s == self.end:
            t = time.perf_counter()
            self.marks[s] = (t, _cpu_split(self.children))

    def result(self) -> dict[str, Any]:
        (t0, c0), (t1, c1) = self.marks[self.start], self.marks[self.end]
        n = self.end - self.start
        out: dict[str, Any] = {"wall_ms": 1000 * (t1 - t0) / n}
        out.update({f"{k}_ms": (c1[k] - c0[k]) / 1e6 / n for k in c0})
        out["cpu_ms"] = sum(out[f"{k}_ms"] for k in c0)
        return out


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (``statistics.quantiles``, inclusive; one value: itself thrice)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def bench_pairs(name: str, train: Callable[..., Any], steps: int, *, pairs: int, tmp: Path, arms: list[str],
                **kw: Any) -> list[dict[str, Any]]:
    """``pairs`` interleaved pairs of identical runs of ``2 * steps`` updates, plain and recorded per arm, timing
    only updates ``steps + 1 .. 2 * steps`` of each run; per arm the per-pair ratios' median and quartiles."""
    common = {"progress": False, "eval_every": 0, **kw}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ["plain", *arms]}
    losses: dict[str, list[float]] = {}

    def one(arm: str, tag: str) -> dict[str, Any]:
        out = None if arm == "plain" else tmp / f"{name}-{tag}-{arm.replace('@', '-')}"
        k = int(arm.split("@K=")[1]) if "@K=" in arm else 1
        kind = arm.split("@")[0]
        extra = {} if out is None else {"overwrite": True, "recorder_kwargs": _arm_kwargs(kind, k)}
        win = _Window(steps, 2 * steps)
        t0 = time.perf_counter()
        with _arm_context(kind):
            train(None if out is None else str(out), steps=2 * steps, callback=win, **common, **extra)
        res = {**win.result(), "run_s": time.perf_counter() - t0}
        losses.setdefault(arm, win.losses)
        if losses[arm] != win.losses:
            losses[arm] = []  # not reproducible run to run: reported as such
        if out is not None:
            shutil.rmtree(out)
        return res

    for arm in ["plain", *arms]:  # warm-up, untimed: imports, data, allocator, the first store
        one(arm, "warm")
    for p in range(pairs):
        order = [*arms[p % len(arms):], *arms[: p % len(arms)]]
        order = ["plain", *order] if p % 2 == 0 else [*order, "plain"]
        for arm in order:
            runs[arm].append(one(arm, str(p)))
            r = runs[arm][-1]
            print(f"  {name} pair {p} {arm}: {r['wall_ms']:.3f} ms/update in the window, train thread "
                  f"{r['train_ms']:.3f} ms CPU, load {_load()}", file=sys.stderr, flush=True)
    rows = []
    plain = runs["plain"]
    for arm in arms:
        ratios = [r["wall_ms"] / q["wall_ms"] for r, q in zip(runs[arm], plain)]
        cpu_ratios = [r["cpu_ms"] / q["cpu_ms"] for r, q in zip(runs[arm], plain)]
        run_ratios = [r["run_s"] / q["run_s"] for r, q in zip(runs[arm], plain)]
        med = {key: statistics.median(r[key] for r in runs[arm]) for key in runs[arm][0]}
        pmed = {key: statistics.median(r[key] for r in plain) for key in plain[0]}
        rows.append({
            "task": name, "arm": arm, "updates": steps, "pairs": pairs, "ratio_q": _quartiles(ratios),
            "ratio_range": (min(ratios), max(ratios)), "cpu_ratio_q": _quartiles(cpu_ratios),
            "run_ratio": statistics.median(run_ratios), "rec": med, "plain": pmed,
            "same_losses": bool(losses.get(arm)) and losses[arm] == losses["plain"],
        })
    return rows


def print_pairs(rows: list[dict[str, Any]], threads: int, pairs: int, load_before: str) -> None:
    """The paired-window table."""
    print(f"\nRecording overhead, paired windows ({pairs} interleaved pairs, torch threads={threads}; each run trains "
          f"2N updates and the last N are timed; load average 1/5/15 min before {load_before}, after {_load()}, "
          f"on {os.cpu_count()} cores)\n")
    print("| task | writer | K | torch threads | N | plain ms/update | recorded ms/update | **ratio: median** "
          "[IQR] (min-max) | target | CPU ratio (process + writer process): median [IQR] | training thread CPU "
          "ms/update (plain -> recorded) | writer thread CPU ms/update | other threads CPU ms/update (plain -> "
          "recorded) | writer process CPU ms/update | whole-run ratio (set-up and close included) | same losses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        task, k, target = _labels(r)
        q1, q2, q3 = r["ratio_q"]
        c1, c2, c3 = r["cpu_ratio_q"]
        rec, pl = r["rec"], r["plain"]
        print(
            f"| {task} | {r['arm'].split('@')[0]} | {k} | {threads} | {r['updates']} | {pl['wall_ms']:.3f} | "
            f"{rec['wall_ms']:.3f} | **{q2:.3f}x** [{q1:.3f}-{q3:.3f}] ({r['ratio_range'][0]:.2f}-"
            f"{r['ratio_range'][1]:.2f}) | {'-' if target is None else f'{target:.2f}x'} | "
            f"{c2:.3f}x [{c1:.3f}-{c3:.3f}] | {pl['train_ms']:.3f} -> {rec['train_ms']:.3f} | "
            f"{rec['writer_ms']:.3f} | {pl['other_ms']:.3f} -> {rec['other_ms']:.3f} | {rec['child_ms']:.3f} | "
            f"{r['run_ratio']:.3f}x | {'yes' if r['same_losses'] else 'NO'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modadd-steps", type=int, default=64, help="N for modadd (2 chunks of its 32 updates)")
    ap.add_argument("--digits-steps", type=int, default=400)
    ap.add_argument("--threads", default="2",
                    help="torch threads; a comma-separated list (e.g. 1,2) measures each in turn")
    ap.add_argument("--writers", default="thread,process,thread+zarrs",
                    help="comma-separated arms among thread, process, thread+zarrs, process+zarrs")
    ap.add_argument("--tasks", default="modadd,digits")
    ap.add_argument("--pairs", type=int, default=0,
                    help="measure by paired windows instead: this many interleaved plain/recorded pairs, each run "
                         "2N updates with the last N timed; median and IQR of the per-pair ratios (see above)")
    ap.add_argument("--no-k10", action="store_true", help="leave out the modadd K=10 arm")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    thread_counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    arms = [a.strip() for a in args.writers.split(",") if a.strip()]
    if any(a.endswith("+zarrs") for a in arms):
        try:
            import zarrs  # noqa: F401
        except ImportError:
            print("zarrs is not installed (pip install zarrs): its arms are left out")
            arms = [a for a in arms if not a.endswith("+zarrs")]
    sparse = "checkpoint_every" in inspect.signature(Recorder).parameters and not args.no_k10
    mod_kw: dict[str, Any] = {}
    if args.quick:
        args.repeats, args.modadd_steps, args.digits_steps = 1, 10, 20
        args.pairs = min(args.pairs, 2)
        mod_kw = {"p": 23, "d_model": 32, "d_mlp": 128, "n_train": 170, "n_val": 50}
    tasks = args.tasks.split(",")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        tmp = Path(tempfile.mkdtemp(prefix="explaind-bench-"))
        load_before = _load()
        rows: list[dict[str, Any]] = []
        bench = (functools.partial(bench_pairs, pairs=args.pairs) if args.pairs > 0
                 else functools.partial(bench_task, repeats=args.repeats))
        try:
            if "modadd" in tasks:
                mod_arms = arms + ([f"{arms[0]}@K=10"] if sparse else [])
                rows += bench("modadd", modadd.train, args.modadd_steps, tmp=tmp, arms=mod_arms, **mod_kw)
            if "digits" in tasks:
                rows += bench("digits", digits_cnn.train, args.digits_steps, tmp=tmp, arms=arms)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if args.pairs > 0:
            print_pairs(rows, threads, args.pairs, load_before)
        else:
            print_lengths(rows, threads, args.repeats, load_before, sparse)


def _labels(r: dict[str, Any]) -> tuple[str, int, Any]:
    """A result row's task label, checkpoint interval K and overhead target."""
    task = "modadd (paper config, full batch)" if r["task"] == "modadd" else "digits CNN (SGD, minibatch 64)"
    k = int(r["arm"].split("@K=")[1]) if "@K=" in r["arm"] else 1
    return task, k, TARGETS.get((r["task"], k))


def print_lengths(rows: list[dict[str, Any]], threads: int, repeats: int, load_before: str, sparse: bool) -> None:
    """The N / 2N table."""
    print(f"\nRecording overhead ({repeats} interleaved repeats, torch threads={threads}, medians; "
          f"load average 1/5/15 min before {load_before}, after {_load()}, on {os.cpu_count()} cores)\n")
    print("| task | writer | K | updates N | ms/update (plain) | ratio at N | ratio at 2N | steady-state ratio | "
          "target | fixed cost (s) | CPU s at 2N (plain / recorded) | steady-state CPU ratio | "
          "ratio at 2N per repeat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        task, k, target = _labels(r)
        print(
            f"| {task} | {r['arm'].split('@')[0]} | {k} | {r['updates']} | {r['ms_per_update']:.1f} | "
            f"{r['ratio']:.3f}x | {r['ratio2']:.3f}x | **{r['marginal']:.3f}x** | "
            f"{'-' if target is None else f'{target:.2f}x'} | {r['fixed_s']:.2f} | "
            f"{r['cpu_plain']:.1f} / {r['cpu_rec']:.1f} | {r['cpu_marginal']:.3f}x | "
            f"{', '.join(f'{x:.2f}' for x in r['per_rep'])} |"
        )
    if not sparse:
        print("| modadd (paper config, full batch) | - | 10 | - | - | n/a | n/a | n/a | 1.05x | - | - | - | - |")
        print("\nK=10: n/a (this Recorder has no checkpoint_every, or --no-k10).")


if __name__ == "__main__":
    main()
