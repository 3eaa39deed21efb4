"""The in-process reference: pass 1 over every chunk, the carries, pass 2 over every chunk, then the Dataset.

``attribute_local`` is what the cluster layer (:mod:`engine.cluster`) must reproduce to 1e-12: the same chunk
functions, no scheduler. See :mod:`engine.scan` for the algorithm and :mod:`engine.result` for the result schema.
"""

from __future__ import annotations

import xarray as xr

from engine import plan, settings
from engine.result import assemble, combine
from engine.scan.backward import pass2
from engine.scan.carries import carries
from engine.scan.forward import pass1
from engine.scan.problem import Problem, context, result_meta
from explaind_store.trajectory import Trajectory


def attribute_local(
    traj: Trajectory, problem: Problem, chunk_updates: int | None = None, *, keep_u: bool | None = None
) -> xr.Dataset:
    """Decompose ``F(theta_b) - F(theta_a)`` sequentially in this process; returns the result Dataset.

    ``chunk_updates``: updates per chunk; None (default) takes the whole window as one chunk when its rebuilt
    momentum history fits the ``light_bytes`` setting (then every update's path integral is computed once and
    nothing ``L x R x P`` is kept), else the largest chunks that do. ``keep_u``: True keeps every chunk's ``u_s``
    from pass 1 for pass 2, False recomputes the path integrals of later chunks in pass 2, None (default) keeps as
    many chunks as fit in the ``keep_u_bytes`` setting (``EXPLAIND_KEEP_U_BYTES``; the window's first chunk needs
    none, its pass 1 skips the path integrals). Results agree to float64 rounding whichever is chosen.
    """
    ctx = context(traj, problem)
    if chunk_updates is None:
        chunk_updates = plan.light_chunk_updates(ctx.n_params, ctx.terms.kind)
    bounds = plan.chunk_bounds(ctx.window, chunk_updates)
    keep = []
    budget = settings.get("keep_u_bytes")
    for lo, hi in bounds:
        need = plan.kept_u_bytes(hi - lo, ctx.R + 1, ctx.n_params)  # u_s and g_s
        keep.append(bool(keep_u) if keep_u is not None else need <= budget)
        budget -= need if keep[-1] else 0
    p1s = [pass1(traj, problem, lo, hi, keep_u=k, ctx=ctx) for (lo, hi), k in zip(bounds, keep)]
    cs = carries(traj, problem, [p.summary() for p in p1s])
    results = []
    for i, ((lo, hi), c) in enumerate(zip(bounds, cs)):
        results.append(pass2(traj, problem, lo, hi, c, p1s[i], ctx=ctx))
        p1s[i] = None  # type: ignore[call-overload]  # free the kept u_s
    meta = result_meta(traj, problem, ctx)
    return assemble(problem, meta, combine(results, meta))


__all__ = ["attribute_local"]
