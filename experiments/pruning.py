"""Pruning by element-wise ExPLAIND scores against magnitude and random pruning (the paper's Section on pruning).

Per training seed: record the digits CNN (SGD + momentum + weight decay + triangular lr, ``digits_cnn.train``),
decompose the log-softmax outputs (all classes) of the first half of the validation split element-wise
(``engine.attribute(..., by=("param",))``), take ``|summed contribution|`` per parameter element as its importance,
zero the least important elements globally or per tensor at each kept fraction, and measure the pruned model on the
other half of the validation split: accuracy, agreement with the unpruned model and KL(unpruned || pruned).

    python -m experiments.pruning [--seeds 0 1 2 3 4] [--work DIR] [--results DIR]

Resumable: the stores, the per-batch score sums and the per-seed metrics are kept under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import common, scores

GRID_LOW = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99)
GRID_HIGH = (0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
# beyond the paper's grids: on this small CNN, 30% of the elements can go with hardly any change (see the results)
GRID_EXTRA = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
KEPT = tuple(sorted(set(GRID_LOW) | set(GRID_HIGH) | set(GRID_EXTRA)))
# explaind: |contribution summed over points, classes and parts|; explaind_per_class: the absolute value per class,
# then summed over classes (effects on different classes cannot cancel)
METHODS = ("explaind", "explaind_per_class", "magnitude", "random")
SCOPES = ("global", "per_module")
STEPS = 300
N_VAL = 297
HELD_OUT = 148  # validation[:148] scores the parameters; validation[148:] tests the pruned models
BATCH = 37


def record(path: Path, seed: int) -> Any:
    """The recorded run of this seed (recorded now unless a complete store is already there)."""
    from explaind_store import open_run
    from explaind_store.examples import digits_cnn

    if path.exists():
        try:
            run = open_run(path)
            if run.committed_updates == STEPS:
                return run
        except Exception:  # noqa: BLE001 - an unreadable or partial store is recorded again
            pass
    digits_cnn.train(str(path), steps=STEPS, seed=seed, n_val=N_VAL, overwrite=True, progress=False, eval_every=0)
    return open_run(path)


def score_sums(run_path: Path, work: Path, seed: int) -> dict[str, np.ndarray]:
    """Element-wise contributions summed over the held-out queries: ``{tensor: (output, part, *shape)}``."""
    import engine
    from engine.result import param_var

    total: dict[str, np.ndarray] = {}
    for lo in range(0, HELD_OUT, BATCH):
        hi = min(lo + BATCH, HELD_OUT)
        f = work / f"seed{seed}_scores_{lo}_{hi}.npz"
        if not f.exists():
            t = common.Timer()
            ds = engine.attribute(str(run_path), queries=f"val[{lo}:{hi}]", output="log_softmax", by=("param",),
                                  client="sync", progress=False)
            names = [str(n) for n in ds["tensor"].values] if "tensor" in ds.coords else None
            if names is None:
                from explaind_store import open_run

                names = open_run(run_path).tensor_names
            arrays = {n: ds[param_var(n)].sum("query").values for n in names}
            common.save_npz(f, **arrays, _seconds=np.array(t()),
                            _max_abs_residual=np.array(float(ds.attrs.get("max_abs_residual", np.nan))))
            common.log(f"seed {seed}: scored val[{lo}:{hi}] in {t():.0f} s")
        with np.load(f) as z:
            for k in z.files:
                if not k.startswith("_"):
                    total[k] = total.get(k, 0) + z[k]
    return total


def _engine_seconds(work: Path, seed: int) -> tuple[float, float]:
    secs, res = 0.0, 0.0
    for f in work.glob(f"seed{seed}_scores_*.npz"):
        with np.load(f) as z:
            secs += float(z["_seconds"])
            res = max(res, float(z["_max_abs_residual"]))
    return secs, res


@torch.no_grad()
def prune_and_measure(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    importances: dict[str, dict[str, np.ndarray]],
    kept: tuple[float, ...],
    groups: dict[str, list[str]] | None = None,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Prune ``model`` by every importance (``{method: {tensor: importance}}``) globally and per module at every
    kept fraction and measure it on ``(x, y)`` against the unpruned model (any model: rows of a table).

    ``groups`` (``{module: [tensor, ...]}``) defines the modules of per-module pruning (default: one per tensor);
    ``fields`` are added to every row (e.g. ``seed=``). The model's parameters are restored afterwards.
    """
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = model(x)
    rows = []
    try:
        for method, imp in importances.items():
            for scope in SCOPES:
                for k in kept:
                    mask = scores.global_mask(imp, k) if scope == "global" else scores.per_module_mask(imp, k, groups)
                    for name, p in model.named_parameters():
                        p.copy_(params[name] * torch.from_numpy(mask[name]).to(p.dtype))
                    rows.append({**fields, "method": method, "scope": scope, "kept": k,
                                 "kept_actual": scores.kept_fraction(mask), **scores.prediction_metrics(ref, model(x), y)})
    finally:
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return rows


def unpruned_row(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **fields: Any) -> dict[str, Any]:
    """The unpruned model's row (its accuracy; agreement 1 and KL 0 by definition)."""
    with torch.no_grad():
        ref = model(x)
    return {**fields, "method": "unpruned", "scope": "-", "kept": 1.0, "kept_actual": 1.0,
            **scores.prediction_metrics(ref, ref, y)}


def evaluate_seed(run: Any, sums: dict[str, np.ndarray], seed: int) -> list[dict[str, Any]]:
    """Metrics of every method x scope x kept fraction on the test half (rows of a table)."""
    model = run.model(STEPS).double()
    x, y = run.split("val")
    x, y = x[HELD_OUT:].double(), y[HELD_OUT:]
    params = {k: v.detach().numpy() for k, v in model.named_parameters()}
    imp = {
        "explaind": scores.importance_from_scores(sums, sum_axes=(0, 1)),
        "explaind_per_class": scores.importance_from_scores(sums, sum_axes=(1,), abs_sum_axes=(0,)),
        "magnitude": scores.magnitude_importance(params),
        "random": scores.random_importance(params, seed=1000 + seed),
    }
    return prune_and_measure(model, x, y, imp, KEPT, seed=seed) + [unpruned_row(model, x, y, seed=seed)]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread of every metric per (method, scope, kept) over the rows (seeds, random draws)."""
    out = []
    keys = sorted({(r["method"], r["scope"], r["kept"]) for r in rows})
    for method, scope, kept in keys:
        sel = [r for r in rows if (r["method"], r["scope"], r["kept"]) == (method, scope, kept)]
        agg: dict[str, Any] = {"method": method, "scope": scope, "kept": kept, "n_seeds": len(sel)}
        for m in ("accuracy", "agreement", "kl"):
            s = scores.mean_spread(np.array([r[m] for r in sel]))
            agg[f"{m}_mean"], agg[f"{m}_std"] = s["mean"], s["std"]
        out.append(agg)
    return out


def table(agg: list[dict[str, Any]], metrics: tuple[str, ...], methods: tuple[str, ...] = METHODS,
          kept_fractions: tuple[float, ...] = KEPT) -> str:
    """A markdown table: one row per scope x kept fraction, ``mean ± std`` of each metric for each method."""
    by = {(a["method"], a["scope"], a["kept"]): a for a in agg}
    short = {"accuracy": "acc", "agreement": "agree", "kl": "KL"}
    header = ["scope", "kept", *(f"{short[k]} {m}" for k in metrics for m in methods)]
    rows = []
    for scope in SCOPES:
        for kept in kept_fractions:
            r: list[Any] = [scope, f"{kept:g}"]
            for metric in metrics:
                for m in methods:
                    a = by.get((m, scope, kept))
                    if a is None:
                        r.append("-")
                    elif metric == "kl":
                        r.append(f"{a['kl_mean']:.1e} ± {a['kl_std']:.0e}")
                    else:
                        r.append(common.pm(a[f"{metric}_mean"], a[f"{metric}_std"], 3))
            rows.append(r)
    return common.md_table(header, rows)


TITLE = "Digits CNN: pruning by ExPLAIND element-wise scores vs magnitude vs random (mean ± std over seeds)"


def plot(agg: list[dict[str, Any]], path: Path, methods: tuple[str, ...] = METHODS, title: str = TITLE) -> None:
    """Accuracy, agreement and KL against the pruned fraction, global (top) and per module (bottom), mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    colors = {"explaind": "C0", "explaind_per_class": "C3", "explaind_per_part": "C4", "magnitude": "C1", "random": "C2"}
    for i, scope in enumerate(SCOPES):
        for j, (metric, label) in enumerate((("accuracy", "test accuracy"), ("agreement", "agreement with unpruned"),
                                             ("kl", "KL(unpruned || pruned)"))):
            ax = axes[i, j]
            for m in methods:
                sel = sorted((a for a in agg if a["method"] == m and a["scope"] == scope), key=lambda a: a["kept"])
                x = np.array([1 - a["kept"] for a in sel])
                mu = np.array([a[f"{metric}_mean"] for a in sel])
                sd = np.array([a[f"{metric}_std"] or 0.0 for a in sel])
                lo, hi = mu - sd, mu + sd
                if metric == "kl":  # KL >= 0 on a log axis: floor at 1e-7 (float rounding of an unchanged model)
                    mu, lo, hi = (np.maximum(v, 1e-7) for v in (mu, lo, hi))
                ax.plot(x, mu, "o-", ms=3, color=colors[m], label=m)
                ax.fill_between(x, lo, hi, color=colors[m], alpha=0.2)
            ax.set_xscale("log")
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_xlabel("pruned fraction (1 - kept)")
            ax.set_ylabel(label)
            ax.set_title(f"{scope.replace('_', '-')} pruning")
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.pruning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work", default=None, help="bulky files (stores, score sums); default experiments-work/pruning")
    ap.add_argument("--results", default=None, help="tables and plots; default experiments/results/pruning")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work, res = common.work_dir("pruning", args.work), common.results_dir("pruning", args.results)
    rows: list[dict[str, Any]] = []
    timing = {}
    for seed in args.seeds:
        # the score sums are the expensive part and are kept; the masks and metrics are recomputed (seconds)
        t = common.Timer()
        run = record(work / f"digits_seed{seed}.zarr", seed)
        t_rec = t()
        sums = score_sums(work / f"digits_seed{seed}.zarr", work, seed)
        eng, resid = _engine_seconds(work, seed)
        rows += evaluate_seed(run, sums, seed)
        timing[seed] = {"record_s": t_rec, "engine_s": eng, "max_abs_residual": resid}
        common.log(f"seed {seed} done: engine {eng:.0f} s, max residual {resid:.2e}")
    agg = aggregate(rows)
    common.write_json(res / "pruning.json", {"config": {"steps": STEPS, "n_val": N_VAL, "held_out": HELD_OUT,
                                                        "kept": KEPT, "seeds": args.seeds}, "timing": timing,
                                             "aggregate": agg})
    common.write_json(work / "rows.json", rows)  # per seed (kept out of the committed results for size)
    text = ("The paper's grids are 0.7-0.99 and 0.97-0.999; the kept fractions below 0.7 are added here. "
            "Digits CNN, test half of the validation split (149 points); mean ± std over seeds "
            f"{', '.join(map(str, args.seeds))}. Unpruned test accuracy: "
            f"{common.pm(*[scores.mean_spread(np.array([r['accuracy'] for r in rows if r['method'] == 'unpruned']))[k] for k in ('mean', 'std')])}.\n\n")
    (res / "pruning.md").write_text(text + "Test accuracy and KL(unpruned || pruned):\n\n" + table(agg, ("accuracy", "kl"))
                                    + "\nAgreement of the pruned model's predictions with the unpruned model's:\n\n"
                                    + table(agg, ("agreement",)))
    plot(agg, res / "pruning.png")
    common.log(f"wrote {res / 'pruning.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
