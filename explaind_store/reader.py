"""The lazy reader: ``open_run(path)`` gives a ``Run`` whose arrays are dask-backed xarray objects.

Nothing is read until asked: ``run.sel(step=slice(100, 200), tensor="embed.weight")`` touches only the chunks that
hold those steps of that tensor. Readers never look past ``committed_updates``, so a store that is still being
written (or was killed mid-write) reads cleanly up to its last commit. Opening a store never unpickles anything and
never imports code the user has not trusted (see ``specs.resolve_factory``).
"""

from __future__ import annotations

import json
import os
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
from .specs import data_factory, resolve_data, resolve_factory, safe_text
from .trajectory import OptimizerSpec, TrajectoryBlock


# Splits built from a data spec and checked, per process: a Dask worker opens the run once per task, and a corpus of
# tens of millions of tokens should be built once, not per task. Keyed by the spec and the recorded fingerprint;
# the few most recent are kept.
_BUILT: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_BUILT_MAX = 2  # a train and a val split


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
        for split, (x, y) in (data or {}).items():
            self.attach_data(split, x, y)
        if self.committed_updates < 0:
            raise storage.StoreError(
                f"{self.path} has no committed step yet (the recorder was interrupted before writing theta_0). "
                "Record it again with resume=True (`--resume` on the command line: it starts over at update 1) or "
                "overwrite=True (`--overwrite`)."
            )

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
        self._state_cache: dict[str, xr.Dataset] = {}
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
        return ds.assign_coords({schema.STEP: np.arange(t + 1)})

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
        """All parameters at one step as tensors (reads one chunk per tensor)."""
        self._check_steps(step)
        out = {n: torch.from_numpy(self._read(f"{schema.PARAMS}/{n}", step)) for n in self.tensor_names}
        return {k: v.to(dtype) for k, v in out.items()} if dtype is not None else out

    def block(self, lo: int, hi: int) -> TrajectoryBlock:
        """Updates ``lo+1..hi``: parameters and state at steps lo..hi and the per-update records (float64 math)."""
        t = self.committed_updates
        if not (0 <= lo < hi <= t):
            raise IndexError(f"block ({lo}, {hi}] is outside the recorded updates: steps run 0..{t}")
        sl = slice(lo, hi + 1)
        us = slice(lo + 1, hi + 1)
        u = schema.UPDATES
        groups = [schema.PARAMS, *self.state_names]
        scalars = (schema.BATCH_SIZE, schema.BATCH, schema.LR, schema.WEIGHT_DECAY, schema.OPT_STEP, schema.GRAD_SCALE)
        reqs = [(f"{g}/{n}", sl) for g in groups for n in self.tensor_names] + [(f"{u}/{k}", us) for k in scalars]
        it = iter(self._read_many(reqs))
        per_group = {g: {n: torch.from_numpy(next(it)) for n in self.tensor_names} for g in groups}
        params = per_group.pop(schema.PARAMS)
        state = per_group
        rec = {k: next(it) for k in scalars}
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
        return TrajectoryBlock(
            lo=lo,
            hi=hi,
            params=params,
            state=state,
            lr=torch.from_numpy(rec[schema.LR]),
            weight_decay=torch.from_numpy(rec[schema.WEIGHT_DECAY]),
            opt_step=torch.from_numpy(rec[schema.OPT_STEP]),
            grad_scale=torch.from_numpy(rec[schema.GRAD_SCALE]),
            batches=batches,
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
    if root.attrs.get(schema.ATTR_FORMAT) != schema.FORMAT_NAME:
        raise storage.StoreError(f"{path} is not an explaind store")
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
