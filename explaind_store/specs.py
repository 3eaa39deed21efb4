"""JSON specs stored in a run: the model factory and the training loss.

A store is data that may come from someone else, so a model spec names a factory as ``"module:callable"`` plus
JSON keyword arguments, and that callable is only imported when the user trusts its module: the built-in
examples, modules listed in ``EXPLAIND_TRUSTED_MODULES`` (comma-separated, shared by the CLI and Dask workers),
or a factory the caller passes explicitly.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TRUSTED_ENV = "EXPLAIND_TRUSTED_MODULES"
BUILTIN_MODULE_PREFIX = "explaind_store.examples"

LOSS_KINDS = ("cross_entropy", "nll", "mse")


class UntrustedFactoryError(PermissionError):
    """The store names a model factory in a module the user has not trusted."""


def model_spec(factory: str | Callable[..., nn.Module], **kwargs: Any) -> dict[str, Any]:
    """Build a model spec from a callable (or its ``"module:qualname"``) and JSON-serialisable kwargs."""
    if callable(factory):
        name = f"{factory.__module__}:{factory.__qualname__}"
    else:
        name = str(factory)
    _split_factory(name)
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise TypeError(f"model_spec kwargs must be JSON-serialisable (they are stored as JSON): {exc}") from None
    return {"factory": name, "kwargs": dict(kwargs)}


def _split_factory(name: str) -> tuple[str, str]:
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"model factory {name!r} must look like 'package.module:callable'")
    return module, attr


def trusted_modules() -> list[str]:
    """Modules whose factories may be imported: built-in examples plus ``$EXPLAIND_TRUSTED_MODULES``."""
    extra = [m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip()]
    return [BUILTIN_MODULE_PREFIX, *extra]


def is_trusted(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in trusted_modules())


def resolve_factory(spec: dict[str, Any], model_factory: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Instantiate the model a spec describes, refusing untrusted modules.

    ``model_factory`` given by the caller always wins (the caller vouches for it) and is called with the spec's
    kwargs.
    """
    kwargs = dict(spec.get("kwargs") or {})
    if model_factory is not None:
        return model_factory(**kwargs)
    name = spec.get("factory")
    if not name:
        raise ValueError("this store has no model factory in its model_spec; pass model_factory= to open_run()")
    module, attr = _split_factory(name)
    if not is_trusted(module):
        raise UntrustedFactoryError(
            f"the store asks to build its model with {name!r}, but module {module!r} is not trusted, so it was "
            f"not imported (a store may come from someone else). If you trust it, pass model_factory= to "
            f"open_run(), or add the module to the {TRUSTED_ENV} environment variable "
            f"(e.g. {TRUSTED_ENV}={module})."
        )
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def loss_spec(kind: str = "cross_entropy", reduction: str = "mean") -> dict[str, str]:
    """Spec of the training loss. ``cross_entropy`` on logits, ``nll`` on log-probs, ``mse``; mean over the batch."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r} is not supported; use one of {', '.join(LOSS_KINDS)}")
    if reduction != "mean":
        raise ValueError(
            f"loss reduction {reduction!r} is not supported: the decomposition assumes the batch-mean loss "
            "(reduction='mean'), which is what the optimizer's gradient g_s is"
        )
    return {"kind": kind, "reduction": reduction}


def normalize_loss(loss: str | dict[str, str] | None) -> dict[str, str]:
    if loss is None:
        return loss_spec()
    if isinstance(loss, str):
        return loss_spec(loss)
    return loss_spec(loss.get("kind", "cross_entropy"), loss.get("reduction", "mean"))


def per_sample_loss(spec: dict[str, str], outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of each sample (no reduction), shape ``(N,)``; the training loss is its mean."""
    kind = spec["kind"]
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction="none")
    if kind == "nll":
        return F.nll_loss(outputs, targets, reduction="none")
    if kind == "mse":
        diff = (outputs - targets.to(outputs.dtype)) ** 2
        return diff.reshape(diff.shape[0], -1).mean(dim=1)
    raise ValueError(f"unknown loss kind {kind!r}")


def batch_loss(spec: dict[str, str], outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch-mean training loss, as the optimizer saw it."""
    return per_sample_loss(spec, outputs, targets).mean()
