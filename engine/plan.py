"""Planning an attribution: query groups, chunk bounds, reverse chain or parallel chunks, memory budgets.

Plain arithmetic over sizes (no torch, no dask): every planning rule is written here once, and the scan, the
cluster layer, the in-process reference and :func:`engine.attribute` ask it.

- Memory: pass 2 keeps a chunk's rebuilt momentum, ``L x P`` float64 per momentum part (:func:`momentum_parts`:
  one for AdamW, whose decay is decoupled, two otherwise), within the ``light_bytes`` setting; kept path integrals
  (``L x rows x P``) stay within ``keep_u_bytes``; every task's result block within ``block_bytes``, even when that
  means fewer updates than a store chunk (:func:`task_updates`); the query rows' own state (``rows x P``, a few
  vectors a row: :func:`query_row_bytes`) within ``query_bytes``, by running a group's queries in batches one
  after another (:func:`query_batches`).
- Parallelism: on one machine, query groups in separate processes versus torch threads inside one process
  (:func:`plan_parallelism`); chunks of updates run in parallel only when workers would otherwise sit idle.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine import settings
from engine.result import STEP, ResultMeta, chunk_dtype, chunk_layout, chunk_shapes

F64_BYTES = 8


# ==============================================================================================================
# Memory rules
# ==============================================================================================================
def momentum_parts(optimizer: str) -> int:
    """Parts of the rebuilt momentum pass 2 keeps: data only for AdamW (decoupled decay), data and coupled weight
    decay for Adam and SGD."""
    return 1 if optimizer == "AdamW" else 2


def momentum_bytes(n_updates: int, n_params: int, optimizer: str) -> int:
    """Bytes of the rebuilt momentum of ``n_updates`` updates (what pass 2 keeps per chunk)."""
    return n_updates * n_params * momentum_parts(optimizer) * F64_BYTES


def light_fits(n_updates: int, n_params: int, optimizer: str) -> bool:
    """Whether a chunk's rebuilt momentum fits the ``light_bytes`` setting (pass 1 may then skip its path
    integrals, and pass 2 keeps the momentum instead)."""
    return momentum_bytes(n_updates, n_params, optimizer) <= settings.get("light_bytes")


def light_chunk_updates(n_params: int, optimizer: str) -> int:
    """The most updates per chunk whose rebuilt momentum fits ``light_bytes`` (at least one)."""
    return max(1, settings.get("light_bytes") // max(1, momentum_bytes(1, n_params, optimizer)))


def kept_u_bytes(n_updates: int, rows: int, n_params: int) -> int:
    """Bytes of ``rows`` kept float64 vectors of all parameters per update (pass 1's ``u_s``, and ``g_s``)."""
    return n_updates * rows * n_params * F64_BYTES


def keeps_u(n_updates: int, rows: int, n_params: int, budget: int | None = None) -> bool:
    """Whether ``n_updates`` updates of kept vectors fit ``budget`` (default: the ``keep_u_bytes`` setting)."""
    return kept_u_bytes(n_updates, rows, n_params) <= (settings.get("keep_u_bytes") if budget is None else budget)


def grads_ahead_fits(batch: int, n_params: int) -> bool:
    """Whether the per-sample gradients of a batch fit the ``grads_ahead_bytes`` setting (pass 2's producer thread
    then takes them one update ahead; its queue holds one such update, the consumer another)."""
    return kept_u_bytes(1, batch, n_params) <= settings.get("grads_ahead_bytes")


def grad_group(batch: int, n_params: int, updates: int) -> int:
    """Updates whose per-sample gradients pass 2 takes in one call: the ``grad_group_updates`` setting, at most
    ``updates`` (the chunk) and as many as fit ``grads_ahead_bytes`` together (at least 1)."""
    fit = settings.get("grads_ahead_bytes") // max(1, kept_u_bytes(1, batch, n_params))
    return max(1, min(int(settings.get("grad_group_updates")), int(updates), int(fit)))


# ==============================================================================================================
# Chunks of updates
# ==============================================================================================================
def chunk_bounds(window: tuple[int, int], chunk_updates: int) -> list[tuple[int, int]]:
    """Split the window ``(a, b]`` into consecutive chunks ``(lo, hi]`` of at most ``chunk_updates`` updates."""
    if int(chunk_updates) < 1:
        raise ValueError(f"chunk_updates must be >= 1, got {chunk_updates}")
    a, b = window
    return [(lo, min(b, lo + int(chunk_updates))) for lo in range(a, b, int(chunk_updates))]


def plan_chunks(
    window: tuple[int, int],
    *,
    store_chunk: int | None,
    chunk_updates: int | None = None,
    n_workers: int = 1,
    max_updates: int | None = None,
    fill: bool | None = None,
    checkpoints: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Chunks ``(lo, hi]`` tiling the window, none longer than ``max_updates``.

    ``max_updates`` is the memory budget of one task (:func:`task_updates`: its result block, and in the reverse
    chain its rebuilt momentum). It caps every chunk, even below the store's chunk length: a task may then read a
    sub-range of a store chunk (``Trajectory.block(lo, hi)`` takes any range), so a task's memory never depends on
    how the store was chunked. With ``fill`` (the reverse chain; default: True when ``max_updates`` is given)
    the default chunk is the largest multiple of the store's chunk size within ``max_updates``, since chunks there
    buy memory bounds, not parallelism.

    With a store (``store_chunk`` = its ``chunk_updates``) boundaries sit on multiples of ``chunk_updates``, which
    must be a multiple of ``store_chunk`` (default: ``store_chunk``), so every task reads whole store chunks unless
    the budget splits them; only the first / last chunk of a window that does not start / end on a boundary is
    shorter. When the store's chunks are so long that the window would give fewer tasks than ``n_workers``, the
    default splits the window evenly instead (tasks then re-read parts of one store chunk: cheap next to the math).
    Without a store (in-memory trajectories) chunks of ``chunk_updates`` (default 16) start at the window start.

    ``checkpoints`` (a store with sparse checkpoints: the stored steps): every checkpoint inside the window is a
    boundary, so each chunk replays its updates from the checkpoint it starts at and the replay residual is taken at
    the checkpoint it ends on; ``chunk_updates`` and ``max_updates`` may split a segment further.
    """
    if checkpoints is not None:
        return _checkpoint_chunks(window, checkpoints, chunk_updates, max_updates)
    a, b = window
    length = b - a
    cap = None if max_updates is None else max(1, int(max_updates))
    if chunk_updates is not None:
        k = int(chunk_updates)
        if k < 1:
            raise ValueError(f"chunk_updates must be >= 1, got {chunk_updates}")
        if store_chunk and k % store_chunk:
            raise ValueError(
                f"chunk_updates={k} is not a multiple of the store's chunk size ({store_chunk} updates): tasks "
                f"must read whole chunks; use {store_chunk * max(1, round(k / store_chunk))} or another multiple"
            )
    elif store_chunk:
        k = int(store_chunk)
        if cap is not None and (fill is None or fill):
            k *= max(1, cap // k)
        n_aligned = 1 + len(range((a // k + 1) * k, b, k))
        if n_workers > 1 and n_aligned < n_workers and length >= 2:
            step = math.ceil(length / min(n_workers, length))
            return _capped([(lo, min(b, lo + step)) for lo in range(a, b, step)], cap)
    else:
        k = 16 if cap is None or fill is False else cap
    if not store_chunk:
        return _capped(chunk_bounds(window, k), cap)
    edges = [a, *range((a // k + 1) * k, b, k), b]
    return _capped(list(itertools.pairwise(edges)), cap)


def _checkpoint_chunks(
    window: tuple[int, int], checkpoints: Sequence[int], chunk_updates: int | None, max_updates: int | None
) -> list[tuple[int, int]]:
    """Chunks of a window over a run with sparse checkpoints: one per segment between checkpoints, split further at
    multiples of ``chunk_updates`` (when given) and to at most ``max_updates``."""
    a, b = window
    edges = {a, b, *(int(c) for c in checkpoints if a < int(c) < b)}
    if chunk_updates is not None:
        k = int(chunk_updates)
        if k < 1:
            raise ValueError(f"chunk_updates must be >= 1, got {chunk_updates}")
        edges.update(range((a // k + 1) * k, b, k))
    cap = None if max_updates is None else max(1, int(max_updates))
    return _capped(list(itertools.pairwise(sorted(edges))), cap)


def _capped(bounds: list[tuple[int, int]], cap: int | None) -> list[tuple[int, int]]:
    """``bounds`` with every chunk longer than ``cap`` split into consecutive pieces of ``cap`` (the last shorter)."""
    if cap is None:
        return bounds
    return [(s, min(hi, s + cap)) for lo, hi in bounds for s in range(lo, hi, cap)]


def step_bytes(meta: ResultMeta, n_rows: int) -> int:
    """Bytes one update adds to a task's result block (its arrays with a ``step`` axis) for ``n_rows`` query rows."""
    return sum(
        math.prod(shape) * chunk_dtype(key).itemsize
        for key, shape in chunk_shapes(replace(meta, n_queries=max(1, n_rows // max(1, meta.n_outputs))), 0, 1).items()
        if STEP in chunk_layout(meta)[key]
    )


def task_updates(meta: ResultMeta, n_rows: int, *, chain: bool) -> int:
    """Most updates one task may cover within the ``block_bytes`` setting: its result block (``n_rows`` query rows;
    with ``sample`` and ``step`` that is ``R x N x L``) and, in the reverse chain, the chunk's rebuilt momentum
    (:func:`chain_chunk_updates`). At least 1, whatever the store's chunk length."""
    if chain:
        return chain_chunk_updates(meta, n_rows)
    return max(1, settings.get("block_bytes") // max(1, step_bytes(meta, n_rows)))


def chain_chunk_updates(meta: ResultMeta, n_rows: int) -> int:
    """Updates per chunk of the reverse chain: pass 2 keeps the chunk's rebuilt momentum (:func:`light_chunk_updates`)
    and builds its result block (``n_rows`` query rows) within the ``block_bytes`` setting, so both bound ``L``."""
    n_params = sum(math.prod(s) for s in meta.tensor_shapes)
    per_update = step_bytes(meta, n_rows)
    return max(1, min(light_chunk_updates(n_params, meta.optimizer), settings.get("block_bytes") // max(1, per_update)))


# ==============================================================================================================
# Query groups and threads
# ==============================================================================================================
def query_groups(n_queries: int, n_groups: int, *, per_query: bool) -> list[slice]:
    """Up to ``n_groups`` consecutive, nearly equal groups of the queries (:func:`plan_parallelism` says how many
    run at once).

    Every query row has its own phi and reverse accumulator, so groups of queries are independent scans: unlike
    chunks of updates, which parallelise the scan only by computing every later chunk's path integrals twice (once
    for the carries, once for the scores), groups split the path integrals and the per-sample dot products without
    repeating any; only the per-sample gradients of each batch are taken once per group. Needs queries that are
    independent per sample (``Problem.per_query``); otherwise one group.
    """
    if not per_query or n_groups <= 1 or n_queries <= 1:
        return [slice(0, n_queries)]
    g = min(n_queries, n_groups)
    edges = [round(i * n_queries / g) for i in range(g + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


# Float64 parameter-sized vectors one query row (one output of one query) adds to the peak of a scan task: pass 2
# holds the row's phi (its path integral) and the reverse accumulator U, and while phi is being built the vmapped
# Jacobians and their reverse passes at the quadrature nodes. Calibrated against the peak resident memory of the
# paper's modular-addition model (~97k parameters, by step and tensor, one torch thread, synchronous scheduler):
# from 1 to 4 and 16 queries of 113 rows each it grew by 2.5-2.8 vectors a row as one chunk and 2.8 in a reverse
# chain of three chunks (bench/query_memory.py, docs/benchmarks.md); rounded up. In a distributed worker pass 2
# also keeps the accumulator handed on by the next chunk (dask may run a task again on its inputs, so it is not
# overwritten): one vector more (the chain measured 3.8 with that copy, same model). The outside-style per-head
# transformer of bench/outside_models.py (12k parameters, where what a row holds besides parameter-sized vectors
# weighs more) grew by 4.5 vectors a row from 92 to 920 rows, so the estimate takes 4 (5 in a worker): a budget is
# then exceeded by at most ~1.15x on that model, and the paper model's batches hold ~30% fewer queries than needed.
QUERY_ROW_VECTORS = 4
QUERY_ROW_VECTORS_WORKER = 5


def query_row_bytes(n_params: int, *, in_process: bool = True) -> int:
    """Estimated peak bytes one query row (a query's output) adds to a scan task over ``n_params`` parameters:
    ``QUERY_ROW_VECTORS`` float64 vectors of all parameters, ``QUERY_ROW_VECTORS_WORKER`` in a distributed worker
    (``in_process`` False)."""
    vectors = QUERY_ROW_VECTORS if in_process else QUERY_ROW_VECTORS_WORKER
    return vectors * max(1, int(n_params)) * F64_BYTES


def query_batches(group: slice, n_outputs: int, n_params: int, budget: int | None, *,
                  in_process: bool = True) -> list[slice]:
    """The queries of one group split into consecutive, nearly equal batches whose rows' estimated memory
    (:func:`query_row_bytes`) fits ``budget`` bytes each (None: no bound, one batch). The batches run one after
    another in the group's slot, so the group's memory is one batch's; each repeats the per-sample gradients of
    every update (and pass 1), so the group is only split when it would not fit. A batch holds at least one query:
    a query's outputs are not split (one query over the budget is one batch of one query)."""
    n = group.stop - group.start
    per_query = query_row_bytes(n_params, in_process=in_process) * max(1, int(n_outputs))
    if budget is None or n <= 1 or n * per_query <= budget:
        return [group]
    fit = max(1, int(budget) // per_query)
    n_batches = math.ceil(n / fit)
    edges = [group.start + round(i * n / n_batches) for i in range(n_batches + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


def plan_parallelism(
    n_queries: int, *, per_query: bool, sync: bool, same_host: bool, n_workers: int
) -> tuple[int, int | None]:
    """How many query groups to run at once, and the torch threads each uses (None: leave the workers' setting).

    Two ways to use the cores of one machine: query groups in separate processes (each repeats the per-sample
    gradients of every batch and holds its own model) or torch threads inside one process (the large matmuls
    split, the Python-side work does not). On the benchmark models two threads per group beat two one-thread
    groups or came close without their extra memory (docs/benchmarks.md), so on our own LocalCluster
    (``same_host``) each group gets the ``threads_per_group`` setting's threads and there are
    ``cores // threads_per_group`` groups at most (fewer with fewer queries, the threads then spread over the
    cores). Elsewhere (an external cluster, whose workers' threads belong to their owner) one group per worker.
    The synchronous scheduler (``sync``) runs one group with the caller's threads.
    """
    if sync:
        return 1, None
    cores = os.cpu_count() or 1
    if same_host:
        slots = max(1, min(n_workers, cores // max(1, settings.get("threads_per_group"))))
        groups = 1 if not per_query else max(1, min(n_queries, slots))
        return groups, max(1, cores // groups)
    return (max(1, min(n_queries, n_workers)) if per_query else 1), None


# ==============================================================================================================
# One attribution's plan
# ==============================================================================================================
@dataclass(frozen=True)
class Plan:
    """How one attribution runs: query groups, torch threads per group, the scan schedule and its chunks."""

    groups: list[slice]
    threads: int | None  # torch threads per task (None: the workers' own setting)
    chain: bool  # reverse chain (True) or parallel chunks
    bounds: list[tuple[int, int]]
    keep_u: bool  # parallel chunks: pass 1 keeps u_s for pass 2
    batches: list[list[slice]] | None = None  # per group, its queries' batches, run one after another (None: one)
    query_estimate: int = 0  # estimated bytes of query-row state of the largest batches of all groups at once
    query_share: int | None = None  # the query-row budget of each group (None: unbounded)
    group_estimate: int = 0  # estimated bytes of query-row state of the largest batch of any one group

    @property
    def over_budget(self) -> bool:
        """Whether some group's largest batch is still estimated above its share (it could not split further)."""
        return self.query_share is not None and self.group_estimate > self.query_share

    @property
    def group_batches(self) -> list[list[slice]]:
        """Per group, the batches of its queries (the group itself when it is not split)."""
        return self.batches if self.batches is not None else [[g] for g in self.groups]


def plan_attribution(
    meta: ResultMeta,
    window: tuple[int, int],
    *,
    store_chunk: int | None,
    chunk_updates: int | None,
    per_query: bool,
    sync: bool,
    same_host: bool,
    n_workers: int,
    checkpoints: Sequence[int] | None = None,
    query_bytes: int | None = None,
    task_bytes: int | None = None,
) -> Plan:
    """Workers first take groups of queries (independent scans, no repeated work), then chunks of updates.

    Workers (processes) left per group: none spare -> chunks of updates in the reverse chain (every path integral
    once, chunks in sequence); spare workers -> chunks in parallel (later chunks' path integrals twice, unless
    kept within ``keep_u_bytes``). With threads set, the cores are already spread over the groups.

    ``query_bytes``: the memory the groups that run at once may hold in query-row state (None: unbounded); each
    group gets an equal share, at most ``task_bytes`` (the query-row memory one task may take on its worker; None:
    no such bound), and a group whose rows would not fit runs its queries in batches, one after another
    (:func:`query_batches`; only when ``per_query``: otherwise one batch, which may exceed it)."""
    n_groups, threads = plan_parallelism(meta.n_queries, per_query=per_query, sync=sync, same_host=same_host,
                                         n_workers=n_workers)
    groups = query_groups(meta.n_queries, n_groups, per_query=per_query)
    n_params = sum(math.prod(s) for s in meta.tensor_shapes)
    shares = [int(query_bytes) // len(groups)] if query_bytes is not None else []
    shares += [int(task_bytes)] if task_bytes is not None else []
    share = max(1, min(shares)) if shares else None
    batches = [query_batches(g, meta.n_outputs, n_params, share if per_query else None, in_process=sync)
               for g in groups]
    largest = [max(b.stop - b.start for b in bs) for bs in batches]
    per_group = [q * meta.n_outputs * query_row_bytes(n_params, in_process=sync) for q in largest]
    rows = max(largest) * meta.n_outputs
    spare = 1 if threads else n_workers // len(groups)
    chain = spare <= 1
    bounds = plan_chunks(window, store_chunk=store_chunk, chunk_updates=chunk_updates, n_workers=spare,
                         max_updates=task_updates(meta, rows, chain=chain), fill=chain, checkpoints=checkpoints)
    keep_u = not chain and keeps_u(window[1] - window[0], rows, n_params)
    return Plan(groups, threads, chain, bounds, keep_u, batches if any(len(b) > 1 for b in batches) else None,
                sum(per_group), share, max(per_group))


__all__ = [
    "Plan",
    "chain_chunk_updates",
    "chunk_bounds",
    "grads_ahead_fits",
    "keeps_u",
    "grad_group",
    "kept_u_bytes",
    "light_chunk_updates",
    "light_fits",
    "momentum_bytes",
    "momentum_parts",
    "plan_attribution",
    "plan_chunks",
    "plan_parallelism",
    "QUERY_ROW_VECTORS",
    "QUERY_ROW_VECTORS_WORKER",
    "query_batches",
    "query_groups",
    "query_row_bytes",
    "step_bytes",
    "task_updates",
]

