"""The path integral of one update: ``phi = integral_0^1 J_F(theta0 + t * dtheta) dt``.

``F(theta0 + dtheta) - F(theta0) = <phi, dtheta>`` exactly; only the 1-D integral is approximated, and its error
(the *residual*) is known exactly from two forward passes, so every result reports it.

How phi is computed: with nodes ``t_j`` and weights ``w_j`` define ``G(theta0) = sum_j w_j F(theta0 + t_j dtheta)``
with ``dtheta`` held constant; then ``grad G = sum_j w_j J_F(theta_j) = phi``. ``F`` is evaluated at all nodes in one
``vmap`` over the node axis and the ``(Q, P)`` Jacobian of ``G`` comes from one ``jacrev`` (a ``vmap`` over the Q
rows of one vjp). No per-node Jacobian is built.

Rules (``parse_rule``):

* ``"kink[:nodes[:grid]]"`` (default, nodes=3, grid=8): find where piecewise-linear units switch along the segment
  (``engine.ops.kinks``), split ``[0, 1]`` there and put ``nodes`` Gauss-Legendre nodes on each smooth piece (one fewer,
  but at least 2, on pieces shorter than ``1/grid``: see ``_capped``). A row that no kink cuts (a smooth query:
  GELU, LayerNorm, softmax attention) starts from ``nodes`` Gauss-Legendre nodes on ``[0, 1]`` and is verified and
  refined like the adaptive rule to ``SMOOTH_TOL`` (``_refine_smooth_rows``): the order doubles while the exactly
  known error falls. Switches that leave ``dF/dt`` continuous (units whose outputs never reach
  the queried outputs) cut no pieces (``_drop_flat_kinks``). When "arg" units (max, max-pool: a winner index)
  switch, the pieces are also verified and refined like the adaptive rule (tolerance ``KINK_ARG_TOL``), because a
  winner that changes twice inside one grid cell is otherwise missed (measured: margin output of the digits CNN,
  residual 7e-3 -> 1e-14).
* ``"midpoint:n"`` (the published code uses 100), ``"gauss:n"``: fixed rules, no kink search.
* ``"adaptive[:tol[:nodes[:grid]]]"``: start from the kink rule and refine until
  ``|residual| <= tol * max(1, |f1 - f0|)`` for every query or ``max_nodes`` is reached. Refinement works per
  piece: the exact integral of ``dF/dt`` over a piece ``[a, b]`` is ``F(b) - F(a)`` (two forwards) and the
  quadrature of ``dF/dt`` needs one forward-mode ``jvp`` per node (no Q x P Jacobian), so each piece's error is
  known exactly. Bad pieces get a kink search of their own (catching units that crossed twice between coarse grid
  points) and are split at the kinks found, or bisected if none.

Per-sample queries (``SampleQuery``): a plain ``query_fn`` is opaque, so ``jacrev`` pushes each of the Q rows back
through the forward of *all* query samples (cost ~ Q x batch) and every sample shares the union of all samples'
kinks. When the outputs of each sample depend only on that sample's inputs (eval mode, no batch statistics), wrap
the query as ``SampleQuery(fn, inputs)``: phi is then computed per sample (``vmap`` over samples of the node-batched
reverse pass) with each sample's own kinks, which removes the batch factor from the cost (docs/benchmarks.md has the
speed-ups on the benchmark models). ``fn`` must then be vmappable over samples (no
``.item()``, no ``F.one_hot`` on a batched label).

Caveats: the adaptive rule uses forward-mode AD (``jvp``), which is not thread-safe: its calls go through
:mod:`engine.ops.forward_mode`, whose lock lets one thread at a time in. Kinks that are not in ``F`` (e.g. ``x - x.max()`` in a hand-written stable softmax) are still
found and cost extra pieces, not accuracy. See ``engine.ops.kinks`` for what is intercepted and what can be missed.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_leaves, tree_map

from engine.ops.forward_mode import jvp

from .kinks import QueryFn, Segment, lexsort, merge_sorted, search_kinks

KINDS = ("kink", "midpoint", "gauss", "adaptive")
DEFAULT_TOL = 1e-8
KINK_ARG_TOL = 1e-11  # the kink rule's per-query verification tolerance when "arg" units switch (see path_integral)
# The kink rule's tolerance on rows no kink cuts (smooth queries; see _refine_smooth_rows), relative to max(1, |change|)
SMOOTH_TOL = 1e-11
_F64: dict[str, Any] = {"dtype": torch.float64}
# A switch whose jump in dF/dt is below KINK_JUMP_TOL * max(1, |dF/dt|) is not a piece edge (_drop_flat_kinks);
# _JUMP_STEP is the step of its finite-difference stencil (rounding of F then contributes ~1e-15 / _JUMP_STEP).
KINK_JUMP_TOL = 1e-7
_JUMP_STEP = 1e-5
_JUMP_OFFSETS = torch.tensor([0.0, -_JUMP_STEP, _JUMP_STEP, -2 * _JUMP_STEP, 2 * _JUMP_STEP], dtype=torch.float64)


@dataclass(frozen=True)
class QuadratureRule:
    """How to integrate the Jacobian along one update's segment.

    kind: "kink" (kink-aware Gauss-Legendre), "midpoint", "gauss" or "adaptive".
    nodes: midpoint/gauss: nodes on [0, 1]; kink/adaptive: Gauss-Legendre nodes per smooth piece.
    grid: kink/adaptive: coarse grid along t used to find sign changes of piecewise-linear units.
    tol: adaptive: refine until |residual| <= tol * max(1, |f1 - f0|) per query (None -> 1e-8).
    max_nodes: cap on the nodes used for phi (kink rule: fewer nodes per piece, then fewer split points).
    chunk: rows of the Q x P Jacobian computed per vmapped vjp (None: all at once); bounds memory for large Q.
    node_chunk: nodes per batched forward in the reverse pass; bounds memory for many nodes.
    """

    kind: str = "kink"
    nodes: int = 3
    grid: int = 8
    tol: float | None = None
    max_nodes: int = 256
    chunk: int | None = None
    node_chunk: int = 64

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown quadrature kind {self.kind!r}; expected one of {KINDS}")
        if self.nodes < 1 or self.grid < 1 or self.max_nodes < 1 or self.node_chunk < 1:
            raise ValueError("nodes, grid, max_nodes and node_chunk must be >= 1")
        if self.kind == "adaptive" and self.tol is None:
            object.__setattr__(self, "tol", DEFAULT_TOL)
        if self.tol is not None and not self.tol > 0:
            raise ValueError("tol must be > 0")


def parse_rule(rule: str | QuadratureRule | None) -> QuadratureRule:
    """``None`` -> the default kink rule; strings "midpoint:100", "gauss:4", "kink", "kink:3[:grid]",
    "adaptive:1e-8[:nodes[:grid]]". A bare "midpoint" means the published 100 nodes, bare "adaptive" tol 1e-8."""
    if rule is None:
        return QuadratureRule()
    if isinstance(rule, QuadratureRule):
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a str, QuadratureRule or None, not {type(rule).__name__}")
    kind, *args = [s.strip() for s in rule.strip().split(":")]
    kind = kind.lower()
    try:
        if kind in ("midpoint", "gauss") and len(args) <= 1:
            n = int(args[0]) if args else (100 if kind == "midpoint" else QuadratureRule.nodes)
            return QuadratureRule(kind=kind, nodes=n)
        if kind == "kink" and len(args) <= 2:
            return QuadratureRule(kind=kind, **dict(zip(("nodes", "grid"), (int(a) for a in args))))
        if kind == "adaptive" and len(args) <= 3:
            tol = float(args[0]) if args else DEFAULT_TOL
            return QuadratureRule(kind=kind, tol=tol, **dict(zip(("nodes", "grid"), (int(a) for a in args[1:]))))
    except ValueError as e:
        raise ValueError(f"cannot parse quadrature rule {rule!r}: {e}") from None
    raise ValueError(
        f"cannot parse quadrature rule {rule!r}; expected midpoint:n, gauss:n, kink[:nodes[:grid]] or "
        "adaptive[:tol[:nodes[:grid]]]"
    )


@dataclass(frozen=True)
class SampleQuery:
    """A query whose outputs are independent per sample: ``fn(params, inputs) -> (B, K)``, row ``b`` depending
    only on ``inputs[b]`` (a tensor or pytree of tensors with leading axis B).

    Calling it gives the flat ``(B*K,)`` vector, so it is a valid ``query_fn`` everywhere; ``path_integral``
    recognises it and integrates each sample separately (own kinks, no cross-sample waste in the reverse pass).
    ``sample_chunk`` samples go through one vmapped reverse pass.
    """

    fn: Callable[[dict[str, Tensor], Any], Tensor]
    inputs: Any
    sample_chunk: int = 32

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        return self.fn(params, self.inputs).reshape(-1)

    @property
    def n_samples(self) -> int:
        return int(tree_leaves(self.inputs)[0].shape[0])


@dataclass
class PathIntegral:
    """One update's path integral for Q query outputs (all float64).

    phi: tensor name -> (Q, *shape). quad = <phi, dtheta>; residual = f1 - f0 - quad, the exactly known
    quadrature error. n_nodes: batched forwards with reverse pass used for phi (for a ``SampleQuery``: nodes per
    sample, padded to the largest sample). n_kinks: switch points used as piece boundaries (summed over samples).
    kinks: their positions (sample-major for a ``SampleQuery``). n_search: extra batched forwards spent on the kink
    search and the adaptive error estimates (no grad). t_rows, w_rows: the nodes and weights used (padded per
    row with zero weights): :func:`phi_given` recomputes phi from them without another kink search.
    """

    phi: dict[str, Tensor]
    f0: Tensor
    f1: Tensor
    quad: Tensor
    residual: Tensor
    n_nodes: int
    n_kinks: int
    kinks: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    n_search: int = 0
    t_rows: Tensor | None = None  # the nodes used, (rows, M) padded with weight 0 (rows: samples, or 1)
    w_rows: Tensor | None = None  # their weights, (rows, M)


# ----------------------------------------------------------------------------------------------------------------
# Nodes and pieces


@functools.lru_cache(maxsize=64)
def _leggauss(n: int) -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor(x, **_F64), torch.tensor(w, **_F64)


def gauss_nodes(edges: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``n`` Gauss-Legendre nodes on every piece ``[edges[i], edges[i+1]]``: flat (nodes, weights)."""
    x, w = _leggauss(n)
    a, b = edges[:-1, None], edges[1:, None]
    return (0.5 * (a + b) + 0.5 * (b - a) * x).reshape(-1), (0.5 * (b - a) * w).reshape(-1)


def midpoint_nodes(n: int) -> tuple[Tensor, Tensor]:
    return (torch.arange(n, **_F64) + 0.5) / n, torch.full((n,), 1.0 / n, **_F64)


@dataclass
class _Pieces:
    """Smooth pieces ``[lo, hi]`` of sample ``row`` with ``n`` Gauss-Legendre nodes each, sorted by (row, lo)."""

    lo: Tensor
    hi: Tensor
    row: Tensor
    n: Tensor

    def nodes(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flat (t, w, owning piece) over all pieces, grouped by node count (few distinct counts)."""
        ts, ws, own = [], [], []
        for n in self.n.unique().tolist():
            idx = torch.nonzero(self.n == n).flatten()
            x, w = _leggauss(int(n))
            a, b = self.lo[idx, None], self.hi[idx, None]
            ts.append((0.5 * (a + b) + 0.5 * (b - a) * x).reshape(-1))
            ws.append((0.5 * (b - a) * w).reshape(-1))
            own.append(idx.repeat_interleave(int(n)))
        if not ts:
            z = torch.zeros(0, **_F64)
            return z, z, z.long()
        return torch.cat(ts), torch.cat(ws), torch.cat(own)


def _split(kinks: Tensor, krow: Tensor, n_rows: int, nodes: int) -> _Pieces:
    """Pieces of [0, 1] per row cut at the kinks (sorted by (row, t), strictly inside (0, 1))."""
    rows = torch.arange(n_rows)
    pts = torch.cat([kinks, torch.zeros(n_rows, **_F64), torch.ones(n_rows, **_F64)])
    prow = torch.cat([krow, rows, rows])
    o = lexsort(prow, pts)
    pts, prow = pts[o], prow[o]
    same = prow[1:] == prow[:-1]
    row = prow[:-1][same]
    return _Pieces(pts[:-1][same], pts[1:][same], row, torch.full_like(row, nodes))


def _capped(
    kinks: Tensor, krow: Tensor, n_rows: int, nodes: int, max_nodes: int, short: float = 0.0
) -> tuple[_Pieces, Tensor, Tensor]:
    """Pieces within ``max_nodes`` per row: first fewer nodes per piece (a kink-free piece is integrated to O(h^3)
    even by one node), then split points thinned evenly where even one node each is too many.

    Pieces shorter than ``short`` get one node fewer when ``nodes >= 3`` (never fewer than 2): the error of n-node
    Gauss-Legendre on a piece of length h scales like h^(2n+1), so on a piece below one coarse grid cell (1/8) the
    (n-1)-node rule is as accurate as the n-node rule on the long pieces. Measured on the modadd transformers over
    100 AdamW updates: residuals unchanged (<= 4e-13), 10-25% fewer Jacobian nodes in updates with many kinks."""
    count = torch.bincount(krow, minlength=n_rows)
    over = torch.nonzero(count + 1 > max_nodes).flatten()
    if over.numel():
        keep = torch.ones_like(kinks, dtype=torch.bool)
        start = torch.cumsum(count, 0) - count
        for r in over.tolist():  # rare: rows with more kinks than max_nodes
            c, s0 = int(count[r]), int(start[r])
            keep[s0 : s0 + c] = False
            keep[s0 + torch.linspace(0, c - 1, max_nodes - 1).round().long().unique()] = True
        kinks, krow = kinks[keep], krow[keep]
        count = torch.bincount(krow, minlength=n_rows)
    pieces = _split(kinks, krow, n_rows, nodes)
    per_row = torch.where((count + 1) * nodes <= max_nodes, nodes, torch.clamp(max_nodes // (count + 1), min=1))
    pieces.n = per_row[pieces.row]
    if nodes >= 3 and short > 0:
        pieces.n = torch.where((pieces.hi - pieces.lo < short) & (pieces.n == nodes), nodes - 1, pieces.n)
    return pieces, kinks, krow


def _pad_rows(ts: Tensor, ws: Tensor, row: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """Node lists per row as ``(n_rows, M)`` arrays; padding nodes have weight 0."""
    o = torch.sort(row, stable=True).indices
    ts, ws, row = ts[o], ws[o], row[o]
    count = torch.bincount(row, minlength=n_rows)
    m = int(count.max()) if count.numel() else 0
    pos = torch.arange(row.numel()) - (torch.cumsum(count, 0) - count)[row]
    t_out = torch.full((n_rows, m), 0.5, **_F64)
    w_out = torch.zeros((n_rows, m), **_F64)
    t_out[row, pos] = ts
    w_out[row, pos] = ws
    return t_out, w_out


# ----------------------------------------------------------------------------------------------------------------
# Evaluations


def _segment(query_fn: QueryFn | SampleQuery, params0: dict[str, Tensor], dparams: dict[str, Tensor]) -> Segment:
    if isinstance(query_fn, SampleQuery):
        sq = query_fn

        def one(p: dict[str, Tensor], x: Any) -> Tensor:
            return sq.fn(p, tree_map(lambda a: a.unsqueeze(0), x))

        return Segment(one, params0, dparams, ctx=sq.inputs)
    return Segment(lambda p, _c: query_fn(p), params0, dparams)


def forward_at(query_fn: QueryFn, params0: dict[str, Tensor], dparams: dict[str, Tensor], ts: Tensor) -> Tensor:
    """``F(theta0 + t dtheta)`` for all ``ts`` in one batched forward: (len(ts), Q), no grad."""
    return Segment(lambda p, _c: query_fn(p), params0, dparams).forward(ts)


def _phi_single(seg: Segment, ts: Tensor, ws: Tensor, chunk: int | None, node_chunk: int) -> dict[str, Tensor]:
    total: dict[str, Tensor] | None = None
    for s in range(0, ts.numel(), node_chunk):
        t, w = ts[s : s + node_chunk], ws[s : s + node_chunk]

        def g(p0: dict[str, Tensor], t: Tensor = t, w: Tensor = w) -> Tensor:
            return w @ vmap(lambda tj: seg.call(tj, None, p0))(t)

        jac = jacrev(g, chunk_size=chunk)(seg.params0)
        if total is None:
            total = jac
        else:
            for k in total:
                total[k].add_(jac[k])
    assert total is not None
    return total


# Cost model for batching samples in _phi_rows, in units of one sample-node (one sample evaluated at one node with
# its reverse pass over all K outputs): a vmapped reverse pass has a fixed overhead (functorch, Python), a
# sample-node costs in proportion to parameters x outputs. Only the ratio of the two constants matters (it decides
# how many samples share one call); they were calibrated on one CPU thread (docs/benchmarks.md).
_CALL_SECONDS = 6e-3
_COPY_NODES = 2.5  # copying one sample's (K, P) Jacobian into place, in sample-nodes
_NODE_SECONDS_PER_PARAM_OUTPUT = 4e-10


def _call_cost(n_params: int, n_out: int) -> float:
    return max(1.0, _CALL_SECONDS / (_NODE_SECONDS_PER_PARAM_OUTPUT * max(1, n_params) * max(1, n_out)))


def _plan_batches(count: Tensor, sample_chunk: int, call_cost: float) -> list[Tensor]:
    """Rows grouped into vmapped batches (each padded to its largest node count), minimising
    ``call_cost * batches + sum(rows * padded nodes)`` over splits of the rows sorted by node count (an exact DP
    over the distinct counts); no batch exceeds ``sample_chunk`` rows. Several batches also cost a copy of every
    row's Jacobian into place (``_COPY_NODES`` sample-nodes per row), so one batch wins when they are close."""
    order = torch.argsort(count, stable=True)
    vals, sizes = torch.unique_consecutive(count[order], return_counts=True)
    vals_l, sizes_l = [max(1, int(v)) for v in vals.tolist()], [int(s) for s in sizes.tolist()]
    g = len(vals_l)
    best = [0.0] + [float("inf")] * g
    cut = [0] * (g + 1)
    for j in range(1, g + 1):
        n = 0
        for i in range(j, 0, -1):  # groups i..j (1-based) in one run of batches
            n += sizes_l[i - 1]
            c = best[i - 1] + -(-n // sample_chunk) * call_cost + n * vals_l[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i - 1
    n_all = int(count.numel())
    one = -(-n_all // sample_chunk) * call_cost + n_all * vals_l[-1] if g else 0.0
    if g and n_all <= sample_chunk and one <= best[g] + _COPY_NODES * n_all:
        return [order]
    runs = []
    j = g
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    batches = []
    start = [0, *torch.cumsum(sizes, 0).tolist()]
    for i, j in reversed(runs):
        rows = order[start[i] : start[j]]
        n_b = -(-rows.numel() // sample_chunk)
        batches.extend(rows.tensor_split(n_b))
    return batches


def _split_width(count: Tensor) -> int:
    """Nodes per vmapped entry for one batch of rows with ``count`` nodes each: splitting a long row into several
    entries of ``m`` nodes (added up afterwards) avoids padding every row to the longest one. Minimises
    ``entries * m + _COPY_NODES * (entries - rows)`` (padded sample-nodes plus adding the extra entries' Jacobians)
    over the distinct counts, with at most two entries per row on average (memory); ``max(count)``: no split."""
    c = count.clamp(min=1)
    top = int(c.max())
    best, best_m = float(c.numel() * top), top
    for m in sorted({int(v) for v in c.unique().tolist()}):
        n_e = int(torch.div(c + m - 1, m, rounding_mode="floor").sum())
        cost = n_e * m + _COPY_NODES * (n_e - c.numel())
        if n_e <= 2 * c.numel() and cost < best:
            best, best_m = cost, m
    return best_m


def _split_rows(ts: Tensor, ws: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's nonzero-weight nodes in entries of at most ``m`` (padded with weight 0): ``(E, m)`` nodes and
    weights and the row of each entry; the first ``rows`` entries are the rows' first entries, in row order."""
    n = ts.shape[0]
    nz = ws != 0
    per = torch.div(nz.sum(1) + m - 1, m, rounding_mode="floor").clamp(min=1)
    o = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)  # nonzero weights first, in their order
    t_s, w_s = ts.gather(1, o), ws.gather(1, o)
    width = int(per.max()) * m
    if width > ts.shape[1]:
        t_s = torch.cat([t_s, torch.full((n, width - ts.shape[1]), 0.5, **_F64)], 1)
        w_s = torch.cat([w_s, torch.zeros((n, width - ts.shape[1]), **_F64)], 1)
    t_s, w_s = t_s[:, :width].reshape(n, -1, m), w_s[:, :width].reshape(n, -1, m)
    slot = torch.arange(t_s.shape[1])[None, :].expand(n, -1)
    keep = slot < per[:, None]
    row = torch.arange(n)[:, None].expand_as(slot)
    first = (slot == 0) & keep
    extra = (slot > 0) & keep
    return (torch.cat([t_s[first], t_s[extra]]), torch.cat([w_s[first], w_s[extra]]),
            torch.cat([row[first], row[extra]]))


def _phi_rows(
    seg: Segment, ts: Tensor, ws: Tensor, chunk: int | None, sample_chunk: int, call_cost: float = 8.0
) -> dict[str, Tensor]:
    """Per-sample phi: ``ts``/``ws`` are ``(S, M)``; returns name -> ``(S*K, *shape)``, sample-major.

    Samples go through ``vmap`` (over samples) of ``jacrev`` (over their K outputs) of the node-weighted sum of
    the outputs at their nodes (``vmap`` over nodes, parameters shared via :class:`~engine.ops.kinks.ParamLine`).
    Samples are batched by node count (:func:`_plan_batches`), and within a batch rows with many nodes are split
    into several entries (:func:`_split_width`), so little work goes into zero-weight padding.
    """
    n_rows = ts.shape[0]
    out: dict[str, Tensor] = {}
    count = (ws != 0).sum(1)
    for rows in _plan_batches(count, max(1, sample_chunk), call_cost):
        if rows.numel() == n_rows:  # one batch: keep the samples' own order (no copy)
            rows = torch.arange(n_rows)
        m = _split_width(count[rows])
        t_e, w_e, row_e = _split_rows(ts[rows], ws[rows], m)

        def per(t_row: Tensor, w_row: Tensor, c: Any) -> dict[str, Tensor]:
            def g(p0: dict[str, Tensor]) -> Tensor:
                return w_row @ vmap(lambda tj: seg.call(tj, c, p0))(t_row)

            return jacrev(g, chunk_size=chunk)(seg.params0)

        jac = vmap(per)(t_e, w_e, seg.rows(rows[row_e]))
        n_b = rows.numel()
        if row_e.numel() > n_b:  # the rows' extra entries are added to their first ones (a view: no copy)
            jac = {k: v[:n_b].index_add_(0, row_e[n_b:], v[n_b:]) for k, v in jac.items()}
        if n_b == n_rows:
            out = jac
            break
        for k, v in jac.items():
            if k not in out:
                out[k] = torch.empty((n_rows, *v.shape[1:]), dtype=v.dtype)
            out[k].index_copy_(0, rows, v)
    return {k: v.reshape(-1, *seg.params0[k].shape) for k, v in out.items()}


def phi_nodes(
    query_fn: QueryFn,
    params0: dict[str, Tensor],
    dparams: dict[str, Tensor],
    ts: Tensor,
    ws: Tensor,
    *,
    chunk: int | None = None,
    node_chunk: int = 64,
) -> dict[str, Tensor]:
    """``sum_j ws[j] J_F(theta0 + ts[j] dtheta)`` as the gradient of the node-weighted sum: one reverse pass."""
    return _phi_single(Segment(lambda p, _c: query_fn(p), params0, dparams), ts, ws, chunk, node_chunk)


def phi_nodes_vmapped_jacrev(
    query_fn: QueryFn, params0: dict[str, Tensor], dparams: dict[str, Tensor], ts: Tensor, ws: Tensor
) -> dict[str, Tensor]:
    """Reference/benchmark only: a full Jacobian per node (``vmap(jacrev)``), then the weighted sum."""

    def jac_at(t: Tensor) -> dict[str, Tensor]:
        return jacrev(lambda p: query_fn({k: p[k] + t * dparams[k] for k in p}).reshape(-1))(params0)

    jac = vmap(jac_at)(ts)
    return {k: torch.tensordot(ws, v, dims=1) for k, v in jac.items()}


def _dfdt(seg: Segment, ts: Tensor, rows: Tensor | None) -> Tensor:
    """``d/dt F`` = ``J_F dtheta`` at all ``ts``: (len(ts), K), one forward-mode jvp per node, batched. Falls back
    to reverse mode for ops without a forward-mode rule (fused attention kernels)."""

    def fwd(t: Tensor, c: Any) -> Tensor:
        return jvp(lambda tt: seg.call(tt, c), (t,), (torch.ones_like(t),))[1]

    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch scripts its jvp decompositions on first use and warns that torch.jit.script is deprecated.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            return seg.vmap(fwd, ts, rows)
    except (RuntimeError, NotImplementedError):
        return seg.vmap(lambda t, c: jacrev(lambda tt: seg.call(tt, c))(t), ts, rows).detach()


def dfdt_at(query_fn: QueryFn, params0: dict[str, Tensor], dparams: dict[str, Tensor], ts: Tensor) -> Tensor:
    """Directional derivative ``J_F(theta0 + t dtheta) dtheta`` at all ``ts``: (len(ts), Q)."""
    return _dfdt(Segment(lambda p, _c: query_fn(p), params0, dparams), ts, None)


def _drop_flat_kinks(
    seg: Segment, kinks: Tensor, krow: Tensor, f: Tensor | None = None, have: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The kinks (sorted by (row, t)) where ``dF/dt`` really jumps: a unit that switches at ``t*`` changes ``J_F``
    by ``dF/dy * (its slope change) * dx/dtheta``, and ``dF/dt`` by the same times ``dx/dt != 0``, so a switch with
    no jump in ``dF/dt`` (for every output) leaves ``J_F`` continuous and needs no piece edge. Such switches are
    common in models as users write them: units whose outputs are discarded (an MLP run over all positions of
    which only the last is read), or masked out.

    The jump ``J`` comes from plain forwards at ``t*``, ``t* +- h``, ``t* +- 2h`` (``_JUMP_OFFSETS``): with
    ``D(h) = F(t*+h) + F(t*-h) - 2 F(t*) = J h + h^2 F'' + O(h^4)``, ``(4 D(h) - D(2h)) / (2h) = J + O(h^3)``.
    A flat switch within ``2h`` of a real one sees that one's jump in its stencil and is kept. The caller checks
    the residual after dropping (:func:`path_integral`), so a switch dropped wrongly cannot go unnoticed.
    ``f`` (n, 5, K): these outputs where ``have`` (the kink search computes most of them); the rest are
    evaluated here."""
    n = int(kinks.numel())
    if n == 0:
        return kinks, krow
    h = _JUMP_STEP
    need = torch.ones(n, dtype=torch.bool) if f is None or have is None else ~have
    if bool(need.any()):
        ts = (kinks[need, None] + _JUMP_OFFSETS).reshape(-1)
        fn = seg.forward(ts, krow[need].repeat_interleave(5))
        fn = fn.reshape(-1, 5, fn.shape[-1])
        f = fn if f is None or bool(need.all()) else f.index_put((need,), fn.to(f.dtype))
    assert f is not None
    d1 = f[:, 1] + f[:, 2] - 2 * f[:, 0]
    d2 = f[:, 3] + f[:, 4] - 2 * f[:, 0]
    jump = ((4 * d1 - d2) / (2 * h)).abs().amax(1)
    scale = ((f[:, 2] - f[:, 1]) / (2 * h)).abs().amax(1).clamp(min=1.0)
    keep = ~(jump <= KINK_JUMP_TOL * scale)  # NaN: keep
    return kinks[keep], krow[keep]


def _refine_smooth_rows(
    seg: Segment, rule: QuadratureRule, pieces: _Pieces, kinks: Tensor, krow: Tensor, f_grid: Tensor
) -> tuple[_Pieces, Tensor, Tensor, int]:
    """Rows that no kink cuts (smooth models: GELU, LayerNorm, softmax attention) get as many nodes as they need.

    On a short piece between kinks, ``nodes`` Gauss-Legendre nodes are plenty; on the whole of ``[0, 1]`` of a
    smooth but strongly curved query (a large update of a transformer) they are not (measured on a 2-layer GPT-2:
    3 nodes leave a residual of 1e-3 of the change). Such rows are verified and refined like the adaptive rule
    (exact per-piece errors from forward mode: 2 forwards and one ``jvp`` per node, no ``(Q, P)`` Jacobian) to
    ``SMOOTH_TOL * max(1, |f1 - f0|)``: the order doubles while the error falls. Rows with kinks (ReLU models) are
    untouched, so their cost does not change; so are smooth rows whose error, estimated for free from the kink
    search's coarse grid ``f_grid`` (rows, grid + 1, K) on ``[0, 1]`` (:func:`_grid_error_weights`), is well below
    the tolerance (small updates). Returns the pieces (sorted by (row, lo)), the kinks (``kinks`` and any
    the refinement found, sorted by (row, t)) and the evaluations spent."""
    n_rows = seg.n_rows
    f0, f1 = f_grid[:, 0], f_grid[:, -1]
    smooth = torch.bincount(krow, minlength=n_rows) == 0
    if f_grid.shape[1] >= 5:  # the coarse grid's own estimate (free) clears rows that already meet the tolerance
        est = torch.einsum("g,rgk->rk", _grid_error_weights(f_grid.shape[1] - 1, rule.nodes), f_grid).abs()
        thresh = SMOOTH_TOL * (f1 - f0).abs().clamp(min=1.0)
        smooth &= ~(est <= 0.1 * thresh).all(1)
    if not bool(smooth.any()):
        return pieces, kinks, krow, 0
    idx = torch.nonzero(smooth).flatten()
    sub = seg if seg.ctx is None else Segment(seg.fn, seg.params0, seg.dparams, ctx=seg.rows(idx))
    srule = QuadratureRule(kind="adaptive", nodes=rule.nodes, grid=rule.grid, tol=SMOOTH_TOL,
                           max_nodes=rule.max_nodes, chunk=rule.chunk, node_chunk=rule.node_chunk)
    empty = torch.zeros(0, **_F64)
    new, k_new, kr_new, n_evals = _adaptive(sub, srule, empty, empty.long(), f0[idx], f1[idx])
    new.row = idx[new.row]
    out = _merge_pieces(pieces, ~smooth[pieces.row], new, torch.ones_like(new.row, dtype=torch.bool))
    k_all, kr_all = torch.cat([kinks, k_new]), torch.cat([krow, idx[kr_new]])
    o = lexsort(kr_all, k_all)
    return out, k_all[o], kr_all[o], n_evals


@functools.lru_cache(maxsize=16)
def _grid_error_weights(grid: int, nodes: int) -> Tensor:
    """Weights ``c`` with ``sum_g c_g F(g / grid)`` = the error of ``nodes``-point Gauss-Legendre on ``dF/dt`` over
    ``[0, 1]`` for the degree-``grid`` polynomial through the ``grid + 1`` equispaced values: an estimate of the
    rule's error on ``F`` itself when ``F`` is smooth on the grid's scale (exact for polynomials of that degree)."""
    x = np.linspace(-1.0, 1.0, grid + 1)
    tn, wn = np.polynomial.legendre.leggauss(nodes)
    # Lagrange basis g: its derivative at the nodes (d/dt = 2 d/dx), from the exact interpolating fit.
    basis = np.polynomial.legendre.legfit(x, np.eye(grid + 1), grid)  # (grid + 1 coefficients, grid + 1 bases)
    dvals = 2.0 * np.polynomial.legendre.legval(tn, np.polynomial.legendre.legder(basis))  # (bases, nodes)
    c = -(dvals @ (0.5 * wn))
    c[-1] += 1.0
    c[0] -= 1.0
    return torch.tensor(c, **_F64)


def _merge_pieces(a: _Pieces, keep_a: Tensor, b: _Pieces, keep_b: Tensor) -> _Pieces:
    """The pieces of ``a`` where ``keep_a`` and of ``b`` where ``keep_b``, sorted by (row, lo)."""
    lo = torch.cat([a.lo[keep_a], b.lo[keep_b]])
    row = torch.cat([a.row[keep_a], b.row[keep_b]])
    o = lexsort(row, lo)
    return _Pieces(lo[o], torch.cat([a.hi[keep_a], b.hi[keep_b]])[o], row[o], torch.cat([a.n[keep_a], b.n[keep_b]])[o])


def _pieces_error(seg: Segment, pieces: _Pieces) -> Tensor:
    """Exact error of each piece's Gauss-Legendre quadrature of dF/dt: ``F(hi) - F(lo) - sum w dF/dt``, (m, K)."""
    m = pieces.lo.numel()
    rows = torch.cat([pieces.row, pieces.row])
    fe = seg.forward(torch.cat([pieces.lo, pieces.hi]), rows)
    ts, ws, own = pieces.nodes()
    d = _dfdt(seg, ts, pieces.row[own])
    integ = torch.zeros(m, d.shape[1], dtype=d.dtype).index_add_(0, own, ws[:, None] * d)
    return fe[m:] - fe[:m] - integ


def _dot(phi: dict[str, Tensor], dparams: dict[str, Tensor]) -> Tensor:
    out = None
    for k, v in phi.items():
        term = v.reshape(v.shape[0], -1) @ dparams[k].reshape(-1).to(v.dtype)
        out = term if out is None else out + term
    assert out is not None
    return out


# ----------------------------------------------------------------------------------------------------------------
# The public entry point


def path_integral(
    query_fn: QueryFn | SampleQuery,
    params0: dict[str, Tensor],
    dparams: dict[str, Tensor],
    rule: QuadratureRule | str | None = None,
    *,
    need_phi: bool = True,
    need_quad: bool = True,
) -> PathIntegral:
    """Integrate the Jacobian of ``query_fn`` (params dict -> (Q,)) along ``params0 + t * dparams``, t in [0, 1].

    ``params0`` and ``dparams`` must have the same keys (every tensor ``query_fn`` differentiates through) and
    should be float64. With ``need_phi=False`` only ``f0``/``f1`` are computed (``phi`` empty, ``quad`` and
    ``residual`` NaN, no kink search). With ``need_quad=False`` phi is computed but ``quad`` and ``residual`` are
    left NaN (for callers that take ``<phi, dparams>`` in a fused pass of their own).
    """
    rule = parse_rule(rule)
    if set(params0) != set(dparams):
        raise ValueError(f"params0 and dparams cover different tensors: {sorted(set(params0) ^ set(dparams))}")
    params0 = {k: v.detach() for k, v in params0.items()}
    dparams = {k: dparams[k].detach() for k in params0}
    empty = torch.zeros(0, **_F64)

    if not need_phi:
        f = forward_at(query_fn, params0, dparams, torch.tensor([0.0, 1.0], **_F64))
        nan = torch.full_like(f[0], float("nan"))
        return PathIntegral({}, f[0], f[1], nan, nan.clone(), 0, 0, empty, 0)

    seg = _segment(query_fn, params0, dparams)
    n_rows = seg.n_rows
    n_search = 0
    kinks = empty
    all_kinks = None  # (kinks, rows) when the kink rule dropped flat switches (checked after phi)
    if rule.kind in ("midpoint", "gauss"):
        unit = torch.tensor([0.0, 1.0], **_F64)
        ts, ws = midpoint_nodes(rule.nodes) if rule.kind == "midpoint" else gauss_nodes(unit, rule.nodes)
        f = seg.forward(unit.repeat(n_rows), torch.arange(n_rows).repeat_interleave(2))
        f0, f1 = f[0::2], f[1::2]
        t_rows, w_rows = ts.expand(n_rows, -1), ws.expand(n_rows, -1)
    else:
        ones = torch.ones(n_rows, **_F64)
        jump = rule.kind == "kink"  # the search's last forwards also give most of _drop_flat_kinks' stencils
        search = search_kinks(seg, 0 * ones, ones, torch.arange(n_rows), grid=rule.grid,
                              stencil=_JUMP_OFFSETS if jump else None)
        n_search = search.n_evals
        f0, f1 = search.f_grid[:, 0], search.f_grid[:, -1]
        if jump and search.n_arg == 0:
            found, frow = _drop_flat_kinks(seg, search.kinks, search.interval, search.f_stencil, search.stencil_ok)
            assert search.stencil_ok is not None
            n_search += 5 * int((~search.stencil_ok).sum())
            if found.numel() < search.kinks.numel():
                all_kinks = (search.kinks, search.interval)
            pieces, kinks, krow = _capped(found, frow, n_rows, rule.nodes, rule.max_nodes, short=1.0 / rule.grid)
            pieces, kinks, krow, n_est = _refine_smooth_rows(seg, rule, pieces, kinks, krow, search.f_grid)
            n_search += n_est
        else:
            # "arg" units (max / max-pool winners) can switch twice inside one grid cell (a -> c -> b), which the
            # refinement on x[a] - x[b] misses: the kink rule then verifies its pieces like the adaptive rule
            # (exact per-piece errors, forward mode only) and refines the bad ones, to KINK_ARG_TOL.
            arule = rule if rule.kind == "adaptive" else QuadratureRule(
                kind="adaptive", nodes=rule.nodes, grid=rule.grid, tol=KINK_ARG_TOL, max_nodes=rule.max_nodes,
                chunk=rule.chunk, node_chunk=rule.node_chunk)
            pieces, kinks, _, n_est = _adaptive(seg, arule, search.kinks, search.interval, f0, f1)
            n_search += n_est
        ts_flat, ws_flat, own = pieces.nodes()
        t_rows, w_rows = _pad_rows(ts_flat, ws_flat, pieces.row[own], n_rows)
    t_rows, w_rows = t_rows.contiguous(), w_rows.contiguous()
    n_out = f0.numel() // n_rows
    phi = _phi_seg(seg, query_fn, t_rows, w_rows, rule.chunk, rule.node_chunk, n_out)
    quad = None
    if all_kinks is not None:
        # The dropped switches also cut pieces, which the smooth part of a long segment may have needed: a row whose
        # residual (exact, from phi) exceeds KINK_ARG_TOL * max(1, |f1 - f0|) gets all its kinks back, and phi is
        # recomputed. Short segments (training updates) pass; this check is the (Q x P) dot product quad needs.
        quad = _dot(phi, dparams)
        res = f1 - f0 - quad.reshape(f0.shape)
        bad = (res.abs() > KINK_ARG_TOL * (f1 - f0).abs().clamp(min=1.0)).any(1)
        if bool(bad.any()):
            quad = None
            # only the bad rows are rebuilt: the others keep their pieces (refined smooth rows included)
            k_all, r_all = all_kinks
            kb, rb = k_all[bad[r_all]], r_all[bad[r_all]]
            rebuilt, kb, rb = _capped(kb, rb, n_rows, rule.nodes, rule.max_nodes, short=1.0 / rule.grid)
            pieces = _merge_pieces(pieces, ~bad[pieces.row], rebuilt, bad[rebuilt.row])
            k_new, r_new = torch.cat([kinks[~bad[krow]], kb]), torch.cat([krow[~bad[krow]], rb])
            kinks = k_new[lexsort(r_new, k_new)]
            ts_flat, ws_flat, own = pieces.nodes()
            t_rows, w_rows = _pad_rows(ts_flat, ws_flat, pieces.row[own], n_rows)
            t_rows, w_rows = t_rows.contiguous(), w_rows.contiguous()
            phi = _phi_seg(seg, query_fn, t_rows, w_rows, rule.chunk, rule.node_chunk, n_out)
    f0, f1 = f0.reshape(-1), f1.reshape(-1)
    if not need_quad:
        quad = torch.full_like(f0, float("nan"))
    elif quad is None:
        quad = _dot(phi, dparams)
    return PathIntegral(
        phi, f0, f1, quad, f1 - f0 - quad, int(t_rows.shape[1]), int(kinks.numel()), kinks, n_search, t_rows, w_rows
    )


def _phi_seg(
    seg: Segment, query_fn: Any, t_rows: Tensor, w_rows: Tensor, chunk: int | None, node_chunk: int, n_out: int
) -> dict[str, Tensor]:
    if isinstance(query_fn, SampleQuery):
        n_par = sum(v.numel() for v in seg.params0.values())
        return _phi_rows(seg, t_rows, w_rows, chunk, query_fn.sample_chunk, _call_cost(n_par, n_out))
    return _phi_single(seg, t_rows[0], w_rows[0], chunk, node_chunk)


def phi_given(
    query_fn: QueryFn | SampleQuery,
    params0: dict[str, Tensor],
    dparams: dict[str, Tensor],
    t_rows: Tensor,
    w_rows: Tensor,
    rule: QuadratureRule | str | None = None,
) -> dict[str, Tensor]:
    """phi from given nodes (``PathIntegral.t_rows`` / ``w_rows`` of an earlier :func:`path_integral` of the same
    segment): no kink search, no endpoint forwards. Equal to that call's phi (same nodes, same batching)."""
    rule = parse_rule(rule)
    params0 = {k: v.detach() for k, v in params0.items()}
    dparams = {k: dparams[k].detach() for k in params0}
    seg = _segment(query_fn, params0, dparams)
    if t_rows.shape[0] != seg.n_rows:
        raise ValueError(f"t_rows has {t_rows.shape[0]} rows, the query has {seg.n_rows}")
    n_out = None
    if isinstance(query_fn, SampleQuery):
        with torch.no_grad():
            n_out = int(query_fn.fn(params0, tree_map(lambda a: a[:1], query_fn.inputs)).numel())
    return _phi_seg(seg, query_fn, t_rows, w_rows, rule.chunk, rule.node_chunk, n_out or 1)


def _adaptive(
    seg: Segment, rule: QuadratureRule, kinks: Tensor, krow: Tensor, f0: Tensor, f1: Tensor
) -> tuple[_Pieces, Tensor, Tensor, int]:
    """Refine pieces until each row's total error meets the tolerance or its node budget is spent.

    hp-refinement driven by the exact per-piece errors: a bad piece first gets a kink search of its own (finer
    grid); kinks found split it. A kink-free piece doubles its Gauss-Legendre order while that pays off (error down
    by >= 8x: smooth), and is bisected otherwise (a hidden kink makes higher orders converge only like 1/n, while
    bisection localises it). Returns (pieces, kinks used as edges, their rows, forwards spent).
    """
    assert rule.tol is not None
    n_rows = seg.n_rows
    pieces, kinks, krow = _capped(kinks, krow, n_rows, rule.nodes, rule.max_nodes)
    thresh = rule.tol * torch.clamp((f1 - f0).abs(), min=1.0)  # (rows, K)
    err = _pieces_error(seg, pieces)
    n_evals = int(2 * pieces.lo.numel() + pieces.n.sum())
    inf = float("inf")
    prev = torch.full_like(pieces.lo, inf)  # score before the piece's last refinement
    searched = (pieces.lo == 0) & (pieces.hi == 1)  # [0, 1] itself was searched on the coarse grid
    live = torch.ones(n_rows, dtype=torch.bool)
    found_t, found_r = [kinks], [krow]
    while True:
        total = torch.zeros_like(thresh).index_add_(0, pieces.row, err)
        used = torch.zeros(n_rows, dtype=torch.int64).index_add_(0, pieces.row, pieces.n)
        room = rule.max_nodes - used
        live &= (total.abs() > thresh).any(1) & (room > 0)
        if not bool(live.any()):
            break
        score = (err.abs() / thresh[pieces.row]).amax(1)
        npc = torch.bincount(pieces.row, minlength=n_rows)
        worst = torch.full((n_rows,), -1.0, **_F64).scatter_reduce(0, pieces.row, score, reduce="amax")
        pick = live[pieces.row] & ((score > 0.5 / npc[pieces.row]) | (score >= worst[pieces.row]))
        idx = torch.nonzero(pick).flatten()
        # Kink searches inside picked pieces not searched at their current extent.
        srch = idx[~searched[idx]]
        k_t, k_own = torch.zeros(0, **_F64), torch.zeros(0, dtype=torch.int64)
        if srch.numel():
            sub = search_kinks(seg, pieces.lo[srch], pieces.hi[srch], pieces.row[srch], grid=rule.grid)
            n_evals += sub.n_evals
            k_t, k_own = sub.kinks, srch[sub.interval]
        has = torch.zeros(pieces.lo.numel(), dtype=torch.bool)
        has[k_own] = True
        split, pref, bis = _refinements(pieces, idx, has, prev, score, rule)
        c_lo, c_hi, c_own, c_n, c_prev, c_searched = _children(pieces, split, pref, bis, k_t, k_own, score, rule)
        taken, any_taken = _within_budget(pieces, torch.cat([split, pref, bis]), c_own, c_n, score, room, n_rows)
        live &= any_taken  # a row none of whose refinements fits (or that has none left) is finished
        if not bool(taken.any()):
            break
        ct = taken[c_own]
        new = _Pieces(c_lo[ct], c_hi[ct], pieces.row[c_own[ct]], c_n[ct])
        new_err = _pieces_error(seg, new)
        n_evals += int(2 * new.lo.numel() + new.n.sum())
        kt = taken[k_own]
        found_t.append(k_t[kt])
        found_r.append(pieces.row[k_own[kt]])
        keep = ~taken
        lo = torch.cat([pieces.lo[keep], new.lo])
        row = torch.cat([pieces.row[keep], new.row])
        o = lexsort(row, lo)
        pieces = _Pieces(lo[o], torch.cat([pieces.hi[keep], new.hi])[o], row[o], torch.cat([pieces.n[keep], new.n])[o])
        err = torch.cat([err[keep], new_err])[o]
        prev = torch.cat([prev[keep], c_prev[ct]])[o]
        searched = torch.cat([searched[keep], c_searched[ct]])[o]
    # Report the kinks that are piece edges (not bisection points).
    kinks, krow = torch.cat(found_t), torch.cat(found_r)
    o = lexsort(krow, kinks)
    kinks, krow = kinks[o], krow[o]
    ones = torch.ones(n_rows, **_F64)
    m = merge_sorted(kinks, krow, 0 * ones, ones, 1e-12)
    return pieces, kinks[m], krow[m], n_evals


def _refinements(
    pieces: _Pieces, idx: Tensor, has: Tensor, prev: Tensor, score: Tensor, rule: QuadratureRule
) -> tuple[Tensor, Tensor, Tensor]:
    """How each picked piece is refined: split at the kinks found in it, a doubled order (smooth: the error fell
    by >= 8x at the last refinement), or bisected (wide enough)."""
    n_i = pieces.n[idx]
    smooth_ok = (prev[idx] >= 8 * score[idx]) & (2 * n_i <= rule.max_nodes)
    wide = (pieces.hi[idx] - pieces.lo[idx]) > 1e-10
    split = idx[has[idx]]
    pref = idx[~has[idx] & smooth_ok]
    bis = idx[~has[idx] & ~smooth_ok & wide]
    return split, pref, bis


def _children(
    pieces: _Pieces, split: Tensor, pref: Tensor, bis: Tensor, k_t: Tensor, k_own: Tensor, score: Tensor,
    rule: QuadratureRule,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The candidate child pieces: (lo, hi, owner, n, prev, searched)."""
    inf = float("inf")
    pts = torch.cat([pieces.lo[split], k_t])
    own = torch.cat([split, k_own])
    o = lexsort(own, pts)
    pts, own = pts[o], own[o]
    last = torch.ones_like(own, dtype=torch.bool)
    last[:-1] = own[1:] != own[:-1]
    mid = 0.5 * (pieces.lo[bis] + pieces.hi[bis])
    c_lo = torch.cat([pts, pieces.lo[pref], pieces.lo[bis], mid])
    c_hi = torch.cat([torch.where(last, pieces.hi[own], torch.cat([pts[1:], pts[:1]])), pieces.hi[pref], mid,
                      pieces.hi[bis]])
    c_own = torch.cat([own, pref, bis, bis])
    c_n = torch.cat([torch.full_like(own, rule.nodes), 2 * pieces.n[pref], pieces.n[bis], pieces.n[bis]])
    c_prev = torch.cat([torch.full_like(pts, inf), score[pref], score[bis], score[bis]])
    c_searched = torch.cat([torch.zeros_like(own, dtype=torch.bool), torch.ones_like(pref, dtype=torch.bool),
                            torch.zeros(2 * bis.numel(), dtype=torch.bool)])
    return c_lo, c_hi, c_own, c_n, c_prev, c_searched


def _within_budget(
    pieces: _Pieces, parents: Tensor, c_own: Tensor, c_n: Tensor, score: Tensor, room: Tensor, n_rows: int
) -> tuple[Tensor, Tensor]:
    """Best-scored refinements first, per row, while the nodes they add fit: (pieces taken, rows with any)."""
    added = torch.zeros(pieces.lo.numel(), dtype=torch.int64).index_add_(0, c_own, c_n)[parents] - pieces.n[
        parents]
    o = lexsort(pieces.row[parents], -score[parents])
    parents, added = parents[o], added[o]
    prow = pieces.row[parents]
    row_added = torch.zeros(n_rows, dtype=torch.int64).index_add_(0, prow, added)
    cum = torch.cumsum(added, 0) - (torch.cumsum(row_added, 0) - row_added)[prow]
    take_p = cum <= room[prow]
    any_taken = torch.zeros(n_rows, dtype=torch.bool)
    any_taken[prow[take_p]] = True
    taken = torch.zeros(pieces.lo.numel(), dtype=torch.bool)
    taken[parents[take_p]] = True
    return taken, any_taken
