"""The lazy reader: ``open_run(path)`` gives a ``Run`` whose arrays are dask-backed xarray objects.

Nothing is read until asked: ``run.sel(step=slice(100, 200), tensor="embed.weight")`` touches only the chunks that
hold those steps of that tensor. Readers never look past ``committed_updates``, so a store that is still being
written (or was killed mid-write) reads cleanly up to its last commit. Opening a store never unpickles anything and
never imports code the user has not trusted (see ``specs.resolve_factory``).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr
from torch import nn

from . import storage
from . import integrity, schema
from .integrity import DataChecksumError, MissingChunkError  # noqa: F401 - re-exported for callers
from .metadata import COMMIT_ARRAY, check_commit_point
from .specs import data_factory, resolve_data, resolve_factory, safe_text
from .replay import CheckpointData, Replayer, Segment
from .dropout import RngRecord
from .trajectory import OptimizerSpec, TrajectoryBlock, UpdateRecords


# Splits built from a data spec and checked, per process: a Dask worker opens the run once per task, and a corpus of
# tens of millions of tokens should be built once, not per task. Keyed by the spec and the recorded fingerprint;
# the few most recent are kept.
_BUILT: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_BUILT_MAX = 2  # a train and a val split


# replayed segments kept per Run: the most recent ones within this many bytes, and always the last two (a view read
# tensor by tensor asks for every segment once per tensor; a block may span two segments)
SEGMENT_CACHE_BYTES = 256 * 2**20


class CorruptChunkError(storage.StoreError):
    """A chunk failed its checksum or could not be decoded."""


class Run:
    """A recorded training run (read-only). Implements the engine's ``Trajectory`` protocol."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        model_factory: Callable[..., nn.Module] | None = None,
        data: dict[str, tuple[Any, Any]] | None = None,
        store: Any = None,
    ) -> None:
        self.path = storage.location(path)  # a Path, or the URL of a store in an object store
        self.root = storage.open_root(self.path) if store is None else _open_store_root(store, self.path)
        self._store = store
        self.attrs: dict[str, Any] = self.root.attrs.asdict()
        self.model_factory = model_factory
        self._arrays: dict[str, Any] = {}  # opened zarr arrays (their metadata: shapes), dropped by refresh()
        self._chunk_keys: dict[str, frozenset[str]] = {}  # chunk files present per array (integrity), ditto
        self._verified_splits: set[str] = set()  # stored splits whose checksum matched
        self._attached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._built: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # reference splits built from their spec
        # sparse checkpoints: replayed segments, a few most recent (each is K steps of parameters and state)
        self._segments: OrderedDict[tuple[int, int], Segment] = OrderedDict()
        self._replay_lock = threading.RLock()
        self._replayer: Replayer | None = None
        for split, (x, y) in (data or {}).items():
            self.attach_data(split, x, y)
        if self.committed_updates < 0:
            raise storage.StoreError(
                f"{self.path} has no committed step yet (the recorder was interrupted before writing theta_0). "
                "Record it again with resume=True (`--resume` on the command line: it starts over at update 1) or "
                "overwrite=True (`--overwrite`)."
            )
        if store is not None:  # open_root checked the array documents of a path; a store object's were not read
            self._check_commit_point()

    def _check_commit_point(self) -> None:
        """:func:`explaind_store.metadata.check_commit_point` against the opened arrays, where opening did not check
        the array documents (a store object, a refresh of a store still being written)."""
        try:
            arr = self._array(COMMIT_ARRAY)
        except KeyError:
            raise storage.StoreError(
                f"{self.path} has no {COMMIT_ARRAY} array, which every store holds: the store is incomplete (an "
                "interrupted copy?). Copy it again from an intact store, or record the run again."
            ) from None
        check_commit_point(self.attrs, int(arr.shape[0]), int(arr.chunks[0]), str(self.path))

    # --- metadata ------------------------------------------------------------------------------------------
    @property
    def committed_updates(self) -> int:
        """T: updates 1..T are committed; parameters exist for steps 0..T."""
        return int(self.attrs[schema.ATTR_COMMITTED])

    def refresh(self) -> Run:
        """Re-read the commit point of a store that is still being written."""
        if self._store is None:
            self.root = storage.open_root(self.path, check=False)  # polled while recording: metadata was checked on open
        else:
            self.root = _open_store_root(self._store, self.path)
        self.attrs = self.root.attrs.asdict()
        self._arrays = {}  # their shapes have grown with the new commits
        self._chunk_keys = {}  # new commits wrote new chunk files
        self.__dict__.pop("params", None)
        self.__dict__.pop("updates", None)
        self.__dict__.pop("_checkpoints", None)
        self.__dict__.pop("_rng_info", None)
        self._state_cache: dict[str, xr.Dataset] = {}
        self._segments.clear()  # the last segment grows with new commits
        self._check_commit_point()
        return self

    @property
    def tensors(self) -> list[dict[str, Any]]:
        return list(self.attrs[schema.ATTR_TENSORS])

    @property
    def tensor_names(self) -> list[str]:
        return [t["name"] for t in self.tensors]

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec.from_attrs(self.attrs[schema.ATTR_OPTIMIZER])

    @property
    def loss(self) -> dict[str, str]:
        return dict(self.attrs[schema.ATTR_LOSS])

    @property
    def model_spec(self) -> dict[str, Any] | None:
        return self.attrs.get(schema.ATTR_MODEL_SPEC)

    @property
    def state_names(self) -> list[str]:
        return list(self.attrs.get(schema.ATTR_STATE_NAMES, []))

    @property
    def chunk_updates(self) -> int:
        return int(self.attrs[schema.ATTR_CHUNK_UPDATES])

    @property
    def checkpoint_every(self) -> int:
        """K: parameters and optimizer state are stored at updates 0, K, 2K, ... and the last (1: every update)."""
        return int(self.attrs.get(schema.ATTR_CHECKPOINT_EVERY, 1))

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """The steps whose parameters and optimizer state are stored (all of 0..T unless the run is sparse)."""
        hit = self.__dict__.get("_checkpoints")
        if hit is None:
            t = self.committed_updates
            path = f"{schema.UPDATES}/{schema.CHECKPOINT}"
            if self.checkpoint_every == 1 or schema.CHECKPOINT not in self.root[schema.UPDATES]:
                hit = np.arange(t + 1)
            else:
                flags = np.asarray(self._read(path, slice(0, t + 1)), dtype=bool)
                flags[0] = True
                hit = np.flatnonzero(flags)
            self.__dict__["_checkpoints"] = hit
        return hit

    @property
    def sparse(self) -> bool:
        """Whether some steps are not stored but rebuilt by replaying the optimizer (``checkpoint_every > 1``)."""
        return len(self.checkpoint_steps) < self.committed_updates + 1

    def is_stored(self, step: int) -> bool:
        """Whether ``step``'s parameters and optimizer state are stored (else they are replayed)."""
        ck = self.checkpoint_steps
        i = int(np.searchsorted(ck, step))
        return i < len(ck) and int(ck[i]) == int(step)

    @property
    def splits(self) -> list[str]:
        return list(self.attrs[schema.ATTR_DATA]["splits"])

    @property
    def nonfinite_updates(self) -> list[int]:
        return [s for s in self.attrs.get(schema.ATTR_NONFINITE, []) if s <= self.committed_updates]

    def __repr__(self) -> str:
        opt = self.optimizer_spec
        return (
            f"<Run {self.path} updates={self.committed_updates} tensors={len(self.tensor_names)} "
            f"optimizer={opt.type} splits={self.splits}>"
        )

    # --- lazy xarray views -----------------------------------------------------------------------------------
    def _open_group(self, group: str) -> xr.Dataset:
        # the view reads lazily, chunk by chunk, so missing chunk files are looked for once here (a listing)
        integrity.require_chunks(self, integrity.array_paths(self, (group,)))
        ds = xr.open_zarr(self.root.store, group=group, consolidated=False, chunks={}, drop_variables=[schema.STEP])
        t = self.committed_updates
        ds = ds.isel({schema.STEP: slice(0, t + 1)})
        if group != schema.UPDATES and self.sparse:
            ds = ds.assign({n: (ds[n].dims, self._replayed_view(group, n, ds[n])) for n in ds.data_vars})
        stored = np.zeros(t + 1, dtype=bool)
        stored[self.checkpoint_steps] = True
        return ds.assign_coords({schema.STEP: np.arange(t + 1), schema.STORED: (schema.STEP, stored)})

    def _replayed_view(self, group: str, name: str, var: xr.DataArray) -> Any:
        """A dask array of ``group/name`` for steps 0..T: one block per segment between checkpoints, each read
        (checkpoints) or replayed (the steps between) when computed."""
        import dask
        import dask.array as da

        t = self.committed_updates
        ck = [int(c) for c in self.checkpoint_steps]
        edges = sorted({0, *(c + 1 for c in ck if c < t), t + 1})
        blocks = []
        for a, b in zip(edges[:-1], edges[1:]):
            shape = (b - a, *var.shape[1:])
            rows = dask.delayed(self._rows, pure=True)(group, name, a, b - 1)
            blocks.append(da.from_delayed(rows, shape, dtype=var.dtype))
        return da.concatenate(blocks, axis=0)

    def _rows(self, group: str, name: str, a: int, b: int) -> np.ndarray:
        """Steps ``a..b`` of one tensor of ``params`` or an optimizer state: stored where stored, else replayed."""
        out = []
        for s in range(a, b + 1):
            if self.is_stored(s):
                out.append(self._read(f"{group}/{name}", s))
            else:
                seg = self._segment_for(s)
                src = seg.params if group == schema.PARAMS else seg.state[group]
                out.append(src[name][s - seg.start].numpy())
        return np.stack(out)

    @cached_property
    def params(self) -> xr.Dataset:
        """Parameters ``(step, ...)`` for steps 0..T, one variable per tensor, lazy."""
        return self._open_group(schema.PARAMS)

    def state(self, name: str) -> xr.Dataset:
        """Optimizer state (``exp_avg``, ``exp_avg_sq`` or ``momentum_buffer``) for steps 0..T, lazy."""
        if name not in self.state_names:
            raise KeyError(f"this run has no optimizer state {name!r}; it has {self.state_names}")
        cache = self.__dict__.setdefault("_state_cache", {})
        if name not in cache:
            cache[name] = self._open_group(name)
        return cache[name]

    @property
    def optimizer_state(self) -> dict[str, xr.Dataset]:
        return {n: self.state(n) for n in self.state_names}

    @cached_property
    def updates(self) -> xr.Dataset:
        """Per-update records; index s describes update s (theta_{s-1} -> theta_s); index 0 is empty."""
        return self._open_group(schema.UPDATES)

    def sel(
        self,
        step: int | slice | Iterable[int] | None = None,
        tensor: str | Iterable[str] | None = None,
    ) -> xr.DataTree:
        """Lazy selection by step (label-based, inclusive slices) and tensor name(s), as an xarray DataTree.

        Children: ``params``, each optimizer state, and ``updates``.
        """
        names = self._tensor_list(tensor)
        children: dict[str, xr.Dataset] = {}
        for gname, ds in [(schema.PARAMS, self.params), *self.optimizer_state.items()]:
            children[gname] = ds[names]
        children[schema.UPDATES] = self.updates
        if step is not None:
            self._check_steps(step)
            children = {k: v.sel({schema.STEP: step}) for k, v in children.items()}
        return xr.DataTree.from_dict({f"/{k}": v for k, v in children.items()})

    def _tensor_list(self, tensor: str | Iterable[str] | None) -> list[str]:
        if tensor is None:
            return self.tensor_names
        names = [tensor] if isinstance(tensor, str) else list(tensor)
        unknown = [n for n in names if n not in self.tensor_names]
        if unknown:
            raise KeyError(f"unknown tensor(s) {unknown}; this run has {self.tensor_names}")
        return names

    def _check_steps(self, step: Any) -> None:
        t = self.committed_updates
        vals: list[int] = []
        if isinstance(step, slice):
            vals = [v for v in (step.start, step.stop) if v is not None]
        elif isinstance(step, (int, np.integer)):
            vals = [int(step)]
        else:
            vals = [int(v) for v in step]
        bad = [v for v in vals if v < 0 or v > t]
        if bad:
            raise IndexError(f"step(s) {bad} outside the recorded steps 0..{t} (steps count committed updates)")

    # --- eager access for computation ---------------------------------------------------------------------
    def _read(self, path: str, sl: Any) -> np.ndarray:
        arr = self._array(path)
        self._require(path, sl)
        try:
            return np.asarray(arr[sl])
        except Exception as exc:  # zarr raises codec-specific errors for bad checksums / truncated chunks
            raise CorruptChunkError(
                f"reading {path}[{_fmt_slice(sl)}] failed: {exc}. A chunk of this store is damaged; run "
                f"`explaind verify {self.path}` to list the damaged chunks."
            ) from exc

    def _require(self, path: str, sl: Any) -> None:
        """Raise MissingChunkError if a chunk file the selection reads is missing (it would read as fill values)."""
        steps = integrity.step_range(sl, self.committed_updates) if integrity.is_stepped(path) else None
        integrity.require_chunks(self, [path], steps)

    def _array(self, path: str) -> Any:
        """The opened zarr array at ``path`` (cached until :meth:`refresh`: opening reads its metadata)."""
        arr = self._arrays.get(path)
        if arr is None:
            arr = self._arrays[path] = self.root[path]
        return arr

    def _read_many(self, reqs: list[tuple[str, Any]]) -> list[np.ndarray]:
        """``_read`` of many (path, selection) pairs at once: zarr's async reads run concurrently, since a block of a
        transformer run is dozens of small arrays whose reads one after another would add up."""
        import asyncio

        from zarr.core.sync import sync

        arrays = [self._array(p) for p, _ in reqs]
        for p, sl in reqs:
            self._require(p, sl)
        if not all(hasattr(a, "_async_array") for a in arrays):  # not zarr-python 3's Array: one by one
            return [self._read(p, sl) for p, sl in reqs]

        async def gather() -> list[Any]:
            return await asyncio.gather(
                *(a._async_array.getitem(sl) for a, (_, sl) in zip(arrays, reqs)), return_exceptions=True
            )

        out = []
        for (path, sl), got in zip(reqs, sync(gather())):
            if isinstance(got, BaseException):
                raise CorruptChunkError(
                    f"reading {path}[{_fmt_slice(sl)}] failed: {got}. A chunk of this store is damaged; run "
                    f"`explaind verify {self.path}` to list the damaged chunks."
                ) from got
            out.append(np.asarray(got))
        return out

    def load_params(self, step: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All parameters at one step as tensors (reads one chunk per tensor; a step between sparse checkpoints is
        replayed from the checkpoint before it)."""
        self._check_steps(step)
        if self.is_stored(step):
            out = {n: torch.from_numpy(self._read(f"{schema.PARAMS}/{n}", step)) for n in self.tensor_names}
        else:
            seg = self._segment_for(int(step))
            out = {n: v[int(step) - seg.start].clone() for n, v in seg.params.items()}
        return {k: v.to(dtype) for k, v in out.items()} if dtype is not None else out

    # --- sparse checkpoints: replay ---------------------------------------------------------------------------
    def checkpoint_data(self, step: int) -> CheckpointData:
        """What the checkpoint at ``step`` stores (parameters, optimizer state, step counter, lr and decay)."""
        if not self.is_stored(step):
            raise IndexError(f"step {step} is not a checkpoint of this run; its checkpoints: "
                             f"{self.checkpoint_steps[:10].tolist()}...")
        groups = [schema.PARAMS, *self.state_names]
        u = schema.UPDATES
        reqs = [(f"{g}/{n}", step) for g in groups for n in self.tensor_names]
        reqs += [(f"{u}/{k}", step) for k in (schema.OPT_STEP, schema.LR, schema.WEIGHT_DECAY)]
        it = iter(self._read_many(reqs))
        per_group = {g: {n: torch.from_numpy(np.array(next(it))) for n in self.tensor_names} for g in groups}
        opt_step, lr, wd = next(it), next(it), next(it)
        return CheckpointData(
            step=int(step), params=per_group.pop(schema.PARAMS), state=per_group, opt_step=int(opt_step),
            lr=None if step == 0 else [float(v) for v in lr], weight_decay=None if step == 0 else [float(v) for v in wd],
        )

    def _segment_for(self, step: int, upto: int | None = None) -> Segment:
        """The replayed segment holding ``step`` as a replayed row: from the last checkpoint before it, to the next
        checkpoint (or only to ``upto``, when that is all the caller needs: a block ending inside the segment)."""
        ck = self.checkpoint_steps
        i = int(np.searchsorted(ck, step, side="left")) - 1  # last checkpoint < step
        start = int(ck[max(i, 0)])
        end = int(ck[i + 1]) if i + 1 < len(ck) else self.committed_updates
        return self._segment(start, end if upto is None else max(int(step), min(end, int(upto))))

    def _segment(self, start: int, end: int) -> Segment:
        with self._replay_lock:  # dask's threads may ask for the same segment at once: replay it once
            for key, hit in reversed(self._segments.items()):  # a longer replay from the same checkpoint holds it
                if key[0] == start and key[1] >= end:
                    self._segments.move_to_end(key)
                    return hit
            if self._replayer is None:
                self._replayer = Replayer(self)
            seg = self._replayer.segment(start, end)
            self._segments[(start, end)] = seg
            while len(self._segments) > 2 and sum(s.nbytes for s in self._segments.values()) > SEGMENT_CACHE_BYTES:
                self._segments.popitem(last=False)
            return seg

    def update_records(self, lo: int, hi: int) -> UpdateRecords:
        """The per-update records of updates ``lo+1..hi`` (batches, lr, weight decay, step counter, clip scale)."""
        u = schema.UPDATES
        us = slice(lo + 1, hi + 1)
        scalars = self._record_names()
        rec = dict(zip(scalars, self._read_many([(f"{u}/{k}", us) for k in scalars])))
        return self._records(lo, rec)

    @property
    def rng_info(self) -> dict[str, Any] | None:
        """Where the run's training forwards drew random numbers (``{"device", "dtype"}``), or None: a run without
        ``updates/rng_state`` drew none (see :mod:`explaind_store.dropout`)."""
        if "_rng_info" in self.__dict__:  # read once per refresh (a group listing is a request on object stores)
            return self.__dict__["_rng_info"]
        info = self.attrs.get(schema.ATTR_RNG)
        if info is None or schema.RNG_STATE not in self.root[schema.UPDATES]:
            self.__dict__["_rng_info"] = None
            return None
        if not (isinstance(info, dict) and info.get("device") in ("cpu", "cuda")
                and info.get("dtype") in ("float16", "bfloat16", "float32", "float64")):
            raise storage.StoreError(
                f"the store's {schema.ATTR_RNG} attribute is malformed ({safe_text(info)}); it was edited or damaged: "
                "re-record the run"
            )
        self.__dict__["_rng_info"] = dict(info)
        return dict(info)

    def _record_names(self) -> tuple[str, ...]:
        names = (schema.BATCH_SIZE, schema.BATCH, schema.LR, schema.WEIGHT_DECAY, schema.OPT_STEP, schema.GRAD_SCALE,
                 schema.LOSS)
        if self.rng_info is not None:
            names += (schema.RNG_STATE, schema.MICRO_SIZE)
        return names

    def _check_records(self, lo: int, rec: dict[str, np.ndarray]) -> None:
        """The per-update records are data from the store, checked before they index or scale anything: sample
        indices inside the training split (python would read a negative one from the end), torch's step counter
        from 1 and one more per update (Adam divides by ``1 - beta^step``), learning rates, weight decays and
        clipping scales finite and non-negative."""
        def bad(r: int, what: str) -> storage.StoreError:
            return storage.StoreError(
                f"update {lo + 1 + r} of {self.path}: {what}. The store's per-update records are damaged or were "
                "edited: restore the store from an intact copy, or record the run again."
            )

        raw = rec[schema.BATCH]
        n = int(self.attrs[schema.ATTR_DATA]["splits"][schema.TRAIN_SPLIT]["n"])
        wrong = (raw != schema.BATCH_PAD) & ((raw < 0) | (raw >= n))
        if wrong.any():
            r, j = (int(v[0]) for v in np.nonzero(wrong))
            raise bad(r, f"its batch holds sample index {int(raw[r, j])}, outside the training data (0..{n - 1})")
        opt = np.asarray(rec[schema.OPT_STEP]).reshape(-1)
        if len(opt) and (opt[0] < 1 or np.any(np.diff(opt) != 1)):
            r = 0 if opt[0] < 1 else int(np.nonzero(np.diff(opt) != 1)[0][0]) + 1
            raise bad(r, f"torch's step counter reads {int(opt[r])} (opt_step), but it counts updates from 1, one "
                         "more each update")
        for key in (schema.LR, schema.WEIGHT_DECAY, schema.GRAD_SCALE):
            v = np.asarray(rec[key], dtype=np.float64).reshape(len(raw), -1)
            wrong_v = ~np.isfinite(v) | (v < 0)
            if wrong_v.any():
                r = int(np.nonzero(wrong_v.any(axis=1))[0][0])
                raise bad(r, f"its {key} is {v[r].tolist()}, expected finite values >= 0")

    def _records(self, lo: int, rec: dict[str, np.ndarray]) -> UpdateRecords:
        self._check_records(lo, rec)
        sizes, raw = rec[schema.BATCH_SIZE], rec[schema.BATCH]
        batches = []
        for r, (row, n) in enumerate(zip(raw, sizes)):
            b = row[row != schema.BATCH_PAD]
            if len(b) != n or n == 0:
                raise storage.StoreError(
                    f"update {lo + 1 + r}: the batch record holds {len(b)} indices but batch_size says {n}; the "
                    f"store is inconsistent (run `explaind verify {self.path}`)."
                )
            batches.append(torch.from_numpy(b.copy()))
        rng = None
        if schema.RNG_STATE in rec:
            rng = []
            for r, (states, micro) in enumerate(zip(rec[schema.RNG_STATE], rec[schema.MICRO_SIZE])):
                m = int(np.count_nonzero(micro))
                if m == 0:
                    rng.append(None)
                    continue
                if np.any(micro[:m] <= 0) or np.any(micro[m:] != 0) or int(micro.sum()) != len(batches[r]):
                    raise storage.StoreError(
                        f"update {lo + 1 + r}: the micro-batch sizes {micro[:m].tolist()} of its generator states do "
                        f"not split its batch of {len(batches[r])} samples; the store is inconsistent (run "
                        f"`explaind verify {self.path}`)."
                    )
                rng.append(RngRecord(states=np.asarray(states[:m], dtype=np.uint8),
                                     sizes=tuple(int(v) for v in micro[:m])))
        return UpdateRecords(
            lr=torch.from_numpy(rec[schema.LR]),
            weight_decay=torch.from_numpy(rec[schema.WEIGHT_DECAY]),
            opt_step=torch.from_numpy(rec[schema.OPT_STEP]),
            grad_scale=torch.from_numpy(rec[schema.GRAD_SCALE]),
            batches=batches,
            rng=rng,
            loss=torch.from_numpy(np.asarray(rec[schema.LOSS], dtype=np.float64)) if schema.LOSS in rec else None,
        )

    def block(self, lo: int, hi: int) -> TrajectoryBlock:
        """Updates ``lo+1..hi``: parameters and state at steps lo..hi and the per-update records (float64 math).

        In a sparse run row ``lo`` is as :meth:`load_params` gives it, and each later step ``s`` comes from the
        replay that starts at the last checkpoint before ``s``; so a block that starts at a checkpoint and holds no
        other one but maybe ``hi`` (the engine's chunks) is one continuous replay, and ``stored_end`` then holds the
        stored parameters of checkpoint ``hi`` to compare with the replayed row ``hi``."""
        t = self.committed_updates
        if not (0 <= lo < hi <= t):
            raise IndexError(f"block ({lo}, {hi}] is outside the recorded updates: steps run 0..{t}")
        if self.sparse:
            return self._replayed_block(lo, hi)
        sl = slice(lo, hi + 1)
        us = slice(lo + 1, hi + 1)
        u = schema.UPDATES
        groups = [schema.PARAMS, *self.state_names]
        scalars = self._record_names()
        reqs = [(f"{g}/{n}", sl) for g in groups for n in self.tensor_names] + [(f"{u}/{k}", us) for k in scalars]
        it = iter(self._read_many(reqs))
        per_group = {g: {n: torch.from_numpy(next(it)) for n in self.tensor_names} for g in groups}
        params = per_group.pop(schema.PARAMS)
        state = per_group
        rec = self._records(lo, {k: next(it) for k in scalars})
        return TrajectoryBlock(lo=lo, hi=hi, params=params, state=state, lr=rec.lr, weight_decay=rec.weight_decay,
                               opt_step=rec.opt_step, grad_scale=rec.grad_scale, batches=rec.batches, rng=rec.rng,
                               loss=rec.loss)

    def _replayed_block(self, lo: int, hi: int) -> TrajectoryBlock:
        names, snames = self.tensor_names, self.state_names
        if self.is_stored(lo):
            ck = self.checkpoint_data(lo)
            first_p, first_s = ck.params, ck.state
        else:
            seg = self._segment_for(lo, upto=hi)
            first_p = {n: seg.params[n][lo - seg.start] for n in names}
            first_s = {sn: {n: seg.state[sn][n][lo - seg.start] for n in names} for sn in snames}
        rows_p = {n: [first_p[n][None]] for n in names}
        rows_s = {sn: {n: [first_s[sn][n][None]] for n in names} for sn in snames}
        s = lo + 1
        while s <= hi:
            seg = self._segment_for(s, upto=hi)
            stop = min(hi, seg.end)
            a, b = s - seg.start, stop - seg.start + 1
            for n in names:
                rows_p[n].append(seg.params[n][a:b])
                for sn in snames:
                    rows_s[sn][n].append(seg.state[sn][n][a:b])
            s = stop + 1
        rec = self.update_records(lo, hi)
        stored_end = None
        if self.is_stored(hi):
            stored_end = {n: torch.from_numpy(v) for n, v in zip(
                names, self._read_many([(f"{schema.PARAMS}/{n}", hi) for n in names]))}
        return TrajectoryBlock(
            lo=lo, hi=hi,
            params={n: torch.cat(v) for n, v in rows_p.items()},
            state={sn: {n: torch.cat(v) for n, v in d.items()} for sn, d in rows_s.items()},
            lr=rec.lr, weight_decay=rec.weight_decay, opt_step=rec.opt_step, grad_scale=rec.grad_scale,
            batches=rec.batches, stored_end=stored_end, rng=rec.rng, loss=rec.loss,
        )

    def split(self, name: str = schema.TRAIN_SPLIT) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of a data split (checked against its fingerprint): attached data wins, then the
        store's arrays, then a split recorded by reference built through its trusted dataset factory."""
        if name in self._attached:
            return self._attached[name]
        info = self.attrs[schema.ATTR_DATA]["splits"].get(name)
        if info is None:
            raise KeyError(f"this run has no data split {name!r}; it has {self.splits}")
        if info.get("mode") != "stored" and "spec" in info:
            if name not in self._built:
                self._built[name] = self._build_split(name, info)
            return self._built[name]
        if info.get("mode") != "stored":
            raise storage.StoreError(
                f"split {name!r} is stored by reference only (fingerprint {info['fingerprint']}); pass the data: "
                f"open_run(path, data={{{name!r}: (inputs, targets)}})"
            )
        x = self._read(schema.data_path(name, schema.INPUTS), slice(None))
        y = self._read(schema.data_path(name, schema.TARGETS), slice(None))
        if name not in self._verified_splits:  # the first read of each split is checked against its checksum
            integrity.check_fingerprint(self, name, x, y)
            self._verified_splits.add(name)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _build_split(self, name: str, info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        spec = info["spec"]
        data_factory(spec)  # refuses untrusted factories before importing them, even when the data is cached
        key = (json.dumps(spec, sort_keys=True), str(info.get("fingerprint")))
        if key in _BUILT:
            _BUILT.move_to_end(key)
            return _BUILT[key]
        inputs, targets = resolve_data(spec)
        x, y = _as_numpy(inputs), _as_numpy(targets)
        got = storage.fingerprint(x, y)
        if got != info.get("fingerprint"):
            raise DataChecksumError(
                f"{self.path}: split {name!r} is recorded by reference to the dataset factory "
                f"{safe_text(spec.get('factory'))}, but the factory gives other data on this machine (another Python "
                f"version? other files or library versions?) than the run was trained on ({got} != recorded "
                f"{safe_text(info.get('fingerprint'))}). Results from it would be wrong; pass the original data: "
                f"open_run(path, data={{{name!r}: (inputs, targets)}})."
            )
        _BUILT[key] = (torch.from_numpy(x), torch.from_numpy(y))
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
        return _BUILT[key]

    def attach_data(self, split: str, inputs: Any, targets: Any) -> None:
        """Provide a split recorded by reference; refuses data whose fingerprint differs from the recorded one."""
        info = self.attrs[schema.ATTR_DATA]["splits"].get(split)
        if info is None:
            raise KeyError(f"this run has no data split {split!r}; it has {self.splits}")
        x, y = _as_numpy(inputs), _as_numpy(targets)
        fp = storage.fingerprint(x, y)
        if fp != info["fingerprint"]:
            raise storage.StoreError(
                f"the data given for split {split!r} is not the data this run was trained on (fingerprint {fp} != "
                f"recorded {info['fingerprint']}). Pass exactly the arrays given to the Recorder."
            )
        self._attached[split] = (torch.from_numpy(x), torch.from_numpy(y))

    def build_model(self) -> nn.Module:
        """A fresh model from the store's spec (trusted factories only), with static tensors loaded."""
        spec = self.model_spec
        if spec is None and self.model_factory is None:
            raise storage.StoreError(
                "this run has no model_spec; pass model_factory= to open_run() so the model can be rebuilt"
            )
        model = resolve_factory(spec or {}, self.model_factory)
        if schema.STATIC in self.root:
            integrity.require_chunks(self, integrity.array_paths(self, (schema.STATIC,)))
            _load_static(model, self.root[schema.STATIC])
        return model

    def model(self, step: int | None = None) -> nn.Module:
        """The model with the parameters of ``step`` (default: the last committed), in eval mode."""
        step = self.committed_updates if step is None else int(step)
        model = self.build_model()
        params = self.load_params(step)
        missing = set(params) - set(dict(model.named_parameters()))
        if missing:
            raise storage.StoreError(f"the model built from the spec lacks tensors {sorted(missing)} found in the store")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in params:
                    if tuple(p.shape) != tuple(params[n].shape):
                        raise storage.StoreError(
                            f"tensor {n}: the model built from the spec has shape {tuple(p.shape)}, the store "
                            f"{tuple(params[n].shape)}; the model_spec kwargs do not match this run"
                        )
                    p.copy_(params[n])
        return model.eval()

    def verify(self, **kwargs: Any) -> Any:
        """Check the record (see ``explaind_store.verify.verify``)."""
        from .verify import verify

        return verify(self, **kwargs)

    def nbytes_on_disk(self) -> int:
        """Bytes the store takes (its files on disk, or its objects' sizes in an object store)."""
        return storage.tree_nbytes(self.path)


def _as_numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _load_static(model: nn.Module, group: zarr.Group) -> None:
    """Frozen parameters and buffers stored once under ``static/``, put into ``model``. Non-persistent buffers (not
    in the state dict, e.g. a causal mask) are copied in place; a name the model does not have or a size that
    differs is an error, since the store then does not belong to the model its spec builds."""
    live = dict(model.named_parameters())
    live.update(model.named_buffers())
    persistent = set(model.state_dict())
    loadable: dict[str, torch.Tensor] = {}
    for name, arr in group.arrays():
        target = live.get(name)
        if target is None:
            raise storage.StoreError(
                f"the store holds a static tensor {safe_text(name)} that the model built from its spec does not have "
                "(not a parameter or buffer of it); the model_spec does not match this run"
            )
        value = torch.from_numpy(np.asarray(arr[...]))
        if value.numel() != target.numel():
            raise storage.StoreError(
                f"static tensor {safe_text(name)} has {value.numel()} elements in the store but {target.numel()} in "
                "the model built from the spec; the model_spec kwargs do not match this run"
            )
        value = value.reshape(target.shape)
        if name in persistent:
            loadable[name] = value
        else:
            with torch.no_grad():
                target.copy_(value)
    model.load_state_dict(loadable, strict=False)


def _fmt_slice(sl: Any) -> str:
    if isinstance(sl, slice):
        return f"{'' if sl.start is None else sl.start}:{'' if sl.stop is None else sl.stop}"
    return str(sl)


def _open_store_root(store: Any, path: storage.Location) -> zarr.Group:
    root = zarr.open_group(store, mode="r", zarr_format=3)
    storage.check_explaind_root(root.attrs.asdict(), path)
    return root


def open_run(
    path: str | os.PathLike[str],
    *,
    model_factory: Callable[..., nn.Module] | None = None,
    data: dict[str, tuple[Any, Any]] | None = None,
    store: Any = None,
) -> Run:
    """Open a recorded run lazily.

    Args:
        path: the store: a directory, or an fsspec URL (``s3://bucket/run.zarr``; credentials come from the
            environment, see docs/format.md, "Object stores").
        model_factory: builds the model (called with the spec's kwargs); needed when the store's factory is not in
            a trusted module (built-in examples, or ``$EXPLAIND_TRUSTED_MODULES``).
        data: splits recorded by reference, ``{"train": (inputs, targets)}``; checked against their fingerprints.
            A split recorded with a data spec is built through its trusted dataset factory when not given here.
        store: a zarr Store to read through instead of the path (e.g. a ``LoggingStore`` wrapper).
    """
    return Run(path, model_factory=model_factory, data=data, store=store)
