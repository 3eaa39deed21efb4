"""Handing large results from same-host workers to the client through shared memory instead of TCP.

A worker of the default ``LocalCluster`` runs on this machine, yet ``client.gather`` pulls its result blocks through
dask's TCP comm, which for the benchmark's largest results takes as long as a sizeable part of the whole attribution
(docs/benchmarks.md). Here each large variable gets one ``.npy`` file in ``/dev/shm`` laid out by the client; every
worker writes its blocks in place into it (``pwrite`` for blocks split only along the first axis, query groups; a
mapping for blocks split along others, e.g. per-chunk step blocks) and the client maps the file copy-on-write (no
copy; the file is unlinked at once, so the memory is freed with the array). So no block is joined into a second copy
of the array (a result of many step blocks would otherwise need twice its size in the client). Files hold only
plain numpy arrays, read with ``allow_pickle=False``: nothing is unpickled.

Used only where the client knows the workers share its filesystem (the LocalCluster it started); an external
scheduler keeps the normal gather.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import torch
import xarray as xr

from engine import settings


def shm_root() -> str | None:
    """A directory backed by memory (``/dev/shm``) with room to spare, or None."""
    root = "/dev/shm"
    try:
        if os.path.isdir(root) and os.access(root, os.W_OK) and shutil.disk_usage(root).free > (1 << 30):
            return root
    except OSError:
        pass
    return None


def _write_rows(block: np.ndarray, path: str, start: int) -> tuple[str, tuple[int, ...], str]:
    """Worker side: write one block into rows ``start:`` of the ``.npy`` file the client laid out for the whole
    array (blocks split only along the first axis are contiguous there: no concatenation on the client).

    Written with ``pwrite``, not through a mapping: no page faults on the fresh file."""
    arr = np.ascontiguousarray(block)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype != arr.dtype or tuple(shape[1:]) != arr.shape[1:] or start + arr.shape[0] > shape[0]:
        raise RuntimeError(f"block {arr.shape} {arr.dtype} does not fit rows {start}: of {path} ({shape} {dtype})")
    row_bytes = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    data = memoryview(arr).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        done, base = 0, offset + start * row_bytes
        while done < len(data):  # pwrite may write less than asked (and at most ~2 GiB at once)
            done += os.pwrite(fd, data[done : done + (1 << 30)], base + done)
    finally:
        os.close(fd)
    return path, tuple(arr.shape), arr.dtype.str


def _write_region(block: np.ndarray, path: str, start: tuple[int, ...]) -> tuple[str, tuple[int, ...], str]:
    """Worker side: write one block at ``start`` of the ``.npy`` file laid out for the whole array (blocks split
    along more than the first axis, e.g. per-chunk step blocks): the client then maps one file instead of joining
    the blocks into a second copy of the array."""
    arr = np.asarray(block)
    whole = np.load(path, mmap_mode="r+", allow_pickle=False)
    try:
        whole[tuple(slice(o, o + n) for o, n in zip(start, arr.shape))] = arr
        whole.flush()
    finally:
        del whole
    return path, tuple(arr.shape), arr.dtype.str


def _load(handle: tuple[str, tuple[int, ...], str]) -> np.ndarray:
    path, shape, dtype = handle
    try:
        arr = np.load(path, mmap_mode="c", allow_pickle=False)  # copy-on-write: writable, private to this process
    finally:
        os.unlink(path)  # the mapping keeps the pages until the array is freed
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise RuntimeError(f"result block {path} came back as {arr.shape} {arr.dtype}, expected {shape} {dtype}")
    return arr


def _big_vars(ds: xr.Dataset) -> list[str]:
    """The lazy data variables worth assembling from their blocks (at least the ``handoff_min_bytes`` setting;
    smaller ones go through the normal gather)."""
    min_bytes = settings.get("handoff_min_bytes")
    return [k for k, v in ds.data_vars.items() if dask.is_dask_collection(v.data) and v.nbytes >= min_bytes]


# Whole-window arrays that pass-2 tasks of this process write into directly (see :func:`inline_sink`): set only
# while :func:`compute_inline` runs, i.e. under the synchronous scheduler, where every task shares this process.
_SINKS: contextvars.ContextVar[dict[tuple[str, str], np.ndarray] | None] = contextvars.ContextVar(
    "explaind_inline_sinks", default=None)


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` from torch's allocator: numpy advises the kernel to back allocations of 4 MiB and more with
    transparent huge pages, whose first touch (the pass-2 task zeroing its block) was measured several times slower
    than the same memory in 4 KiB pages on a virtual machine; torch's allocator gives no such advice (and its freed
    memory stays in the tuned heap, :func:`engine.scan.heap.keep_heap`, for the next result)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    return torch.empty(n * dt.itemsize, dtype=torch.uint8).numpy().view(dt).reshape(shape)


def inline_sink(token: str, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """The whole-window array ``key`` of job ``token`` (allocated on first request, pages untouched) for a task to
    write its block into in place, or None outside :func:`compute_inline` or when another job already took one
    for ``key`` (query groups: their blocks are copied as usual)."""
    sinks = _SINKS.get()
    if sinks is None:
        return None
    got = sinks.get((token, key))
    if got is None:
        if any(k == key for _, k in sinks):
            return None
        got = sinks[(token, key)] = _empty(shape, dtype)
    return got if got.shape == tuple(shape) and got.dtype == dtype else None


# Values a task of this process keeps for a later task of the same compute (see :func:`inline_keep`): set, like
# _SINKS, only while :func:`compute_inline` runs; (token, key) -> (value, bytes).
_KEPT: contextvars.ContextVar[dict[tuple[str, str], tuple[Any, int]] | None] = contextvars.ContextVar(
    "explaind_inline_kept", default=None)


def inline_room(nbytes: int) -> bool:
    """Whether :func:`inline_keep` would keep ``nbytes`` more now: under :func:`compute_inline` (every task runs in
    this process), with everything kept within the ``light_bytes`` setting."""
    kept = _KEPT.get()
    return kept is not None and sum(b for _, b in kept.values()) + int(nbytes) <= settings.get("light_bytes")


def inline_keep(token: str, key: str, value: Any, nbytes: int) -> bool:
    """Keep ``value`` (``nbytes`` bytes) for a later task of job ``token`` (:func:`inline_take`) when there is room
    (:func:`inline_room`); returns whether it was kept (if not, that task computes it again)."""
    kept = _KEPT.get()
    if kept is None or not inline_room(nbytes):
        return False
    kept[(token, key)] = (value, int(nbytes))
    return True


def inline_take(token: str, key: str) -> Any | None:
    """The value an earlier task of job ``token`` kept for ``key`` (:func:`inline_keep`), no longer kept; None when
    nothing was."""
    kept = _KEPT.get()
    got = None if kept is None else kept.pop((token, key), None)
    return None if got is None else got[0]


class _Whole:
    """The whole array of one variable, allocated once; its blocks are copied in as they finish (same process).
    :func:`_empty` does not touch the pages, so memory grows only as blocks arrive."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.key, self.shape, self.dtype = key, shape, dtype
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            # the tasks wrote straight into a sink of this variable: adopt it (same size; a reshape is a view)
            sinks = [a for (_, k), a in (_SINKS.get() or {}).items() if k == self.key]
            size = int(np.prod(self.shape, dtype=np.int64))
            if len(sinks) == 1 and sinks[0].size == size and sinks[0].dtype == self.dtype:
                self._array = sinks[0].reshape(self.shape)
            else:
                self._array = _empty(self.shape, self.dtype)
        return self._array


def _put(block: np.ndarray, whole: _Whole, region: tuple[slice, ...]) -> None:
    """Copy one finished block into its place (nothing to do where the task wrote it there already); returning
    nothing lets the scheduler free the block at once (the peak is the result plus the blocks not yet copied,
    not the blocks plus a joined copy)."""
    dest = whole.array[region]
    if not np.shares_memory(dest, block):
        dest[...] = block


def _regions(chunks: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], tuple[slice, ...]]:
    """Block index -> the slices it covers in the whole array."""
    starts = [np.cumsum((0, *c)) for c in chunks]
    return {
        idx: tuple(slice(int(st[i]), int(st[i + 1])) for st, i in zip(starts, idx))
        for idx in np.ndindex(*(len(c) for c in chunks))
    }


def _with(ds: xr.Dataset, rest: xr.Dataset, data: dict[str, np.ndarray]) -> xr.Dataset:
    """``rest`` (``ds`` without the big variables, computed) with the big variables' numpy data put back."""
    out = rest.copy()
    for name, values in data.items():
        out[name] = (ds[name].dims, values, ds[name].attrs)
    return out[list(ds.data_vars)].assign_attrs(ds.attrs)


def compute_inline(ds: xr.Dataset, compute: Callable[[list[Any]], list[Any]]) -> xr.Dataset:
    """``ds`` computed in this process by ``compute`` (e.g. dask's synchronous scheduler), with the large
    variables assembled from their blocks here: dask's ``finalize`` deep-copies a single-block result (a
    noticeable part of the benchmark for its large ``data``), but these blocks are fresh arrays that the
    pass-2 task made for this result alone."""
    big = _big_vars(ds)
    if not big:
        return compute([ds])[0]
    blocks = {name: ds[name].data.to_delayed(optimize_graph=False) for name in big}
    single = [name for name in big if blocks[name].size == 1]  # returned as they are: no copy
    wholes = {name: _Whole(name, ds[name].shape, ds[name].dtype) for name in big if name not in single}
    puts = [
        dask.delayed(_put, pure=False)(blocks[name][idx], whole, region)
        for name, whole in wholes.items()
        for idx, region in _regions(ds[name].data.chunks).items()
    ]
    reset, reset_kept = _SINKS.set({}), _KEPT.set({})
    try:
        rest, *got = compute([ds.drop_vars(big), *(blocks[name].flat[0] for name in single), *puts])
        data = {name: whole.array for name, whole in wholes.items()}
    finally:
        _SINKS.reset(reset)
        _KEPT.reset(reset_kept)
    data.update(zip(single, got[: len(single)]))
    return _with(ds, rest, {name: data[name] for name in big})


def compute_dataset(
    client: Any, ds: xr.Dataset, root: str, on_futures: Callable[[list[Any]], None] | None = None
) -> xr.Dataset:
    """``client.compute(ds)`` gathered, with every dask variable of at least ``handoff_min_bytes`` handed over through
    files under ``root`` block by block. ``on_futures`` sees the futures first (a progress bar)."""
    big = _big_vars(ds)
    # a full tmpfs turns writes through a mapping into SIGBUS: only hand over what fits with room to spare
    if big and sum(ds[k].nbytes for k in big) > shutil.disk_usage(root).free // 2:
        big = []
    if not big:
        futures = [client.compute(ds)]
        if on_futures is not None:
            on_futures(futures)
        return client.gather(futures)[0]
    tmp = tempfile.mkdtemp(prefix="explaind-", dir=root)
    try:
        spills: dict[str, np.ndarray] = {}
        whole: dict[str, str] = {}  # each variable's file
        for name in big:
            arr = ds[name].data
            blocks = arr.to_delayed(optimize_graph=False)  # keep the shared task keys
            handles = np.empty(blocks.shape, dtype=object)
            # one file per variable, laid out here, written in place by the workers: no joining copy
            path = whole[name] = os.path.join(tmp, f"{uuid.uuid4().hex}.npy")
            np.lib.format.open_memmap(path, mode="w+", dtype=arr.dtype, shape=arr.shape)  # sparse until written
            starts = [np.cumsum((0, *c[:-1])) for c in arr.chunks]
            by_rows = all(len(c) == 1 for c in arr.chunks[1:])
            for idx, blk in np.ndenumerate(blocks):
                if by_rows:
                    handles[idx] = dask.delayed(_write_rows, pure=False)(blk, path, int(starts[0][idx[0]]))
                else:
                    start = tuple(int(st[i]) for st, i in zip(starts, idx))
                    handles[idx] = dask.delayed(_write_region, pure=False)(blk, path, start)
            spills[name] = handles
        futures = client.compute([ds.drop_vars(big), *(h for hs in spills.values() for h in hs.flat)])
        if on_futures is not None:
            on_futures(futures)
        rest, *got = client.gather(futures)
        del got  # the handles only say the blocks were written
        data = {name: _load((path, ds[name].shape, ds[name].dtype.str)) for name, path in whole.items()}
        return _with(ds, rest, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["compute_dataset", "compute_inline", "inline_keep", "inline_room", "inline_sink", "inline_take", "shm_root"]
