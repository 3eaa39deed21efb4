"""The ExPLAIND attribution engine: exact decompositions of predictions over a recorded training trajectory.

    import engine
    ds = engine.attribute("run.zarr", queries="val[:10]", by=("sample", "step"), client="sync")
    best = engine.top_k(ds, 10)

Layers, each importing only those above it in this list (and the store, :mod:`explaind_store`, never the reverse):

- ``engine.settings``: the one table of ``EXPLAIND_*`` settings (read when used; ``settings.override`` for tests).
- ``engine.result``: the result schema (xarray Dataset layout, combining chunk results).
- ``engine.ops``: the per-update math on tensors (quadrature, kinks, optimizer terms, per-sample products, output
  modes).
- ``engine.plan``: planning rules (chunk bounds, query groups, reverse chain or parallel chunks, memory budgets).
- ``engine.scan``: the scan in one process (problem, pass 1, carries, pass 2, the two-thread pipeline, and
  ``attribute_local``, the in-process reference the cluster layer reproduces).
- ``engine.cluster``: the scan on Dask (graph, worker jobs and caches, runners and the LocalCluster, hand-off).
- ``engine.api`` / ``engine.topk``: ``attribute()`` (validate, plan, build, compute) and ``top_k()``.

The application (``explaind`` command line, ``explaind demo``, the HTML report) lives in :mod:`explaind_app`.
The public names are imported on first use, so ``import engine`` does not pay for torch, dask and xarray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "attribute": "engine.api",
    "InexactRecordError": "engine.guard",
    "InexactWarning": "engine.guard",
    "ResultTooLargeError": "engine.api",
    "QueryMemoryWarning": "engine.api",
    "parse_queries": "engine.api",
    "parse_steps": "engine.api",
    "Problem": "engine.scan.problem",
    "attribute_local": "engine.scan.reference",
    "QuadratureRule": "engine.ops.quadrature",
    "parse_rule": "engine.ops.quadrature",
    "next_token_targets": "engine.ops.output_modes",
    "finalize_attrs": "engine.result",
    "NonFiniteResultError": "engine.result",
    "close_local_client": "engine.cluster.runners",
    "get_runner": "engine.cluster.runners",
    "local_client": "engine.cluster.runners",
    "open_result": "engine.topk",
    "top_k": "engine.topk",
}

__all__ = [
    "InexactRecordError",
    "InexactWarning",
    "NonFiniteResultError",
    "Problem",
    "QuadratureRule",
    "QueryMemoryWarning",
    "ResultTooLargeError",
    "attribute",
    "attribute_local",
    "close_local_client",
    "finalize_attrs",
    "get_runner",
    "local_client",
    "next_token_targets",
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
