"""``top_k``: the largest and smallest contributors per query and output, streamed over chunks.

A zarr-backed result is read chunk by chunk: other axes are summed lazily, then ``dask.array.argtopk`` / ``topk``
keep only ``k`` candidates per chunk and merge them in a tree, so the full query x sample matrix is never in memory
at once (output chunks hold one query each; see ``engine.cluster.graph.output_chunks``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from engine.result import NonFiniteResultError
from explaind_store import storage
from explaind_store.schema import OUTPUT, QUERY

CHUNK = 65536  # along-axis chunk for in-memory inputs (keeps the same streaming code path)


def open_result(result_or_path: Any) -> xr.Dataset:
    """A result Dataset as given, or opened lazily from a Zarr path."""
    if isinstance(result_or_path, xr.Dataset):
        return result_or_path
    if isinstance(result_or_path, (str, os.PathLike)):
        p = storage.location(result_or_path)  # a directory or an object-store URL
        if not storage.exists(p):
            raise ValueError(f"no attribution result at {p}")
        store = storage.open_store(p, read_only=True)
        with contextlib.suppress(Exception):  # no consolidated metadata (written by other tools): read it plainly
            return xr.open_zarr(store, consolidated=True)
        try:
            return xr.open_zarr(store, consolidated=False)
        except Exception as exc:  # noqa: BLE001 - zarr/xarray raise several types for "not a dataset"
            raise ValueError(f"{p} is not an attribution result readable by xarray.open_zarr: {exc}") from None
    raise TypeError(f"expected an xarray.Dataset or a path, not {type(result_or_path).__name__}")


def top_k(result_or_path: Any, k: int, along: str = "sample", part: str = "data") -> xr.Dataset:
    """Top and bottom ``k`` entries of ``part`` along ``along`` for every query and output.

    Axes other than ``query``, ``output`` and ``along`` (e.g. ``step`` or ``tensor``) are summed first. Returns a
    Dataset with dims ``(query, output, rank)`` and variables ``top_index`` / ``top_value`` (largest first) and
    ``bottom_index`` / ``bottom_value`` (smallest first); indices are positions along ``along``, and
    ``top_label`` / ``bottom_label`` give its coordinate values (sample ids, step numbers, tensor names) when it
    has one.
    """
    ds = open_result(result_or_path)
    if part not in ds.data_vars:
        raise KeyError(f"the result has no variable {part!r}; it has {sorted(ds.data_vars)}")
    var = ds[part]
    if along not in var.dims:
        raise ValueError(
            f"{part!r} has no {along!r} axis (its dims are {var.dims}); attribute with by=... including {along!r}"
        )
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    other = [d for d in var.dims if d not in (QUERY, OUTPUT, along)]
    if other:
        var = var.sum(other, skipna=False)  # a NaN must surface, not be skipped
    lead = [d for d in (QUERY, OUTPUT) if d in var.dims]
    var = var.transpose(*lead, along)
    n = var.sizes[along]
    k = int(min(k, n))
    arr = var.data
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr), chunks=(*(1 if d == QUERY else -1 for d in lead), CHUNK))
    top_i, bot_i = da.argtopk(arr, k, axis=-1), da.argtopk(arr, -k, axis=-1)
    top_v, bot_v = da.topk(arr, k, axis=-1), da.topk(arr, -k, axis=-1)
    # one pass over the data for all four (they share the read and the sums); plain numpy work: threads are fine
    ti, bi, tv, bv, finite = dask.compute(top_i, bot_i, top_v, bot_v, da.isfinite(arr).all(), scheduler="threads")
    if not finite:
        raise NonFiniteResultError(
            f"{part!r} holds NaN or inf, so its top and bottom entries are meaningless; the result is damaged or "
            "came from a damaged store (engine.attribute refuses to return such results): recompute it",
            ds,
        )
    dims = (*lead, "rank")
    coords: dict[str, Any] = {d: var[d].values for d in lead if d in var.coords}
    coords["rank"] = np.arange(k)
    out = xr.Dataset(
        {
            "top_index": (dims, ti.astype(np.int64)),
            "top_value": (dims, tv),
            "bottom_index": (dims, bi.astype(np.int64)),
            "bottom_value": (dims, bv),
        },
        coords=coords,
        attrs={"part": part, "along": along, "k": k, "summed_over": other},
    )
    if along in var.coords:
        labels = np.asarray(var[along].values)
        out["top_label"] = (dims, labels[ti])
        out["bottom_label"] = (dims, labels[bi])
    return out


__all__ = ["open_result", "top_k"]
