"""The Dask graph of one attribution: the scan (:mod:`engine.scan`) as tasks over chunks of updates, per group of
queries.

For chunks ``c = 0..C-1`` of updates ``(lo_c, hi_c]`` (aligned to the store's chunks so a task reads whole chunks,
and split below them when a chunk's result block would exceed the per-task budget, :func:`task_updates`), either
the **reverse chain** (the default when no worker would sit idle)::

    job ──► momentum[0] ──A──► momentum[1] ──A──► ... ──► momentum[C-2]   (pass 1, momentum only, folded)
    A ──► pass2[C-1] ──U──► pass2[C-2] ──U──► ... ──► pass2[0]            (each path integral once)

(the momentum ``A`` entering each chunk is spilled to a scratch store by the fold and read back by that chunk's
pass 2, so no task holds or waits on every chunk's carries: memory flat in the number of chunks)

(a one-chunk window is a single task), or **parallel chunks** (spare workers, e.g. one query on a big cluster)::

    job ──► pass1[c] ──► summary[c]                           (parallel over chunks, with path integrals)
    summary[0] ──A──► afold[1] ──A──► ... ──► afold[C-1]     (small sequential tasks: the momentum from the left)
    summary[C-1] ──U──► ufold[C-2] ──U──► ... ──► ufold[0]   (and the accumulator from the right)
    job ──► pass2[c] ◄── summary[c], afold[c], ufold[c] (+ pass1[c] when u_s is kept)  (parallel over chunks)

(with a scratch store the summaries' totals and the folds' carries are spilled there too, :func:`_parallel_blocks`)

Then ``pass2[c] ──► arrays of chunk c ──► from_delayed blocks``. Arrays with a ``step`` axis are concatenated from
the per-chunk blocks (``dask.array.concatenate``: the step axis is never built in one task); every other array is a
tree sum over chunks (``dask.array`` ``sum`` with ``split_every``), or in the reverse chain a running sum handed
down the chain with ``U`` (one copy alive at a time). Groups of queries (:func:`engine.plan.query_groups`) are
independent scans joined along the query axis (:func:`join_query_groups`); a group over the ``query_bytes``
budget runs its queries in batches, scans one after another in its slot (:func:`lazy_result`). ``job`` is one graph
key holding the small :class:`~engine.cluster.worker.Job` (store path, ``Problem``, settings): tasks open the store
and build the float64 model themselves, cached per worker (:func:`engine.cluster.worker.task_env`), so no large tensor is closed over or embedded in
the graph.

Memory: a pass-1 / pass-2 task holds O(R x P) (R = query rows of its group, P = parameters) plus its chunk's
result blocks and rebuilt momentum (:func:`engine.plan.chain_chunk_updates` bounds both), never samples x parameters. With
``keep_u`` a chunk's pass-1 result also keeps its ``u_s`` (L x R x P) until its pass 2 ran; :func:`attribute` only
keeps them when the whole window's fit in the ``keep_u_bytes`` setting. Chunk bounds, query groups and the
schedule are planned by :mod:`engine.plan`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr

from engine.cluster.handoff import inline_keep, inline_room, inline_sink, inline_take
from engine.cluster.worker import Job, in_dask_worker, running
from engine.result import (
    QO,
    STEP,
    ResultMeta,
    assemble,
    chunk_dtype,
    chunk_layout,
    chunk_shapes,
)
from engine.cluster.scratch import Spilled, read_momentum, read_vectors, write_momentum, write_vectors
from engine.cluster.scratch import group_location as scratch_location
from engine.plan import kept_u_bytes, momentum_parts
from engine.scan import Carry, Pass1, Problem, pass1, pass2, solo_carry
from engine.scan.carries import accumulator_before, chain_carry, momentum_after, window_start_state
from engine.scan.forward import PART_OF_COL
from explaind_store import storage

SPLIT_EVERY = 8  # fan-in of the tree sums over chunks


# ==============================================================================================================
# Tasks (module-level functions: pickled by reference, never closing over data)
# ==============================================================================================================
def _pass1_task(job: Job, lo: int, hi: int, keep_u: bool, after: Any = None) -> Pass1:
    """Pass 1 of the parallel schedule (``after``: the previous query batch's end, only waited for)."""
    del after
    with running(job) as (traj, ctx):  # one engine task at a time per process, under the caller's settings
        return pass1(traj, job.problem, lo, hi, keep_u=keep_u, ctx=ctx)


def _summary_task(p1: Pass1, spill: Spilled | None) -> Pass1:
    """What the carries need of a chunk (without kept ``u_s``), on the CPU so any worker can take it. ``spill``:
    write its parameter-sized totals to the scratch store instead (read back by :func:`_totals`) and keep only the
    per-update scalars, so the summaries waiting for the carry chains hold no parameter-sized vector."""
    summary = _to_cpu(p1.summary())
    if spill is None:
        return summary
    names = list(summary.u_total)
    write_vectors(spill, "total-u", summary.u_total, names)
    for part, tensors in summary.a_total.items():
        write_vectors(spill, f"total-{part}", tensors, names)
    return replace(summary, u_total={}, a_total=dict.fromkeys(summary.a_total, {}))


def _totals(ctx: Any, summary: Pass1, spill: Spilled | None) -> Pass1:
    """``summary`` with the totals :func:`_summary_task` spilled read back (itself when nothing was spilled)."""
    if spill is None:
        return summary
    u_shapes = {n: (ctx.R, *ctx.shapes[n]) for n in ctx.names}
    return replace(summary, u_total=read_vectors(spill, "total-u", ctx.names, u_shapes),
                   a_total={part: read_vectors(spill, f"total-{part}", ctx.names, ctx.shapes)
                            for part in summary.a_total})


def _fold_momentum_task(
    job: Job, a_in: dict[str, dict[str, torch.Tensor]] | None, summary: Pass1, totals: Spilled | None,
    spill: Spilled | None,
) -> dict[str, dict[str, torch.Tensor]]:
    """One step of the parallel schedule's forward carry chain: the momentum entering the chunk after
    ``summary``'s from ``a_in`` (the one entering it; None: the window's first chunk), also written to the scratch
    store at ``spill`` for that chunk's pass 2."""
    with running(job) as (_, ctx):
        out = momentum_after(ctx.terms, a_in, _totals(ctx, summary, totals))
        if spill is not None:
            for part, tensors in out.items():
                write_vectors(spill, f"carry-{part}", tensors, ctx.names)
        return out


def _fold_accumulator_task(
    job: Job, u_in: dict[str, torch.Tensor] | None, summary: Pass1, totals: Spilled | None, spill: Spilled | None,
) -> dict[str, torch.Tensor]:
    """One step of the parallel schedule's reverse carry chain: the accumulator entering the chunk before
    ``summary``'s from the right, from ``u_in`` (the one entering it; None: zeros, the window's last chunk), also
    written to the scratch store at ``spill`` for that chunk's pass 2."""
    with running(job) as (_, ctx):
        if u_in is None:
            u_in = _zero_accumulator(ctx)
        out = accumulator_before(ctx.terms, u_in, _totals(ctx, summary, totals))
        if spill is not None:
            write_vectors(spill, "carry-u", out, ctx.names)
        return out


def _zero_accumulator(ctx: Any) -> dict[str, torch.Tensor]:
    return {n: torch.zeros((ctx.R, *ctx.shapes[n]), dtype=torch.float64) for n in ctx.names}


def _start_state_task(job: Job) -> dict[str, torch.Tensor] | None:
    """``S_a`` (:func:`engine.scan.window_start_state`) on the CPU: one P-vector every chain task shares."""
    with running(job) as (traj, ctx):
        return _to_cpu(window_start_state(traj, job.problem, ctx))


def _momentum_task(
    job: Job, lo: int, hi: int, a_in: dict[str, dict[str, torch.Tensor]] | None, spill: Spilled | None,
    n_rows: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """One step of the forward momentum fold of the reverse chain: chunk ``(lo, hi]``'s pass 1 (momentum only) and
    :func:`engine.scan.momentum_after`, so only this chunk's totals and one carry are alive. ``spill``: also write
    the result (the momentum entering the next chunk) to the scratch store for that chunk's pass 2 (the arrays are
    created with ``n_rows`` rows by the window's first chunk). Under the synchronous scheduler the chunk's batch
    gradients are kept for its pass 2 (:func:`_pass2_chain_task`) while they fit
    (:func:`~engine.cluster.handoff.inline_keep`): it then rebuilds the momentum without taking them again."""
    with running(job) as (traj, ctx):
        nbytes = kept_u_bytes(hi - lo, 1, ctx.n_params)
        full = pass1(traj, job.problem, lo, hi, light=True, keep_g=inline_room(nbytes), ctx=ctx)
        if full.g is not None:
            inline_keep(job.token, _grads_key(lo, hi), full.g, nbytes)
        p1 = _to_cpu(full.summary())
        del full
        out = momentum_after(ctx.terms, a_in, p1)
        if spill is not None:
            write_momentum(spill, n_rows, out, ctx.names, create=lo == ctx.window[0])
        return out


def _grads_key(lo: int, hi: int) -> str:
    return f"batch-grads-{lo}-{hi}"


def _pick(items: Sequence[Any], i: int) -> Any:
    return items[i]


def _pass2_task(
    job: Job, lo: int, hi: int, summary: Pass1, a_in: dict[str, dict[str, torch.Tensor]] | Spilled | None,
    u_in: dict[str, torch.Tensor] | Spilled | None, s_a: dict[str, torch.Tensor] | None, p1: Pass1 | None,
) -> dict[str, np.ndarray]:
    """Pass 2 of the parallel schedule: the carry is built here from ``summary``'s per-update scalars, the
    momentum ``a_in`` and accumulator ``u_in`` entering the chunk (values, or where the carry chains spilled them;
    None for the window's first / last chunk) and ``S_a``."""
    with running(job) as (traj, ctx):
        if isinstance(a_in, Spilled):
            a_in = {part: read_vectors(a_in, f"carry-{part}", ctx.names, ctx.shapes) for part in summary.a_total}
        owned = u_in is None or isinstance(u_in, Spilled)  # made here: pass 2 may accumulate into it in place
        if isinstance(u_in, Spilled):
            u_in = read_vectors(u_in, "carry-u", ctx.names, {n: (ctx.R, *ctx.shapes[n]) for n in ctx.names})
        carry = Carry(lo, hi, _zero_accumulator(ctx) if u_in is None else u_in, a_in or {}, s_a, summary.stats,
                      u_owned=owned)
        return pass2(traj, job.problem, lo, hi, carry, p1, ctx=ctx).arrays


def _pass2_chain_task(
    job: Job, lo: int, hi: int, a_in: dict[str, dict[str, torch.Tensor]] | Spilled | None,
    s_a: dict[str, torch.Tensor] | None, u_next: dict[str, torch.Tensor] | None,
    sums_next: dict[str, np.ndarray] | None = None, after: Any = None,
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """Pass 2 of the reverse chain: ``a_in`` is the momentum entering the chunk (None for the window's first, or
    where the fold spilled it), ``s_a`` the window-start momentum, ``u_next`` the next chunk's ``u_out`` (None for
    the window's last chunk), ``sums_next`` the next chunk's running sums (:func:`_sums`), added in place to this
    chunk's arrays, so the window's first chunk ends up holding the totals over the window and no chunk's copy
    outlives the next task. ``after``: the previous query batch's end (:func:`lazy_result`), only waited for."""
    del after
    with running(job) as (traj, ctx):
        if isinstance(a_in, Spilled):
            a_in = read_momentum(a_in, PART_OF_COL[: momentum_parts(ctx.terms.kind)], ctx.names, ctx.shapes)
        carry = chain_carry(ctx, lo, hi, a_in, s_a, last=u_next is None)
        if u_next is not None and not in_dask_worker():
            # a local scheduler hands the next chunk's accumulator to this task alone and never runs a task twice:
            # pass 2 accumulates into it in place, one rows x P array less (a distributed worker may run a task
            # again on the same inputs, so there it takes a copy)
            carry, u_next = replace(carry, u_in=u_next, u_owned=True), None
        res = pass2(traj, job.problem, lo, hi, carry, None, u_in=u_next, ctx=ctx, data_out=_data_sink(job, ctx, lo, hi),
                    grads=inline_take(job.token, _grads_key(lo, hi)))
        arrays = res.arrays
        for key, total in (sums_next or {}).items():
            np.add(arrays[key], total, out=arrays[key])
        return arrays, _to_cpu(res.u_out)


def _data_sink(job: Job, ctx: Any, lo: int, hi: int) -> torch.Tensor | None:
    """This chunk's part of the whole-window ``data`` array when the synchronous scheduler runs the graph in this
    process (:func:`engine.cluster.handoff.inline_sink`): pass 2 then writes its scores in place, so the result is
    never held twice (as blocks and as the joined array). None otherwise (blocks as usual)."""
    by = job.problem.by
    if "sample" not in by or "step" not in by or torch.device(ctx.device).type != "cpu":
        return None
    a, b = ctx.window
    whole = inline_sink(job.token, "data", (ctx.R, ctx.n_samples, b - a, len(ctx.names) if ctx.per_tensor else 1),
                        np.dtype(np.float64))
    return None if whole is None else torch.from_numpy(whole)[:, :, lo - a : hi - a]


def _sums(arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays summed over chunks (no ``step`` axis): what the chain hands to the previous chunk."""
    return {k: arrays[k] for k in keys}


def _solo_task(job: Job, after: Any = None) -> dict[str, np.ndarray]:
    """The whole window as one chunk of the reverse chain: one task, no pass 1 or carries (``after``: the previous
    query batch's end, only waited for)."""
    del after
    with running(job) as (traj, ctx):
        lo, hi = ctx.window
        return pass2(traj, job.problem, lo, hi, solo_carry(traj, job.problem, ctx), None, ctx=ctx).arrays


def _get(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    return arrays[key]


def _to_cpu(obj: Any) -> Any:
    """Move every tensor inside dataclasses / dicts / lists to the CPU (a no-op for CPU tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


# ==============================================================================================================
# The graph
# ==============================================================================================================
def build_arrays(
    job: Job, meta: ResultMeta, bounds: Sequence[tuple[int, int]], *, keep_u: bool, chain: bool = False,
    scratch: storage.Location | None = None, after: Any = None,
) -> dict[str, Any]:
    """Lazy whole-window arrays (``engine.result.combine``'s layout) for the chunks ``bounds`` of ``job``.

    ``chain=False``: pass 2 runs in parallel over chunks, so every chunk but the window's first computes its path
    integrals twice (pass 1 for the carries, pass 2 for the scores) unless ``keep_u``. ``chain=True`` (the reverse
    chain): pass 1 only rebuilds the momentum (cheap, folded chunk by chunk) and pass 2 runs from the last chunk back to the
    first, each handing its accumulator ``U_{lo+1}`` to the previous one: every path integral once, chunks in
    sequence. Parallelism then comes from query groups (:func:`engine.plan.query_groups`); the chain's carries
    are chains of small tasks (:func:`_chain_blocks`) spilling the forward momentum to ``scratch``
    (:func:`engine.cluster.scratch.scratch_root`; the caller removes it after the compute) when given.

    ``after`` (a Delayed, :func:`_scan`'s second value for the previous batch of queries): every task that holds
    query-row state (``rows x P``) waits for it, directly or through another such task."""
    return _scan(job, meta, bounds, keep_u=keep_u, chain=chain, scratch=scratch, after=after)[0]


def _scan(
    job: Job, meta: ResultMeta, bounds: Sequence[tuple[int, int]], *, keep_u: bool, chain: bool,
    scratch: storage.Location | None, after: Any,
) -> tuple[dict[str, Any], Any]:
    """:func:`build_arrays`, and a Delayed that is done once the last task holding query-row state finished
    (the next batch of queries in the same slot waits for it)."""
    if not bounds:
        raise ValueError("build_arrays needs at least one chunk")
    if chain and keep_u:
        raise ValueError("the reverse chain keeps no u_s: use keep_u=False")
    tok = job.token
    job_d = dask.delayed(job, name=f"explaind-job-{tok}", traverse=False)
    layout = chunk_layout(meta)
    if chain and len(bounds) == 1:
        p2 = dask.delayed(_solo_task, pure=True)(job_d, after, dask_key_name=f"explaind-pass2-{tok}-0")
        blocks, lasts, accumulated = [_blocks(p2, meta, layout, tok, 0, *bounds[0])], [p2], False
    elif chain:
        (blocks, lasts), accumulated = _chain_blocks(job_d, meta, layout, tok, bounds, scratch, after), True
    else:
        (blocks, lasts), accumulated = _parallel_blocks(job_d, meta, layout, tok, bounds, keep_u, scratch, after), False
    done = dask.delayed(_gate, pure=True)(None, *lasts, dask_key_name=f"{BATCH_DONE}{tok}")
    return combine_lazy(blocks, meta, accumulated=accumulated), done


def _parallel_blocks(
    job_d: Any, meta: ResultMeta, layout: dict[str, Any], tok: str, bounds: Sequence[tuple[int, int]],
    keep_u: bool, scratch: storage.Location | None, after: Any = None,
) -> tuple[list[dict[str, da.Array]], list[Any]]:
    """The parallel schedule's per-chunk blocks (and its pass-2 tasks, the last to hold query-row state), with its
    carries as two chains of small tasks::

        pass1[c] ──► summary[c]                                   (parallel over chunks)
        summary[0] ──► afold[1] ──► afold[2] ──► ... ──► afold[C-1]     (forward: momentum entering chunk c)
        summary[C-1] ──► ufold[C-2] ──► ... ──► ufold[0]                (reverse: accumulator entering chunk c)
        pass2[c] ◄── summary[c], afold[c], ufold[c], S_a (+ pass1[c] when u_s is kept)

    Each fold takes one summary and the previous fold's carry, so no task gathers every chunk's summary. With
    ``scratch`` the summaries spill their parameter-sized totals and the folds their carries there (pass 2 gets a
    :class:`Spilled` handle that waits for the write, :func:`_gate`): whatever the number of chunks, the results
    alive between tasks hold one carry per chain, never one per chunk. Without it the carries stay in the
    workers' memory until their pass 2 ran (dask may spill them)."""
    n = len(bounds)
    root = None if scratch is None else scratch_location(scratch, tok)

    def at(c: int) -> Spilled | None:
        return None if root is None else Spilled(root, c)

    s_a = dask.delayed(_start_state_task, pure=True)(job_d, dask_key_name=f"explaind-startstate-{tok}")
    p1s, sums = [], []
    for c, (lo, hi) in enumerate(bounds):
        p1 = dask.delayed(_pass1_task, pure=True)(job_d, lo, hi, keep_u, after,
                                                  dask_key_name=f"explaind-pass1-{tok}-{c}")
        p1s.append(p1)
        # the folds only get the small CPU summary (kept u_s stay with pass 1's result, on its worker, for pass 2)
        sums.append(dask.delayed(_summary_task, pure=True)(p1, at(c), dask_key_name=f"explaind-summary-{tok}-{c}"))

    def handle(c: int, fold: Any, kind: str) -> Any:
        """What pass 2 of chunk ``c`` gets: the fold's value, or its Spilled row once it is written."""
        if root is None:
            return fold
        return dask.delayed(_gate, pure=True)(at(c), fold, dask_key_name=f"explaind-{kind}spilled-{tok}-{c}")

    a_in: list[Any] = [None] * n
    acc = None
    for c in range(1, n):
        acc = dask.delayed(_fold_momentum_task, pure=True)(job_d, acc, sums[c - 1], at(c - 1), at(c),
                                                          dask_key_name=f"explaind-afold-{tok}-{c}")
        a_in[c] = handle(c, acc, "a")
    u_in: list[Any] = [None] * n
    cur = None
    for c in range(n - 2, -1, -1):
        cur = dask.delayed(_fold_accumulator_task, pure=True)(job_d, cur, sums[c + 1], at(c + 1), at(c),
                                                             dask_key_name=f"explaind-ufold-{tok}-{c}")
        u_in[c] = handle(c, cur, "u")
    blocks: list[dict[str, da.Array]] = [{} for _ in bounds]
    p2s = []
    for c, (lo, hi) in enumerate(bounds):
        p2 = dask.delayed(_pass2_task, pure=True)(
            job_d, lo, hi, sums[c], a_in[c], u_in[c], s_a, p1s[c] if keep_u else None,
            dask_key_name=f"explaind-pass2-{tok}-{c}",
        )
        p2s.append(p2)
        blocks[c] = _blocks(p2, meta, layout, tok, c, lo, hi)
    return blocks, p2s


def _chain_blocks(
    job_d: Any, meta: ResultMeta, layout: dict[str, Any], tok: str, bounds: Sequence[tuple[int, int]],
    scratch: storage.Location | None, after: Any = None,
) -> tuple[list[dict[str, da.Array]], list[Any]]:
    """The reverse chain's per-chunk blocks (``len(bounds) >= 2``) and its first chunk's task (the last to hold
    query-row state; ``after`` gates the first, the last chunk's), with its carries as chains of small tasks::

        momentum[0] ──► momentum[1] ──► ... ──► momentum[C-2]      (forward: pass 1 of chunk c, folded)
        chain[C-1] ──U──► chain[C-2] ──U──► ... ──► chain[0]       (reverse: pass 2, U handed down)

    ``momentum[c]`` is the momentum entering chunk ``c + 1``: ``chain[C-1]`` takes the last one directly; the
    others are written to the ``scratch`` store by their fold and read back by ``chain[c + 1]`` (every write is
    done by then: ``chain[C-1]`` waits for the whole fold). So whatever the number of chunks, one incoming
    momentum, one ``U`` and ``S_a`` are alive at a time, never every chunk's. Without ``scratch`` each
    ``chain[c]`` takes ``momentum[c - 1]`` itself, which then stays in the workers' memory until it ran."""
    n = len(bounds)
    spill_root = None if scratch is None or n <= 2 else scratch_location(scratch, tok)
    s_a = dask.delayed(_start_state_task, pure=True)(job_d, dask_key_name=f"explaind-startstate-{tok}")
    a_in: list[Any] = [None] * n  # what chain[c] gets: a Delayed, a Spilled row or None
    acc = None
    for c, (lo, hi) in enumerate(bounds[:-1]):
        spill = Spilled(spill_root, c + 1) if spill_root is not None and c + 1 < n - 1 else None
        acc = dask.delayed(_momentum_task, pure=True)(job_d, lo, hi, acc, spill, n,
                                                     dask_key_name=f"explaind-momentum-{tok}-{c}")
        a_in[c + 1] = spill if spill is not None else acc
    blocks: list[dict[str, da.Array]] = [{} for _ in bounds]
    u_next = sums_next = None
    summed = tuple(k for k, dims in layout.items() if STEP not in dims and k not in ("f_start", "f_end"))
    for c in range(n - 1, -1, -1):
        lo, hi = bounds[c]
        out = dask.delayed(_pass2_chain_task, pure=True)(
            job_d, lo, hi, a_in[c], s_a, u_next, sums_next, after if c == n - 1 else None,
            dask_key_name=f"explaind-chain-{tok}-{c}"
        )
        p2 = dask.delayed(_pick, pure=True)(out, 0, dask_key_name=f"explaind-pass2-{tok}-{c}")
        u_next = dask.delayed(_pick, pure=True)(out, 1, dask_key_name=f"explaind-uout-{tok}-{c}")
        sums_next = dask.delayed(_sums, pure=True)(p2, summed, dask_key_name=f"explaind-sums-{tok}-{c}")
        blocks[c] = _blocks(p2, meta, layout, tok, c, lo, hi)
    return blocks, [out]


def _blocks(p2: Any, meta: ResultMeta, layout: dict[str, Any], tok: str, c: int, lo: int, hi: int) -> dict[str, da.Array]:
    """The dask arrays of one chunk's pass-2 result (a delayed dict of numpy arrays)."""
    shapes = chunk_shapes(meta, lo, hi)
    arrs = {}
    for key in layout:
        dt = chunk_dtype(key)
        value = dask.delayed(_get, pure=True)(p2, key, dask_key_name=f"explaind-get-{tok}-{c}-{key}")
        arrs[key] = da.from_delayed(value, shapes[key], dtype=dt, meta=np.empty((0,) * len(shapes[key]), dt),
                                    name=f"explaind-block-{tok}-{c}-{key}")
    return arrs


def combine_lazy(
    blocks: Sequence[dict[str, da.Array]], meta: ResultMeta, *, accumulated: bool = False
) -> dict[str, da.Array]:
    """``engine.result.combine`` for dask blocks, with tree sums: step arrays are concatenated along ``step``,
    ``f_start`` / ``f_end`` come from the first / last chunk, the rest is summed over chunks in a tree, or, with
    ``accumulated`` (the reverse chain, which passes running sums down to the first chunk), taken from the first
    chunk: a tree sum would keep up to ``SPLIT_EVERY`` chunks' copies (each as large as the whole array) alive."""
    out: dict[str, da.Array] = {}
    for key, dims in chunk_layout(meta).items():
        parts = [b[key] for b in blocks]
        if key == "f_start":
            out[key] = parts[0]
        elif key == "f_end":
            out[key] = parts[-1]
        elif len(parts) == 1 or (accumulated and STEP not in dims):
            out[key] = parts[0]
        elif STEP in dims:
            out[key] = da.concatenate(parts, axis=dims.index(STEP))
        else:
            out[key] = da.stack(parts, axis=0).sum(axis=0, split_every=SPLIT_EVERY, dtype=parts[0].dtype)
    return out


def lazy_result(
    job: Job | Sequence[Job | Sequence[Job]],
    meta: ResultMeta,
    bounds: Sequence[tuple[int, int]],
    *,
    keep_u: bool,
    chain: bool = False,
    scratch: storage.Location | None = None,
) -> xr.Dataset:
    """The dask-backed result Dataset (``engine.result.assemble`` of :func:`build_arrays`).

    ``job`` may be a list whose items hold consecutive groups of the queries (:func:`group_problem`): each group
    runs its own scan and the groups' arrays are joined along the query axis. An item that is itself a list of
    jobs is a group split into batches of consecutive queries (:func:`engine.plan.query_batches`) that run one
    after another: each batch's first task holding query-row state waits for the previous batch's last one
    (:func:`_scan`), so the group's slot holds one batch's ``rows x P`` state at a time, on any scheduler."""
    slots = [[job]] if isinstance(job, Job) else [[j] if isinstance(j, Job) else list(j) for j in job]
    jobs = [j for slot in slots for j in slot]
    if len(jobs) == 1:
        return assemble(jobs[0].problem, meta, build_arrays(jobs[0], meta, bounds, keep_u=keep_u, chain=chain,
                                                            scratch=scratch))
    parts = []
    for slot in slots:
        after = None
        for j in slot:
            q = len(j.problem.x_query)
            arrays, after = _scan(j, replace(meta, n_queries=q), bounds, keep_u=keep_u, chain=chain, scratch=scratch,
                                  after=after)
            parts.append(arrays)
    return assemble(jobs[0].problem, meta, join_query_groups(parts, meta))


# ==============================================================================================================
# Streaming writes: the reverse chain waits for its blocks to be written
# ==============================================================================================================
_PASS2_KEY = re.compile(r"^explaind-pass2-([0-9a-f]+)-(\d+)$")
BATCH_DONE = "explaind-batchdone-"  # + token: a query batch's end, which the next batch in its slot waits for


def _gate(value: Any, *written: Any) -> Any:
    """``value``, once the writes it was made to wait for are done (their results, None, are dropped)."""
    del written
    return value


def gate_writes(collection: Any) -> Any:
    """A Delayed computing ``collection`` (a write graph, e.g. ``to_zarr(compute=False)`` of a lazy result) in which
    the reverse chain's task for chunk ``c - 1`` starts only after every task that needs only chunks ``>= c + 1``
    and is next to a later step (the writes of chunk ``c + 1``) finished.

    Without it the scheduler may run the chain (its critical path) ahead of the writes and keep every chunk's block
    in memory; with it a query group holds at most three chunks' blocks (one being written, one done, one being
    computed), whatever the result size. Graphs without a chain are returned unchanged (as a Delayed)."""
    from dask._task_spec import Task, TaskRef, convert_legacy_graph
    from dask.core import toposort
    from dask.delayed import Delayed

    (final,) = collection.__dask_keys__() if isinstance(collection, Delayed) else (None,)
    if final is None:
        return collection
    graph = convert_legacy_graph(dict(collection.__dask_graph__()))
    deps = {k: set(v.dependencies) for k, v in graph.items()}
    # lowest chunk index per query group (token) that each task needs: chunk c's pass 2 seeds c
    low: dict[Any, dict[str, int]] = {}
    for key in toposort(graph, dependencies=deps):
        if isinstance(key, str) and key.startswith(BATCH_DONE):
            continue  # the next query batch only waits for it: its tasks need none of this batch's chunks
        acc: dict[str, int] = {}
        m = _PASS2_KEY.match(key) if isinstance(key, str) else None
        if m:
            acc[m.group(1)] = int(m.group(2))
        for d in deps[key]:
            for tok, c in low.get(d, {}).items():
                acc[tok] = min(c, acc.get(tok, c))
        if acc:
            low[key] = acc
    dependents: dict[Any, set[Any]] = {k: set() for k in graph}
    for k, ds in deps.items():
        for d in ds:
            dependents[d].add(k)
    frontier: dict[tuple[str, int], list[Any]] = {}
    for key, acc in low.items():
        if len(acc) != 1:
            continue  # needs several query groups' chunks (small arrays joined over groups): never a gate
        ((tok, c),) = acc.items()
        if key == final or any(low.get(k) != acc for k in dependents[key]):
            frontier.setdefault((tok, c), []).append(key)
    for (tok, c), written in frontier.items():
        chain_key, uout_key = f"explaind-chain-{tok}-{c - 2}", f"explaind-uout-{tok}-{c - 1}"
        if c < 2 or chain_key not in graph or uout_key not in deps.get(chain_key, ()):
            continue
        gate_key = f"explaind-gate-{tok}-{c - 2}"
        graph[gate_key] = Task(gate_key, _gate, TaskRef(uout_key), *(TaskRef(k) for k in written))
        graph[chain_key] = graph[chain_key].substitute({uout_key: gate_key})
    return Delayed(final, graph)


# ==============================================================================================================
# Query groups: independent scans joined along the query axis
# ==============================================================================================================
def group_problem(problem: Problem, group: slice) -> Problem:
    """``problem`` restricted to the queries of ``group``."""
    y = None if problem.y_query is None else problem.y_query[group]
    return replace(problem, x_query=problem.x_query[group], y_query=y)


def join_query_groups(parts: Sequence[dict[str, da.Array]], meta: ResultMeta) -> dict[str, da.Array]:
    """Join the whole-window arrays of consecutive query groups: arrays with the query-output axis are concatenated
    along it; per-update node counts are padded to the largest group's (as within a group) and kink counts add."""
    out: dict[str, da.Array] = {}
    for key, dims in chunk_layout(meta).items():
        arrs = [p[key] for p in parts]
        if dims and dims[0] == QO:
            out[key] = da.concatenate(arrs, axis=0)
        elif key == "nodes":
            out[key] = da.stack(arrs, axis=0).max(axis=0)
        elif key == "kinks":
            out[key] = da.stack(arrs, axis=0).sum(axis=0, dtype=arrs[0].dtype)
        else:
            raise AssertionError(f"no rule to join {key!r} over query groups")
    return out


# ==============================================================================================================
# Step bins and output chunking
# ==============================================================================================================
def bin_steps(ds: xr.Dataset, n_bins: int) -> xr.Dataset:
    """Sum every ``step`` variable into ``n_bins`` contiguous bins of (nearly) equal length.

    The ``step`` coordinate becomes each bin's last update and ``step_start`` its first; the identity still holds
    because residuals are binned the same way.
    """
    steps = np.asarray(ds[STEP].values)
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError(f"step_bins must be >= 1, got {n_bins}")
    groups = [g for g in np.array_split(np.arange(len(steps)), min(n_bins, len(steps))) if len(g)]
    step_vars = [k for k, v in ds.data_vars.items() if STEP in v.dims]
    binned = {
        k: xr.concat([ds[k].isel({STEP: slice(int(g[0]), int(g[-1]) + 1)}).sum(STEP) for g in groups], dim=STEP)
        for k in step_vars
    }
    out = ds.drop_vars(step_vars).drop_dims(STEP, errors="ignore")
    for k, v in binned.items():
        out[k] = v.transpose(*[d for d in ds[k].dims])
    ends = np.array([steps[g[-1]] for g in groups])
    starts = np.array([steps[g[0]] for g in groups])
    out = out.assign_coords({STEP: ends, "step_start": (STEP, starts)})
    out.attrs = dict(ds.attrs, step_bins=len(groups))
    return out[list(ds.data_vars)]


TARGET_CHUNK_BYTES = 16 << 20  # output zarr chunks: bounded, so readers (top_k) stream them


def output_chunks(ds: xr.Dataset, step_chunk: int) -> dict[str, dict[str, int]]:
    """Per-variable dask (= zarr) chunks for writing: uniform ``step`` chunks of ``step_chunk``; variables with a
    ``sample`` axis get one query per chunk and a sample chunk sized to ~16 MB; everything else one chunk."""
    out: dict[str, dict[str, int]] = {}
    for name, var in ds.data_vars.items():
        sizes = dict(var.sizes)
        chunks = {d: n for d, n in sizes.items()}
        if STEP in sizes:
            chunks[STEP] = max(1, min(step_chunk, sizes[STEP]))
        if "sample" in sizes:
            chunks["query"] = 1
            other = math.prod(v for d, v in chunks.items() if d not in ("query", "sample")) * var.dtype.itemsize
            chunks["sample"] = int(max(1, min(sizes["sample"], TARGET_CHUNK_BYTES // max(other, 1))))
        elif math.prod(sizes.values()) * var.dtype.itemsize > TARGET_CHUNK_BYTES and "query" in sizes:
            chunks["query"] = 1  # element-wise (param) scores: one query per chunk
        out[name] = chunks
    return out


__all__ = [
    "bin_steps",
    "build_arrays",
    "combine_lazy",
    "gate_writes",
    "group_problem",
    "join_query_groups",
    "lazy_result",
    "output_chunks",
]
