"""Resumable stages and small helpers shared by the demos (``explaind demo`` and ``explaind demo lm``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def _digest(params: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(params), sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Timed:
    """What a stage's ``compute`` returns (:meth:`Stages.run`) when it timed its own work (a recording: the training
    alone), with the marker's info."""

    seconds: float
    info: dict[str, Any] | None = None


class Stages:
    """Markers ``stages/<name>.json``: ``{"params": ..., "digest": ..., "seconds": ..., "info": {...}}``."""

    def __init__(self, out_dir: Path, log: Callable[[str], None]):
        self.dir = out_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.reused: list[str] = []
        self.ran: list[str] = []
        self.seconds: dict[str, float] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def finished(self, name: str, params: Any, outputs: list[Path]) -> dict[str, Any] | None:
        """The marker of a finished stage with these parameters whose outputs all exist, else None."""
        p = self.path(name)
        if not p.exists() or not all(o.exists() for o in outputs):
            return None
        try:
            marker = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if marker.get("digest") != _digest(params):
            return None
        return marker

    def reuse(self, name: str, marker: dict[str, Any]) -> None:
        self.reused.append(name)
        self.seconds[name] = float(marker.get("seconds", 0.0))
        self.info[name] = dict(marker.get("info", {}))
        self.log(f"reusing finished stage {name} (computed in {self.seconds[name]:.1f} s; delete "
                 f"{self.path(name)} to recompute it)")

    def start(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
        self.log(f"stage {name} ...")

    def done(self, name: str, params: Any, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.ran.append(name)
        self.seconds[name] = seconds
        self.info[name] = _jsonable(info or {})
        marker = {"stage": name, "params": _jsonable(params), "digest": _digest(params), "seconds": seconds,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "info": self.info[name]}
        tmp = self.path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(marker, indent=2))
        tmp.replace(self.path(name))
        self.log(f"stage {name} done in {seconds:.1f} s")

    def pending(self, jobs: list[tuple[str, Any, list[Path]]], *, recompute: bool = False) -> list[str]:
        """Reuse each finished stage of ``jobs`` (``(name, params, outputs)``; none with ``recompute``) and return the
        names of the others, in order: the caller runs those (``run(..., recompute=True)``) once it has set up what
        they share, e.g. a Dask cluster that is only worth starting when there is something to compute."""
        todo = []
        for name, params, outputs in jobs:
            marker = None if recompute else self.finished(name, params, outputs)
            if marker is not None:
                self.reuse(name, marker)
            else:
                todo.append(name)
        return todo

    def run(self, name: str, params: Any, outputs: list[Path],
            compute: Callable[[], Timed | dict[str, Any] | None], *, recompute: bool = False) -> None:
        """Reuse the finished stage ``name`` (same ``params``, every output present; never with ``recompute``), else
        run ``compute`` (which writes ``outputs`` and returns the marker's info, or :class:`Timed` when it timed its
        own work) and mark the stage done with its wall time."""
        if not self.pending([(name, params, outputs)], recompute=recompute):
            return
        self.start(name)
        t0 = time.perf_counter()
        info = compute()
        seconds = time.perf_counter() - t0
        if isinstance(info, Timed):
            seconds, info = info.seconds, info.info
        self.done(name, params, seconds, info)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(w)}   {v}" for k, v in rows), line])


class _threads:
    """Run torch with ``n`` threads inside the block, restoring the thread count after.

    The demo uses one thread in this process: its models are small, Dask parallelises the engine over processes,
    and on a busy machine two OpenMP threads per tiny matmul are slower than one (they wait for each other).
    """

    def __init__(self, torch: Any, n: int):
        self.torch, self.n = torch, n

    def __enter__(self) -> None:
        self.before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        self.torch.set_num_threads(self.before)
