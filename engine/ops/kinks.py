"""Where along a parameter segment do piecewise-linear units switch?

The gradient of a ReLU-type network jumps wherever a unit flips along the segment ``theta0 + t * dtheta``, which
caps any fixed quadrature rule at first order. This module finds those switch points generically, for any model,
by intercepting the piecewise-linear torch functions with a ``TorchFunctionMode`` while the query function runs
under ``torch.func.vmap`` over many values of ``t`` at once:

* "sign" units (relu, leaky_relu, hardtanh, relu6, clamp, abs, maximum/minimum, elu, hardswish, comparisons such
  as ``x > 0`` that drive ``torch.where`` masks, ...) switch where a *switch value* ``x - threshold`` changes
  sign;
* "arg" units (max pooling, ``torch.max``/``amax`` along a dim, ``torch.min``/``amin``) switch where the winning
  index changes; between two grid points the switch is the root of ``x[a] - x[b]`` for the two winners.

Search: evaluate every switch value on a coarse grid of ``t`` (one batched forward), take the elements whose
sign (or winner) differs between adjacent grid points, and refine each crossing with the Illinois variant of
regula falsi, all crossings at once (one batched forward per iteration): inverse cubic guesses for the first two
steps, a secant through the last two points after that, and from the second step on ``t -+ eps`` probes where the
tolerance on the switch value is at its rounding noise. Crossings of deeper layers are found the same way:
regula falsi only needs the composed switch value as a function of ``t``.

Caveats: an element that crosses an even number of times between two grid points (out and back in) is invisible
to the grid; an "arg" unit whose winner changes twice (a -> c -> b) is refined on ``x[a] - x[b]`` only. Both leave
a kink inside a quadrature piece; the quadrature residual shows it and the adaptive rule refines it. Functions
that are not intercepted (``torch.sort``/``topk``/``median``, ``torch.max_pool2d`` called directly, custom
autograd functions) are treated as smooth. The query function must not run its own ``vmap`` around the
intercepted ops (recorded values must leave through the outer ``vmap``).

The mode is only ever entered as a context manager inside the traced function, so it never outlives one forward
call; torch keeps the mode stack per thread, and nothing here uses threads or global mutable state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

QueryFn = Callable[[dict[str, Tensor]], Tensor]

SIGN = "sign"
ARG = "arg"

# Record budget (float64 elements of recorded switch values) for one batched forward while refining crossings.
# The forward's other activations are a small multiple of the records, so this bounds the search's memory.
_RECORD_BUDGET = 1 << 22
# Relative precision of a root: |s(t)| <= _ROOT_TOL * (|s(a)| + |s(b)|) over the grid cell [a, b], or a sign
# change of s within _ROOT_TOL * (b - a) of t (the same precision in t for a linear s).
_ROOT_TOL = 1e-12
# A root tolerance below this many ulps of a record's largest switch value may be under the rounding noise of s.
_NOISE_ULPS = 2


# ----------------------------------------------------------------------------------------------------------------
# Interception


def _is_batched(x: Tensor) -> bool:
    return bool(torch._C._functorch.is_batchedtensor(x))


def _get(args: Sequence[Any], kwargs: dict[str, Any], i: int, names: Sequence[str], default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return default


def _input(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return _get(args, kwargs, 0, ("input", "self"))


Record = tuple[str, tuple[Tensor, ...]]


def _sign(x: Tensor, *thresholds: Any) -> list[Record]:
    """Switch values ``x - c`` for each threshold ``c`` (a number or a tensor)."""
    out: list[Record] = []
    for c in thresholds:
        if c is None:
            continue
        if isinstance(c, Tensor) and not c.is_floating_point():
            c = c.to(x.dtype)
        s = (x - c) if not (isinstance(c, (int, float)) and c == 0) else x.clone()
        out.append((SIGN, (s.reshape(-1),)))
    return out


def _arg_along(x: Tensor, dims: Any, negate: bool) -> list[Record]:
    """Winner records for a max/min reduction of ``x`` over ``dims`` (None: all dims)."""
    v = -x if negate else x
    if v.ndim == 0:
        return []
    if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
        v = v.reshape(1, -1)
    else:
        red = [d % v.ndim for d in ((dims,) if isinstance(dims, int) else dims)]
        keep = [d for d in range(v.ndim) if d not in red]
        v = v.permute(*keep, *red)
        v = v.reshape(math.prod(v.shape[: len(keep)]), -1)
    return [(ARG, (v, v.argmax(-1, keepdim=True)))]


def _h_unary(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    return _sign(_input(args, kwargs), 0.0)


def _h_consts(*cs: float) -> Callable[[Sequence[Any], dict[str, Any]], list[Record]]:
    def h(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
        return _sign(_input(args, kwargs), *cs)

    return h


def _h_hardtanh(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    lo = _get(args, kwargs, 1, ("min_val",), -1.0)
    hi = _get(args, kwargs, 2, ("max_val",), 1.0)
    return _sign(_input(args, kwargs), lo, hi)


def _h_shrink(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    lam = _get(args, kwargs, 1, ("lambd",), 0.5)
    return _sign(_input(args, kwargs), -lam, lam)


def _h_threshold(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    return _sign(_input(args, kwargs), _get(args, kwargs, 1, ("threshold",)))


def _h_clamp(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    return _sign(_input(args, kwargs), _get(args, kwargs, 1, ("min",)), _get(args, kwargs, 2, ("max",)))


def _h_clamp_min(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    return _sign(_input(args, kwargs), _get(args, kwargs, 1, ("min",)))


def _h_clamp_max(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    return _sign(_input(args, kwargs), _get(args, kwargs, 1, ("max",)))


def _h_binary(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
    x = _input(args, kwargs)
    other = _get(args, kwargs, 1, ("other",))
    if not isinstance(x, Tensor):
        x, other = other, x
    if not isinstance(other, (Tensor, int, float)) or isinstance(other, bool):
        return []
    if isinstance(other, Tensor) and not other.is_floating_point() and not x.is_floating_point():
        return []
    return _sign(x, other)


def _h_maxmin(negate: bool) -> Callable[[Sequence[Any], dict[str, Any]], list[Record]]:
    def h(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
        x = _input(args, kwargs)
        second = _get(args, kwargs, 1, ("dim", "other"))
        if isinstance(second, Tensor):  # binary torch.max(a, b) == maximum
            return _sign(x, second)
        return _arg_along(x, second, negate)

    return h


def _h_amaxmin(negate: bool) -> Callable[[Sequence[Any], dict[str, Any]], list[Record]]:
    def h(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
        return _arg_along(_input(args, kwargs), _get(args, kwargs, 1, ("dim",), None), negate)

    return h


def _h_pool(with_indices: Callable[..., tuple[Tensor, Tensor]], nd: int) -> Callable[..., list[Record]]:
    def h(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Record]:
        kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
        x = _input(args, kwargs)
        pos = list(args)
        if not pos:
            pos = [kw.pop("input")]
        _, idx = with_indices(*pos, **kw)
        v = x.flatten(-nd) if nd > 1 else x
        v = v.reshape(-1, v.shape[-1])
        return [(ARG, (v, idx.reshape(v.shape[0], -1)))]

    return h


def _build_table() -> dict[Any, Callable[[Sequence[Any], dict[str, Any]], list[Record]]]:
    owners = (torch, torch.Tensor, torch._C.TensorBase, F, torch._C._nn)
    spec: dict[str, Callable[[Sequence[Any], dict[str, Any]], list[Record]]] = {}
    for n in ("relu", "relu_", "leaky_relu", "leaky_relu_", "abs", "abs_", "absolute", "absolute_", "sign",
              "sgn", "elu", "elu_", "celu", "celu_", "selu", "selu_", "prelu", "rrelu", "rrelu_", "__abs__"):
        spec[n] = _h_unary
    spec["relu6"] = _h_consts(0.0, 6.0)
    for n in ("hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_"):
        spec[n] = _h_consts(-3.0, 3.0)
    for n in ("hardtanh", "hardtanh_"):
        spec[n] = _h_hardtanh
    for n in ("softshrink", "hardshrink"):
        spec[n] = _h_shrink
    for n in ("threshold", "threshold_"):
        spec[n] = _h_threshold
    for n in ("clamp", "clamp_", "clip", "clip_"):
        spec[n] = _h_clamp
    for n in ("clamp_min", "clamp_min_"):
        spec[n] = _h_clamp_min
    for n in ("clamp_max", "clamp_max_"):
        spec[n] = _h_clamp_max
    for n in ("maximum", "minimum", "fmax", "fmin", "gt", "lt", "ge", "le", "greater", "less", "greater_equal",
              "less_equal", "__gt__", "__lt__", "__ge__", "__le__"):
        spec[n] = _h_binary
    spec["max"] = _h_maxmin(False)
    spec["min"] = _h_maxmin(True)
    spec["amax"] = _h_amaxmin(False)
    spec["amin"] = _h_amaxmin(True)
    table: dict[Any, Callable[[Sequence[Any], dict[str, Any]], list[Record]]] = {}
    for owner in owners:
        for n, h in spec.items():
            f = getattr(owner, n, None)
            if f is not None:
                try:
                    table[f] = h
                except TypeError:  # unhashable descriptor: cannot be a torch-function key anyway
                    pass
    for nd in (1, 2, 3):
        for base in ("max_pool", "adaptive_max_pool"):
            f = getattr(F, f"{base}{nd}d")
            table[f] = _h_pool(getattr(F, f"{base}{nd}d_with_indices"), nd)
            table[getattr(F, f"{base}{nd}d_with_indices")] = _h_pool(getattr(F, f"{base}{nd}d_with_indices"), nd)
    return table


_TABLE = _build_table()


class KinkRecorder(TorchFunctionMode):
    """Records the switch values of every piecewise-linear op the wrapped code calls (use as a context manager).

    ``kinds[i]`` is ``"sign"`` (``tensors[i] == (s,)``: flat switch values, the unit switches where ``s`` changes
    sign) or ``"arg"`` (``tensors[i] == (v, idx)``: candidates ``(P, L)`` and winners ``(P, M)``). With
    ``only_batched`` (the default) values that do not depend on the vmapped ``t`` are skipped.
    """

    def __init__(self, only_batched: bool = True) -> None:
        super().__init__()
        self.only_batched = only_batched
        self.kinds: list[str] = []
        self.tensors: list[tuple[Tensor, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _TABLE.get(func)
        if handler is not None:
            x = _input(args, kwargs)
            if not isinstance(x, Tensor) and len(args) > 1:
                x = args[1]
            # Record before calling: in-place variants overwrite their input.
            if isinstance(x, Tensor) and x.is_floating_point():
                for kind, ts in handler(args, kwargs):
                    if self.only_batched and not _is_batched(ts[0]):
                        continue
                    self.kinds.append(kind)
                    self.tensors.append(ts)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Parameters on the segment without materialising them per node


def _functions(*names: str, owners: tuple[Any, ...] = (torch, torch.Tensor, F)) -> frozenset[Any]:
    out = set()
    for owner in owners:
        for n in names:
            f = getattr(owner, n, None)
            if f is not None:
                try:
                    out.add(f)
                except TypeError:  # unhashable descriptor: cannot be a torch-function key anyway
                    pass
    return frozenset(out)


def _getters(*names: str) -> frozenset[Any]:
    return frozenset(getattr(torch.Tensor, n).__get__ for n in names if hasattr(torch.Tensor, n))


# Ops linear in (weight, bias) jointly; value: number of spatial dims (bias broadcast).
_WEIGHT_BIAS = {F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
# Ops linear in each tensor operand: f(.., W0 + t dW, ..) = f(.., W0, ..) + t f(.., dW, ..) for one param operand.
_MULTILINEAR = _functions("matmul", "mm", "bmm", "einsum", "mul", "multiply", "__matmul__", "__rmatmul__", "__mul__",
                          "__rmul__", "embedding")
# Indexing a param (embedding lookups): linear in the indexed tensor; the result is an activation.
_INDEX = _functions("__getitem__", "index_select", "take", "gather", owners=(torch, torch.Tensor))
# Linear ops of the param alone (shape ops): the result is tracked as a derived param (lazily shifted).
_UNARY = _functions("t", "transpose", "permute", "reshape", "view", "flatten", "unsqueeze", "squeeze", "contiguous",
                    "clone", "swapaxes", "movedim", "narrow", "select", "unflatten", "expand") | _getters(
    "T", "mT")
# Metadata only: answered by the unshifted tensor.
_META = _functions("size", "dim", "numel", "stride", "is_floating_point", "is_complex", "__len__", "nelement",
                   "is_contiguous", owners=(torch.Tensor,)) | _getters(
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda")


def _scan(x: Any, ids: dict[int, Any]) -> bool:
    if isinstance(x, Tensor):
        return id(x) in ids
    if isinstance(x, (list, tuple)):
        return any(isinstance(y, Tensor) and id(y) in ids for y in x)
    return False


class ParamLine(TorchFunctionMode):
    """Evaluates ``fn(params0)`` as ``fn(params0 + t * dparams)`` without building the shifted parameters.

    Use as a context manager around a call that reads the tensors of ``params0`` (by identity, e.g. through
    ``functional_call(model, params0, ...)``). An op linear in a parameter is split,
    ``linear(x, W0 + t dW, b0 + t db) = linear(x, W0, b0) + t * (linear(x, dW) + db)`` (also conv, matmul, einsum,
    mul, embedding and indexing; shape ops of a parameter give a derived parameter, tracked lazily). ``t`` is a scalar, typically batched by
    ``vmap`` over the quadrature nodes: the nodes are then a batch axis of the activations while the weights stay
    shared, so a reverse pass sums the nodes' weight gradients inside one matmul instead of materialising one
    gradient per node (much faster phi; docs/benchmarks.md). Any other op that touches a parameter gets the
    materialised ``W0 + t * dW`` (always correct, only slower).
    """

    def __init__(self, params0: dict[str, Tensor], dparams: dict[str, Tensor], t: Tensor) -> None:
        super().__init__()
        self.pairs: dict[int, tuple[Tensor, Tensor]] = {id(v): (v, dparams[k]) for k, v in params0.items()}
        self.t = t

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        pairs = self.pairs
        if not (any(_scan(a, pairs) for a in args) or any(_scan(a, pairs) for a in kwargs.values())):
            return func(*args, **kwargs)
        if func in _META:
            return func(*args, **kwargs)
        nd = _WEIGHT_BIAS.get(func)
        if nd is not None:  # linear / conv: the common case, before any pytree work
            out = self._weight_bias(func, nd, args, kwargs)
            if out is not None:
                return out
        flat, spec = tree_flatten((list(args), kwargs))
        hit = [i for i, a in enumerate(flat) if isinstance(a, Tensor) and id(a) in pairs]
        if (
            nd is None
            and len(hit) == 1
            and (func in _MULTILINEAR or (hit[0] == 0 and (func in _UNARY or func in _INDEX)))
            and not (func is F.embedding and _get(args, kwargs, 3, ("max_norm",)) is not None)  # renorms in place
        ):
            i = hit[0]
            v0, dv = pairs[id(flat[i])]
            a0, k0 = tree_unflatten([v0 if j == i else a for j, a in enumerate(flat)], spec)
            ad, kd = tree_unflatten([dv if j == i else a for j, a in enumerate(flat)], spec)
            out0, outd = func(*a0, **k0), func(*ad, **kd)
            if func in _UNARY:
                pairs[id(out0)] = (out0, outd)  # the pair keeps out0 alive: its id stays unique
                return out0
            return out0 + self.t * outd
        shifted = list(flat)
        for i in hit:
            v0, dv = pairs[id(flat[i])]
            shifted[i] = v0 + self.t * dv
        a1, k1 = tree_unflatten(shifted, spec)
        return func(*a1, **k1)

    def _weight_bias(self, func: Any, nd: int, args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
        pairs = self.pairs
        x = _get(args, kwargs, 0, ("input",))
        w = _get(args, kwargs, 1, ("weight",))
        b = _get(args, kwargs, 2, ("bias",))
        if not isinstance(x, Tensor) or id(x) in pairs:
            return None
        if any(_scan(a, pairs) for a in args[3:]) or any(
            _scan(v, pairs) for k, v in kwargs.items() if k not in ("input", "weight", "bias")
        ):
            return None
        rest = list(args[3:])
        kw = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        wp = isinstance(w, Tensor) and id(w) in pairs
        bp = isinstance(b, Tensor) and id(b) in pairs
        out = func(x, pairs[id(w)][0] if wp else w, pairs[id(b)][0] if bp else b, *rest, **kw)
        delta = func(x, pairs[id(w)][1], None, *rest, **kw) if wp else None
        if bp:
            db = pairs[id(b)][1].reshape(-1, *([1] * nd))
            delta = db if delta is None else delta + db
        assert delta is not None
        return out + self.t * delta


# ----------------------------------------------------------------------------------------------------------------
# Batched evaluation along the segment


def lexsort(row: Tensor, t: Tensor) -> Tensor:
    """Permutation sorting by (row, t)."""
    o = torch.sort(t, stable=True).indices
    return o[torch.sort(row[o], stable=True).indices]


class Segment:
    """The query along ``theta0 + t * dtheta``, evaluated for many ``t`` at once with ``vmap``.

    ``fn(params, ctx) -> Tensor`` gives the outputs of one *row*. With ``ctx=None`` there is a single row (the
    whole query batch, ``fn(params, None)``). Otherwise ``ctx`` is a pytree of tensors with a leading sample axis
    of length ``n_rows`` and ``fn`` is called with one sample's slice (per-sample queries); every batched call
    takes the sample index of each evaluation.
    """

    def __init__(
        self,
        fn: Callable[[dict[str, Tensor], Any], Tensor],
        params0: dict[str, Tensor],
        dparams: dict[str, Tensor],
        ctx: Any = None,
    ) -> None:
        self.fn, self.params0, self.dparams, self.ctx = fn, params0, dparams, ctx
        leaves = tree_leaves(ctx)
        self.n_rows = int(leaves[0].shape[0]) if ctx is not None else 1

    def point(self, t: Tensor, params0: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        p0 = self.params0 if params0 is None else params0
        return {k: p0[k] + t * self.dparams[k] for k in p0}

    def call(self, t: Tensor, c: Any, params0: dict[str, Tensor] | None = None) -> Tensor:
        """Outputs of row context ``c`` at ``params0 + t * dparams`` (see :class:`ParamLine`), flat."""
        p0 = self.params0 if params0 is None else params0
        with ParamLine(p0, self.dparams, t):
            out = self.fn(p0, c)
        return out.reshape(-1)

    def rows(self, rows: Tensor) -> Any:
        """Context of the given sample rows (None for a single-row segment)."""
        return None if self.ctx is None else tree_map(lambda a: a[rows], self.ctx)

    def vmap(self, f: Callable[..., Any], ts: Tensor, rows: Tensor | None, *extra: Any) -> Any:
        """``vmap`` of ``f(t, ctx, *extra)`` over ``ts`` (and the rows' contexts, and ``extra``)."""
        if self.ctx is None:
            return vmap(lambda t, *e: f(t, None, *e))(ts, *extra)
        assert rows is not None
        return vmap(f)(ts, self.rows(rows), *extra)

    def forward(self, ts: Tensor, rows: Tensor | None = None) -> Tensor:
        """Outputs at all ``ts`` (row ``rows[i]`` for evaluation ``i``), no grad: ``(len(ts), K)``."""
        with torch.no_grad():
            return self.vmap(self.call, ts, rows)


@dataclass
class Records:
    """Switch values of one batched forward: ``f`` (B, K), ``kinds`` and ``tensors`` with a leading B axis."""

    f: Tensor
    kinds: list[str]
    tensors: list[tuple[Tensor, ...]]


def record_pass(seg: Segment, ts: Tensor, rows: Tensor | None = None) -> Records:
    """Evaluate the outputs and every switch value at all ``ts`` in one ``vmap``-ed forward (no grad)."""
    kinds: list[str] = []

    def at(t: Tensor, c: Any) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        with KinkRecorder() as rec:
            out = seg.call(t, c)
        kinds[:] = rec.kinds
        return out, rec.tensors

    with torch.no_grad():
        f, tensors = seg.vmap(at, ts, rows)
    return Records(f=f, kinds=list(kinds), tensors=list(tensors))


def _switch_pass(
    seg: Segment, ts: Tensor, rows: Tensor | None, ia: Tensor, ib: Tensor, kinds: list[str]
) -> tuple[Tensor, Tensor]:
    """Outputs ``(C, K)`` and switch values ``(C, R)``: evaluation ``c`` at ``ts[c]``, record ``r`` read at flat
    index ``ia[c, r]``."""

    def at(t: Tensor, c: Any, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        with KinkRecorder() as rec:
            out = seg.call(t, c)
        if rec.kinds != kinds:
            raise RuntimeError(
                "the piecewise-linear ops seen by the kink search changed between forwards; the query function "
                "must run the same ops for every parameter value"
            )
        vals = []
        for r, (kind, tens) in enumerate(zip(rec.kinds, rec.tensors)):
            flat = tens[0].reshape(-1)
            v = torch.index_select(flat, 0, a[r : r + 1])
            if kind == ARG:
                v = v - torch.index_select(flat, 0, b[r : r + 1])
            vals.append(v)
        return out, torch.cat(vals)

    with torch.no_grad():
        return seg.vmap(at, ts, rows, ia, ib)


# ----------------------------------------------------------------------------------------------------------------
# The search


@dataclass
class KinkSearch:
    """Result of a kink search over intervals ``[lo[i], hi[i]]`` (each on one sample row).

    kinks, interval: switch positions strictly inside the intervals, sorted by (interval, t) and merged within
    ``merge``, and the interval each lies in. t_grid, f_grid: the coarse grid ``(I, G+1)`` and the outputs on it
    ``(I, G+1, K)`` (interval ends included). n_crossings: crossing elements seen on the grid. n_evals: forwards.
    """

    kinks: Tensor
    interval: Tensor
    t_grid: Tensor
    f_grid: Tensor
    n_crossings: int
    n_evals: int
    n_arg: int = 0  # crossings of "arg" units (a max / pool winner changed between grid points)
    # With a ``stencil``: the outputs at ``kinks[:, None] + stencil`` (n_kinks, S, K), valid where ``stencil_ok``.
    f_stencil: Tensor | None = None
    stencil_ok: Tensor | None = None


def _stencil(ng: int, k: Tensor) -> Tensor:
    """First of 4 consecutive grid points around cell ``k`` (``k`` and ``k + 1`` inside), for ``ng >= 3`` cells."""
    return torch.clamp(k - 1, min=0, max=ng - 3)


def _crossings(rec: Records, nb: int, ng: int) -> tuple[Tensor, ...]:
    """Grid cells where a switch changes: (cell b*G+k, record r, flat index a, flat index b, s_lo, s_hi, stencil),
    ``stencil`` (n, 4): the switch value at the 4 grid points ``_stencil(ng, k) + 0..3`` (NaN for grids < 3)."""
    cells, rids, ias, ibs, flos, fhis, stens = [], [], [], [], [], [], []
    off = torch.arange(4)
    for r, (kind, tens) in enumerate(zip(rec.kinds, rec.tensors)):
        if kind == SIGN:
            s = tens[0].reshape(nb, ng + 1, -1).to(torch.float64)
            pos = s > 0
            b, k, e = torch.nonzero(pos[:, 1:] != pos[:, :-1], as_tuple=True)
            flo, fhi = s[b, k, e], s[b, k + 1, e]
            ia, ib = e, e
            if ng >= 3:
                kk = _stencil(ng, k)[:, None] + off
                sten = s[b[:, None], kk, e[:, None]]
        else:
            v, idx = tens
            n_p, n_l = v.shape[1], v.shape[2]
            v = v.reshape(nb, ng + 1, n_p * n_l).to(torch.float64)
            idx = idx.reshape(nb, ng + 1, n_p, -1)
            b, k, p, m = torch.nonzero(idx[:, 1:] != idx[:, :-1], as_tuple=True)
            ia = p * n_l + idx[b, k, p, m]
            ib = p * n_l + idx[b, k + 1, p, m]
            flo = v[b, k, ia] - v[b, k, ib]
            fhi = v[b, k + 1, ia] - v[b, k + 1, ib]
            if ng >= 3:
                kk = _stencil(ng, k)[:, None] + off
                sten = v[b[:, None], kk, ia[:, None]] - v[b[:, None], kk, ib[:, None]]
        if ng < 3:
            sten = torch.full((flo.numel(), 4), float("nan"), dtype=torch.float64)
        ok = torch.isfinite(flo) & torch.isfinite(fhi) & ((flo != 0) | (fhi != 0))
        cells.append((b * ng + k)[ok])
        rids.append(torch.full((int(ok.sum()),), r, dtype=torch.int64))
        ias.append(ia[ok])
        ibs.append(ib[ok])
        flos.append(flo[ok])
        fhis.append(fhi[ok])
        stens.append(sten[ok])
    if not cells:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z, z, z, z.to(torch.float64), z.to(torch.float64), torch.zeros(0, 4, dtype=torch.float64)
    return tuple(torch.cat(x) for x in (cells, rids, ias, ibs, flos, fhis, stens))


def _inverse_interpolation(t: Tensor, s: Tensor) -> Tensor:
    """Root of the switch value by inverse cubic interpolation through 4 points ``(t, s)`` per row: ``t`` as a
    polynomial in ``s``, evaluated at ``s = 0``. Exact for a linear ``s(t)`` and ~h^4-accurate for a smooth monotone
    one; NaN / inf where two values coincide (the caller then falls back to regula falsi)."""
    # Lagrange weights of all 4 points at once; each weight multiplies its 3 factors in the order j = 0..3
    # (skipping itself) and the terms are summed in order, so the result does not depend on the batching.
    li = torch.ones_like(s)
    for k in range(3):
        sj = s[:, _OTHERS[k]]
        li = li * (-sj) / (s - sj)
    p = t * li
    return p[:, 0] + p[:, 1] + p[:, 2] + p[:, 3]


# _OTHERS[k][i]: the k-th of the 3 indices j != i in 0..3, ascending
_OTHERS = [[k + (k >= i) for i in range(4)] for k in range(3)]


def _dedupe(cell: Tensor, flo: Tensor, fhi: Tensor) -> Tensor:
    """Indices of crossings with distinct (cell, s_lo, s_hi): a unit recorded twice needs one root."""
    if cell.numel() < 2:
        return torch.arange(cell.numel())
    key = torch.stack([cell.to(torch.float64), flo, fhi], 1)
    _, inv = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inv.max()) + 1,), cell.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(cell.numel()), reduce="amin")
    return first.sort().values


def merge_sorted(t: Tensor, group: Tensor, lo: Tensor, hi: Tensor, merge: float) -> Tensor:
    """Mask over points sorted by (group, t): strictly inside (lo, hi) of their group by more than ``merge`` and
    more than ``merge`` above the previous point of the same group."""
    keep = (t > lo[group] + merge) & (t < hi[group] - merge)
    t, group = t[keep], group[keep]
    if t.numel() > 1:
        gap = torch.ones_like(keep[keep])
        gap[1:] = (group[1:] != group[:-1]) | (t[1:] - t[:-1] > merge)
        keep[keep.clone()] = gap
    return keep


@dataclass
class _Brackets:
    """Illinois regula falsi per crossing: the bracket ``[a, b]`` and its switch values, the tolerances on the
    switch value (``ftol``) and on t (``eps``), whether ftol is near the rounding noise of the switch value (``probe``:
    test c -+ eps from the second step on), the root (NaN until found), the end kept last (-1 / +1), which are
    still active, the first guess with its value (for the second step), the last two points that moved the
    bracket with their values (for the secant of later steps), and the outputs at ``root + stencil``
    where the forward that confirmed the root computed them (``f_st``, ``has_st``). Updated in place."""

    a: Tensor
    b: Tensor
    fa: Tensor
    fb: Tensor
    ftol: Tensor
    eps: Tensor
    probe: Tensor
    root: Tensor
    side: Tensor
    active: Tensor
    c_first: Tensor
    f_first: Tensor
    c_prev: Tensor
    f_prev: Tensor
    c_last: Tensor
    f_last: Tensor
    f_st: Tensor | None
    has_st: Tensor


@dataclass
class _Points:
    """The points one refinement step evaluates in one batched forward: ``ts[:n]`` is the next point ``c`` of each
    active crossing; then ``c -+ eps`` of the probed ones (local indices ``pr``), the stencil offsets other than 0
    (at 0 the stencil reads ``c`` itself), and the stencils of roots found earlier without one (``pend``).
    ``owner``: the crossing each point belongs to."""

    ts: Tensor
    owner: Tensor
    n: int
    pr: Tensor
    pend: Tensor
    offs: list[float]


def _next_guess(br: _Brackets, idx: Tensor, it: int, guess: Tensor, st_t: Tensor | None, sten: Tensor) -> Tensor:
    """The point each active crossing ``idx`` tries next, strictly inside its bracket (the midpoint when the rule
    of this step gives none)."""
    aa, bb, fa_, fb_ = br.a[idx], br.b[idx], br.fa[idx], br.fb[idx]
    c = (aa * fb_ - bb * fa_) / (fb_ - fa_)
    if it == 0:
        g0 = guess[idx]
        c = torch.where(torch.isfinite(g0) & (g0 > aa) & (g0 < bb), g0, c)
    elif it == 1 and st_t is not None:
        # Second step: inverse cubic through the first guess and the 3 stencil points nearest to it. The first
        # guess is ~1e-8 off; this lands within float64 noise of the root, so most crossings converge here
        # instead of after one or two more regula falsi steps (one batched forward each).
        t5 = torch.cat([st_t[idx], br.c_first[idx, None]], 1)
        s5 = torch.cat([sten[idx], br.f_first[idx, None]], 1)
        far = (st_t[idx] - br.c_first[idx, None]).abs().argmax(1)
        keep = torch.ones_like(t5, dtype=torch.bool)
        keep[torch.arange(len(idx)), far] = False
        g1 = _inverse_interpolation(t5[keep].reshape(-1, 4), s5[keep].reshape(-1, 4))
        c = torch.where(torch.isfinite(g1) & (g1 > aa) & (g1 < bb), g1, c)
    elif it >= 2:
        # Later steps (units whose switch value is small or curved over the cell): the secant through the last
        # two points evaluated, both near the root, instead of regula falsi from a far bracket end.
        cp, fp, cl, fl_ = br.c_prev[idx], br.f_prev[idx], br.c_last[idx], br.f_last[idx]
        g2 = cl - fl_ * (cl - cp) / (fl_ - fp)
        c = torch.where(torch.isfinite(g2) & (g2 > aa) & (g2 < bb), g2, c)
    bad = ~torch.isfinite(c) | (c <= aa) | (c >= bb)
    return torch.where(bad, 0.5 * (aa + bb), c)


def _gather_points(br: _Brackets, idx: Tensor, c: Tensor, it: int, stencil: Tensor | None) -> _Points:
    """From the second step on c is usually within rounding noise of the root. The same forward then evaluates the
    caller's stencil around c (the outputs its jump test needs, so a confirmed root costs no forward of its own;
    also around roots found earlier without one) and, where ftol is within a few rounding errors of the record's
    switch values (``probe``) or a step already failed, c -+ eps: a sign change there proves the root within eps
    of c, so a unit whose small |fa| + |fb| puts ftol below its rounding noise still converges here."""
    e = br.eps[idx]
    n = idx.numel()
    groups, owners = [c], [idx]
    pr = torch.zeros(0, dtype=torch.int64)
    pend = pr
    offs = [] if stencil is None or it == 0 else stencil.tolist()
    if it >= 1:
        pr = torch.arange(n) if it >= 2 else torch.nonzero(br.probe[idx]).flatten()
        groups += [c[pr] - e[pr], c[pr] + e[pr]]
        owners += [idx[pr], idx[pr]]
        groups += [c + off for off in offs if off != 0]
        owners += [idx] * sum(off != 0 for off in offs)
        if offs:
            assert stencil is not None
            pend = torch.nonzero(~br.active & ~br.has_st & ~torch.isnan(br.root)).flatten()
            groups.append((br.root[pend, None] + stencil).reshape(-1))
            owners.append(pend.repeat_interleave(len(offs)))
    ts = torch.cat(groups) if len(groups) > 1 else c
    owner = torch.cat(owners) if len(owners) > 1 else idx
    return _Points(ts, owner, n, pr, pend, offs)


def _evaluate(seg: Segment, rec: Any, pts: _Points, rid: Tensor, ia: Tensor, ib: Tensor, crow: Tensor | None,
              chunk: int) -> tuple[Tensor, Tensor | None]:
    """Batched switch passes (at most ``chunk`` points each) over ``pts``: each point's value of its own
    crossing's switch (float64), and the outputs at every point where a stencil asks for them."""
    ci, nrec = pts.owner, len(rec.kinds)
    n_pts = pts.ts.numel()
    ia_all = torch.zeros(n_pts, nrec, dtype=torch.int64)
    ib_all = torch.zeros(n_pts, nrec, dtype=torch.int64)
    ia_all[torch.arange(n_pts), rid[ci]] = ia[ci]
    ib_all[torch.arange(n_pts), rid[ci]] = ib[ci]
    f_parts, v_parts = [], []
    for s in range(0, n_pts, chunk):
        sl = slice(s, s + chunk)
        r_sl = None if crow is None else crow[ci[sl]]
        f, vals = _switch_pass(seg, pts.ts[sl], r_sl, ia_all[sl], ib_all[sl], rec.kinds)
        v_parts.append(vals.gather(1, rid[ci[sl]].unsqueeze(1)).squeeze(1).to(torch.float64))
        f_parts.append(f)
    v = torch.cat(v_parts) if len(v_parts) > 1 else v_parts[0]
    if not pts.offs:
        return v, None
    return v, (torch.cat(f_parts) if len(f_parts) > 1 else f_parts[0])


def _judge(br: _Brackets, idx: Tensor, c: Tensor, v: Tensor, pts: _Points) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Which crossings converged (``done``) and where (``at``), and the point that moves each bracket with its
    switch value (``cb``, ``fcb``): c itself, or the probe on the root's side where that is the tighter end."""
    n, pr = pts.n, pts.pr
    fc = v[:n]
    done = (fc.abs() <= br.ftol[idx]) | (fc == 0)
    at = c
    cb, fcb = c, fc
    if pr.numel():
        n_pr = pr.numel()
        aa, bb, fa_, fb_, e = br.a[idx], br.b[idx], br.fa[idx], br.fb[idx], br.eps[idx]
        fl, fr = v[n : n + n_pr], v[n + n_pr : n + 2 * n_pr]
        # a sign change between the probes (one exactly 0 included) puts the root within eps of c
        done[pr] |= ((fl <= 0) & (fr >= 0)) | ((fl >= 0) & (fr <= 0))
        # No sign change around c: the probe on the root's side is the tighter bracket end, and a root if its
        # value is within ftol.
        fcp, cp, ep = fc[pr], c[pr], e[pr]
        same = ~done[pr] & (fl * fcp > 0) & (fr * fcp > 0)
        left = same & (fcp * fb_[pr] > 0) & (cp - ep > aa[pr])
        right = same & (fcp * fa_[pr] > 0) & (cp + ep < bb[pr])
        cb, fcb = c.clone(), fc.clone()
        cb[pr] = torch.where(left, cp - ep, torch.where(right, cp + ep, cp))
        fcb[pr] = torch.where(left, fl, torch.where(right, fr, fcp))
        near = (left | right) & (fcb[pr].abs() <= br.ftol[idx[pr]])
        at = c.clone()
        at[pr] = torch.where(near, cb[pr], cp)
        done[pr] |= near
    return done, at, cb, fcb


def _keep_stencils(br: _Brackets, idx: Tensor, c: Tensor, pts: _Points, fo: Tensor, done: Tensor,
                   at: Tensor) -> None:
    """Store the stencil outputs of the roots this forward confirmed at c, and of the earlier roots it served."""
    n, offs = pts.n, pts.offs
    # index of each stencil offset among the points: c itself for 0, else its group after the probes
    base, cols, k = n + 2 * pts.pr.numel(), [], 0
    for off in offs:
        cols.append(torch.arange(n) if off == 0 else base + k * n + torch.arange(n))
        k += off != 0
    dn = torch.nonzero(done & (at == c)).flatten()
    assert br.f_st is not None
    br.f_st[idx[dn]] = fo[torch.stack(cols, 1)[dn]].to(br.f_st.dtype)
    br.has_st[idx[dn]] = True
    if pts.pend.numel():
        br.f_st[pts.pend] = fo[base + k * n :].reshape(pts.pend.numel(), len(offs), -1).to(br.f_st.dtype)
        br.has_st[pts.pend] = True


def _move_brackets(br: _Brackets, idx: Tensor, done: Tensor, at: Tensor, cb: Tensor, fcb: Tensor) -> None:
    """The Illinois update of each bracket with the point ``cb``; crossings that converged or whose bracket
    collapsed get their root and leave the active set."""
    aa, bb, fa_, fb_ = br.a[idx], br.b[idx], br.fa[idx], br.fb[idx]
    br.c_prev[idx], br.f_prev[idx] = br.c_last[idx], br.f_last[idx]
    br.c_last[idx], br.f_last[idx] = cb, fcb
    same_b = (fcb * fb_ > 0) & ~done
    same_a = (fcb * fa_ > 0) & ~done
    # Illinois: halve the value kept at an end that survives twice in a row, so the bracket shrinks from both
    # sides and convergence stays superlinear instead of stalling like plain regula falsi.
    sd = br.side[idx]
    new_fa = torch.where(same_b & (sd == -1), fa_ * 0.5, fa_)
    new_fb = torch.where(same_a & (sd == 1), fb_ * 0.5, fb_)
    new_b = torch.where(same_b, cb, bb)
    new_fb = torch.where(same_b, fcb, new_fb)
    new_a = torch.where(same_a, cb, aa)
    new_fa = torch.where(same_a, fcb, new_fa)
    br.side[idx] = torch.where(same_b, -1.0, torch.where(same_a, 1.0, sd))
    br.a[idx], br.b[idx], br.fa[idx], br.fb[idx] = new_a, new_b, new_fa, new_fb
    narrow = (new_b - new_a) <= 1e-15
    fin = done | narrow | ~(same_a | same_b)
    br.root[idx] = torch.where(fin, torch.where(done, at, 0.5 * (new_a + new_b)), br.root[idx])
    br.active[idx] = ~fin


def _refine(
    seg: Segment, rec: Any, br: _Brackets, idx: Tensor, it: int, guess: Tensor, st_t: Tensor | None, sten: Tensor,
    rid: Tensor, ia: Tensor, ib: Tensor, crow: Tensor | None, chunk: int, stencil: Tensor | None,
) -> int:
    """One step for the active crossings ``idx``: their next points (with probes and stencils) in one batched
    forward, then the brackets moved; returns the evaluations spent."""
    c = _next_guess(br, idx, it, guess, st_t, sten)
    pts = _gather_points(br, idx, c, it, stencil)
    v, fo = _evaluate(seg, rec, pts, rid, ia, ib, crow, chunk)
    if it == 0:
        br.c_first[idx], br.f_first[idx] = c, v[: pts.n]
    done, at, cb, fcb = _judge(br, idx, c, v, pts)
    if fo is not None:
        _keep_stencils(br, idx, c, pts, fo, done, at)
    _move_brackets(br, idx, done, at, cb, fcb)
    return pts.ts.numel()


def search_kinks(
    seg: Segment,
    lo: Tensor,
    hi: Tensor,
    rows: Tensor | None = None,
    *,
    grid: int = 8,
    merge: float = 1e-12,
    max_iter: int = 60,
    stencil: Tensor | None = None,
) -> KinkSearch:
    """Switch positions of piecewise-linear units inside each interval ``[lo[i], hi[i]]`` on sample ``rows[i]``.

    ``grid + 1`` points per interval (ends included); crossings are refined by Illinois regula falsi until
    ``|s(t)| <= 1e-12 * (|s(a)| + |s(b)|)`` for the grid cell ``[a, b]``, or ``s`` changes sign within
    ``1e-12 * (b - a)`` of ``t`` (the same precision for a linear ``s``), or the bracket is below 1e-15.
    ``stencil`` (float64 offsets in t): also return the outputs at ``kink + stencil`` where the forward that
    confirmed the kink computed them (``KinkSearch.f_stencil``, ``stencil_ok``); not when an "arg" unit crosses
    (``n_arg > 0``: the jump test that wants them is for "sign" units only).
    """
    if grid < 1:
        raise ValueError("grid must be >= 1")
    nb = lo.numel()
    u = torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64)
    t_grid = lo[:, None] + (hi - lo)[:, None] * u
    t_grid[:, 0], t_grid[:, -1] = lo, hi
    grid_rows = None if rows is None else rows.repeat_interleave(grid + 1)
    rec = record_pass(seg, t_grid.reshape(-1), grid_rows)
    n_evals = t_grid.numel()
    f_grid = rec.f.reshape(nb, grid + 1, -1)
    cell, rid, ia, ib, flo, fhi, sten = _crossings(rec, nb, grid)
    n_cross = int(cell.numel())
    empty = torch.zeros(0, dtype=torch.float64)
    n_out = f_grid.shape[-1]
    no_st = None if stencil is None else torch.zeros(0, stencil.numel(), n_out, dtype=f_grid.dtype)
    if n_cross == 0:
        return KinkSearch(empty, empty.long(), t_grid, f_grid, 0, n_evals, 0, no_st,
                          None if stencil is None else torch.zeros(0, dtype=torch.bool))
    sel = _dedupe(cell, flo, fhi)
    cell, rid, ia, ib, flo, fhi, sten = cell[sel], rid[sel], ia[sel], ib[sel], flo[sel], fhi[sel], sten[sel]
    n_arg = int(sum(int((rid == r).sum()) for r, kind in enumerate(rec.kinds) if kind == ARG))
    if n_arg:
        stencil = None  # the jump test is for "sign" units only (the kink rule verifies "arg" pieces instead)
    interval = torch.div(cell, grid, rounding_mode="floor")
    # First guess: inverse cubic interpolation through the grid values around the cell (switch values are smooth
    # and nearly linear over one update, so this usually lands within ~1e-8 of the root: 2 iterations instead of 4)
    guess = torch.full_like(flo, float("nan"))
    st_t = None
    if grid >= 3:
        k0 = _stencil(grid, cell - interval * grid)
        st_t = t_grid[interval[:, None], k0[:, None] + torch.arange(4)]
        guess = _inverse_interpolation(st_t, sten)
    c_first = torch.full_like(flo, float("nan"))  # the first guess and its switch value (for the second step)
    f_first = torch.full_like(flo, float("nan"))
    crow = None if rows is None else rows[interval]
    a = t_grid[:, :-1].reshape(-1)[cell].clone()
    b = t_grid[:, 1:].reshape(-1)[cell].clone()
    fa, fb = flo.clone(), fhi.clone()
    ftol = _ROOT_TOL * (fa.abs() + fb.abs())
    eps = _ROOT_TOL * (b - a)
    # ftol within a few rounding errors of the record's largest switch value: |s(c)| may never get below it
    noise = torch.tensor([_NOISE_ULPS * torch.finfo(x[0].dtype).eps * float(x[0].abs().amax()) if x[0].numel() else 0.0
                          for x in rec.tensors], dtype=torch.float64)
    probe = ftol < noise[rid]
    root = torch.where(fa == 0, a, torch.where(fb == 0, b, torch.full_like(a, float("nan"))))
    side = torch.zeros_like(a)
    active = torch.isnan(root)
    per_t = sum(x[0][0].numel() for x in rec.tensors) or 1
    chunk = max(8, _RECORD_BUDGET // per_t)
    f_st = None
    if stencil is not None:
        f_st = torch.full((a.numel(), stencil.numel(), n_out), float("nan"), dtype=f_grid.dtype)
    has_st = torch.zeros(a.shape, dtype=torch.bool)
    br = _Brackets(a, b, fa, fb, ftol, eps, probe, root, side, active, c_first, f_first, c_first.clone(),
                   f_first.clone(), c_first.clone(), f_first.clone(), f_st, has_st)
    for it in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        n_evals += _refine(seg, rec, br, idx, it, guess, st_t, sten, rid, ia, ib, crow, chunk, stencil)
    if active.any():  # iteration cap: the bracket midpoint is the best estimate
        root[active] = 0.5 * (a[active] + b[active])
    order = lexsort(interval, root)
    root, interval = root[order], interval[order]
    keep = merge_sorted(root, interval, lo, hi, merge)
    out = KinkSearch(root[keep], interval[keep], t_grid, f_grid, n_cross, n_evals, n_arg)
    if f_st is not None:
        out.f_stencil, out.stencil_ok = f_st[order][keep], has_st[order][keep]
    return out


def find_kinks(
    query_fn: QueryFn,
    params0: dict[str, Tensor],
    dparams: dict[str, Tensor],
    *,
    grid: int = 8,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Sorted switch positions in ``(lo, hi)`` of the piecewise-linear units of ``query_fn`` along the segment."""
    seg = Segment(lambda p, _c: query_fn(p), params0, dparams)
    f64: dict[str, Any] = {"dtype": torch.float64}
    return search_kinks(seg, torch.tensor([lo], **f64), torch.tensor([hi], **f64), grid=grid).kinks


def switch_gap(query_fn: QueryFn, params0: dict[str, Tensor], dparams: dict[str, Tensor], ts: Tensor) -> Tensor:
    """For each ``t``: the smallest ``|switch value|`` of any unit (0 means some unit sits exactly on its kink).

    For "arg" units the gap is winner minus runner-up. A diagnostic: at every reported kink this is ~0.
    """
    rec = record_pass(Segment(lambda p, _c: query_fn(p), params0, dparams), ts)
    gaps = [torch.full((ts.numel(),), float("inf"), dtype=torch.float64)]
    for kind, tens in zip(rec.kinds, rec.tensors):
        if kind == SIGN:
            gaps.append(tens[0].abs().amin(1).to(torch.float64))
        else:
            v = tens[0].to(torch.float64)
            if v.shape[-1] > 1:
                top = v.topk(2, dim=-1).values
                gaps.append((top[..., 0] - top[..., 1]).flatten(1).amin(1))
    return torch.stack(gaps, 1).amin(1)
