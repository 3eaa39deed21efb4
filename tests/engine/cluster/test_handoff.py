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


def test_sync_chain_takes_each_batch_gradient_once(adamw_store, monkeypatch):
    """The reverse chain's momentum fold and a chunk's pass 2 both rebuild the chunk's momentum from its batch
    gradients; under the synchronous scheduler the fold keeps them for the pass 2, which then takes none again
    (bit for bit the same scores), unless they do not fit ``light_bytes``."""
    from engine.api import attribute
    from engine.scan import forward

    taken = [0]
    real = forward.batch_mean_grads

    def counting(model, params, xs, *args, **kwargs):
        taken[0] += len(xs)
        return real(model, params, xs, *args, **kwargs)

    monkeypatch.setattr(forward, "batch_mean_grads", counting)
    kw = dict(queries="val[:2]", output="log_softmax", by=("sample", "step", "tensor"), client="sync", progress=False)
    with override(block_bytes=1, handoff_min_bytes=1):  # one update per chunk: ten chain tasks
        kept = attribute(adamw_store, **kw)
    assert kept.attrs["n_chunks"] == 10
    assert taken[0] == 10, f"{taken[0]} batch gradients taken for 10 updates"
    taken[0] = 0
    with override(block_bytes=1, handoff_min_bytes=1, light_bytes=0):  # no room: pass 2 takes them again
        again = attribute(adamw_store, **kw)
    assert taken[0] == 19  # the folds of chunks 0..8, then every chunk's pass 2
    for name in kept.data_vars:
        np.testing.assert_array_equal(kept[name].values, again[name].values, err_msg=name)
