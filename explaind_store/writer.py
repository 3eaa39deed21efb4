"""Background writer: rows of one step are staged by the training thread and handed over a chunk at a time through a
bounded queue to a thread that writes them and only then advances the committed update count (so a crash never
exposes a half-written step).

The training thread does as little as possible per step: one copy per array group (params, each optimizer state)
instead of one per tensor, straight into a reusable chunk buffer (:class:`ChunkBuffer`) that the writer encodes
as it lies, no queue operation except at chunk ends, and the JSON encoding of the commit attributes deferred to the
writer, because every microsecond here is paid by the training loop (docs/benchmarks.md, "Measurements behind
choices in the code" and "Recording overhead (issue 14)").
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from . import chunkio, schema
from .chunkio import BufferRow, ChunkBuffer, WriterError  # noqa: F401 - defined there for both writers
from .chunkio import to_numpy as _to_numpy


@dataclass
class Row:
    """Everything recorded for one step index (arrays keyed by their path in the store)."""

    index: int
    arrays: dict[str, Any]  # path -> np.ndarray | torch.Tensor (CPU, maybe pinned with a pending copy)
    batch: np.ndarray | None = None  # int64 sample indices (per-update rows only)
    ready: Any = None  # torch.cuda.Event to wait for before reading device copies
    commit_attrs: dict[str, Any] = field(default_factory=dict)  # root attributes valid once this row is committed
    # pack name -> 1-D tensor laid out by ChunkWriter.packs, or the BufferRow the row was copied into
    packed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    """Where one array's values sit in a packed row: ``flat[start:stop].reshape(shape)``."""

    path: str
    start: int
    stop: int
    shape: tuple[int, ...]


WRITER_KINDS = ("thread", "process")
# The writer process did not measure better than the thread on the 2-core development machine (docs/benchmarks.md,
# "Recording overhead (issue 14)"), so the thread stays the default; EXPLAIND_WRITER overrides it.
DEFAULT_WRITER = "thread"
WRITER_ENV = "EXPLAIND_WRITER"

_FLUSH = object()
_STOP = object()


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
        self._packs = packs or {}
        self.encode_attrs = encode_attrs
        # Queue holds at most `queue_size` chunks of rows: training waits instead of growing memory without bound.
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(2, queue_size))
        # Chunk buffers (ChunkBuffer): one being filled, the queued chunks' and the one being written, at most; the
        # writer returns each to `_free` once its rows are on disk.
        self._free: queue.Queue[ChunkBuffer] = queue.Queue()
        self._buffers_made = 0
        self._max_buffers = max(2, queue_size) + 2
        self._current: ChunkBuffer | None = None
        self._staged: list[Row] = []  # rows of the current chunk, still with the training thread
        self._buffer: list[Row] = []
        self._error: BaseException | None = None
        self._flushed = threading.Event()
        self.bytes_written = 0
        self.busy_seconds = 0.0  # time the writer thread spent encoding and writing (for throughput figures)
        self.nonfinite: list[int] = list(root.attrs.get(schema.ATTR_NONFINITE, []))
        self._thread = threading.Thread(target=self._run, name="explaind-writer", daemon=True)
        self._thread.start()

    @property
    def packs(self) -> dict[str, list[Segment]]:
        """pack name -> where each array's values sit in a packed row."""
        return self._packs

    @packs.setter
    def packs(self, packs: dict[str, list[Segment]]) -> None:
        # a new layout (parameters that became constants): buffers laid out for the old one are dropped. Called
        # while the writer is idle (after flush), so none of them holds rows still to write.
        self._packs = packs
        self._current = None
        self._free = queue.Queue()
        self._buffers_made = 0

    # --- producer side (training thread) ---------------------------------------------------------------------
    def put(self, row: Row) -> None:
        self.raise_if_failed()
        self._staged.append(row)
        if (row.index + 1) % self.k == 0:
            self._hand_over()

    def _hand_over(self) -> None:
        self._current = None  # the writer owns the buffer of these rows now: the next row starts another
        if self._staged:
            rows, self._staged = self._staged, []
            self._queue.put(rows)

    def row_buffer(self, make: Callable[[], ChunkBuffer], nbytes: int = 0) -> ChunkBuffer:
        """The chunk buffer the next row is written into (row ``index % chunk_updates``): the current chunk's, else
        a free one, else a new one from ``make()`` while fewer than the bound exist, else the first the writer
        frees (the training thread waits then, as it waits on a full queue: memory stays bounded). ``nbytes``
        (the memory ``make`` lays its blocks in) is for the writer process's shared memory; unused here."""
        if self._current is None:
            try:
                self._current = self._free.get_nowait()
            except queue.Empty:
                if self._buffers_made < self._max_buffers:
                    self._buffers_made += 1
                    self._current = make()
                else:
                    while self._current is None:
                        self.raise_if_failed()
                        if not self._thread.is_alive():
                            raise WriterError("the writer thread stopped; no chunk buffer will be freed")
                        try:
                            self._current = self._free.get(timeout=0.1)
                        except queue.Empty:
                            pass
        return self._current

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
                    chunkio.trim([*self.arrays.values(), self.batch_array],
                                 int(self.root.attrs[schema.ATTR_COMMITTED]) + 1)
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
        buffers = {id(v.buffer): v.buffer for r in rows for v in r.packed.values() if isinstance(v, BufferRow)}
        blocks = self._unpacked(rows)
        # Sparse checkpoints: rows between checkpoints carry no parameters or state; those arrays get the rows
        # that have them, one step at a time (their chunks hold one step).
        partial: dict[str, list[tuple[int, np.ndarray]]] = {}
        for path in self.arrays:
            if path in blocks:
                continue
            have = [r for r in rows if path in r.arrays]
            if len(have) == len(rows):
                blocks[path] = np.stack([_to_numpy(r.arrays[path]) for r in rows])
            else:
                partial[path] = [(r.index, _to_numpy(r.arrays[path])) for r in have]
        attrs = dict(rows[-1].commit_attrs)
        if self.encode_attrs is not None:
            attrs = self.encode_attrs(attrs)
        self.bytes_written += chunkio.write_chunk(
            self.root, self.arrays, self.batch_array, i0, blocks, chunkio.batch_block([r.batch for r in rows]),
            attrs, self.nonfinite, check_finite=self.check_finite, partial=partial,
        )
        for b in buffers.values():  # written: the training thread may fill them again
            self._free.put(b)
        self.busy_seconds += time.perf_counter() - t0
        if self.on_commit is not None:
            self.on_commit(i1)

    def _unpacked(self, rows: list[Row]) -> dict[str, np.ndarray]:
        """path -> ``(len(rows), *shape)`` block, from the rows' packed copies: one stack per pack for the chunk."""
        out: dict[str, np.ndarray] = {}
        for name, segments in self.packs.items():
            first = rows[0].packed.get(name)
            if isinstance(first, BufferRow) and all(
                isinstance(v, BufferRow) and v.buffer is first.buffer and v.j == first.j + i
                for i, v in enumerate(r.packed.get(name) for r in rows)
            ):  # consecutive rows of one chunk buffer: its blocks are the arrays' blocks
                for seg in segments:
                    out[seg.path] = first.buffer.blocks[seg.path][first.j : first.j + len(rows)]
                continue
            if not all(name in r.packed for r in rows) or any(isinstance(r.packed[name], BufferRow) for r in rows):
                # some rows were copied per tensor (or into different buffers): unpack row by row
                for r in rows:
                    if name in r.packed:
                        v = r.packed.pop(name)
                        if isinstance(v, BufferRow):
                            r.arrays.update({seg.path: v.buffer.blocks[seg.path][v.j] for seg in segments})
                            continue
                        one = _to_numpy(v)
                        r.arrays.update({seg.path: one[seg.start : seg.stop].reshape(seg.shape) for seg in segments})
                continue
            flat = np.stack([_to_numpy(r.packed[name]) for r in rows])
            for seg in segments:
                out[seg.path] = flat[:, seg.start : seg.stop].reshape(len(rows), *seg.shape)
        return out


def writer_kind(kind: str | None) -> str:
    """The writer to build: ``kind`` if given, else ``$EXPLAIND_WRITER``, else :data:`DEFAULT_WRITER`; refused
    (before anything is written) if it is not one of :data:`WRITER_KINDS`."""
    chosen = kind or os.environ.get(WRITER_ENV) or DEFAULT_WRITER
    if chosen not in WRITER_KINDS:
        source = "writer=" if kind else f"${WRITER_ENV}="
        raise ValueError(
            f"{source}{chosen!r} is not a writer kind; use 'process' (encode and write in a separate process, "
            "off the training process's GIL) or 'thread' (a background thread of the training process)."
        )
    return chosen


def make_writer(
    kind: str,
    root: zarr.Group,
    arrays: dict[str, zarr.Array],
    batch_array: zarr.Array,
    chunk_updates: int,
    *,
    lock_fd: int | None = None,
    **kwargs: Any,
) -> Any:
    """A :class:`ChunkWriter` or a :class:`~explaind_store.writer_process.ProcessChunkWriter` (same interface).
    ``lock_fd`` (the store's lock) is held by a writer process too, so the store stays locked while it writes. A
    store that is not a local directory gets the thread writer (another process could not open it)."""
    from .writer_process import ProcessChunkWriter, store_dir

    if kind == "process" and store_dir(root) is not None:
        return ProcessChunkWriter(root, arrays, batch_array, chunk_updates, lock_fd=lock_fd, **kwargs)
    return ChunkWriter(root, arrays, batch_array, chunk_updates, **kwargs)
