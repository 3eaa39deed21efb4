"""Writing one chunk of steps and committing it: the part every writer (thread or process) shares.

Torch-free on purpose: the writer process imports only this, ``schema`` and ``storage`` (zarr and numpy), so it
starts in a fraction of the time an interpreter that imports torch needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from . import schema

MAX_NONFINITE = 100  # steps listed in the nonfinite attribute at most


class WriterError(RuntimeError):
    """The background writer failed; the message names the cause. Committed data is intact."""


def to_numpy(value: Any) -> np.ndarray:
    """A CPU tensor (without copying) or anything array-like, as numpy."""
    if hasattr(value, "detach"):  # a torch.Tensor, recognised without importing torch
        return value.detach().numpy()
    return np.asarray(value)


def batch_block(batches: Sequence[np.ndarray | None]) -> np.ndarray:
    """The rows' sample indices as one ``(rows, width)`` int64 block padded with ``BATCH_PAD``."""
    width = max([len(b) for b in batches if b is not None] + [1])
    block = np.full((len(batches), width), schema.BATCH_PAD, dtype=np.int64)
    for j, b in enumerate(batches):
        if b is not None:
            block[j, : len(b)] = b
    return block


def write_chunk(
    root: zarr.Group,
    arrays: dict[str, zarr.Array],
    batch_array: zarr.Array,
    i0: int,
    blocks: dict[str, np.ndarray],
    batch: np.ndarray,
    attrs: dict[str, Any],
    nonfinite: list[int],
    *,
    check_finite: bool = True,
    partial: dict[str, list[tuple[int, np.ndarray]]] | None = None,
) -> int:
    """Write steps ``i0 .. i0 + len(batch) - 1`` (``blocks[path]`` holds each array's rows, ``batch`` the sample
    indices from :func:`batch_block`), then commit them: only the last write, of the root attributes ``attrs`` plus
    the nonfinite list and ``committed_updates``, makes them visible. ``nonfinite`` is updated in place. An array
    missing from ``blocks`` gets only the ``(step, value)`` rows ``partial`` lists for it (sparse checkpoints), and
    is grown to cover the chunk all the same. Returns the raw bytes written."""
    n = i0 + len(batch)
    jobs: list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]] = []
    nbytes = 0
    for path, arr in arrays.items():
        if path in blocks:
            parts = [(i0, blocks[path])]
        else:
            parts = [(i, np.asarray(v)[None]) for i, v in (partial or {}).get(path, [])]
        for start, block in parts:
            jobs.append((arr, (slice(start, start + len(block)),), block))
            nbytes += block.nbytes
            if check_finite and block.dtype.kind == "f" and path.startswith(schema.PARAMS + "/"):
                bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
                for j in np.flatnonzero(bad):
                    if start + int(j) not in nonfinite and len(nonfinite) < MAX_NONFINITE:
                        nonfinite.append(start + int(j))
    width = max(batch.shape[1], batch_array.shape[1])
    if batch_array.shape[1] < width:
        batch_array.resize((batch_array.shape[0], width))
    if batch.shape[1] < width:  # an earlier chunk had larger batches: pad to the array's width
        batch = np.concatenate(
            [batch, np.full((len(batch), width - batch.shape[1]), schema.BATCH_PAD, dtype=np.int64)], axis=1
        )
    jobs.append((batch_array, (slice(i0, n), slice(0, width)), batch))
    # All arrays at once: zarr's per-call synchronisation dominated when arrays were written one by one.
    sync(_grow_and_write(jobs, n, list(arrays.values())))
    attrs = dict(attrs)
    attrs[schema.ATTR_NONFINITE] = sorted(nonfinite)
    attrs[schema.ATTR_COMMITTED] = n - 1
    # The commit point: only now do readers see the chunk's updates.
    root.attrs.update(attrs)
    return nbytes


async def _grow_and_write(
    jobs: list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]], n: int, arrays: Sequence[zarr.Array] = ()
) -> None:
    grow = list({id(a): a for a in [*(a for a, _, _ in jobs), *arrays] if a.shape[0] < n}.values())
    await asyncio.gather(
        *(a.async_array.resize((n, *a.shape[1:]), delete_outside_chunks=False) for a in grow)
    )
    await asyncio.gather(*(a.async_array.setitem(sel, block) for a, sel, block in jobs))
