"""Does a per-sample score predict retraining? The linear datamodeling score (LDS) on the digits CNN.

Record the digits CNN once (seed 0, the recipe of ``digits_cnn.train``) and score every training sample's effect on
the loss of ``--queries`` validation points three ways on that recorded run:

- ``explaind``: the exact per-sample contribution to ``loss(theta_T) - loss(theta_0)`` (``engine.attribute(...,
  output="loss", by=("sample",))``; its ``data`` variable, weight decay and momentum excluded);
- ``grad_dot``: ``-<grad loss_q, grad loss_n>`` at the final parameters;
- ``tracin``: ``-sum_c lr_c <grad loss_q, grad loss_n>`` over checkpoints every ``--tracin-every`` updates.

Then retrain the same recipe (same initialisation, same number of updates, same batch schedule seed) on
``--subsets`` random halves of the training set, and correlate, per validation point, the actual change of its loss
(subset model minus full-data model, both retrained here) with the predicted change ``-sum of the removed samples'
effects`` (Spearman over subsets): the LDS.

    python -m experiments.lds [--subsets 100] [--queries 64]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from experiments import common, scores

SEED = 0
STEPS = 300
N_VAL = 297
LR_PEAK = 0.05


def retrain(keep: np.ndarray | None) -> torch.nn.Module:
    """The digits recipe (``digits_cnn.train``'s defaults, seed :data:`SEED`) on the training samples ``keep``."""
    from explaind_store.examples import digits_cnn
    from explaind_store.examples.training import fit, triangular_lr

    data = digits_cnn.make_data(N_VAL, SEED)
    if keep is not None:
        x, y = data["train"]
        idx = torch.from_numpy(np.nonzero(keep)[0])
        data = {"train": (x[idx], y[idx]), "val": data["val"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = digits_cnn.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR_PEAK, momentum=0.9, weight_decay=5e-3)
    warmup = max(1, round(0.2 * STEPS))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(triangular_lr, total=STEPS, warmup=warmup))
    fit(model, opt, data, steps=STEPS, seed=SEED, batch_size=64, scheduler=sched, progress=False, eval_every=0)
    return model


@torch.no_grad()
def query_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(model(x), y, reduction="none").double().numpy()


def per_sample_grads(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """``(N, P)`` gradients of each sample's cross-entropy at ``params`` (float64)."""
    from torch.func import functional_call, grad, vmap

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1)


def gradient_baselines(run: Any, xq: torch.Tensor, yq: torch.Tensor, every: int) -> dict[str, np.ndarray]:
    """``grad_dot`` and ``tracin`` effects ``(Q, N)`` (negative = training on ``n`` lowers query ``q``'s loss)."""
    from explaind_store.examples.training import triangular_lr

    x, y = run.split("train")
    model = run.build_model().double()
    t = int(run.committed_updates)
    warmup = max(1, round(0.2 * STEPS))

    def dots(step: int) -> torch.Tensor:
        params = {k: v.double() for k, v in run.load_params(step).items()}
        gq = per_sample_grads(model, params, xq.double(), yq)
        gn = per_sample_grads(model, params, x.double(), y)
        return gq @ gn.T

    out = {"grad_dot": -dots(t).numpy()}
    tr = torch.zeros(len(xq), len(x), dtype=torch.float64)
    for s in range(0, t, every):
        lr = LR_PEAK * triangular_lr(s, total=STEPS, warmup=warmup)  # the lr of update s + 1
        tr -= lr * dots(s)
    out["tracin"] = tr.numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.lds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.5, help="share of the training set each subset keeps")
    ap.add_argument("--tracin-every", type=int, default=10)
    ap.add_argument("--work", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work, res = common.work_dir("lds", args.work), common.results_dir("lds", args.results)
    from explaind_store import open_run
    from explaind_store.examples import digits_cnn

    timing: dict[str, float] = {}
    run_path = work / "digits_full.zarr"
    try:
        run = open_run(run_path)
        assert run.committed_updates == STEPS
    except Exception:  # noqa: BLE001 - missing or partial: record again
        digits_cnn.train(str(run_path), steps=STEPS, seed=SEED, n_val=N_VAL, overwrite=True, progress=False,
                         eval_every=0)
        run = open_run(run_path)
    xv, yv = run.split("val")
    xq, yq = xv[: args.queries], yv[: args.queries]
    n_train = len(run.split("train")[0])

    # --- scores on the recorded run -------------------------------------------------------------------------------
    f = work / f"explaind_q{args.queries}.npz"
    if not f.exists():
        import engine

        t = common.Timer()
        parts = []
        for lo in range(0, args.queries, 16):
            g = work / f"explaind_{lo}_{min(lo + 16, args.queries)}.npz"
            if not g.exists():
                t1 = common.Timer()
                ds = engine.attribute(str(run_path), queries=f"val[{lo}:{min(lo + 16, args.queries)}]", output="loss",
                                      by=("sample",), client="sync", progress=False)
                common.save_npz(g, data=ds["data"].isel(output=0).values,
                                residual=np.array(float(ds.attrs.get("max_abs_residual", np.nan))),
                                seconds=np.array(t1()))
                common.log(f"explaind scores of queries {lo}.. in {t1():.0f} s")
            with np.load(g) as z:
                parts.append((z["data"], float(z["residual"]), float(z["seconds"])))
        common.save_npz(f, explaind=np.concatenate([p[0] for p in parts]),
                        residual=np.array(max(p[1] for p in parts)), seconds=np.array(sum(p[2] for p in parts)))
    with np.load(f) as z:
        effects = {"explaind": z["explaind"]}
        timing["explaind_s"] = float(z["seconds"])
        max_res = float(z["residual"])
    g = work / f"baselines_q{args.queries}_every{args.tracin_every}.npz"
    if not g.exists():
        t = common.Timer()
        b = gradient_baselines(run, xq, yq, args.tracin_every)
        common.save_npz(g, **b, seconds=np.array(t()))
    with np.load(g) as z:
        effects.update({k: z[k] for k in ("grad_dot", "tracin")})
        timing["baselines_s"] = float(z["seconds"])

    # --- retraining -------------------------------------------------------------------------------------------------
    rng = np.random.default_rng(12345)
    masks = np.zeros((args.subsets, n_train), dtype=bool)
    for i in range(args.subsets):
        masks[i, rng.choice(n_train, size=int(round(args.fraction * n_train)), replace=False)] = True
    base_f = work / "full_losses.npy"
    if not base_f.exists():
        np.save(base_f, query_losses(retrain(None), xq, yq))
    base = np.load(base_f)
    actual = np.zeros((args.queries, args.subsets))
    t = common.Timer()
    for i in range(args.subsets):
        h = work / f"subset_{i:04d}.npy"
        if not h.exists():
            np.save(h, query_losses(retrain(masks[i]), xq, yq))
            if i % 10 == 0:
                common.log(f"retrained subset {i}")
        actual[:, i] = np.load(h) - base
    timing["retrain_s_this_call"] = t()

    # --- LDS --------------------------------------------------------------------------------------------------------
    removed = ~masks
    out: dict[str, Any] = {"config": {"seed": SEED, "steps": STEPS, "queries": args.queries, "subsets": args.subsets,
                                      "fraction": args.fraction, "tracin_every": args.tracin_every},
                           "timing": timing, "max_abs_residual": max_res, "methods": {}}
    per_query = {}
    for name, eff in effects.items():
        pred = scores.predicted_changes(eff[: args.queries], removed)
        v = scores.lds(actual, pred)
        per_query[name] = v
        out["methods"][name] = {**scores.mean_spread(v), "median": float(np.nanmedian(v))}
    # a sanity reference: the mean actual change over subsets explained by nothing (a constant predictor is NaN)
    out["actual_change"] = scores.mean_spread(actual)
    common.write_json(res / "lds.json", {**out, "per_query": per_query})
    rows = [[m, common.pm(d["mean"], d["std"]), f"{d['median']:.3f}", f"{d['min']:.3f}", f"{d['max']:.3f}", d["n"]]
            for m, d in out["methods"].items()]
    text = (f"Digits CNN (seed {SEED}, {STEPS} updates); {args.subsets} retrainings on random "
            f"{args.fraction:.0%} subsets; Spearman correlation per validation point over subsets "
            f"({args.queries} points).\n\n")
    (res / "lds.md").write_text(text + common.md_table(["scores", "LDS mean ± std over points", "median", "min",
                                                        "max", "points"], rows))
    plot(per_query, actual, {k: scores.predicted_changes(e[: args.queries], removed) for k, e in effects.items()},
         res / "lds.png")
    common.log(f"wrote {res / 'lds.md'}")
    return 0


def plot(per_query: dict[str, np.ndarray], actual: np.ndarray, predicted: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(predicted), figsize=(4 * (1 + len(predicted)), 3.6), constrained_layout=True)
    names = list(per_query)
    axes[0].boxplot([per_query[n][np.isfinite(per_query[n])] for n in names])
    axes[0].set_xticks(range(1, len(names) + 1), names)
    axes[0].axhline(0, color="gray", lw=1)
    axes[0].set_ylabel("LDS (Spearman per validation point)")
    q = int(np.nanargmax(np.abs(actual).mean(axis=1)))  # the point whose loss moves most
    for ax, n in zip(axes[1:], names):
        ax.scatter(predicted[n][q], actual[q], s=8)
        ax.set_xlabel(f"predicted change ({n})")
        ax.set_ylabel("actual change of loss")
        ax.set_title(f"validation point {q}: rho = {per_query[n][q]:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
