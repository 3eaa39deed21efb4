"""What every experiment script shares: where results go, JSON / markdown writers, torch threads, timing."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

# one markdown-table writer for the app's reports and the experiments' tables
from explaind_app.report import md_table  # noqa: F401

# small, committed results (JSON, CSV, markdown tables, PNG plots); bulky work files (stores, score arrays) go to
# WORK_DIR, which is not committed
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path(os.environ.get("EXPLAIND_EXPERIMENTS_WORK", "experiments-work"))


def results_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    p = Path(root) if root is not None else RESULTS_DIR / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def work_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    p = Path(root) if root is not None else WORK_DIR / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) else v
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (a crash never leaves a half-written result that a resumed run would trust)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_npz(path: Path, **arrays: Any) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def pm(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std`` with a fixed number of decimals."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)
