"""Figures and a self-contained HTML report for a recorded modular-addition run and its attribution results.

Every figure function returns a matplotlib ``Figure`` built without pyplot (no backend is touched, nothing is shown,
nothing is kept alive by pyplot), so notebooks can display them one by one (a ``Figure`` as a cell's last expression); :func:`make_report` draws them all, saves each as PNG and writes one HTML file with the PNGs embedded
(base64), a summary table and short captions. Nothing in the HTML refers to another file.

Inputs are an ``explaind_store`` run (for the training curves and the training pairs) and ``engine.attribute``
results (``xarray.Dataset``, in memory or opened from Zarr):

- a *component* result, ``by=("step", "tensor")`` (optionally ``"param"``) for scalar validation queries such as
  their ``loss``: step-wise influence per component, split into data and weight decay (the ``movement`` variable:
  ``<phi_s, part_s>`` for every update ``s``), and element-wise parameter scores (``param_<tensor>``);
- a *sample* result, ``by=("sample",)``: per training sample scores for a few validation queries.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

COMPONENTS = ("embedding", "attention", "MLP in", "MLP out", "unembedding")
COMPONENT_COLORS = dict(zip(COMPONENTS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")))
# extra evaluation sets the training figure draws when present: key -> legend label
EXTRA_CURVES = {"val_novel": "validation, mirror (b, a) not in training"}
PHASE_COLORS = {"memorisation": "#fde0c5", "circuit formation": "#d5e8d4", "cleanup": "#dae8fc"}

# figure titles (tests and the HTML refer to them)
TITLE_TRAINING = "Training and validation loss and accuracy"
TITLE_COMPONENTS = "Step-wise influence on the validation loss per component"
TITLE_TOP = "Most helpful and most harmful training samples"
TITLE_MATRIX = "Query x training-sample contributions"
TITLE_PARAM = "Element-wise parameter scores"
TITLE_RESIDUAL = "Residual of the decomposition per update"


# ==============================================================================================================
# Components of the modular-addition transformer
# ==============================================================================================================
def component_of(tensor: str) -> str:
    """Component of a parameter of ``explaind_store.examples.modadd.ModAddTransformer`` (or any model whose tensor
    names start with ``embed``, ``attn``, ``mlp_in``, ``mlp_out``, ``unembed``); other names map to themselves'
    first dotted part."""
    head = tensor.split(".")[0]
    if head.startswith("unembed"):
        return "unembedding"
    if head.startswith("embed") or head in ("W_E", "pos_embed", "W_pos"):
        return "embedding"
    if head.startswith("attn"):
        return "attention"
    if head.startswith("mlp_in"):
        return "MLP in"
    if head.startswith("mlp_out"):
        return "MLP out"
    return head


def component_groups(tensors: Sequence[str]) -> dict[str, list[str]]:
    """``{component: [tensor, ...]}`` in :data:`COMPONENTS` order (unknown components after them)."""
    groups: dict[str, list[str]] = {}
    for t in tensors:
        groups.setdefault(component_of(str(t)), []).append(str(t))
    order = [c for c in COMPONENTS if c in groups] + [c for c in groups if c not in COMPONENTS]
    return {c: groups[c] for c in order}


# ==============================================================================================================
# Training curves from the store
# ==============================================================================================================
def compute_curves(run: Any, every: int | None = None, max_points: int = 300,
                   extra: Mapping[str, tuple[Any, Any]] | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Loss and accuracy on every split, and the parameter norm, at evenly spaced steps, read from a recorded run.

    ``run`` is an ``explaind_store.Run``; ``extra`` adds more evaluation sets ``{name: (inputs, targets)}``.
    Reads one chunk of steps at a time (each chunk decoded once). Returns ``{"step", "<split>_loss",
    "<split>_acc" for every split, "weight_norm"}`` as numpy arrays.
    """
    import torch

    from explaind_store.examples.training import evaluate

    t = int(run.committed_updates)
    if every is None:
        every = max(1, math.ceil(t / max_points))
    steps = sorted(set(range(0, t + 1, every)) | {t})
    data = {name: run.split(name) for name in run.splits}
    data.update({k: (torch.as_tensor(x), torch.as_tensor(y)) for k, (x, y) in (extra or {}).items()})
    model = run.build_model().eval()
    names = list(run.tensor_names)
    out: dict[str, list[float]] = {"step": []}
    chunk = int(run.chunk_updates)
    from tqdm import tqdm

    for lo in tqdm(range(0, t + 1, chunk), desc="curves", disable=not progress, leave=False):
        hi = min(t, lo + chunk - 1)
        want = [s for s in steps if lo <= s <= hi]
        if not want:
            continue
        arrays = {n: np.asarray(run.params[n].isel(step=slice(lo, hi + 1)).values) for n in names}
        for s in want:
            params = {n: torch.from_numpy(np.ascontiguousarray(arrays[n][s - lo])) for n in names}
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in params:
                        p.copy_(params[n])
            ev = evaluate(model, data)
            out["step"].append(s)
            for k, v in ev.items():
                out.setdefault(k, []).append(v)
            out.setdefault("weight_norm", []).append(float(math.sqrt(sum(float((v.double() ** 2).sum())
                                                                              for v in params.values()))))
    return {k: np.asarray(v) for k, v in out.items()}


def find_phases(curves: Mapping[str, np.ndarray], mem_acc: float = 0.99, grok_acc: float = 0.95) -> dict[str, Any]:
    """The three phases of grokking (Nanda et al., 2023) located from the accuracy curves.

    - memorisation: from the start until training accuracy first reaches ``mem_acc``;
    - circuit formation: from there until the validation accuracy on pairs the model cannot have memorised
      (``val_novel_acc`` when given, else ``val_acc``) first reaches 50%: the generalising circuit grows while the
      training accuracy is already saturated;
    - cleanup: from there until validation accuracy first reaches ``grok_acc`` (weight decay removes the
      memorising parts; validation loss falls steeply).

    Returns ``{"memorised": step or None, "rise": step or None, "grokked": step or None, "phases": [(name, lo,
    hi), ...], "grokking": bool}``; ``grokking`` is True when validation accuracy reached ``grok_acc`` well after
    the training accuracy saturated (at least 1.5x the memorisation step).
    """
    steps = np.asarray(curves["step"])
    tr, va = np.asarray(curves.get("train_acc", [])), np.asarray(curves.get("val_acc", []))
    gen = np.asarray(curves["val_novel_acc"]) if "val_novel_acc" in curves else va

    def first(mask: np.ndarray, after: float = -1) -> int | None:
        idx = np.nonzero(mask & (steps >= after))[0]
        return int(steps[idx[0]]) if len(idx) else None

    mem = first(tr >= mem_acc) if len(tr) else None
    rise = first(gen >= 0.5, after=mem or 0) if len(gen) and mem is not None else None
    grok = first(va >= grok_acc, after=mem or 0) if len(va) and mem is not None else None
    end = int(steps[-1]) if len(steps) else 0
    phases: list[tuple[str, int, int]] = [("memorisation", 0, mem if mem is not None else end)]
    if mem is not None:
        phases.append(("circuit formation", mem, rise if rise is not None else end))
        if rise is not None:
            phases.append(("cleanup", rise, grok if grok is not None and grok > rise else end))
    grokking = bool(mem is not None and grok is not None and grok >= 1.5 * max(mem, 1))
    return {"memorised": mem, "rise": rise, "grokked": grok, "phases": phases, "grokking": grokking}


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` without pyplot: a standalone Figure (rendered with Agg when saved)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def _shade(ax: Any, phases: Mapping[str, Any] | None, label: bool = False) -> None:
    if not phases:
        return
    for name, lo, hi in phases["phases"]:
        if hi > lo:
            ax.axvspan(lo, hi, color=PHASE_COLORS.get(name, "#eeeeee"), alpha=0.6, lw=0,
                       label=name if label else None, zorder=0)


# ==============================================================================================================
# Figures
# ==============================================================================================================
def fig_training(curves: Mapping[str, np.ndarray], phases: Mapping[str, Any] | None = None) -> Figure:
    """Loss (log scale) and accuracy of training and validation over updates, phases shaded, parameter norm."""
    phases = phases if phases is not None else find_phases(curves)
    fig, axes = _subplots(1, 3, figsize=(15, 4.2))
    s = curves["step"]
    ax = axes[0]
    _shade(ax, phases)
    ax.plot(s, curves["train_loss"], label="train", color="C0")
    if "val_loss" in curves:
        ax.plot(s, curves["val_loss"], label="validation", color="C3")
    for key, label in EXTRA_CURVES.items():
        if f"{key}_loss" in curves:
            ax.plot(s, curves[f"{key}_loss"], label=label, color="C1", ls="--")
    ax.set_yscale("log")
    ax.set(xlabel="update", ylabel="cross-entropy loss", title="loss")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    _shade(ax, phases)
    ax.plot(s, curves["train_acc"], label="train", color="C0")
    if "val_acc" in curves:
        ax.plot(s, curves["val_acc"], label="validation", color="C3")
    for key, label in EXTRA_CURVES.items():
        if f"{key}_acc" in curves:
            ax.plot(s, curves[f"{key}_acc"], label=label, color="C1", ls="--")
    ax.set(xlabel="update", ylabel="accuracy", title="accuracy", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc=(0.14, 0.55))
    ax = axes[2]
    _shade(ax, phases, label=True)
    ax.plot(s, curves["weight_norm"], color="k", label="||theta||")
    ax.set(xlabel="update", ylabel="||theta||_2", title="parameter norm (weight decay at work)")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(TITLE_TRAINING)
    fig.tight_layout()
    return fig


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or len(y) < width:
        return y
    k = np.ones(width) / width
    pad = width // 2
    yp = np.pad(y, (pad, width - 1 - pad), mode="edge")
    return np.convolve(yp, k, mode="valid")


def component_series(result: xr.Dataset) -> dict[str, dict[str, np.ndarray]]:
    """Per component, the step-wise influence ``<phi_s, part_s>`` on the mean query output, for the parts
    ``data`` and ``weight_decay``: ``{part: {component: (n_steps,)}}`` plus ``{"step": {"step": steps}}``.

    Uses ``movement`` (per update ``s``; needs ``"tensor"`` in ``by``); averaged over queries, summed over outputs.
    """
    mov = result["movement"]
    if "tensor" not in mov.dims:
        raise ValueError("the component figure needs a result computed with 'tensor' in by=")
    mov = mov.mean("query").sum("output")
    groups = component_groups([str(t) for t in result["tensor"].values])
    out: dict[str, dict[str, np.ndarray]] = {"step": {"step": np.asarray(result["step"].values)}}
    for part in ("data", "weight_decay"):
        m = mov.sel(part=part)
        out[part] = {c: np.asarray(m.sel(tensor=ts).sum("tensor").values, dtype=float) for c, ts in groups.items()}
    return out


def fig_components(result: xr.Dataset, phases: Mapping[str, Any] | None = None, smooth: int | None = None,
                   what: str = "validation loss") -> Figure:
    """Step-wise influence per component, data and weight-decay parts: per update (smoothed) and cumulative."""
    ser = component_series(result)
    steps = ser["step"]["step"]
    smooth = smooth if smooth is not None else max(1, len(steps) // 100)
    fig, axes = _subplots(2, 2, figsize=(14, 8), sharex=True)
    for col, (part, label) in enumerate((("data", "data (gradients of the training batches)"),
                                         ("weight_decay", "weight decay"))):
        top, bot = axes[0, col], axes[1, col]
        _shade(top, phases, label=(col == 0))
        _shade(bot, phases)
        for comp, y in ser[part].items():
            color = COMPONENT_COLORS.get(comp)
            top.plot(steps, _smooth(y, smooth), color=color, lw=1.2, label=comp)
            bot.plot(steps, np.cumsum(y), color=color, lw=1.5, label=comp)
        top.axhline(0, color="k", lw=0.5)
        bot.axhline(0, color="k", lw=0.5)
        top.set(title=f"{label}: per update" + (f" (moving average of {smooth})" if smooth > 1 else ""),
                ylabel=f"change of the {what}")
        bot.set(title=f"{label}: cumulative", xlabel="update", ylabel=f"cumulative change of the {what}")
        if smooth > 1:
            top.set_yscale("symlog", linthresh=_linthresh(ser[part]))
        top.legend(fontsize=8, ncol=2)
    fig.suptitle(TITLE_COMPONENTS)
    fig.tight_layout()
    return fig


def _linthresh(series: Mapping[str, np.ndarray]) -> float:
    vals = np.concatenate([np.abs(v) for v in series.values()]) if series else np.zeros(1)
    vals = vals[vals > 0]
    return float(np.percentile(vals, 50)) if len(vals) else 1.0


def _sample_scores(result: xr.Dataset) -> np.ndarray:
    """``data`` as (query, sample), summed over outputs and any other axis."""
    var = result["data"]
    other = [d for d in var.dims if d not in ("query", "sample")]
    return np.asarray(var.sum(other).transpose("query", "sample").values, dtype=float)


def fig_top_samples(result: xr.Dataset, describe: Callable[[int], str], query_labels: Sequence[str],
                    k: int = 8) -> Figure:
    """For every query, the ``k`` training samples with the largest positive and negative ``data`` scores."""
    from engine.topk import top_k

    tk = top_k(result, k, along="sample")
    n_q = tk.sizes["query"]
    cols = 2 if n_q == 4 else min(3, n_q)
    rows = math.ceil(n_q / cols)
    fig, axes = _subplots(rows, cols, figsize=(5.2 * cols, 0.32 * 2 * k * rows + 1.2 * rows), squeeze=False)
    for q in range(n_q):
        ax = axes[q // cols, q % cols]
        ti = np.asarray(tk["top_index"].isel(query=q)).reshape(-1)[:k]
        tv = np.asarray(tk["top_value"].isel(query=q)).reshape(-1)[:k]
        bi = np.asarray(tk["bottom_index"].isel(query=q)).reshape(-1)[:k]
        bv = np.asarray(tk["bottom_value"].isel(query=q)).reshape(-1)[:k]
        idx = list(ti) + list(bi[::-1])
        val = list(tv) + list(bv[::-1])
        ypos = np.arange(len(idx))[::-1]
        ax.barh(ypos, val, color=["#2ca02c" if v >= 0 else "#d62728" for v in val])
        ax.set_yticks(ypos, [f"{describe(int(i))}  (#{int(i)})" for i in idx], fontsize=7)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(query_labels[q] if q < len(query_labels) else f"query {q}", fontsize=9)
        ax.set_xlabel("contribution", fontsize=8)
    for j in range(n_q, rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.suptitle(TITLE_TOP)
    fig.tight_layout()
    return fig


def fig_contribution_matrix(result: xr.Dataset, residues: np.ndarray, p: int, query_labels: Sequence[str],
                            query_residues: Sequence[int] | None = None) -> Figure:
    """The query x training-sample matrix with samples sorted by ``(a + b) mod p``, and its sum per residue."""
    scores = _sample_scores(result)
    residues = np.asarray(residues)
    order = np.argsort(residues, kind="stable")
    mat = scores[:, order]
    lim = float(np.percentile(np.abs(mat), 99.5)) or 1.0
    fig, axes = _subplots(2, 1, figsize=(14, 2.2 + 0.55 * len(scores) * 2))
    ax = axes[0]
    im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ticks = [int(np.searchsorted(residues[order], c)) for c in range(0, p, max(1, p // 10))]
    ax.set_xticks(ticks, [str(c) for c in range(0, p, max(1, p // 10))])
    ax.set_yticks(range(len(scores)), list(query_labels)[: len(scores)], fontsize=8)
    ax.set(xlabel="training samples, sorted by (a + b) mod p (tick: residue)",
           title="every training sample (colour clipped at the 99.5th percentile of |score|)")
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    ax = axes[1]
    per_class = np.zeros((len(scores), p))
    for c in range(p):
        per_class[:, c] = scores[:, residues == c].sum(axis=1)
    lim2 = float(np.abs(per_class).max()) or 1.0
    im2 = ax.imshow(per_class, aspect="auto", cmap="RdBu_r", vmin=-lim2, vmax=lim2, interpolation="nearest")
    if query_residues is not None:
        for q, c in enumerate(query_residues):
            ax.plot(c, q, marker="o", mfc="none", mec="k", ms=7)
    ax.set_yticks(range(len(scores)), list(query_labels)[: len(scores)], fontsize=8)
    ax.set(xlabel="residue (a + b) mod p of the training samples (circle: the query's own answer)",
           title="summed per residue")
    fig.colorbar(im2, ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle(TITLE_MATRIX + " (sorted by (a + b) mod p)")
    fig.tight_layout()
    return fig


def param_tensors(result: xr.Dataset) -> list[str]:
    """Tensors with element-wise scores (``param_<tensor>`` variables) in the result."""
    return [str(v)[len("param_"):].replace("__", ".") for v in result.data_vars if str(v).startswith("param_")]


def fig_param_scores(result: xr.Dataset, tensor: str, max_rows: int = 128) -> Figure:
    """Heat maps of the element-wise scores of one 2-D weight matrix (mean over queries), data and weight decay."""
    var = result["param_" + tensor.replace(".", "__")]
    var = var.mean("query").sum("output")
    dims = [d for d in var.dims if d != "part"]
    if len(dims) != 2:
        raise ValueError(f"{tensor} is not a matrix (dims {dims})")
    parts = [("data", "data"), ("weight_decay", "weight decay"), (None, "total")]
    fig, axes = _subplots(1, 3, figsize=(15, 4.8))
    for ax, (part, label) in zip(axes, parts):
        arr = np.asarray((var.sum("part") if part is None else var.sel(part=part)).transpose(*dims).values)[:max_rows]
        lim = float(np.abs(arr).max()) or 1.0
        im = ax.imshow(arr, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set(title=f"{label} (sum {arr.sum():+.3g})", xlabel=f"{tensor} axis 1", ylabel=f"{tensor} axis 0")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{TITLE_PARAM}: {tensor}")
    fig.tight_layout()
    return fig


def _per_step_max(ds: xr.Dataset, name: str) -> np.ndarray:
    steps = ds.sizes["step"]
    arr = np.asarray(ds[name].transpose(..., "step").values, dtype=float)
    return np.abs(arr).reshape(-1, steps).max(axis=0)


def fig_residuals(results: Mapping[str, xr.Dataset]) -> Figure:
    """Per update, max over queries: ``|residual|`` split into the quadrature residual (the error of the path
    integral) and the rounding residual (float32 training arithmetic vs the float64 rebuild), next to the size of
    the change ``|F(theta_s) - F(theta_{s-1})|``; the title gives the total residual against the total change."""
    fig, axes = _subplots(1, len(results), figsize=(7 * len(results), 4.2), squeeze=False)
    tiny = 1e-20
    for ax, (name, ds) in zip(axes[0], results.items()):
        steps = np.asarray(ds["step"].values)
        delta = _per_step_max(ds, "delta")
        res = _per_step_max(ds, "residual")
        ax.semilogy(steps, np.maximum(delta, tiny), color="0.6", lw=1, label="|change of F| per update")
        ax.semilogy(steps, np.maximum(res, tiny), color="C3", lw=2.5, alpha=0.35, label="|residual| (sum of both)")
        if "quadrature_residual" in ds and "rounding_residual" in ds:
            ax.semilogy(steps, np.maximum(_per_step_max(ds, "quadrature_residual"), tiny), color="C0", lw=0.8,
                        label="|quadrature residual|")
            ax.semilogy(steps, np.maximum(_per_step_max(ds, "rounding_residual"), tiny), color="C1", lw=0.8,
                        label="|rounding residual|")
        if "max_replay_residual" in ds.attrs and "replay_residual" in ds:  # sparse checkpoints: at chunk ends only
            ax.semilogy(steps, np.maximum(_per_step_max(ds, "replay_residual"), tiny), "v", color="C2", ms=4,
                        label=f"|replay residual| (max {float(ds.attrs['max_replay_residual']):.1e})")
        ax.axhline(res.max(), color="C3", ls="--", lw=0.8, label=f"max per update {res.max():.1e}")
        total = np.abs(np.asarray(ds["residual"].sum("step").values, dtype=float)).max()
        change = np.abs(np.asarray((ds["final"] - ds["initial"]).values, dtype=float)).max()
        ax.set(xlabel="update", ylabel="max over queries",
               title=f"{name}: total residual {total:.1e} against a change of {change:.3g}")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(TITLE_RESIDUAL)
    fig.tight_layout()
    return fig


def identity_rows(ds: xr.Dataset) -> list[dict[str, float]]:
    """Per query (summed over outputs): initial, parts, residual, final and the identity's error."""
    def tot(name: str) -> np.ndarray:
        if name not in ds:
            return np.zeros(ds.sizes["query"])
        v = ds[name]
        other = [d for d in v.dims if d != "query"]
        return np.asarray(v.sum(other).values if other else v.values, dtype=float).reshape(-1)

    rows = []
    ini, fin = tot("initial"), tot("final")
    data, wd, mom, res = tot("data"), tot("weight_decay"), tot("momentum"), tot("residual")
    for q in range(len(ini)):
        err = ini[q] + data[q] + wd[q] + mom[q] + res[q] - fin[q]
        rows.append({"initial": ini[q], "data": data[q], "weight_decay": wd[q], "momentum": mom[q],
                     "residual": res[q], "final": fin[q], "identity_error": err})
    return rows


def findings(
    phases: Mapping[str, Any] | None = None,
    components: xr.Dataset | None = None,
    samples: xr.Dataset | None = None,
    x_train: np.ndarray | None = None,
    query_inputs: np.ndarray | None = None,
    p: int | None = None,
) -> list[str]:
    """A few sentences computed from the results (plain text): who moved the validation loss in which phase, and
    whether the most helpful training samples share the query's answer."""
    out: list[str] = []
    if components is not None and "tensor" in components["movement"].dims:
        ser = component_series(components)
        steps = ser["step"]["step"]
        d_tot = sum(float(v.sum()) for v in ser["data"].values())
        w_tot = sum(float(v.sum()) for v in ser["weight_decay"].values())
        out.append(f"Over updates {int(steps[0]) - 1}..{int(steps[-1])} the training gradients (data part) changed the "
                   f"validation loss by {d_tot:+.3g} and weight decay by {w_tot:+.3g} (mean over the queries).")
        for name, lo, hi in (phases or {}).get("phases", []):
            m = (steps > lo) & (steps <= hi)
            if not m.any():
                continue
            d = {c: float(v[m].sum()) for c, v in ser["data"].items()}
            w = {c: float(v[m].sum()) for c, v in ser["weight_decay"].items()}
            big = max(d, key=lambda c: abs(d[c]))
            out.append(f"{name.capitalize()} (updates {lo}..{hi}): data {sum(d.values()):+.3g}, weight decay "
                       f"{sum(w.values()):+.3g}; the largest data part came through the {big} ({d[big]:+.3g}).")
    if samples is not None and x_train is not None and query_inputs is not None:
        x_train = np.asarray(x_train)
        qx = np.asarray(query_inputs)
        p = int(p if p is not None else x_train[0, 2])
        res_train = (x_train[:, 0] + x_train[:, 1]) % p
        scores = _sample_scores(samples)
        same_top, share = 0, []
        for q in range(min(len(qx), len(scores))):
            own = int((qx[q, 0] + qx[q, 1]) % p)
            sc = scores[q]
            same_top += int(res_train[int(np.argmax(sc))] == own)
            pos = sc[sc > 0].sum()
            share.append(float(sc[(res_train == own) & (sc > 0)].sum() / pos) if pos > 0 else 0.0)
        n_q = min(len(qx), len(scores))
        out.append(f"For {same_top} of {n_q} validation queries the most helpful training pair has the query's own "
                   f"answer; pairs with that answer ({100 / p:.1f}% of the training set) hold {np.mean(share):.0%} of "
                   "the positive contributions on average.")
    return out


# ==============================================================================================================
# HTML
# ==============================================================================================================
def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (floats as given: format them before)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1150px; margin: 2em auto;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 9px; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
.caption { color: #444; font-size: 0.93em; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def make_report(
    out_dir: str | Path,
    *,
    curves: Mapping[str, np.ndarray] | None = None,
    components: xr.Dataset | None = None,
    samples: xr.Dataset | None = None,
    x_train: np.ndarray | None = None,
    query_inputs: np.ndarray | None = None,
    p: int | None = None,
    summary: Sequence[tuple[str, Any]] = (),
    notes: Sequence[str] = (),
    title: str = "ExPLAIND demo: grokking modular addition, decomposed exactly",
    param_tensor: str | None = None,
    component_what: str = "validation loss",
) -> Path:
    """Draw every figure the inputs allow, save them as ``out_dir/figures/*.png`` and write ``out_dir/report.html``.

    Args:
        curves: :func:`compute_curves` output (training figure and phases).
        components: an attribution with ``"step"`` and ``"tensor"`` in ``by`` (and optionally ``"param"``).
        samples: an attribution with ``"sample"`` in ``by`` (top samples and the contribution matrix).
        x_train: training inputs ``(N, 3)`` rows ``[a, b, p]`` (labels and residues for the sample figures).
        query_inputs: the sample result's query inputs ``(Q, 3)`` (figure labels).
        p: the modulus (default: read from ``x_train``).
        summary: ``(label, value)`` rows of the summary table.
        notes: extra paragraphs (plain text) shown under the summary.
        param_tensor: the weight matrix for the element-wise heat map (default ``unembed.weight`` if present).

    Returns the path of the HTML file.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    phases = find_phases(curves) if curves is not None else None

    def add(name: str, fig: Figure, heading: str, caption: str) -> None:
        data = png_bytes(fig)
        (fig_dir / f"{name}.png").write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        sections.append(
            f"<h2>{html.escape(heading)}</h2>\n<img alt=\"{html.escape(heading)}\" src=\"data:image/png;base64,{b64}\">"
            f"\n<p class=\"caption\">{caption}</p>"
        )

    if curves is not None:
        ph = phases or {}
        cap = ("Full-batch AdamW on the training pairs; loss and accuracy evaluated from the recorded parameters. "
               "Shaded: <b>memorisation</b> (until training accuracy reaches 99%), <b>circuit formation</b> (training "
               "accuracy saturated, until the accuracy on validation pairs whose mirror (b, a) was not trained, "
               "dashed, reaches 50%) and <b>cleanup</b> (until the validation accuracy reaches 95%). The parameter "
               "norm shows weight decay shrinking the memorising solution. ")
        if ph.get("grokking"):
            cap += (f"Here training accuracy saturated at update {ph['memorised']} and validation accuracy reached 95% "
                    f"at update {ph['grokked']}: the model grokked.")
        elif ph.get("grokked") is not None:
            cap += (f"Validation accuracy reached 95% at update {ph['grokked']}, close to the saturation of the "
                    f"training accuracy (update {ph['memorised']}): not a clear grokking delay.")
        else:
            cap += "Validation accuracy did not reach 95% within this run (no grokking in this run)."
        add("training", fig_training(curves, phases), TITLE_TRAINING, cap)

    if components is not None:
        q = components.sizes.get("query", 0)
        out_mode = components.attrs.get("output", "loss")
        add("components", fig_components(components, phases, what=component_what), TITLE_COMPONENTS,
            f"The change of the {component_what} (here the mean {html.escape(str(out_mode))} of {q} validation points; "
            "the decomposition is linear, so the mean of their decompositions is the decomposition of their mean) "
            "split exactly over updates and parameter tensors: for every update s, <code>&lt;phi_s, part_s&gt;</code> "
            "with phi_s the path integral of the gradient along the update and part_s the data part (momentum of "
            "the batch gradients) or the decoupled weight-decay part of the AdamW step. Negative = lowered the "
            "loss. Top: per update; bottom: cumulative over updates.")
        tensors = param_tensors(components)
        if tensors:
            tname = param_tensor or ("unembed.weight" if "unembed.weight" in tensors else tensors[0])
            add("param_scores", fig_param_scores(components, tname), f"{TITLE_PARAM}: {tname}",
                f"<code>sum_s phi_s * part_s</code> for every element of <code>{html.escape(tname)}</code> (mean over "
                "the queries): how much each single weight's movement changed the query loss, split into data and "
                "weight decay." + (" Rows of the unembedding are the output classes (the answers 0..p-1), columns the "
                                   "residual-stream dimensions." if tname == "unembed.weight" else ""))

    if samples is not None and x_train is not None:
        x_train = np.asarray(x_train)
        p = int(p if p is not None else x_train[0, 2])
        residues = (x_train[:, 0] + x_train[:, 1]) % p

        def describe(i: int) -> str:
            a, b = int(x_train[i, 0]), int(x_train[i, 1])
            return f"{a} + {b} = {(a + b) % p}"

        qx = np.asarray(query_inputs) if query_inputs is not None else None
        qlabels = ([f"query {i}: {int(r[0])} + {int(r[1])} = {(int(r[0]) + int(r[1])) % p}" for i, r in enumerate(qx)]
                   if qx is not None else [f"query {i}" for i in range(samples.sizes["query"])])
        qres = [int((r[0] + r[1]) % p) for r in qx] if qx is not None else None
        win = samples.attrs.get("window", [None, None])
        what = html.escape(str(samples.attrs.get("output", "")))
        add("top_samples", fig_top_samples(samples, describe, qlabels), TITLE_TOP,
            f"Per validation query, the training samples whose gradients raised (green) or lowered (red) the query's "
            f"{what} the most over updates {win[0]}..{win[1]} (data part, every update that used the sample, through "
            "the AdamW momentum). Shown as <code>a + b = c</code>.")
        add("contribution_matrix", fig_contribution_matrix(samples, residues, p, qlabels, qres), TITLE_MATRIX,
            "Each row is a validation query, each column a training sample, sorted by its answer (a + b) mod p. "
            "The lower panel sums the columns of each answer: which answers' training pairs pushed the query's "
            f"{what} up or down.")

    res_sets = {k: v for k, v in (("components", components), ("samples", samples)) if v is not None}
    if res_sets:
        rows = []
        for name, ds in res_sets.items():
            idr = identity_rows(ds)
            err = max(abs(r["identity_error"]) for r in idr)
            res = max(abs(r["residual"]) for r in idr)
            chg = max(abs(r["final"] - r["initial"]) for r in idr)
            rows.append([name, f"{ds.attrs.get('window')}", ds.attrs.get("rule", ""), f"{chg:.4g}", f"{res:.2e}",
                         f"{err:.1e}"])
        header = ["result", "window", "quadrature", "max |F(end) - F(start)|", "max |total residual|",
                  "max identity error"]
        if any("max_replay_residual" in ds.attrs for ds in res_sets.values()):  # a run with sparse checkpoints
            header.append("max replay residual")
            for row, ds in zip(rows, res_sets.values()):
                row.append(f"{float(ds.attrs.get('max_replay_residual', 0.0)):.2e}")
        ident = _table(rows, header)
        add("residuals", fig_residuals(res_sets), TITLE_RESIDUAL,
            "The only approximation is the 1-D path integral of each update; its error (the <b>quadrature "
            "residual</b>) is known exactly from two forward passes. The <b>rounding residual</b> is the difference "
            "between the recorded update and the same update rebuilt in float64 from recomputed gradients (for a run "
            "trained in float32 it grows when the loss is tiny and Adam normalises float32 gradient noise). Both are "
            "reported per update, next to the size of the update's change (grey). With them, "
            "<code>initial + data + weight_decay + momentum + residual = final</code> holds to float64 rounding:"
            + ident)

    summary_html = _table([(k, v) for k, v in summary], ["", ""]) if summary else ""
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    found = findings(phases, components, samples, x_train, query_inputs, p)
    if found:
        notes_html = ("<h2>What this run shows</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in found)
                      + "</ul>" + notes_html)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>A one-layer transformer learns <code>(a + b) mod p</code> from a fraction of the table while every update is
recorded exactly (parameters and AdamW state, <code>explaind_store</code>). The engine then decomposes the change of
validation predictions exactly into training samples, updates, parameter tensors and weight decay (ExPLAIND, Eichin et
al. 2025), computed in parallel on a local Dask cluster.</p>
{summary_html}
{notes_html}
{''.join(sections)}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


__all__ = [
    "COMPONENTS",
    "component_groups",
    "component_of",
    "component_series",
    "compute_curves",
    "fig_components",
    "fig_contribution_matrix",
    "fig_param_scores",
    "fig_residuals",
    "fig_top_samples",
    "fig_training",
    "find_phases",
    "findings",
    "identity_rows",
    "make_report",
    "param_tensors",
]
