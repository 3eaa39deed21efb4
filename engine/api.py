"""``engine.attribute``: decompose ``F(theta_b) - F(theta_a)`` of a recorded run on Dask, with input checks up front.

Everything the caller can get wrong (query shapes, output modes without targets, windows, splits, chunk sizes,
devices, a store that fails its cheap health check, an output path that is a store) is checked before any chunk
task runs, and raises ``ValueError`` / ``KeyError`` / ``StoreError`` with a message that says what to change.
"""

from __future__ import annotations

import math
import os
import re
import uuid
import warnings
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from engine import plan, settings
from engine.cluster import graph as _graph
from engine.cluster import runners as _sched
from engine.cluster import scratch as _scratch
from engine.cluster import worker as _worker
from engine.guard import DEFAULT_RESIDUAL_TOL, check_exactness, check_residual_tol
from engine.ops.output_modes import CAUSAL_LM_MODES, NEEDS_TARGETS, OUTPUT_MODES
from engine.ops.quadrature import parse_rule
from engine.result import BY_KEYS, check_finite, finalize_attrs, result_bytes
from engine.scan.problem import Context, Problem, result_meta
from engine.settings import format_bytes, parse_bytes
from explaind_store import schema, storage
from explaind_store.specs import IGNORE_INDEX
from explaind_store.storage import StoreError
from explaind_store.trajectory import Trajectory

RESULT_KIND = "explaind-attribution"
# results larger than this stay on disk only (out=): the max_result_bytes setting, else this share of the memory
# available when the call starts (the computation needs room besides the result: workers, blocks in flight)
MAX_RESULT_ENV = "EXPLAIND_MAX_RESULT_BYTES"
MAX_RESULT_FRACTION = 0.25


QUERY_BYTES_ENV = "EXPLAIND_QUERY_BYTES"


class QueryMemoryWarning(UserWarning):
    """The query rows of one batch are estimated to need more memory than the ``query_bytes`` budget and cannot be
    split further (one query, or queries that are not independent per sample)."""


class ResultTooLargeError(ValueError, MemoryError):
    """The result asked for would not fit the in-memory limit (``max_result_bytes``) and no ``out=`` was given."""


# ==============================================================================================================
# Query parsing
# ==============================================================================================================
_QUERY_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(?:\[(.*)\])?\s*$")


@dataclass(frozen=True)
class QuerySpec:
    """A parsed ``queries=`` string: a split name and a selection (a slice or explicit indices)."""

    split: str
    selection: slice | tuple[int, ...]
    text: str

    def indices(self, n: int) -> np.ndarray:
        """Sample indices into a split of ``n`` samples; ValueError when out of range or empty."""
        sel = self.selection
        if isinstance(sel, slice):
            for v in (sel.start, sel.stop):
                if v is not None and (v > n or v < -n):
                    raise ValueError(
                        f"queries={self.text!r}: index {v} is outside split {self.split!r}, which has {n} samples"
                    )
            idx = np.ascontiguousarray(np.arange(n)[sel])  # a negative step gives a view torch cannot take
        else:
            bad = [i for i in sel if not -n <= i < n]
            if bad:
                raise ValueError(
                    f"queries={self.text!r}: indices {bad} are outside split {self.split!r}, which has {n} samples"
                )
            idx = np.asarray([i % n for i in sel], dtype=np.int64)
        if len(idx) == 0:
            raise ValueError(f"queries={self.text!r} selects no samples of split {self.split!r} ({n} samples)")
        return idx


def parse_queries(text: str) -> QuerySpec:
    """Parse ``"val"``, ``"val[:10]"``, ``"val[5:20]"``, ``"val[3]"``, ``"val[1,5,7]"`` or ``"val[[1,5,7]]"``."""
    if not isinstance(text, str):
        raise TypeError(f"queries must be a string such as 'val[:10]', not {type(text).__name__}")
    m = _QUERY_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse queries={text!r}; use a split name with an optional selection: 'val', "
                         "'val[:10]', 'val[5:20]', 'train[0:3]' or 'val[[1,5,7]]'")
    split, inner = m.group(1), m.group(2)
    if inner is None:
        return QuerySpec(split, slice(None), text)
    inner = inner.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    try:
        if ":" in inner:
            parts = [p.strip() for p in inner.split(":")]
            if len(parts) > 3:
                raise ValueError
            vals = [int(p) if p else None for p in parts]
            if len(vals) == 3 and vals[2] == 0:
                raise ValueError
            return QuerySpec(split, slice(*vals), text)
        items = [p.strip() for p in inner.split(",") if p.strip()]
        if not items:
            raise ValueError
        return QuerySpec(split, tuple(int(p) for p in items), text)
    except ValueError:
        raise ValueError(f"cannot parse the selection in queries={text!r}; use a slice such as [:10] or [5:20], "
                         "an index [3] or a list [[1,5,7]]") from None


def parse_steps(steps: Any, n_updates: int) -> tuple[int, int]:
    """``steps`` (None, ``slice(a, b)``, ``(a, b)`` or ``"a:b"``; negatives count from the end) -> window ``(a, b)``."""
    given = steps
    if steps is None:
        a, b = 0, n_updates
    else:
        if isinstance(steps, str):
            parts = steps.split(":")
            if len(parts) != 2:
                raise ValueError(f"cannot parse steps={steps!r}; use 'A:B' (decomposes F(theta_B) - F(theta_A))")
            try:
                steps = slice(*(int(p) if p.strip() else None for p in parts))
            except ValueError:
                raise ValueError(f"cannot parse steps={steps!r}; use 'A:B' with integers") from None
        if isinstance(steps, slice):
            if steps.step not in (None, 1):
                raise ValueError(f"steps={steps!r}: a step stride is not supported (use step_bins= to coarsen)")
            a, b = steps.start, steps.stop
        elif isinstance(steps, (tuple, list)) and len(steps) == 2:
            a, b = steps
        else:
            raise ValueError(f"steps must be None, slice(a, b), (a, b) or 'a:b', not {steps!r}")
        bad = [v for v in (a, b) if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, Integral))]
        if bad:
            # int() would truncate 2.7 to 2 and quietly decompose another window
            raise ValueError(
                f"steps={_fmt_steps(given)}: the window ends must be integers (update counts), got "
                f"{', '.join(repr(v) for v in bad)}; e.g. steps=slice(2, 5) decomposes F(theta_5) - F(theta_2)"
            )
        a = 0 if a is None else int(a)
        b = n_updates if b is None else int(b)
        a = a + n_updates if a < 0 else a
        b = b + n_updates if b < 0 else b
    if not 0 <= a < b <= n_updates:
        raise ValueError(
            f"steps={_fmt_steps(given)} asks for the window ({a}, {b}], outside this run: it has updates 1..{n_updates} "
            f"(steps 0..{n_updates}); the window (a, b] needs 0 <= a < b <= {n_updates}"
        )
    return a, b


def _fmt_steps(steps: Any) -> str:
    if isinstance(steps, slice):
        return f"slice({steps.start}, {steps.stop})"
    return repr(steps)


def parse_by(by: Any) -> frozenset[str]:
    """``by`` as a set: a comma-separated string or an iterable of ``sample``, ``step``, ``tensor``, ``param``."""
    items = [s.strip() for s in by.split(",")] if isinstance(by, str) else list(by or ())
    items = [s for s in items if s]
    unknown = sorted(set(items) - set(BY_KEYS))
    if unknown:
        raise ValueError(f"unknown by={unknown}; use any combination of {', '.join(BY_KEYS)}")
    return frozenset(items)


# ==============================================================================================================
# Resolving and checking the inputs
# ==============================================================================================================
def open_trajectory(run: Any) -> Trajectory:
    """A ``Run`` for a path or an object-store URL; a ``Trajectory`` as is."""
    if isinstance(run, (str, os.PathLike)):
        from explaind_store.reader import open_run

        p = storage.location(run)
        if not storage.exists(p):
            raise StoreError(f"no store at {p}")
        return open_run(p)
    if isinstance(run, Trajectory):
        return run
    raise TypeError(f"run must be a store path, a Run or a Trajectory, not {type(run).__name__}")


def _is_run(traj: Trajectory) -> bool:
    from explaind_store.reader import Run

    return isinstance(traj, Run)


class UnknownSplitError(KeyError):
    """A ``queries=`` split the run does not have (a KeyError whose message prints without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def split_names(traj: Trajectory) -> list[str]:
    if _is_run(traj):
        return list(traj.splits)  # type: ignore[attr-defined]
    data = getattr(traj, "data", None)
    return sorted(data) if isinstance(data, dict) else []


def get_split(traj: Trajectory, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's (inputs, targets), with a clear KeyError when it does not exist."""
    names = split_names(traj)
    if names and name not in names:
        raise UnknownSplitError(f"this run has no data split {name!r}; it has {names}")
    try:
        return traj.split(name)
    except KeyError:
        raise UnknownSplitError(f"this run has no data split {name!r}; it has {names}") from None


def train_input_spec(traj: Trajectory) -> tuple[tuple[int, ...], bool]:
    """(trailing shape, is floating point) of the training inputs, read from metadata where the store has it."""
    if _is_run(traj):
        info = traj.attrs[schema.ATTR_DATA]["splits"].get(schema.TRAIN_SPLIT, {})  # type: ignore[attr-defined]
        if info.get("mode") == "stored" and schema.TRAIN_SPLIT not in getattr(traj, "_attached", {}):
            arr = traj.root[schema.data_path(schema.TRAIN_SPLIT, schema.INPUTS)]  # type: ignore[attr-defined]
            return tuple(int(s) for s in arr.shape[1:]), np.dtype(arr.dtype).kind == "f"
    x, _ = get_split(traj, schema.TRAIN_SPLIT)  # raises clearly for a split stored by reference only
    x = torch.as_tensor(x)
    return tuple(x.shape[1:]), bool(x.is_floating_point())


def resolve_queries(
    traj: Trajectory, inputs: Any, targets: Any, queries: Any
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(query inputs, targets or None, description) from explicit tensors or a ``queries=`` split selection."""
    if queries is not None and inputs is not None:
        raise ValueError("pass either inputs= (and targets=) or queries='split[...]', not both")
    if queries is None and inputs is None:
        raise ValueError("nothing to explain: pass inputs= (query tensors) or queries= such as 'val[:10]'")
    trailing, is_float = train_input_spec(traj)
    if queries is not None:
        if targets is not None:
            raise ValueError("targets= cannot be combined with queries=: the targets come from the split")
        spec = parse_queries(queries)
        x, y = get_split(traj, spec.split)
        idx = torch.as_tensor(spec.indices(len(x)))
        x, y = torch.as_tensor(x)[idx], torch.as_tensor(y)[idx]
        desc = spec.text
    else:
        x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
        if tuple(x.shape) == trailing:  # one query without its batch axis
            x = x.unsqueeze(0)
        y = None
        if targets is not None:
            y = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
            if y.ndim == 0:
                y = y.reshape(1)
        desc = f"inputs{tuple(x.shape)}"
    if x.ndim == 0 or tuple(x.shape[1:]) != trailing:
        raise ValueError(
            f"query inputs have shape {tuple(x.shape)}, but this run's training inputs are (N, {', '.join(map(str, trailing))})"
            f": queries must be (Q, {', '.join(map(str, trailing))})"
        )
    if len(x) == 0:
        raise ValueError("the query inputs are empty (Q = 0)")
    if not is_float and x.is_floating_point():
        raise ValueError(f"query inputs are {x.dtype}, but this run's training inputs are integers (e.g. token ids)")
    if y is not None and len(y) != len(x):
        raise ValueError(f"targets has {len(y)} entries but there are {len(x)} query inputs")
    return x, y, desc


def check_store(traj: Trajectory, window: tuple[int, int]) -> None:
    """Cheap health check of a store before the heavy work: non-finite parameters inside the window, and the
    optimizer replay of up to ``verify_updates`` (a setting) evenly spaced updates (``run.verify`` without gradients/chunks)."""
    if not _is_run(traj):
        return
    a, b = window
    nonfinite = list(traj.nonfinite_updates)  # type: ignore[attr-defined]
    bad = [s for s in nonfinite if a <= s <= b]
    if bad:
        first = bad[0]
        hint = f"steps=slice({a}, {first - 1})" if first - 1 > a else "a window that ends before it"
        raise StoreError(
            f"parameters are NaN/inf after update(s) {bad[:5]}, inside the window ({a}, {b}]: training diverged "
            f"there and nothing after it can be decomposed; use {hint}"
        )
    if nonfinite:  # the replay of diverged updates (outside the window) would fail for the wrong reason
        return
    # steps=window: damage outside the window (e.g. a missing chunk) does not stop decomposing inside it;
    # checkpoints=False: a sparse run's replay is compared with its checkpoints by the scan (replay_residual)
    rep = traj.verify(  # type: ignore[attr-defined]
        gradients=False, chunks=False, max_updates=settings.get("verify_updates"), steps=window, checkpoints=False
    )
    if not rep.ok:
        raise StoreError(
            f"the store fails its verify check, so a decomposition would not be exact: {'; '.join(rep.problems)} "
            f"(run `explaind verify {traj.path}` for details)"  # type: ignore[attr-defined]
        )


def check_loss_supported(traj: Trajectory, output: str) -> None:
    """Output modes the run's loss supports: a token-level ``causal_lm`` run's outputs are sequences of logits, so
    its queries are sequences and their output is their own loss (the mean over their predicted tokens) or the
    log-probability of chosen next tokens ("token_logprob"), which only such runs have."""
    kind = dict(traj.loss).get("kind")
    if kind == "causal_lm" and output not in CAUSAL_LM_MODES:
        raise ValueError(
            f"output={output!r} is not defined for a causal language model run (loss causal_lm: its outputs are "
            "logits for every position and token); use output='loss', the loss of each query sequence, or "
            "output='token_logprob' with targets from engine.next_token_targets"
        )
    if kind != "causal_lm" and output == "token_logprob":
        raise ValueError(
            f"output='token_logprob' is for causal language model runs (loss causal_lm); this run's loss is {kind!r}: "
            "use output='target_logprob' for the log-probability of a target class"
        )


def check_token_targets(y: torch.Tensor | None, x: torch.Tensor) -> None:
    """``token_logprob`` targets: labels shaped like the query sequences, each with a chosen token to score."""
    if y is None:
        return
    if tuple(y.shape) != tuple(x.shape) or y.is_floating_point():
        raise ValueError(
            f"output='token_logprob' needs integer labels shaped like the query sequences {tuple(x.shape)}, got "
            f"{tuple(y.shape)} {y.dtype}: build them with engine.next_token_targets(inputs, positions, tokens)"
        )
    bad = torch.nonzero((y[:, 1:] != IGNORE_INDEX).sum(1) == 0).flatten()
    if bad.numel():
        raise ValueError(
            f"query sequences {bad.tolist()[:10]} have no labelled next token (every label after position 0 is "
            f"{IGNORE_INDEX}): build the targets with engine.next_token_targets(inputs, positions, tokens)"
        )


def check_out(out: Any) -> storage.Location:
    """The output path or object-store URL; refuses to overwrite anything but an earlier attribution result."""
    p = storage.location(out)
    if isinstance(p, Path) and p.exists() and not p.is_dir():
        raise ValueError(f"out={str(p)!r} exists and is not a directory")
    if storage.has_content(p):
        import json

        kind = None
        try:
            meta = storage.read_file(p, "zarr.json")
            kind = None if meta is None else json.loads(meta).get("attributes", {}).get("explaind_result")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != RESULT_KIND:
            raise ValueError(
                f"out={str(p)!r} exists and is not an earlier attribution result (a store, or other files); "
                "refusing to overwrite it: choose a new path"
            )
    return p


def check_device(device: Any) -> str:
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    return device


def available_memory() -> int | None:
    """Bytes of memory available to new work now (``MemAvailable`` of /proc/meminfo, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def max_result_limit(max_result_bytes: int | str | None = None) -> int:
    """The in-memory result limit in bytes: ``max_result_bytes`` (an int or "4GB"), else
    ``$EXPLAIND_MAX_RESULT_BYTES``, else ``MAX_RESULT_FRACTION`` of the available memory (8 GB if unknown)."""
    if max_result_bytes is not None:
        try:
            return parse_bytes(max_result_bytes)
        except ValueError as exc:
            raise ValueError(f"max_result_bytes: {exc}") from None
    return settings.get("max_result_bytes") or share_of_available()  # the setting's 0: not set


def share_of_available() -> int:
    """``MAX_RESULT_FRACTION`` of the memory available now (8 GB if unknown): the default of the in-memory result
    limit and of the query budget (the computation needs room besides them: workers, blocks in flight)."""
    avail = available_memory()
    return int(avail * MAX_RESULT_FRACTION) if avail else 8 * 10**9


def given_query_limit(query_bytes: int | str | None = None) -> int | None:
    """The query-row budget the caller set (bytes): ``query_bytes`` (an int or "2GB"), else the ``query_bytes``
    setting (``$EXPLAIND_QUERY_BYTES``); None when neither is set."""
    if query_bytes is not None:
        try:
            return parse_bytes(query_bytes)
        except ValueError as exc:
            raise ValueError(f"query_bytes: {exc}") from None
    return settings.get("query_bytes") or None  # the setting's 0: not set


def query_limit(device: str = "cpu", query_bytes: int | str | None = None) -> int:
    """The memory the query groups that run at once may hold in query-row state (bytes): the budget the caller
    set (:func:`given_query_limit`), else :func:`share_of_available` of host memory, as for the result
    (:func:`max_result_limit`), or the same share of the GPU's free memory when the scan runs on ``device`` "cuda"
    (the rows' state lives there); the query groups that run at once share it."""
    given = given_query_limit(query_bytes)
    if given:
        return given
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * MAX_RESULT_FRACTION)
    return share_of_available()


def query_budget(req: Request, runner: _sched.Runner, sync: bool) -> tuple[int | None, int | None]:
    """``(query_bytes, task_bytes)`` for :func:`engine.plan.plan_attribution`: the budget the caller set (it
    wins), else this machine's share (:func:`query_limit`) for work that runs here, and, on workers with memory
    limits (CPU), the same share of one task's memory there (:meth:`Runner.task_memory`). A cluster elsewhere
    whose workers all have limits is bounded by those alone: this machine's memory says nothing about theirs."""
    given = req.query_limit
    if given is not None:
        return given, None
    device = req.problem.device
    task = None if sync or device != "cpu" else runner.task_memory()
    task_bytes = None if task is None else max(1, int(task * MAX_RESULT_FRACTION))
    here = sync or bool(getattr(runner, "same_host", False))
    if task_bytes is not None and not here:
        return None, task_bytes
    return query_limit(device), task_bytes


def warn_query_memory(p: plan.Plan, meta: Any, per_query: bool) -> None:
    """A :class:`QueryMemoryWarning` when a query group's rows are still estimated above its share of the budget
    (it could not split further), with what to do instead."""
    if not p.over_budget:
        return
    why = (f"one query has {meta.n_outputs} outputs (query rows), and a query's outputs are not split"
           if per_query else "these queries are not independent per sample (per_query=False), so they run as one batch")
    warnings.warn(
        f"the query rows are estimated to need {format_bytes(p.group_estimate)} of memory in one batch, more than "
        f"a query group's budget of {format_bytes(p.query_share or 0)}: {why}. The attribution runs anyway and may "
        "run out of memory; use an output with one row per query (output='target_logprob', 'loss' or 'margin') or "
        f"fewer queries, or raise the budget with query_bytes= (CLI: --query-bytes; env {QUERY_BYTES_ENV}) if the machine has the memory",
        QueryMemoryWarning, stacklevel=4,  # the caller of attribute
    )


def check_result_size(size: int, limit: int, by: frozenset[str], n_queries: int, n_steps: int) -> None:
    """Refuse a result of ``size`` bytes above ``limit`` (kept in memory) with what to change instead."""
    if size <= limit:
        return
    ways = ["pass out='result.zarr' (CLI: --out result.zarr) to stream it to disk in bounded memory",
            f"explain fewer queries (now {n_queries})"]
    if "sample" in by and "step" in by:
        ways.append("drop 'sample' or 'step' from by=")
    if "step" in by or n_steps > 1:
        ways.append(f"sum the {n_steps} steps into bins with step_bins=")
    if "param" in by:
        ways.append("drop 'param' from by=")
    ways.append(f"or raise the limit with max_result_bytes= (CLI: --max-result-bytes; env {MAX_RESULT_ENV})")
    raise ResultTooLargeError(
        f"the result would take {format_bytes(size)} in memory, more than the limit of {format_bytes(limit)} "
        f"(by={sorted(by)}): " + "; ".join(ways)
    )


# ==============================================================================================================
# attribute
# ==============================================================================================================
def attribute(
    run: Any,
    inputs: Any = None,
    targets: Any = None,
    *,
    queries: str | None = None,
    output: str = "log_softmax",
    by: Any = ("sample",),
    steps: Any = None,
    quadrature: Any = None,
    client: Any = None,
    device: str = "cpu",
    out: str | os.PathLike[str] | None = None,
    chunk_updates: int | None = None,
    method: str = "auto",
    progress: bool = True,
    step_bins: int | None = None,
    residual_tol: float | None = DEFAULT_RESIDUAL_TOL,
    max_result_bytes: int | str | None = None,
    query_bytes: int | str | None = None,
) -> xr.Dataset:
    """Decompose ``F(theta_b) - F(theta_a)`` for query outputs of a recorded run into training samples, updates,
    tensors / parameters, weight decay and carried-over momentum (ExPLAIND; see docs/math.md).

    Args:
        run: a store path, a ``Run`` (``open_run``) or any ``Trajectory`` (e.g. ``InMemoryTrajectory``).
        inputs, targets: query tensors ``(Q, *sample_shape)`` and their targets (needed by "loss",
            "target_logprob", "margin").
        queries: instead of tensors, a split selection: ``"val"``, ``"val[:10]"``, ``"train[0:3]"``,
            ``"val[[1,5,7]]"`` (targets come from the split).
        output: "log_softmax" (every class), "logits", "loss", "target_logprob" or "margin"; for a causal LM run
            "loss" (each query sequence's mean token loss) or "token_logprob" (targets: engine.next_token_targets).
        by: any of "sample", "step", "tensor", "param" (a list or "sample,step").
        steps: ``slice(a, b)`` decomposes ``F(theta_b) - F(theta_a)`` (default: the whole run).
        quadrature: rule string ("kink" default, "gauss:4", "midpoint:100", "adaptive:1e-8") or QuadratureRule.
        client: None (a process LocalCluster, started once and reused), "sync" (in-process), a scheduler address
            ("tcp://host:8786") or a ``distributed.Client``.
        device: "cpu" or "cuda" (the per-update math on the workers' GPU).
        out: a Zarr path; results stream there chunk by chunk and the opened (lazy) Dataset is returned.
        chunk_updates: updates per task (default: the store's chunk size; must be a multiple of it); tasks are
            split further when their result block would exceed the per-task budget ($EXPLAIND_BLOCK_BYTES).
        method: per-sample dot products by "grad", "jvp" or "auto".
        progress: show a progress bar.
        step_bins: sum the step axis into this many contiguous bins.
        residual_tol: the exactness guard (engine/guard.py): raise ``InexactRecordError`` naming the first update
            whose ``rounding_residual`` (what the recorded batches do not reproduce) exceeds this fraction of its
            change plus a float-rounding floor, with the likely cause from the batch-gradient check (an
            ``InexactWarning`` instead when that check traces it to float rounding). None turns it off.
        max_result_bytes: the largest result kept in memory (bytes, or "4GB"); a larger one raises
            ``ResultTooLargeError`` before any task runs unless ``out=`` is given (default: $EXPLAIND_MAX_RESULT_BYTES,
            else a quarter of the available memory). With ``out=`` every task's memory stays within the per-task
            budget ($EXPLAIND_BLOCK_BYTES, 512 MiB) whatever the result size and the store's chunk length.
        query_bytes: the memory the query rows' own state may take (bytes, or "2GB"; estimated as 4
            parameter-sized float64 vectors per query output): beyond it the queries run in batches one after
            another (attrs ``query_batches``, ``query_budget`` per group), each taking the per-sample gradients
            again (default: $EXPLAIND_QUERY_BYTES, else a quarter of the available memory, of the GPU's free
            memory on "cuda"; on CPU workers with memory limits also at most a quarter of one task's share of a
            worker's limit, and on a cluster elsewhere whose workers all have limits, that alone).

    Returns:
        An ``xarray.Dataset`` (dims ``query``, ``output``, and ``sample`` / ``step`` / ``tensor`` as asked) with
        ``data``, ``weight_decay``, ``momentum``, ``initial``, ``final``, ``residual``, ``quadrature_residual``,
        ``rounding_residual`` (and ``param_<tensor>`` with "param"); ``initial + data.sum() +
        weight_decay.sum() + momentum.sum() + residual.sum() == final`` per query and output.
    """
    req = validate(run, inputs, targets, queries=queries, output=output, by=by, steps=steps, quadrature=quadrature,
                   device=device, out=out, chunk_updates=chunk_updates, method=method, step_bins=step_bins,
                   residual_tol=residual_tol, max_result_bytes=max_result_bytes, query_bytes=query_bytes)
    runner = _start_runner(req, client)
    scratch = _scratch.scratch_root(req.out_path, local=runner.workers_here())
    try:
        call = uuid.uuid4().hex if progress else None
        ds, bounds = build(req, runner, scratch=scratch, progress_call=call)
        result = _compute(req, ds, bounds, runner, progress, call)
    finally:
        runner.close()
        if scratch is not None:
            storage.remove_tree(scratch)
        release_heap()
    check_exactness(result, req.traj, req.tol)  # the per-update residual arrays are small (query x output x step)
    return result


# ==============================================================================================================
# attribute's stages: validate (every check before any heavy work), build (plan and graph), compute
# ==============================================================================================================
@dataclass(frozen=True)
class Request:
    """One attribution, checked: everything the later stages need, and nothing computed yet but the driver-side
    context (the float64 model, which also sized the result)."""

    traj: Trajectory
    problem: Problem
    ctx: Context
    meta: Any  # engine.result.ResultMeta
    qdesc: str
    store_chunk: int | None
    chunk_updates: int | None
    step_bins: int | None
    out_path: storage.Location | None
    tol: float | None
    n_tasks_guess: int
    checkpoints: tuple[int, ...] | None = None  # a run with sparse checkpoints: its stored steps (chunk boundaries)
    query_limit: int | None = None  # the query-row budget the caller set (given_query_limit()); None: the default


def validate(
    run: Any,
    inputs: Any = None,
    targets: Any = None,
    *,
    queries: str | None,
    output: str,
    by: Any,
    steps: Any,
    quadrature: Any,
    device: str,
    out: Any,
    chunk_updates: int | None,
    method: str,
    step_bins: int | None,
    residual_tol: float | None,
    max_result_bytes: int | str | None,
    query_bytes: int | str | None = None,
) -> Request:
    """Every check :func:`attribute` makes before any task runs (arguments, queries, window, output path, the
    store's health, the model factory's trust, the result's size); raises with a message that says what to change."""
    traj = open_trajectory(run)
    if output not in OUTPUT_MODES:
        raise ValueError(f"unknown output={output!r}; use one of {', '.join(OUTPUT_MODES)}")
    check_loss_supported(traj, output)
    by_set = parse_by(by)
    device = check_device(device)
    if quadrature is not None:
        parse_rule(quadrature)  # validates the rule string now
    if step_bins is not None and (not isinstance(step_bins, (int, np.integer)) or step_bins < 1):
        raise ValueError(f"step_bins must be a positive integer, got {step_bins!r}")
    tol = check_residual_tol(residual_tol)
    x_q, y_q, qdesc = resolve_queries(traj, inputs, targets, queries)
    if output in NEEDS_TARGETS and y_q is None:
        raise ValueError(
            f"output={output!r} needs the query targets: pass targets= (or queries='split[...]', which brings them)"
        )
    if output == "token_logprob":
        check_token_targets(y_q, x_q)
    window = parse_steps(steps, int(traj.committed_updates))
    store_chunk = int(traj.chunk_updates) if _is_run(traj) else None  # type: ignore[attr-defined]
    if chunk_updates is not None and (not isinstance(chunk_updates, (int, np.integer)) or chunk_updates < 1):
        raise ValueError(f"chunk_updates must be a positive integer, got {chunk_updates!r}")
    checkpoints = (tuple(int(c) for c in traj.checkpoint_steps)  # type: ignore[attr-defined]
                   if _is_run(traj) and traj.sparse else None)  # type: ignore[attr-defined]
    guess = plan.plan_chunks(window, store_chunk=store_chunk, chunk_updates=chunk_updates,
                             n_workers=os.cpu_count() or 1, checkpoints=checkpoints)
    out_path = check_out(out) if out is not None else None
    problem = Problem(x_query=x_q, y_query=y_q, output=output, by=by_set, window=window,
                      rule=quadrature, method=method, device=device)
    check_store(traj, window)
    # the driver-side context (CPU): builds the model (refusing untrusted factories) and sizes the result
    cpu_problem = problem if device == "cpu" else replace(problem, device="cpu")
    ctx = Context(traj, cpu_problem)
    meta = result_meta(traj, cpu_problem, ctx)
    if out_path is None:
        check_result_size(result_bytes(meta, step_bins), max_result_limit(max_result_bytes), by_set,
                          meta.n_queries, window[1] - window[0])
    return Request(traj, problem, ctx, meta, qdesc, store_chunk, chunk_updates, step_bins, out_path, tol, len(guess),
                   checkpoints, given_query_limit(query_bytes))


# free heap below this stays with the process after a call: trimming it costs more (the next call faults the
# pages in again) than the memory is worth
RELEASE_MIN_BYTES = 64 << 20


def release_heap() -> None:
    """Hand the heap pages freed by the tasks that ran in this process (sync, or a client with in-process workers)
    and by the gathered blocks back to the OS (:func:`engine.cluster.worker.release_freed_memory`) when at least
    ``RELEASE_MIN_BYTES`` are free: the engine's glibc tuning keeps freed memory, which would otherwise stay with a
    notebook until it exits."""
    free = _worker.freed_heap_bytes()
    if free is None or free >= RELEASE_MIN_BYTES:
        _worker.release_freed_memory()


def _start_runner(req: Request, client: Any) -> _sched.Runner:
    """The runner for ``client`` (our LocalCluster by default), checked for the device before any task runs."""
    device = req.problem.device
    local = client is None or (isinstance(client, str) and client.strip().lower() in _sched.LOCAL_NAMES)
    if local or (isinstance(client, str) and client.strip().lower() in _sched.SYNC_NAMES):
        _sched.check_local_device(device)  # before starting any worker process
    n_tasks = req.n_tasks_guess
    if local and device != "cpu":  # processes share the GPU(s): a few per device is plenty
        n_tasks = min(n_tasks, 2 * max(1, torch.cuda.device_count()))
    runner = _sched.get_runner(client, n_tasks=n_tasks)
    try:
        runner.check_device(device)
    except BaseException:
        runner.close()
        raise
    return runner


def build(req: Request, runner: _sched.Runner, *, scratch: storage.Location | None = None,
          progress_call: str | None = None) -> tuple[xr.Dataset, list[tuple[int, int]]]:
    """The plan (query groups, threads, chunks; :func:`engine.plan.plan_attribution`) and the lazy result over the
    runner's workers, with the attrs that say how it runs; returns it and the chunk bounds. ``scratch``: where
    the reverse chain may spill its momentum carries (:func:`engine.cluster.scratch.scratch_root`);
    ``progress_call``: the id the tasks report their updates under (:mod:`engine.progress`)."""
    traj, problem, meta = req.traj, req.problem, req.meta
    sync = isinstance(runner, _sched.SyncRunner)
    p = plan.plan_attribution(meta, problem.window, store_chunk=req.store_chunk, chunk_updates=req.chunk_updates,
                              per_query=problem.per_query, sync=sync,
                              same_host=bool(getattr(runner, "same_host", False)),
                              n_workers=1 if sync else runner.n_workers, checkpoints=req.checkpoints,
                              **dict(zip(("query_bytes", "task_bytes"), query_budget(req, runner, sync))))
    warn_query_memory(p, meta, problem.per_query)
    groups, threads, chain, bounds = p.groups, p.threads, p.chain, p.bounds
    n_batches = sum(len(b) for b in p.group_batches)
    if n_batches == 1:
        jobs: list[Any] = [_worker.make_job(traj, problem, by_reference=sync, threads=threads,
                                            progress_call=progress_call)]
        if sync and problem.device == "cpu":
            _worker.seed(jobs[0], traj, req.ctx)  # the tasks run here: reuse the driver's float64 context
    else:  # per group (a slot), its batches of queries, run one after another
        jobs = [[_worker.make_job(traj, _graph.group_problem(problem, b), by_reference=sync, threads=threads,
                                  progress_call=progress_call) for b in batches] for batches in p.group_batches]
    ds = _graph.lazy_result(jobs, meta, bounds, keep_u=p.keep_u, chain=chain, scratch=scratch)
    if req.step_bins is not None:
        ds = _graph.bin_steps(ds, int(req.step_bins))
    ds.attrs.update(
        explaind_result=RESULT_KIND,
        run=str(getattr(traj, "path", type(traj).__name__)),
        queries=req.qdesc,
        device=problem.device,
        scheduler=runner.describe(),
        n_chunks=len(bounds),
        query_groups=len(groups),
        query_batches=n_batches,  # scans run: query_groups, or more when groups run their queries in batches
        query_budget=int(p.query_share or 0),  # bytes of query-row state each group may hold (0: unbounded)
        torch_threads=threads or (torch.get_num_threads() if sync else 0),  # 0: the workers' own setting
        scan="reverse chain" if chain else "parallel chunks",
        chunk_updates=max(hi - lo for lo, hi in bounds),
    )
    return ds, bounds


def _compute(req: Request, ds: xr.Dataset, bounds: list[tuple[int, int]], runner: _sched.Runner,
             progress: bool, progress_call: str | None = None) -> xr.Dataset:
    """Compute the lazy result in memory, or stream it to ``out``; a NaN/inf anywhere is an error. With
    ``progress_call`` (the jobs' id) the bar counts updates decomposed: each query batch's pass 2 (one per query
    group unless groups run their queries in batches) visits every update of the window once."""
    a, b = req.ctx.window
    updates = None if progress_call is None else (progress_call, int(ds.attrs["query_batches"]) * (b - a))
    if req.out_path is None:
        (result,) = runner.compute([ds], progress=progress, desc="attribute", updates=updates)
        return check_finite(finalize_attrs(result))
    # output step chunks: the store's (what readers of the run are used to) unless the tasks are shorter, so an
    # output chunk never waits on more than two tasks' blocks (memory independent of the store's chunks)
    task_len = max(hi - lo for lo, hi in bounds)
    written = _write(ds, req.out_path, runner, min(req.store_chunk or task_len, task_len), progress, updates)
    return check_finite(written, where=str(req.out_path))


def _write(ds: xr.Dataset, path: storage.Location, runner: _sched.Runner, step_chunk: int,
           progress: bool, updates: tuple[str, int] | None = None) -> xr.Dataset:
    """Stream the lazy result into a Zarr store (a directory or an object-store URL; one write per output chunk)
    and return it opened."""
    import zarr

    target = storage.open_store(path)  # pickled into the write tasks: a URL and options, never credentials

    step_chunk = step_chunk if "step_bins" not in ds.attrs else ds.sizes["step"]
    ds = _strings_as_objects(ds)
    chunked = ds.copy()
    for name, chunks in _graph.output_chunks(ds, step_chunk).items():
        chunked[name] = ds[name].chunk(chunks)
    with warnings.catch_warnings():
        # consolidated metadata is a zarr-python extension in v3; it lets xarray.open_zarr(path) open quietly
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        store = chunked.to_zarr(target, mode="w", compute=False, consolidated=True)
        runner.compute([_graph.gate_writes(store)], progress=progress, desc="attribute", updates=updates)
        opened = xr.open_zarr(target)
        attrs = finalize_attrs(opened).attrs
        group = zarr.open_group(store=target, mode="r+")
        group.attrs.update({k: attrs[k] for k in attrs if k.startswith("max_")})
        zarr.consolidate_metadata(target)
    return xr.open_zarr(target)


def _strings_as_objects(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width unicode coordinates as variable-length strings (zarr v3 has no stable fixed-width type)."""
    fix = {k: (c.dims, c.values.astype(object)) for k, c in ds.coords.items() if c.dtype.kind == "U"}
    return ds.assign_coords(fix) if fix else ds


__all__ = ["QueryMemoryWarning", "QuerySpec", "Request", "ResultTooLargeError", "UnknownSplitError", "attribute",
           "available_memory", "build", "check_store", "given_query_limit", "max_result_limit", "open_trajectory",
           "parse_by", "parse_queries", "parse_steps", "query_budget", "query_limit", "release_heap",
           "share_of_available", "validate"]
