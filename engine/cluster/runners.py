"""Where the chunk tasks run: the runners (client selection, progress bars) and the default LocalCluster.

Client selection (:func:`get_runner`):

- ``"sync"`` (also ``"synchronous"``): dask's synchronous scheduler, in this process (no pickling).
- ``None`` (the default) or ``"local"``: a ``LocalCluster(processes=True, threads_per_worker=1)`` sized to the
  machine (``min(cores, tasks)`` workers), started once per process, reused by later calls and closed at exit.
- an address (``"tcp://host:8786"``), a ``distributed.Client`` or a cluster object: an existing scheduler.

Dask's threads scheduler is never used: ``torch.func.jvp`` (forward-mode AD) is not thread-safe. Workers that run
several threads anyway (an external ``dask worker --nthreads 4``) are made safe by
:data:`engine.cluster.worker.MATH_LOCK`. What a worker keeps between tasks: :mod:`engine.cluster.worker`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self

import torch

from engine import progress as progress_mod

SYNC_NAMES = ("sync", "synchronous", "single-threaded")
LOCAL_NAMES = ("local", "processes", "localcluster")
# environment the default LocalCluster's workers get on top of the parent's (they inherit EXPLAIND_TRUSTED_MODULES)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# Dask config for our own LocalCluster (its scheduler and its workers, which receive the parent's config). The
# defaults wake every process many times a second (the statistical profiler, the event-loop health check, the
# nanny's memory check); on a machine with few cores those wake-ups preempt the torch threads, which then wait for
# each other (docs/benchmarks.md has the numbers). The profiler only feeds the dashboard, which this cluster does
# not start.
QUIET_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}

# set in a worker's environment before the nanny spawns it, so glibc reads it before the first allocation: one malloc
# arena for all of a worker's threads (see engine.scan.heap.keep_heap: pass 2's producer thread would keep its own)
PRE_SPAWN_ENV = {"MALLOC_ARENA_MAX": "1"}

def _cluster_config() -> dict[str, Any]:
    """:data:`QUIET_CLUSTER_CONFIG` plus :data:`PRE_SPAWN_ENV` on top of the nanny's own pre-spawn environment."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.update(PRE_SPAWN_ENV)
    return {**QUIET_CLUSTER_CONFIG, "distributed.nanny.pre-spawn-environ": environ}


# ==============================================================================================================
# Runners: compute dask collections on the chosen scheduler, with a progress bar
# ==============================================================================================================
class Runner:
    """Computes dask collections somewhere; ``n_workers`` sizes the default chunking."""

    kind = "base"
    n_workers = 1
    address: str | None = None

    def compute(self, collections: Sequence[Any], *, progress: bool, desc: str = "explaind",
                updates: tuple[str, int] | None = None) -> list[Any]:
        """The collections' values. With ``progress``, a bar: over ``updates = (call, total)`` when given (the
        updates the jobs made with ``progress_call=call`` decompose, :mod:`engine.progress`), else over tasks."""
        raise NotImplementedError

    def check_device(self, device: str) -> None:
        """Raise ValueError when the workers cannot use ``device``."""
        check_local_device(device)

    def describe(self) -> str:
        return self.kind

    def workers_here(self) -> bool:
        """Whether every task runs on this machine, so files this process writes under its temporary directory
        reach them all (the reverse chain's scratch store, :func:`engine.cluster.scratch.scratch_root`)."""
        return False

    def task_memory(self) -> int | None:
        """The memory one task may use on the workers (bytes): the smallest worker memory limit divided by that
        worker's threads (tasks run at once). None where a worker sets no limit or none is known: then only
        this machine's memory bounds the plan."""
        return None

    def close(self) -> None:
        """Release what this runner opened for one call (the shared LocalCluster stays up)."""


class SyncRunner(Runner):
    """dask's synchronous scheduler in this process; progress is a tqdm bar over finished tasks."""

    kind = "sync"

    def workers_here(self) -> bool:
        return True

    def compute(self, collections: Sequence[Any], *, progress: bool, desc: str = "explaind",
                updates: tuple[str, int] | None = None) -> list[Any]:
        import dask
        import dask.local
        import xarray as xr

        from engine.cluster.handoff import compute_inline

        # the function, not the name "synchronous": dask resolves a name only after importing distributed to look
        # for a client (a fresh process's first call then pays that import for nothing)
        sync = dask.local.get_sync

        def run(colls: list[Any]) -> list[Any]:
            if not progress:
                return list(dask.compute(*colls, scheduler=sync))
            if updates is not None:  # the tasks run in this thread: their ticks go straight to the bar
                with _updates_bar(updates[1], desc) as bar, progress_mod.reporting(bar.update):
                    return list(dask.compute(*colls, scheduler=sync))
            with _TqdmCallback(desc):
                return list(dask.compute(*colls, scheduler=sync))

        if len(collections) == 1 and isinstance(collections[0], xr.Dataset):
            return [compute_inline(collections[0], run)]
        return run(list(collections))


class ClientRunner(Runner):
    """A ``distributed.Client`` (a LocalCluster of ours, or an external scheduler)."""

    kind = "distributed"

    def __init__(self, client: Any, *, ephemeral: bool = False, same_host: bool = False):
        self.client = client
        self.ephemeral = ephemeral  # a client we opened for one call (from an address): closed by close()
        self.address = client.scheduler.address if client.scheduler is not None else None
        # workers on this machine (our LocalCluster): large results come back through shared memory
        self.same_host = same_host

    def workers_here(self) -> bool:
        if self.same_host:
            return True
        import socket

        try:  # a Client the caller made: its workers may be elsewhere
            hosts = set(self.client.run(socket.gethostname).values())
        except Exception:  # noqa: BLE001 - any failure to ask means: do not rely on local files
            return False
        return hosts == {socket.gethostname()}

    def _workers(self) -> dict[str, Any]:
        """The scheduler's description of every worker (address -> info with ``memory_limit``, ``nthreads``)."""
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:  # older signatures
            info = self.client.scheduler_info()
        return dict(info.get("workers", {}))

    @property
    def n_workers(self) -> int:  # type: ignore[override]
        return max(1, len(self._workers()))

    def task_memory(self) -> int | None:
        per_task = []
        for w in self._workers().values():
            try:
                limit, threads = int(w.get("memory_limit") or 0), max(1, int(w.get("nthreads") or 1))
            except (TypeError, ValueError):
                return None
            if limit <= 0:  # a worker without a limit: its host's memory, which this process cannot see
                return None
            per_task.append(limit // threads)
        return min(per_task) if per_task else None

    def compute(self, collections: Sequence[Any], *, progress: bool, desc: str = "explaind",
                updates: tuple[str, int] | None = None) -> list[Any]:
        if progress and updates is not None:
            with _updates_bar(updates[1], desc) as bar, _subscribed(self.client, updates[0], bar):
                return self._compute(collections, None)
        show = (lambda fs: _client_progress(fs, self.client.scheduler.address, desc)) if progress else None
        return self._compute(collections, show)

    def _compute(self, collections: Sequence[Any], show: Callable[[list[Any]], None] | None) -> list[Any]:
        import xarray as xr

        from engine.cluster.handoff import compute_dataset, shm_root

        root = shm_root() if self.same_host else None
        if root is not None and len(collections) == 1 and isinstance(collections[0], xr.Dataset):
            return [compute_dataset(self.client, collections[0], root, show)]
        futures = self.client.compute(list(collections))
        if show is not None:
            show(futures)
        return self.client.gather(futures)

    def check_device(self, device: str) -> None:
        if not device.startswith("cuda"):
            return
        ok = self.client.run(_cuda_ok)
        bad = sorted(w for w, v in ok.items() if not v)
        if not ok or bad:
            raise ValueError(
                f"device={device!r}, but CUDA is not available on worker(s) {bad or '(none connected)'}; start GPU "
                "workers or use device='cpu'"
            )

    def describe(self) -> str:
        return f"{self.address} ({self.n_workers} workers)"

    def close(self) -> None:
        if self.ephemeral:
            self.client.close()


def _cuda_ok() -> bool:
    return bool(torch.cuda.is_available())


def check_local_device(device: str) -> None:
    """Raise ValueError when this machine cannot use ``device``."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available on this machine; use device='cpu'")


class _TqdmCallback:
    """A dask local-scheduler callback driving a tqdm bar over the graph's tasks."""

    def __init__(self, desc: str):
        from dask.callbacks import Callback

        bar_holder: dict[str, Any] = {}

        class _CB(Callback):
            def _start_state(self, dsk: Any, state: Any) -> None:
                from tqdm import tqdm

                total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
                bar_holder["bar"] = tqdm(total=total, desc=desc, unit="task", leave=False, mininterval=0.5)

            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
                bar = bar_holder.get("bar")
                if bar is not None:
                    bar.update(1)

            def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
                bar = bar_holder.pop("bar", None)
                if bar is not None:
                    bar.close()

        self._cb = _CB()

    def __enter__(self) -> Self:
        self._cb.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cb.__exit__(*exc)


@contextmanager
def _updates_bar(total: int, desc: str) -> Iterator[Any]:
    """A bar over ``total`` updates, filled when the block ends without error (what pass 2 ticks is the work, so
    only a retried task could make the count differ)."""
    bar = progress_mod.bar(total, desc)
    try:
        yield bar
        if bar.n < total:
            bar.update(total - bar.n)
    finally:
        bar.close()


@contextmanager
def _subscribed(client: Any, call: str, bar: Any) -> Iterator[None]:
    """The workers' progress events of ``call`` (:func:`engine.progress.topic`) advance ``bar`` while inside."""
    name = progress_mod.topic(call)

    def on_event(event: tuple[float, Any]) -> None:
        msg = event[1]
        n = min(int(msg.get("n", 0)), bar.total - bar.n) if isinstance(msg, dict) else 0
        if n > 0:
            bar.update(n)

    client.subscribe_topic(name, on_event)
    try:
        yield
    finally:
        try:
            client.unsubscribe_topic(name)
        except Exception:  # noqa: BLE001 - a closed client: nothing left to unsubscribe
            pass


def _client_progress(futures: Sequence[Any], address: str, desc: str) -> None:
    """A tqdm bar over every task the futures depend on, fed by the scheduler (as ``distributed.progress``)."""
    try:
        from distributed.diagnostics.progressbar import TextProgressBar
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - distributed is a dependency
        return

    class _Bar(TextProgressBar):
        bar: Any = None

        def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:  # dask's signature
            if self.bar is None:  # created on the scheduler's first report, when the task count is known
                self.bar = tqdm(total=all, desc=desc, unit="task", leave=False, mininterval=0.5)
            self.bar.total = all
            done = all - remaining
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)  # update(), not refresh(): honours mininterval in logs

        def _draw_stop(self, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    bar = _Bar(futures, scheduler=address, start=False)
    try:
        bar._loop_runner.run_sync(bar.listen)
    except Exception:  # noqa: BLE001 - progress is cosmetic; the futures carry the real errors
        bar._draw_stop()


# --- the default LocalCluster -----------------------------------------------------------------------------------
_LOCAL: dict[str, Any] = {}
_LOCAL_LOCK = threading.Lock()


def local_client(n_workers: int | None = None) -> Any:
    """This process's default ``LocalCluster(processes=True, threads_per_worker=1)`` client (started on first use).

    ``n_workers`` (first call only; default: the CPU count) is capped by the CPU count. Worker processes are
    spawned, so scripts that call this need an ``if __name__ == "__main__":`` guard.
    """
    with _LOCAL_LOCK:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            raise RuntimeError(
                "engine.attribute(client=None) starts a LocalCluster whose worker processes are spawned and re-import "
                "your script: put the call under `if __name__ == \"__main__\":`, or pass client=\"sync\""
            )
        cores = os.cpu_count() or 1
        n = max(1, min(cores, int(n_workers or cores)))
        client = _LOCAL.get("client")
        if client is not None and client.status == "running":
            cluster = _LOCAL["cluster"]
            if n > len(cluster.workers):  # a later, bigger job: grow to min(cores, tasks)
                import dask

                with _own_environ(), dask.config.set(_cluster_config()):
                    cluster.scale(n)
                    client.wait_for_workers(n, timeout=120)
                client.run(warm_worker, wait=False)
            return client
        import dask
        from distributed import Client, LocalCluster

        with _own_environ(), dask.config.set(_cluster_config()):
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
                env=dict(WORKER_ENV),
            )
            client = Client(cluster, set_as_default=False)
        _LOCAL.update(cluster=cluster, client=client)
        # import torch and the engine on every worker now, in the background, while the caller builds its graph
        client.run(warm_worker, wait=False)
        return client


@contextmanager
def _own_environ() -> Iterator[None]:
    """Undo what the nanny writes into *our* environment (OMP_NUM_THREADS & co.) before spawning workers."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for k in set(os.environ) - set(saved):
            os.environ.pop(k, None)
        os.environ.update(saved)


def _warm_worker() -> None:
    import engine.cluster.graph  # noqa: F401 - imports torch, torch.func and the scan


async def warm_worker() -> None:
    """Import the engine on a worker in a thread (``client.run(warm_worker, wait=False)`` needs a coroutine)."""
    import asyncio

    await asyncio.get_running_loop().run_in_executor(None, _warm_worker)


def local_client_running() -> bool:
    """Whether this process's default LocalCluster (:func:`local_client`) is up."""
    client = _LOCAL.get("client")
    return client is not None and client.status == "running"


def close_local_client() -> None:
    """Close the default LocalCluster (also registered to run at exit)."""
    with _LOCAL_LOCK:
        client, cluster = _LOCAL.pop("client", None), _LOCAL.pop("cluster", None)
        for obj in (client, cluster):
            if obj is not None:
                with contextlib.suppress(Exception):  # best effort at shutdown
                    obj.close()


atexit.register(close_local_client)


def get_runner(client: Any = None, *, n_tasks: int | None = None) -> Runner:
    """Resolve the ``client`` argument of :func:`engine.attribute` (see the module docstring)."""
    if isinstance(client, Runner):
        return client
    if client is None or (isinstance(client, str) and client.lower() in LOCAL_NAMES):
        return ClientRunner(local_client(n_tasks), same_host=True)
    if isinstance(client, str):
        name = client.strip()
        if name.lower() in SYNC_NAMES:
            return SyncRunner()
        if name.lower() in ("threads", "threading", "threaded"):
            raise ValueError(
                "the threads scheduler is not supported: torch.func.jvp is not thread-safe. Use client='sync', the "
                "default LocalCluster (client=None) or a scheduler address"
            )
        if "://" not in name and ":" not in name:
            raise ValueError(
                f"client={client!r} is not a scheduler: use 'sync', 'local', None (a LocalCluster), an address "
                "such as 'tcp://127.0.0.1:8786', or a distributed.Client"
            )
        from distributed import Client

        try:
            return ClientRunner(Client(name, set_as_default=False, timeout="10s"), ephemeral=True)
        except OSError as exc:
            raise ValueError(f"cannot connect to the dask scheduler at {name}: {exc}") from None
    from distributed import Client

    if isinstance(client, Client):
        return ClientRunner(client, same_host=client is _LOCAL.get("client"))
    if hasattr(client, "scheduler_address"):  # a cluster object (LocalCluster, SpecCluster, ...)
        return ClientRunner(Client(client, set_as_default=False), ephemeral=True)
    raise TypeError(
        f"client must be None, 'sync', 'local', a scheduler address or a distributed.Client, not {type(client).__name__}"
    )


__all__ = [
    "ClientRunner",
    "Runner",
    "SyncRunner",
    "check_local_device",
    "close_local_client",
    "get_runner",
    "local_client",
    "local_client_running",
]
