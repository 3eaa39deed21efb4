"""A store's metadata (the root group's attributes, the arrays' documents), checked when the store is opened.

Every value in a store's ``zarr.json`` files is untrusted: it may come from someone else's machine, an edit, a
partial copy or other software. Readers index arrays by tensor and split names, size loops by the commit point,
chunk lengths and shapes, and feed hyperparameters into the replay and the engine; a wrong type or an absurd value
there would fail deep inside with a bare ``KeyError`` or ``TypeError``, hang, or address a path outside the store.
So types, ranges, names, shapes, data types and codecs are checked once, up front (:func:`check_root_attrs`,
:func:`check_arrays`), and a failure is a :class:`~explaind_store.errors.StoreError` that names the attribute or
array, what it holds and what it should hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from . import schema
from .optim import STATIC_KEYS
from .optim import state_names as optimizer_state_names
from .specs import CAUSAL_LM_COUNTS, LOSS_KINDS, safe_text
from .errors import StoreError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# fixed-size numbers only: variable-length strings or bytes (and object arrays) never belong in a store
ARRAY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64")
# the codecs explaind writes (zstd: older stores); anything else is refused before zarr resolves it
CODECS = ("bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "numcodecs.bitround")
MAX_CHUNKS = 10**7  # chunks in one array: integrity checks enumerate them
DATA_MODES = ("stored", "reference")
MAX_NAME = 512  # characters in a tensor or split name
MAX_NDIM = 32
# a name is used as a path segment under params/, exp_avg/, data/, ...: no separators, no control characters, no
# empty dotted part (which rules out "." and ".." too)
_NAME_RE = re.compile(r"[^./\\\x00-\x1f\x7f]+(?:\.[^./\\\x00-\x1f\x7f]+)*")


def valid_name(name: Any) -> bool:
    """Whether ``name`` may name a tensor or a data split in a store (a path segment: torch's dotted parameter
    names pass; separators, control characters and empty dotted parts do not)."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and _NAME_RE.fullmatch(name) is not None


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, value: Any, expected: str) -> None:
        raise StoreError(
            f"{self.where} has a damaged root attribute: '{key}' is {safe_text(value)}, expected {expected}. The "
            "store's root zarr.json was edited, cut short or written by other software. Restore it from an intact "
            "copy of the store, or record the run again."
        )

    def int_(self, key: str, value: Any, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            self.fail(key, value, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return int(value)

    def number(self, key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, value, "a finite number")

    def name(self, key: str, value: Any) -> str:
        if not valid_name(value):
            self.fail(key, value, f"a name of 1-{MAX_NAME} characters without '/', '\\', control characters or an "
                                  "empty dotted part")
        return str(value)

    def names(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, list):
            self.fail(key, value, "a list of names")
        out = [self.name(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if len(set(out)) != len(out):
            self.fail(key, value, "names that are all different")
        return out

    def mapping(self, key: str, value: Any, optional: bool = False) -> Mapping[str, Any]:
        if optional and value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, value, "a JSON object" + (" or null" if optional else ""))
        return value

    def choice(self, key: str, value: Any, options: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in options:
            self.fail(key, value, "one of " + ", ".join(repr(o) for o in options))
        return str(value)


def format_version(attrs: Mapping[str, Any], where: str) -> int:
    """The store's format version (0 when absent), checked to be an integer (a newer one is the caller's to refuse
    before anything else is checked: its attributes may mean something this version does not know)."""
    return _Checker(where).int_(schema.ATTR_FORMAT_VERSION, attrs.get(schema.ATTR_FORMAT_VERSION, 0), 0)


def check_root_attrs(attrs: Mapping[str, Any], where: str) -> None:
    """Raise :class:`StoreError` unless the root attributes of an explaind store (``format`` and its version
    already checked) have the types, ranges and names readers rely on. ``where`` names the store in the message.
    A store killed while it was being created (``committed_updates`` -1) holds only the first three attributes,
    which is all that is checked then (it can be recorded again or overwritten, not read)."""
    c = _Checker(where)
    if schema.ATTR_COMMITTED not in attrs:
        c.fail(schema.ATTR_COMMITTED, "missing", "to be present in every store")
    if c.int_(schema.ATTR_COMMITTED, attrs[schema.ATTR_COMMITTED], -1) < 0:
        return
    for key in (schema.ATTR_CHUNK_UPDATES, schema.ATTR_TENSORS, schema.ATTR_OPTIMIZER, schema.ATTR_LOSS,
                schema.ATTR_DATA):
        if key not in attrs:
            c.fail(key, "missing", "to be present in every store")
    c.int_(schema.ATTR_CHUNK_UPDATES, attrs[schema.ATTR_CHUNK_UPDATES], 1)
    c.int_(schema.ATTR_CHECKPOINT_EVERY, attrs.get(schema.ATTR_CHECKPOINT_EVERY, 1), 1)
    names = _check_tensors(c, attrs[schema.ATTR_TENSORS])
    constants = c.names(schema.ATTR_CONSTANTS, attrs.get(schema.ATTR_CONSTANTS) or [])
    state = attrs.get(schema.ATTR_STATE_NAMES, [])
    if not isinstance(state, list) or len(set(map(str, state))) != len(state):
        c.fail(schema.ATTR_STATE_NAMES, state, "a list of different optimizer state names")
    for i, s in enumerate(state):
        c.choice(f"{schema.ATTR_STATE_NAMES}[{i}]", s, schema.STATE_GROUPS)
    opt = attrs[schema.ATTR_OPTIMIZER]
    _check_optimizer(c, opt, names, set(constants))
    expected = list(optimizer_state_names(opt["type"], opt["groups"]))
    if state != expected:
        c.fail(schema.ATTR_STATE_NAMES, state, f"{expected}, the state {opt['type']} with these hyperparameters keeps")
    _check_loss(c, attrs[schema.ATTR_LOSS])
    _check_data(c, attrs[schema.ATTR_DATA])
    nonfinite = attrs.get(schema.ATTR_NONFINITE, [])
    if not isinstance(nonfinite, list):
        c.fail(schema.ATTR_NONFINITE, nonfinite, "a list of update numbers")
    for i, s in enumerate(nonfinite):
        c.int_(f"{schema.ATTR_NONFINITE}[{i}]", s, 0)
    if not isinstance(attrs.get(schema.ATTR_EVERY_CHUNK, False), bool):
        c.fail(schema.ATTR_EVERY_CHUNK, attrs.get(schema.ATTR_EVERY_CHUNK), "true or false")
    if attrs.get(schema.ATTR_TRAIN_MODE) is not None:
        mode = c.mapping(schema.ATTR_TRAIN_MODE, attrs[schema.ATTR_TRAIN_MODE])
        if not isinstance(mode.get("training"), bool):
            c.fail(f"{schema.ATTR_TRAIN_MODE}.training", mode.get("training"), "true or false")
        differ = mode.get("differ", [])
        if not isinstance(differ, list) or not all(isinstance(m, str) for m in differ):
            c.fail(f"{schema.ATTR_TRAIN_MODE}.differ", differ, "a list of module names")
    if attrs.get(schema.ATTR_RNG) is not None:
        rng = c.mapping(schema.ATTR_RNG, attrs[schema.ATTR_RNG])
        device = rng.get("device")
        if not isinstance(device, str) or re.fullmatch(r"cpu|cuda(:\d{1,3})?", device) is None:
            c.fail(f"{schema.ATTR_RNG}.device", device, "'cpu' or 'cuda'")
        c.choice(f"{schema.ATTR_RNG}.dtype", rng.get("dtype"), FLOAT_DTYPES)
    # model and data specs are checked where they are used (explaind_store.specs: a malformed spec of one split
    # leaves the others readable)
    for key in (schema.ATTR_SCHEDULER_STATE, schema.ATTR_CHECKPOINT_SCHEDULER, schema.ATTR_CODEC,
                schema.ATTR_VERSIONS):
        c.mapping(key, attrs.get(key), optional=True)
    created = attrs.get(schema.ATTR_CREATED)
    if created is not None and not isinstance(created, str):
        c.fail(schema.ATTR_CREATED, created, "a date string")


def _check_tensors(c: _Checker, tensors: Any) -> list[str]:
    key = schema.ATTR_TENSORS
    if not isinstance(tensors, list) or not tensors:
        c.fail(key, tensors, "a non-empty list of {name, shape, dtype, group} objects")
    names = []
    for i, t in enumerate(tensors):
        t = c.mapping(f"{key}[{i}]", t)
        names.append(c.name(f"{key}[{i}].name", t.get("name")))
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            c.fail(f"{key}[{i}].shape", shape, f"a list of at most {MAX_NDIM} sizes")
        for j, n in enumerate(shape):
            c.int_(f"{key}[{i}].shape[{j}]", n, 0)
        c.choice(f"{key}[{i}].dtype", t.get("dtype"), FLOAT_DTYPES)
        c.int_(f"{key}[{i}].group", t.get("group", 0), 0)
    if len(set(names)) != len(names):
        c.fail(key, [t.get("name") for t in tensors], "tensor names that are all different")
    return names


def _check_optimizer(c: _Checker, opt: Any, names: list[str], constants: set[str]) -> None:
    key = schema.ATTR_OPTIMIZER
    opt = c.mapping(key, opt)
    kind = c.choice(f"{key}.type", opt.get("type"), tuple(STATIC_KEYS))
    groups = opt.get("groups")
    if not isinstance(groups, list) or not groups:
        c.fail(f"{key}.groups", groups, "a non-empty list of parameter groups")
    grouped: list[str] = []
    for g, grp in enumerate(groups):
        where = f"{key}.groups[{g}]"
        grp = c.mapping(where, grp)
        for hp in ("lr", "weight_decay"):
            c.number(f"{where}.{hp}", grp.get(hp))
        for hp in STATIC_KEYS[kind]:
            value = grp.get(hp)
            if hp == "betas":
                if not isinstance(value, list) or len(value) != 2:
                    c.fail(f"{where}.betas", value, "a list of two numbers")
                for b in value:
                    c.number(f"{where}.betas", b)
            elif hp == "nesterov":
                if not isinstance(value, bool):
                    c.fail(f"{where}.nesterov", value, "true or false")
            else:
                c.number(f"{where}.{hp}", value)
        grouped += c.names(f"{where}.tensors", grp.get("tensors"))
    for n in names:
        if n not in grouped and n not in constants:
            c.fail(f"{key}.groups", f"no group holding tensor {n!r}", "every recorded tensor in a group")
    known = set(names) | constants
    for n in grouped:
        if n not in known:
            c.fail(f"{key}.groups", f"a group holding {n!r}, which is neither a recorded tensor nor a constant",
                   "groups of the store's tensors only")


def _check_loss(c: _Checker, loss: Any) -> None:
    key = schema.ATTR_LOSS
    loss = c.mapping(key, loss)
    c.choice(f"{key}.kind", loss.get("kind"), LOSS_KINDS)
    c.choice(f"{key}.reduction", loss.get("reduction", "mean"), ("mean",))
    if "count" in loss:
        c.choice(f"{key}.count", loss.get("count"), CAUSAL_LM_COUNTS)


def _check_data(c: _Checker, data: Any) -> None:
    key = schema.ATTR_DATA
    splits = c.mapping(f"{key}.splits", c.mapping(key, data).get("splits"))
    if schema.TRAIN_SPLIT not in splits:
        c.fail(f"{key}.splits", sorted(splits), f"a '{schema.TRAIN_SPLIT}' split")
    for name, info in splits.items():
        c.name(f"{key}.splits", name)
        info = c.mapping(f"{key}.splits.{name}", info)
        c.int_(f"{key}.splits.{name}.n", info.get("n"), 0)
        c.choice(f"{key}.splits.{name}.mode", info.get("mode", "stored"), DATA_MODES)
        fp = info.get("fingerprint")
        if fp is not None and not isinstance(fp, str):
            c.fail(f"{key}.splits.{name}.fingerprint", fp, "a string")


# the array whose step axis and chunks the commit point and chunk_updates are checked against
COMMIT_ARRAY = f"{schema.UPDATES}/{schema.LR}"


def check_commit_point(attrs: Mapping[str, Any], steps: Any, chunk: Any, where: str) -> None:
    """The root attributes against the arrays they describe: ``committed_updates`` inside the ``steps`` the per-update
    records hold (a larger one would send readers past the data and size loops that do not end), and
    ``chunk_updates`` equal to their ``chunk`` length along the step axis."""
    c = _Checker(where)
    if isinstance(steps, int) and attrs[schema.ATTR_COMMITTED] >= steps:
        c.fail(schema.ATTR_COMMITTED, attrs[schema.ATTR_COMMITTED], f"at most {steps - 1}, the last step its arrays hold")
    if chunk != attrs[schema.ATTR_CHUNK_UPDATES]:
        c.fail(schema.ATTR_CHUNK_UPDATES, attrs[schema.ATTR_CHUNK_UPDATES], f"{chunk}, its arrays' chunking")


def _array_fail(where: str, path: str, what: str, value: Any, expected: str) -> None:
    raise StoreError(
        f"{where} has damaged array metadata: the {what} of '{path}' is {safe_text(value)}, expected {expected}. "
        f"Its {path}/zarr.json was edited, cut short or written by other software. Restore it from an intact copy "
        "of the store, or record the run again."
    )


def check_arrays(attrs: Mapping[str, Any], arrays: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Raise :class:`StoreError` unless every array document (``path -> zarr.json``, as
    :func:`explaind_store.storage.check_metadata` collects them) has a fixed-size data type, the codecs explaind
    writes, a regular chunk grid of a bounded number of chunks, and, for the arrays the root attributes describe,
    the shape and data type they say: tensors and optimizer state ``(>= committed + 1, *shape)`` of the tensor's
    dtype, per-update records with a step for every committed update, data splits of ``n`` samples."""
    committed = attrs.get(schema.ATTR_COMMITTED)
    if not isinstance(committed, int) or committed < 0:
        return  # nothing committed: nothing will be read (check_root_attrs has said so)
    tensors = {t["name"]: t for t in attrs[schema.ATTR_TENSORS]}
    splits = attrs[schema.ATTR_DATA]["splits"]
    lr = arrays.get(COMMIT_ARRAY)
    if lr is None:
        _array_fail(where, COMMIT_ARRAY, "document", "missing", "an array every store holds")
    steps, chunk = lr.get("shape"), (lr.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    if isinstance(steps, list) and steps and isinstance(chunk, list) and chunk:
        check_commit_point(attrs, steps[0], chunk[0], where)
    for path, doc in arrays.items():
        def fail(what: str, value: Any, expected: str) -> None:
            _array_fail(where, path, what, value, expected)

        shape = doc.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM + 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            fail("shape", shape, "a list of non-negative sizes")
        dtype = doc.get("data_type")
        if dtype not in ARRAY_DTYPES:
            fail("data type", dtype, "a fixed-size number type (" + ", ".join(ARRAY_DTYPES) + ")")
        grid = doc.get("chunk_grid")
        chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
        if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunks, list) or len(
                chunks) != len(shape) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                 for n in chunks):
            fail("chunk grid", grid, f"a regular grid of {len(shape)} positive chunk sizes")
        if math.prod(-(-n // k) for n, k in zip(shape, chunks)) > MAX_CHUNKS:
            fail("chunk count", math.prod(-(-n // k) for n, k in zip(shape, chunks)), f"at most {MAX_CHUNKS}")
        codecs = doc.get("codecs")
        if not isinstance(codecs, list) or not all(isinstance(x, dict) and x.get("name") in CODECS for x in codecs):
            fail("codecs", [x.get("name") if isinstance(x, dict) else x for x in codecs]
                 if isinstance(codecs, list) else codecs, "codecs explaind writes (" + ", ".join(CODECS) + ")")
        if doc.get("storage_transformers"):
            fail("storage transformers", doc.get("storage_transformers"), "none")
        names = doc.get("dimension_names")
        if names is not None and (not isinstance(names, list) or len(names) != len(shape) or not all(
                isinstance(n, str) and 0 < len(n) <= 2 * MAX_NAME for n in names)):
            fail("dimension names", names, f"{len(shape)} names")
        fill = doc.get("fill_value")
        numeric = isinstance(fill, (int, float)) and not isinstance(fill, bool)
        if not (isinstance(fill, bool) if dtype == "bool" else numeric and float(fill).is_integer()
                if dtype.startswith(("int", "uint")) else numeric or fill in ("NaN", "Infinity", "-Infinity")):
            fail("fill value", fill, f"a value of type {dtype}")
        parts = path.split("/")
        if len(parts) == 2 and parts[0] in (schema.PARAMS, *schema.STATE_GROUPS) and parts[1] in tensors:
            t = tensors[parts[1]]
            if shape[1:] != t["shape"] or shape[0] < committed + 1:
                fail("shape", shape, f"[{committed + 1} steps or more, *{t['shape']}] (tensors attribute, "
                                     "committed_updates)")
            if dtype != t["dtype"]:
                fail("data type", dtype, f"{t['dtype']} (tensors attribute)")
            dims = list(schema.stepped_dims(parts[1], len(t["shape"])))
            if names is not None and names != dims:
                fail("dimension names", names, f"{dims}")
        elif len(parts) == 2 and parts[0] == schema.UPDATES:
            if not shape or shape[0] < committed + 1:
                fail("shape", shape, f"a step axis of {committed + 1} steps or more (committed_updates)")
            if names is not None and names[0] != schema.STEP:
                fail("dimension names", names, f"'{schema.STEP}' first")
        elif len(parts) == 3 and parts[0] == schema.DATA and parts[1] in splits and (
                not shape or shape[0] != splits[parts[1]]["n"]):
            fail("shape", shape, f"{splits[parts[1]]['n']} samples first (data attribute)")
