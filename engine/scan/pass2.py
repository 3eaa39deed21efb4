"""The chunked scan: ``pass1`` -> ``carries`` -> ``pass2`` per chunk ``(lo, hi]`` of updates (or the reverse chain).

Notation and formulas: docs/math.md and :mod:`engine.optim_terms`. For the window ``(a, b]`` and every update
``s``: ``phi_s`` is the path integral of the query Jacobian over the stored segment ``theta_{s-1} -> theta_s``,
``u_s = k_s * phi_s``, ``U_i = sum_{i<=s<=b} beta^(s-i) u_s`` (per tensor, its own ``beta``),
``V_i = e*u_i + h*omega_i*U_i``, and

    data score of sample k in B_i     = -gs_i / |B_i| * <V_i, grad l_k(theta_{i-1})>      (origin update i)
    coupled decay (Adam, SGD) of i    = -<V_i, lam_i theta_{i-1}>                          (origin update i)
    decoupled decay (AdamW) of s      = -a_s lam_s <phi_s, theta_{s-1}>                    (update s)
    carried momentum                  = -sum_s h beta^(s-a) <u_s, S_a>                     (no step)

Scan structure (a linear recurrence, parallel over chunks):

- :func:`pass1` (independent per chunk) walks forward over its updates: path integrals, ``u_s``, the chunk's
  decayed total ``sum_{lo<s<=hi} beta^(s-lo-1) u_s`` (= ``U_{lo+1}`` without later chunks), the batch-mean
  gradients and the chunk's forward momentum totals (the optimizer recursion rebuilt in float64, started from 0),
  and the per-update scalars (``F`` values, quadrature residuals, node counts, the in-chunk part of each
  update's rebuilt movement). With ``keep_u=True`` it also keeps ``u_s`` and ``g_s`` for pass 2.
- :func:`carries` (cheap, sequential) turns the totals into, per chunk, ``U_{hi+1}`` (reverse scan: the
  accumulator entering from the right) and ``A_lo`` (forward scan: the rebuilt momentum entering from the left),
  and attaches the window-start momentum ``S_a`` and the chunk's per-update scalars.
- :func:`pass2` (independent per chunk) walks backward from ``hi`` to ``lo+1`` building ``U_i`` from the carry,
  takes the per-sample gradients of ``B_i`` at ``theta_{i-1}`` once for all query rows, and writes the scores.
  It uses the kept ``u_s`` of ``p1`` if given, else recomputes the path integrals.

The **reverse chain** (the default schedule, :mod:`engine.graph`) uses the same functions without the second path
integral: pass 1 with ``light=True`` only rebuilds the momentum (``momentum=False`` for the last chunk, whose totals
nobody reads), and pass 2 runs from the last chunk back to the first, taking ``u_in`` from the next chunk's
``u_out`` (``U_{lo+1}``) instead of the carry; a one-chunk window needs only :func:`solo_carry` and one pass 2.

Everything is float64 and accumulated in place; memory per chunk is O(R x P) (R = query rows) plus the result
arrays, never samples x parameters, never the number of updates (except ``keep_u``: ``L x R x P`` per chunk).
"""

from __future__ import annotations

import ctypes
import itertools
import math
import sys
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine import outputs as _outputs
from engine.optim_terms import OptimTerms
from engine.persample import (
    batch_mean_grad,
    batch_mean_grads,
    choose_method,
    grad_dots,
    sample_dots,
    sample_grads,
)
from engine.pipeline import pipeline_threads, run_two_stage
from engine.quadrature import parse_rule, path_integral, phi_given
from engine.result import BY_KEYS, PARAM_PREFIX, PARTS, ChunkResult, ResultMeta
from engine.settings import env_flag, env_int
from explaind_store.trajectory import Trajectory, TrajectoryBlock

F64 = torch.float64


# ==============================================================================================================
# Problem
# ==============================================================================================================
@dataclass(frozen=True, eq=False)
class Problem:
    """What to explain; small and picklable (shipped to workers).

    ``F(theta) = output_mode(functional_call(model_float64_eval, theta, x_query))`` flattened to ``(Q * O,)``,
    decomposed over the window ``(a, b]`` (``None``: the whole run). ``by``: any subset of
    ``{"sample", "step", "tensor", "param"}``. ``rule``: a quadrature rule or its string (``None`` = the default,
    "kink"). ``method``: per-sample dot products by ``"grad"``, ``"jvp"`` or ``"auto"``. ``per_query`` (default):
    each query's outputs depend only on its own input (eval mode, no batch statistics), so each query is integrated
    with its own kinks and reverse pass (:class:`engine.quadrature.SampleQuery`); False treats the query batch as
    one opaque function (needed only for models that mix samples in eval mode).
    """

    x_query: torch.Tensor
    y_query: torch.Tensor | None = None
    output: str = "log_softmax"
    by: frozenset[str] = frozenset({"sample"})
    window: tuple[int, int] | None = None
    rule: Any = None
    method: str = "auto"
    sample_chunk: int = 512
    device: str = "cpu"
    per_query: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.x_query, torch.Tensor):
            object.__setattr__(self, "x_query", torch.as_tensor(self.x_query))
        if self.x_query.ndim == 0 or len(self.x_query) == 0:
            raise ValueError("x_query must hold at least one query (shape (Q, ...))")
        if self.y_query is not None and not isinstance(self.y_query, torch.Tensor):
            object.__setattr__(self, "y_query", torch.as_tensor(self.y_query))
        _outputs.validate_mode(self.output, self.y_query, len(self.x_query))
        by = frozenset([self.by] if isinstance(self.by, str) else self.by)
        unknown = sorted(by - set(BY_KEYS))
        if unknown:
            raise ValueError(f"unknown 'by' entries {unknown}; use any of {', '.join(BY_KEYS)}")
        object.__setattr__(self, "by", by)
        if self.window is not None:
            try:
                a, b = (int(v) for v in self.window)
            except (TypeError, ValueError):
                raise ValueError(f"window must be a pair (a, b) of update indices, got {self.window!r}") from None
            if not 0 <= a < b:
                raise ValueError(f"window (a, b) = ({a}, {b}) needs 0 <= a < b")
            object.__setattr__(self, "window", (a, b))
        if self.method not in ("auto", "grad", "jvp"):
            raise ValueError(f"unknown method {self.method!r}; use 'auto', 'grad' or 'jvp'")
        if int(self.sample_chunk) < 1:
            raise ValueError(f"sample_chunk must be >= 1, got {self.sample_chunk}")
        if isinstance(self.rule, str):
            parse_rule(self.rule)  # validates now (raises on a bad rule string)

    def resolve_window(self, n_updates: int) -> tuple[int, int]:
        """The window ``(a, b)`` for a run with ``n_updates`` committed updates; ValueError if outside."""
        if self.window is None:
            if n_updates < 1:
                raise ValueError("the trajectory has no committed updates to explain")
            return (0, n_updates)
        a, b = self.window
        if b > n_updates:
            raise ValueError(f"window ({a}, {b}) is outside the recorded updates 0..{n_updates}")
        return (a, b)

    @property
    def rule_name(self) -> str:
        """The quadrature rule as a string (for the result's attrs)."""
        return rule_string(self.rule)


def rule_string(rule: Any) -> str:
    """``None`` -> "kink"; strings as given; a QuadratureRule as "kind:nodes[:grid]" / "adaptive:tol:nodes:grid"."""
    if rule is None:
        return "kink"
    if isinstance(rule, str):
        return rule
    kind = getattr(rule, "kind", None)
    if kind in ("midpoint", "gauss"):
        return f"{kind}:{rule.nodes}"
    if kind == "kink":
        return f"kink:{rule.nodes}:{rule.grid}"
    if kind == "adaptive":
        return f"adaptive:{rule.tol}:{rule.nodes}:{rule.grid}"
    return str(rule)


# ==============================================================================================================
# Context: the float64 model, data and coefficients (built once per process, cached)
# ==============================================================================================================
_HEAP_TUNED = False
PREPASS_UPDATES = 16  # updates whose batch gradients pass 2's forward pre-pass takes in one vmap
# pass 1 of a window's first chunk skips its path integrals when pass 2 can keep L x P floats per momentum part
LIGHT_BYTES = env_int("EXPLAIND_LIGHT_BYTES", 512 << 20, "bytes of rebuilt momentum pass 2 may keep per chunk",
                      minimum=0)


def keep_heap() -> bool:
    """glibc only: serve allocations up to 1 GiB from the heap and keep freed memory there.

    Every update allocates fresh ``R x P`` tensors (the Jacobians); by default glibc maps each one over 32 MiB
    freshly and returns it on free, so every update page-faults all of it again: measured 2.6x slower phi (98 vs
    37 ms per update) on the d_model-64 modadd transformer. Peak memory is unchanged (freed blocks are reused);
    the process just keeps its peak. Also one malloc arena for all threads: pass 2's producer thread
    (:mod:`engine.pipeline`) would otherwise keep a heap of its own at its own peak (measured on the d_model-64
    transformer: peak RSS 2.70 GB with two arenas, 2.23 GB with one, 2.08 GB without the pipeline, same speed).
    Once per process; ``EXPLAIND_MALLOPT=0`` turns it off.
    """
    global _HEAP_TUNED
    if _HEAP_TUNED or not sys.platform.startswith("linux") or not env_flag("EXPLAIND_MALLOPT"):
        return _HEAP_TUNED
    _HEAP_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        ok = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) or bool(libc.mallopt(m_mmap_threshold, 1 << 25))
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        libc.mallopt(m_arena_max, 1)
        return ok
    except (OSError, AttributeError):  # not glibc
        return False


keep_heap()  # at import, before this process starts more threads (each would get a malloc arena of its own)


def _cast(x: torch.Tensor, device: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(device=device, dtype=F64) if x.is_floating_point() else x.to(device)


class Context:
    """Per-process state for one (trajectory, problem): model in float64 eval mode, data, query function."""

    def __init__(self, traj: Trajectory, problem: Problem):
        keep_heap()
        self.problem = problem
        self.device = problem.device
        self.n_updates = int(traj.committed_updates)
        self.window = problem.resolve_window(self.n_updates)
        self.names = list(traj.tensor_names)
        self.terms = OptimTerms(traj.optimizer_spec, self.names)
        self.loss = dict(traj.loss)
        model = traj.build_model().to(device=self.device, dtype=F64).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        own = dict(model.named_parameters())
        missing = [n for n in self.names if n not in own]
        if missing:
            raise ValueError(f"the model built for this run has no parameters {missing}")
        self.shapes = {n: tuple(own[n].shape) for n in self.names}
        self.n_params = sum(math.prod(sh) for sh in self.shapes.values())
        x_train, y_train = traj.split()
        self.x_train = _cast(x_train, self.device)
        self.y_train = _cast(y_train, self.device)
        self.n_samples = len(self.x_train)
        self.x_query = _cast(problem.x_query, self.device)
        self.y_query = None if problem.y_query is None else _cast(problem.y_query, self.device)
        if problem.per_query:
            self.query_fn = _outputs.make_sample_query(model, self.x_query, self.y_query, problem.output, self.loss)
        else:
            self.query_fn = _outputs.make_query_fn(model, self.x_query, self.y_query, problem.output, self.loss)
        with torch.no_grad():
            out = _outputs.apply_mode(problem.output, model(self.x_query), self.y_query, self.loss)
        self.Q, self.O = int(out.shape[0]), int(out.shape[1])
        self.R = self.Q * self.O
        self.rule = parse_rule(problem.rule) if isinstance(problem.rule, str) else problem.rule
        self.by = problem.by
        self.per_tensor = "tensor" in problem.by

    def params(self, block: TrajectoryBlock, step: int) -> dict[str, torch.Tensor]:
        r = step - block.lo
        return {n: block.params[n][r].to(device=self.device, dtype=F64) for n in self.names}

    def batch(self, block: TrajectoryBlock, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = block.batches[s - block.lo - 1].to(device=self.device, dtype=torch.int64)
        return idx, self.x_train[idx], self.y_train[idx]


_CTX: OrderedDict[tuple[int, int], tuple[Any, Any, Context]] = OrderedDict()
_CTX_MAX = 4


def context(traj: Trajectory, problem: Problem) -> Context:
    """The cached :class:`Context` of (traj, problem) in this process (rebuilt if either object changed)."""
    key = (id(traj), id(problem))
    hit = _CTX.get(key)
    if hit is not None and hit[0]() is traj and hit[1]() is problem:
        _CTX.move_to_end(key)
        return hit[2]
    ctx = Context(traj, problem)
    try:
        _CTX[key] = (weakref.ref(traj), weakref.ref(problem), ctx)
    except TypeError:  # not weak-referenceable: no caching
        return ctx
    while len(_CTX) > _CTX_MAX:
        _CTX.popitem(last=False)
    return ctx


def result_meta(traj: Trajectory, problem: Problem, ctx: Context | None = None) -> ResultMeta:
    """Everything :func:`engine.result.assemble` needs besides the arrays."""
    ctx = ctx or context(traj, problem)
    method = problem.method
    if "sample" in problem.by:  # what "auto" resolves to for batches of 2+ samples
        method = choose_method(problem.method, ctx.R, 2, ctx.per_tensor)
    return ResultMeta(
        window=ctx.window,
        n_samples=ctx.n_samples,
        tensor_names=tuple(ctx.names),
        tensor_shapes=tuple(ctx.shapes[n] for n in ctx.names),
        optimizer=ctx.terms.kind,
        n_queries=ctx.Q,
        n_outputs=ctx.O,
        output_labels=tuple(_outputs.output_labels(problem.output, ctx.O)),
        output=problem.output,
        rule=problem.rule_name,
        by=problem.by,
        method=method,
    )


def _check_chunk(ctx: Context, lo: int, hi: int) -> None:
    a, b = ctx.window
    if not (a <= lo < hi <= b):
        raise ValueError(f"chunk ({lo}, {hi}] is not inside the window ({a}, {b}]")


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


def _phi(
    ctx: Context,
    theta_prev: dict[str, torch.Tensor],
    theta_s: dict[str, torch.Tensor],
    nodes: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Path integral of one update: ``phi_s`` (name -> ``(R, *shape)``, fresh tensors the caller may overwrite)
    and the :class:`~engine.quadrature.PathIntegral` (``quad``/``residual`` are left to the caller's fused pass).
    With ``nodes`` (the ``t_rows, w_rows`` pass 1 used) only phi is recomputed on them (no kink search): the
    second value is then None."""
    dtheta = {n: theta_s[n] - theta_prev[n] for n in ctx.names}
    if nodes is not None and nodes[0] is not None and nodes[1] is not None:
        return phi_given(ctx.query_fn, theta_prev, dtheta, nodes[0], nodes[1], ctx.rule), None
    pi = path_integral(ctx.query_fn, theta_prev, dtheta, ctx.rule, need_quad=False)
    return pi.phi, pi


def _mul(x: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    return x * k


def _cols(*vs: torch.Tensor) -> torch.Tensor:
    """Vectors (each of one tensor's shape) as the columns of a ``(P_n, len(vs))`` float64 matrix."""
    return torch.stack([v.reshape(-1) for v in vs], dim=1)


_PART_OF_COL = ("data", "weight_decay")


def _advance(
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
            a = A[_PART_OF_COL[col]][n]
            a.mul_(tt.beta).add_(x, alpha=om)
            vec = a * tt.h
            if tt.e != 0.0:
                vec.add_(x, alpha=tt.e)
            vecs.append((col, vec))
        out[n] = vecs
    return out



def _momentum_scan(
    ctx: Context, block: TrajectoryBlock, A: dict[str, dict[str, torch.Tensor]]
) -> Iterator[tuple[int, dict[str, list[tuple[int, torch.Tensor]]]]]:
    """:func:`_advance` over every update of ``block`` in order, with the batch gradients taken
    ``PREPASS_UPDATES`` updates per ``vmap`` (:func:`~engine.persample.batch_mean_grads`); yields
    ``(s, vecs)``."""
    lo, ups = block.lo, list(block.updates)
    for i in range(0, len(ups), PREPASS_UPDATES):
        part = ups[i : i + PREPASS_UPDATES]
        thetas = {n: block.params[n][part[0] - lo - 1 : part[-1] - lo].to(device=ctx.device, dtype=F64)
                  for n in ctx.names}
        batches = [ctx.batch(block, s) for s in part]
        gs = batch_mean_grads(ctx.model, thetas, [b[1] for b in batches], [b[2] for b in batches], ctx.loss)
        for k, (s, g) in enumerate(zip(part, gs)):
            yield s, _advance(ctx, block, s, A, g, {n: thetas[n][k] for n in ctx.names})

def _step_stats(
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
        cols = [theta_s[n] - theta_prev[n], *(_mul(v, k[n]) for _, v in vecs[n])]
        c_dec = terms.decoupled_decay(block, s, n) if terms.decoupled else 0.0
        if c_dec != 0.0:
            cols.append(theta_prev[n])
        n_own = len(cols)
        if extra is not None:
            cols.extend(extra[n])
        M = phi[n].reshape(R, -1) @ _cols(*cols)
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


def _n_parts(ctx: Context) -> int:
    return 1 if ctx.terms.decoupled else 2


def _light(ctx: Context, lo: int, hi: int, keep_u: bool) -> bool:
    """Whether pass 1 of chunk ``(lo, hi]`` can skip the path integrals (see :func:`pass1`)."""
    if keep_u or lo != ctx.window[0]:
        return False
    return (hi - lo) * ctx.n_params * _n_parts(ctx) * 8 <= LIGHT_BYTES


def pass1(
    traj: Trajectory,
    problem: Problem,
    lo: int,
    hi: int,
    *,
    keep_u: bool = False,
    light: bool | None = None,
    momentum: bool = True,
    ctx: Context | None = None,
) -> Pass1:
    """First pass over chunk ``(lo, hi]`` (see the module docstring).

    Per update and tensor, every inner product with ``phi_s`` (``<phi, dtheta>``, the decoupled decay
    ``<phi, theta_{s-1}>``, the rebuilt movement ``<u, vec> = <phi, k * vec>``) is one ``(R x P_n) @ (P_n x c)``
    matmul, and ``u_s`` goes into the chunk total by one ``addcmul_``: ``phi`` is read twice, ``u`` is never
    materialised (unless kept).

    The first chunk of the window needs no path integrals here: its ``u_total`` is never used (the carries only
    flow backward into earlier chunks), so without ``keep_u`` (and when ``L x P`` floats per momentum part fit
    ``LIGHT_BYTES``) it only rebuilds the momentum, and its pass 2 computes the per-update scalars itself
    (``stats.deferred``): one path integral per update instead of two (2x less quadrature work for a
    single-chunk window).

    ``light=True`` skips the path integrals of any chunk (its ``u_total`` is then left at zero): for the
    reverse chain (:func:`pass2` with ``u_in``), where every chunk's pass 2 computes its own path integrals and
    the accumulator comes from the next chunk's pass 2 instead of the carries. ``None``: the rule above.
    ``momentum=False`` (with ``light``) also skips the rebuilt momentum, leaving ``a_total`` at zero: for the
    window's last chunk, whose totals nothing reads (they only flow into later chunks).
    """
    ctx = ctx or context(traj, problem)
    _check_chunk(ctx, lo, hi)
    terms, R, L, names, dev = ctx.terms, ctx.R, hi - lo, ctx.names, ctx.device
    if light and keep_u:
        raise ValueError("pass1(light=True) computes no u_s to keep: use keep_u=False")
    light = _light(ctx, lo, hi, keep_u) if light is None else bool(light)
    if not momentum and not light:
        raise ValueError("pass1(momentum=False) needs light=True: the path integrals need the rebuilt momentum")
    u_total = {n: torch.zeros((R, *ctx.shapes[n]), dtype=F64, device=dev) for n in names}
    parts = _PART_OF_COL[: _n_parts(ctx)]
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
        for _ in _momentum_scan(ctx, block, a_total):
            pass
        return Pass1(lo, hi, u_total, a_total, stats, kept_u, kept_g, wd_param)
    theta_prev = ctx.params(block, lo)
    for j, s in enumerate(block.updates):
        theta_s = ctx.params(block, s)
        _, xb, yb = ctx.batch(block, s)
        g = batch_mean_grad(ctx.model, theta_prev, xb, yb, ctx.loss)
        vecs = _advance(ctx, block, s, a_total, g, theta_prev)
        phi, pi = _phi(ctx, theta_prev, theta_s)
        k = {n: terms.k(block, s, n, dev) for n in names}
        _step_stats(ctx, block, s, j, phi, k, theta_prev, theta_s, vecs, pi, stats)
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
    return Pass1(lo, hi, u_total, a_total, stats, kept_u, kept_g, wd_param)


# ==============================================================================================================
# Carries
# ==============================================================================================================
@dataclass
class Carry:
    """What chunk ``(lo, hi]`` needs from the others (picklable)."""

    lo: int
    hi: int
    u_in: dict[str, torch.Tensor]  # U_{hi+1}: reverse accumulator of the updates after hi (zeros for the last chunk)
    a_in: dict[str, dict[str, torch.Tensor]]  # rebuilt momentum at lo from updates a+1..lo (zeros for the first)
    s_a: dict[str, torch.Tensor] | None  # optimizer momentum stored at the window start (None: zero / none)
    stats: StepStats  # this chunk's per-update scalars from pass 1


def window_start_state(traj: Trajectory, problem: Problem, ctx: Context | None = None) -> dict[str, torch.Tensor] | None:
    """``S_a``: the stored ``exp_avg`` (Adam/AdamW) or ``momentum_buffer`` (SGD) at the window start, float64.

    Nonzero for windows starting after update 0 and for recordings started from a warm optimizer. None when the
    optimizer keeps no momentum (plain SGD) or the stored state is all zeros (a fresh optimizer at ``a = 0``).
    """
    terms = ctx.terms if ctx is not None else OptimTerms(traj.optimizer_spec, list(traj.tensor_names))
    a, _ = ctx.window if ctx is not None else problem.resolve_window(int(traj.committed_updates))
    name = terms.state_name
    if name is None:
        return None
    block = traj.block(a, a + 1)
    state = {n: block.state[name][n][0].to(device=problem.device, dtype=F64) for n in terms.names}
    if all(not bool(v.any()) for v in state.values()):
        return None
    return state


def solo_carry(traj: Trajectory, problem: Problem, ctx: Context | None = None) -> Carry:
    """The carry of a window taken as one chunk (no pass 1, no carries): nothing flows in from other chunks, and
    :func:`pass2` computes every per-update scalar itself (``stats.deferred``)."""
    ctx = ctx or context(traj, problem)
    lo, hi = ctx.window
    stats = StepStats.empty(ctx.R, hi - lo, len(ctx.names), ctx.device)
    stats.deferred = True
    u_in = {n: torch.zeros((ctx.R, *ctx.shapes[n]), dtype=F64, device=ctx.device) for n in ctx.names}
    return Carry(lo, hi, u_in, {}, window_start_state(traj, problem, ctx), stats)


def carries(traj: Trajectory, problem: Problem, pass1s: list[Pass1]) -> list[Carry]:
    """Sequential scans over the chunk totals (cheap: O(n_chunks x R x P) additions).

    ``pass1s`` must tile the window in order (pass :meth:`Pass1.summary` to avoid shipping kept ``u``). Reverse:
    ``U_in[c] = total[c+1] + beta^L[c+1] * U_in[c+1]``; forward: ``A_in[c+1] = beta^L[c] * A_in[c] + A_tot[c]``.
    """
    if not pass1s:
        raise ValueError("carries() needs the pass-1 results of at least one chunk")
    terms = OptimTerms(traj.optimizer_spec, list(traj.tensor_names))
    window = problem.resolve_window(int(traj.committed_updates))
    p1s = sorted(pass1s, key=lambda p: p.lo)
    if p1s[0].lo != window[0] or p1s[-1].hi != window[1] or any(x.hi != y.lo for x, y in itertools.pairwise(p1s)):
        raise ValueError(
            f"the pass-1 chunks {[(p.lo, p.hi) for p in p1s]} do not tile the window ({window[0]}, {window[1]}]"
        )
    s_a = window_start_state(traj, problem)
    names = terms.names
    n = len(p1s)
    u_in: list[dict[str, torch.Tensor]] = [{}] * n
    cur = {k: torch.zeros_like(v) for k, v in p1s[-1].u_total.items()}
    for c in range(n - 1, -1, -1):
        u_in[c] = cur
        if c > 0:
            p = p1s[c]
            L = p.hi - p.lo
            cur = {k: p.u_total[k] + cur[k] * terms.terms[k].beta ** L for k in names}
    a_in: list[dict[str, dict[str, torch.Tensor]]] = []
    acc = {part: {k: torch.zeros_like(v) for k, v in d.items()} for part, d in p1s[0].a_total.items()}
    for p in p1s:
        a_in.append(acc)
        L = p.hi - p.lo
        acc = {part: {k: acc[part][k] * terms.terms[k].beta ** L + p.a_total[part][k] for k in names} for part in acc}
    return [Carry(p.lo, p.hi, u_in[c], a_in[c], s_a, p.stats) for c, p in enumerate(p1s)]


# ==============================================================================================================
# Pass 2
# ==============================================================================================================
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
            for col, part in enumerate(_PART_OF_COL):
                if part in a_in:
                    lst.append((col, c, a_in[part][n]))
        out[n] = lst
    return out


# per-sample gradients of one update that pass 2's producer thread may take ahead (float64 bytes; the queue holds
# one such update, the consumer another)
GRADS_AHEAD_BYTES = env_int("EXPLAIND_GRADS_AHEAD_BYTES", 256 << 20,
                            "bytes of per-sample gradients pass 2 may take one update ahead", minimum=0)


def _grads_ahead(ctx: Context, block: TrajectoryBlock) -> bool:
    """Whether every update of ``block`` takes its dot products from per-sample gradients (method ``"grad"``)
    small enough to be taken one update ahead."""
    sizes = {int(b.numel()) for b in block.batches}
    methods = {choose_method(ctx.problem.method, ctx.R, nb, ctx.per_tensor) for nb in sizes}
    return methods == {"grad"} and max(sizes, default=0) * ctx.n_params * 8 <= GRADS_AHEAD_BYTES


@dataclass
class _UpdateInputs:
    """What pass 2's producer hands its consumer for one update."""

    j: int
    theta_prev: dict[str, torch.Tensor]
    theta_s: dict[str, torch.Tensor] | None = None
    x: dict[str, torch.Tensor] | None = None  # phi_s (or the kept u_s)
    kx: dict[str, float | torch.Tensor] | None = None  # u_s = kx * x
    pi: Any = None  # the PathIntegral when pass 2 made it (its scalars)
    g: dict[str, torch.Tensor] | None = None  # batch-mean gradient, when taken
    idx: torch.Tensor | None = None
    xb: torch.Tensor | None = None
    yb: torch.Tensor | None = None
    grads: list[tuple[slice, dict[str, torch.Tensor]]] | None = None  # per-sample gradients, taken ahead


def pass2(
    traj: Trajectory,
    problem: Problem,
    lo: int,
    hi: int,
    carry: Carry,
    p1: Pass1 | None = None,
    *,
    u_in: dict[str, torch.Tensor] | None = None,
    ctx: Context | None = None,
) -> ChunkResult:
    """Second pass over chunk ``(lo, hi]``: scores of every update's batch, walking backward from ``hi``.

    ``u_in`` (the reverse chain): ``U_{hi+1}``, the accumulator the next chunk's pass 2 returned as its
    ``u_out``, instead of ``carry.u_in`` (which needs every later chunk's path integrals in pass 1). The result's
    ``u_out`` is ``U_{lo+1}``: the ``u_in`` of the previous chunk.

    Uses ``p1``'s kept ``u_s`` / ``g_s`` when present (``pass1(..., keep_u=True)``), else recomputes the path
    integrals on the nodes pass 1 used (no second kink search), or, for a chunk whose pass 1 skipped them
    (``carry.stats.deferred``), computes them and the per-update scalars here. Returns numpy arrays laid out as
    :func:`engine.result.chunk_layout` says.

    With two or more torch threads on the CPU the updates run as a two-stage pipeline (:mod:`engine.pipeline`):
    ``produce`` (path integral, per-sample gradients: every ``torch.func`` transform) one update ahead in a second
    thread, ``consume`` (the accumulator, dot products, scalars: plain tensor ops) here.
    """
    ctx = ctx or context(traj, problem)
    _check_chunk(ctx, lo, hi)
    if (carry.lo, carry.hi) != (lo, hi):
        raise ValueError(f"carry is for chunk ({carry.lo}, {carry.hi}], not ({lo}, {hi}]")
    kept = p1 is not None and p1.u is not None
    if kept and (p1.lo, p1.hi) != (lo, hi):  # type: ignore[union-attr]
        raise ValueError(f"pass-1 result is for chunk ({p1.lo}, {p1.hi}], not ({lo}, {hi}]")  # type: ignore[union-attr]
    block = traj.block(lo, hi)
    terms, R, L, names, dev, by = ctx.terms, ctx.R, hi - lo, ctx.names, ctx.device, problem.by
    T, N = len(names), ctx.n_samples
    a = ctx.window[0]
    by_sample, by_step, by_param, per_tensor = "sample" in by, "step" in by, "param" in by, ctx.per_tensor

    # outputs (float64, preallocated); per-step/per-tensor always, summed at the end when not asked for
    Td = T if per_tensor else 1
    if by_sample:
        data = torch.zeros((R, N, L, Td) if by_step else (R, N, Td), dtype=F64, device=dev)
    else:
        data = torch.zeros((R, L, T) if by_step else (R, T), dtype=F64, device=dev)
    wd = torch.zeros((R, L, T), dtype=F64, device=dev)
    mom = torch.zeros((R, L, T), dtype=F64, device=dev)
    mov = torch.zeros((R, L, 3, T), dtype=F64, device=dev)
    param = {n: torch.zeros((R, 3, *ctx.shapes[n]), dtype=F64, device=dev) for n in names} if by_param else None
    wd_param = None
    if by_param and terms.decoupled:
        if kept and p1 is not None and p1.wd_param is not None:
            for n in names:
                param[n][:, 1] += p1.wd_param[n]  # type: ignore[index]
        else:
            wd_param = {n: param[n][:, 1] for n in names}  # type: ignore[index]

    # The reverse accumulator, rescaled: U_i = scale[n] * Ut[n], scale = beta^(hi+1-i) (renormalised before it
    # underflows), so each update costs one addcmul_ (U_i = u_i + beta U_{i+1}) and V_i = coef * Ut is never built.
    src = carry.u_in if u_in is None else u_in
    Ut = {n: src[n].to(device=dev, dtype=F64).clone() for n in names}
    scale = dict.fromkeys(names, 1.0)
    s_a = None if carry.s_a is None else {n: v.to(dev) for n, v in carry.s_a.items()}
    a_in = {part: {n: v.to(dev) for n, v in d.items()} for part, d in carry.a_in.items()} if lo > a else {}
    st = carry.stats
    deferred = bool(getattr(st, "deferred", False)) and not kept
    vec_hist: list[dict[str, list[tuple[int, torch.Tensor]]]] = []
    if deferred:  # pass 1 skipped the path integrals: the per-update scalars are made here
        st = StepStats.empty(R, L, T, dev)
        A = {p: {n: torch.zeros(ctx.shapes[n], dtype=F64, device=dev) for n in names} for p in _PART_OF_COL[: _n_parts(ctx)]}
        # forward: the in-chunk rebuilt momentum (L x P per part)
        vec_hist.extend(vecs for _, vecs in _momentum_scan(ctx, block, A))
        del A
    mov[:, :, 0:2] = st.mov_local.to(dev)
    threads = pipeline_threads(dev)
    if threads is not None and by_sample and not _grads_ahead(ctx, block):
        threads = None  # the consumer would have to take the per-sample gradients (torch.func): one thread
    pre_grads = threads is not None  # the producer takes them, so the consumer needs no torch.func

    def produce(s: int) -> _UpdateInputs:
        """The update's torch.func work: phi_s (unless kept), and the batch's gradients."""
        j = s - lo - 1
        w = _UpdateInputs(j=j, theta_prev=ctx.params(block, s - 1))
        if kept:
            w.x, w.g = p1.u[j], p1.g[j]  # type: ignore[union-attr,index]  # u_s itself
            w.kx = dict.fromkeys(names, 1.0)
        else:
            w.theta_s = ctx.params(block, s)
            nodes = None if deferred or st.t_nodes is None or st.w_nodes is None else (st.t_nodes[j], st.w_nodes[j])
            w.x, w.pi = _phi(ctx, w.theta_prev, w.theta_s, nodes)  # phi_s; u_s = kx * phi_s
            w.kx = {n: terms.k(block, s, n, dev) for n in names}
        w.idx, w.xb, w.yb = ctx.batch(block, s)
        if by_sample and pre_grads:
            w.grads = list(sample_grads(ctx.model, w.theta_prev, w.xb, w.yb, ctx.loss,
                                        sample_chunk=int(problem.sample_chunk)))
        elif w.g is None and not by_sample:
            w.g = batch_mean_grad(ctx.model, w.theta_prev, w.xb, w.yb, ctx.loss)
        return w

    def consume(s: int, w: _UpdateInputs) -> None:
        """Everything that chains the updates (plain tensor ops when the producer took the gradients)."""
        j, x, kx, g, theta_prev = w.j, w.x, w.kx, w.g, w.theta_prev
        inner: dict[str, torch.Tensor] | None = None  # <x, kx * v> for the extra vectors v below
        extra = _extra_vectors(ctx, s, a, lo, s_a, a_in)
        if not kept:
            if deferred:
                ex = {n: [_mul(v, kx[n]) for _, _, v in extra[n]] for n in names}
                inner = _step_stats(ctx, block, s, j, x, kx, theta_prev, w.theta_s, vec_hist[j], w.pi, st, ex)
                mov[:, j, 0:2] = st.mov_local[:, j]
                vec_hist[j] = {}
            if wd_param is not None:
                for n in names:
                    c = terms.decoupled_decay(block, s, n)
                    if c != 0.0:
                        wd_param[n].addcmul_(x[n], theta_prev[n], value=-c)
        gs = terms.grad_scale(block, s)
        Vt: dict[str, torch.Tensor] = {}
        coef: dict[str, float] = {}  # V_n = coef[n] * Vt[n]
        for n in names:
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
            c = tt.h * terms.omega(block, s, n) * scale[n]
            if tt.e != 0.0:  # nesterov: V = e * u + h * omega * U
                Vt[n] = torch.mul(Ut[n], c).add_(_mul(x[n], kx[n]), alpha=tt.e)
                coef[n] = 1.0
            else:
                Vt[n], coef[n] = Ut[n], c
        idx = w.idx
        nb = len(idx)
        # --- data: -gs/|B| <V, grad l_k> per sample, or -gs <V, g> for the batch
        if by_sample:
            want_g = g is None and by_param
            k_dot = {n: coef[n] * (-gs / nb) for n in names}  # folded into the matmuls' scaling
            if w.grads is not None:
                dots, g_mean = grad_dots(w.grads, Vt, nb, per_tensor=per_tensor, want_mean_grad=want_g, scale=k_dot)
                w.grads = None
            else:
                method = choose_method(problem.method, R, nb, per_tensor)
                dots, g_mean = sample_dots(
                    ctx.model, theta_prev, w.xb, w.yb, ctx.loss, Vt, per_tensor=per_tensor, method=method,
                    sample_chunk=int(problem.sample_chunk), want_mean_grad=want_g, scale=k_dot,
                )
            if g is None:
                g = g_mean
            target = data[:, :, j] if by_step else data  # (R, N, Td)
            target.index_add_(1, idx, dots.reshape(R, nb, Td))
        else:
            assert g is not None
            target = data[:, j] if by_step else data  # (R, T)
            for t, n in enumerate(names):
                target[:, t] += (Vt[n].reshape(R, -1) @ g[n].reshape(-1)).mul_(-gs * coef[n])
        if by_param:
            assert g is not None
            for n in names:
                param[n][:, 0].addcmul_(Vt[n], g[n], value=-gs * coef[n])  # type: ignore[index]
        # --- coupled weight decay (Adam, SGD): -<V, lam theta_{s-1}>
        if not terms.decoupled:
            for t, n in enumerate(names):
                lam = terms.coupled_decay(block, s, n)
                if lam != 0.0:
                    wd[:, j, t] = (Vt[n].reshape(R, -1) @ theta_prev[n].reshape(-1)).mul_(-lam * coef[n])
                    if by_param:
                        param[n][:, 1].addcmul_(Vt[n], theta_prev[n], value=-lam * coef[n])  # type: ignore[index]
        # --- carried momentum S_a, and the carried-in part of the rebuilt movement: c <u, v> = c <x, kx * v>
        for t, n in enumerate(names):
            lst = extra[n]
            if not lst:
                continue
            if inner is not None:
                M = inner[n]
            else:
                M = x[n].reshape(R, -1) @ _cols(*(_mul(v, kx[n]) for _, _, v in lst))
            for i, (dest, c, v) in enumerate(lst):
                if dest < 0:
                    mom[:, j, t] = M[:, i] * c
                    if by_param:
                        param[n][:, 2].addcmul_(x[n], _mul(v, kx[n]), value=c)  # type: ignore[index]
                else:
                    mov[:, j, dest, t] += M[:, i] * c

    run_two_stage(reversed(block.updates), produce, consume, threads)
    u_out = {n: Ut[n].mul_(scale[n]) if scale[n] != 1.0 else Ut[n] for n in names}  # U_{lo+1}
    if terms.decoupled:
        wd.copy_(mov[:, :, 1])
    mov[:, :, 2] = mom
    rounding = st.quad.to(dev) - mov.sum(dim=(2, 3))

    # reduce to the asked-for dims: data (R, [N], [L], [T]); wd (R, [L], [T]); momentum (R, [T])
    if not per_tensor:
        data = data[..., 0] if by_sample else data.sum(dim=-1)
    if not per_tensor:
        wd = wd.sum(dim=-1)
        mov = mov.sum(dim=-1)
    if not by_step:
        wd = wd.sum(dim=1)
    momentum = mom.sum(dim=1)
    if not per_tensor:
        momentum = momentum.sum(dim=-1)
    npy = lambda x: x.detach().cpu().numpy()
    arrays = {
        "data": npy(data),
        "weight_decay": npy(wd),
        "momentum": npy(momentum),
        "movement": npy(mov),
        "quadrature_residual": npy(st.qres),
        "rounding_residual": npy(rounding),
        "delta": npy(st.f1 - st.f0),
        "nodes": npy(st.nodes),
        "kinks": npy(st.kinks),
        "f_start": npy(st.f0[:, 0]),
        "f_end": npy(st.f1[:, -1]),
    }
    if param is not None:
        for n in names:
            arrays[PARAM_PREFIX + n] = npy(param[n])
    return ChunkResult(lo, hi, arrays, u_out)


__all__ = [
    "PARTS",
    "Carry",
    "Context",
    "Pass1",
    "Problem",
    "StepStats",
    "carries",
    "context",
    "pass1",
    "pass2",
    "result_meta",
    "solo_carry",
    "window_start_state",
]
