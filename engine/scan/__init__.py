"""The scan: ``pass1`` -> ``carries`` -> ``pass2`` per chunk ``(lo, hi]`` of updates (or the reverse chain), in
one process, on tensors; it knows nothing of dask (that is :mod:`engine.cluster`).

Notation and formulas: docs/math.md and :mod:`engine.ops.optim_terms`. For the window ``(a, b]`` and every update
``s``: ``phi_s`` is the path integral of the query Jacobian over the stored segment ``theta_{s-1} -> theta_s``,
``u_s = k_s * phi_s``, ``U_i = sum_{i<=s<=b} beta^(s-i) u_s`` (per tensor, its own ``beta``),
``V_i = e*u_i + h*omega_i*U_i``, and

    data score of sample k in B_i     = -gs_i / |B_i| * <V_i, grad l_k(theta_{i-1})>      (origin update i)
    coupled decay (Adam, SGD) of i    = -<V_i, lam_i theta_{i-1}>                          (origin update i)
    decoupled decay (AdamW) of s      = -a_s lam_s <phi_s, theta_{s-1}>                    (update s)
    carried momentum                  = -sum_s h beta^(s-a) <u_s, S_a>                     (no step)

Scan structure (a linear recurrence, parallel over chunks):

- :func:`pass1` (independent per chunk) walks forward over its updates: path integrals, ``u_s``, the chunk's
  decayed total ``sum_{lo<s<=hi} beta^(s-lo-1) u_s`` (= ``U_{lo+1}`` without later chunks), the batch-mean
  gradients and the chunk's forward momentum totals (the optimizer recursion rebuilt in float64, started from 0),
  and the per-update scalars (``F`` values, quadrature residuals, node counts, the in-chunk part of each
  update's rebuilt movement). With ``keep_u=True`` it also keeps ``u_s`` and ``g_s`` for pass 2.
- :func:`carries` (cheap, sequential) turns the totals into, per chunk, ``U_{hi+1}`` (reverse scan: the
  accumulator entering from the right) and ``A_lo`` (forward scan: the rebuilt momentum entering from the left),
  and attaches the window-start momentum ``S_a`` and the chunk's per-update scalars.
- :func:`pass2` (independent per chunk) walks backward from ``hi`` to ``lo+1`` building ``U_i`` from the carry,
  takes the per-sample gradients of ``B_i`` at ``theta_{i-1}`` once for all query rows, and writes the scores.
  It uses the kept ``u_s`` of ``p1`` if given, else recomputes the path integrals.

The **reverse chain** (the default schedule, :mod:`engine.cluster.graph`) uses the same functions without the second path
integral: pass 1 with ``light=True`` only rebuilds the momentum (``momentum=False`` for the last chunk, whose totals
nobody reads), and pass 2 runs from the last chunk back to the first, taking ``u_in`` from the next chunk's
``u_out`` (``U_{lo+1}``) instead of the carry; its forward momentum carry is folded chunk by chunk
(:func:`~engine.scan.carries.momentum_after`, :func:`~engine.scan.carries.chain_carry`), so no step needs every
chunk's totals at once; a one-chunk window needs only :func:`solo_carry` and one pass 2.

Everything is float64 and accumulated in place; memory per chunk is O(R x P) (R = query rows) plus the result
arrays, never samples x parameters, never the number of updates (except ``keep_u``: ``L x R x P`` per chunk).

Rooms: :mod:`~engine.scan.problem` (what to explain, the per-process float64 context), :mod:`~engine.scan.forward`,
:mod:`~engine.scan.carries`, :mod:`~engine.scan.backward`, :mod:`~engine.scan.pipeline` (pass 2 over two threads),
:mod:`~engine.scan.reference` (the whole scan in process: ``attribute_local``), :mod:`~engine.scan.heap` (glibc).
"""

from __future__ import annotations

from engine.scan.problem import Context, Problem, context, result_meta, rule_string  # isort: skip
from engine.scan.forward import Pass1, StepStats, pass1  # isort: skip
from engine.scan.carries import Carry, carries, solo_carry, window_start_state  # isort: skip
from engine.scan.backward import pass2  # isort: skip
from engine.scan.reference import attribute_local  # isort: skip

__all__ = [
    "Carry",
    "Context",
    "Pass1",
    "Problem",
    "StepStats",
    "attribute_local",
    "carries",
    "context",
    "pass1",
    "pass2",
    "result_meta",
    "rule_string",
    "solo_carry",
    "window_start_state",
]
