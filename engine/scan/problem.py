"""What to explain and the per-process set-up: :class:`Problem` (small, shipped to workers), :class:`Context` (the
float64 model, data and coefficients, built once per process) and :func:`result_meta` (the result's shape)."""

from __future__ import annotations

import copy
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from engine.ops import output_modes
from engine.ops.optim_terms import OptimTerms
from engine.ops.persample import choose_method
from engine.ops.quadrature import parse_rule
from engine.result import BY_KEYS, ResultMeta
from engine.scan.heap import keep_heap
from explaind_store import dropout, schema
from explaind_store.modes import apply_modes
from explaind_store.specs import batch_loss
from explaind_store.trajectory import Trajectory, TrajectoryBlock

F64 = torch.float64

keep_heap()  # at import, before this process starts more threads (each would get a malloc arena of its own)


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
    with its own kinks and reverse pass (:class:`engine.ops.quadrature.SampleQuery`); False treats the query batch as
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
        output_modes.validate_mode(self.output, self.y_query, len(self.x_query))
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
    """Per-process state for one (trajectory, problem): model in float64 (in its training mode), data, queries."""

    def __init__(self, traj: Trajectory, problem: Problem):
        keep_heap()
        self.problem = problem
        self.device = problem.device
        self.n_updates = int(traj.committed_updates)
        self.window = problem.resolve_window(self.n_updates)
        self.names = list(traj.tensor_names)
        self.terms = OptimTerms(traj.optimizer_spec, self.names)
        self.loss = dict(traj.loss)
        # the mode each module trained in (stores before that was recorded: eval), as verify rebuilds it too
        model = apply_modes(traj.build_model(), getattr(traj, "attrs", {}).get(schema.ATTR_TRAIN_MODE))
        model = model.to(device=self.device, dtype=F64)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self._twins: list[Context] = []
        # runs with dropout: the model's dropout calls are off except where an update's masks are applied
        self.rng = getattr(traj, "rng_info", None)
        if self.rng is not None:
            dropout.install(model)
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
        self.query_fn = self._query_fn(model)
        with torch.no_grad():
            out = output_modes.apply_mode(problem.output, model(self.x_query), self.y_query, self.loss)
        self.Q, self.O = int(out.shape[0]), int(out.shape[1])
        self.R = self.Q * self.O
        self.rule = parse_rule(problem.rule) if isinstance(problem.rule, str) else problem.rule
        self.by = problem.by
        self.per_tensor = "tensor" in problem.by

    def _query_fn(self, model: torch.nn.Module) -> Any:
        p = self.problem
        if p.per_query:
            return output_modes.make_sample_query(model, self.x_query, self.y_query, p.output, self.loss)
        return output_modes.make_query_fn(model, self.x_query, self.y_query, p.output, self.loss)

    def twins(self, n: int) -> list[Context]:
        """Up to ``n`` copies of this context for other threads (made once, then kept): the same data and queries
        but each its own deep copy of the model. ``functional_call`` swaps a module's parameters in place while it
        runs, so two threads calling one module would see each other's. Fewer (none) when the model cannot be
        deep-copied; the caller then keeps to one thread per model."""
        while len(self._twins) < n:
            try:
                model = copy.deepcopy(self.model)
            except Exception:  # noqa: BLE001 - a model that cannot be copied: no more twins
                break
            twin = copy.copy(self)
            twin._twins = []
            twin.model = model
            twin.query_fn = twin._query_fn(model)
            self._twins.append(twin)
        return self._twins[:n]

    def params(self, block: TrajectoryBlock, step: int) -> dict[str, torch.Tensor]:
        r = step - block.lo
        return {n: block.params[n][r].to(device=self.device, dtype=F64) for n in self.names}

    def f_at(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``F(theta)`` of every query row (``R``, float64) at one parameter vector (replay residuals)."""
        theta = {n: params[n].to(device=self.device, dtype=F64) for n in self.names}
        with torch.no_grad():
            out = torch.func.functional_call(self.model, theta, (self.x_query,))
            return output_modes.apply_mode(self.problem.output, out, self.y_query, self.loss).reshape(-1)

    def batch(self, block: TrajectoryBlock, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = block.batches[s - block.lo - 1].to(device=self.device, dtype=torch.int64)
        return idx, self.x_train[idx], self.y_train[idx]

    def masks(
        self, block: TrajectoryBlock, s: int, theta_prev: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """Update ``s``'s dropout masks (float64, batch first), regenerated from its recorded generator states, or
        None when its forward drew nothing. Raises ``DropoutReplayError`` when the training loss they give is not
        the recorded one (randomness outside dropout calls)."""
        j = s - block.lo - 1
        rec = None if block.rng is None else block.rng[j]
        if rec is None:
            return None
        if self.rng is None:
            raise dropout.DropoutReplayError(
                f"update {s} records generator states but the trajectory does not say where they were drawn "
                f"(its {schema.ATTR_RNG} attribute); the store is damaged: re-record it"
            )
        masks, out = dropout.draw_masks(
            self.model, lambda sl: torch.func.functional_call(self.model, theta_prev, (xb[sl],)), rec,
            self.rng["device"], getattr(torch, self.rng["dtype"]),
        )
        if block.loss is not None:
            dropout.check_loss(s, float(block.loss[j]), float(batch_loss(self.loss, out, yb)))
        return [m.to(device=self.device, dtype=F64) for m in masks]


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
        output_labels=tuple(output_modes.output_labels(problem.output, ctx.O)),
        output=problem.output,
        rule=problem.rule_name,
        by=problem.by,
        method=method,
    )


def check_chunk(ctx: Context, lo: int, hi: int) -> None:
    a, b = ctx.window
    if not (a <= lo < hi <= b):
        raise ValueError(f"chunk ({lo}, {hi}] is not inside the window ({a}, {b}]")



__all__ = ["F64", "Context", "Problem", "check_chunk", "context", "result_meta", "rule_string"]
