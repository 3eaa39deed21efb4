"""The ExPLAIND attribution engine: exact decompositions of predictions over a recorded training trajectory.

    import engine
    ds = engine.attribute("run.zarr", queries="val[:10]", by=("sample", "step"), client="sync")
    best = engine.top_k(ds, 10)

``attribute`` runs the chunked scan (``engine.chunks``; reverse chain or parallel chunks, per group of queries) on Dask
(``engine.graph``, ``engine.scheduler``);
``attribute_local`` is the in-process reference it reproduces.

The public names are imported on first use, so ``import engine.cli`` (done by every ``explaind`` command) does not
pay for torch, dask and xarray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "attribute": "engine.api",
    "InexactRecordError": "engine.guard",
    "InexactWarning": "engine.guard",
    "ResultTooLargeError": "engine.api",
    "parse_queries": "engine.api",
    "parse_steps": "engine.api",
    "Problem": "engine.chunks",
    "attribute_local": "engine.local",
    "QuadratureRule": "engine.quadrature",
    "parse_rule": "engine.quadrature",
    "finalize_attrs": "engine.result",
    "close_local_client": "engine.scheduler",
    "get_runner": "engine.scheduler",
    "local_client": "engine.scheduler",
    "open_result": "engine.topk",
    "top_k": "engine.topk",
}

__all__ = [
    "InexactRecordError",
    "InexactWarning",
    "Problem",
    "QuadratureRule",
    "ResultTooLargeError",
    "attribute",
    "attribute_local",
    "close_local_client",
    "finalize_attrs",
    "get_runner",
    "local_client",
    "open_result",
    "parse_queries",
    "parse_rule",
    "parse_steps",
    "top_k",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
