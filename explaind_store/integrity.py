"""Integrity checks that need no decoding: which chunk files a run must have, and the data splits' checksums.

Zarr reads a missing chunk file as the array's fill value (NaN or 0), so a deleted or never-copied chunk would
otherwise read as plausible numbers. Every chunk a run should have follows from its metadata: step-indexed arrays
(``params``, optimizer state, ``updates``) need the chunk rows holding steps ``0..committed_updates`` and all of
their inner chunks (in a run with sparse checkpoints, parameters and optimizer state only the chunks holding its
checkpoint steps: one step per chunk there, the steps between are replayed); data and static arrays need their
whole chunk grid. The chunk files present are listed once per
array (one directory walk for a local store, ``list_prefix`` for any other zarr Store) and cached on the ``Run``
until ``refresh()``.

Stores written before ``every_chunk_written`` (schema.ATTR_EVERY_CHUNK) skipped chunks equal to the fill value, so
some absences there are legitimate and are not reported: data and static arrays (the data splits are covered by
their recorded sha256 fingerprint instead), ``updates/loss`` (all NaN when no loss was given), rows of per-update
arrays that hold only index 0 (empty on purpose), ``updates/batch`` column chunks past the first (the batch-size
consistency check covers them), and parameter / state rows after the first non-finite update.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from . import storage
from . import schema

if TYPE_CHECKING:
    from .reader import Run

STEP_GROUPS = (schema.PARAMS, *schema.STATE_GROUPS, schema.UPDATES)


class MissingChunkError(storage.StoreError):
    """Chunk files the run's metadata says must exist are missing (reading them would give fill values)."""


class DataChecksumError(storage.StoreError):
    """A data split (stored, or rebuilt from its data spec) does not match the sha256 fingerprint recorded when the
    run was created."""


@dataclass(frozen=True)
class MissingChunk:
    """One missing chunk file: the array path, its chunk index, and the first-axis range it covers (inclusive)."""

    array: str
    chunk: tuple[int, ...]
    first: int  # first step (step arrays) or first sample / row (static arrays) the chunk covers
    last: int
    stepped: bool

    def describe(self) -> str:
        what = "steps" if self.stepped else "rows"
        return f"{self.array} chunk {list(self.chunk)} ({what} {self.first}..{self.last})"

    def to_dict(self) -> dict[str, Any]:
        return {"array": self.array, "chunk": list(self.chunk), "first": self.first, "last": self.last,
                "axis": schema.STEP if self.stepped else "row"}


def is_stepped(path: str) -> bool:
    """Whether the array at ``path`` is step-indexed (params, an optimizer state, or updates)."""
    return path.split("/", 1)[0] in STEP_GROUPS


def walk_arrays(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, array)`` of every array under ``group``, depth first, one listing per group. Files that are not
    part of the hierarchy (a README or ``.DS_Store`` someone put in the store folder) are skipped without zarr's
    warning: they hold no data of the run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        members = list(group.members())
    for name, member in sorted(members, key=lambda m: m[0]):
        if isinstance(member, zarr.Group):
            yield from walk_arrays(member, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", member


def array_paths(run: Run, groups: tuple[str, ...] | None = None) -> list[str]:
    """Paths of every array of the run (or of the given top-level groups)."""
    if groups is None:
        return [p for p, _ in walk_arrays(run.root)]
    return [p for g in groups if g in run.root for p, _ in walk_arrays(run.root[g], f"{g}/")]


def _listing(run: Run, path: str, arr: Any) -> frozenset[str]:
    """Chunk keys (relative to the array, e.g. ``c/1/0``) present for the array; cached on the run."""
    cache: dict[str, frozenset[str]] = run.__dict__.setdefault("_chunk_keys", {})
    hit = cache.get(path)
    if hit is not None:
        return hit
    sp = arr.store_path
    store, prefix = sp.store, sp.path.rstrip("/")
    root_dir = getattr(store, "root", None)
    keys: set[str] = set()
    if isinstance(store, LocalStore) and root_dir is not None:
        base = os.path.join(str(root_dir), prefix)
        for dirpath, _, files in os.walk(base):  # scandir-based: no stat per chunk file
            rel = os.path.relpath(dirpath, base)
            for f in files:
                keys.add(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    else:
        from zarr.core.sync import sync

        async def collect() -> list[str]:
            return [k async for k in store.list_prefix(f"{prefix}/" if prefix else "")]

        n = len(prefix) + 1 if prefix else 0
        keys = {k[n:] for k in sync(collect())}
    cache[path] = frozenset(keys)
    return cache[path]


def _sparse_tensor(run: Run, path: str) -> bool:
    """Whether ``path`` holds parameters or optimizer state of a run with sparse checkpoints (its ``step``
    coordinate arrays are written at every step)."""
    group, _, name = path.partition("/")
    return (run.checkpoint_every > 1 and group in (schema.PARAMS, *schema.STATE_GROUPS)
            and name != schema.STEP)


def _lenient(run: Run) -> bool:
    return not run.attrs.get(schema.ATTR_EVERY_CHUNK, False)


def missing_in(run: Run, path: str, steps: tuple[int, int] | None = None) -> list[MissingChunk]:
    """Missing chunk files of one array: for a step array those holding ``steps`` (inclusive; default 0..T, clipped
    to the committed steps), for a static array (data, static tensors) its whole grid."""
    arr = run._array(path)
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    lenient = _lenient(run)
    stepped = is_stepped(path)
    if lenient and (not stepped or path == f"{schema.UPDATES}/{schema.LOSS}"):
        return []
    if not shape or any(s == 0 for s in shape):
        return []
    t = run.committed_updates
    if stepped:
        a, b = (0, t) if steps is None else (max(0, int(steps[0])), min(t, int(steps[1])))
        if b < a:
            return []
        rows: Any = range(a // chunks[0], b // chunks[0] + 1)
        if _sparse_tensor(run, path):  # only the chunks of the stored checkpoints are written
            ck = run.checkpoint_steps
            rows = sorted({int(c) // chunks[0] for c in ck[(ck >= a) & (ck <= b)]})
        inner_shape, inner_chunks = shape[1:], chunks[1:]
    else:
        rows = range(math.ceil(shape[0] / chunks[0]))
        inner_shape, inner_chunks = shape[1:], chunks[1:]
    inner = [range(math.ceil(s / c)) for s, c in zip(inner_shape, inner_chunks)]
    if path == f"{schema.UPDATES}/{schema.BATCH}":
        inner = [range(1)]  # columns past the first exist only where a batch was that wide
    first_bad = min(run.nonfinite_updates, default=None)
    present = _listing(run, path, arr)
    out: list[MissingChunk] = []
    for r in rows:
        lo, hi = r * chunks[0], min((r + 1) * chunks[0], shape[0]) - 1
        if stepped:
            hi = min(hi, t)
            if lenient and path.startswith(f"{schema.UPDATES}/") and hi <= 0:
                continue  # only index 0, empty on purpose: all fill, never written by older writers
            if lenient and first_bad is not None and lo >= first_bad and not path.startswith(f"{schema.UPDATES}/"):
                continue  # diverged: all-NaN chunks were not written by older writers
        for rest in itertools.product(*inner):
            idx = (r, *rest)
            if arr.metadata.encode_chunk_key(idx) not in present:
                out.append(MissingChunk(path, idx, lo, hi, stepped))
    return out


def missing_chunks(
    run: Run, paths: list[str] | None = None, steps: tuple[int, int] | None = None
) -> list[MissingChunk]:
    """Missing chunk files of the given arrays (default: every array of the run); see :func:`missing_in`."""
    out: list[MissingChunk] = []
    for p in array_paths(run) if paths is None else paths:
        out.extend(missing_in(run, p, steps))
    return out


def describe_missing(run: Run, missing: list[MissingChunk]) -> str:
    """A message naming the arrays and steps of ``missing`` and what to do about it."""
    by_array: dict[str, list[MissingChunk]] = {}
    for m in missing:
        by_array.setdefault(m.array, []).append(m)
    parts = []
    for array, ms in list(by_array.items())[:8]:
        what = "steps" if ms[0].stepped else "rows"
        spans = ", ".join(f"{m.first}..{m.last}" for m in ms[:5]) + (", ..." if len(ms) > 5 else "")
        parts.append(f"{array} ({len(ms)} chunk{'s' if len(ms) > 1 else ''}, {what} {spans})")
    more = f" and {len(by_array) - 8} more arrays" if len(by_array) > 8 else ""
    msg = (
        f"{run.path}: chunk files are missing from the store: {'; '.join(parts)}{more}. Reading them would give "
        "fill values (NaN or 0) instead of the recorded numbers, so the store is damaged or was copied incompletely."
        " Copy the store again from its source or re-record the run"
    )
    stepped = [m for m in missing if m.stepped]
    if stepped and len(stepped) == len(missing):
        first = min(m.first for m in stepped)
        last = max(m.last for m in stepped)
        hints = []
        if first >= 2:
            hints.append(f"steps=slice(0, {first - 1})")
        if last + 1 < run.committed_updates:
            hints.append(f"steps=slice({last + 1}, {run.committed_updates})")
        if hints:
            msg += f"; or analyse a window that avoids these steps ({' or '.join(hints)})"
    return msg + f" (`explaind verify {run.path}` lists every missing chunk)."


def require_chunks(run: Run, paths: list[str], steps: tuple[int, int] | None = None) -> None:
    """Raise :class:`MissingChunkError` if any chunk of ``paths`` holding ``steps`` is missing."""
    missing = missing_chunks(run, paths, steps)
    if missing:
        raise MissingChunkError(describe_missing(run, missing))


def check_fingerprint(run: Run, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Raise :class:`DataChecksumError` if the split's arrays differ from the fingerprint recorded at creation."""
    info = run.attrs[schema.ATTR_DATA]["splits"][split]
    recorded = info.get("fingerprint")
    got = storage.fingerprint(x, y)
    if recorded is not None and got != recorded:
        raise DataChecksumError(
            f"{run.path}: the stored data of split {split!r} ({schema.data_path(split, schema.INPUTS)}, "
            f"{schema.data_path(split, schema.TARGETS)}) does not match the checksum recorded when the run was "
            f"created ({got} != {recorded}): the data arrays were changed or damaged after recording. Copy the store "
            "again from its source or re-record the run; results computed from this data would be wrong."
        )


def step_range(sl: Any, t: int) -> tuple[int, int] | None:
    """The inclusive step range a read selection's first axis touches (None: every step 0..T)."""
    first = sl[0] if isinstance(sl, tuple) and sl else sl
    if isinstance(first, (int, np.integer)):
        s = int(first) if first >= 0 else t + 1 + int(first)
        return (s, s)
    if isinstance(first, slice) and first.step in (None, 1):
        start, stop, _ = first.indices(t + 1)
        return (start, stop - 1)
    return None
