"""The recorder: three lines in a plain PyTorch training loop give a crash-safe, compressed trajectory store.

    rec = Recorder("run.zarr", model, optimizer, data=(x_train, y_train), loss="cross_entropy", model_spec=spec)
    ...  loss.backward(); optimizer.step()
    rec.record(batch_indices, loss=loss.item())

With gradient accumulation, pass the update's micro-batches as a list (``rec.record([idx_1, idx_2], ...)``): they
form one batch, and the loss the store knows (mean over that whole batch) must be what the accumulated gradient
is the gradient of. With clipping, build the recorder with ``max_grad_norm=`` and pass the total norm that
``torch.nn.utils.clip_grad_norm_`` returned (``rec.record(idx, grad_norm=norm)``): the scale is computed exactly
as torch computes it (:func:`clip_scale`).

It captures theta_0 and the initial optimizer state on construction, and through optimizer step hooks the learning
rate and weight decay each update actually used (whatever scheduler sets them).
"""

from __future__ import annotations

import fcntl
import json
import operator
import os
import shutil  # noqa: F401 - kept for code that merges in here
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from . import storage
from . import dropout
from . import heap
from . import modes
from . import optim as optim_mod
from . import schema
from .metadata import valid_name
from .specs import data_spec, normalize_loss, resolve_data, safe_text
from .writer import BufferRow, ChunkBuffer, Row, Segment, make_writer, writer_kind


class RecorderError(RuntimeError):
    """The recorder was used in a way that would make the record wrong; the message says how to fix it."""


ArrayLike = torch.Tensor | np.ndarray


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _acquire_lock(path: storage.Location) -> int | None:
    """One writer per store: an flock on the store directory, which the OS drops when the process dies (so kill -9
    never leaves a stale lock) and which adds no file to the Zarr hierarchy.

    An object store (a URL) has no lock that dies with its holder, so none is taken there (None): one recorder per
    URL is the caller's to ensure (docs/format.md, "Object stores")."""
    if not isinstance(path, Path):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RecorderError(
            f"another recorder is already writing to {path}. A store has one writer at a time: wait for it to "
            "finish, or record to another path."
        ) from None
    return fd


def _checked_data_spec(split: str, spec: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """The data spec of ``split`` as stored, after building it once through the trust rule and checking that it
    gives exactly the arrays being recorded (a wrong spec would only show when someone opens the run)."""
    if not isinstance(spec, dict) or set(spec) - {"factory", "kwargs"}:
        raise RecorderError(
            f"data_specs[{split!r}] must be {{'factory': 'module:function', 'kwargs': {{...}}}}; build it with "
            "explaind_store.specs.data_spec(factory, **kwargs)"
        )
    stored = data_spec(spec.get("factory"), **dict(spec.get("kwargs") or {}))
    x, y = resolve_data(stored)
    got = storage.fingerprint(_np(x), _np(y))
    if got != fingerprint:
        raise RecorderError(
            f"data_specs[{split!r}] ({stored['factory']} with {stored['kwargs']}) gives other data than the arrays "
            f"passed for split {split!r} ({got} != {fingerprint}); pass the arrays the factory returns, or fix its "
            "kwargs"
        )
    return stored


def _killed_during_creation(path: storage.Location) -> bool:
    """An explaind store whose creation was interrupted before its first commit (``committed_updates`` is -1)."""
    try:
        attrs = storage.open_root(path).attrs.asdict()
    except storage.StoreError:
        return False
    return int(attrs.get(schema.ATTR_COMMITTED, 0)) < 0


def _remove_partials(path: storage.Location) -> None:
    """Temporary files of writes that a crash interrupted (zarr writes chunks to *.partial, then renames). An object
    store has none: an object appears whole when its upload completes, or not at all."""
    if not isinstance(path, Path):
        return
    for p in path.rglob("*.partial"):
        p.unlink(missing_ok=True)


def _scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    """The scheduler's state as of now, cheaply: JSON encoding waits for the writer (only committed rows need it).
    Lists and dicts one level down are copied, so a scheduler that updates them in place cannot change the past."""
    if scheduler is None:
        return None
    return {k: (v.copy() if isinstance(v, (list, dict)) else v) for k, v in scheduler.state_dict().items()}


def _json_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    try:
        return json.loads(json.dumps(state, default=_tensor_default))
    except TypeError as exc:
        raise RecorderError(
            f"the scheduler's state_dict is not JSON-serialisable ({exc}), and a store never holds pickles. "
            "Use a module-level function (not a lambda closure over objects) in LambdaLR, or pass scheduler=None "
            "and restore the scheduler yourself after resume."
        ) from None


def _encode_commit_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Writer side: the scheduler states of the committing row (and of its last checkpoint), as JSON."""
    for key in (schema.ATTR_SCHEDULER_STATE, schema.ATTR_CHECKPOINT_SCHEDULER):
        if key in attrs:
            attrs = {**attrs, key: _json_state(attrs[key])}
    return attrs


def clip_scale(total_norm: float | torch.Tensor, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` multiplied the gradients by, given the total
    norm it returned: ``min(1, max_norm / (total_norm + 1e-6))``, evaluated in float32 with torch's own operations
    so that ``grad * clip_scale(...)`` equals the clipped gradient bit for bit (for float32 gradients)."""
    norm = torch.as_tensor(total_norm, dtype=torch.float32).detach().cpu()
    clip_coef = max_norm / (norm + 1e-6)  # the same expression (and so the same rounding) as torch's clipping
    return float(torch.clamp(clip_coef, max=1.0))


def _batch_array(batch_indices: Any) -> np.ndarray:
    """One update's sample indices, flat; a list of arrays (the update's micro-batches) is concatenated."""
    if type(batch_indices) is torch.Tensor and batch_indices.device.type == "cpu":  # the usual case, per update
        return batch_indices.detach().numpy().reshape(-1)
    if isinstance(batch_indices, (list, tuple)) and batch_indices and all(
        isinstance(b, (list, tuple, np.ndarray, torch.Tensor)) for b in batch_indices
    ):
        return np.concatenate([_batch_array(b) for b in batch_indices])
    if isinstance(batch_indices, np.ndarray):
        return batch_indices.reshape(-1)
    return np.asarray(_np(torch.as_tensor(batch_indices))).reshape(-1)


def _micro_sizes(batch_indices: Any) -> list[int]:
    """The number of samples of each micro-batch ``record()`` was given (one entry for a plain batch)."""
    if isinstance(batch_indices, (list, tuple)) and batch_indices and all(
        isinstance(b, (list, tuple, np.ndarray, torch.Tensor)) for b in batch_indices
    ):
        return [int(_batch_array(b).size) for b in batch_indices]
    return [int(_batch_array(batch_indices).size)]


def _tensor_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


class Recorder:
    """Records a training run into a Zarr v3 store. Use as a context manager or call ``close()``.

    Args:
        path: directory of the store (one Zarr group per run), or an fsspec URL such as ``s3://bucket/run.zarr``
            (credentials from the environment; no writer lock there, see docs/format.md, "Object stores").
        model: the module being trained; its trainable parameters are recorded.
        optimizer: ``torch.optim.AdamW``, ``Adam`` or ``SGD`` over those parameters.
        data: ``(inputs, targets)`` of the training set; batch indices refer to it.
        loss: ``"cross_entropy"`` (logits), ``"nll"`` (log-probs) or ``"mse"``, mean over the batch.
        model_spec: ``{"factory": "module:callable", "kwargs": {...}}`` to rebuild the model (JSON, never a pickle).
        splits: extra named data splits, e.g. ``{"val": (x_val, y_val)}`` (queries can then say ``"val[:10]"``).
        scheduler: an lr scheduler whose state is saved with each commit so ``resume=True`` can restore it.
        resume: continue a store (model, optimizer and scheduler are restored to the last committed update).
        resume_at: continue a store at update ``S`` instead (implies ``resume``), keeping the model, optimizer and
            scheduler as the caller restored them from its own checkpoint of update ``S`` (a ``Trainer`` checkpoint):
            the store's updates after ``S`` are dropped and recorded again. The live state is first compared with
            the store's update ``S`` where the store holds it (refused if they differ: nothing is dropped then); a
            store with fewer than ``S`` committed updates is refused.
        overwrite: replace an existing store at ``path``.
        chunk_updates: steps per chunk (the flush interval); by default ~4 MB chunks for the largest tensor.
        lossy_keepbits: opt-in lossy BitRound of float mantissas (relative error <= 2^-(keepbits+1)).
        store_data: store the data arrays (default) or only a fingerprint to check them on use.
        data_specs: splits to record by reference to a trusted dataset factory instead of storing them,
            ``{"train": data_spec("pkg.mod:fn", **kwargs)}`` (see ``specs.data_spec``): the factory is called once
            here and must give exactly the arrays passed as that split; readers rebuild the split through it (same
            trust rule as model factories) and check its fingerprint. Other splits follow ``store_data``.
        max_grad_norm: the ``max_norm`` the loop clips gradients to; ``record()`` then takes ``grad_norm=`` (the
            total norm ``clip_grad_norm_`` returned) and stores the exact clipping scale.
        checkpoint_every: store parameters and optimizer state only at updates 0, K, 2K, ... and the last one
            (default 1: every update). Every update still stores what replaying it needs (batch, lr, weight
            decay, clipping scale, loss); readers rebuild the steps between checkpoints by replaying the optimizer
            from the checkpoint before them (``explaind_store.replay``). A killed sparse recording resumes from its
            last checkpoint: the updates after it are recorded again.
        writer: ``"thread"`` (a background thread; the default, or ``$EXPLAIND_WRITER``) or ``"process"`` (encode
            and write in a separate process fed through shared memory, off the training process's GIL; stores that
            are not a local directory, and sparse runs (``checkpoint_every > 1``), get the thread).
        micro_batches: runs with dropout: the most micro-batches (training forwards) one update accumulates, which
            sizes the record of generator states (default: as many as the first update with dropout had; an update
            with more is refused).

    The training forward must be reproducible from the store: BatchNorm in train mode, modules with internal
    dropout (``nn.MultiheadAttention(dropout=...)``, RNN dropout), and buffers that change during training, are
    refused with a RecorderError (see ``explaind_store.modes``); the mode each module trains in is recorded
    (``train_mode``) and used to rebuild the model. Dropout through ``torch.nn.functional.dropout`` (``nn.Dropout``
    modules, ``F.dropout`` calls) is recorded: when a training forward (one run with gradients enabled) moves the
    generator, the generator state at the start of every training forward is stored (``updates/rng_state``) and
    readers regenerate the masks from it (``explaind_store.dropout``). Each update's training forwards must then
    be its micro-batches, in the order given to ``record()``.

    Parameters that get no gradient at the first update (an unused pooler or positional table; torch's optimizers
    skip them, so they never change) are stored once under ``static/`` as constants (``constant_tensors``) and left
    out of the recorded tensors; one that gets a gradient at some updates only is refused.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: tuple[ArrayLike, ArrayLike] | None = None,
        *,
        loss: str | dict[str, str] = "cross_entropy",
        model_spec: dict[str, Any] | None = None,
        splits: dict[str, tuple[ArrayLike, ArrayLike]] | None = None,
        scheduler: Any = None,
        resume: bool = False,
        resume_at: int | None = None,
        overwrite: bool = False,
        chunk_updates: int | None = None,
        lossy_keepbits: int | None = None,
        clevel: int = storage.DEFAULT_CLEVEL,
        store_data: bool = True,
        data_specs: dict[str, dict[str, Any]] | None = None,
        queue_chunks: int = 4,
        max_grad_norm: float | None = None,
        checkpoint_every: int | None = None,
        writer: str | None = None,
        micro_batches: int | None = None,
    ) -> None:
        try:
            self._writer_kind = writer_kind(writer)
        except ValueError as exc:
            raise RecorderError(str(exc)) from None
        if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or checkpoint_every < 1):
            raise RecorderError(f"checkpoint_every must be a whole number >= 1, got {checkpoint_every!r}")
        if resume_at is not None and (int(resume_at) != resume_at or resume_at < 0):
            raise RecorderError(f"resume_at must be a whole number >= 0 (an update index), got {resume_at!r}")
        self._resume_at = None if resume_at is None else int(resume_at)
        if micro_batches is not None and (int(micro_batches) != micro_batches or micro_batches < 1):
            raise RecorderError(f"micro_batches must be a whole number >= 1, got {micro_batches!r}")
        self.micro_batches = None if micro_batches is None else int(micro_batches)
        self.checkpoint_every = 1 if checkpoint_every is None else int(checkpoint_every)
        self._explicit_k = checkpoint_every is not None
        self._ckpt_sched: Any = None  # scheduler state of the last checkpoint (see schema.ATTR_CHECKPOINT_SCHEDULER)
        self._last_checkpoint = 0
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise RecorderError(f"max_grad_norm must be positive (or None when the loop does not clip), got {max_grad_norm!r}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.path = storage.location(path)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.kind = optim_mod.optimizer_kind(optimizer)
        self._lock_fd: int | None = None
        self._closed = False
        self._hooks: list[Any] = []
        self._steps_since_record = 0
        self._pending: dict[str, Any] | None = None
        self._constants: list[str] | None = None  # decided at the first update (see _settle_constants)
        self._constant_params: dict[str, torch.Tensor] = {}
        self._settled = False
        # training forwards since the last record(): (generator state at their start, whether they drew from it)
        self._forwards: list[tuple[torch.Tensor, bool]] = []
        self._fwd_state: torch.Tensor | None = None
        self._rng_device = dropout.generator_device(model)
        self._read_rng = dropout.state_reader(self._rng_device)

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        bad = [n for n, _ in named if not valid_name(n)]
        if bad:
            raise RecorderError(
                f"parameter names {[safe_text(n) for n in bad[:3]]} cannot name arrays in a store (a name is a path: "
                "no '/', '\\', control characters or empty dotted parts). Rename the modules that hold them."
            )
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._id_to_name = {id(p): n for n, p in named}
        self._check_optimizer_covers_model(model)
        self._check_forward(model)
        self._watched = modes.watched_modules(model)  # whose mode record() re-checks (cheap)
        self._buffer_watch = modes.BufferWatch(model)
        self._modes = modes.describe_modes(model)
        self.state_names = optim_mod.state_names(self.kind, optimizer.param_groups)
        self.n_train = None if data is None else len(data[0])

        try:
            self._open_or_create(data, loss, model_spec, splits, resume or resume_at is not None, overwrite,
                                 chunk_updates, lossy_keepbits, clevel, store_data, data_specs or {})
        except BaseException:
            self._release_lock()
            raise
        self._opt_attrs = self.root.attrs[schema.ATTR_OPTIMIZER]
        self._static_fp = optim_mod.static_fingerprint(optimizer)
        self._scheduler_checked = False
        self._set_packs()
        # the writer frees a chunk's encoded buffers every chunk: without this its heap is trimmed and regrown, and
        # every trim flushes the training thread's TLB (explaind_store.heap)
        heap.keep_heap()
        # Rows between sparse checkpoints carry no parameters; only the thread writer writes such rows.
        kind = "thread" if self.checkpoint_every > 1 else self._writer_kind
        self._writer = make_writer(
            kind, self.root, self._arrays, self._batch_array, self.chunk_updates, queue_size=queue_chunks,
            packs={g: pack[0] for g, pack in self._packs.items()}, encode_attrs=_encode_commit_attrs,
            lock_fd=self._lock_fd,
        )
        # Rows of packed groups are copied straight into the writer's reusable chunk buffers (one foreach copy per
        # group); only a run that stores every update fills whole chunks, and only the thread writer has them.
        self._in_place = self.checkpoint_every == 1 and hasattr(self._writer, "row_buffer")
        groups = (schema.PARAMS, *self.state_names)
        self._step_paths = [f"{g}/{schema.STEP}" for g in (*groups, schema.UPDATES)]
        self._update_paths: dict[str, str] = {}
        if self.committed_at_open < 0:
            self._writer.put(self._row(0, self._initial_updates_row()))
            self._writer.flush()
        self.updates_done = max(self.committed_at_open, 0)
        self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
        self._hooks.append(optimizer.register_step_post_hook(self._post_step))
        self._hooks.append(model.register_forward_pre_hook(self._pre_forward))
        self._hooks.append(model.register_forward_hook(self._post_forward))

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open_or_create(
        self,
        data: tuple[ArrayLike, ArrayLike] | None,
        loss: str | dict[str, str],
        model_spec: dict[str, Any] | None,
        splits: dict[str, tuple[ArrayLike, ArrayLike]] | None,
        resume: bool,
        overwrite: bool,
        chunk_updates: int | None,
        lossy_keepbits: int | None,
        clevel: int,
        store_data: bool,
        data_specs: dict[str, dict[str, Any]],
    ) -> None:
        exists = storage.has_content(self.path)
        if self._resume_at and (not exists or _killed_during_creation(self.path)):
            raise RecorderError(
                f"cannot resume {self.path} at update {self._resume_at}: there is no store there (or only one killed "
                "before its first update). A store records a run from its first update: record the run from the "
                "start (or give the path of its store)."
            )
        if resume and exists and data is not None and _killed_during_creation(self.path):
            # nothing was committed: starting over is the resume (the data arrays may be half-written too)
            self._replace_existing()
            exists = False
        if resume and exists:
            self._open_for_resume(loss, model_spec)
        else:
            if exists and not overwrite:
                raise RecorderError(
                    f"{self.path} already exists and is not empty. Pass resume=True (`--resume` on the command "
                    "line) to continue that run, overwrite=True (`--overwrite`) to replace it, or choose another path."
                )
            if exists and overwrite:
                self._replace_existing()
            if data is None:
                raise RecorderError("data=(inputs, targets) is required: batch indices refer to the training data")
            self._create(data, splits or {}, loss, model_spec, chunk_updates, lossy_keepbits, clevel, store_data,
                         data_specs)

    # --- set-up ----------------------------------------------------------------------------------------------
    def _check_optimizer_covers_model(self, model: nn.Module) -> None:
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        all_named = {id(p): n for n, p in model.named_parameters()}
        for p in in_opt:
            if p not in all_named:
                raise RecorderError("the optimizer holds a tensor that is not a parameter of the model")
            if p not in self._id_to_name:
                raise RecorderError(f"parameter {all_named[p]} is in the optimizer but has requires_grad=False")
        missing = [n for n, p in zip(self.names, self.params) if id(p) not in in_opt]
        if missing:
            raise RecorderError(
                f"parameters {missing} require grad but are not in the optimizer, so they never change. "
                "Set requires_grad=False on them (they are then stored once as static tensors) or add them."
            )
        for p in self.params:
            if p.dtype not in (torch.float32, torch.float64, torch.float16):
                raise RecorderError(f"parameters of dtype {p.dtype} are not supported (use float32 or float64)")

    def _check_forward(self, model: nn.Module) -> None:
        problems = modes.forward_problems(model)
        if problems:
            raise RecorderError(
                "this model's training forward cannot be reproduced from the store:\n  - " + "\n  - ".join(problems)
                + "\n" + modes.FORWARD_ADVICE
            )

    def _replace_existing(self) -> None:
        try:
            storage.open_root(self.path, check=False)  # a store whose array metadata is damaged may be replaced
        except storage.StoreError:
            raise RecorderError(
                f"{self.path} exists and is not an explaind store; refusing to delete it even with overwrite=True "
                "(`--overwrite`)"
            ) from None
        fd = _acquire_lock(self.path)  # never delete a store another process is writing
        if fd is not None:
            os.close(fd)
        storage.remove_tree(self.path)

    def _create(
        self,
        data: tuple[ArrayLike, ArrayLike],
        splits: dict[str, tuple[ArrayLike, ArrayLike]],
        loss: str | dict[str, str],
        model_spec: dict[str, Any] | None,
        chunk_updates: int | None,
        lossy_keepbits: int | None,
        clevel: int,
        store_data: bool,
        data_specs: dict[str, dict[str, Any]],
    ) -> None:
        all_splits = {schema.TRAIN_SPLIT: data, **splits}
        bad = [safe_text(s) for s in all_splits if not valid_name(s)]
        if bad:
            raise RecorderError(f"split names {bad} cannot name folders in a store: use letters, digits, '_' or '-'")
        unknown = sorted(set(data_specs) - set(all_splits))
        if unknown:
            raise RecorderError(
                f"data_specs names splits {unknown} that were not given; the splits are {sorted(all_splits)} "
                "(pass the data of each split too: the spec is checked against it)"
            )
        arrays = {split: (_np(x), _np(y)) for split, (x, y) in all_splits.items()}
        # before anything is written: a spec that is refused or gives other data leaves no half-made store
        stored_specs = {
            split: _checked_data_spec(split, spec, storage.fingerprint(*arrays[split]))
            for split, spec in data_specs.items()
        }
        if isinstance(self.path, Path):
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _acquire_lock(self.path)
        step_bytes = max(p.numel() * p.element_size() for p in self.params)
        self.chunk_updates = int(chunk_updates or storage.default_chunk_updates(step_bytes))
        if self.chunk_updates < 1:
            raise RecorderError("chunk_updates must be at least 1")
        groups_attr = optim_mod.optimizer_attrs(self.optimizer, self._id_to_name)
        tensors = [
            {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""), "group": g}
            for g, grp in enumerate(self.optimizer.param_groups)
            for p in grp["params"]
            for n in [self._id_to_name[id(p)]]
        ]
        order = {n: i for i, n in enumerate(self.names)}
        tensors.sort(key=lambda t: order[t["name"]])
        # "w" would delete the lock file
        root = zarr.open_group(store=storage.open_store(self.path), mode="a", zarr_format=3)
        # mark the directory as an explaind store with nothing committed before writing anything else, so a kill
        # during creation leaves a store that --resume / --overwrite recognise rather than an anonymous Zarr group
        root.attrs.update({schema.ATTR_FORMAT: schema.FORMAT_NAME, schema.ATTR_FORMAT_VERSION: schema.FORMAT_VERSION,
                           schema.ATTR_COMMITTED: -1})
        data_attrs = {"splits": {}}
        for split, (xs, ys) in arrays.items():
            if len(xs) != len(ys):
                raise RecorderError(f"split {split!r}: {len(xs)} inputs but {len(ys)} targets")
            info: dict[str, Any] = {"n": len(xs), "fingerprint": storage.fingerprint(xs, ys)}
            if split in data_specs:
                info["spec"] = stored_specs[split]
            if store_data and split not in data_specs:
                g = root.require_group(schema.data_path(split))
                storage.write_static(g, schema.INPUTS, xs, schema.data_dims(split, schema.INPUTS, xs.ndim))
                storage.write_static(g, schema.TARGETS, ys, schema.data_dims(split, schema.TARGETS, ys.ndim))
                storage.write_static(g, schema.SAMPLE, np.arange(len(xs), dtype=np.int64), (schema.SAMPLE,))
                info["mode"] = "stored"
            else:
                info["mode"] = "reference"
                info.update(inputs_shape=list(xs.shape), targets_shape=list(ys.shape))
            data_attrs["splits"][split] = info
        self._write_static_tensors(root)
        root.attrs.update(
            {
                schema.ATTR_FORMAT: schema.FORMAT_NAME,
                schema.ATTR_FORMAT_VERSION: schema.FORMAT_VERSION,
                schema.ATTR_COMMITTED: -1,
                schema.ATTR_MODEL_SPEC: model_spec,
                schema.ATTR_OPTIMIZER: groups_attr,
                schema.ATTR_LOSS: normalize_loss(loss),
                schema.ATTR_TENSORS: tensors,
                schema.ATTR_STATE_NAMES: list(self.state_names),
                schema.ATTR_CHUNK_UPDATES: self.chunk_updates,
                schema.ATTR_CODEC: storage.codec_attrs(clevel, lossy_keepbits),
                schema.ATTR_DATA: data_attrs,
                schema.ATTR_VERSIONS: storage.library_versions(),
                schema.ATTR_CREATED: storage.now_iso(),
                schema.ATTR_SCHEDULER_STATE: None,
                schema.ATTR_NONFINITE: [],
                schema.ATTR_EVERY_CHUNK: True,
                schema.ATTR_TRAIN_MODE: self._modes,
                schema.ATTR_CHECKPOINT_EVERY: self.checkpoint_every,
            }
        )
        self._make_arrays(root, create=True, clevel=clevel, lossy_keepbits=lossy_keepbits)
        self.root = root
        self.committed_at_open = -1
        self._sgd_count = self._initial_sgd_count()

    def _write_static_tensors(self, root: zarr.Group) -> None:
        frozen = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
        frozen.update(dict(self.model.named_buffers()))
        if not frozen:
            return
        g = root.require_group(schema.STATIC)
        for n, t in frozen.items():
            arr = _np(t)
            storage.write_static(g, n, arr, schema.tensor_dims(n, arr.ndim) or ("scalar",))

    def _make_arrays(self, root: zarr.Group, *, create: bool, clevel: int = storage.DEFAULT_CLEVEL, lossy_keepbits: int | None = None) -> None:
        k = self.chunk_updates
        arrays: dict[str, zarr.Array] = {}
        filters = storage.float_filters(lossy_keepbits)
        n_groups = len(self.optimizer.param_groups)
        # sparse checkpoints: one step per chunk, so the steps between checkpoints have no chunk files at all
        k_tensor = k if self.checkpoint_every == 1 else 1
        for gname in (schema.PARAMS, *self.state_names):
            g = root.require_group(gname) if create else root[gname]
            for n, p in zip(self.names, self.params):
                key = f"{gname}/{n}"
                if create:
                    arrays[key] = storage.create_stepped(
                        g, n, tuple(p.shape), _np(p).dtype, schema.stepped_dims(n, p.ndim), k_tensor,
                        flat_keys=self.checkpoint_every > 1,
                        fill_value=np.nan, clevel=clevel, filters=filters,
                    )
                else:
                    arrays[key] = storage.writable(g[n])
            arrays[f"{gname}/{schema.STEP}"] = (
                storage.create_stepped(g, schema.STEP, (), np.int64, (schema.STEP,), k, fill_value=-1)
                if create else storage.writable(g[schema.STEP])
            )
        u = root.require_group(schema.UPDATES) if create else root[schema.UPDATES]
        specs: list[tuple[str, tuple[int, ...], Any, tuple[str, ...], Any]] = [
            (schema.LR, (n_groups,), np.float64, (schema.STEP, schema.GROUP), np.nan),
            (schema.WEIGHT_DECAY, (n_groups,), np.float64, (schema.STEP, schema.GROUP), np.nan),
            (schema.LOSS, (), np.float64, (schema.STEP,), np.nan),
            (schema.BATCH_SIZE, (), np.int64, (schema.STEP,), 0),
            (schema.GRAD_SCALE, (), np.float64, (schema.STEP,), np.nan),
            (schema.OPT_STEP, (), np.int64, (schema.STEP,), -1),
            (schema.STEP, (), np.int64, (schema.STEP,), -1),
        ]
        if create or schema.CHECKPOINT in u:  # stores from before sparse checkpoints lack it: every step stored
            specs.append((schema.CHECKPOINT, (), np.bool_, (schema.STEP,), False))
        if not create:  # made at the first update whose forward drew random numbers (_ensure_rng_arrays)
            for name in (schema.RNG_STATE, schema.MICRO_SIZE):
                if name in u:
                    arrays[f"{schema.UPDATES}/{name}"] = storage.writable(u[name])
        for name, shape, dtype, dims, fill in specs:
            arrays[f"{schema.UPDATES}/{name}"] = (
                storage.create_stepped(u, name, shape, dtype, dims, k, fill_value=fill) if create
                else storage.writable(u[name])
            )
        if create:
            width = 1
            self._batch_array = u.create_array(
                schema.BATCH, shape=(0, width), chunks=(k, 1024), dtype=np.int64, fill_value=schema.BATCH_PAD,
                compressors=storage.compressors(), dimension_names=(schema.STEP, schema.SLOT), config=storage.WRITE_EVERY_CHUNK,
            )
        else:
            self._batch_array = storage.writable(u[schema.BATCH])
        self._arrays = arrays

    def _open_for_resume(self, loss: str | dict[str, str], model_spec: dict[str, Any] | None) -> None:
        root = storage.open_root(self.path, mode="r+")
        self._lock_fd = _acquire_lock(self.path)
        _remove_partials(self.path)
        attrs = root.attrs.asdict()
        constants = attrs.get(schema.ATTR_CONSTANTS)
        if isinstance(constants, list):
            known = [n for n in constants if n in self._id_to_name.values()]
            self._drop_tensors(known)
            self._constants = known
            if known and schema.STATIC in root:
                with torch.no_grad():  # they never changed: put the recorded values back
                    for n, p in self._constant_params.items():
                        if n in root[schema.STATIC]:
                            p.copy_(torch.from_numpy(np.asarray(root[schema.STATIC][n][...])).reshape(p.shape))
        problems = []
        stored = {t["name"]: t for t in attrs[schema.ATTR_TENSORS]}
        live = {n: list(p.shape) for n, p in zip(self.names, self.params)}
        if list(stored) != list(live):
            problems.append(f"tensors differ: store has {list(stored)}, model has {list(live)}")
        else:
            for n, shape in live.items():
                if stored[n]["shape"] != shape:
                    problems.append(f"tensor {n}: store shape {stored[n]['shape']}, model shape {shape}")
        problems += optim_mod.static_mismatch(attrs[schema.ATTR_OPTIMIZER], self.optimizer, self._id_to_name)
        if normalize_loss(loss) != attrs[schema.ATTR_LOSS]:
            problems.append(f"loss {normalize_loss(loss)} differs from the store's {attrs[schema.ATTR_LOSS]}")
        if problems:
            raise RecorderError(
                f"cannot resume {self.path}: it was recorded from a different model or optimizer:\n  - "
                + "\n  - ".join(problems)
                + "\nResume with the same model and optimizer settings, or record to a new path."
            )
        self.root = root
        self.chunk_updates = int(attrs[schema.ATTR_CHUNK_UPDATES])
        stored_k = int(attrs.get(schema.ATTR_CHECKPOINT_EVERY, 1))
        if self._explicit_k and self.checkpoint_every != stored_k:
            raise RecorderError(
                f"cannot resume {self.path} with checkpoint_every={self.checkpoint_every}: it was recorded with "
                f"checkpoint_every={stored_k}. Resume with the store's value (or leave checkpoint_every out)."
            )
        self.checkpoint_every = stored_k
        c = int(attrs[schema.ATTR_COMMITTED])
        self.committed_at_open = c
        self.n_train = int(attrs[schema.ATTR_DATA]["splits"][schema.TRAIN_SPLIT]["n"])
        if self._resume_at is not None and c < self._resume_at:
            raise RecorderError(
                f"cannot resume {self.path} at update {self._resume_at}: the store holds only {max(c, 0)} committed "
                f"updates (the recording stopped before it reached the checkpoint the training resumed from). "
                f"Resume the training from a checkpoint at or before update {max(c, 0)}, or record the run anew "
                "into another path."
            )
        if c < 0:
            # Killed before theta_0 was committed, possibly while the step arrays were being created (the root
            # attributes are written first): nothing was committed, so they are made afresh with the store's codec.
            for gname in (schema.PARAMS, *self.state_names, schema.UPDATES):
                storage.remove_tree(storage.join(self.path, gname))
            codec = attrs.get(schema.ATTR_CODEC) or {}
            lossy = codec.get("lossy") or {}
            self._make_arrays(
                root, create=True, clevel=int(codec.get("compressor", {}).get("clevel", storage.DEFAULT_CLEVEL)),
                lossy_keepbits=lossy.get("bitround_keepbits"),
            )
            self._sgd_count = self._initial_sgd_count()
            return
        self._make_arrays(root, create=False)
        flags = self._arrays.get(f"{schema.UPDATES}/{schema.CHECKPOINT}")
        if self._resume_at is not None:
            self._truncate_to(self._resume_at, c, attrs, flags)
            return
        if flags is not None and c > 0:
            # a sparse run continues from its last checkpoint: the updates after it are recorded again
            stored = np.flatnonzero(np.asarray(flags[: c + 1]))
            ck = int(stored[-1]) if len(stored) else 0
            if ck < c:
                attrs[schema.ATTR_SCHEDULER_STATE] = attrs.get(schema.ATTR_CHECKPOINT_SCHEDULER)
                nonfinite = [s for s in attrs.get(schema.ATTR_NONFINITE, []) if s <= ck]
                root.attrs.update({schema.ATTR_COMMITTED: ck, schema.ATTR_NONFINITE: nonfinite,
                                   schema.ATTR_SCHEDULER_STATE: attrs[schema.ATTR_SCHEDULER_STATE]})
                c = self.committed_at_open = ck
        # Hide anything written past the commit point before a crash.
        for arr in (*self._arrays.values(), self._batch_array):
            if arr.shape[0] > c + 1:
                arr.resize((c + 1, *arr.shape[1:]))
        self._last_checkpoint = c
        self._ckpt_sched = attrs.get(schema.ATTR_SCHEDULER_STATE)
        self._restore(c, attrs)

    def _truncate_to(self, s: int, c: int, attrs: dict[str, Any], flags: Any) -> None:
        """``resume_at=s``: check that the live model and optimizer are the store's update ``s`` (where the store
        holds it), then drop updates ``s+1 .. c``. Nothing is restored: the caller restored its own checkpoint."""
        ck = s
        if flags is not None:
            stored = np.flatnonzero(np.asarray(flags[: s + 1]))
            ck = int(stored[-1]) if len(stored) else 0
        self._check_live_state(s, held=ck == s)
        later = flags is not None and bool(np.any(np.asarray(flags[s + 1 : c + 1])))
        # the scheduler state of checkpoint ck is only known while no later checkpoint replaced it in the attrs
        self._ckpt_sched = None if later else attrs.get(schema.ATTR_CHECKPOINT_SCHEDULER)
        nonfinite = [u for u in attrs.get(schema.ATTR_NONFINITE, []) if u <= s]
        # the commit point moves first: a kill from here on leaves a store that ends at update s
        moved = {schema.ATTR_COMMITTED: s, schema.ATTR_NONFINITE: nonfinite,
                 schema.ATTR_CHECKPOINT_SCHEDULER: self._ckpt_sched}
        if c > s:  # the stored scheduler state is update c's; update s's is not kept (the caller restored it)
            moved[schema.ATTR_SCHEDULER_STATE] = None
        self.root.attrs.update(moved)
        for arr in (*self._arrays.values(), self._batch_array):
            if arr.shape[0] > s + 1:
                arr.resize((s + 1, *arr.shape[1:]))
        self.committed_at_open = s
        self._last_checkpoint = ck
        self._sgd_count = int(self._arrays[f"{schema.UPDATES}/{schema.OPT_STEP}"][s])

    def _check_live_state(self, s: int, held: bool) -> None:
        """Refuse to continue at update ``s`` from a model or optimizer that is not the store's update ``s``."""
        opt_step = int(self._arrays[f"{schema.UPDATES}/{schema.OPT_STEP}"][s])
        live_step = opt_step if self.kind == "SGD" else int(max(
            (float(self.optimizer.state.get(p, {}).get("step", 0)) for p in self.params), default=0))
        problems = []
        if live_step != opt_step:
            problems.append(
                f"the optimizer has taken {live_step} steps, at update {s} the store's had taken {opt_step}")
        codec = self.root.attrs.get(schema.ATTR_CODEC) or {}
        if held and not problems and not codec.get("lossy"):  # lossy stores hold rounded values: no exact check
            for g in (schema.PARAMS, *self.state_names):
                for n, t in zip(self.names, self._tensors(g)):
                    if not np.array_equal(np.asarray(self._arrays[f"{g}/{n}"][s]), _np(t)):
                        problems.append(f"{g}/{n} differs from the store's update {s}")
                        break
                if problems:
                    break
        if problems:
            raise RecorderError(
                f"cannot resume {self.path} at update {s}: the model and optimizer given are not the state the store "
                f"recorded at update {s} (" + "; ".join(problems) + "). The checkpoint restored is from another "
                "run or another update: resume the training from this run's checkpoint of update "
                f"{s}, or record to another path. The store was not changed."
            )

    def _restore(self, c: int, attrs: dict[str, Any]) -> None:
        """Put model, optimizer and scheduler back exactly where update ``c`` left them."""
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(torch.from_numpy(np.asarray(self._arrays[f"{schema.PARAMS}/{n}"][c])))
        opt_step = int(self._arrays[f"{schema.UPDATES}/{schema.OPT_STEP}"][c])
        state = [
            {s: torch.from_numpy(np.asarray(self._arrays[f"{s}/{n}"][c])) for s in self.state_names}
            for n in self.names
        ] if opt_step > 0 else [{} for _ in self.names]
        lrs = wds = None
        if c > 0:
            lrs = np.asarray(self._arrays[f"{schema.UPDATES}/{schema.LR}"][c])
            wds = np.asarray(self._arrays[f"{schema.UPDATES}/{schema.WEIGHT_DECAY}"][c])
        optim_mod.load_recorded_state(self.optimizer, self.kind, self.params, state, opt_step, lrs, wds)
        self._sgd_count = opt_step
        sched_state = attrs.get(schema.ATTR_SCHEDULER_STATE)
        if self.scheduler is not None and sched_state is not None and c > 0:
            # The saved state is the one update c started from; stepping once reproduces what the loop did after
            # update c (works for closed-form and chainable schedulers alike, as group lrs are update c's).
            self.scheduler.load_state_dict(sched_state)
            self.scheduler.step()

    def _initial_sgd_count(self) -> int:
        if self.kind != "SGD":
            return 0
        has_buf = any(self.optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in self.params)
        return 1 if has_buf else 0

    # --- constants: parameters torch's optimizers skip ---------------------------------------------------------
    def _drop_tensors(self, names: list[str]) -> None:
        """Stop recording ``names`` step by step (they are constants)."""
        drop = set(names)
        keep = [(n, p) for n, p in zip(self.names, self.params) if n not in drop]
        self._constant_params.update({n: p for n, p in zip(self.names, self.params) if n in drop})
        self.names = [n for n, _ in keep]
        self.params = [p for _, p in keep]
        self._id_to_name = {id(p): n for n, p in keep}

    def _settle_constants(self) -> None:
        """At the first update: parameters without a gradient are skipped by the optimizer (no state, no change)
        and become constants, stored once under ``static/``; later updates must agree."""
        no_grad = [n for n, p in zip(self.names, self.params) if p.grad is None]
        if not self._settled:
            self._settled = True
            if self.updates_done == 0:  # nothing recorded past theta_0 yet: tensors may still become constants
                if len(no_grad) == len(self.names):
                    raise RecorderError(
                        "optimizer.step() was called with no gradient on any parameter: call loss.backward() first"
                    )
                if no_grad:
                    self._make_constant(no_grad)
                self._constants = (self._constants or []) + no_grad
                return
            self._constants = self._constants or []
        late = [n for n, p in self._constant_params.items() if p.grad is not None]
        if no_grad or late:
            s = self.updates_done + 1
            raise RecorderError(
                f"at update {s} parameters {(no_grad or late)[:5]} "
                + ("got no gradient, though they had one at the first update" if no_grad else
                   "got a gradient, though they had none at the first update and were recorded as constants")
                + ": torch's optimizers skip a parameter without a gradient, so it would change only at some "
                "updates, which the store cannot record. Make every trainable parameter take part in every "
                "update (or in none: freeze it with requires_grad=False). The updates recorded before are kept."
            )

    def _make_constant(self, names: list[str]) -> None:
        self._writer.flush()  # the writer thread is idle from here on: its arrays may change
        index = {n: p for n, p in zip(self.names, self.params)}
        g = self.root.require_group(schema.STATIC)
        for n in names:
            arr = _np(index[n])
            if n in g:
                del g[n]
            storage.write_static(g, n, arr, schema.tensor_dims(n, arr.ndim) or ("scalar",))
        self._drop_tensors(names)
        attrs = self.root.attrs.asdict()
        self._opt_attrs = optim_mod.optimizer_attrs(self.optimizer, self._id_to_name)
        self.root.attrs.update({
            schema.ATTR_TENSORS: [t for t in attrs[schema.ATTR_TENSORS] if t["name"] not in set(names)],
            schema.ATTR_OPTIMIZER: self._opt_attrs,
            schema.ATTR_CONSTANTS: sorted(set(attrs.get(schema.ATTR_CONSTANTS) or []) | set(names)),
        })
        for gname in (schema.PARAMS, *self.state_names):
            for n in names:
                self._arrays.pop(f"{gname}/{n}", None)
                if n in self.root[gname]:
                    del self.root[gname][n]
        self._set_packs()
        self._writer.arrays = self._arrays
        self._writer.packs = {g_: pack[0] for g_, pack in self._packs.items()}

    # --- per-update hooks --------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._steps_since_record >= 1:
            raise RecorderError(
                "optimizer.step() was called again before rec.record(): call rec.record(batch_indices) right after "
                "every optimizer.step(), so each update's batch is recorded."
            )
        self._settle_constants()
        lrs = [float(optim_mod._scalar(g["lr"])) for g in optimizer.param_groups]
        wds = [float(optim_mod._scalar(g.get("weight_decay", 0.0))) for g in optimizer.param_groups]
        if optim_mod.static_fingerprint(optimizer) != self._static_fp:  # cheap; the full comparison says what
            problems = optim_mod.static_mismatch(self._opt_attrs, optimizer, self._id_to_name)
            if problems:
                raise RecorderError(
                    "optimizer hyperparameters changed during the run (only lr and weight_decay may change): "
                    + "; ".join(problems)
                )
            self._static_fp = optim_mod.static_fingerprint(optimizer)
        sched = _scheduler_state(self.scheduler)
        if not self._scheduler_checked:  # fail at the first step, not later in the writer
            _json_state(sched)
            self._scheduler_checked = True
        self._pending = {"lr": lrs, "wd": wds, "scheduler": sched}

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._steps_since_record += 1

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # a training forward (evaluation runs without gradients)
            self._fwd_state = self._read_rng()

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        # The whole state is compared, so any draw from the generator (dropout modules, functional F.dropout,
        # torch.rand, a cached normal sample) is seen; comparing bytes costs about a microsecond.
        if self._fwd_state is not None:
            moved = self._read_rng().numpy().tobytes() != self._fwd_state.numpy().tobytes()
            self._forwards.append((self._fwd_state, moved))
            self._fwd_state = None

    def _rng_row(self, s: int, batch_indices: Any) -> dict[str, np.ndarray]:
        """Update ``s``'s generator states (see ``schema.RNG_STATE``): one per training forward when one of them drew
        random numbers; nothing (or an empty row) when none did. Checked before anything of ``s`` is written."""
        forwards, self._forwards = self._forwards, []
        u = schema.UPDATES
        have = f"{u}/{schema.RNG_STATE}" in self._arrays
        if not any(moved for _, moved in forwards):
            if not have:
                return {}
            width, nbytes = self._arrays[f"{u}/{schema.RNG_STATE}"].shape[1:]
            return {f"{u}/{schema.RNG_STATE}": np.zeros((width, nbytes), np.uint8),
                    f"{u}/{schema.MICRO_SIZE}": np.zeros(width, np.int64)}
        sizes = _micro_sizes(batch_indices)
        if len(forwards) != len(sizes):
            raise RecorderError(
                f"update {s} drew random numbers in its forward (dropout), and ran {len(forwards)} training forward(s) "
                f"(forwards with gradients enabled) but record() got {len(sizes)} micro-batch(es). Each forward's "
                "random state is recorded for its micro-batch, so they must match: pass the micro-batches of an "
                "accumulated update as a list, rec.record([idx_1, idx_2, ...]), in the order they were run, and run "
                "other forwards (evaluation) under torch.no_grad(). The updates recorded before this one are kept."
            )
        states = np.stack([st.numpy() for st, _ in forwards])
        self._ensure_rng_arrays(s, len(sizes), states.shape[1])
        width, nbytes = self._arrays[f"{u}/{schema.RNG_STATE}"].shape[1:]
        if len(sizes) > width or states.shape[1] != nbytes:
            raise RecorderError(
                f"update {s} ran {len(sizes)} micro-batches with generator states of {states.shape[1]} bytes, but this "
                f"store keeps at most {width} per update, of {nbytes} bytes (set by its first update with dropout): "
                "keep the number of micro-batches per update (gradient accumulation) and the device fixed for a run, "
                "or record into a new store. The updates recorded before this one are kept."
            )
        row = np.zeros((width, nbytes), np.uint8)
        row[: len(sizes)] = states
        micro = np.zeros(width, np.int64)
        micro[: len(sizes)] = sizes
        return {f"{u}/{schema.RNG_STATE}": row, f"{u}/{schema.MICRO_SIZE}": micro}

    def _ensure_rng_arrays(self, s: int, width: int, nbytes: int) -> None:
        """Create ``updates/rng_state`` and ``updates/micro_size`` at the first update that drew random numbers: the
        steps before it are written as fill values (no record), as every chunk of a store is written."""
        u = schema.UPDATES
        if f"{u}/{schema.RNG_STATE}" in self._arrays:
            return
        self._writer.flush()  # the writer is idle from here on: its arrays may change
        g = self.root[u]
        width = max(width, self.micro_batches or 0)
        # the attribute first: a kill before the arrays exist leaves a store without them (readers ignore it)
        dtypes = {p.dtype for p in self.params}
        dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
        self.root.attrs.update({schema.ATTR_RNG: {"device": self._rng_device.type,
                                                  "dtype": str(dtype).replace("torch.", "")}})
        n = s  # steps 0 .. s-1 are committed
        arrays = {
            schema.RNG_STATE: storage.create_stepped(g, schema.RNG_STATE, (width, nbytes), np.uint8,
                                                     (schema.STEP, schema.MICRO, schema.BYTE), self.chunk_updates,
                                                     fill_value=0, inner_chunks=(width, nbytes)),
            schema.MICRO_SIZE: storage.create_stepped(g, schema.MICRO_SIZE, (width,), np.int64,
                                                      (schema.STEP, schema.MICRO), self.chunk_updates, fill_value=0,
                                                      inner_chunks=(width,)),
        }
        for name, arr in arrays.items():
            arr.resize((n, *arr.shape[1:]))
            arr[0:n] = np.zeros(arr.shape, arr.dtype)
            self._arrays[f"{u}/{name}"] = storage.writable(arr)
        self._writer.arrays = self._arrays

    # --- public API ------------------------------------------------------------------------------------------
    def record(
        self,
        batch_indices: Sequence[int] | ArrayLike,
        loss: float | torch.Tensor | None = None,
        grad_scale: float | torch.Tensor | None = None,
        *,
        grad_norm: float | torch.Tensor | None = None,
    ) -> None:
        """Record the update that ``optimizer.step()`` just made.

        Args:
            batch_indices: indices (into the training data) of the samples in this update's batch, or a list of
                index arrays, one per micro-batch accumulated into this update (concatenated into one batch).
            loss: the training loss of this batch (optional, for plots and checks).
            grad_scale: the factor gradient clipping applied to the batch gradient (e.g. ``min(1, max_norm/norm)``).
            grad_norm: with ``Recorder(max_grad_norm=...)``: the total gradient norm ``clip_grad_norm_`` returned
                for this update; the scale is then computed exactly as torch did (:func:`clip_scale`).
        """
        if self._closed:
            raise RecorderError("this recorder is closed; open a new one with resume=True (`--resume`) to continue")
        if self._steps_since_record == 0:
            raise RecorderError(
                "rec.record() was called without an optimizer.step() since the last record (or before the first "
                "step). Call it exactly once, right after each optimizer.step()."
            )
        grad_scale = self._grad_scale(grad_scale, grad_norm)
        batch = _batch_array(batch_indices)
        if batch.size == 0 or batch.dtype.kind not in "iu":
            raise RecorderError(f"batch_indices must be a non-empty sequence of integers, got {batch_indices!r}")
        batch = batch.astype(np.int64)  # a copy: the caller may reuse its index buffer
        # one reduction checks both ends: a negative index read as unsigned is above any n_train
        if self.n_train is not None and batch.view(np.uint64).max() >= self.n_train:
            raise RecorderError(
                f"batch index out of range: indices must lie in 0..{self.n_train - 1} (the training data), got "
                f"min {batch.min()} max {batch.max()}"
            )
        s = self.updates_done + 1
        self._check_still_reproducible(s)
        rng_row = self._rng_row(s, batch_indices)
        assert self._pending is not None
        self._sgd_count += 1
        upd = {
            schema.LR: np.asarray(self._pending["lr"], dtype=np.float64),
            schema.WEIGHT_DECAY: np.asarray(self._pending["wd"], dtype=np.float64),
            schema.LOSS: np.float64(np.nan if loss is None else float(loss)),
            schema.BATCH_SIZE: np.int64(batch.size),
            schema.GRAD_SCALE: np.float64(1.0 if grad_scale is None else float(grad_scale)),
            schema.OPT_STEP: np.int64(self._opt_step()),
        }
        checkpoint = s % self.checkpoint_every == 0
        if checkpoint:
            self._last_checkpoint, self._ckpt_sched = s, self._pending["scheduler"]
        row = self._row(s, upd, checkpoint=checkpoint)
        row.arrays.update(rng_row)
        row.batch = batch
        row.commit_attrs = {
            schema.ATTR_SCHEDULER_STATE: self._pending["scheduler"], schema.ATTR_TRAIN_MODE: self._modes,
            schema.ATTR_CHECKPOINT_SCHEDULER: self._ckpt_sched,
        }
        self._writer.put(row)
        self.updates_done = s
        self._steps_since_record = 0
        self._pending = None

    def _grad_scale(self, grad_scale: float | torch.Tensor | None, grad_norm: float | torch.Tensor | None) -> float | None:
        if grad_norm is None:
            if self.max_grad_norm is not None and grad_scale is None:
                raise RecorderError(
                    f"this recorder was told the loop clips gradients (max_grad_norm={self.max_grad_norm}), but "
                    "record() got no grad_norm: pass the total norm clip_grad_norm_ returned, "
                    "rec.record(batch, grad_norm=norm)."
                )
            return None if grad_scale is None else float(grad_scale)
        if grad_scale is not None:
            raise RecorderError("pass grad_scale= or grad_norm= to record(), not both")
        if self.max_grad_norm is None:
            raise RecorderError(
                "record(grad_norm=...) needs the clipping threshold: build the recorder with "
                "Recorder(..., max_grad_norm=<the max_norm passed to clip_grad_norm_>)."
            )
        return clip_scale(grad_norm, self.max_grad_norm)

    def _check_still_reproducible(self, s: int) -> None:
        """Modes can change after construction (``model.train()`` in the loop) and buffers can change in forward:
        re-check the modules that matter (cheap), keep the recorded mode current, and compare the buffers."""
        if any(m.training for m in self._watched):
            self._check_forward(self.model)
        if bool(self.model.training) != self._modes["training"]:
            self._modes = modes.describe_modes(self.model)
        # values compared at the first update and once per chunk; identity and version counters every update
        changed = self._buffer_watch.check(full=s == 1 or s % self.chunk_updates == 0)
        if changed:
            raise RecorderError(
                f"buffers {changed[:5]} changed during training (seen at update {s}). The store keeps buffers only "
                "as they were at the start, so the recorded run would not be the one trained, and its "
                "decomposition would not add up. Keep buffers fixed: put modules with running statistics in eval "
                "mode (module.eval()), or use LayerNorm/GroupNorm instead of BatchNorm. The updates recorded before "
                "this one are kept."
            )

    def _opt_step(self) -> int:
        if self.kind == "SGD":
            return self._sgd_count
        steps = {float(self.optimizer.state[p]["step"]) for p in self.params if p in self.optimizer.state}
        if len(steps) != 1 or len(self.optimizer.state) < len(self.params):
            missing = [n for n, p in zip(self.names, self.params) if p not in self.optimizer.state]
            raise RecorderError(
                f"not every recorded parameter was updated by this step (no gradient for {missing or 'some'}); "
                "the decomposition needs every trainable tensor updated each step. Freeze unused tensors with "
                "requires_grad=False."
            )
        return int(steps.pop())

    def _initial_updates_row(self) -> dict[str, Any]:
        n_groups = len(self.optimizer.param_groups)
        opt0 = self._sgd_count
        if self.kind != "SGD" and self.optimizer.state:
            opt0 = int(float(next(iter(self.optimizer.state.values())).get("step", 0)))
        return {
            schema.LR: np.full(n_groups, np.nan),
            schema.WEIGHT_DECAY: np.full(n_groups, np.nan),
            schema.LOSS: np.float64(np.nan),
            schema.BATCH_SIZE: np.int64(0),
            schema.GRAD_SCALE: np.float64(np.nan),
            schema.OPT_STEP: np.int64(opt0),
        }

    def _pack_layout(self) -> dict[str, tuple[list[Segment], torch.dtype, list[torch.dtype], list[torch.Size]]]:
        """Groups (params, each optimizer state) of CPU tensors sharing one dtype are copied as one packed row per
        step (one ``torch.cat`` instead of a copy per tensor); the writer unpacks whole chunks."""
        dtypes = {p.dtype for p in self.params}
        # CPU only: on a GPU the per-tensor copies go straight to pinned host memory, while a packed copy would
        # first allocate a second copy of the model on the device
        if len(dtypes) != 1 or any(p.device.type != "cpu" for p in self.params):
            return {}
        layout: dict[str, tuple[list[Segment], torch.dtype, list[torch.dtype], list[torch.Size]]] = {}
        dtype = next(iter(dtypes))
        for g in (schema.PARAMS, *self.state_names):
            segs, start = [], 0
            for n, p in zip(self.names, self.params):
                segs.append(Segment(f"{g}/{n}", start, start + p.numel(), tuple(p.shape)))
                start += p.numel()
            # the dtype and shape of every tensor, to compare a row's tensors with in one go
            layout[g] = (segs, dtype, [dtype] * len(segs), [torch.Size(seg.shape) for seg in segs])
        return layout

    def _set_packs(self) -> None:
        """Lay out the packed groups (``_pack_layout``) and, for rows copied in one go, the dtypes and shapes of all
        their tensors in copy order (params, then each optimizer state)."""
        self._packs = self._pack_layout()
        self._pack_dtypes = [d for pack in self._packs.values() for d in pack[2]]
        self._pack_shapes = [sh for pack in self._packs.values() for sh in pack[3]]
        self._buffer_offsets, self._buffer_bytes = self._chunk_buffer_layout()

    def _tensors(self, group: str) -> list[torch.Tensor]:
        """The live tensors of ``group`` (params or an optimizer state), zeros where the state does not exist yet."""
        if group == schema.PARAMS:
            return [p.detach() for p in self.params]
        out = []
        for p in self.params:
            val = self.optimizer.state.get(p, {}).get(group)
            out.append(val.detach() if val is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device))
        return out

    def _chunk_buffer_layout(self) -> tuple[dict[str, int], int]:
        """Where each array's block starts in a chunk buffer's memory (64-byte aligned), and the bytes it needs."""
        offsets, end = {}, 0
        for segs, dtype, *_ in self._packs.values():
            for seg in segs:
                offsets[seg.path] = -(-end // 64) * 64
                end = offsets[seg.path] + self.chunk_updates * (seg.stop - seg.start) * dtype.itemsize
        return offsets, end

    def _new_chunk_buffer(self, memory: Any = None) -> ChunkBuffer:
        """A chunk buffer for the packed groups: a ``(chunk_updates, *shape)`` block per array, and for each group
        and row ``j`` the list of tensor views that row ``j`` is copied into (``fill[group][j]``). ``memory``: a
        writable buffer of ``_chunk_buffer_layout()[1]`` bytes to place the blocks in (a writer process's shared
        memory); by default they get memory of their own."""
        k = self.chunk_updates
        offsets = self._buffer_offsets
        blocks: dict[str, np.ndarray] = {}
        fill: dict[str | None, list[list[torch.Tensor]]] = {None: [[] for _ in range(k)]}
        for g, (segs, dtype, *_) in self._packs.items():
            if memory is None:
                ts = [torch.empty((k, *seg.shape), dtype=dtype) for seg in segs]
            else:
                ts = [torch.frombuffer(memory, dtype=dtype, count=k * (seg.stop - seg.start),
                                       offset=offsets[seg.path]).view(k, *seg.shape) for seg in segs]
            blocks.update({seg.path: t.numpy() for seg, t in zip(segs, ts)})
            fill[g] = [[t[j] for t in ts] for j in range(k)]
            for j in range(k):  # fill[None][j]: every group's views of row j, in the order of _packed_sources
                fill[None][j].extend(fill[g][j])
        return ChunkBuffer(blocks, fill, offsets if memory is not None else {})

    def _packed_sources(self) -> list[torch.Tensor] | None:
        """The live tensors of every packed group in one list (params, then each optimizer state), or None where
        an optimizer state does not exist yet (``_sources`` fills those with zeros)."""
        out = list(self.params)
        get = self.optimizer.state.get  # not state[p]: the optimizer's defaultdict would grow an entry
        try:
            for g in self.state_names:
                out += [get(p, _NO_STATE)[g] for p in self.params]
        except KeyError:
            return None
        return out

    def _sources(self, group: str) -> list[torch.Tensor]:
        """``_tensors(group)`` without the per-tensor ``detach`` (the copies run under ``no_grad``)."""
        if group == schema.PARAMS:
            return self.params
        return [st[group] if (st := self.optimizer.state.get(p)) is not None and group in st else
                torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in self.params]

    def _row(self, index: int, updates: dict[str, Any], checkpoint: bool = True, in_place: bool = True) -> Row:
        """The row of step ``index``: its per-update records, and parameters and optimizer state if it is a
        checkpoint (between checkpoints nothing of the model is copied). ``in_place``: packed groups go straight
        into the writer's chunk buffer where the writer has one."""
        arrays: dict[str, Any] = {}
        packed: dict[str, Any] = {}
        ready = None
        if f"{schema.UPDATES}/{schema.CHECKPOINT}" in self._arrays:
            updates = {**updates, schema.CHECKPOINT: np.bool_(checkpoint)}
        if checkpoint and in_place and self._in_place and self._packs:
            # the usual case: every group's tensors go into row j of the writer's chunk buffer in one foreach copy,
            # after the same dtype and shape check as below (a copy would silently cast or broadcast)
            srcs = self._packed_sources()
            if srcs is not None and list(map(_DTYPE, srcs)) == self._pack_dtypes and list(
                    map(_SHAPE, srcs)) == self._pack_shapes:
                buf = self._writer.row_buffer(self._new_chunk_buffer, self._buffer_bytes)
                j = index % self.chunk_updates
                grad = torch.is_grad_enabled()
                torch._C._set_grad_enabled(False)  # the buffers must not join the autograd graph
                try:
                    torch._foreach_copy_(buf.fill[None][j], srcs)
                finally:
                    torch._C._set_grad_enabled(grad)
                packed = dict.fromkeys(self._packs, BufferRow(buf, j))
        if checkpoint and not packed:
            buf = None
            with torch.no_grad():
                for g in (schema.PARAMS, *self.state_names):
                    tensors = self._sources(g)
                    pack = self._packs.get(g)
                    # same dtypes and shapes as the buffer's: a foreach copy would silently cast or broadcast
                    if pack is not None and list(map(_DTYPE, tensors)) == pack[2] and list(
                        map(_SHAPE, tensors)) == pack[3]:
                        if in_place and self._in_place:
                            if buf is None:
                                buf = self._writer.row_buffer(self._new_chunk_buffer, self._buffer_bytes)
                            j = index % self.chunk_updates
                            torch._foreach_copy_(buf.fill[g][j], tensors)
                            packed[g] = BufferRow(buf, j)
                        else:
                            packed[g] = _snapshot(torch.cat([t.reshape(-1) for t in tensors]), copy=False)
                    else:
                        for n, t in zip(self.names, tensors):
                            arrays[f"{g}/{n}"] = _snapshot(t)
            if any(p.is_cuda for p in self.params):
                ready = torch.cuda.Event()
                ready.record()
        step = np.int64(index)
        for path in self._step_paths:
            arrays[path] = step
        paths = self._update_paths
        for k, v in updates.items():
            path = paths.get(k)
            if path is None:
                path = paths[k] = f"{schema.UPDATES}/{k}"
            arrays[path] = v
        return Row(index=index, arrays=arrays, ready=ready, packed=packed)

    def flush(self) -> None:
        """Write and commit everything recorded so far (also happens automatically every chunk)."""
        self._writer.flush()

    def close(self) -> None:
        """Flush, commit and release the store. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        try:
            self._writer.close()
            if self.updates_done > self._last_checkpoint:
                self._write_final_checkpoint(self.updates_done)
        finally:
            self._release_lock()

    def _write_final_checkpoint(self, s: int) -> None:
        """A sparse run ends with a checkpoint: parameters and state of the last update, written once the writer is
        done, then flagged. A kill in between leaves the flag unset, so readers replay that step instead."""
        row = self._row(s, {}, in_place=False)
        if row.ready is not None:
            row.ready.synchronize()
        flat = {g: _np(t) for g, t in row.packed.items()}
        for g, (segs, *_) in self._packs.items():
            if g in flat:
                for seg in segs:
                    row.arrays[seg.path] = flat[g][seg.start : seg.stop].reshape(seg.shape)
        for path, value in row.arrays.items():
            if path.startswith(f"{schema.UPDATES}/") or path.endswith(f"/{schema.STEP}"):
                continue
            self._arrays[path][s] = _np(value).reshape(self._arrays[path].shape[1:])
        self._arrays[f"{schema.UPDATES}/{schema.CHECKPOINT}"][s] = True
        self.root.attrs.update({schema.ATTR_CHECKPOINT_SCHEDULER: self.root.attrs.get(schema.ATTR_SCHEDULER_STATE)})
        self._last_checkpoint = s

    @property
    def committed_updates(self) -> int:
        return int(self.root.attrs[schema.ATTR_COMMITTED])

    @property
    def bytes_written(self) -> int:
        """Raw (uncompressed) bytes handed to the store so far."""
        return self._writer.bytes_written

    @property
    def writer_seconds(self) -> float:
        """Time the background writer spent encoding and writing."""
        return self._writer.busy_seconds

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DTYPE = operator.attrgetter("dtype")
_NO_STATE: dict[str, Any] = {}  # the state of a parameter the optimizer has not stepped yet
_SHAPE = operator.attrgetter("shape")


def _snapshot(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Copy a tensor off the training device without stalling it (pinned buffer + async copy on CUDA).
    ``copy=False``: ``t`` is already a fresh tensor (e.g. from ``torch.cat``), so a CPU tensor is kept as is."""
    t = t.detach()
    if t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out
    return t.clone() if copy else t
