"""What a worker keeps and runs: the :class:`Job` a chunk task receives, and the per-process caches it finds its
trajectory and float64 model context in (:func:`task_env`).

A task receives a small :class:`Job` (store path or pickled in-memory trajectory, the
:class:`~engine.scan.Problem`, the caller's trusted-module list and settings snapshot) and looks up, per process,
the opened ``Run`` and the float64 model context for it, building them on first use. :func:`running` is how every
task starts: one engine task at a time per process (:data:`MATH_LOCK`: ``torch.func.jvp`` is not thread-safe, and an
external ``dask worker --nthreads 4`` would otherwise run several), under the caller's settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import progress, settings
from engine.scan.problem import Context, Problem
from explaind_store.specs import TRUSTED_ENV
from explaind_store.storage import StoreError
from explaind_store.trajectory import Trajectory

MATH_LOCK = threading.Lock()


# ==============================================================================================================
# The job a task receives
# ==============================================================================================================
@dataclass(eq=False)
class Job:
    """What every chunk task needs to find its trajectory and problem (small, picklable, one graph key).

    Exactly one of ``path`` (a store: opened inside the task, with the caller's ``model_factory`` and attached
    by-reference splits) or ``traj`` (an in-memory trajectory: shipped pickled, or shared by reference under the
    synchronous scheduler) is set. ``trusted`` is the caller's ``EXPLAIND_TRUSTED_MODULES``: workers started
    before the caller set it (or on other machines) would otherwise refuse the store's model factory.
    """

    problem: Problem
    path: str | None = None
    traj: Trajectory | None = None
    model_factory: Callable[..., torch.nn.Module] | None = None
    attached: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    trusted: str | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    threads: int | None = None  # torch intra-op threads for this job's tasks (None: the worker's setting)
    settings: dict[str, Any] = field(default_factory=settings.snapshot)  # the caller's, applied by running()
    progress_call: str | None = None  # the caller's progress bar: workers report updates done under this id

    def open(self) -> Trajectory:
        if self.traj is not None:
            return self.traj
        from explaind_store.reader import open_run

        assert self.path is not None
        return open_run(self.path, model_factory=self.model_factory, data=self.attached or None)


def make_job(traj: Trajectory, problem: Problem, *, by_reference: bool, threads: int | None = None,
             progress_call: str | None = None) -> Job:
    """The job for ``traj``. ``by_reference``: the tasks run in this process (sync), so share ``traj`` itself.
    ``threads``: torch threads its tasks use (see :func:`engine.plan.plan_parallelism`). ``progress_call``: the
    id under which Dask workers report the updates they decomposed (:mod:`engine.progress`)."""
    from explaind_store.reader import Run

    trusted = os.environ.get(TRUSTED_ENV)
    if by_reference or not isinstance(traj, Run):
        return Job(problem=problem, traj=traj, trusted=trusted, threads=threads, progress_call=progress_call)
    if str(traj.path).startswith("memory://"):
        raise StoreError(
            f"{traj.path} lives in this process's memory, which Dask worker processes cannot see; attribute it "
            "with client='sync', or record it to a directory or an object-store URL (s3://...) instead"
        )
    attached = dict(getattr(traj, "_attached", {}) or {})
    return Job(problem=problem, path=str(traj.path), model_factory=traj.model_factory, attached=attached,
               trusted=trusted, threads=threads, progress_call=progress_call)


# ==============================================================================================================
# Worker-side caches
# ==============================================================================================================
_ENVS: OrderedDict[str, tuple[Trajectory, Context]] = OrderedDict()
_ENVS_MAX = 2  # a context holds the float64 model and training data: keep only the latest jobs
_THREADS_SET = False


@contextmanager
def trusted_modules(extra: str | None) -> Iterator[None]:
    """Temporarily add the caller's trusted modules to this process's ``EXPLAIND_TRUSTED_MODULES``."""
    if not extra:
        yield
        return
    old = os.environ.get(TRUSTED_ENV)
    mods = [m for m in (old or "").split(",") if m.strip()]
    mods += [m for m in extra.split(",") if m.strip() and m not in mods]
    os.environ[TRUSTED_ENV] = ",".join(mods)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TRUSTED_ENV, None)
        else:
            os.environ[TRUSTED_ENV] = old


def in_dask_worker() -> bool:
    """Whether this code runs in a ``distributed`` worker (else under a local dask scheduler in the caller's
    process, which never runs a task twice)."""
    if "distributed" not in sys.modules:
        return False  # no worker without distributed; and a synchronous run must not import it (start-up time)
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def task_env(job: Job) -> tuple[Trajectory, Context]:
    """This process's (trajectory, float64 context) for ``job``, opened / built on first use."""
    global _THREADS_SET
    if job.threads and torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    hit = _ENVS.get(job.token)
    if hit is not None:
        _ENVS.move_to_end(job.token)
        return hit
    if not _THREADS_SET and not job.threads and in_dask_worker():
        # one torch thread per worker process: dask parallelises over processes, and oversubscribed BLAS threads
        # only slow every worker down
        torch.set_num_threads(settings.get("worker_threads"))
        _THREADS_SET = True
    with trusted_modules(job.trusted):
        traj = job.open()
        ctx = Context(traj, job.problem)
    _ENVS[job.token] = (traj, ctx)
    while len(_ENVS) > _ENVS_MAX:
        _ENVS.popitem(last=False)
    return traj, ctx


def seed(job: Job, traj: Trajectory, ctx: Context) -> None:
    """Register an already built context for ``job`` in this process (the synchronous scheduler reuses the
    driver's)."""
    _ENVS[job.token] = (traj, ctx)
    while len(_ENVS) > _ENVS_MAX:
        _ENVS.popitem(last=False)


def clear_caches() -> None:
    """Forget every cached run and context in this process (e.g. after rewriting a store in place)."""
    _ENVS.clear()


@contextmanager
def running(job: Job) -> Iterator[tuple[Trajectory, Context]]:
    """How a chunk task runs: alone in its process (:data:`MATH_LOCK`), under the caller's settings, with this
    process's (trajectory, context) for ``job``; in a Dask worker, every :data:`TRIM_EVERY` tasks the heap pages
    that tasks' temporaries freed are then handed back to the OS (:func:`release_freed_memory`), and the updates
    it decomposes are reported to the caller's progress bar (``job.progress_call``)."""
    global _SINCE_TRIM
    in_worker = in_dask_worker()
    sink = _event_sink(job.progress_call) if job.progress_call is not None and in_worker else None
    with MATH_LOCK, settings.applied(job.settings), progress.reporting(sink):
        try:
            yield task_env(job)
        finally:
            if sink is not None:
                sink.flush()
            if in_worker:
                _SINCE_TRIM += 1
                if _SINCE_TRIM >= TRIM_EVERY:
                    _SINCE_TRIM = 0
                    release_freed_memory()


def _event_sink(call: str) -> progress.EventSink:
    """Ticks of this task as events on the call's topic (:func:`engine.progress.topic`; the caller's client
    subscribes to it)."""
    from distributed import get_worker

    worker, name = get_worker(), progress.topic(call)
    return progress.EventSink(lambda msg: worker.log_event(name, msg))


# Engine tasks between two heap trims in a worker: a trim after every task also hands back the pages the next task
# reuses at once, and faulting them in again costs CPU; the heap's growth between trims stays a few tasks' worth.
TRIM_EVERY = 8
_SINCE_TRIM = TRIM_EVERY - 1  # the first task trims: the heap building the context left behind
_LIBC: Any = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def freed_heap_bytes() -> int | None:
    """Bytes of this process's malloc heap that are free but kept (glibc ``mallinfo2().fordblks``); None where the
    C library cannot tell."""
    lib = _libc()
    fn = getattr(lib, "mallinfo2", None) if lib else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def _libc() -> Any:
    """The C library when it has ``malloc_trim`` (glibc), else False."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    return _LIBC


def release_freed_memory() -> bool:
    """Return the free pages of this process's malloc heap to the OS (glibc ``malloc_trim(0)``); False where the
    C library has no such call (then nothing is done).

    Why: a task's temporaries (parameter-sized float64 vectors, a chunk's batches and blocks) are freed when it
    ends, but the small objects that outlive it (Dask's task records, the result blocks it hands on) sit between
    them in the heap, and glibc only gives back the heap's top. Without this a worker's resident memory grew with
    the number of tasks it ran while the memory in use stayed flat (docs/benchmarks.md, "Larger than memory")."""
    lib = _libc()
    if not lib:
        return False
    lib.malloc_trim(0)
    return True


__all__ = ["MATH_LOCK", "TRIM_EVERY", "Job", "clear_caches", "freed_heap_bytes", "in_dask_worker", "make_job",
           "release_freed_memory", "running", "seed", "task_env", "trusted_modules"]
