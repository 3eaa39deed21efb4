"""Sequential in-process driver: pass 1 over every chunk, the carries, pass 2 over every chunk, then the Dataset.

``attribute_local`` is the reference the distributed (Dask) layer must reproduce to 1e-12: same chunk functions,
no scheduler. See :mod:`engine.chunks` for the algorithm and :mod:`engine.result` for the result schema.
"""

from __future__ import annotations

import math

import xarray as xr

from engine.chunks import (
    LIGHT_BYTES,
    Problem,
    carries,
    context,
    pass1,
    pass2,
    result_meta,
)
from engine.result import assemble, combine
from engine.settings import env_int
from explaind_store.trajectory import Trajectory

# keep_u=None keeps the u_s of as many chunks (L x R x P float64 each) as fit in this many bytes and recomputes the
# path integrals of the others in pass 2 (twice the quadrature work there, O(R x P) memory). The window's first
# chunk needs no kept u_s (its pass 1 skips the path integrals, engine.chunks.pass1), so keeping only pays for later
# chunks: a small budget keeps memory flat in the number of updates.
KEEP_U_BYTES = env_int("EXPLAIND_KEEP_U_BYTES", 256 << 20, "bytes of path integrals pass 1 may keep for pass 2",
                       minimum=0)


def chunk_bounds(window: tuple[int, int], chunk_updates: int) -> list[tuple[int, int]]:
    """Split the window ``(a, b]`` into consecutive chunks ``(lo, hi]`` of at most ``chunk_updates`` updates."""
    if int(chunk_updates) < 1:
        raise ValueError(f"chunk_updates must be >= 1, got {chunk_updates}")
    a, b = window
    return [(lo, min(b, lo + int(chunk_updates))) for lo in range(a, b, int(chunk_updates))]


def attribute_local(
    traj: Trajectory, problem: Problem, chunk_updates: int | None = None, *, keep_u: bool | None = None
) -> xr.Dataset:
    """Decompose ``F(theta_b) - F(theta_a)`` sequentially in this process; returns the result Dataset.

    ``chunk_updates``: updates per chunk; None (default) takes the whole window as one chunk when its rebuilt
    momentum history fits ``engine.chunks.LIGHT_BYTES`` (then every update's path integral is computed once and
    nothing ``L x R x P`` is kept), else the largest chunks that do. ``keep_u``: True keeps every chunk's ``u_s``
    from pass 1 for pass 2, False recomputes the path integrals of later chunks in pass 2, None (default) keeps as
    many chunks as fit in ``KEEP_U_BYTES`` ($EXPLAIND_KEEP_U_BYTES, 256 MiB). Results agree to float64 rounding
    whichever is chosen.
    """
    ctx = context(traj, problem)
    n_params = sum(math.prod(s) for s in ctx.shapes.values())
    if chunk_updates is None:
        parts = 1 if ctx.terms.decoupled else 2
        chunk_updates = max(1, LIGHT_BYTES // max(1, n_params * parts * 8))
    bounds = chunk_bounds(ctx.window, chunk_updates)
    keep = []
    budget = KEEP_U_BYTES
    for lo, hi in bounds:
        need = (hi - lo) * (ctx.R + 1) * n_params * 8
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
