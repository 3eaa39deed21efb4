"""Analyses of a recorded grokking run, shared by ``explaind demo --paper`` and ``experiments.grokking``.

- The pipeline-alignment test of the paper's last phase: the final model's outer layers put around every
  checkpoint's "pipeline" (attention, MLP in), read from the store by step.
- The whole run decomposed in resumable pieces (``engine.attribute`` over consecutive step windows), assembled here:
  per update and component the change of the mean validation loss split into data, weight decay, the momentum
  carried into the piece and the residual; the residual per window; per-sample scores binned over updates, the
  circuit-formation window and the query x training-sample matrix at chosen moments.

Figures are matplotlib ``Figure`` objects built without pyplot, like :mod:`explaind_app.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from matplotlib.figure import Figure

from explaind_app.metrics import prediction_metrics
from explaind_app.report import COMPONENT_COLORS, _shade, _subplots, component_groups, md_table

# the "pipeline" of the paper's last phase and the outer layers put around it (tensor-name prefixes)
PIPELINE = ("attn_", "mlp_in")
VARIANTS: dict[str, tuple[str, ...]] = {
    "checkpoint only": (),
    "final outer (embed, MLP out, unembed)": ("embed", "mlp_out", "unembed"),
    "final unembed only": ("unembed",),
    "final embed + MLP out": ("embed", "mlp_out"),
    "final everything but attention": ("embed", "mlp_in", "mlp_out", "unembed"),
}
MOVEMENT_PARTS = ("data", "weight_decay", "momentum")


# ==============================================================================================================
# Pipeline alignment
# ==============================================================================================================
def _outer(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def model_logits(model: torch.nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with its parameters overwritten by ``params`` (in place; the model is reused)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n].to(p.dtype))
        return model(x)


@torch.no_grad()
def pipeline_alignment(run: Any, every: int = 10) -> dict[str, Any]:
    """Accuracy and KL(final || hybrid) on the validation split of hybrids: the final model's tensors named by each
    of :data:`VARIANTS` put around every ``every``-th checkpoint's other tensors (read with ``run.load_params``)."""
    x, y = run.split("val")
    t = int(run.committed_updates)
    final = run.load_params(t)
    model = run.build_model().eval()
    ref = model_logits(model, final, x)
    steps = list(range(0, t + 1, every)) + ([t] if t % every else [])
    out: dict[str, Any] = {"step": steps, "variants": {v: {"accuracy": [], "kl": []} for v in VARIANTS}}
    for s in steps:
        ck = run.load_params(s)
        for v, prefixes in VARIANTS.items():
            hybrid = {k: (final[k] if _outer(k, prefixes) else ck[k]) for k in ck}
            m = prediction_metrics(ref, model_logits(model, hybrid, x), y)
            out["variants"][v]["accuracy"].append(m["accuracy"])
            out["variants"][v]["kl"].append(m["kl"])
    return out


def _phase_lines(ax: Any, phases: Mapping[str, Any]) -> None:
    for k, ls in (("memorised", ":"), ("rise", "--"), ("grokked", "-.")):
        if phases.get(k) is not None:
            ax.axvline(phases[k], color="gray", ls=ls, lw=1)


def fig_pipeline(al: Mapping[str, Any], phases: Mapping[str, Any]) -> Figure:
    """Validation accuracy and KL(final || hybrid) of every hybrid of :func:`pipeline_alignment` over checkpoints."""
    fig, axes = _subplots(1, 2, figsize=(12, 4.4))
    for v, d in al["variants"].items():
        axes[0].plot(al["step"], d["accuracy"], label=v)
        axes[1].plot(al["step"], d["kl"], label=v)
    axes[1].set_yscale("log")
    for ax in axes:
        _phase_lines(ax, phases)
        ax.set_xlabel("checkpoint (update)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy of the hybrid")
    axes[1].set_ylabel("KL(final || hybrid) on validation")
    axes[0].legend(fontsize=7)
    fig.suptitle("Final outer layers around each checkpoint's pipeline (gray: memorised, novel val 50%, val 95%)")
    fig.tight_layout()
    return fig


def pipeline_summary(al: Mapping[str, Any], phases: Mapping[str, Any]) -> str:
    """First checkpoint at which each hybrid reaches 95% validation accuracy, next to the run's own phases."""
    rows = []
    for v, d in al["variants"].items():
        acc = np.asarray(d["accuracy"])
        idx = np.nonzero(acc >= 0.95)[0]
        first = int(al["step"][idx[0]]) if len(idx) else None
        kl = np.asarray(d["kl"])
        half = len(acc) // 2
        rows.append([v, first, f"{acc[0]:.3f}", f"{acc[half]:.3f} (step {al['step'][half]})", f"{kl[0]:.3g}",
                     f"{np.median(kl):.3g}"])
    text = (f"Final model = the last recorded update, {al['step'][-1]}. "
            f"Run phases: training accuracy 99% at {phases.get('memorised')}, novel validation accuracy 50% at "
            f"{phases.get('rise')}, validation accuracy 95% at {phases.get('grokked')}.\n\n")
    return text + md_table(["hybrid", "first checkpoint with val acc >= 95%", "val acc at step 0", "val acc half-way",
                            "KL at step 0", "median KL"], rows)


# ==============================================================================================================
# Windows and moments of a run
# ==============================================================================================================
def circuit_window(curves: Mapping[str, Any], low: float = 0.1, high: float = 0.99) -> tuple[int, int]:
    """The circuit-formation window ``(a, b]``: from the last evaluated step before the accuracy on validation pairs
    whose mirror was not trained (``val_novel_acc``, else ``val_acc``) first reaches ``low`` to the first step at
    which the validation accuracy reaches ``high`` (the last step when it never does)."""
    steps = np.asarray(curves["step"])
    gen = np.asarray(curves["val_novel_acc"] if "val_novel_acc" in curves else curves["val_acc"])
    va = np.asarray(curves["val_acc"])
    up = np.nonzero(gen >= low)[0]
    a = int(steps[max(0, up[0] - 1)]) if len(up) else int(steps[0])
    done = np.nonzero((va >= high) & (steps > a))[0]
    b = int(steps[done[0]]) if len(done) else int(steps[-1])
    return a, max(b, a + 1)


def moments(phases: Mapping[str, Any], window: tuple[int, int], n_updates: int) -> dict[str, int]:
    """A few updates to look at: half-way to memorisation, the middle of the circuit-formation ``window``,
    memorisation (training accuracy 99%) and the end of the run (sorted by update; names say which)."""
    mem = phases.get("memorised")
    a, b = window
    out = {"before memorisation": int((mem if mem is not None else a) // 2),
           "rise (middle of the circuit window)": int((a + b) // 2),
           "memorised": int(mem) if mem is not None else int(b),
           "end": int(n_updates)}
    return dict(sorted(((k, max(1, min(v, n_updates))) for k, v in out.items()), key=lambda kv: kv[1]))


def pieces(a: int, b: int, piece: int, chunk: int) -> list[tuple[int, int]]:
    """Consecutive windows ``(lo, hi]`` covering ``(a, b]``; their inner boundaries are multiples of ``piece``
    rounded up to the store's ``chunk`` (so no engine task straddles two pieces)."""
    size = max(chunk, -(-piece // chunk) * chunk)
    cuts = [a] + [c for c in range((a // size + 1) * size, b, size)] + [b]
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


# ==============================================================================================================
# Whole-run component series from pieces
# ==============================================================================================================
def _q(var: xr.DataArray) -> np.ndarray:
    """``var`` summed over outputs, as ``(query, ...)`` numpy."""
    if "output" in var.dims:
        var = var.sum("output")
    return np.asarray(var.transpose("query", ...).values, dtype=float)


def component_series(parts: Sequence[xr.Dataset]) -> dict[str, Any]:
    """The pieces' ``by=("step", "tensor")`` results joined along the run.

    Returns per update (``step``), averaged over queries: ``delta`` (the change of the mean query output),
    ``residual``, ``quadrature_residual``, ``rounding_residual``, and ``movement[part][component]`` for the parts
    ``data``, ``weight_decay`` and ``momentum`` (the optimizer momentum carried into each piece: earlier batches'
    gradients); plus per update the largest ``|residual|`` and ``|delta|`` over queries, ``initial``, ``final`` and
    the summed residual (``residual_total``) per query and ``identity_error`` per query: ``initial + sum(movement) + sum(residual) - final``.
    """
    parts = sorted(parts, key=lambda d: int(d["step"].values[0]))
    groups = component_groups([str(t) for t in parts[0]["tensor"].values])
    out: dict[str, Any] = {"step": [], "delta": [], "residual": [], "quadrature_residual": [],
                           "rounding_residual": [], "abs_residual": [], "abs_delta": [],
                           "movement": {p: {c: [] for c in groups} for p in MOVEMENT_PARTS}}
    moved = 0.0
    res_sum = 0.0
    for ds in parts:
        out["step"] += [int(s) for s in ds["step"].values]
        for k in ("delta", "residual", "quadrature_residual", "rounding_residual"):
            out[k] += _q(ds[k]).mean(axis=0).tolist()
        out["abs_residual"] += np.abs(_q(ds["residual"])).max(axis=0).tolist()
        out["abs_delta"] += np.abs(_q(ds["delta"])).max(axis=0).tolist()
        mov = _q(ds["movement"].transpose("query", "output", "step", "part", "tensor"))  # (Q, S, P, T)
        tensors = [str(t) for t in ds["tensor"].values]
        for pi, p in enumerate(ds["part"].values):
            for c, ts in groups.items():
                idx = [tensors.index(t) for t in ts]
                out["movement"][str(p)][c] += mov[:, :, pi][:, :, idx].sum(axis=2).mean(axis=0).tolist()
        moved = moved + mov.sum(axis=(1, 2, 3))
        res_sum = res_sum + _q(ds["residual"]).sum(axis=1)
    out["initial"] = _q(parts[0]["initial"]).tolist()
    out["final"] = _q(parts[-1]["final"]).tolist()
    out["residual_total"] = np.asarray(res_sum, dtype=float).tolist()
    out["identity_error"] = (np.asarray(out["initial"]) + moved + res_sum - np.asarray(out["final"])).tolist()
    return out


def residual_table(parts: Sequence[xr.Dataset]) -> list[dict[str, Any]]:
    """Per piece ``(lo, hi]``: the change of the query outputs, the summed residual (both the largest over queries),
    the residual relative to the change, the largest per-update quadrature and rounding residuals, and the share of
    the piece's movement carried in by momentum."""
    rows = []
    for ds in sorted(parts, key=lambda d: int(d["step"].values[0])):
        steps = ds["step"].values
        change = _q(ds["final"]) - _q(ds["initial"])
        res = _q(ds["residual"]).sum(axis=1)
        mov = _q(ds["movement"].transpose("query", "output", "step", "part", ...))
        mov = mov.reshape(mov.shape[0], mov.shape[1], mov.shape[2], -1).sum(axis=3)  # (Q, S, P)
        parts_tot = np.abs(mov.sum(axis=1)).sum(axis=(0,))
        pidx = list(ds["part"].values).index("momentum")
        rows.append({
            "window": [int(steps[0]) - 1, int(steps[-1])],
            "max_abs_change": float(np.abs(change).max()),
            "mean_change": float(change.mean()),
            "max_abs_residual": float(np.abs(res).max()),
            "relative": float(np.abs(res).max() / max(float(np.abs(change).max()), 1e-300)),
            "max_quadrature_per_update": float(np.abs(_q(ds["quadrature_residual"])).max()),
            "max_rounding_per_update": float(np.abs(_q(ds["rounding_residual"])).max()),
            "momentum_share": float(parts_tot[pidx] / max(float(parts_tot.sum()), 1e-300)),
        })
    return rows


def residual_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    return md_table(
        ["window", "max abs change", "mean change", "max abs residual", "residual / change",
         "max quadrature residual per update", "max rounding residual per update", "momentum share of movement"],
        [[f"({r['window'][0]}, {r['window'][1]}]", f"{r['max_abs_change']:.3g}", f"{r['mean_change']:+.3g}",
          f"{r['max_abs_residual']:.2e}", f"{r['relative']:.1e}", f"{r['max_quadrature_per_update']:.1e}",
          f"{r['max_rounding_per_update']:.1e}", f"{r['momentum_share']:.2f}"] for r in rows])


def fig_components_whole(series: Mapping[str, Any], phases: Mapping[str, Any], window: tuple[int, int],
                         what: str = "mean validation loss") -> Figure:
    """Cumulative change of the mean query output per component: data, weight decay, momentum carried into the
    pieces; and the total change against the sum of its parts and the cumulative residual."""
    steps = np.asarray(series["step"])
    fig, axes = _subplots(2, 2, figsize=(13, 8), sharex=True)
    titles = {"data": "data (gradients of the training batch)", "weight_decay": "weight decay",
              "momentum": "momentum carried into each piece (earlier batches)"}
    for ax, part in zip(axes.flat, MOVEMENT_PARTS):
        _shade(ax, phases, label=part == "data")
        ax.axvspan(*window, color="none", ec="k", ls="--", lw=0.8, label="circuit window" if part == "data" else None)
        for comp, y in series["movement"][part].items():
            ax.plot(steps, np.cumsum(y), color=COMPONENT_COLORS.get(comp), lw=1.5, label=comp)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=f"{titles[part]}: cumulative", ylabel=f"change of the {what}")
        ax.legend(fontsize=7, ncol=2)
    ax = axes[1, 1]
    _shade(ax, phases)
    tot = sum(np.asarray(y) for part in MOVEMENT_PARTS for y in series["movement"][part].values())
    ax.plot(steps, np.cumsum(series["delta"]), color="k", lw=2.5, alpha=0.4, label="measured change")
    ax.plot(steps, np.cumsum(tot), color="C2", lw=1, label="data + weight decay + momentum")
    ax.plot(steps, np.cumsum(series["residual"]), color="C3", lw=1, label="residual")
    ax.set(title="all components: the change and its parts, cumulative", xlabel="update")
    axes[1, 0].set_xlabel("update")
    ax.legend(fontsize=7)
    fig.suptitle(f"Whole run: change of the {what} per component (phases shaded)")
    fig.tight_layout()
    return fig


def fig_residuals_whole(series: Mapping[str, Any], bounds: Sequence[int] = ()) -> Figure:
    """Per update, the largest ``|residual|`` over queries next to the largest ``|change|``, and the mean
    quadrature and rounding residuals (absolute); piece boundaries dotted."""
    steps = np.asarray(series["step"])
    tiny = 1e-20
    fig, ax = _subplots(1, 1, figsize=(12, 4))
    ax.semilogy(steps, np.maximum(series["abs_delta"], tiny), color="0.6", lw=1, label="max |change| per update")
    ax.semilogy(steps, np.maximum(series["abs_residual"], tiny), color="C3", lw=1.5, label="max |residual| per update")
    ax.semilogy(steps, np.maximum(np.abs(series["quadrature_residual"]), tiny), color="C0", lw=0.8,
                label="|quadrature residual| (mean query)")
    ax.semilogy(steps, np.maximum(np.abs(series["rounding_residual"]), tiny), color="C1", lw=0.8,
                label="|rounding residual| (mean query)")
    for b in bounds:
        ax.axvline(b, color="k", ls=":", lw=0.6)
    ax.set(xlabel="update", ylabel="loss units", title="Residual of the decomposition per update (pieces dotted)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# ==============================================================================================================
# Per-sample scores
# ==============================================================================================================
def sample_bins(parts: Sequence[xr.Dataset]) -> dict[str, np.ndarray]:
    """Per-sample results joined into bins: each ``by=("sample",)`` result is one bin (its window), each
    ``by=("sample", "step")`` result one bin per step (or per ``step_bins`` bin). Returns ``{"end": (B,) last update
    of each bin, "start": (B,) update before its first, "scores": (Q, B, N) data part summed over outputs}``."""
    ends, starts, blocks = [], [], []
    for ds in sorted(parts, key=lambda d: int(np.asarray(d.attrs["window"])[0])):
        if "step" not in ds["data"].dims:  # one bin: the whole window of the result
            a, b = (int(v) for v in ds.attrs["window"])
            starts.append(a)
            ends.append(b)
            blocks.append(_q(ds["data"].transpose("query", "output", "sample"))[:, None, :])
            continue
        end = np.asarray(ds["step"].values, dtype=int)
        # binned results carry each bin's first update as ``step_start``; unbinned ones are one update per step
        first = np.asarray(ds["step_start"].values, dtype=int) if "step_start" in ds.coords else end
        starts += (first - 1).tolist()
        ends += end.tolist()
        blocks.append(_q(ds["data"].transpose("query", "output", "step", "sample")))
    return {"start": np.asarray(starts), "end": np.asarray(ends), "scores": np.concatenate(blocks, axis=1)}


def window_scores(bins: Mapping[str, np.ndarray], window: tuple[int, int]) -> np.ndarray:
    """``(Q, N)`` per-sample scores summed over the bins inside ``(a, b]``."""
    keep = (bins["start"] >= window[0]) & (bins["end"] <= window[1])
    return bins["scores"][:, keep].sum(axis=1)


def bin_at(bins: Mapping[str, np.ndarray], step: int) -> int:
    """Index of the bin ``(start, end]`` holding update ``step``."""
    idx = np.nonzero((bins["start"] < step) & (bins["end"] >= step))[0]
    return int(idx[0]) if len(idx) else int(np.argmin(np.abs(bins["end"] - step)))


def fig_sample_time(bins: Mapping[str, np.ndarray], answers_train: np.ndarray, answers_q: Sequence[int],
                    labels: Sequence[str], phases: Mapping[str, Any], window: tuple[int, int]) -> Figure:
    """Per query and bin: the summed score of the training samples with the query's answer ``(a + b) mod p`` and of
    all others, per bin (plotted at the bin's last update)."""
    n_q = len(answers_q)
    cols = min(4, n_q)
    rows = -(-n_q // cols)
    fig, axes = _subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    x = bins["end"]
    for q in range(n_q):
        ax = axes[q // cols, q % cols]
        _shade(ax, phases)
        ax.axvspan(*window, color="none", ec="k", ls="--", lw=0.8)
        same = answers_train == answers_q[q]
        ax.plot(x, bins["scores"][q][:, same].sum(axis=1), "o-", ms=3, color="C2", label="samples with its answer")
        ax.plot(x, bins["scores"][q][:, ~same].sum(axis=1), "o-", ms=3, color="C3", label="all other samples")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(labels[q], fontsize=8)
    for j in range(n_q, rows * cols):
        axes[j // cols, j % cols].axis("off")
    axes[0, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("update")
    fig.suptitle("Per-sample scores (target log-probability of each query), summed by group, per bin (at its end)")
    fig.tight_layout()
    return fig


def fig_moments(bins: Mapping[str, np.ndarray], at: Mapping[str, int], answers_train: np.ndarray, p: int,
                labels: Sequence[str], answers_q: Sequence[int]) -> Figure:
    """The query x training-sample matrix (samples sorted by ``(a + b) mod p``) of the bin holding each moment, and
    its sum per residue (circles: each query's own answer)."""
    order = np.argsort(answers_train, kind="stable")
    ticks = [int(np.searchsorted(answers_train[order], c)) for c in range(0, p, max(1, p // 10))]
    fig, axes = _subplots(len(at), 2, figsize=(15, 1.2 + 0.32 * len(labels) * len(at) + 0.6 * len(at)),
                          squeeze=False, gridspec_kw={"width_ratios": [3, 1.3]})
    for r, (name, step) in enumerate(at.items()):
        i = bin_at(bins, step)
        mat = bins["scores"][:, i][:, order]
        lim = float(np.percentile(np.abs(mat), 99.5)) or 1.0
        ax = axes[r, 0]
        im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks(ticks, [str(c) for c in range(0, p, max(1, p // 10))], fontsize=7)
        ax.set_yticks(range(len(labels)), list(labels), fontsize=6)
        ax.set_title(f"{name}: updates ({bins['start'][i]}, {bins['end'][i]}]", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
        per = np.stack([mat[:, answers_train[order] == c].sum(axis=1) for c in range(p)], axis=1)
        lim2 = float(np.abs(per).max()) or 1.0
        ax = axes[r, 1]
        im2 = ax.imshow(per, aspect="auto", cmap="RdBu_r", vmin=-lim2, vmax=lim2, interpolation="nearest")
        for q, c in enumerate(answers_q):
            ax.plot(c, q, marker="o", mfc="none", mec="k", ms=5)
        ax.set_yticks([])
        ax.set_title("summed per residue", fontsize=9)
        fig.colorbar(im2, ax=ax, fraction=0.05, pad=0.01)
    axes[-1, 0].set_xlabel("training samples sorted by (a + b) mod p (tick: residue)")
    axes[-1, 1].set_xlabel("residue")
    fig.suptitle("Query x training-sample contributions at moments of the run (10-update bins)")
    fig.tight_layout()
    return fig


def top_samples_markdown(scores: np.ndarray, x_train: np.ndarray, labels: Sequence[str], p: int, k: int = 3) -> str:
    """Per query, the ``k`` most helpful and most harmful training samples as ``a+b=c`` with their score."""
    rows = []
    for q, lab in enumerate(labels):
        s = scores[q]
        order = np.argsort(s)

        def fmt(i: int) -> str:
            a, b = int(x_train[i, 0]), int(x_train[i, 1])
            return f"{a}+{b}={(a + b) % p} ({s[i]:+.2g})"

        rows.append([lab, ", ".join(fmt(int(i)) for i in order[::-1][:k]), ", ".join(fmt(int(i)) for i in order[:k]),
                     f"{s.sum():+.3g}"])
    return md_table(["query", f"top {k} helpful", f"top {k} harmful", "sum over all samples"], rows)
