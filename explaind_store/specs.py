"""JSON specs stored in a run: the model factory, dataset factories and the training loss.

A store is data that may come from someone else, so reading one must never run code the user did not choose. A
model spec (and a data spec: a split recorded by reference, see :func:`data_spec`) names its factory as
``"module:name"`` plus JSON keyword arguments, and the rule is the same for both:

- ``module`` is a dotted path of ASCII identifiers and ``name`` one ASCII identifier: no attribute chains, no
  leading underscore or dunder, at most :data:`FACTORY_MAX_LEN` characters. This is checked before anything is
  imported.
- The factory is trusted: one of the built-in example factories (:data:`BUILTIN_FACTORIES` for models,
  :data:`BUILTIN_DATASET_FACTORIES` for data, by exact name), or
  ``module`` is equal to or below an entry of ``$EXPLAIND_TRUSTED_MODULES`` (comma-separated, shared by the CLI and
  Dask workers). Entries naming the standard library, ``explaind_store``/``engine`` or a whole installed package
  (``torch``, ``numpy``, ...) are refused.
- ``name`` is looked up in the module's own namespace and must be a plain Python function (for a model, also an
  ``nn.Module`` subclass) defined at top level under that name (``__qualname__ == name``) in a trusted module:
  re-exported modules (``torch``, ``os``), builtins (``print``, ``eval``) and functions imported from elsewhere are
  refused. One checker (:func:`load_trusted`) applies the rule to both kinds.
- A factory or data the caller passes (``open_run(path, model_factory=..., data=...)``) always wins: the caller
  vouches for it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TRUSTED_ENV = "EXPLAIND_TRUSTED_MODULES"
BUILTIN_MODULE_PREFIX = "explaind_store.examples"
# The built-in model factories, trusted by exact name (not the whole package: its modules also hold training
# functions that write stores, which a store must never be able to call).
BUILTIN_FACTORIES = frozenset(
    {
        "explaind_store.examples.modadd:make_model",
        "explaind_store.examples.modadd:ModAddTransformer",
        "explaind_store.examples.digits_cnn:make_model",
        "explaind_store.examples.tiny:make_mlp",
        "explaind_store.examples.tiny:make_tiny_transformer",
        "explaind_store.examples.tiny:make_byte_lm",
        # builds a built-in transformers architecture from JSON config values only (no remote code, no weights)
        "explaind_store.integrations.hf:causal_lm_from_config",
    }
)
# The built-in dataset factories (data specs), trusted by exact name; a model factory is never a dataset factory
# and the other way round.
BUILTIN_DATASET_FACTORIES = frozenset(
    {
        # byte-level sequences cut from the standard library's own .py files (reads files, runs nothing)
        "explaind_store.examples.corpus:stdlib_bytes",
    }
)
FACTORY_MAX_LEN = 256
# our own packages: their factories are trusted by name above; trusting them wholesale would expose the CLI and
# training entry points
_OWN_PACKAGES = ("explaind_store", "engine")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*", re.ASCII)
_FACTORY_RE = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT})", re.ASCII)

LOSS_KINDS = ("cross_entropy", "nll", "mse", "causal_lm")
# labels equal to this are not predicted (padding, prompts): torch's and Hugging Face's ignore_index
IGNORE_INDEX = -100
CAUSAL_LM_COUNTS = ("predicted", "labels")


class UntrustedFactoryError(PermissionError):
    """The store names a model or dataset factory the user has not trusted (nothing was imported)."""


class FactorySpecError(ValueError):
    """A model or data spec is malformed: not ``"module:name"`` with a JSON object of kwargs (a damaged or hostile
    store)."""


# what each kind of factory is called in messages, the store attribute naming it, and how the caller overrides it
_KINDS = {
    "model": ("model factory", "model_spec", "pass model_factory= to open_run()"),
    "dataset": ("dataset factory", "data spec", "pass the data: open_run(path, data={split: (inputs, targets)})"),
}


def safe_text(value: Any, limit: int = 80) -> str:
    """A store string made safe to print: ASCII escapes (no terminal control codes), cut to ``limit`` characters."""
    text = ascii(value if not isinstance(value, str) else value[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "...'"


def _named_spec(factory: str | Callable[..., Any], kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    what = _KINDS[kind][0]
    if callable(factory):
        qualname = getattr(factory, "__qualname__", "")
        if not isinstance(qualname, str) or "." in qualname or "<" in qualname:
            raise FactorySpecError(
                f"{what} {qualname!r} is not defined at the top level of its module (a nested function, "
                "method, lambda or local class cannot be named in a store). Define it as a module-level function "
                + ("or nn.Module subclass " if kind == "model" else "")
                + "and pass that."
            )
        name = f"{factory.__module__}:{qualname}"
    else:
        name = factory
    parse_factory(name, kind)
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise TypeError(f"{_KINDS[kind][1]} kwargs must be JSON-serialisable (they are stored as JSON): {exc}") from None
    return {"factory": name, "kwargs": dict(kwargs)}


def model_spec(factory: str | Callable[..., nn.Module], **kwargs: Any) -> dict[str, Any]:
    """Build a model spec from a top-level function or class (or its ``"module:name"``) and JSON kwargs."""
    return _named_spec(factory, "model", kwargs)


def data_spec(factory: str | Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """Build a data spec (a split recorded by reference, ``Recorder(..., data_specs={"train": spec})``) from a
    top-level function (or its ``"module:name"``) returning ``(inputs, targets)``, and JSON kwargs."""
    return _named_spec(factory, "dataset", kwargs)


def parse_factory(name: Any, kind: str = "model") -> tuple[str, str]:
    """Split ``"module:name"`` after checking its form (imports nothing); raises :class:`FactorySpecError`.

    ``kind`` (``"model"`` or ``"dataset"``) only words the messages."""
    what, attr, override = _KINDS[kind]
    if not isinstance(name, str):
        raise FactorySpecError(
            f"the {what} must be a string 'package.module:function', got {type(name).__name__} "
            f"{safe_text(name)}; the store's {attr} is damaged or was not written by explaind-store"
        )
    match = _FACTORY_RE.fullmatch(name) if len(name) <= FACTORY_MAX_LEN else None
    if match is None or any(part.startswith("__") for part in match.group(1).split(".")) or match.group(2)[0] == "_":
        raise FactorySpecError(
            f"{what} {safe_text(name)} is not of the form 'package.module:function': a dotted module path and "
            f"one public name (ASCII identifiers, no attribute chain after the colon, no leading underscore, at "
            f"most {FACTORY_MAX_LEN} characters). The store's {attr} is damaged or hostile; if you know the "
            f"{kind}, {override}."
        )
    return match.group(1), match.group(2)


@functools.lru_cache(maxsize=1)
def _installed_top_level() -> frozenset[str]:
    from importlib.metadata import packages_distributions

    return frozenset(packages_distributions())


def trust_entry_problem(module: str) -> str | None:
    """Why ``module`` must not be trusted wholesale (None when it may be): not a dotted identifier, the standard
    library, explaind-store itself, or a whole installed package such as ``torch``."""
    if not _MODULE_RE.fullmatch(module) or len(module) > FACTORY_MAX_LEN:
        return "it is not a dotted module path of ASCII identifiers"
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        return "it is part of the Python standard library, whose functions can run commands or touch files"
    if top in _OWN_PACKAGES:
        return "explaind-store's own factories are trusted by name already, and its other functions write stores"
    if module == top and top in _installed_top_level():
        return "it is a whole installed package; trust only the module of your own project that defines the model"
    return None


def trusted_modules() -> list[str]:
    """Modules whose public factories may be imported: ``$EXPLAIND_TRUSTED_MODULES`` (checked entries).

    The built-in example factories are trusted by exact name (:data:`BUILTIN_FACTORIES`) on top of these.
    """
    extra = [m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip()]
    for entry in extra:
        why = trust_entry_problem(entry)
        if why is not None:
            raise UntrustedFactoryError(
                f"{TRUSTED_ENV} lists {safe_text(entry)}, which cannot be trusted: {why}. List only the modules of "
                f"your own project that define model factories (e.g. {TRUSTED_ENV}=mypkg.models)."
            )
    return extra


def _under(module: str, roots: list[str]) -> bool:
    return any(module == t or module.startswith(t + ".") for t in roots)


def _builtins(kind: str) -> frozenset[str]:
    return BUILTIN_FACTORIES if kind == "model" else BUILTIN_DATASET_FACTORIES


def is_trusted(name: str, kind: str = "model") -> bool:
    """Whether the (well-formed) ``kind`` factory ``"module:name"`` is trusted; imports nothing."""
    module, _ = parse_factory(name, kind)
    return name in _builtins(kind) or _under(module, trusted_modules())


def _untrusted_message(name: str, module: str, kind: str) -> str:
    what, attr, override = _KINDS[kind]
    head = (
        f"the store asks to build its {'model' if kind == 'model' else 'data'} with {safe_text(name)}, but that "
        f"{what} is not trusted, so nothing was imported (a store may come from someone else). "
    )
    why = trust_entry_problem(module)
    if why is not None:
        return head + (
            f"Its module cannot be trusted ({why}), so nothing is ever built from it: this store's {attr} is "
            f"damaged or hostile. If you know the {kind}, {override} (Python)."
        )
    mine = "pass model_factory=<your function> to open_run()" if kind == "model" else override
    return head + (
        f"If you wrote this {what}, {mine}, or add the module of your own "
        f"project that defines it to the {TRUSTED_ENV} environment variable ({TRUSTED_ENV}={module}; CLI runs and "
        "Dask workers inherit it)."
    )


def load_trusted(name: Any, kind: str = "model") -> Callable[..., Any]:
    """The trusted ``kind`` (``"model"`` or ``"dataset"``) factory ``name`` names, imported; raises
    :class:`UntrustedFactoryError` or :class:`FactorySpecError` (before importing anything when the name or its
    module is not acceptable). A dataset factory must be a plain function; a model factory may also be an
    ``nn.Module`` subclass. Each kind trusts only its own built-ins by name."""
    what = _KINDS[kind][0]
    module, attr = parse_factory(name, kind)
    roots = trusted_modules()
    builtin = name in _builtins(kind)
    if not builtin and not _under(module, roots):
        raise UntrustedFactoryError(_untrusted_message(name, module, kind))
    mod = importlib.import_module(module)
    # the module's own namespace: no module __getattr__, no submodule imports
    obj = vars(mod).get(attr)
    defined_in = getattr(obj, "__module__", None)
    is_factory = inspect.isfunction(obj) or (
        kind == "model" and inspect.isclass(obj) and issubclass(obj, nn.Module)
    )
    trusted_origin = isinstance(defined_in, str) and (
        _under(defined_in, roots) or (builtin and defined_in == module)
    )
    if not is_factory or not trusted_origin or getattr(obj, "__qualname__", None) != attr:
        found = "missing" if obj is None else type(obj).__name__
        shape = "a function or nn.Module subclass" if kind == "model" else "a plain function"
        raise UntrustedFactoryError(
            f"{safe_text(name)} is not a {what} defined in a trusted module (found: {found}"
            + (f" from module {safe_text(defined_in)}" if isinstance(defined_in, str) else "")
            + f"). A {what} must be {shape} defined at the top level of the trusted module "
            "under that name; names imported into it from elsewhere (modules, builtins, library functions) are "
            "refused. Nothing was called."
        )
    return obj


def load_factory(name: Any) -> Callable[..., nn.Module]:
    """The trusted model factory ``name`` names, imported (see :func:`load_trusted`)."""
    return load_trusted(name, "model")


def _spec_kwargs(spec: dict[str, Any], kind: str = "model") -> dict[str, Any]:
    attr = _KINDS[kind][1]
    kwargs = spec.get("kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise FactorySpecError(
            f"the {attr} kwargs must be a JSON object with string keys, got {type(kwargs).__name__} "
            f"{safe_text(kwargs)}; the store's {attr} is damaged or hostile"
        )
    return dict(kwargs)


def resolve_factory(spec: Any, model_factory: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Instantiate the model a spec describes, refusing untrusted factories (see the module docstring).

    ``model_factory`` given by the caller always wins (the caller vouches for it) and is called with the spec's
    kwargs.
    """
    if not isinstance(spec, dict):
        raise FactorySpecError(
            f"the store's model_spec must be a JSON object {{'factory': ..., 'kwargs': {{...}}}}, got "
            f"{type(spec).__name__}; pass model_factory= to open_run() if you know the model"
        )
    kwargs = _spec_kwargs(spec)
    if model_factory is not None:
        factory: Callable[..., Any] = model_factory
        name = getattr(model_factory, "__qualname__", "model_factory")
    else:
        name = spec.get("factory")
        if not name:
            raise FactorySpecError(
                "this store has no model factory in its model_spec; pass model_factory= to open_run()"
            )
        factory = load_factory(name)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {safe_text(name)} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def data_factory(spec: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The trusted dataset factory a data spec names and its kwargs, refusing untrusted factories exactly like
    model factories (see the module docstring); nothing is called."""
    if not isinstance(spec, dict):
        raise FactorySpecError(
            f"a data spec must be a JSON object {{'factory': ..., 'kwargs': {{...}}}}, got {type(spec).__name__}; "
            f"the store is damaged or hostile. If you know the data, {_KINDS['dataset'][2]}"
        )
    kwargs = _spec_kwargs(spec, "dataset")
    return load_trusted(spec.get("factory"), "dataset"), kwargs


def resolve_data(spec: Any) -> tuple[Any, Any]:
    """Build the ``(inputs, targets)`` a data spec describes through its trusted factory (:func:`data_factory`);
    the caller checks the result against the recorded fingerprint."""
    factory, kwargs = data_factory(spec)
    out = factory(**kwargs)
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(
            f"dataset factory {safe_text(spec.get('factory'))} returned {type(out).__name__}, not (inputs, targets)"
        )
    return out


def loss_spec(kind: str = "cross_entropy", reduction: str = "mean", count: str | None = None) -> dict[str, str]:
    """Spec of the training loss: ``cross_entropy`` on logits, ``nll`` on log-probs, ``mse`` (mean over the
    batch's samples), or ``causal_lm``: next-token cross-entropy on logits ``(N, T, V)`` against labels ``(N, T)``
    shifted by one (logits at position t predict label t+1, as Hugging Face causal LMs do), labels equal to
    ``IGNORE_INDEX`` (-100) skipped, mean over the tokens of the whole batch (of every micro-batch of
    the update), which is what ``transformers.Trainer`` optimises with gradient accumulation.

    ``count`` (``causal_lm`` only) is the divisor: ``"predicted"`` (default), the tokens that are predicted
    (``labels[:, 1:] != -100``), the exact token mean; or ``"labels"``, every label that is not -100 including
    position 0, which is never predicted. The Trainer of transformers 5.23 divides by the latter for models whose
    class name it does not recognise as a causal LM (``GPT2LMHeadModel``: ``model.loss_type`` is None)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r} is not supported; use one of {', '.join(LOSS_KINDS)}")
    if reduction != "mean":
        raise ValueError(
            f"loss reduction {reduction!r} is not supported: the decomposition assumes the batch-mean loss "
            "(reduction='mean'), which is what the optimizer's gradient g_s is"
        )
    if kind != "causal_lm":
        if count is not None:
            raise ValueError(f"count= applies to the causal_lm loss only, not {kind!r}")
        return {"kind": kind, "reduction": reduction}
    if count is None:
        count = "predicted"
    if count not in CAUSAL_LM_COUNTS:
        raise ValueError(f"causal_lm count {count!r} is not supported; use one of {', '.join(CAUSAL_LM_COUNTS)}")
    return {"kind": kind, "reduction": reduction, "count": count}


def normalize_loss(loss: str | dict[str, str] | None) -> dict[str, str]:
    if loss is None:
        return loss_spec()
    if isinstance(loss, str):
        return loss_spec(loss)
    return loss_spec(loss.get("kind", "cross_entropy"), loss.get("reduction", "mean"), loss.get("count"))


def token_counts(spec: dict[str, str], targets: torch.Tensor) -> torch.Tensor:
    """``causal_lm``: each sample's share of the loss's divisor, shape ``(N,)`` (see :func:`loss_spec`)."""
    labels = targets if spec.get("count") == "labels" else targets[:, 1:]
    return (labels != IGNORE_INDEX).sum(dim=1)


def _token_losses(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: per-token losses ``(N, T-1)`` (0 where ignored) and the mask of predicted tokens."""
    logits = outputs[:, :-1, :]
    labels = targets[:, 1:]
    keep = labels != IGNORE_INDEX
    tok = _class_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).reshape(labels.shape)
    return tok, keep


def _picked_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.nll_loss(logp, targets, reduction="none")`` for log-probs ``(N, C)`` and class labels ``(N,)``, 0 where
    a label is ``IGNORE_INDEX``: the very ops of torch's own decomposition of ``nll_loss_forward``, which is what
    runs under ``vmap`` (and the same numbers as its kernel elsewhere, forward and backward). Written out because
    that decomposition's ``torch._check`` imports ``torch.fx.experimental.symbolic_shapes`` and with it ``sympy``
    on first use, a large part of a fresh process's fixed cost."""
    keep = targets != IGNORE_INDEX
    picked = -torch.gather(logp, 1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1)
    return torch.where(keep, picked, 0)


def _is_class_batch(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Rows of class scores ``(N, C)`` against class labels ``(N,)`` (not class probabilities, not ``(N, C, d..)``)."""
    return outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point()


def _class_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(outputs, targets, reduction="none")`` (``ignore_index=IGNORE_INDEX``), bit for bit, without
    importing ``sympy`` under ``vmap`` for the usual case of logits ``(N, C)`` and class labels ``(N,)``
    (:func:`_picked_nll` on ``log_softmax``, as torch's ``cross_entropy_loss`` composes it); any other input
    (class probabilities, extra dimensions) goes to ``F.cross_entropy`` itself."""
    if not _is_class_batch(outputs, targets):
        return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return _picked_nll(F.log_softmax(outputs, 1), targets)


def loss_weights(spec: dict[str, str], targets: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``w`` (shape ``(N,)``, float64) with ``batch_loss = mean(w * per_sample_loss)`` for
    the batch ``targets`` holds: all ones for the per-sample kinds; for ``causal_lm`` each sample's number of
    tokens ``n_k`` (:func:`token_counts`) over the batch's mean ``sum(n) / N`` (a sample with none weighs 0)."""
    n = targets.shape[0]
    if spec["kind"] != "causal_lm":
        return torch.ones(n, dtype=torch.float64)
    counts = token_counts(spec, targets).to(torch.float64)
    total = counts.sum()
    return counts * n / total if total > 0 else torch.zeros(n, dtype=torch.float64)


def per_sample_loss(spec: dict[str, str], outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of each sample (no reduction), shape ``(N,)``; the training loss is ``mean(loss_weights * it)``
    (its plain mean for every kind but ``causal_lm``, whose per-sample loss is the sample's token-loss sum over its
    own :func:`token_counts`)."""
    kind = spec["kind"]
    if kind == "cross_entropy":
        return _class_cross_entropy(outputs, targets)
    if kind == "nll":
        if not _is_class_batch(outputs, targets):
            return F.nll_loss(outputs, targets, ignore_index=IGNORE_INDEX, reduction="none")
        return _picked_nll(outputs, targets)
    if kind == "mse":
        diff = (outputs - targets.to(outputs.dtype)) ** 2
        return diff.reshape(diff.shape[0], -1).mean(dim=1)
    if kind == "causal_lm":
        tok, _ = _token_losses(outputs, targets)
        return tok.sum(dim=1) / token_counts(spec, targets).clamp(min=1).to(tok.dtype)
    raise ValueError(f"unknown loss kind {kind!r}")


def batch_loss(spec: dict[str, str], outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch-mean training loss, as the optimizer saw it (for ``causal_lm``: sum over the batch's predicted
    tokens / the batch's :func:`token_counts`)."""
    if spec["kind"] == "causal_lm":
        tok, _ = _token_losses(outputs, targets)
        return tok.sum() / token_counts(spec, targets).sum().clamp(min=1).to(tok.dtype)
    return per_sample_loss(spec, outputs, targets).mean()
