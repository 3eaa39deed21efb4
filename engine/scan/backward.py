"""Pass 2 of the scan (independent per chunk, or chained in reverse): backward from ``hi`` to ``lo+1``, the reverse
accumulator ``U_i`` from the carry, the per-sample gradients of ``B_i`` at ``theta_{i-1}`` once for all query rows,
and the scores.

The work is split over one small state object (:class:`Pass2State`, the accumulator and the outputs being filled)
and module-level steps: :func:`produce` (an update's ``torch.func`` work: the path integral, unless kept, and the
batch's gradients) and :func:`consume` (the accumulator, the dot products and the scalars: plain tensor ops), run
one update apart by :mod:`engine.scan.pipeline` when there are two torch threads, and :func:`finish` (the chunk's
arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import progress, settings
from engine.ops.persample import (
    batch_mean_grad,
    choose_method,
    grad_dots,
    sample_dots,
    sample_grads,
    sample_grads_many,
)
from engine.plan import grad_group, grads_ahead_fits, momentum_parts
from engine.result import PARAM_PREFIX, ChunkResult
from engine.scan import pipeline
from engine.scan.carries import Carry
from engine.scan.forward import (
    PART_OF_COL,
    Pass1,
    StepStats,
    momentum_scan,
    row_dots,
    scaled,
    step_stats,
    update_phi,
)
from engine.scan.problem import F64, Context, Problem, check_chunk, context
from explaind_store.trajectory import Trajectory, TrajectoryBlock

Vectors = dict[str, torch.Tensor]


def _extra_vectors(
    ctx: Context,
    s: int,
    a: int,
    lo: int,
    s_a: dict[str, torch.Tensor] | None,
    a_in: dict[str, dict[str, torch.Tensor]],
) -> dict[str, list[tuple[int, float, torch.Tensor]]]:
    """Per tensor, the vectors ``v`` whose ``c * <u_s, v>`` pass 2 needs, as ``(dest, c, v)``: the carried momentum
    (dest -1: ``c = -h beta^(s-a)``, ``v = S_a``) and the carried-in rebuilt movement (dest = movement column,
    ``c = -h beta^(s-lo)``, ``v = A_lo`` of that part)."""
    out: dict[str, list[tuple[int, float, torch.Tensor]]] = {}
    for n in ctx.names:
        tt = ctx.terms.terms[n]
        lst: list[tuple[int, float, torch.Tensor]] = []
        if s_a is not None:
            c = -tt.h * tt.beta ** (s - a)
            if c != 0.0:
                lst.append((-1, c, s_a[n]))
        c = -tt.h * tt.beta ** (s - lo)
        if c != 0.0 and a_in:
            for col, part in enumerate(PART_OF_COL):
                if part in a_in:
                    lst.append((col, c, a_in[part][n]))
        out[n] = lst
    return out


def _grad_group(ctx: Context, block: TrajectoryBlock) -> int:
    """How many updates of ``block`` :func:`_group_grads` may take at once: 1 (no grouping) unless every batch is
    taken whole (``sample_chunk``), by per-sample gradients (method ``"grad"``) and without dropout."""
    sizes = {int(b.numel()) for b in block.batches}
    if not sizes or (block.rng is not None and any(r is not None for r in block.rng)):
        return 1
    nb = max(sizes)
    methods = {choose_method(ctx.problem.method, ctx.R, n, ctx.per_tensor) for n in sizes}
    if nb > int(ctx.problem.sample_chunk) or methods != {"grad"}:
        return 1
    return grad_group(nb, ctx.n_params, block.hi - block.lo)


def _group_grads(state: Pass2State, s: int) -> list[tuple[slice, Vectors]]:
    """Update ``s``'s per-sample gradients, as :func:`sample_grads` yields them. Pass 2 walks backward, so the
    gradients of ``s`` and of up to ``grad_group - 1`` updates before it (within the chunk, with batches of the
    same size) are taken in one call (:func:`sample_grads_many`) and kept until their turn.

    The groups are fixed up front (:func:`_grad_groups`, as one thread walking backward meets them), so threads
    taking the updates as they come take the same groups, each once: under ``grad_lock`` the first thread to need
    a group takes it and one that needs it meanwhile waits for it."""
    with state.grad_lock:
        got = state.grad_cache.pop(s, None)
        if got is not None:
            return got
        ctx, block, lo = state.ctx, state.block, state.lo
        if not state.grad_groups:
            state.grad_groups.update(_grad_groups(state))
        first, last = state.grad_groups[s]
        nb = int(block.batches[last - lo - 1].numel())
        # theta_{u-1} of the updates first..last: consecutive rows of the chunk's parameters
        params = {n: block.params[n][first - 1 - lo : last - lo].to(device=ctx.device, dtype=F64) for n in ctx.names}
        batches = [ctx.batch(block, u) for u in range(first, last + 1)]
        xs, ys = torch.stack([b[1] for b in batches]), torch.stack([b[2] for b in batches])
        for u, g in zip(range(first, last + 1), sample_grads_many(ctx.model, params, xs, ys, ctx.loss)):
            state.grad_cache[u] = [(slice(0, nb), g)]
        return state.grad_cache.pop(s)


def _grad_groups(state: Pass2State) -> dict[int, tuple[int, int]]:
    """Every update's group ``(first, last)`` for :func:`_group_grads`: walking backward from ``hi``, each group
    holds up to ``grad_group`` updates, within the chunk, with batches of the same size."""
    block, lo, out = state.block, state.lo, {}
    last = block.hi
    while last > lo:
        nb = int(block.batches[last - lo - 1].numel())
        first = last
        while (first - 1 > lo and last - first + 1 < state.grad_group
               and int(block.batches[first - 2 - lo].numel()) == nb):
            first -= 1
        out.update(dict.fromkeys(range(first, last + 1), (first, last)))
        last = first - 1
    return out


def _grads_ahead(ctx: Context, block: TrajectoryBlock) -> bool:
    """Whether every update of ``block`` takes its dot products from per-sample gradients (method ``"grad"``)
    small enough to be taken one update ahead."""
    sizes = {int(b.numel()) for b in block.batches}
    methods = {choose_method(ctx.problem.method, ctx.R, nb, ctx.per_tensor) for nb in sizes}
    return methods == {"grad"} and grads_ahead_fits(max(sizes, default=0), ctx.n_params)


@dataclass
class UpdateInputs:
    """What :func:`produce` hands :func:`consume` for one update."""

    j: int
    theta_prev: Vectors
    x: Vectors  # phi_s (or the kept u_s)
    kx: dict[str, float | torch.Tensor]  # u_s = kx * x
    idx: torch.Tensor
    xb: torch.Tensor
    yb: torch.Tensor
    theta_s: Vectors | None = None  # None when u_s is kept
    pi: Any = None  # the PathIntegral when pass 2 made it (its scalars)
    g: Vectors | None = None  # batch-mean gradient, when taken
    grads: list[tuple[slice, Vectors]] | None = None  # per-sample gradients, taken ahead
    masks: list[torch.Tensor] | None = None  # the update's dropout masks (runs with dropout)


@dataclass
class Pass2State:
    """One chunk's pass 2: what it reads, the reverse accumulator, and the outputs being filled (float64)."""

    ctx: Context
    problem: Problem
    block: TrajectoryBlock
    lo: int
    kept: tuple[list[Vectors], list[Vectors]] | None  # pass 1's kept (u_s, g_s)
    deferred: bool  # pass 1 skipped the path integrals: the per-update scalars are made here
    st: StepStats
    vec_hist: list[dict[str, list[tuple[int, torch.Tensor]]]]  # deferred: the in-chunk rebuilt movement vectors
    s_a: Vectors | None
    a_in: dict[str, Vectors]
    # U_i = scale[n] * Ut[n], scale = beta^(hi+1-i), renormalised before it underflows: one addcmul_ per update
    # (U_i = u_i + beta U_{i+1}) and V_i = coef * Ut is never built
    Ut: Vectors
    scale: dict[str, float]
    data: torch.Tensor  # (R, [N], [L], T or 1)
    wd: torch.Tensor  # (R, L, T)
    mom: torch.Tensor  # (R, L, T)
    mov: torch.Tensor  # (R, L, 3, T)
    param: Vectors | None  # "param": name -> (R, 3, *shape)
    wd_param: Vectors | None  # AdamW "param" without kept u_s: views into param[:, 1]
    pre_grads: bool  # the producer takes the per-sample gradients
    grad_group: int = 1  # updates whose per-sample gradients are taken in one call (_group_grads)
    grad_cache: dict[int, list[tuple[slice, Vectors]]] = field(default_factory=dict)  # taken, not yet consumed
    grad_groups: dict[int, tuple[int, int]] = field(default_factory=dict)  # update -> its group (_grad_groups)
    grad_lock: threading.Lock = field(default_factory=threading.Lock)  # producer threads share the two above

    @property
    def by_sample(self) -> bool:
        return "sample" in self.problem.by

    @property
    def by_step(self) -> bool:
        return "step" in self.problem.by


def start(
    ctx: Context, problem: Problem, block: TrajectoryBlock, carry: Carry, p1: Pass1 | None,
    u_in: Vectors | None, data_out: torch.Tensor | None = None, grads: list[Vectors] | None = None,
) -> Pass2State:
    """Allocate the outputs, take the accumulator from ``u_in`` or the carry, and, for a chunk whose pass 1 skipped
    the path integrals, rebuild its momentum forward (``L x P`` per part), from ``grads`` when given (the batch
    gradients a light pass 1 of this chunk kept, ``pass1(keep_g=True)``). ``data_out`` (zeroed here) replaces the
    ``data`` array when given: a view into the caller's whole-window array, so no block of it is allocated."""
    lo, hi = block.lo, block.hi
    terms, R, L, names, dev, by = ctx.terms, ctx.R, hi - lo, ctx.names, ctx.device, problem.by
    T, N = len(names), ctx.n_samples
    kept = (p1.u, p1.g) if p1 is not None and p1.u is not None and p1.g is not None else None
    Td = T if ctx.per_tensor else 1
    if data_out is not None:
        if tuple(data_out.shape) != ((R, N, L, Td) if "step" in by else (R, N, Td)) or "sample" not in by:
            raise ValueError(f"data_out has shape {tuple(data_out.shape)}, not this chunk's data block")
        data = data_out.zero_()
    elif "sample" in by:
        data = torch.zeros((R, N, L, Td) if "step" in by else (R, N, Td), dtype=F64, device=dev)
    else:
        data = torch.zeros((R, L, T) if "step" in by else (R, T), dtype=F64, device=dev)
    wd = torch.zeros((R, L, T), dtype=F64, device=dev)
    mom = torch.zeros((R, L, T), dtype=F64, device=dev)
    mov = torch.zeros((R, L, 3, T), dtype=F64, device=dev)
    param = {n: torch.zeros((R, 3, *ctx.shapes[n]), dtype=F64, device=dev) for n in names} if "param" in by else None
    wd_param = None
    if param is not None and terms.decoupled:
        if kept is not None and p1 is not None and p1.wd_param is not None:
            for n in names:
                param[n][:, 1] += p1.wd_param[n]
        else:
            wd_param = {n: param[n][:, 1] for n in names}
    src = carry.u_in if u_in is None else u_in
    own = u_in is None and carry.u_owned  # accumulate in place (to() copies only across devices / dtypes)
    Ut = {n: src[n].to(device=dev, dtype=F64) if own else src[n].to(device=dev, dtype=F64).clone() for n in names}
    s_a = None if carry.s_a is None else {n: v.to(dev) for n, v in carry.s_a.items()}
    a = ctx.window[0]
    a_in = {part: {n: v.to(dev) for n, v in d.items()} for part, d in carry.a_in.items()} if lo > a else {}
    st = carry.stats
    deferred = bool(getattr(st, "deferred", False)) and kept is None
    vec_hist: list[dict[str, list[tuple[int, torch.Tensor]]]] = []
    if deferred:
        st = StepStats.empty(R, L, T, dev)
        parts = PART_OF_COL[: momentum_parts(terms.kind)]
        A = {p: {n: torch.zeros(ctx.shapes[n], dtype=F64, device=dev) for n in names} for p in parts}
        vec_hist.extend(vecs for _, vecs in momentum_scan(ctx, block, A, grads))
        del A
    mov[:, :, 0:2] = st.mov_local.to(dev)
    return Pass2State(ctx, problem, block, lo, kept, deferred, st, vec_hist, s_a, a_in, Ut,
                      dict.fromkeys(names, 1.0), data, wd, mom, mov, param, wd_param, pre_grads=False)


def produce(state: Pass2State, s: int) -> UpdateInputs:
    """Update ``s``'s torch.func work: phi_s (unless kept), and the batch's gradients."""
    ctx, block, st = state.ctx, state.block, state.st
    j = s - state.lo - 1
    theta_prev = ctx.params(block, s - 1)
    theta_s, pi, g = None, None, None
    if state.kept is not None:
        x, g = state.kept[0][j], state.kept[1][j]  # u_s itself
        kx: dict[str, float | torch.Tensor] = dict.fromkeys(ctx.names, 1.0)
    else:
        theta_s = ctx.params(block, s)
        nodes = None if state.deferred or st.t_nodes is None or st.w_nodes is None else (st.t_nodes[j], st.w_nodes[j])
        x, pi = update_phi(ctx, theta_prev, theta_s, nodes)  # phi_s; u_s = kx * phi_s
        kx = {n: ctx.terms.k(block, s, n, ctx.device) for n in ctx.names}
    idx, xb, yb = ctx.batch(block, s)
    w = UpdateInputs(j, theta_prev, x, kx, idx, xb, yb, theta_s=theta_s, pi=pi, g=g)
    if state.by_sample or w.g is None:
        w.masks = ctx.masks(block, s, theta_prev, xb, yb)
    if state.by_sample and state.grad_group > 1:
        w.grads = _group_grads(state, s)
    elif state.by_sample and state.pre_grads:
        w.grads = list(sample_grads(ctx.model, theta_prev, xb, yb, ctx.loss,
                                    sample_chunk=int(state.problem.sample_chunk), masks=w.masks))
    elif w.g is None and not state.by_sample:
        w.g = batch_mean_grad(ctx.model, theta_prev, xb, yb, ctx.loss, w.masks)
    return w


def consume(state: Pass2State, s: int, w: UpdateInputs) -> None:
    """Everything that chains the updates (plain tensor ops when the producer took the gradients)."""
    ctx = state.ctx
    extra = _extra_vectors(ctx, s, ctx.window[0], state.lo, state.s_a, state.a_in)
    inner = _own_scalars(state, s, w, extra) if state.kept is None else None
    gs = ctx.terms.grad_scale(state.block, s)
    Vt, coef = _accumulate(state, s, w)
    g = _data_scores(state, w, Vt, coef, gs)
    _decay_scores(state, s, w, Vt, coef, g, gs)
    _carried_scores(state, w, extra, inner)


def _own_scalars(
    state: Pass2State, s: int, w: UpdateInputs, extra: dict[str, list[tuple[int, float, torch.Tensor]]]
) -> Vectors | None:
    """Without kept ``u_s``: a deferred chunk's per-update scalars (and ``<x, kx * v>`` for the ``extra`` vectors,
    returned), and AdamW's per-parameter decay."""
    ctx, x, kx = state.ctx, w.x, w.kx
    inner = None
    if state.deferred:
        assert w.theta_s is not None
        ex = {n: [scaled(v, kx[n]) for _, _, v in extra[n]] for n in ctx.names}
        inner = step_stats(ctx, state.block, s, w.j, x, kx, w.theta_prev, w.theta_s, state.vec_hist[w.j], w.pi,
                           state.st, ex)
        state.mov[:, w.j, 0:2] = state.st.mov_local[:, w.j]
        state.vec_hist[w.j] = {}
    if state.wd_param is not None:
        for n in ctx.names:
            c = ctx.terms.decoupled_decay(state.block, s, n)
            if c != 0.0:
                state.wd_param[n].addcmul_(x[n], w.theta_prev[n], value=-c)
    return inner


def _accumulate(state: Pass2State, s: int, w: UpdateInputs) -> tuple[Vectors, dict[str, float]]:
    """``U_s = u_s + beta U_{s+1}`` into the rescaled accumulator; returns ``Vt`` and ``coef`` with
    ``V_s = coef * Vt`` per tensor."""
    terms, x, kx, Ut, scale = state.ctx.terms, w.x, w.kx, state.Ut, state.scale
    Vt: Vectors = {}
    coef: dict[str, float] = {}
    for n in state.ctx.names:
        tt = terms.terms[n]
        if tt.beta == 0.0:
            torch.mul(x[n], kx[n], out=Ut[n])
            scale[n] = 1.0
        else:
            scale[n] *= tt.beta
            if isinstance(kx[n], torch.Tensor):
                Ut[n].addcmul_(x[n], kx[n], value=1.0 / scale[n])
            else:
                Ut[n].add_(x[n], alpha=float(kx[n]) / scale[n])
            if scale[n] < 1e-150:
                Ut[n].mul_(scale[n])
                scale[n] = 1.0
        c = tt.h * terms.omega(state.block, s, n) * scale[n]
        if tt.e != 0.0:  # nesterov: V = e * u + h * omega * U
            Vt[n] = torch.mul(Ut[n], c).add_(scaled(x[n], kx[n]), alpha=tt.e)
            coef[n] = 1.0
        else:
            Vt[n], coef[n] = Ut[n], c
    return Vt, coef


def _data_scores(state: Pass2State, w: UpdateInputs, Vt: Vectors, coef: dict[str, float], gs: float) -> Vectors | None:
    """``-gs/|B| <V, grad l_k>`` per sample, or ``-gs <V, g>`` for the batch; returns the batch-mean gradient
    (when taken)."""
    ctx, problem, j, g = state.ctx, state.problem, w.j, w.g
    R, names, per_tensor = ctx.R, ctx.names, ctx.per_tensor
    if state.by_sample:
        nb = len(w.idx)
        want_g = g is None and state.param is not None
        k_dot = {n: coef[n] * (-gs / nb) for n in names}  # folded into the matmuls' scaling
        if w.grads is not None:
            dots, g_mean = grad_dots(w.grads, Vt, nb, per_tensor=per_tensor, want_mean_grad=want_g, scale=k_dot)
            w.grads = None
        else:
            method = choose_method(problem.method, R, nb, per_tensor)
            dots, g_mean = sample_dots(
                ctx.model, w.theta_prev, w.xb, w.yb, ctx.loss, Vt, per_tensor=per_tensor, method=method,
                sample_chunk=int(problem.sample_chunk), want_mean_grad=want_g, scale=k_dot, masks=w.masks,
            )
        if g is None:
            g = g_mean
        target = state.data[:, :, j] if state.by_step else state.data  # (R, N, Td)
        target.index_add_(1, w.idx, dots.reshape(R, nb, len(names) if per_tensor else 1))
    else:
        assert g is not None
        target = state.data[:, j] if state.by_step else state.data  # (R, T)
        for t, n in enumerate(names):
            target[:, t] += (Vt[n].reshape(R, -1) @ g[n].reshape(-1)).mul_(-gs * coef[n])
    return g


def _decay_scores(
    state: Pass2State, s: int, w: UpdateInputs, Vt: Vectors, coef: dict[str, float], g: Vectors | None, gs: float
) -> None:
    """The per-parameter data scores, and the coupled weight decay (Adam, SGD): ``-<V, lam theta_{s-1}>``."""
    ctx, param, R = state.ctx, state.param, state.ctx.R
    if param is not None:
        assert g is not None
        for n in ctx.names:
            param[n][:, 0].addcmul_(Vt[n], g[n], value=-gs * coef[n])
    if not ctx.terms.decoupled:
        for t, n in enumerate(ctx.names):
            lam = ctx.terms.coupled_decay(state.block, s, n)
            if lam != 0.0:
                state.wd[:, w.j, t] = (Vt[n].reshape(R, -1) @ w.theta_prev[n].reshape(-1)).mul_(-lam * coef[n])
                if param is not None:
                    param[n][:, 1].addcmul_(Vt[n], w.theta_prev[n], value=-lam * coef[n])


def _carried_scores(
    state: Pass2State, w: UpdateInputs, extra: dict[str, list[tuple[int, float, torch.Tensor]]],
    inner: Vectors | None,
) -> None:
    """The carried momentum ``S_a`` and the carried-in part of the rebuilt movement: ``c <u, v> = c <x, kx * v>``."""
    x, kx, j, param = w.x, w.kx, w.j, state.param
    for t, n in enumerate(state.ctx.names):
        lst = extra[n]
        if not lst:
            continue
        if inner is not None:
            M = inner[n]
        else:
            M = row_dots(x[n], [scaled(v, kx[n]) for _, _, v in lst])
        for i, (dest, c, v) in enumerate(lst):
            if dest < 0:
                state.mom[:, j, t] = M[:, i] * c
                if param is not None:
                    param[n][:, 2].addcmul_(x[n], scaled(v, kx[n]), value=c)
            else:
                state.mov[:, j, dest, t] += M[:, i] * c


def finish(state: Pass2State) -> ChunkResult:
    """The chunk's arrays, reduced to the asked-for dims (:func:`engine.result.chunk_layout`), and ``U_{lo+1}``."""
    ctx, st, dev = state.ctx, state.st, state.ctx.device
    names, per_tensor, by_sample = ctx.names, ctx.per_tensor, state.by_sample
    u_out = {n: state.Ut[n].mul_(state.scale[n]) if state.scale[n] != 1.0 else state.Ut[n] for n in names}
    data, wd, mov, mom = state.data, state.wd, state.mov, state.mom
    if ctx.terms.decoupled:
        wd.copy_(mov[:, :, 1])
    mov[:, :, 2] = mom
    rounding = st.quad.to(dev) - mov.sum(dim=(2, 3))
    # data (R, [N], [L], [T]); wd (R, [L], [T]); momentum (R, [T])
    if not per_tensor:
        data = data[..., 0] if by_sample else data.sum(dim=-1)
        wd = wd.sum(dim=-1)
        mov = mov.sum(dim=-1)
    if not state.by_step:
        wd = wd.sum(dim=1)
    momentum = mom.sum(dim=1)
    if not per_tensor:
        momentum = momentum.sum(dim=-1)
    npy = lambda x: x.detach().cpu().numpy()
    replay = torch.zeros_like(st.qres)
    f_end = st.f1[:, -1]
    stored = state.block.stored_end
    if stored is not None:  # a chunk ending on a sparse checkpoint: the jump to the stored parameters
        jump = ctx.f_at(stored) - ctx.f_at(ctx.params(state.block, state.block.hi))
        replay[:, -1] = jump.to(replay.device)
        f_end = f_end + replay[:, -1]
    arrays = {
        "data": npy(data),
        "weight_decay": npy(wd),
        "momentum": npy(momentum),
        "movement": npy(mov),
        "quadrature_residual": npy(st.qres),
        "rounding_residual": npy(rounding),
        "replay_residual": npy(replay),
        "delta": npy(st.f1 - st.f0),
        "nodes": npy(st.nodes),
        "kinks": npy(st.kinks),
        "f_start": npy(st.f0[:, 0]),
        "f_end": npy(f_end),
    }
    if state.param is not None:
        for n in names:
            arrays[PARAM_PREFIX + n] = npy(state.param[n])
    return ChunkResult(state.block.lo, state.block.hi, arrays, u_out)


def pass2(
    traj: Trajectory,
    problem: Problem,
    lo: int,
    hi: int,
    carry: Carry,
    p1: Pass1 | None = None,
    *,
    u_in: Vectors | None = None,
    ctx: Context | None = None,
    data_out: torch.Tensor | None = None,
    grads: list[Vectors] | None = None,
) -> ChunkResult:
    """Second pass over chunk ``(lo, hi]``: scores of every update's batch, walking backward from ``hi``.

    ``u_in`` (the reverse chain): ``U_{hi+1}``, the accumulator the next chunk's pass 2 returned as its
    ``u_out``, instead of ``carry.u_in`` (which needs every later chunk's path integrals in pass 1). The result's
    ``u_out`` is ``U_{lo+1}``: the ``u_in`` of the previous chunk.

    Uses ``p1``'s kept ``u_s`` / ``g_s`` when present (``pass1(..., keep_u=True)``), else recomputes the path
    integrals on the nodes pass 1 used (no second kink search), or, for a chunk whose pass 1 skipped them
    (``carry.stats.deferred``), computes them and the per-update scalars here. Returns numpy arrays laid out as
    :func:`engine.result.chunk_layout` says.

    With two or more torch threads on the CPU the updates run as a two-stage pipeline (:mod:`engine.scan.pipeline`):
    :func:`produce` ahead in a second thread (and here, on a copy of the model, while that thread is busy),
    :func:`consume` here, in order.

    ``data_out`` (float64 CPU, the ``data`` block's shape, by sample): written in place and returned as ``data``.
    ``grads``: the chunk's batch gradients kept by its light pass 1 (``pass1(..., light=True, keep_g=True).g``),
    for a deferred chunk's momentum rebuild (taken out of the list as they are used).
    """
    ctx = ctx or context(traj, problem)
    check_chunk(ctx, lo, hi)
    if (carry.lo, carry.hi) != (lo, hi):
        raise ValueError(f"carry is for chunk ({carry.lo}, {carry.hi}], not ({lo}, {hi}]")
    if p1 is not None and p1.u is not None and (p1.lo, p1.hi) != (lo, hi):
        raise ValueError(f"pass-1 result is for chunk ({p1.lo}, {p1.hi}], not ({lo}, {hi}]")
    block = traj.block(lo, hi)
    state = start(ctx, problem, block, carry, p1, u_in, data_out, grads)
    threads = pipeline.pipeline_threads(ctx.device)
    if threads is not None and state.by_sample and not _grads_ahead(ctx, block):
        threads = None  # the consumer would have to take the per-sample gradients (torch.func): one thread
    state.pre_grads = threads is not None  # the producer takes them, so the consumer needs no torch.func
    state.grad_group = _grad_group(ctx, block) if state.by_sample else 1
    def consume_one(s: int, w: UpdateInputs) -> None:
        consume(state, s, w)
        progress.tick()

    # every thread that produces has its own model (Context.twins); the state they read is shared. With the
    # pipeline_help setting the calling thread produces too, on this context, when it would wait for a producer
    helps = threads is not None and settings.get("pipeline_help")
    k = pipeline.producer_count(threads)  # 1 without a pipeline, and then no twin
    need = k if helps else k - 1
    twins = ctx.twins(need)
    if len(twins) < need:  # a model that cannot be copied: one producer on this context
        helps, twins = False, []
    others = [functools.partial(produce, dataclasses.replace(state, ctx=c)) for c in twins]
    mine = functools.partial(produce, state)
    pipeline.run_two_stage(reversed(block.updates), others if helps else [mine, *others], consume_one, threads,
                           helper=mine if helps else None)
    return finish(state)


__all__ = ["Pass2State", "UpdateInputs", "consume", "finish", "pass2", "produce", "start"]
