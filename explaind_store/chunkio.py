"""Writing one chunk of steps and committing it: the part every writer (thread or process) shares.

Torch-free on purpose: the writer process imports only this, ``schema`` and ``storage`` (zarr and numpy), so it
starts in a fraction of the time an interpreter that imports torch needs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.core.sync import sync
from zarr.storage import LocalStore

from . import schema

MAX_NONFINITE = 100  # steps listed in the nonfinite attribute at most
# Arrays are grown this many chunks of steps ahead: each resize rewrites an array's metadata document, which cost
# about as much writer time per chunk as the chunk's data did for small runs. Readers never look past
# committed_updates, and the writer trims the arrays to it when it stops (docs/format.md, crash safety).
GROW_AHEAD_CHUNKS = 8
_PARTIAL_IDS = itertools.count()


class WriterError(RuntimeError):
    """The background writer failed; the message names the cause. Committed data is intact."""


@dataclass(eq=False)
class ChunkBuffer:
    """Preallocated rows of one chunk for every packed group, reused from chunk to chunk: ``blocks[path]`` is a
    C-contiguous ``(chunk_updates, *shape)`` array, so the writer encodes ``blocks[path][j0:j1]`` as it lies (no
    stacking of rows, no copy per array, no fresh memory per update). ``fill`` is what the training thread needs
    to write row ``j`` (its tensor views of the same memory); the writer never looks at it."""

    blocks: dict[str, np.ndarray]
    fill: Any = None
    offsets: dict[str, int] = field(default_factory=dict)  # where each block starts in shared memory (process writer)


@dataclass(frozen=True)
class BufferRow:
    """``Row.packed`` entry of a row written in place: row ``j`` of ``buffer``'s blocks."""

    buffer: ChunkBuffer
    j: int


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
    grow = [a for a in {id(a): a for a in [*(a for a, _, _ in jobs), *arrays.values()]}.values() if a.shape[0] < n]
    if grow:
        sync(_grow(grow, n + (GROW_AHEAD_CHUNKS - 1) * batch_array.chunks[0]))
    # Whole chunks are encoded and stored here, in the writer's thread; the rest (a chunk shared with steps
    # written earlier) goes through zarr, all arrays at once.
    rest = [job for job in jobs if not _write_whole_chunks(*job)]
    if rest:
        sync(_write(rest))
    attrs = dict(attrs)
    attrs[schema.ATTR_NONFINITE] = sorted(nonfinite)
    attrs[schema.ATTR_COMMITTED] = n - 1
    # The commit point: only now do readers see the chunk's updates.
    root.attrs.update(attrs)
    return nbytes


def trim(arrays: Sequence[zarr.Array], n: int) -> None:
    """Shrink arrays grown ahead (:data:`GROW_AHEAD_CHUNKS`) back to ``n`` steps, the committed ones, when the
    writer stops; the chunks past ``n`` were never written."""
    long = [a for a in arrays if a.shape[0] > n]
    if long:
        sync(_grow(long, n))


async def _grow(arrays: Sequence[zarr.Array], n: int) -> None:
    await asyncio.gather(*(a.async_array.resize((n, *a.shape[1:]), delete_outside_chunks=False) for a in arrays))


async def _write(jobs: list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]]) -> None:
    await asyncio.gather(*(a.async_array.setitem(sel, block) for a, sel, block in jobs))


def _encoding_plan(a: Any) -> tuple[Any, ...] | None:
    """What encoding a chunk of the async array ``a`` needs (its codecs, the chunk spec each codec sees, whether the
    last is the CRC32C codec, the store directory), or None when its chunks cannot be written directly (not a local
    store, not zarr's own codec pipeline). Cached per metadata object: it changes only when the array does."""
    meta, config = a.metadata, a.config
    hit = _PLANS.get(id(meta))
    if hit is not None and hit[0] is meta and hit[1] is config:
        return hit[2]
    pipe, store = a.codec_pipeline, a.store_path.store
    codecs = (*getattr(pipe, "array_array_codecs", ()), getattr(pipe, "array_bytes_codec", None),
              *getattr(pipe, "bytes_bytes_codecs", ()))
    plan = None
    if isinstance(pipe, BatchedCodecPipeline) and isinstance(store, LocalStore) and all(
        hasattr(c, "_encode_sync") for c in codecs
    ):
        crc = isinstance(codecs[-1], Crc32cCodec)
        if crc:
            codecs = codecs[:-1]
        specs = [meta.get_chunk_spec((0,) * len(a.shape), config, default_buffer_prototype())]
        for codec in codecs[:-1]:
            specs.append(codec.resolve_metadata(specs[-1]))
        plan = (tuple(zip(codecs, specs)), crc, Path(store.root), a.store_path.path)
    if len(_PLANS) > 4096:  # arrays of finished recorders
        _PLANS.clear()
    _PLANS[id(meta)] = (meta, config, plan)  # holding `meta` keeps its id from being reused
    return plan


_PLANS: dict[int, tuple[Any, Any, tuple[Any, ...] | None]] = {}


def _write_whole_chunks(arr: zarr.Array, sel: tuple[slice, ...], block: np.ndarray) -> bool:
    """Store ``block`` at ``sel`` chunk by chunk, encoded with the array's own codecs, if it covers whole chunks
    of a local array; False (nothing written) otherwise.

    zarr's ``setitem`` spends most of its time in asyncio tasks, indexing and a thread hand-off per codec and file,
    all holding the GIL the training thread needs; for the small chunks of per-update records and sparse
    checkpoints that cost more than the encoding (docs/benchmarks.md, "Recording overhead (issue 14)"). The bytes
    are the same as zarr's: the same codec objects encode the same chunk (edge chunks padded with the fill value,
    as zarr pads them), and each file is written to a ``.partial`` file and renamed, as zarr's local store does.
    Encoding in this (non-main) thread keeps Blosc single-threaded, as it is under zarr."""
    a = arr.async_array
    plan = _encoding_plan(a)
    if plan is None:
        return False
    stages, crc, root, prefix = plan
    shape, chunks = a.shape, a.metadata.chunk_grid.chunk_shape
    starts = [s.start or 0 for s in sel] + [0] * (len(shape) - len(sel))
    if any(st % c for st, c in zip(starts, chunks)) or len(block) % chunks[0]:
        return False
    if any(st + b != full for st, b, full in zip(starts[1:], block.shape[1:], shape[1:])):
        return False  # every axis but the step axis must be covered to its end
    block = np.asarray(block, dtype=arr.dtype)
    ranges = [range(st // c, -(-(st + b) // c)) for st, b, c in zip(starts, block.shape, chunks)]
    for coords in itertools.product(*ranges):
        lo = [i * c - st for i, c, st in zip(coords, chunks, starts)]
        piece = block[tuple(slice(l, l + c) for l, c in zip(lo, chunks))]
        if piece.shape != tuple(chunks):  # an edge chunk: zarr stores it whole, padded with the fill value
            full = np.full(chunks, a.metadata.fill_value, dtype=block.dtype)
            full[tuple(slice(0, m) for m in piece.shape)] = piece
            piece = full
        buf: Any = NDBuffer.from_numpy_array(np.ascontiguousarray(piece))
        for codec, spec in stages:
            buf = codec._encode_sync(buf, spec)
        parts = [buf.as_buffer_like()]
        if crc:  # what Crc32cCodec appends, without its copy of the whole chunk (np.append)
            data = buf.as_numpy_array()
            parts.append(np.array([google_crc32c.value(data)], dtype=np.uint32).view("B").tobytes())
        key = f"{prefix}/{a.metadata.encode_chunk_key(coords)}".lstrip("/")
        _put_file(root / key, parts)
    return True


def _put_file(path: Path, parts: Sequence[Any]) -> None:
    """Write the concatenation of ``parts`` to ``path`` atomically (a ``.partial`` file renamed over it, as zarr's
    local store does; the recorder removes leftover ``.partial`` files on resume). The directory is made only
    when it is missing (a new chunk row): trying the open first saves a system call per file."""
    # unique without uuid4 (a getrandom system call per file): one writer per store, and the process id and a
    # counter tell this process's files apart
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_PARTIAL_IDS)}.partial")
    try:
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")
        with f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
