"""Assembling a large result in this process (the synchronous scheduler): no second copy of the result."""

from __future__ import annotations

import tracemalloc

import dask
import dask.array as da
import numpy as np
import xarray as xr

from engine.cluster.handoff import compute_inline
from engine.settings import override


def _block(i: int, rows: int, cols: int) -> np.ndarray:
    return np.full((rows, cols), float(i))


def test_blocks_are_copied_into_one_array_without_a_joined_copy():
    n, rows, cols = 6, 4, 250_000  # six 8 MB blocks, a 48 MB result
    parts = [da.from_delayed(dask.delayed(_block)(i, rows, cols), (rows, cols), dtype=float) for i in range(n)]
    ds = xr.Dataset({"data": (("a", "b"), da.concatenate(parts, axis=0))})
    size = n * rows * cols * 8
    with override(handoff_min_bytes=1 << 20):
        tracemalloc.start()
        try:
            out = compute_inline(ds, lambda colls: list(dask.compute(*colls, scheduler="synchronous")))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    values = out["data"].values
    np.testing.assert_array_equal(values[::rows, 0], np.arange(n, dtype=float))
    # joining the finished blocks (np.block) held them all plus the joined copy: 2x the result
    assert peak < 1.5 * size, f"peak {peak / 2**20:.0f} MB for a {size / 2**20:.0f} MB result"


def test_sync_chain_writes_scores_in_place_same_result(adamw_store):
    """Several chunks of the reverse chain write their ``data`` block straight into the whole array (no blocks):
    the result equals the one-chunk run's, and no chunk's block is left behind as a separate array."""
    from engine.api import attribute

    kw = dict(queries="val[:4]", output="log_softmax", by=("sample", "step", "tensor"), client="sync", progress=False)
    one = attribute(adamw_store, **kw)
    with override(block_bytes=1, handoff_min_bytes=1):  # one update per chunk: ten chain tasks
        many = attribute(adamw_store, **kw)
    assert many.attrs.get("scan", "").startswith("reverse chain")
    np.testing.assert_allclose(many["data"].values, one["data"].values, rtol=0, atol=1e-12)
    assert many["data"].values.flags.c_contiguous
