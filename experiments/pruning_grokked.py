"""Pruning the grokked modular-addition transformer by element-wise ExPLAIND scores against magnitude and random.

The digits-CNN experiment (``experiments.pruning``) on the paper's grokking configuration (``experiments.grokking``:
p = 113, 4,000 training pairs, d_model 64, 4 heads, MLP 512, full-batch AdamW lr 1e-3, betas (0.9, 0.98), weight
decay 4.0). Per training seed: train and record until training and validation accuracy are both 100% (at most
``--max-steps`` updates; ``experiments.grokking.train_seed``), decompose the log-softmax outputs (all 113 classes)
of the first half of the validation pairs over the whole run element-wise, take ``|summed contribution|`` per
parameter element as its importance, zero the least important elements globally or per component (embedding,
attention, MLP in, MLP out, unembedding) at each kept fraction, and measure the pruned model on the other half.

The score of a parameter element is linear in the explained function, so the contributions to all outputs of all
held-out points, summed, are the contributions to one function: the sum of their log-probabilities. It is
decomposed as one output (``with_query_sets``), which keeps the result at one row instead of 1,000 x 113.

    python -m experiments.pruning_grokked [--seeds 3 2 1 0] [--random-draws 5] [--work DIR] [--results DIR]

Resumable: the stores, the per-piece score sums and the training curves are kept under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments import common, grokking, pruning, scores

# explaind: |contribution summed over points, classes and parts|; explaind_per_part: the absolute value of each part
# (data, weight decay, momentum) summed, so that an element's data and decay contributions cannot cancel
METHODS = ("explaind", "explaind_per_part", "magnitude", "random")
N_VAL = grokking.CONFIG["n_val"]
HELD_OUT = N_VAL // 2  # validation[:1000] scores the parameters; validation[1000:] tests the pruned models
MAX_STEPS = 1200  # seeds 0-3 reach 100% validation accuracy (seed 0: 99.7%) within it (experiments/results/grokking)
# A fixed rule: the kink rule would cut each update at every unit flip of any of the 1,000 points (hundreds per
# update, measured), and the sum of smooth pieces is integrated to a residual reported with the results.
RULE = "gauss:4"
PIECE = 100  # updates per resumable decomposition piece


class QuerySetSum:
    """Mixin for a classifier: on a *query set* ``(S, K, *sample_shape)`` it returns ``(S, 1)``, the sum over the
    ``K`` points and all classes of their log-probabilities; on ``(N, *sample_shape)`` (training batches) the
    model's own outputs. The engine explains the query set as one output (``per_query=False``) while it rebuilds
    the training gradients with the unchanged model."""

    query_set_ndim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.query_set_ndim:
            return super().forward(x)  # type: ignore[misc]
        out = super().forward(x.reshape(-1, *x.shape[2:]))  # type: ignore[misc]
        return torch.log_softmax(out, dim=-1).reshape(x.shape[0], -1).sum(dim=-1, keepdim=True)


def with_query_sets(model: nn.Module, sample_ndim: int) -> nn.Module:
    """``model`` (same object, same parameter names) extended by :class:`QuerySetSum` for samples of
    ``sample_ndim`` dimensions (1 for the transformer's token triples)."""
    cls = type(model)
    model.__class__ = type(f"QuerySetSum{cls.__name__}", (QuerySetSum, cls), {})
    model.query_set_ndim = sample_ndim + 2  # type: ignore[assignment]
    return model


def summed_scores(run_path: Path, x_query: torch.Tensor, window: tuple[int, int], rule: str = RULE) -> dict[str, Any]:
    """Element-wise contributions to ``sum over queries and classes of log_softmax`` over the updates ``window``:
    ``{tensor: (part, *shape)}`` (parts data, weight decay, momentum) plus the decomposition's totals."""
    import engine
    from engine.result import param_var
    from engine.scan.problem import Problem
    from explaind_store import open_run
    from explaind_store.specs import resolve_factory

    spec = open_run(run_path).model_spec
    sample_ndim = x_query.ndim - 1
    run = open_run(run_path, model_factory=lambda **_: with_query_sets(resolve_factory(spec), sample_ndim))
    ds = engine.attribute_local(run, Problem(x_query=x_query.unsqueeze(0), output="logits", by=frozenset({"param"}),
                                             window=window, rule=rule, per_query=False))
    out: dict[str, Any] = {n: ds[param_var(n)].values[0, 0] for n in run.tensor_names}
    out["_change"] = float(ds["final"].sum() - ds["initial"].sum())
    out["_residual"] = float(ds["residual"].sum())
    out["_abs_residual"] = float(np.abs(ds["residual"].values).sum())
    return out


def score_seed(run_path: Path, work: Path, seed: int, x_query: torch.Tensor, piece: int = PIECE) -> dict[str, Any]:
    """The whole run's element-wise scores, summed over resumable pieces of ``piece`` updates (each kept under
    ``work``); also the total seconds, the change of the function and the summed residuals."""
    from explaind_store import open_run

    n = int(open_run(run_path).committed_updates)
    total: dict[str, Any] = {}
    for lo in range(0, n, piece):
        hi = min(lo + piece, n)
        f = work / f"seed{seed}_scores_{lo}_{hi}.npz"
        if not f.exists():
            t = common.Timer()
            s = summed_scores(run_path, x_query, (lo, hi))
            common.save_npz(f, **s, _seconds=np.array(t()))
            common.log(f"seed {seed}: scored updates ({lo}, {hi}] in {t():.0f} s, residual {s['_residual']:.2e} "
                       f"of a change {s['_change']:.3g}")
        with np.load(f) as z:
            for k in z.files:
                total[k] = total.get(k, 0) + z[k]
    return total


def components(names: list[str]) -> dict[str, list[str]]:
    """The modules of per-module pruning: the transformer's components (``explaind_app.report.component_groups``)."""
    from explaind_app.report import component_groups

    return component_groups(names)


def evaluate_seed(run: Any, sums: dict[str, Any], seed: int, draws: int) -> list[dict[str, Any]]:
    """Rows of every method x scope x kept fraction on the test half; ``draws`` random prunings per seed."""
    model = run.model(int(run.committed_updates)).double()
    x, y = run.split("val")
    x, y = x[HELD_OUT:], y[HELD_OUT:]
    params = {k: v.detach().numpy() for k, v in model.named_parameters()}
    groups = components(list(params))
    part_sums = {k: sums[k] for k in params}
    imp = {"explaind": scores.importance_from_scores(part_sums, sum_axes=(0,)),
           "explaind_per_part": scores.importance_from_scores(part_sums, sum_axes=(), abs_sum_axes=(0,)),
           "magnitude": scores.magnitude_importance(params)}
    rows = pruning.prune_and_measure(model, x, y, imp, pruning.KEPT, groups, seed=seed)
    for d in range(draws):
        rows += pruning.prune_and_measure(model, x, y, {"random": scores.random_importance(params, 1000 * d + seed)},
                                          pruning.KEPT, groups, seed=seed, draw=d)
    return rows + [pruning.unpruned_row(model, x, y, seed=seed)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.pruning_grokked", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 2, 1, 0])
    ap.add_argument("--random-draws", type=int, default=5, help="random prunings per training seed (default 5)")
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS)
    ap.add_argument("--piece", type=int, default=PIECE, help="updates per resumable decomposition piece")
    ap.add_argument("--work", default=None, help="bulky files (stores, score sums); default experiments-work/pruning_grokked")
    ap.add_argument("--results", default=None, help="tables and plot; default experiments/results/pruning_grokked")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work, res = common.work_dir("pruning_grokked", args.work), common.results_dir("pruning_grokked", args.results)
    from explaind_store import open_run

    rows: list[dict[str, Any]] = []
    info: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        tr = grokking.train_seed(seed, work, args.max_steps, record=True)
        path = work / f"modadd_seed{seed}.zarr"
        run = open_run(path)
        sums = score_seed(path, work, seed, run.split("val")[0][:HELD_OUT], args.piece)
        rows += evaluate_seed(run, sums, seed, args.random_draws)
        info[seed] = {"updates": tr["updates"], "train_s": tr["seconds"], "engine_s": float(sums["_seconds"]),
                      "val100": tr["val100"], "final_val_acc": tr["curves"]["val_acc"][-1],
                      "change": float(sums["_change"]), "residual": float(sums["_residual"]),
                      "abs_residual": float(sums["_abs_residual"])}
        common.log(f"seed {seed} done: {tr['updates']} updates, engine {info[seed]['engine_s']:.0f} s")
    agg = pruning.aggregate(rows)
    unpruned = scores.mean_spread(np.array([r["accuracy"] for r in rows if r["method"] == "unpruned"]))
    common.write_json(res / "pruning_grokked.json", {
        "config": {**grokking.CONFIG, "max_steps": args.max_steps, "n_val": N_VAL, "held_out": HELD_OUT,
                   "rule": RULE, "kept": pruning.KEPT, "seeds": args.seeds, "random_draws": args.random_draws,
                   "groups": components([str(n) for n in open_run(work / f"modadd_seed{args.seeds[0]}.zarr").tensor_names])},
        "seeds": info, "unpruned_accuracy": unpruned, "aggregate": agg})
    common.write_json(work / "rows.json", rows)
    text = (f"Grokked modular-addition transformer, test half of the validation pairs ({N_VAL - HELD_OUT} pairs); mean "
            f"± std over training seeds {', '.join(map(str, args.seeds))} (random: {args.random_draws} draws per seed, "
            f"{args.random_draws * len(args.seeds)} in all). Per module = per component (embedding, attention, MLP in, "
            f"MLP out, unembedding). Unpruned test accuracy: {common.pm(unpruned['mean'], unpruned['std'])}.\n\n")
    (res / "pruning_grokked.md").write_text(
        text + "Test accuracy and KL(unpruned || pruned):\n\n" + pruning.table(agg, ("accuracy", "kl"), METHODS)
        + "\nAgreement of the pruned model's predictions with the unpruned model's:\n\n"
        + pruning.table(agg, ("agreement",), METHODS))
    pruning.plot(agg, res / "pruning_grokked.png", METHODS,
                 "Grokked transformer (p = 113): pruning by ExPLAIND element-wise scores vs magnitude vs random "
                 "(mean ± std over seeds)")
    common.log(f"wrote {res / 'pruning_grokked.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
