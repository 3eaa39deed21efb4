"""Pure functions of the experiments: importance and pruning masks, prediction metrics, rank correlations.

Everything here works on numpy arrays / torch tensors in memory and touches no store, so it is tested on toy cases
with known answers (tests/app/test_experiments.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# moved to the app layer (the pipeline test of `explaind demo --paper` uses it); kept importable from here
from explaind_app.metrics import prediction_metrics  # noqa: F401

Arrays = Mapping[str, np.ndarray]


def importance_from_scores(
    param_scores: Arrays, sum_axes: tuple[int, ...] = (0, 1, 2), abs_sum_axes: tuple[int, ...] = ()
) -> dict[str, np.ndarray]:
    """Importance of every parameter element: ``|sum of its element-wise contributions|``.

    ``param_scores[name]`` has leading axes (e.g. query, output, part of the engine's ``param_<tensor>`` variables)
    followed by the tensor's own shape. The contributions are summed over ``sum_axes`` *with their signs* (a
    parameter whose effects on different queries cancel is unimportant for the held-out set as a whole), then the
    absolute value is taken, then summed over ``abs_sum_axes`` (axes of the array left after the first sum; e.g.
    the output axis, so that effects on different classes cannot cancel).
    """
    out = {}
    for name, s in param_scores.items():
        v = np.abs(np.asarray(s, dtype=np.float64).sum(axis=sum_axes))
        out[name] = v.sum(axis=abs_sum_axes) if abs_sum_axes else v
    return out


def magnitude_importance(params: Arrays) -> dict[str, np.ndarray]:
    """The magnitude baseline: ``|theta|`` element-wise."""
    return {k: np.abs(np.asarray(v, dtype=np.float64)) for k, v in params.items()}


def random_importance(params: Arrays, seed: int) -> dict[str, np.ndarray]:
    """The random baseline: i.i.d. uniform scores (fixed by ``seed``), so the kept set is a random subset."""
    rng = np.random.default_rng(seed)
    return {k: rng.random(np.shape(v)) for k, v in params.items()}


def _check_fraction(kept: float) -> None:
    if not 0.0 <= kept <= 1.0:
        raise ValueError(f"the kept fraction must lie in [0, 1], got {kept}")


def _top_mask(flat: np.ndarray, n_keep: int) -> np.ndarray:
    """True for the ``n_keep`` largest entries of ``flat``; ties broken by position (stable, deterministic)."""
    mask = np.zeros(flat.shape, dtype=bool)
    if n_keep > 0:
        order = np.argsort(-flat, kind="stable")
        mask[order[:n_keep]] = True
    return mask


def global_mask(importance: Arrays, kept: float) -> dict[str, np.ndarray]:
    """Keep the ``round(kept * total)`` most important elements over all tensors together (True = kept)."""
    _check_fraction(kept)
    names = list(importance)
    flat = np.concatenate([np.ravel(importance[k]) for k in names]) if names else np.zeros(0)
    mask = _top_mask(flat, int(round(kept * flat.size)))
    out, lo = {}, 0
    for k in names:
        n = np.size(importance[k])
        out[k] = mask[lo : lo + n].reshape(np.shape(importance[k]))
        lo += n
    return out


def per_module_mask(
    importance: Arrays, kept: float, groups: Mapping[str, Sequence[str]] | None = None
) -> dict[str, np.ndarray]:
    """Keep the ``round(kept * size)`` most important elements of each module separately (True = kept).

    A module is one tensor by default; ``groups`` (``{module: [tensor, ...]}``, e.g. the transformer's components
    from ``explaind_app.report.component_groups``) ranks the tensors of a module together, so a module's weight
    and bias share its budget. Every tensor must be in exactly one group.
    """
    _check_fraction(kept)
    if groups is None:
        return {k: _top_mask(np.ravel(v), int(round(kept * np.size(v)))).reshape(np.shape(v))
                for k, v in importance.items()}
    members = [t for ts in groups.values() for t in ts]
    missing, extra = sorted(set(importance) - set(members)), sorted(set(members) - set(importance))
    twice = sorted({t for t in members if members.count(t) > 1})
    if missing or extra or twice:
        raise ValueError(f"groups must name every tensor exactly once: missing {missing}, unknown {extra}, "
                         f"repeated {twice}; add the missing tensors to a group and drop the others")
    out: dict[str, np.ndarray] = {}
    for ts in groups.values():
        out.update(global_mask({t: importance[t] for t in ts}, kept))
    return {k: out[k] for k in importance}


def kept_fraction(mask: Arrays) -> float:
    """The fraction of elements a mask keeps."""
    total = sum(np.size(m) for m in mask.values())
    return float(sum(int(np.count_nonzero(m)) for m in mask.values()) / max(total, 1))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions) along the last axis."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        v = x[idx]
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        sv = v[order]
        i = 0
        while i < len(v):  # ties get the mean rank
            j = i
            while j + 1 < len(v) and sv[j + 1] == sv[i]:
                j += 1
            if j > i:
                r[order[i : j + 1]] = (i + j) / 2.0
            i = j + 1
        out[idx] = r
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (leading axes broadcast): Pearson of the average ranks.

    NaN where either side is constant (no ranking to compare).
    """
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean(axis=-1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=-1) * (rb**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def predicted_changes(sample_effects: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Predicted change of each query's output when the removed samples are left out of training.

    ``sample_effects`` ``(Q, N)``: the effect of training on sample ``n`` on query ``q``'s output (e.g. its ExPLAIND
    contribution to ``F(theta_T) - F(theta_0)``); ``removed`` ``(S, N)`` boolean, one row per subset. Leaving the
    samples out removes their effects: the result ``(Q, S)`` is ``-sum_{n removed} effect[q, n]``.
    """
    eff = np.asarray(sample_effects, dtype=np.float64)
    rem = np.asarray(removed, dtype=np.float64)
    if eff.ndim != 2 or rem.ndim != 2 or eff.shape[1] != rem.shape[1]:
        raise ValueError(f"sample_effects must be (Q, N) and removed (S, N) with the same N; got {eff.shape} and "
                         f"{rem.shape}")
    return -(eff @ rem.T)


def lds(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The linear datamodeling score per query: Spearman correlation over subsets between the actual and the
    predicted changes, both ``(Q, S)``; returns ``(Q,)``."""
    actual, predicted = np.asarray(actual), np.asarray(predicted)
    if actual.shape != predicted.shape or actual.ndim != 2:
        raise ValueError(f"actual and predicted must both be (Q, S); got {actual.shape} and {predicted.shape}")
    return spearman(actual, predicted)


def mean_spread(values: np.ndarray) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of finite values (NaNs dropped), and how many there are."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size)}
