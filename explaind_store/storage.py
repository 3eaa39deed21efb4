"""How a run is stored on disk: creating its Zarr v3 group and arrays, codecs, chunking, and opening with checks.

Names come from ``schema``; this module decides shapes, chunks, codecs and fill values. See docs/format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.errors import GroupNotFoundError, NodeNotFoundError

from . import schema

TARGET_CHUNK_BYTES = 4 * 2**20  # aim for 1-8 MB chunks
# Blosc lz4 at level 5 with bitshuffle: on recorded float32 trajectories it compresses about as well as zstd level 1
# and encodes several times faster, which keeps the writer thread's share of the training machine small
# (docs/benchmarks.md, "Measurements behind choices in the code"; bench/record_overhead.py).
DEFAULT_CNAME = "lz4"
DEFAULT_CLEVEL = 5
# zarr skips writing chunks equal to the fill value by default; then a deleted chunk file and a legitimately
# all-fill chunk look the same. Every writer of the store uses this so a missing chunk always means damage.
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


class StoreError(Exception):
    """A path is not a readable explaind store, or the store cannot be used as asked."""


def compressors(clevel: int = DEFAULT_CLEVEL) -> tuple[Any, ...]:
    """Lossless default: Blosc lz4 with bitshuffle, then a CRC32C checksum so corrupt chunks are detected. The
    shuffle's type size follows each array's dtype (float64 runs, int64 batch indices)."""
    return (
        zarr.codecs.BloscCodec(cname=DEFAULT_CNAME, clevel=clevel, shuffle="bitshuffle"),
        zarr.codecs.Crc32cCodec(),
    )


def float_filters(lossy_keepbits: int | None) -> tuple[Any, ...]:
    """Opt-in lossy rounding of float mantissas (numcodecs BitRound); None keeps data exact."""
    if lossy_keepbits is None:
        return ()
    from zarr.codecs.numcodecs import BitRound

    return (BitRound(keepbits=int(lossy_keepbits)),)


def codec_attrs(clevel: int, lossy_keepbits: int | None) -> dict[str, Any]:
    lossy = None
    if lossy_keepbits is not None:
        # BitRound keeps `keepbits` mantissa bits and rounds to nearest: relative error <= 2^-(keepbits+1).
        lossy = {"bitround_keepbits": int(lossy_keepbits), "max_relative_error": 2.0 ** -(int(lossy_keepbits) + 1)}
    return {
        "compressor": {"name": "blosc", "cname": DEFAULT_CNAME, "clevel": clevel, "shuffle": "bitshuffle"},
        "checksum": "crc32c",
        "lossy": lossy,
    }


def step_chunk_shape(chunk_updates: int, shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks hold ``chunk_updates`` steps; a tensor too big for ~8 MB per chunk is split along its first axis."""
    inner = list(shape)
    per_step = itemsize * math.prod(shape) if shape else itemsize
    if inner and per_step * chunk_updates > 2 * TARGET_CHUNK_BYTES:
        rows = max(1, (2 * TARGET_CHUNK_BYTES) // (chunk_updates * max(1, per_step // inner[0])))
        inner[0] = min(inner[0], int(rows))
    return (chunk_updates, *inner)


def default_chunk_updates(step_bytes: int) -> int:
    """Steps per chunk (= the writer's flush interval): ~4 MB for the largest tensor, between 8 and 256."""
    k = TARGET_CHUNK_BYTES // max(1, step_bytes)
    return int(min(256, max(8, k)))


def create_stepped(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    dims: tuple[str, ...],
    chunk_updates: int,
    *,
    fill_value: Any,
    clevel: int = DEFAULT_CLEVEL,
    filters: tuple[Any, ...] = (),
    inner_chunks: tuple[int, ...] | None = None,
) -> zarr.Array:
    """A step-indexed array with zero steps; the writer grows it one chunk of steps at a time."""
    dt = np.dtype(dtype)
    chunks = (chunk_updates, *inner_chunks) if inner_chunks is not None else step_chunk_shape(
        chunk_updates, shape, dt.itemsize
    )
    return group.create_array(
        name,
        shape=(0, *shape),
        chunks=chunks,
        dtype=dt,
        fill_value=fill_value,
        compressors=compressors(clevel),
        filters=filters,
        dimension_names=dims,
        config=WRITE_EVERY_CHUNK,
    )


def write_static(group: zarr.Group, name: str, values: np.ndarray, dims: tuple[str, ...]) -> zarr.Array:
    """An array written once (data, frozen tensors), chunked to ~4 MB along its first axis."""
    values = np.ascontiguousarray(values)
    if values.ndim == 0:
        values = values.reshape(1)
        dims = ("scalar",)
    row = max(1, values.nbytes // max(1, values.shape[0]))
    rows = int(max(1, min(values.shape[0], TARGET_CHUNK_BYTES // row)))
    arr = group.create_array(
        name,
        shape=values.shape,
        chunks=(rows, *values.shape[1:]),
        dtype=values.dtype,
        compressors=compressors(),
        dimension_names=dims,
        config=WRITE_EVERY_CHUNK,
    )
    arr[...] = values
    return arr


def writable(arr: zarr.Array) -> zarr.Array:
    """An opened array set to write every chunk (the runtime setting is not stored, so reopened arrays need it)."""
    return arr.with_config(WRITE_EVERY_CHUNK)


def fingerprint(*arrays: np.ndarray) -> str:
    """Content fingerprint of a data split (shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(json.dumps([list(a.shape), a.dtype.str]).encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def library_versions() -> dict[str, str]:
    import dask
    import torch
    import xarray

    from . import __version__

    return {
        "explaind_store": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "xarray": xarray.__version__,
        "dask": dask.__version__,
    }


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_metadata(path: str | Path) -> None:
    """Parse the ``zarr.json`` of every node (root, groups, arrays; chunk folders are not entered), so damaged
    metadata is reported up front with the file's name instead of a bare JSON error from deep inside zarr."""
    pending = [Path(path)]
    while pending:
        node = pending.pop()
        meta = node / "zarr.json"
        if not meta.is_file():
            continue  # not a Zarr node (e.g. an empty folder left by a crash)
        try:
            doc = json.loads(meta.read_bytes())
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(
                f"the store's metadata is damaged: {meta} cannot be read ({exc}). The file was truncated or "
                "overwritten (a full disk, an interrupted copy, an edit); the data chunks next to it may be intact. "
                "Restore this file from a backup or an intact copy of the store, or record the run again."
            ) from None
        if doc.get("node_type") == "group":
            pending.extend(sub for sub in node.iterdir() if sub.is_dir())


def open_root(path: str | Path, mode: str = "r", *, check: bool = True) -> zarr.Group:
    """Open a run's root group and check it is an explaind store this version can read (``check``: also parse
    every node's metadata, see :func:`check_metadata`)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p} does not exist. Record a run first (e.g. `explaind record modadd --out {p}`).")
    if check:
        check_metadata(p)
    try:
        root = zarr.open_group(str(p), mode=mode, zarr_format=3)
    except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError, ValueError) as exc:
        raise StoreError(f"{p} is not a Zarr v3 group, so it is not an explaind store ({exc}).") from None
    attrs = root.attrs.asdict()
    if attrs.get(schema.ATTR_FORMAT) != schema.FORMAT_NAME:
        raise StoreError(
            f"{p} is a Zarr group but not an explaind store (its '{schema.ATTR_FORMAT}' attribute is "
            f"{attrs.get(schema.ATTR_FORMAT)!r}, expected {schema.FORMAT_NAME!r})."
        )
    version = int(attrs.get(schema.ATTR_FORMAT_VERSION, 0))
    if version > schema.FORMAT_VERSION:
        raise StoreError(
            f"{p} uses store format version {version}, newer than this explaind-store understands "
            f"(version {schema.FORMAT_VERSION}). Upgrade the package: pip install -U explaind-store."
        )
    return root
