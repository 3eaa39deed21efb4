"""The result schema: per-chunk array layout, combining chunks, and the final ``xarray.Dataset``.

A chunk ``(lo, hi]`` of updates produces a :class:`ChunkResult` whose arrays have a flattened query-output axis
``qo`` (``Q * O`` rows, row ``q * O + o``) first. :func:`chunk_layout` gives every array's dimension names; arrays
with a ``step`` dimension are concatenated over chunks, all others (except ``f_start`` / ``f_end``) are summed.
:func:`combine` does that for numpy or dask arrays, :func:`assemble` builds the Dataset.

Step semantics (stored in the Dataset's ``attrs["step_semantics"]``):

- ``data[step=i]`` is what the gradients of batch ``B_i`` (taken at ``theta_{i-1}``) contributed to
  ``F(theta_b) - F(theta_a)`` through update ``i`` and every later update of the window (via momentum): the
  *origin* update. Likewise ``weight_decay[step=i]`` for Adam / SGD (coupled decay of ``theta_{i-1}``). For AdamW
  (decoupled decay) the decay of update ``s`` only moves update ``s``, so origin = movement step.
- ``momentum`` (the momentum stored at the window start, ``exp_avg`` / ``momentum_buffer`` at ``a``) has no step.
- ``delta``, ``quadrature_residual``, ``rounding_residual``, ``residual``, ``nodes``, ``kinks`` and ``movement``
  are per update ``s`` (the update that moved ``theta_{s-1} -> theta_s``): ``delta = F(theta_s) - F(theta_{s-1})``,
  ``quadrature_residual = delta - <phi_s, dtheta_s>``, ``rounding_residual = <phi_s, dtheta_s - rebuilt_s>`` where
  ``rebuilt_s`` is the movement rebuilt in float64 from the recomputed gradients, ``movement[part]`` is
  ``<phi_s, part of rebuilt_s>``. ``residual = quadrature_residual + rounding_residual + replay_residual``.
- ``replay_residual`` (runs with sparse checkpoints, zero elsewhere) sits at the last update of each chunk that ends
  on a stored checkpoint ``c``: ``F(theta_c stored) - F(theta_c replayed)``. A chunk replays its updates from the
  checkpoint it starts at, and the next chunk starts from the stored ``theta_c``, so this is the jump between them.
  The optimizer state is not compared there: the engine carries its own rebuilt momentum across chunks, so a
  difference between the stored and the replayed state at ``c`` enters the ``rounding_residual`` of the updates
  after ``c``, like any other disagreement between record and rebuild.

Identity: ``initial + data.sum() + weight_decay.sum() + momentum + residual.sum(step) == final`` (float64 rounding),
with sums over every dimension except ``query`` / ``output``; ``movement.sum(step)`` equals the origin-step totals.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from explaind_store.schema import OUTPUT, QUERY, SAMPLE, STEP, TENSOR, tensor_dims

QO = "qo"  # flattened (query, output) axis of chunk arrays
PART = "part"
PARTS = ("data", "weight_decay", "momentum")
BY_KEYS = ("sample", "step", "tensor", "param")
PARAM_PREFIX = "param:"  # ChunkResult key of element-wise scores: "param:<tensor name>"
STEP_VARS = ("quadrature_residual", "rounding_residual", "replay_residual", "delta", "movement", "nodes", "kinks")

STEP_SEMANTICS = (
    "data[step=i] and (Adam, SGD) weight_decay[step=i]: contribution of batch i's gradients / of the coupled decay "
    "of theta_{i-1} through update i and all later updates of the window (origin update); AdamW weight_decay[step=s]:"
    " the decoupled decay of update s. momentum: the optimizer momentum stored at the window start (no step). delta, "
    "quadrature_residual, rounding_residual, residual, movement, nodes, kinks: per update s (theta_{s-1} -> theta_s)."
    " replay_residual[step=c]: F(stored theta_c) - F(replayed theta_c) at a checkpoint c that ends a chunk (sparse "
    "checkpoints; zero elsewhere)."
)
IDENTITY = (
    "initial + data.sum() + weight_decay.sum() + momentum.sum() + residual.sum(step) == final, summing every "
    "dimension except query and output"
)


@dataclass(frozen=True)
class ResultMeta:
    """What the result layout needs besides the arrays (built by ``engine.scan.result_meta``)."""

    window: tuple[int, int]
    n_samples: int
    tensor_names: tuple[str, ...]
    tensor_shapes: tuple[tuple[int, ...], ...]
    optimizer: str
    n_queries: int
    n_outputs: int
    output_labels: tuple[Any, ...]
    output: str
    rule: str
    by: frozenset[str]
    method: str
    extra_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.n_queries * self.n_outputs

    @property
    def steps(self) -> np.ndarray:
        return np.arange(self.window[0] + 1, self.window[1] + 1)


@dataclass
class ChunkResult:
    """Numpy (float64; ``nodes`` / ``kinks`` int64) arrays of one chunk ``(lo, hi]``; layout: :func:`chunk_layout`."""

    lo: int
    hi: int
    arrays: dict[str, np.ndarray]
    u_out: dict[str, Any] | None = None  # U_{lo+1} (float64 tensors): the previous chunk's u_in in the reverse chain


def param_var(name: str) -> str:
    """Dataset variable of a tensor's element-wise scores: ``param_<name with '.' -> '__'>``."""
    return "param_" + name.replace(".", "__")


def chunk_layout(meta: ResultMeta) -> dict[str, tuple[str, ...]]:
    """Dimension names of every ChunkResult array (``qo`` = flattened query x output)."""
    by = meta.by
    opt = lambda key, dim: (dim,) if key in by else ()
    lay: dict[str, tuple[str, ...]] = {
        "data": (QO, *opt("sample", SAMPLE), *opt("step", STEP), *opt("tensor", TENSOR)),
        "weight_decay": (QO, *opt("step", STEP), *opt("tensor", TENSOR)),
        "momentum": (QO, *opt("tensor", TENSOR)),
        "movement": (QO, STEP, PART, *opt("tensor", TENSOR)),
        "quadrature_residual": (QO, STEP),
        "rounding_residual": (QO, STEP),
        "replay_residual": (QO, STEP),
        "delta": (QO, STEP),
        "nodes": (STEP,),
        "kinks": (STEP,),
        "f_start": (QO,),
        "f_end": (QO,),
    }
    if "param" in by:
        for name, shape in zip(meta.tensor_names, meta.tensor_shapes):
            lay[PARAM_PREFIX + name] = (QO, PART, *tensor_dims(name, len(shape)))
    return lay


def chunk_shapes(meta: ResultMeta, lo: int, hi: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays of chunk ``(lo, hi]`` (for ``dask.array.from_delayed``); dtypes: :func:`chunk_dtype`."""
    sizes = {QO: meta.n_rows, SAMPLE: meta.n_samples, STEP: hi - lo, TENSOR: len(meta.tensor_names), PART: len(PARTS)}
    for name, shape in zip(meta.tensor_names, meta.tensor_shapes):
        sizes.update(zip(tensor_dims(name, len(shape)), shape))
    return {k: tuple(sizes[d] for d in dims) for k, dims in chunk_layout(meta).items()}


def chunk_dtype(key: str) -> np.dtype:
    return np.dtype(np.int64) if key in ("nodes", "kinks") else np.dtype(np.float64)


def result_bytes(meta: ResultMeta, step_bins: int | None = None) -> int:
    """Bytes of the result Dataset's variables (float64 / int64) over the whole window, known before any task runs;
    with ``step_bins`` the step axis has that many entries. Coordinates (small) are not counted."""
    a, b = meta.window
    n_steps = b - a if step_bins is None else min(int(step_bins), b - a)
    shapes = chunk_shapes(meta, 0, n_steps)
    total = sum(math.prod(shape) * chunk_dtype(key).itemsize for key, shape in shapes.items())
    return total + math.prod(shapes["quadrature_residual"]) * 8  # ``residual``, built from the two residuals


def _is_dask(x: Any) -> bool:
    return hasattr(x, "dask") and hasattr(x, "chunks")


def combine(chunks: Sequence[ChunkResult | Mapping[str, Any]], meta: ResultMeta) -> dict[str, Any]:
    """Join chunk arrays (in window order) into whole-window arrays: step-dimensioned arrays are concatenated along
    ``step``, ``f_start`` comes from the first chunk, ``f_end`` from the last, everything else is summed.

    Works on numpy arrays and on dask arrays (e.g. ``da.from_delayed`` per chunk; the result stays lazy).
    """
    if not chunks:
        raise ValueError("combine() needs at least one chunk")
    arrs = [c.arrays if isinstance(c, ChunkResult) else c for c in chunks]
    out: dict[str, Any] = {}
    for key, dims in chunk_layout(meta).items():
        parts = [a[key] for a in arrs]
        if key == "f_start":
            out[key] = parts[0]
        elif key == "f_end":
            out[key] = parts[-1]
        elif STEP in dims:
            axis = dims.index(STEP)
            if len(parts) == 1:
                out[key] = parts[0]
            elif any(_is_dask(p) for p in parts):
                import dask.array as da

                out[key] = da.concatenate(parts, axis=axis)
            else:
                out[key] = np.concatenate(parts, axis=axis)
        else:
            out[key] = parts[0] if len(parts) == 1 else functools.reduce(operator.add, parts)
    return out


def _unflatten(arr: Any, dims: tuple[str, ...], meta: ResultMeta) -> tuple[Any, tuple[str, ...]]:
    if dims and dims[0] == QO:
        arr = arr.reshape((meta.n_queries, meta.n_outputs, *arr.shape[1:]))
        dims = (QUERY, OUTPUT, *dims[1:])
    return arr, dims


def assemble(problem: Any, meta: ResultMeta, arrays: Mapping[str, Any] | Sequence[ChunkResult]) -> xr.Dataset:
    """Build the result Dataset from whole-window arrays (numpy or dask; see :func:`combine`) or a list of chunks.

    Variables: ``data``, ``weight_decay``, ``momentum``, ``initial``, ``final``, ``residual``,
    ``quadrature_residual``, ``rounding_residual``, ``delta``, ``movement``, ``nodes``, ``kinks`` and, with
    ``"param"`` in ``by``, ``param_<tensor>`` (dims ``query, output, part, <tensor>.d0, ...``). With numpy inputs
    the ``max_*`` residual attrs are filled in; with dask inputs call :func:`finalize_attrs` after computing.
    ``problem`` is accepted for symmetry with the chunk functions (everything needed is in ``meta``).
    """
    del problem
    if not isinstance(arrays, Mapping):
        arrays = combine(list(arrays), meta)
    layout = chunk_layout(meta)
    data_vars: dict[str, tuple[tuple[str, ...], Any]] = {}
    for key, dims in layout.items():
        arr, dd = _unflatten(arrays[key], dims, meta)
        if key == "f_start":
            data_vars["initial"] = (dd, arr)
        elif key == "f_end":
            data_vars["final"] = (dd, arr)
        elif key.startswith(PARAM_PREFIX):
            data_vars[param_var(key[len(PARAM_PREFIX) :])] = (dd, arr)
        else:
            data_vars[key] = (dd, arr)
    q_dims, q_arr = data_vars["quadrature_residual"]
    data_vars["residual"] = (q_dims, q_arr + data_vars["rounding_residual"][1] + data_vars["replay_residual"][1])
    coords: dict[str, Any] = {
        QUERY: np.arange(meta.n_queries),
        OUTPUT: np.asarray(meta.output_labels),
        STEP: meta.steps,
        PART: list(PARTS),
    }
    if "sample" in meta.by:
        coords[SAMPLE] = np.arange(meta.n_samples)
    if "tensor" in meta.by:
        coords[TENSOR] = list(meta.tensor_names)
    a, b = meta.window
    attrs = {
        "window": [int(a), int(b)],
        "output": meta.output,
        "rule": meta.rule,
        "optimizer": meta.optimizer,
        "by": sorted(meta.by),
        "method": meta.method,
        "step_semantics": STEP_SEMANTICS,
        "identity": IDENTITY,
        **meta.extra_attrs,
    }
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    if not any(_is_dask(v.data) for v in ds.data_vars.values()):
        finalize_attrs(ds)
    return ds


def finalize_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Fill the residual summary attrs (in place; call after computing a lazy result):

    ``max_abs_residual`` = max over query/output of ``|residual.sum(step)|`` (the unexplained part of the change),
    ``max_quadrature_residual`` / ``max_rounding_residual`` / ``max_replay_residual`` = largest per-update absolute
    value, ``max_abs_change``
    = max ``|final - initial|`` (the scale to judge them against).
    """
    # skipna=False: xarray's sum skips NaN by default, which would report a NaN residual as 0
    ds.attrs["max_abs_residual"] = float(np.abs(np.asarray(ds["residual"].sum(STEP, skipna=False))).max(initial=0.0))
    ds.attrs["max_quadrature_residual"] = float(np.abs(np.asarray(ds["quadrature_residual"])).max(initial=0.0))
    ds.attrs["max_rounding_residual"] = float(np.abs(np.asarray(ds["rounding_residual"])).max(initial=0.0))
    if "replay_residual" in ds:  # results written before sparse checkpoints lack it
        ds.attrs["max_replay_residual"] = float(np.abs(np.asarray(ds["replay_residual"])).max(initial=0.0))
    ds.attrs["max_abs_change"] = float(np.abs(np.asarray(ds["final"] - ds["initial"])).max(initial=0.0))
    return ds


class NonFiniteResultError(FloatingPointError):
    """A computed result holds NaN or inf; ``.result`` is the Dataset (to inspect, not to use)."""

    def __init__(self, message: str, result: xr.Dataset) -> None:
        super().__init__(message)
        self.result = result


def _first_index(bad: xr.DataArray, dim: str) -> int | None:
    """First index along ``dim`` where ``bad`` (a boolean array) is true anywhere else."""
    if dim not in bad.dims:
        return None
    other = [d for d in bad.dims if d != dim]
    hits = np.flatnonzero(np.asarray(bad.any(other) if other else bad))
    return int(bad[dim].values[hits[0]]) if len(hits) else None


def _all_finite(x: Any) -> Any:
    """Whether every element of ``x`` is finite (lazy for a dask array). For numpy, a finite sum proves it (NaN and
    inf propagate through a sum): one read of ``x``, cheaper than ``isfinite(x).all()`` and without its temporary
    of ``x.size`` booleans; only a sum that overflows or is not finite needs the element-wise check."""
    if _is_dask(x):
        return np.isfinite(x).all()
    with np.errstate(all="ignore"):  # overflow and inf - inf only send it to the element-wise check
        total = np.add.reduce(x, axis=None)
    return bool(np.isfinite(total)) or bool(np.isfinite(x).all())


def check_finite(ds: xr.Dataset, where: str | None = None) -> xr.Dataset:
    """Return ``ds`` if every float variable is finite; else raise :class:`NonFiniteResultError` naming the
    variables and the first query / step holding NaN or inf.

    A NaN anywhere makes the decomposition meaningless, and sums that skip NaN (xarray's default) would turn it into
    plausible totals, so a non-finite result is an error, not a warning. Lazy (dask) variables are checked in one
    pass that reads each chunk once.
    """
    names = [n for n, v in ds.data_vars.items() if v.dtype.kind in "fc"]
    flags = [_all_finite(ds[n].data) for n in names]
    if any(_is_dask(f) for f in flags):
        import dask

        flags = list(dask.compute(*flags))
    bad_names = [n for n, ok in zip(names, flags) if not bool(ok)]
    if not bad_names:
        return ds
    name = bad_names[0]
    bad = ~np.isfinite(ds[name])
    q, s = _first_index(bad, QUERY), _first_index(bad, STEP)
    at = ", ".join(p for p in (f"query {q}" if q is not None else "", f"step {s}" if s is not None else "") if p)
    stored = f" The result was written to {where}; inspect it there." if where else (
        " The Dataset is attached to this error as .result for inspection.")
    raise NonFiniteResultError(
        f"the attribution result holds NaN/inf in {bad_names} (first in {name!r}{' at ' + at if at else ''}), so "
        "its totals would be meaningless. Likely causes: NaN/inf in the query inputs; a damaged store (run "
        f"`explaind verify {ds.attrs.get('run', '<run>')}`); or a model whose outputs overflow on these inputs."
        f"{stored}",
        ds,
    )
