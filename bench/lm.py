"""The language-model workload (issue 16): recording overhead of ``ExplaindCallback`` and engine time per update.

    python bench/lm.py [--repeats 3] [--steps 40] [--window 10]

(a) The stock ``transformers.Trainer`` run of the ``explaind demo lm`` model (``explaind_app.demo_lm.LM_DEMO``: GPT-2,
    byte vocabulary, the standard library corpus) for N = ``--steps`` and 2N updates with the callback and without
    it, interleaved ``--repeats`` times in this process (same seed, same data order): ratios at N and 2N and the
    steady-state ratio (the per-update cost of a long run, without the callback's fixed cost); the
    callback's run also logs every update (it needs the gradient norm), which is part of its overhead.
(b) Engine seconds per update on the last ``--window`` updates of the recorded run, synchronous scheduler, one torch
    thread: the demo's components stage (2 validation sequences' loss, ``by=("step", "tensor")``) and its
    per-sample stage (``by=("sample",)``).

Prints Markdown tables (docs/benchmarks.md, section "Language model (issue 16)") and the load average, because this
machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/engine.py would shadow the engine package: this folder must not be on the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def _train(cfg, steps: int, out: Path, record: bool) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from explaind_app.demo_lm import _load, _scheduler_kwargs
    from explaind_store.integrations.hf import ExplaindCallback

    x, y = _load(cfg, "train")
    rows = [{"input_ids": torch.from_numpy(x[i]), "labels": torch.from_numpy(y[i])} for i in range(len(x))]
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg.gpt2_kwargs()))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=cfg.batch_size, max_steps=steps,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.scheduler, lr_scheduler_kwargs=_scheduler_kwargs(cfg), max_grad_norm=cfg.max_grad_norm,
        report_to=[], save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, seed=cfg.seed, use_cpu=True,
    )
    cbs = [ExplaindCallback(out / "run.zarr", overwrite=True)] if record else []
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=cbs)
    for c in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(c)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def _overhead(cfg, a, tmp: Path) -> None:
    """Interleaved runs with and without the callback at N and 2N updates; the steady-state ratio
    ``(rec(2N) - rec(N)) / (plain(2N) - plain(N))`` is the cost per update of a long run, without the callback's
    fixed cost (creating the store, fingerprinting the corpus reference, the final flush)."""
    _train(cfg, 3, tmp / "warm", True)  # imports, data, allocator
    n = a.steps
    times: dict[tuple[bool, int], list[float]] = {(r, k): [] for r in (False, True) for k in (n, 2 * n)}
    for _ in range(a.repeats):
        for k in (n, 2 * n):
            for rec in (False, True):
                times[rec, k].append(_train(cfg, k, tmp / f"r{int(rec)}", rec))
    med = {key: statistics.median(v) for key, v in times.items()}
    steady = (med[True, 2 * n] - med[True, n]) / (med[False, 2 * n] - med[False, n])
    fixed = (med[True, n] - med[False, n]) - (steady - 1) * med[False, n]
    print(f"load average {os.getloadavg()}")
    print("| model | updates N | without callback (s/update, 2N) | with callback (s/update, 2N) | ratio at N | "
          "ratio at 2N | steady-state ratio | fixed cost (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| GPT-2 {cfg.n_layer}x{cfg.n_embd}, ctx {cfg.context}, batch {cfg.batch_size}, {cfg.n_params():,} "
          f"params, dropout {cfg.dropout:g} | {n} | {med[False, 2 * n] / (2 * n):.3f} | {med[True, 2 * n] / (2 * n):.3f} "
          f"| {med[True, n] / med[False, n]:.2f}x | {med[True, 2 * n] / med[False, 2 * n]:.2f}x | **{steady:.2f}x** "
          f"| {fixed:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--engine-only", action="store_true", help="skip (a): record one run and time the engine")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from explaind_app.demo_lm import LM_DEMO

    cfg = dataclasses.replace(LM_DEMO, warmup_steps=min(LM_DEMO.warmup_steps, a.steps // 4))
    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    try:
        if a.engine_only:
            _train(cfg, a.steps, tmp / "r1", True)
        else:
            _overhead(cfg, a, tmp)

        import engine

        run = tmp / "r1" / "run.zarr"
        t = a.steps
        window = slice(t - a.window, t)
        print("\n| engine stage | by | queries | wall s/update | CPU s/update | max residual / change |")
        print("|---|---|---|---|---|---|")
        for name, by in (("components", ("step", "tensor")), ("per-sample", ("sample",))):
            t0, c0 = time.perf_counter(), time.process_time()
            ds = engine.attribute(str(run), queries="train[[0,1]]", output="loss", by=by, steps=window,
                                  client="sync", progress=False)
            secs = (time.perf_counter() - t0) / a.window
            cpu = (time.process_time() - c0) / a.window
            ratio = float((abs(ds["residual"].sum("step")) / abs(ds["final"] - ds["initial"])).max())
            print(f"| {name} | {', '.join(by)} | 2 | {secs:.2f} | {cpu:.2f} | {ratio:.1e} |")
        print(f"load average {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
