"""How a run is stored: where (a local directory or an object-store URL), creating its Zarr v3 group and arrays,
codecs, chunking, and opening with checks.

Names come from ``schema``; this module decides shapes, chunks, codecs and fill values. See docs/format.md.

A store is addressed by a local path or an fsspec URL (``s3://bucket/run.zarr``, ``memory://run.zarr``, ...):
:func:`location` tells them apart once (a ``Path`` or a URL string) and :func:`open_store` turns either into a zarr
Store. Credentials are never passed through here: fsspec's filesystems find them in their usual places (for S3,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` or ``~/.aws``), so nothing that could hold
a secret is written into a store or shipped to Dask workers; each process resolves them from its own environment.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.abc.store import Store
from zarr.errors import GroupNotFoundError, NodeNotFoundError

from . import schema
from .errors import StoreError  # noqa: F401 - the store's base error, raised and re-exported here
from .metadata import check_arrays, check_root_attrs, format_version

TARGET_CHUNK_BYTES = 4 * 2**20  # aim for 1-8 MB chunks
# Blosc lz4 at level 5 with bitshuffle: on recorded float32 trajectories it compresses about as well as zstd level 1
# and encodes several times faster, which keeps the writer thread's share of the training machine small
# (docs/benchmarks.md, "Measurements behind choices in the code"; bench/record_overhead.py).
DEFAULT_CNAME = "lz4"
DEFAULT_CLEVEL = 5
# zarr skips writing chunks equal to the fill value by default; then a deleted chunk file and a legitimately
# all-fill chunk look the same. Every writer of the store uses this so a missing chunk always means damage.
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


# --- where a store lives ----------------------------------------------------------------------------------------
Location = Path | str  # a local directory, or the URL of a remote one (no trailing slash)

# The package each well-known protocol needs (fsspec names it too, but not as an install command for this project).
_PROTOCOL_PACKAGES = {"s3": "s3fs (pip install 'explaind-store[s3]')", "s3a": "s3fs (pip install 'explaind-store[s3]')",
                      "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL with a protocol other than ``file://`` (s3://, memory://, gs://, ...)."""
    if not isinstance(path, str):
        return False
    return "://" in path and not path.startswith("file://")


def location(path: str | os.PathLike[str]) -> Location:
    """The store's address: a ``Path`` for a local directory (``file://`` URLs included), else the URL with no
    trailing slash. An unknown protocol, or one whose filesystem package is missing, is a :class:`StoreError`."""
    if isinstance(path, str) and path.startswith("file://"):
        return Path(path[len("file://"):])
    if not is_remote(path):
        return Path(path)
    protocol, _, rest = str(path).partition("://")
    rest = rest.rstrip("/")
    url = f"{protocol}://{rest}"
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        need = _PROTOCOL_PACKAGES.get(protocol, f"the package fsspec names: {exc}")
        raise StoreError(f"{url}: reading and writing {protocol}:// URLs needs {need}.") from None
    except ValueError:
        raise StoreError(
            f"{url}: unknown storage protocol {protocol!r}. Use a local path, or a URL fsspec knows (s3://bucket/"
            "run.zarr with s3fs installed, gs://, az://, memory://); check the URL for a typo."
        ) from None
    if not rest.strip("/"):
        raise StoreError(f"{url}: the URL names no store; give a bucket and a path, e.g. {protocol}://bucket/run.zarr")
    return url


def _storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``. No credentials: the filesystem finds them in the process's environment."""
    if url.split("://", 1)[0] in ("s3", "s3a"):
        # Listings feed the missing-chunk check and must see objects written after the store was opened (a run
        # still being recorded), so s3fs's listing cache is off.
        return {"use_listings_cache": False}
    return {}


def filesystem(loc: str) -> tuple[Any, str]:
    """The (synchronous) fsspec filesystem of a remote location and the store's path inside it."""
    from fsspec.core import url_to_fs

    return url_to_fs(loc, **_storage_options(loc))


def open_store(path: str | os.PathLike[str], *, read_only: bool = False) -> Store:
    """The zarr Store of a local path or a URL (see :func:`location`)."""
    loc = location(path)
    if isinstance(loc, Path):
        return zarr.storage.LocalStore(loc, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(loc, storage_options=_storage_options(loc), read_only=read_only)


def _remote_call(loc: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` on the store's filesystem, with a failure (no such bucket, refused credentials, no server)
    turned into a StoreError that says what to check."""
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types for access and network errors
        raise StoreError(
            f"{loc}: could not {what} ({type(exc).__name__}: {exc}). Check the URL, that the bucket exists, and the "
            "credentials and endpoint in the environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL or ~/.aws)."
        ) from None


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether anything (a directory, or objects under the URL's prefix) is at ``path``."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.exists()
    fs, root = filesystem(loc)
    return bool(_remote_call(loc, "look it up", fs.exists, root))


def has_content(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` exists and holds at least one file or object."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.is_dir() and any(loc.iterdir()) or loc.is_file()
    fs, root = filesystem(loc)
    try:
        return bool(_remote_call(loc, "list it", fs.ls, root))
    except FileNotFoundError:
        return False


def join(loc: Location, *parts: str) -> Location:
    """``loc`` with store-relative parts appended (``/``-separated for URLs)."""
    return loc.joinpath(*parts) if isinstance(loc, Path) else "/".join((loc, *parts))


def read_file(loc: Location, key: str) -> bytes | None:
    """The bytes of the file ``key`` (e.g. ``zarr.json``) under ``loc``, or None when there is none."""
    if isinstance(loc, Path):
        f = loc / key
        return f.read_bytes() if f.is_file() else None
    fs, root = filesystem(loc)
    try:
        return bytes(_remote_call(loc, f"read {key}", fs.cat_file, f"{root}/{key}"))
    except (FileNotFoundError, IsADirectoryError):
        return None


def remove_tree(loc: Location) -> None:
    """Delete everything under ``loc`` (a directory, or every object under the URL's prefix); absent is fine."""
    if isinstance(loc, Path):
        if loc.exists():
            shutil.rmtree(loc)
        return
    fs, root = filesystem(loc)
    try:
        _remote_call(loc, "delete it", fs.rm, root, recursive=True)
    except FileNotFoundError:
        pass


def tree_nbytes(loc: Location) -> int:
    """Bytes stored under ``loc`` (files on disk, or object sizes); 0 when there is nothing."""
    if isinstance(loc, Path):
        return sum(f.stat().st_size for f in loc.rglob("*") if f.is_file()) if loc.exists() else 0
    fs, root = filesystem(loc)
    try:
        return int(_remote_call(loc, "list it", fs.du, root, total=True))
    except FileNotFoundError:
        return 0


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
    flat_keys: bool = False,
) -> zarr.Array:
    """A step-indexed array with zero steps; the writer grows it one chunk of steps at a time.

    ``flat_keys``: chunk files named ``c.<step>.<i>...`` side by side instead of nested directories
    ``c/<step>/<i>/...`` (zarr's ``default`` chunk key encoding with separator ``"."``): for arrays of one-step
    chunks (sparse checkpoints), where nested keys would make new directories at every stored step."""
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
        **({"chunk_key_encoding": {"name": "default", "separator": "."}} if flat_keys else {}),
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


def check_metadata(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Parse the ``zarr.json`` of every node (root, groups, arrays; chunk folders are not entered), so damaged
    metadata is reported up front with the file's name instead of a bare JSON error from deep inside zarr; returns
    the arrays' documents by path inside the store (``params/embed``). In an object store the documents of one level
    of the hierarchy are fetched concurrently (one round trip per level)."""
    loc = location(path)
    arrays: dict[str, dict[str, Any]] = {}
    if isinstance(loc, Path):
        def documents(nodes: list[Location]) -> list[bytes | None]:
            return [read_file(node, "zarr.json") for node in nodes]

        def subdirs(node: Location) -> list[Location]:
            return [sub for sub in node.iterdir() if sub.is_dir()]  # type: ignore[union-attr]
    else:
        fs, root = filesystem(loc)

        def documents(nodes: list[Location]) -> list[bytes | None]:
            keys = [f"{root}{str(node)[len(loc):]}/zarr.json" for node in nodes]
            got = _remote_call(loc, "read its metadata", fs.cat, keys, on_error="return")
            out: list[bytes | None] = []
            for key in keys:
                body = got.get(key, FileNotFoundError(key)) if isinstance(got, dict) else got
                if isinstance(body, FileNotFoundError):
                    out.append(None)
                elif isinstance(body, Exception):
                    _remote_call(loc, f"read {key}", _raise, body)
                else:
                    out.append(bytes(body))
            return out

        def subdirs(node: Location) -> list[Location]:
            found = _remote_call(loc, "list it", fs.ls, f"{root}{str(node)[len(loc):]}", detail=True)
            return [f"{node}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}" for e in found if e.get("type") == "directory"]
    level: list[Location] = [loc]
    while level:
        below: list[Location] = []
        for node, raw in zip(level, documents(level)):
            if raw is None:
                continue  # not a Zarr node (e.g. an empty folder left by a crash)
            try:
                doc = json.loads(raw)
                if not isinstance(doc, dict):
                    raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as exc:
                raise StoreError(
                    f"the store's metadata is damaged: {join(node, 'zarr.json')} cannot be read ({exc}). The file "
                    "was truncated or overwritten (a full disk, an interrupted copy, an edit); the data chunks next "
                    "to it may be intact. Restore this file from a backup or an intact copy of the store, or record "
                    "the run again."
                ) from None
            if doc.get("node_type") == "group":
                below.extend(subdirs(node))
            elif doc.get("node_type") == "array":
                arrays[str(node)[len(str(loc)):].replace("\\", "/").strip("/")] = doc
        level = below
    return arrays


def _raise(exc: BaseException) -> None:
    raise exc


def open_root(path: str | os.PathLike[str], mode: str = "r", *, check: bool = True) -> zarr.Group:
    """Open a run's root group (a local path or a URL) and check it is an explaind store this version can read
    (``check``: also parse every node's metadata, see :func:`check_metadata`)."""
    p = location(path)
    if not exists(p):
        raise StoreError(f"{p} does not exist. Record a run first (e.g. `explaind record modadd --out {p}`).")
    arrays = check_metadata(p) if check else None
    try:
        root = zarr.open_group(store=open_store(p, read_only=mode == "r"), mode=mode, zarr_format=3)
    except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError, ValueError) as exc:
        raise StoreError(f"{p} is not a Zarr v3 group, so it is not an explaind store ({exc}).") from None
    check_explaind_root(root.attrs.asdict(), p, arrays)
    return root


def check_explaind_root(attrs: dict[str, Any], where: Location,
                        arrays: dict[str, dict[str, Any]] | None = None) -> None:
    """Refuse a root group that is not an explaind store, is of a newer format, or whose attributes (and, given
    their documents, arrays) are damaged (:mod:`explaind_store.metadata`)."""
    if attrs.get(schema.ATTR_FORMAT) != schema.FORMAT_NAME:
        raise StoreError(
            f"{where} is a Zarr group but not an explaind store (its '{schema.ATTR_FORMAT}' attribute is "
            f"{str(attrs.get(schema.ATTR_FORMAT))[:80]!r}, expected {schema.FORMAT_NAME!r})."
        )
    version = format_version(attrs, str(where))
    if version > schema.FORMAT_VERSION:
        raise StoreError(
            f"{where} uses store format version {version}, newer than this explaind-store understands "
            f"(version {schema.FORMAT_VERSION}). Upgrade the package: pip install -U explaind-store."
        )
    check_root_attrs(attrs, str(where))
    if arrays is not None:
        check_arrays(attrs, arrays, str(where))
