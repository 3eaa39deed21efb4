"""``torch.func``'s reverse passes without importing ``torch._dynamo``.

Every ``torch.func`` reverse pass (``grad``, ``vjp``, ``jacrev``) runs through
``torch._functorch.eager_transforms._autograd_grad``, which wraps ``torch.autograd.grad`` in
``torch._dynamo.compiled_autograd._disable()``. Reading ``torch._dynamo`` imports all of Dynamo on first use, most of
a fresh process's fixed cost for a short window (docs/benchmarks.md, "Measurements behind choices in the code"). The engine
never compiles; while Dynamo has not been imported by anyone, compiled autograd cannot be on, so turning it off
through the C switch that ``_disable`` itself flips is the same thing. Once anything imports ``torch._dynamo``,
torch's own function runs unchanged.

A reverse pass with cotangents (``vjp``, ``jacrev``) also skips ``torch.autograd.grad``'s own check of their shapes,
whose first use imports ``torch.fx.experimental.symbolic_shapes`` and with it ``sympy`` (another large part of that
fixed cost): :func:`_vjp` makes the same check in plain Python and hands the same arguments to the same engine call;
anything it does not cover (tensor subclasses, nested tensors, a mismatch that torch should word) goes to
``torch.autograd.grad`` itself.

:func:`install` swaps the module-level function once per process, and only when this torch has the expected
function and C switch (otherwise nothing changes: the engine is just slower to start).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import has_torch_function

_ARGS = ["outputs", "inputs", "grad_outputs", "retain_graph", "create_graph"]
_installed = False


def _switch() -> Any:
    ca = getattr(getattr(torch._C, "_dynamo", None), "compiled_autograd", None)
    return ca if callable(getattr(ca, "set_autograd_compiler", None)) else None


def install() -> bool:
    """Put the lean ``_autograd_grad`` in place of ``torch.func``'s own (once per process); returns whether it is
    in place."""
    global _installed
    if _installed:
        return True
    try:
        from torch._functorch import eager_transforms as et
    except ImportError:
        return False
    orig = getattr(et, "_autograd_grad", None)
    switch = _switch()
    if orig is None or switch is None or list(inspect.signature(orig).parameters) != _ARGS:
        return False
    et._autograd_grad = _make(orig, switch)
    _installed = True
    return True


def _make(orig: Callable[..., tuple[torch.Tensor, ...]], switch: Any) -> Callable[..., tuple[torch.Tensor, ...]]:
    def _autograd_grad(
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[torch.Tensor] | None = None,
        retain_graph: bool = False,
        create_graph: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        if "torch._dynamo" in sys.modules:  # Dynamo is loaded (someone compiles): torch's own bookkeeping
            return orig(outputs, inputs, grad_outputs, retain_graph, create_graph)
        # the same steps as torch's function, with compiled autograd switched off at the C level
        if grad_outputs is None:
            diff_outputs = tuple(out for out in outputs if out.requires_grad)
        else:
            pairs = tuple((out, go) for out, go in zip(outputs, grad_outputs) if out.requires_grad)
            diff_outputs, grad_outputs = (tuple(x) for x in zip(*pairs)) if pairs else ((), ())
        if len(diff_outputs) == 0:
            return tuple(torch.zeros_like(inp) for inp in inputs)
        prior = switch.set_autograd_compiler(None, False)
        try:
            grads = _vjp(tuple(diff_outputs), tuple(inputs), grad_outputs, retain_graph, create_graph)
        finally:
            switch.set_autograd_compiler(*prior)
        return tuple(torch.zeros_like(inp) if g is None else g for g, inp in zip(grads, inputs))

    _autograd_grad.__wrapped__ = orig  # type: ignore[attr-defined]
    return _autograd_grad


def _vjp(
    outputs: tuple[torch.Tensor, ...],
    inputs: tuple[torch.Tensor, ...],
    grad_outputs: Sequence[torch.Tensor] | None,
    retain_graph: bool,
    create_graph: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=..., create_graph=..., allow_unused=True)``
    without importing ``sympy``: when every cotangent is a plain tensor of its output's shape, the engine call that
    ``torch.autograd.grad`` would make after its checks; otherwise ``torch.autograd.grad`` itself."""
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    plain = (
        run is not None
        and grad_outputs is not None
        and not has_torch_function(outputs + inputs)
        and all(
            type(go) is torch.Tensor and not out.is_nested and out.shape == go.shape
            and out.dtype.is_complex == go.dtype.is_complex
            for out, go in zip(outputs, grad_outputs, strict=True)
        )
    )
    if not plain:
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                                   create_graph=create_graph, allow_unused=True)
    return run(outputs, tuple(grad_outputs), retain_graph, create_graph, inputs, True, accumulate_grad=False)


__all__ = ["install"]
