"""The chunked two-pass algorithm: ``pass1`` -> ``carries`` -> ``pass2`` per chunk ``(lo, hi]`` of updates.

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

Everything is float64 and accumulated in place; memory per chunk is O(R x P) (R = query rows) plus the result
arrays, never samples x parameters, never the number of updates (except ``keep_u``: ``L x R x P`` per chunk).
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine import outputs as _outputs
from engine.optim_terms import OptimTerms
from engine.persample import batch_mean_grad, choose_method, sample_dots
from engine.quadrature import parse_rule, path_integral
from engine.result import BY_KEYS, PARAM_PREFIX, PARTS, ChunkResult, ResultMeta
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
    "kink"). ``method``: per-sample dot products by ``"grad"``, ``"jvp"`` or ``"auto"``.
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
def _cast(x: torch.Tensor, device: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(device=device, dtype=F64) if x.is_floating_point() else x.to(device)


class Context:
    """Per-process state for one (trajectory, problem): model in float64 eval mode, data, query function."""

    def __init__(self, traj: Trajectory, problem: Problem):
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
        x_train, y_train = traj.split()
        self.x_train = _cast(x_train, self.device)
        self.y_train = _cast(y_train, self.device)
        self.n_samples = len(self.x_train)
        self.x_query = _cast(problem.x_query, self.device)
        self.y_query = None if problem.y_query is None else _cast(problem.y_query, self.device)
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

    @classmethod
    def empty(cls, R: int, L: int, T: int, device: str) -> StepStats:
        z = lambda *s: torch.zeros(s, dtype=F64, device=device)
        i = torch.zeros(L, dtype=torch.int64)
        return cls(z(R, L), z(R, L), z(R, L), z(R, L), i, i.clone(), z(R, L, 2, T))


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


def _phi_u(
    ctx: Context,
    block: TrajectoryBlock,
    s: int,
    theta_prev: dict[str, torch.Tensor],
    *,
    wd_local: torch.Tensor | None = None,
    wd_param: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Path integral of update ``s`` and ``u_s = k_s * phi_s`` (phi is scaled in place and returned as u).

    AdamW only: writes ``-a_s lam_s <phi_s, theta_{s-1}>`` per tensor into ``wd_local`` (R, T) and adds
    ``-a_s lam_s phi_s * theta_{s-1}`` into ``wd_param``, before phi is scaled.
    """
    theta_s = ctx.params(block, s)
    dtheta = {n: theta_s[n] - theta_prev[n] for n in ctx.names}
    pi = path_integral(ctx.query_fn, theta_prev, dtheta, ctx.rule)
    terms, R = ctx.terms, ctx.R
    u: dict[str, torch.Tensor] = {}
    for t, n in enumerate(ctx.names):
        phi = pi.phi[n]
        if terms.decoupled:
            c = terms.decoupled_decay(block, s, n)
            if c != 0.0:
                if wd_local is not None:
                    wd_local[:, t] = (phi.reshape(R, -1) @ theta_prev[n].reshape(-1)).mul_(-c)
                if wd_param is not None:
                    wd_param[n].addcmul_(phi, theta_prev[n], value=-c)
        u[n] = phi.mul_(terms.k(block, s, n, ctx.device))
    return u, pi


def pass1(
    traj: Trajectory, problem: Problem, lo: int, hi: int, *, keep_u: bool = False, ctx: Context | None = None
) -> Pass1:
    """First pass over chunk ``(lo, hi]`` (see the module docstring)."""
    ctx = ctx or context(traj, problem)
    _check_chunk(ctx, lo, hi)
    block = traj.block(lo, hi)
    terms, R, L, names, dev = ctx.terms, ctx.R, hi - lo, ctx.names, ctx.device
    u_total = {n: torch.zeros((R, *ctx.shapes[n]), dtype=F64, device=dev) for n in names}
    parts = ("data",) if terms.decoupled else ("data", "weight_decay")
    a_total = {p: {n: torch.zeros(ctx.shapes[n], dtype=F64, device=dev) for n in names} for p in parts}
    stats = StepStats.empty(R, L, len(names), dev)
    kept_u: list[dict[str, torch.Tensor]] | None = [] if keep_u else None
    kept_g: list[dict[str, torch.Tensor]] | None = [] if keep_u else None
    wd_param = None
    if keep_u and terms.decoupled and "param" in problem.by:
        wd_param = {n: torch.zeros((R, *ctx.shapes[n]), dtype=F64, device=dev) for n in names}
    theta_prev = ctx.params(block, lo)
    for j, s in enumerate(block.updates):
        wd_local = stats.mov_local[:, j, 1, :] if terms.decoupled else None
        u, pi = _phi_u(ctx, block, s, theta_prev, wd_local=wd_local, wd_param=wd_param)
        stats.f0[:, j] = pi.f0
        stats.f1[:, j] = pi.f1
        stats.quad[:, j] = pi.quad
        stats.qres[:, j] = pi.residual
        stats.nodes[j] = int(pi.n_nodes)
        stats.kinks[j] = int(pi.n_kinks)
        _, xb, yb = ctx.batch(block, s)
        g = batch_mean_grad(ctx.model, theta_prev, xb, yb, ctx.loss)
        gs = terms.grad_scale(block, s)
        for t, n in enumerate(names):
            tt = terms.terms[n]
            om = terms.omega(block, s, n)
            uf = u[n].reshape(R, -1)
            inputs = [("data", g[n] * gs, 0)]
            lam = terms.coupled_decay(block, s, n)
            if not terms.decoupled:
                inputs.append(("weight_decay", theta_prev[n] * lam, 1))
            for part, x, col in inputs:
                A = a_total[part][n]
                A.mul_(tt.beta).add_(x, alpha=om)
                vec = A * tt.h
                if tt.e != 0.0:
                    vec.add_(x, alpha=tt.e)
                stats.mov_local[:, j, col, t] = (uf @ vec.reshape(-1)).neg_()
            u_total[n].add_(u[n], alpha=tt.beta**j)
        if kept_u is not None and kept_g is not None:
            kept_u.append(u)
            kept_g.append(g)
        theta_prev = ctx.params(block, s)
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
def pass2(
    traj: Trajectory,
    problem: Problem,
    lo: int,
    hi: int,
    carry: Carry,
    p1: Pass1 | None = None,
    *,
    ctx: Context | None = None,
) -> ChunkResult:
    """Second pass over chunk ``(lo, hi]``: scores of every update's batch, walking backward from ``hi``.

    Uses ``p1``'s kept ``u_s`` / ``g_s`` when present (``pass1(..., keep_u=True)``), else recomputes them.
    Returns numpy arrays laid out as :func:`engine.result.chunk_layout` says.
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
    mov[:, :, 0:2] = carry.stats.mov_local.to(dev)
    param = {n: torch.zeros((R, 3, *ctx.shapes[n]), dtype=F64, device=dev) for n in names} if by_param else None
    wd_param = None
    if by_param and terms.decoupled:
        if kept and p1 is not None and p1.wd_param is not None:
            for n in names:
                param[n][:, 1] += p1.wd_param[n]  # type: ignore[index]
        else:
            wd_param = {n: param[n][:, 1] for n in names}  # type: ignore[index]

    U = {n: carry.u_in[n].to(dev).clone() for n in names}
    V = {n: torch.empty_like(U[n]) for n in names}
    s_a = None if carry.s_a is None else {n: v.to(dev) for n, v in carry.s_a.items()}
    for s in reversed(block.updates):
        j = s - lo - 1
        theta_prev = ctx.params(block, s - 1)
        if kept:
            u, g = p1.u[j], p1.g[j]  # type: ignore[union-attr,index]
        else:
            u, _ = _phi_u(ctx, block, s, theta_prev, wd_param=wd_param)
            g = None
        gs = terms.grad_scale(block, s)
        for n in names:
            tt = terms.terms[n]
            U[n].mul_(tt.beta).add_(u[n])
            torch.mul(U[n], tt.h * terms.omega(block, s, n), out=V[n])
            if tt.e != 0.0:
                V[n].add_(u[n], alpha=tt.e)
        idx, xb, yb = ctx.batch(block, s)
        nb = len(idx)
        # --- data: -gs/|B| <V, grad l_k> per sample, or -gs <V, g> for the batch
        if by_sample:
            method = choose_method(problem.method, R, nb, per_tensor)
            want_g = g is None and by_param
            dots, g_mean = sample_dots(
                ctx.model, theta_prev, xb, yb, ctx.loss, V, per_tensor=per_tensor, method=method,
                sample_chunk=int(problem.sample_chunk), want_mean_grad=want_g,
            )
            if g is None:
                g = g_mean
            dots.mul_(-gs / nb)
            target = data[:, :, j] if by_step else data  # (R, N, Td)
            target.index_add_(1, idx, dots.reshape(R, nb, Td))
        else:
            if g is None:
                g = batch_mean_grad(ctx.model, theta_prev, xb, yb, ctx.loss)
            target = data[:, j] if by_step else data  # (R, T)
            for t, n in enumerate(names):
                target[:, t] += (V[n].reshape(R, -1) @ g[n].reshape(-1)).mul_(-gs)
        if by_param:
            if g is None:
                g = batch_mean_grad(ctx.model, theta_prev, xb, yb, ctx.loss)
            for n in names:
                param[n][:, 0].addcmul_(V[n], g[n], value=-gs)  # type: ignore[index]
        # --- coupled weight decay (Adam, SGD): -<V, lam theta_{s-1}>
        if not terms.decoupled:
            for t, n in enumerate(names):
                lam = terms.coupled_decay(block, s, n)
                if lam != 0.0:
                    wd[:, j, t] = (V[n].reshape(R, -1) @ theta_prev[n].reshape(-1)).mul_(-lam)
                    if by_param:
                        param[n][:, 1].addcmul_(V[n], theta_prev[n], value=-lam)  # type: ignore[index]
        # --- carried momentum S_a, and the carried-in part of the rebuilt movement
        for t, n in enumerate(names):
            tt = terms.terms[n]
            uf = u[n].reshape(R, -1)
            if s_a is not None:
                c = -tt.h * tt.beta ** (s - a)
                if c != 0.0:
                    mom[:, j, t] = (uf @ s_a[n].reshape(-1)).mul_(c)
                    if by_param:
                        param[n][:, 2].addcmul_(u[n], s_a[n], value=c)  # type: ignore[index]
            c = -tt.h * tt.beta ** (s - lo)
            if c != 0.0 and lo > a:
                for col, part in enumerate(("data", "weight_decay")):
                    if part in carry.a_in:
                        mov[:, j, col, t] += (uf @ carry.a_in[part][n].to(dev).reshape(-1)).mul_(c)
    if terms.decoupled:
        wd.copy_(mov[:, :, 1])
    mov[:, :, 2] = mom
    st = carry.stats
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
    return ChunkResult(lo, hi, arrays)


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
    "window_start_state",
]
