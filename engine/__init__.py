"""The ExPLAIND attribution engine: exact decompositions of predictions over a recorded training trajectory.

    import engine
    ds = engine.attribute("run.zarr", queries="val[:10]", by=("sample", "step"), client="sync")
    best = engine.top_k(ds, 10)

``attribute`` runs the chunked two-pass scan (``engine.chunks``) on Dask (``engine.graph``, ``engine.scheduler``);
``attribute_local`` is the in-process reference it reproduces.
"""

from engine.api import attribute, parse_queries, parse_steps
from engine.chunks import Problem
from engine.local import attribute_local
from engine.quadrature import QuadratureRule, parse_rule
from engine.result import finalize_attrs
from engine.scheduler import close_local_client, get_runner, local_client
from engine.topk import open_result, top_k

__all__ = [
    "Problem",
    "QuadratureRule",
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
