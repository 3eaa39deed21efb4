"""The engine's settings: one table (name, type, default, meaning), read when used, never at import.

    from engine import settings
    settings.get("keep_u_bytes")                     # override > $EXPLAIND_KEEP_U_BYTES > default
    with settings.override(pipeline=False):          # tests and callers change a setting for a block
        engine.attribute(...)

Each setting has an environment variable (``EXPLAIND_<NAME>``). A bad value is an error that names the variable,
says what it means and how to fix it. Settings of scope ``"job"`` travel with every job: the client takes a
:func:`snapshot` when it builds the graph, and the tasks run under :func:`override` of it on the workers, so a
worker computes with the caller's settings whatever its own environment says (as ``zarr.config`` /
``xarray.set_options`` values do for one process). Settings of scope ``"process"`` describe the process itself
(its torch threads, its allocator) and are read from that process's own environment.

The store's own setting (``EXPLAIND_TRUSTED_MODULES``, :mod:`explaind_store.specs`) is not in this table: the
store never imports the engine. ``explaind settings`` lists both.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_OFF = ("0", "false", "off", "no")


@dataclass(frozen=True)
class Setting:
    """One row of the table."""

    name: str
    type: type  # int or bool
    default: Any
    meaning: str
    minimum: int = 1  # ints only
    scope: str = "job"  # "job": travels with every job to the workers; "process": each process reads its own
    size: bool = False  # ints only: a byte count, and the variable may carry a unit (4GB, 512MiB)

    @property
    def env(self) -> str:
        return "EXPLAIND_" + self.name.upper()


TABLE: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("light_bytes", int, 512 << 20, "bytes of rebuilt momentum pass 2 may keep per chunk (bounds the "
                "chunk length of the reverse chain and lets pass 1 of a window's first chunk skip its path "
                "integrals)", minimum=0),
        Setting("keep_u_bytes", int, 256 << 20, "bytes of path integrals pass 1 may keep for pass 2 (parallel "
                "chunks and the in-process reference; beyond it pass 2 recomputes them)", minimum=0),
        Setting("grads_ahead_bytes", int, 256 << 20, "bytes of per-sample gradients pass 2 may take one update "
                "ahead in its second thread", minimum=0),
        Setting("grad_group_updates", int, 4, "updates whose per-sample gradients pass 2 takes in one vmapped "
                "call (their fixed cost shared; also bounded by grads_ahead_bytes); 1 turns grouping off", minimum=1),
        Setting("pipeline", bool, True, "run pass 2 over two threads (torch.func work one update ahead) when it "
                "has two or more torch threads on the CPU; 0/false/off/no turns it off"),
        Setting("pipeline_producers", int, 1, "threads of pass 2's pipeline that take the torch.func work in turn "
                "(each with its own copy of the model); more than 1 costs CPU under the GIL", minimum=1),
        Setting("pipeline_help", bool, True, "pass 2's consumer thread takes an update's torch.func work itself "
                "(on its own copy of the model) instead of waiting for a busy producer; 0/false/off/no turns it off"),
        Setting("threads_per_group", int, 2, "torch threads per query group on the default LocalCluster"),
        Setting("verify_updates", int, 16, "updates the pre-flight store check of engine.attribute replays"),
        Setting("handoff_min_bytes", int, 8 << 20, "result variables at least this large come back from "
                "same-host workers through shared memory instead of the dask gather", minimum=0),
        Setting("block_bytes", int, 512 << 20, "bytes of result block (and rebuilt momentum) one task may hold; "
                "tasks cover fewer updates than a store chunk when needed, so memory does not depend on how the "
                "store was chunked", size=True),
        Setting("max_result_bytes", int, 0, "the largest result engine.attribute keeps in memory; larger ones "
                "need out= (0: a quarter of the memory available when the call starts)", minimum=0, size=True),
        Setting("query_bytes", int, 0, "bytes of query-row state (path integrals, reverse accumulator: query rows "
                "x parameters float64) the query groups that run at once may hold; more queries run in batches one "
                "after another, each taking the per-sample gradients again (0: a quarter of the memory available "
                "when the call starts, of the GPU's free memory with device='cuda')", minimum=0, size=True),
        Setting("worker_threads", int, 1, "torch threads per dask worker process (when the job sets none)",
                scope="process"),
        Setting("mallopt", bool, True, "glibc heap tuning (keep freed memory; in the engine also one malloc "
                "arena), by the engine at import and by a Recorder in the training process; 0/false/off/no turns it "
                "off", scope="process"),
    )
}

_LOCK = threading.Lock()
_OVERRIDES: list[dict[str, Any]] = []  # a stack: the innermost override wins


def _setting(name: str) -> Setting:
    try:
        return TABLE[name]
    except KeyError:
        raise KeyError(f"no engine setting {name!r}; the settings are {', '.join(TABLE)}") from None


def _check(s: Setting, value: Any, source: str) -> Any:
    if s.type is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}={value!r}: {s.name} is True or False ({s.meaning})")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < s.minimum:
        raise ValueError(f"{source}={value!r}: set it to an integer >= {s.minimum} ({s.meaning}), or unset it for "
                         f"the default {s.default}")
    return int(value)


def env_int(name: str, default: int, meaning: str, *, minimum: int = 1) -> int:
    """``int(os.environ[name])``, or ``default`` when unset or empty; at least ``minimum``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}={raw!r}: set it to an integer >= {minimum} ({meaning}), or unset it for the "
                         f"default {default}")
    return value


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """A byte count from ``4000000``, ``"4GB"``, ``"512MiB"``, ``"1.5G"`` (decimal units; ``KiB``/``MiB``/``GiB``
    are binary); ValueError naming the accepted forms otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a size in bytes; use a number with an optional unit, e.g. "
                             "4000000000, 4GB, 512MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"a size in bytes must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``"16.10 GB"``, ``"230.4 MB"``, ``"12.0 kB"`` (decimal units, as ``parse_bytes``
    reads them)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TB", "GB") else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def env_bytes(name: str, meaning: str) -> int | None:
    """``parse_bytes(os.environ[name])``, or None when unset or empty; a bad value names the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse_bytes(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: set it to a positive size such as 4GB or 4000000000 ({meaning}), or "
                         "unset it for the default") from None


def env_flag(name: str, default: bool = True) -> bool:
    """False when ``name`` is 0/false/off/no (any case), True for any other value, ``default`` when unset."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in _OFF


def get(name: str) -> Any:
    """The setting's value now: the innermost :func:`override`, else its environment variable, else the default."""
    s = _setting(name)
    with _LOCK:
        for layer in reversed(_OVERRIDES):
            if name in layer:
                return layer[name]
    if s.type is bool:
        return env_flag(s.env, s.default)
    if s.size:
        value = env_bytes(s.env, s.meaning)
        return s.default if value is None else value
    return env_int(s.env, s.default, s.meaning, minimum=s.minimum)


@contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set settings for the block (this process, every thread), e.g. ``override(pipeline=False)``."""
    layer = {name: _check(_setting(name), v, name) for name, v in values.items()}
    with _LOCK:
        _OVERRIDES.append(layer)
    try:
        yield
    finally:
        with _LOCK:
            _OVERRIDES.remove(layer)


def snapshot() -> dict[str, Any]:
    """The current values of every ``"job"``-scope setting (what a job carries to the workers)."""
    return {name: get(name) for name, s in TABLE.items() if s.scope == "job"}


def applied(snap: Mapping[str, Any] | None) -> Any:
    """:func:`override` with a :func:`snapshot` (``None``: nothing to apply)."""
    return override(**dict(snap or {}))


def rows() -> list[dict[str, Any]]:
    """The table with each setting's current value (for ``explaind settings`` and the README)."""
    return [{"env": s.env, "name": s.name, "type": s.type.__name__, "default": s.default, "value": get(s.name),
             "scope": s.scope, "meaning": s.meaning} for s in TABLE.values()]


__all__ = ["TABLE", "Setting", "applied", "env_bytes", "env_flag", "env_int", "format_bytes", "get", "override",
           "parse_bytes", "rows", "snapshot"]
