"""Background writer: rows of one step are staged by the training thread and handed over a chunk at a time through a
bounded queue to a thread that writes them and only then advances the committed update count (so a crash never
exposes a half-written step).

The training thread does as little as possible per step: one packed copy per array group (params, each optimizer
state) instead of one per tensor, no queue operation except at chunk ends, and the JSON encoding of the commit
attributes deferred to the writer, because every microsecond here is paid by the training loop
(docs/benchmarks.md, "Measurements behind choices in the code").
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from . import schema


class WriterError(RuntimeError):
    """The background writer failed; the message names the cause. Committed data is intact."""


@dataclass
class Row:
    """Everything recorded for one step index (arrays keyed by their path in the store)."""

    index: int
    arrays: dict[str, Any]  # path -> np.ndarray | torch.Tensor (CPU, maybe pinned with a pending copy)
    batch: np.ndarray | None = None  # int64 sample indices (per-update rows only)
    ready: Any = None  # torch.cuda.Event to wait for before reading device copies
    commit_attrs: dict[str, Any] = field(default_factory=dict)  # root attributes valid once this row is committed
    packed: dict[str, Any] = field(default_factory=dict)  # pack name -> 1-D tensor laid out by ChunkWriter.packs


@dataclass(frozen=True)
class Segment:
    """Where one array's values sit in a packed row: ``flat[start:stop].reshape(shape)``."""

    path: str
    start: int
    stop: int
    shape: tuple[int, ...]


_FLUSH = object()
_STOP = object()


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    return np.asarray(value)


class ChunkWriter:
    """Single writer of a run's step-indexed arrays.

    Rows are buffered until a chunk of ``chunk_updates`` steps is complete, then written region by region, so
    chunks are written whole (appending step by step into a multi-step chunk rewrites it every time).
    """

    def __init__(
        self,
        root: zarr.Group,
        arrays: dict[str, zarr.Array],
        batch_array: zarr.Array,
        chunk_updates: int,
        *,
        queue_size: int = 4,
        on_commit: Callable[[int], None] | None = None,
        check_finite: bool = True,
        packs: dict[str, list[Segment]] | None = None,
        encode_attrs: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.root = root
        self.arrays = arrays
        self.batch_array = batch_array
        self.k = chunk_updates
        self.on_commit = on_commit
        self.check_finite = check_finite
        self.packs = packs or {}
        self.encode_attrs = encode_attrs
        # Queue holds at most `queue_size` chunks of rows: training waits instead of growing memory without bound.
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(2, queue_size))
        self._staged: list[Row] = []  # rows of the current chunk, still with the training thread
        self._buffer: list[Row] = []
        self._error: BaseException | None = None
        self._flushed = threading.Event()
        self.bytes_written = 0
        self.busy_seconds = 0.0  # time the writer thread spent encoding and writing (for throughput figures)
        self.nonfinite: list[int] = list(root.attrs.get(schema.ATTR_NONFINITE, []))
        self._thread = threading.Thread(target=self._run, name="explaind-writer", daemon=True)
        self._thread.start()

    # --- producer side (training thread) ---------------------------------------------------------------------
    def put(self, row: Row) -> None:
        self.raise_if_failed()
        self._staged.append(row)
        if (row.index + 1) % self.k == 0:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._staged:
            rows, self._staged = self._staged, []
            self._queue.put(rows)

    def flush(self) -> None:
        """Block until everything queued so far is written and committed."""
        self.raise_if_failed()
        self._hand_over()
        self._flushed.clear()
        self._queue.put(_FLUSH)
        while not self._flushed.wait(0.1):
            if not self._thread.is_alive():
                break
        self.raise_if_failed()

    def close(self) -> None:
        if self._thread.is_alive():
            if self._error is None:
                self._hand_over()
            self._queue.put(_STOP)
            self._thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriterError(
                f"writing the trajectory failed: {self._error!r}. Updates up to committed_updates="
                f"{self.root.attrs.get(schema.ATTR_COMMITTED)} are safe on disk; resume with resume=True (`--resume` "
                "on the command line)."
            ) from self._error

    # --- consumer side (writer thread) -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    self._write_buffer()
                    return
                if item is _FLUSH:
                    self._write_buffer()
                    self._flushed.set()
                    continue
                self._buffer.extend(item)
                if (item[-1].index + 1) % self.k == 0:
                    self._write_buffer()
        except BaseException as exc:  # noqa: BLE001 - reported to the training thread
            self._error = exc
            self._flushed.set()

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        t0 = time.perf_counter()
        i0, i1 = rows[0].index, rows[-1].index
        if [r.index for r in rows] != list(range(i0, i1 + 1)):
            raise WriterError(f"steps {[r.index for r in rows]} are not consecutive")
        for r in rows:
            if r.ready is not None:
                r.ready.synchronize()
        n = i1 + 1
        blocks = self._unpacked(rows)
        jobs: list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]] = []
        grow: list[zarr.Array] = []
        for path, arr in self.arrays.items():
            # sparse checkpoints: rows between checkpoints carry no parameters or state, and write no chunk for them
            have = rows if path in blocks or all(path in r.arrays for r in rows) else [
                r for r in rows if path in r.arrays]
            if not have:
                grow.append(arr)
                continue
            if len(have) == len(rows):
                parts = [(slice(i0, n), rows, blocks[path] if path in blocks else
                          np.stack([_to_numpy(r.arrays[path]) for r in rows]))]
            else:
                grow.append(arr)
                parts = [(slice(r.index, r.index + 1), [r], _to_numpy(r.arrays[path])[None]) for r in have]
            for sel, part_rows, block in parts:
                jobs.append((arr, (sel,), block))
                self.bytes_written += block.nbytes
                if self.check_finite and block.dtype.kind == "f" and path.startswith(schema.PARAMS + "/"):
                    bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
                    for r, b in zip(part_rows, bad):
                        if b and r.index not in self.nonfinite and len(self.nonfinite) < 100:
                            self.nonfinite.append(r.index)
        jobs.append(self._batch_job(rows, i0, n))
        # All arrays at once: zarr's per-call synchronisation dominated when arrays were written one by one.
        sync(_grow_and_write(jobs, n, grow))
        attrs = dict(rows[-1].commit_attrs)
        if self.encode_attrs is not None:
            attrs = self.encode_attrs(attrs)
        attrs[schema.ATTR_NONFINITE] = sorted(self.nonfinite)
        attrs[schema.ATTR_COMMITTED] = i1
        # The commit point: only now do readers see updates i0..i1.
        self.root.attrs.update(attrs)
        self.busy_seconds += time.perf_counter() - t0
        if self.on_commit is not None:
            self.on_commit(i1)

    def _unpacked(self, rows: list[Row]) -> dict[str, np.ndarray]:
        """path -> ``(len(rows), *shape)`` block, from the rows' packed copies: one stack per pack for the chunk."""
        out: dict[str, np.ndarray] = {}
        for name, segments in self.packs.items():
            if not all(name in r.packed for r in rows):  # some rows were copied per tensor: unpack row by row
                for r in rows:
                    if name in r.packed:
                        one = _to_numpy(r.packed.pop(name))
                        r.arrays.update({seg.path: one[seg.start : seg.stop].reshape(seg.shape) for seg in segments})
                continue
            flat = np.stack([_to_numpy(r.packed[name]) for r in rows])
            for seg in segments:
                out[seg.path] = flat[:, seg.start : seg.stop].reshape(len(rows), *seg.shape)
        return out

    def _batch_job(self, rows: list[Row], i0: int, n: int) -> tuple[zarr.Array, tuple[slice, ...], np.ndarray]:
        arr = self.batch_array
        width = max([len(r.batch) for r in rows if r.batch is not None] + [arr.shape[1], 1])
        if arr.shape[1] < width:
            arr.resize((arr.shape[0], width))
        block = np.full((len(rows), width), schema.BATCH_PAD, dtype=np.int64)
        for j, r in enumerate(rows):
            if r.batch is not None:
                block[j, : len(r.batch)] = r.batch
        return arr, (slice(i0, n), slice(0, width)), block


async def _grow_and_write(
    jobs: list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]], n: int, also: list[zarr.Array] = ()
) -> None:
    grow = list({id(a): a for a in [*(a for a, _, _ in jobs), *also] if a.shape[0] < n}.values())
    await asyncio.gather(
        *(a.async_array.resize((n, *a.shape[1:]), delete_outside_chunks=False) for a in grow)
    )
    await asyncio.gather(*(a.async_array.setitem(sel, block) for a, sel, block in jobs))
