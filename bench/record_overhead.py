"""Recording overhead: training wall time with the Recorder against without, interleaved in one run.

    python bench/record_overhead.py [--repeats 3] [--modadd-steps 150] [--digits-steps 400] [--quick]

Prints a Markdown table (paste into docs/benchmarks.md). Ratios compare runs interleaved in the same process, because
this machine is noisy; the target is at most 1.10x per update (the steady-state ratio; the Recorder's fixed set-up
and close cost is reported apart).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from explaind_store import Recorder
from explaind_store.info import run_info
from explaind_store.examples import digits_cnn, modadd


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_task(name: str, train, steps: int, repeats: int, tmp: Path, **kw) -> dict:
    """Plain and recorded training of ``steps`` and ``2 * steps`` updates, interleaved. The Recorder has a fixed cost
    (creating ~40 arrays, the last flush: ~0.3 s) that short runs cannot amortise, so besides the ratio at each length
    the *steady-state* ratio ``(rec(2N) - rec(N)) / (plain(2N) - plain(N))`` is reported: the overhead per update
    of a long run."""
    times: dict[tuple[str, int], list[float]] = {}
    info = None
    train(None, steps=min(steps, 5), progress=False, eval_every=0, **kw)  # warm-up: imports, data, allocator
    for r in range(repeats):
        for n in (steps, 2 * steps):  # interleave: noise on this machine hits both arms alike
            times.setdefault(("plain", n), []).append(
                _timed(lambda n=n: train(None, steps=n, progress=False, eval_every=0, **kw)))
            out = tmp / f"{name}-{r}-{n}"
            times.setdefault(("rec", n), []).append(_timed(
                lambda out=out, n=n: train(str(out), steps=n, progress=False, eval_every=0, overwrite=True, **kw)))
            info = run_info(out)
            shutil.rmtree(out)
    assert info is not None
    med = {k: statistics.median(v) for k, v in times.items()}
    p1, r1, p2, r2 = med[("plain", steps)], med[("rec", steps)], med[("plain", 2 * steps)], med[("rec", 2 * steps)]
    marginal = (r2 - r1) / max(p2 - p1, 1e-9)
    return {
        "task": name,
        "updates": steps,
        "plain_s": p1,
        "recorded_s": r1,
        "ratio": r1 / p1,
        "ratio2": r2 / p2,
        "marginal": marginal,
        "fixed_s": r1 - marginal * p1,
        "ms_per_update": 1000 * p1 / steps,
        "bytes_per_update": info["bytes_per_update"],
        "compression": info["compression_ratio"],
        "raw_mb_s": info["trajectory_bytes_raw"] / r2 / 2**20,
        "ratios": [b / a for a, b in zip(times[("plain", steps)], times[("rec", steps)])],
    }


def write_ceiling(tmp: Path, updates: int = 200) -> dict:
    """Recorder throughput alone: AdamW steps on fixed gradients, so nearly all time is snapshot + write."""
    torch.manual_seed(0)
    model = modadd.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=4.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    data = modadd.make_data()["train"]
    t0 = time.perf_counter()
    with Recorder(tmp / "ceiling", model, opt, data=data) as rec:
        for _ in range(updates):
            opt.step()
            rec.record([0])
    wall = time.perf_counter() - t0
    return {
        "raw_bytes": rec.bytes_written,
        "wall_s": wall,
        "writer_busy_s": rec.writer_seconds,
        "mb_s_wall": rec.bytes_written / wall / 2**20,
        "mb_s_writer": rec.bytes_written / max(rec.writer_seconds, 1e-9) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modadd-steps", type=int, default=150)
    ap.add_argument("--digits-steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="explaind-bench-"))
    mod_kw: dict = {}
    if args.quick:
        args.repeats, args.modadd_steps, args.digits_steps = 1, 10, 20
        mod_kw = {"p": 23, "d_model": 32, "d_mlp": 128, "n_train": 170, "n_val": 50}
    try:
        rows = [
            bench_task("modadd (paper config, full batch)" if not args.quick else "modadd (quick)", modadd.train,
                       args.modadd_steps, args.repeats, tmp, **mod_kw),
            bench_task("digits CNN (SGD, minibatch 64)", digits_cnn.train, args.digits_steps, args.repeats, tmp),
        ]
        ceil = write_ceiling(tmp, 20 if args.quick else 200)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nRecording overhead ({args.repeats} interleaved repeats, torch threads={args.threads}, medians)\n")
    print("| task | updates N | ms/update (plain) | plain s | recorded s | ratio at N | ratio at 2N | steady-state "
          "ratio | fixed cost (s) | bytes/update | compression | raw MB/s recorded |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['updates']} | {r['ms_per_update']:.1f} | {r['plain_s']:.2f} | {r['recorded_s']:.2f} | "
            f"{r['ratio']:.3f}x | {r['ratio2']:.3f}x | **{r['marginal']:.3f}x** | {r['fixed_s']:.2f} | "
            f"{r['bytes_per_update'] / 1024:.0f} KiB | {r['compression']:.2f}x | {r['raw_mb_s']:.0f} |"
        )
    print(
        f"\nWriter ceiling (modadd paper model, AdamW steps on fixed gradients): {ceil['raw_bytes'] / 2**20:.0f} MiB raw "
        f"in {ceil['wall_s']:.2f} s wall = {ceil['mb_s_wall']:.0f} MiB/s end to end; writer thread busy "
        f"{ceil['writer_busy_s']:.2f} s = {ceil['mb_s_writer']:.0f} MiB/s encode+write."
    )


if __name__ == "__main__":
    main()
