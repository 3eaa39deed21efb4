"""Grokking at the paper's configuration, the pipeline-alignment test, and a decomposition of one grokking seed.

Configuration (ExPLAIND, Eichin et al., arXiv:2505.20076, Section 5 / Nanda et al. 2023): p = 113, 4,000 training
pairs (2,000 validation), one-layer transformer d_model 64, 4 heads, MLP 512, full-batch AdamW lr 1e-3, betas
(0.9, 0.98), weight decay 4.0, float32, up to 4,000 updates or until training and validation accuracy are both 100%.

Stages (``--stage``; each resumable, a finished piece is reused):

- ``train``      every seed: train (the first seed, 43, is recorded to a store) and evaluate every 10 updates:
                 loss / accuracy on the training pairs, the validation pairs, and the validation pairs whose mirror
                 ``(b, a)`` was (not) trained; the phases found by ``explaind_app.report.find_phases``.
- ``pipeline``   from the recorded store: for each checkpoint every 10 updates, the final outer layers put around
                 that checkpoint's pipeline (and variants); validation accuracy and KL to the final model.
- ``decompose``  ``engine.attribute`` of the loss of 64 validation points by step and tensor over a window of the
                 recorded run (``--window A:B``; default: around circuit formation), in resumable pieces.
- ``whole``      ``explaind demo --paper`` for ``--whole-seed`` (default 3, which reaches 100% training and
                 validation accuracy): the whole run decomposed per component and per training sample, the pipeline
                 test; its tables and figures copied to the results as ``whole_*``.

    python -m experiments.grokking --stage train pipeline [--seeds 43 0 1 2 3]
    python -m experiments.grokking --stage decompose --window 600:800
    python -m experiments.grokking --stage whole
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import common
from explaind_app.demo_paper import PAPER
# moved to the app layer (explaind demo --paper runs them too); kept importable from here
from explaind_app.grokking import (  # noqa: F401
    PIPELINE,
    VARIANTS,
    fig_pipeline,
    model_logits,
    pipeline_alignment,
    pipeline_summary,
)

# the paper's configuration is defined once, by the app's ``explaind demo --paper`` (explaind_app.demo_paper.PAPER)
CONFIG = {k: v for k, v in PAPER.train_kwargs().items() if k != "seed"}
MAX_STEPS = 4000
EVERY = PAPER.every  # evaluation spacing (10 updates)
RECORDED_SEED = 43
WHOLE_SEED = 3  # the seed decomposed whole (reaches 100% training and validation accuracy at update 470)


def _sets(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from explaind_app.demo import novel_mask
    from explaind_store.examples import modadd

    data = modadd.make_data(CONFIG["p"], CONFIG["n_train"], CONFIG["n_val"], seed)
    (xt, _), (xv, yv) = data["train"], data["val"]
    novel = torch.from_numpy(novel_mask(xt.numpy(), xv.numpy(), CONFIG["p"]))
    return {**data, "val_novel": (xv[novel], yv[novel]), "val_mirror": (xv[~novel], yv[~novel])}


def train_seed(seed: int, work: Path, max_steps: int = MAX_STEPS, record: bool | None = None) -> dict[str, Any]:
    """Train one seed for up to ``max_steps`` updates, stopping when training and validation accuracy are both 100%.

    ``record`` (default: only :data:`RECORDED_SEED`) records to ``work/modadd_seed<seed>.zarr`` and resumes from it when the store is
    already there (an interrupted call loses nothing committed); its curves are evaluated from the store. The other
    seeds are trained without a store and evaluated every :data:`EVERY` updates during training.
    """
    from explaind_app.report import compute_curves, find_phases
    from explaind_store import open_run
    from explaind_store.examples import modadd
    from explaind_store.examples.training import evaluate

    f = work / f"seed{seed}_curves.json"
    if f.exists():
        return common.read_json(f)
    sets = _sets(seed)
    curves: dict[str, list[float]] = {"step": []}
    converged = [False]

    def callback(step: int, loss: float, model: Any) -> bool:
        if step % EVERY:
            return False
        ev = evaluate(model, sets)
        curves["step"].append(step)
        for k, v in ev.items():
            curves.setdefault(k, []).append(v)
        if step % 200 == 0:
            common.log(f"seed {seed} update {step}: train {ev['train_acc']:.3f} val {ev['val_acc']:.3f} "
                       f"(mirror not trained {ev['val_novel_acc']:.3f})")
        converged[0] = ev["train_acc"] == 1.0 and ev["val_acc"] == 1.0
        return converged[0]

    kw = dict(CONFIG)
    t = common.Timer()
    record = seed == RECORDED_SEED if record is None else record
    if record:
        path = work / f"modadd_seed{seed}.zarr"
        done = 0
        if path.exists():
            try:
                done = int(open_run(path).committed_updates)
            except Exception:  # noqa: BLE001 - an unreadable store is recorded again
                done = 0
        if done < max_steps:
            if done:
                common.log(f"seed {seed}: resuming the recording at update {done + 1}")
            modadd.train(str(path), steps=max_steps, seed=seed, **kw, resume=done > 0, overwrite=done == 0,
                         progress=False, eval_every=0, callback=callback)
        run = open_run(path)
        updates = int(run.committed_updates)
        secs = t()
        c = compute_curves(run, every=EVERY, extra={k: sets[k] for k in ("val_novel", "val_mirror")})
        c = {k: v for k, v in c.items() if k == "step" or k.endswith("_acc") or k.endswith("_loss")}
        converged[0] = bool(c["train_acc"][-1] == 1.0 and c["val_acc"][-1] == 1.0)
    else:
        res = modadd.train(None, steps=max_steps, seed=seed, **kw, progress=False, eval_every=0, callback=callback)
        updates, secs = res.updates_done, t()
        c = {k: np.asarray(v) for k, v in curves.items()}
    ph = find_phases({"step": c["step"], "train_acc": c["train_acc"], "val_acc": c["val_acc"],
                      "val_novel_acc": c["val_novel_acc"]})
    result = {"seed": seed, "updates": updates, "max_steps": max_steps, "converged": converged[0],
              "seconds": secs, "recorded": record,
              "phases": {k: ph[k] for k in ("memorised", "rise", "grokked", "grokking")},
              "train100": _first(c, "train_acc", 1.0), "val100": _first(c, "val_acc", 1.0),
              "curves": {k: np.asarray(v).tolist() for k, v in c.items()}}
    common.write_json(f, result)
    common.log(f"seed {seed}: {updates} updates in {secs:.0f} s, phases {result['phases']}")
    return result


def _first(c: dict[str, np.ndarray], key: str, level: float) -> int | None:
    idx = np.nonzero(c[key] >= level)[0]
    return int(c["step"][idx[0]]) if len(idx) else None


def phase_text(r: dict[str, Any]) -> str:
    ph = r["phases"]
    cut = r.get("max_steps", MAX_STEPS) < MAX_STEPS and not r.get("converged")
    if cut and ph["grokked"] is None:
        return f"stopped at {r['updates']} updates (time budget), not grokked by then"
    if ph["memorised"] is None:
        return "did not memorise"
    if ph["grokked"] is None:
        return "did not grok"
    return "grokked" if ph["grokking"] else "no delay (val rose with train)"


def train_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        ph = r["phases"]
        va = r["curves"]["val_acc"][-1]
        rows.append([r["seed"], phase_text(r), ph["memorised"], ph["rise"], ph["grokked"], r["train100"], r["val100"],
                     r["updates"], f"{va:.3f}", f"{r['seconds']:.0f}" + (" (recorded)" if r["recorded"] else "")])
    return common.md_table(["seed", "verdict", "train acc 99%", "novel val acc 50%", "val acc 95%", "train acc 100%",
                            "val acc 100%", "updates run", "final val acc", "seconds"], rows)


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.4), constrained_layout=True,
                             squeeze=False)
    for ax, r in zip(axes[0], results):
        c = r["curves"]
        ax.plot(c["step"], c["train_acc"], label="train")
        ax.plot(c["step"], c["val_acc"], label="val")
        ax.plot(c["step"], c["val_novel_acc"], "--", label="val, mirror not trained")
        ax.plot(c["step"], c["val_mirror_acc"], ":", label="val, mirror trained")
        ax.set_title(f"seed {r['seed']}: {phase_text(r)}", fontsize=9)
        ax.set_xlabel("update")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- decomposition ---------------------------------------------------------------------------------------------------
def decompose(run_path: Path, work: Path, window: tuple[int, int], piece: int, queries: int) -> list[dict[str, Any]]:
    """``engine.attribute`` of the loss of ``queries`` validation points by step and tensor over ``window``, in
    pieces of ``piece`` updates (each piece a Zarr result under ``work``; finished pieces are reused)."""
    import engine

    times = []
    for lo in range(window[0], window[1], piece):
        hi = min(lo + piece, window[1])
        path = work / f"decompose_{lo}_{hi}.zarr"
        marker = work / f"decompose_{lo}_{hi}.json"
        if marker.exists():
            times.append(common.read_json(marker))
            continue
        t = common.Timer()
        ds = engine.attribute(str(run_path), queries=f"val[0:{queries}]", output="loss", by=("step", "tensor"),
                              steps=slice(lo, hi), client="sync", out=str(path), progress=False)
        info = {"window": [lo, hi], "seconds": t(), "max_abs_residual": float(ds.attrs.get("max_abs_residual", np.nan)),
                "max_abs_change": float(ds.attrs.get("max_abs_change", np.nan))}
        common.write_json(marker, info)
        times.append(info)
        common.log(f"decomposed ({lo}, {hi}] in {info['seconds']:.0f} s")
    return times


def component_table(work: Path, times: list[dict[str, Any]]) -> dict[str, Any]:
    """Per update and component (``explaind_app.report.component_series``), the change of the mean validation loss
    split into data and weight decay, over the decomposed pieces in order."""
    import xarray as xr

    from explaind_app.report import component_series

    out: dict[str, Any] = {"step": [], "data": {}, "weight_decay": {}}
    for t in sorted(times, key=lambda t: t["window"][0]):
        lo, hi = t["window"]
        ser = component_series(xr.open_zarr(work / f"decompose_{lo}_{hi}.zarr"))
        out["step"] += [int(v) for v in ser["step"]["step"]]
        for part in ("data", "weight_decay"):
            for comp, y in ser[part].items():
                out[part].setdefault(comp, []).extend(float(v) for v in y)
    return out


def plot_components(series: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    for ax, part in zip(axes, ("data", "weight_decay")):
        for comp, y in series[part].items():
            ax.plot(series["step"], np.cumsum(y), label=comp)
        ax.set_title(f"{part.replace('_', ' ')}: cumulative change of the mean validation loss")
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.grokking", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", nargs="+", default=["train", "pipeline"], choices=["train", "pipeline", "decompose", "whole"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[43, 0, 1, 2, 3])
    ap.add_argument("--window", default=None, help="decompose updates A:B (default: 100 updates before the "
                                                   "novel-validation-accuracy rise to 100 after it)")
    ap.add_argument("--record", type=int, nargs="+", default=[RECORDED_SEED],
                    help=f"seeds to record to a store (default {RECORDED_SEED}); the pipeline test runs on each")
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS,
                    help=f"stop each seed after this many updates (default {MAX_STEPS}, the paper's budget)")
    ap.add_argument("--piece", type=int, default=20, help="updates per resumable decomposition piece")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--whole-seed", type=int, default=WHOLE_SEED,
                    help=f"the seed the 'whole' stage records and decomposes whole (default {WHOLE_SEED})")
    ap.add_argument("--sync", action="store_true", help="'whole' stage: the engine in this process, not a cluster")
    ap.add_argument("--work", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work, res = common.work_dir("grokking", args.work), common.results_dir("grokking", args.results)
    if "train" in args.stage:
        results = [train_seed(s, work, args.max_steps, record=s in args.record) for s in args.seeds]
        summary = [{k: v for k, v in r.items() if k != "curves"} for r in results]
        common.write_json(res / "seeds.json", summary)
        # curves thinned to every 50 updates for the committed results (the full ones stay under --work)
        common.write_json(res / "curves.json", {r["seed"]: {k: v[4::5] for k, v in r["curves"].items()}
                                                for r in results})
        (res / "seeds.md").write_text(train_table(results))
        plot_curves(results, res / "curves.png")
    rec = common.read_json(work / f"seed{RECORDED_SEED}_curves.json") if (
        work / f"seed{RECORDED_SEED}_curves.json").exists() else None
    if "pipeline" in args.stage:
        from explaind_store import open_run

        for seed in args.record:
            cf = work / f"seed{seed}_curves.json"
            if not cf.exists() or not (work / f"modadd_seed{seed}.zarr").exists():
                raise SystemExit(f"run --stage train --seeds {seed} --record {seed} first (it records the store)")
            sfx = "" if seed == RECORDED_SEED else f"_seed{seed}"
            f = work / f"pipeline{sfx}.json"
            if f.exists():
                al = common.read_json(f)
            else:
                t = common.Timer()
                al = pipeline_alignment(open_run(work / f"modadd_seed{seed}.zarr"))
                al["seconds"] = t()
                common.write_json(f, al)
            phases = common.read_json(cf)["phases"]
            common.write_json(res / f"pipeline{sfx}.json", {"seed": seed, "step": al["step"][::2],
                                                           "seconds": al.get("seconds"),
                                                           "variants": {v: {k: x[::2] for k, x in d.items()}
                                                                        for v, d in al["variants"].items()}})
            (res / f"pipeline{sfx}.md").write_text(pipeline_summary(al, phases))
            fig_pipeline(al, phases).savefig(res / f"pipeline{sfx}.png", dpi=80)
    if "decompose" in args.stage:
        if rec is None:
            raise SystemExit(f"run --stage train with seed {RECORDED_SEED} first (it records the store)")
        if args.window:
            a, b = (int(v) for v in args.window.split(":"))
        else:
            mid = rec["phases"]["rise"] or rec["phases"]["memorised"] or 100
            a, b = max(0, mid - 100), min(rec["updates"], mid + 100)
        times = decompose(work / f"modadd_seed{RECORDED_SEED}.zarr", work, (a, b), args.piece, args.queries)
        common.write_json(res / "decompose.json", times)
        rows = [[f"({t['window'][0]}, {t['window'][1]}]", f"{t['seconds']:.0f}", f"{t['max_abs_residual']:.2e}",
                 f"{t['max_abs_change']:.3g}"] for t in times]
        series = component_table(work, times)
        # 4 significant digits, no indentation: the committed file stays small
        small = {"step": series["step"], **{part: {c: [float(f"{v:.4g}") for v in y] for c, y in series[part].items()}
                                            for part in ("data", "weight_decay")}}
        (res / "components.json").write_text(json.dumps(small))
        plot_components(series, res / "components.png")
        (res / "decompose.md").write_text(
            f"Loss of {args.queries} validation points by step and tensor, seed {RECORDED_SEED}, one process, one "
            "torch thread.\n\n" + common.md_table(["window", "seconds", "max abs residual", "max abs change"], rows))
    if "whole" in args.stage:
        whole_stage(work, res, args.whole_seed, client="sync" if args.sync else None)
    return 0


def whole_stage(work: Path, res: Path, seed: int, client: Any = None) -> dict[str, Any]:
    """``explaind demo --paper`` for ``seed`` with its output under ``work/paper_seed<seed>`` (resumable), and its
    tables, figures and results copied to ``res`` as ``whole_*`` (the per-update series rounded to 4 digits)."""
    import shutil

    from explaind_app.demo_paper import run_paper_demo

    out = run_paper_demo(work / f"paper_seed{seed}", seed=seed, client=client, progress=False, log=common.log)
    src = Path(out["out_dir"])
    for f in src.glob("*.md"):
        if f.name != "report.md":
            shutil.copyfile(f, res / f"whole_{f.name}")
    for f in (src / "figures").glob("*.png"):
        shutil.copyfile(f, res / f"whole_{f.name}")
    full = common.read_json(src / "results.json")

    def small(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, list):
            return [small(x) for x in v]
        if isinstance(v, dict):
            return {k: small(x) for k, x in v.items()}
        return v

    (res / "whole.json").write_text(json.dumps(small(full)))
    common.log(f"whole run of seed {seed}: results in {res}/whole_*")
    return full


if __name__ == "__main__":
    raise SystemExit(main())
