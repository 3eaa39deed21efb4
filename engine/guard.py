"""The exactness guard of ``attribute``: every decomposed update must add up, or the call fails instead of returning.

Per update ``s`` the decomposition explains ``delta_s = F(theta_s) - F(theta_{s-1})``; its ``rounding_residual_s``
is the part of ``delta_s`` that the movement rebuilt from the recorded batches (recomputed gradients, recorded
``grad_scale``, loss and optimizer) does not reproduce. On an exact record it is float rounding (relative
~1e-7..1e-5 in float32 runs); an inexact record (randomness the store cannot regenerate, clipping not passed to
``record``, wrong batch indices, a sum-reduced loss, BatchNorm statistics) leaves residuals as large as the change
itself. (Dropout through ``F.dropout`` / ``nn.Dropout`` is recorded and regenerated: ``explaind_store.dropout``.)
Update ``s`` fails when, for
its worst query output,

    max |rounding_residual_s|  >  residual_tol * max |delta_s|  +  floor

with maxima over the query outputs and ``floor = FLOOR_ULPS * eps(training dtype) * max(|initial|, |final|)``: the
rounding of the stored parameters alone moves ``F`` by a few ulps of its size, whatever the size of the update, so
tiny late updates do not trip the check. With ``step_bins`` the check runs per bin. The quadrature residual is not
judged here: it measures the path integral, which the ``quadrature`` rule the caller chose controls (the default
"kink" rule is exact to float64 rounding), not the record.

A float32 run can also leave large residuals legitimately: late in training, with a near-zero loss, each batch
gradient is a cancellation of much larger terms and float32 computes it tens of percent off the exact (float64)
gradient the engine uses. So for a store the updates that fail are confirmed by the batch-gradient check of
``verify`` (``GradientChecker``; at most ``CONFIRM_UPDATES``, one batch gradient each): only a gradient the
optimizer did not get from the recorded batch, loss and clipping raises; residuals its rounding explains give an
``InexactWarning``. Trajectories that are not stores (no batch to check) raise on the residual alone.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import xarray as xr

from explaind_store import schema
from explaind_store.storage import StoreError

DEFAULT_RESIDUAL_TOL = 1e-3
FLOOR_ULPS = 64.0
CONFIRM_UPDATES = 16  # bad updates the batch-gradient check confirms (the first and evenly spaced ones)

CAUSES = (
    "a random forward in train mode whose randomness the store cannot regenerate (not nn.Dropout / F.dropout)",
    "gradient clipping not passed to rec.record(grad_scale=...)",
    "batch indices passed to record() that are not the samples trained on",
    "a loss that is not the batch mean (reduction='sum', or a scaled loss)",
    "BatchNorm in train mode or other buffers that change during training",
)


class InexactRecordError(StoreError):
    """The record is not exact enough for its decomposition to add up; the message names the first bad update."""


class InexactWarning(UserWarning):
    """Residuals above ``residual_tol`` that the batch-gradient check traces to float rounding, not the record."""


def check_residual_tol(tol: Any) -> float | None:
    """``residual_tol`` as a float (None: the check is off); ValueError for anything else."""
    if tol is None:
        return None
    try:
        value = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"residual_tol must be a number >= 0 or None (no check), not {tol!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"residual_tol must be a number >= 0 or None (no check), not {tol!r}")
    return None if math.isinf(value) else value


def training_eps(traj: Any) -> float:
    """Machine epsilon of the coarsest dtype the parameters were trained in (float32 when the store does not say)."""
    dtypes = {str(t.get("dtype")) for t in (getattr(traj, "attrs", None) or {}).get(schema.ATTR_TENSORS, [])}
    eps = [float(np.finfo(d).eps) for d in dtypes if d in ("float16", "float32", "float64")]
    return max(eps) if eps else float(np.finfo(np.float32).eps)


def check_exactness(ds: xr.Dataset, traj: Any, tol: float | None) -> None:
    """Raise :class:`InexactRecordError` for the first update whose residual is too large (see the module doc).

    For a store, the updates that trip the residual test are confirmed by the batch-gradient check (one batch
    gradient each, at most ``CONFIRM_UPDATES``): when the optimizer's gradient is reproduced within the rounding
    of the training dtype, the residual is float rounding, not a wrong record, and a warning says so instead.
    """
    if tol is None:
        return
    steps = np.asarray(ds[schema.STEP].values)
    residual = np.abs(np.asarray(ds["rounding_residual"].values, dtype=np.float64)).reshape(-1, len(steps))
    delta = np.abs(np.asarray(ds["delta"].values, dtype=np.float64)).reshape(-1, len(steps))
    size = np.maximum(np.abs(np.asarray(ds["initial"].values)), np.abs(np.asarray(ds["final"].values)))
    floor = FLOOR_ULPS * training_eps(traj) * float(np.nanmax(size, initial=0.0))
    if "step_start" not in ds.coords:
        _check_replay(ds, traj, tol, floor, steps, delta)
    worst_res, worst_delta = residual.max(axis=0, initial=0.0), delta.max(axis=0, initial=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = worst_res / (tol * worst_delta + floor)
    bad = np.flatnonzero(~(excess <= 1.0))  # NaN counts as bad
    if not len(bad):
        return
    binned = "step_start" in ds.coords
    checker, why_not = (None, "the result is binned") if binned else _checker(traj)
    first, diagnosis = int(bad[0]), None
    if checker is not None:
        picks = sorted({int(bad[int(j)]) for j in np.linspace(0, len(bad) - 1, min(len(bad), CONFIRM_UPDATES)).round()})
        try:
            failing = next((m for m in (checker.update(int(steps[i])) for i in picks) if not m.ok), None)
        except Exception as exc:  # noqa: BLE001 - without the confirmation the residual test decides alone
            failing, why_not = None, f"the batch-gradient check could not run: {exc}"
            checker = None
        if checker is not None and failing is None:
            _warn_rounding(steps, bad, worst_res, worst_delta, tol)
            return
        if failing is not None:
            first, diagnosis = int(np.flatnonzero(steps == failing.update)[0]), failing.explain()
    i, s = first, int(steps[first])
    where = f"updates {int(ds['step_start'].values[i])}..{s}" if binned else f"update {s}"
    ratio = worst_res[i] / worst_delta[i] if worst_delta[i] > 0 else math.inf
    if diagnosis is None and why_not:
        diagnosis = f"(The cause could not be narrowed down: {why_not}.)"
    raise InexactRecordError(
        f"the record is not exact at {where}: the movement rebuilt from the recorded batch misses the stored one "
        f"by {worst_res[i]:.3g} in the explained output (rounding_residual), against a change of "
        f"{worst_delta[i]:.3g} (ratio {ratio:.3g}; residual_tol={tol:g}); {len(bad)} of {len(steps)} "
        f"{'bins' if binned else 'updates'} exceed it. The stored run is not the one that was trained, so the "
        "attribution would not add up."
        + (f"\n{diagnosis}" if diagnosis else "")
        + "\nLikely causes: " + "; ".join(CAUSES) + "."
        + f"\nRun `explaind verify {getattr(traj, 'path', '<store>')}` for the replay and batch-gradient checks, "
        "then record again with any randomness outside nn.Dropout / F.dropout off, clipping passed as "
        "rec.record(batch, grad_scale=min(1, max_norm / norm)), the exact batch indices, the batch-mean loss and "
        "eval-mode BatchNorm. To get the result anyway, pass residual_tol=None (CLI: --residual-tol inf)."
    )


def _check_replay(ds: xr.Dataset, traj: Any, tol: float, floor: float, steps: np.ndarray,
                  delta: np.ndarray) -> None:
    """A run with sparse checkpoints: raise :class:`InexactRecordError` when the replay from a checkpoint misses
    the next stored one (``replay_residual`` at its step) by more than ``tol`` of the change over the updates
    between them plus ``floor``. Replay that is not bit-exact (threads, GPU kernels) drifts by float rounding, far
    below that; a checkpoint or per-update record that is not the training's (a damaged or edited store, wrong batch
    indices, unrecorded clipping) shows here, since the replay between checkpoints follows the records exactly."""
    if "replay_residual" not in ds:
        return
    replay = np.abs(np.asarray(ds["replay_residual"].values, dtype=np.float64)).reshape(-1, len(steps))
    hit = replay.max(axis=0, initial=0.0) > 0
    if not hit.any():
        return
    stored = getattr(traj, "is_stored", None)
    start = 0
    for j in range(len(steps)):
        ends = stored is not None and bool(stored(int(steps[j])))
        if hit[j]:
            change = delta[:, start:j + 1].sum(axis=1)  # per query output, over the updates since the last checkpoint
            worst = int(np.argmax(replay[:, j] / (tol * change + floor)))
            if not replay[worst, j] <= tol * change[worst] + floor:
                first = int(steps[start]) - 1
                raise InexactRecordError(
                    f"the record is not exact at the checkpoint of step {int(steps[j])}: replaying updates "
                    f"{first + 1}..{int(steps[j])} from the recorded batches, learning rates and optimizer state misses "
                    f"the stored parameters by {replay[worst, j]:.3g} in the explained output (replay_residual), "
                    f"against a change of {change[worst]:.3g} over those updates (residual_tol={tol:g}). Replay "
                    "that is not bit-exact (threads, GPU kernels) drifts far less, so the stored checkpoints are not "
                    "the trajectory the records give: a damaged or edited checkpoint or per-update record, batch "
                    "indices that are not the samples trained on, or clipping or randomness left out of the record."
                    f"\nRun `explaind verify {getattr(traj, 'path', '<store>')}` to see which checkpoint and "
                    "update. To get the result anyway, pass residual_tol=None (CLI: --residual-tol inf)."
                )
        if ends or hit[j]:
            start = j + 1


def _checker(traj: Any) -> tuple[Any, str | None]:
    """The store's batch-gradient checker, or None and why not (not a store, or data/model unavailable)."""
    from explaind_store.reader import Run
    from explaind_store.verify import GradientChecker

    if not isinstance(traj, Run):
        return None, None
    try:
        return GradientChecker(traj), None
    except Exception as exc:  # noqa: BLE001 - the residual test decides alone
        return None, f"the batch-gradient check could not run: {exc}"


def _warn_rounding(steps: np.ndarray, bad: np.ndarray, res: np.ndarray, delta: np.ndarray, tol: float) -> None:
    i = int(bad[np.argmax(res[bad] / np.maximum(delta[bad], 1e-300))])
    warnings.warn(
        f"{len(bad)} of {len(steps)} updates (first {int(steps[bad[0]])}) leave rounding residuals above "
        f"residual_tol={tol:g} "
        f"of their change (worst: update {int(steps[i])}, residual {res[i]:.3g} against a change of {delta[i]:.3g}), "
        "but their batch gradients match what the optimizer used within the rounding of the training dtype: the "
        "record is right, and the residual is the float rounding of the training's own gradients (large late in "
        "training, when a near-zero loss makes each gradient a cancellation of much larger terms). The result's "
        "`residual` holds it; train in float64 to shrink it.",
        InexactWarning,
        stacklevel=3,
    )
