"""Pass 1 of the scan (independent per chunk): forward over the chunk's updates, the path integrals ``phi_s``,
``u_s = k_s phi_s`` and its decayed chunk total, the rebuilt momentum and the per-update scalars.

Also the per-update pieces pass 2 shares: :func:`update_phi` (one path integral), :func:`momentum_scan` (the
rebuilt momentum with batch gradients several updates per ``vmap``) and :func:`step_stats` (every inner product
with ``phi_s`` in one matmul per tensor). Formulas: docs/math.md and :mod:`engine.scan`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.ops.persample import batch_mean_grad, batch_mean_grads
from engine.ops.quadrature import path_integral, phi_given
from engine.plan import light_fits, momentum_parts
from engine.scan.problem import F64, Context, Problem, check_chunk, context
from explaind_store.trajectory import Trajectory, TrajectoryBlock

PREPASS_UPDATES = 16  # updates whose batch gradients the momentum pre-pass takes in one vmap


# ==============================================================================================================
# Pass 1
# ==============================================================================================================
@dataclass
class StepStats:
    """Per-update scalars of a chunk (R = query rows, L = updates, T = tensors), float64 unless noted."""

    f0: torch.Tensor  # (R, L) F(theta_{s-1})
    f1: torch.Tensor  # (R, L) F(theta_s)
    quad: torch.Tensor  # (R, L) <phi_s, dtheta_s>
    qres: torch.Tensor  # (R, L) quadrature residual f1 - f0 - quad
    nodes: torch.Tensor  # (L,) int64
    kinks: torch.Tensor  # (L,) int64
    mov_local: torch.Tensor  # (R, L, 2, T): in-chunk part of <phi_s, data_s> and <phi_s, wd_s> (AdamW: all of wd)
    # the quadrature nodes / weights of each update (rows, M), CPU: pass 2 recomputes phi on them, no kink search
    t_nodes: list[torch.Tensor | None] | None = None
    w_nodes: list[torch.Tensor | None] | None = None
    deferred: bool = False  # pass 1 skipped the path integrals; pass 2 fills everything above (see pass1)

    @classmethod
    def empty(cls, R: int, L: int, T: int, device: str) -> StepStats:
        z = lambda *s: torch.zeros(s, dtype=F64, device=device)
        i = torch.zeros(L, dtype=torch.int64)
        return cls(z(R, L), z(R, L), z(R, L), z(R, L), i, i.clone(), z(R, L, 2, T), [None] * L, [None] * L)


@dataclass
class Pass1:
    """Result of :func:`pass1` for chunk ``(lo, hi]`` (picklable)."""

    lo: int
    hi: int
    u_total: dict[str, torch.Tensor]  # name -> (R, *shape): sum_{lo<s<=hi} beta^(s-lo-1) u_s
    a_total: dict[str, dict[str, torch.Tensor]]  # "data"/"weight_decay" -> name -> (*shape): rebuilt momentum at hi
    stats: StepStats
    u: list[dict[str, torch.Tensor]] | None = None  # kept u_s (keep_u)
    g: list[dict[str, torch.Tensor]] | None = None  # kept batch-mean gradients g_s at theta_{s-1} (keep_u)
    wd_param: dict[str, torch.Tensor] | None = None  # AdamW, keep_u and "param": sum_s phi_s * wd_s, (R, *shape)

    def summary(self) -> Pass1:
        """This result without the kept ``u`` / ``g`` (what :func:`carries` needs; small to ship)."""
        return replace(self, u=None, g=None, wd_param=None)


def update_phi(
    ctx: Context,
    theta_prev: dict[str, torch.Tensor],
    theta_s: dict[str, torch.Tensor],
    nodes: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Path integral of one update: ``phi_s`` (name -> ``(R, *shape)``, fresh tensors the caller may overwrite)
    and the :class:`~engine.ops.quadrature.PathIntegral` (``quad``/``residual`` are left to the caller's fused pass).
    With ``nodes`` (the ``t_rows, w_rows`` pass 1 used) only phi is recomputed on them (no kink search): the
    second value is then None."""
    dtheta = {n: theta_s[n] - theta_prev[n] for n in ctx.names}
    if nodes is not None and nodes[0] is not None and nodes[1] is not None:
        return phi_given(ctx.query_fn, theta_prev, dtheta, nodes[0], nodes[1], ctx.rule), None
    pi = path_integral(ctx.query_fn, theta_prev, dtheta, ctx.rule, need_quad=False)
    return pi.phi, pi


def scaled(x: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    return x * k


def row_dots(x: torch.Tensor, vs: list[torch.Tensor]) -> torch.Tensor:
    """``<x[r], v>`` for every row of ``x`` (``(R, *shape)``) and every vector ``v`` of ``vs`` (each of one tensor's
    shape): ``(R, len(vs))``, float64. Taken as ``(V x^T)^T`` with the vectors as the rows of ``V``: the BLAS then
    streams ``x`` once, where ``x V^T`` first packs all of it for the few columns (measured 2-3x slower)."""
    return (torch.stack([v.reshape(-1) for v in vs]) @ x.reshape(x.shape[0], -1).T).T


PART_OF_COL = ("data", "weight_decay")


def advance_momentum(
    ctx: Context,
    block: TrajectoryBlock,
    s: int,
    A: dict[str, dict[str, torch.Tensor]],
    g: dict[str, torch.Tensor],
    theta_prev: dict[str, torch.Tensor],
) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """One step of the rebuilt momentum ``A <- beta A + omega x_s`` (in place, per part) and, per tensor, the
    movement coefficient vectors ``(col, h A_s + e x_s)`` (col 0: data, 1: coupled weight decay): the in-chunk
    movement of update ``s`` is ``-<u_s, vec>``."""
    terms = ctx.terms
    gs = terms.grad_scale(block, s)
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for n in ctx.names:
        tt = terms.terms[n]
        om = terms.omega(block, s, n)
        xs = [(0, g[n] * gs)]
        if not terms.decoupled:
            xs.append((1, theta_prev[n] * terms.coupled_decay(block, s, n)))
        vecs = []
        for col, x in xs:
            a = A[PART_OF_COL[col]][n]
            a.mul_(tt.beta).add_(x, alpha=om)
            vec = a * tt.h
            if tt.e != 0.0:
                vec.add_(x, alpha=tt.e)
            vecs.append((col, vec))
        out[n] = vecs
    return out



def momentum_scan(
    ctx: Context,
    block: TrajectoryBlock,
    A: dict[str, dict[str, torch.Tensor]],
    grads: list[dict[str, torch.Tensor]] | None = None,
    keep: list[dict[str, torch.Tensor]] | None = None,
) -> Iterator[tuple[int, dict[str, list[tuple[int, torch.Tensor]]]]]:
    """:func:`advance_momentum` over every update of ``block`` in order, with the batch gradients taken
    ``PREPASS_UPDATES`` updates per ``vmap`` (:func:`~engine.ops.persample.batch_mean_grads`); yields
    ``(s, vecs)``. ``keep`` (a list): the gradients are also appended to it, in order. ``grads``: the gradients an
    earlier scan of the same block kept, used instead of taking them again (taken out of the list one by one, so
    they are freed as the momentum is rebuilt)."""
    lo, ups = block.lo, list(block.updates)
    if grads is not None:
        if len(grads) != len(ups):
            raise ValueError(f"{len(grads)} kept batch gradients for the {len(ups)} updates of ({lo}, {block.hi}]")
        for s in ups:
            yield s, advance_momentum(ctx, block, s, A, grads.pop(0), ctx.params(block, s - 1))
        return
    for i in range(0, len(ups), PREPASS_UPDATES):
        part = ups[i : i + PREPASS_UPDATES]
        thetas = {n: block.params[n][part[0] - lo - 1 : part[-1] - lo].to(device=ctx.device, dtype=F64)
                  for n in ctx.names}
        batches = [ctx.batch(block, s) for s in part]
        masks = [ctx.masks(block, s, {n: thetas[n][k] for n in ctx.names}, b[1], b[2])
                 for k, (s, b) in enumerate(zip(part, batches))]
        gs = batch_mean_grads(ctx.model, thetas, [b[1] for b in batches], [b[2] for b in batches], ctx.loss,
                              masks=masks)
        if keep is not None:
            keep.extend(gs)
        for k, (s, g) in enumerate(zip(part, gs)):
            yield s, advance_momentum(ctx, block, s, A, g, {n: thetas[n][k] for n in ctx.names})


def step_stats(
    ctx: Context,
    block: TrajectoryBlock,
    s: int,
    j: int,
    phi: dict[str, torch.Tensor],
    k: dict[str, float | torch.Tensor],
    theta_prev: dict[str, torch.Tensor],
    theta_s: dict[str, torch.Tensor],
    vecs: dict[str, list[tuple[int, torch.Tensor]]],
    pi: Any,
    stats: StepStats,
    extra: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Update ``s``'s scalars into ``stats[:, j]``: ``<phi, dtheta>``, the in-chunk movement ``-<phi, k vec>`` and
    AdamW's decay ``-a lam <phi, theta_{s-1}>``, plus ``<phi, v>`` for the ``extra`` vectors of each tensor
    (returned as name -> (R, len(extra))): one ``(R x P_n) @ (P_n x c)`` matmul per tensor, the only read of phi."""
    terms, R = ctx.terms, ctx.R
    quad = torch.zeros(R, dtype=F64, device=ctx.device)
    out: dict[str, torch.Tensor] = {}
    for t, n in enumerate(ctx.names):
        cols = [theta_s[n] - theta_prev[n], *(scaled(v, k[n]) for _, v in vecs[n])]
        c_dec = terms.decoupled_decay(block, s, n) if terms.decoupled else 0.0
        if c_dec != 0.0:
            cols.append(theta_prev[n])
        n_own = len(cols)
        if extra is not None:
            cols.extend(extra[n])
        M = row_dots(phi[n], cols)
        quad.add_(M[:, 0])
        for i, (col, _) in enumerate(vecs[n]):
            stats.mov_local[:, j, col, t] = M[:, 1 + i].neg()
        if c_dec != 0.0:
            stats.mov_local[:, j, 1, t] = M[:, n_own - 1] * -c_dec
        out[n] = M[:, n_own:]
    stats.f0[:, j] = pi.f0
    stats.f1[:, j] = pi.f1
    stats.quad[:, j] = quad
    stats.qres[:, j] = pi.f1 - pi.f0 - quad
    stats.nodes[j] = int(pi.n_nodes)
    stats.kinks[j] = int(pi.n_kinks)
    if stats.t_nodes is not None and stats.w_nodes is not None:
        stats.t_nodes[j], stats.w_nodes[j] = pi.t_rows, pi.w_rows
    return out


def _light(ctx: Context, lo: int, hi: int, keep_u: bool) -> bool:
    """Whether pass 1 of chunk ``(lo, hi]`` can skip the path integrals (see :func:`pass1`)."""
    if keep_u or lo != ctx.window[0]:
        return False
    return light_fits(hi - lo, ctx.n_params, ctx.terms.kind)


def pass1(
    traj: Trajectory,
    problem: Problem,
    lo: int,
    hi: int,
    *,
    keep_u: bool = False,
    light: bool | None = None,
    momentum: bool = True,
    keep_g: bool = False,
    ctx: Context | None = None,
) -> Pass1:
    """First pass over chunk ``(lo, hi]`` (see the module docstring).

    Per update and tensor, every inner product with ``phi_s`` (``<phi, dtheta>``, the decoupled decay
    ``<phi, theta_{s-1}>``, the rebuilt movement ``<u, vec> = <phi, k * vec>``) is one ``(R x P_n) @ (P_n x c)``
    matmul, and ``u_s`` goes into the chunk total by one ``addcmul_``: ``phi`` is read twice, ``u`` is never
    materialised (unless kept).

    The first chunk of the window needs no path integrals here: its ``u_total`` is never used (the carries only
    flow backward into earlier chunks), so without ``keep_u`` (and when ``L x P`` floats per momentum part fit
    the ``light_bytes`` setting) it only rebuilds the momentum, and its pass 2 computes the per-update scalars itself
    (``stats.deferred``): one path integral per update instead of two (2x less quadrature work for a
    single-chunk window).

    ``light=True`` skips the path integrals of any chunk (its ``u_total`` is then left at zero): for the
    reverse chain (:func:`pass2` with ``u_in``), where every chunk's pass 2 computes its own path integrals and
    the accumulator comes from the next chunk's pass 2 instead of the carries. ``None``: the rule above.
    ``momentum=False`` (with ``light``) also skips the rebuilt momentum, leaving ``a_total`` at zero: for the
    window's last chunk, whose totals nothing reads (they only flow into later chunks). ``keep_g`` (with
    ``light``): also keep the batch gradients the momentum was rebuilt from (``g``), for this chunk's pass 2
    (:func:`momentum_scan`'s ``grads``), which then does not take them again.
    """
    ctx = ctx or context(traj, problem)
    check_chunk(ctx, lo, hi)
    terms, R, L, names, dev = ctx.terms, ctx.R, hi - lo, ctx.names, ctx.device
    if light and keep_u:
        raise ValueError("pass1(light=True) computes no u_s to keep: use keep_u=False")
    light = _light(ctx, lo, hi, keep_u) if light is None else bool(light)
    if keep_g and not light:
        raise ValueError("pass1(keep_g=True) keeps the momentum pre-pass's gradients: use it with light=True")
    if not momentum and not light:
        raise ValueError("pass1(momentum=False) needs light=True: the path integrals need the rebuilt momentum")
    u_total = {n: torch.zeros((R, *ctx.shapes[n]), dtype=F64, device=dev) for n in names}
    parts = PART_OF_COL[: momentum_parts(ctx.terms.kind)]
    a_total = {p: {n: torch.zeros(ctx.shapes[n], dtype=F64, device=dev) for n in names} for p in parts}
    stats = StepStats.empty(R, L, len(names), dev)
    stats.deferred = light
    kept_u: list[dict[str, torch.Tensor]] | None = [] if keep_u else None
    kept_g: list[dict[str, torch.Tensor]] | None = [] if keep_u else None
    wd_param = None
    if keep_u and terms.decoupled and "param" in problem.by:
        wd_param = {n: torch.zeros((R, *ctx.shapes[n]), dtype=F64, device=dev) for n in names}
    if not momentum:  # nothing to read: the totals stay zero
        return Pass1(lo, hi, u_total, a_total, stats, kept_u, kept_g, wd_param)
    block = traj.block(lo, hi)
    if light:  # only the rebuilt momentum: batch gradients several updates per vmap
        kept_g = [] if keep_g else None
        for _ in momentum_scan(ctx, block, a_total, keep=kept_g):
            pass
        return Pass1(lo, hi, u_total, a_total, stats, kept_u, kept_g, wd_param)
    _full_pass(ctx, block, lo, u_total, a_total, stats, kept_u, kept_g, wd_param)
    return Pass1(lo, hi, u_total, a_total, stats, kept_u, kept_g, wd_param)


def _full_pass(
    ctx: Context,
    block: TrajectoryBlock,
    lo: int,
    u_total: dict[str, torch.Tensor],
    a_total: dict[str, dict[str, torch.Tensor]],
    stats: StepStats,
    kept_u: list[dict[str, torch.Tensor]] | None,
    kept_g: list[dict[str, torch.Tensor]] | None,
    wd_param: dict[str, torch.Tensor] | None,
) -> None:
    """Pass 1 with path integrals, update by update: the rebuilt momentum, ``phi_s``, the per-update scalars, the
    decayed total of ``u_s`` (and the kept ``u_s`` / ``g_s``, AdamW's per-parameter decay), all in place."""
    terms, names, dev = ctx.terms, ctx.names, ctx.device
    theta_prev = ctx.params(block, lo)
    for j, s in enumerate(block.updates):
        theta_s = ctx.params(block, s)
        _, xb, yb = ctx.batch(block, s)
        g = batch_mean_grad(ctx.model, theta_prev, xb, yb, ctx.loss, ctx.masks(block, s, theta_prev, xb, yb))
        vecs = advance_momentum(ctx, block, s, a_total, g, theta_prev)
        phi, pi = update_phi(ctx, theta_prev, theta_s)
        k = {n: terms.k(block, s, n, dev) for n in names}
        step_stats(ctx, block, s, j, phi, k, theta_prev, theta_s, vecs, pi, stats)
        for n in names:
            if wd_param is not None:
                c_dec = terms.decoupled_decay(block, s, n)
                if c_dec != 0.0:
                    wd_param[n].addcmul_(phi[n], theta_prev[n], value=-c_dec)
            w = terms.terms[n].beta ** j
            if isinstance(k[n], torch.Tensor):
                u_total[n].addcmul_(phi[n], k[n], value=w)
            else:
                u_total[n].add_(phi[n], alpha=float(k[n]) * w)
            if kept_u is not None:
                phi[n].mul_(k[n])  # u_s, in place
        if kept_u is not None and kept_g is not None:
            kept_u.append(phi)
            kept_g.append(g)
        theta_prev = theta_s


__all__ = ["PART_OF_COL", "Pass1", "StepStats", "momentum_scan", "pass1", "row_dots", "scaled", "step_stats",
           "update_phi"]
