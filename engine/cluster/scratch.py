"""A small Zarr scratch store for the carries between chunks (parameter-sized float64 vectors).

The reverse chain (:func:`engine.cluster.graph.build_arrays`) folds the rebuilt momentum forward, chunk by chunk,
before its pass 2 runs backward from the last chunk to the first, so the momentum entering chunk ``c`` is made long
before chunk ``c``'s pass 2 needs it. Held in memory that would be one P-vector per momentum part per chunk; instead
the fold writes it here (float64, uncompressed: read back bit for bit) and chunk ``c``'s pass 2 reads its row back.

Layout under the scratch location: one group per query group (the job's token) and in it one array per momentum
part (``data``, ``weight_decay``), shape ``(chunks, P)`` with one zarr chunk per row, the tensors flattened in the
context's order. The parallel-chunks schedule writes each chunk's pass-1 totals and carries as their own arrays
(:func:`write_vectors`: ``<kind>/<chunk>``, one flat array each, made by its only writer, so chunks written in
parallel never share an array). The location is next to the result (``out=``) or in the local temporary directory, and removed
when the attribution ends (:func:`scratch_root`, :func:`engine.api.attribute`).
"""

from __future__ import annotations

import math
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from explaind_store import storage


@dataclass(frozen=True)
class Spilled:
    """Where the momentum entering one chunk was written: row ``row`` of the scratch group ``loc`` (picklable)."""

    loc: str
    row: int


def scratch_root(out: storage.Location | None, *, local: bool) -> storage.Location | None:
    """A fresh scratch location for one attribution: next to ``out`` (the result's path or URL, which the workers
    can write) when given, else a new directory under the local temporary directory when every worker runs on this
    machine (``local``), else None (the carries then stay in the workers' memory, where dask may spill them)."""
    name = f"explaind-scratch-{uuid.uuid4().hex[:12]}"
    if out is not None:
        if isinstance(out, Path):
            return out.parent / f".{out.name}.{name}"
        return f"{out}.{name}"
    if local:
        return Path(tempfile.gettempdir()) / name
    return None


def group_location(root: storage.Location, token: str) -> str:
    """The scratch group of one query group's chain (as a string: shipped to the workers)."""
    return str(storage.join(root, token))


def write_momentum(
    spilled: Spilled, n_rows: int, momentum: dict[str, dict[str, torch.Tensor]], names: list[str], *, create: bool
) -> None:
    """Write ``momentum`` (part -> tensor name -> tensor) as row ``spilled.row``; ``create`` makes the arrays
    (``n_rows`` rows) first: the chain's first fold, which runs before any other task touches them."""
    for part, tensors in momentum.items():
        row = np.concatenate([tensors[n].detach().cpu().reshape(-1).numpy() for n in names]).astype(np.float64)
        store = storage.open_store(storage.join(storage.location(spilled.loc), part))
        if create:
            arr = zarr.create_array(store=store, shape=(n_rows, row.size), chunks=(1, row.size), dtype="float64",
                                    compressors=None, fill_value=0.0, overwrite=True)
        else:
            arr = zarr.open_array(store=store, mode="r+")
        arr[spilled.row] = row


def read_momentum(
    spilled: Spilled, parts: tuple[str, ...], names: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Row ``spilled.row`` as part -> tensor name -> float64 tensor (the inverse of :func:`write_momentum`)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for part in parts:
        store = storage.open_store(storage.join(storage.location(spilled.loc), part), read_only=True)
        row = torch.from_numpy(np.asarray(zarr.open_array(store=store, mode="r")[spilled.row]))
        out[part], at = {}, 0
        for n in names:
            size = math.prod(shapes[n])
            out[part][n] = row[at : at + size].reshape(shapes[n])
            at += size
    return out


def write_vectors(spilled: Spilled, kind: str, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """Write ``tensors`` (tensor name -> tensor) flattened in ``names``' order as the array ``<kind>/<row>`` of
    ``spilled.loc``, created here (each array has one writer: parallel chunks never share one)."""
    flat = np.concatenate([tensors[n].detach().cpu().reshape(-1).numpy() for n in names]).astype(np.float64)
    store = storage.open_store(storage.join(storage.location(spilled.loc), kind, str(spilled.row)))
    arr = zarr.create_array(store=store, shape=flat.shape, chunks=flat.shape, dtype="float64", compressors=None,
                            fill_value=0.0, overwrite=True)
    arr[...] = flat


def read_vectors(
    spilled: Spilled, kind: str, names: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The array ``<kind>/<row>`` of :func:`write_vectors` as tensor name -> float64 tensor of ``shapes[name]``."""
    store = storage.open_store(storage.join(storage.location(spilled.loc), kind, str(spilled.row)), read_only=True)
    flat = torch.from_numpy(np.asarray(zarr.open_array(store=store, mode="r")[...]))
    out, at = {}, 0
    for n in names:
        size = math.prod(shapes[n])
        out[n] = flat[at : at + size].reshape(shapes[n])
        at += size
    return out


__all__ = ["Spilled", "group_location", "read_momentum", "read_vectors", "scratch_root", "write_momentum",
           "write_vectors"]
