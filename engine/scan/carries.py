"""The carries between chunks (cheap, sequential): per chunk, the reverse accumulator entering from the right
(``U_{hi+1}``), the rebuilt momentum entering from the left (``A_lo``), the window-start momentum ``S_a`` and the
chunk's per-update scalars; :func:`solo_carry` for a window taken as one chunk, :func:`momentum_after` (one step of
the forward scan, for carries folded chunk by chunk) and :func:`chain_carry` (a reverse-chain chunk's carry)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from engine.ops.optim_terms import OptimTerms
from engine.scan.forward import Pass1, StepStats
from engine.scan.problem import F64, Context, Problem, context
from explaind_store.trajectory import Trajectory


# ==============================================================================================================
# Carries
# ==============================================================================================================
@dataclass
class Carry:
    """What chunk ``(lo, hi]`` needs from the others (picklable)."""

    lo: int
    hi: int
    u_in: dict[str, torch.Tensor]  # U_{hi+1}: reverse accumulator of the updates after hi (zeros for the last chunk)
    a_in: dict[str, dict[str, torch.Tensor]]  # rebuilt momentum at lo from updates a+1..lo (zeros for the first)
    s_a: dict[str, torch.Tensor] | None  # optimizer momentum stored at the window start (None: zero / none)
    stats: StepStats  # this chunk's per-update scalars from pass 1
    # u_in was made for this carry alone (zeros, or read back from a scratch store): pass 2 accumulates into it in
    # place instead of into a copy, one rows x P array less (never for a value that may be handed to a task again)
    u_owned: bool = False


def window_start_state(traj: Trajectory, problem: Problem, ctx: Context | None = None) -> dict[str, torch.Tensor] | None:
    """``S_a``: the stored ``exp_avg`` (Adam/AdamW) or ``momentum_buffer`` (SGD) at the window start, float64.

    Nonzero for windows starting after update 0 and for recordings started from a warm optimizer. None when the
    optimizer keeps no momentum (plain SGD) or the stored state is all zeros (a fresh optimizer at ``a = 0``).
    """
    terms = ctx.terms if ctx is not None else OptimTerms(traj.optimizer_spec, list(traj.tensor_names))
    a, _ = ctx.window if ctx is not None else problem.resolve_window(int(traj.committed_updates))
    name = terms.state_name
    if name is None:
        return None
    block = traj.block(a, a + 1)
    state = {n: block.state[name][n][0].to(device=problem.device, dtype=F64) for n in terms.names}
    if all(not bool(v.any()) for v in state.values()):
        return None
    return state


def solo_carry(traj: Trajectory, problem: Problem, ctx: Context | None = None) -> Carry:
    """The carry of a window taken as one chunk (no pass 1, no carries): nothing flows in from other chunks, and
    :func:`pass2` computes every per-update scalar itself (``stats.deferred``)."""
    ctx = ctx or context(traj, problem)
    lo, hi = ctx.window
    stats = StepStats.empty(ctx.R, hi - lo, len(ctx.names), ctx.device)
    stats.deferred = True
    u_in = {n: torch.zeros((ctx.R, *ctx.shapes[n]), dtype=F64, device=ctx.device) for n in ctx.names}
    return Carry(lo, hi, u_in, {}, window_start_state(traj, problem, ctx), stats, u_owned=True)


def momentum_after(
    terms: OptimTerms, a_in: dict[str, dict[str, torch.Tensor]] | None, p1: Pass1
) -> dict[str, dict[str, torch.Tensor]]:
    """One step of the forward scan: the rebuilt momentum entering the chunk after ``p1``'s,
    ``A_in[c+1] = beta^L[c] * A_in[c] + A_tot[c]`` (``a_in`` None: zero, the window's first chunk)."""
    if a_in is None:
        a_in = {part: {k: torch.zeros_like(v) for k, v in d.items()} for part, d in p1.a_total.items()}
    L = p1.hi - p1.lo
    return {part: {k: a_in[part][k] * terms.terms[k].beta ** L + p1.a_total[part][k] for k in terms.names}
            for part in a_in}


def accumulator_before(
    terms: OptimTerms, u_in: dict[str, torch.Tensor], p1: Pass1
) -> dict[str, torch.Tensor]:
    """One step of the reverse scan: the accumulator entering the chunk before ``p1``'s from the right,
    ``U_in[c-1] = total[c] + beta^L[c] * U_in[c]`` (``u_in``: ``U_in[c]``, zeros for the window's last chunk)."""
    L = p1.hi - p1.lo
    return {k: p1.u_total[k] + u_in[k] * terms.terms[k].beta ** L for k in terms.names}


def chain_carry(
    ctx: Context, lo: int, hi: int, a_in: dict[str, dict[str, torch.Tensor]] | None,
    s_a: dict[str, torch.Tensor] | None, *, last: bool,
) -> Carry:
    """The carry of chunk ``(lo, hi]`` in the reverse chain, from its incoming momentum ``a_in`` (a fold of
    :func:`momentum_after`; None for the window's first chunk) and ``S_a``: the chunk's pass 2 computes its own
    per-update scalars (``stats.deferred``) and takes its accumulator from the next chunk's pass 2, so only the
    window's ``last`` chunk needs ``U_{hi+1}`` (zeros) here."""
    stats = StepStats.empty(ctx.R, hi - lo, len(ctx.names), ctx.device)
    stats.deferred = True
    u_in = {n: torch.zeros((ctx.R, *ctx.shapes[n]), dtype=F64) for n in ctx.names} if last else {}
    return Carry(lo, hi, u_in, a_in or {}, s_a, stats, u_owned=True)


def carries(traj: Trajectory, problem: Problem, pass1s: list[Pass1]) -> list[Carry]:
    """Sequential scans over the chunk totals (cheap: O(n_chunks x R x P) additions).

    ``pass1s`` must tile the window in order (pass :meth:`Pass1.summary` to avoid shipping kept ``u``). Reverse:
    ``U_in[c] = total[c+1] + beta^L[c+1] * U_in[c+1]``; forward: ``A_in[c+1] = beta^L[c] * A_in[c] + A_tot[c]``.
    """
    if not pass1s:
        raise ValueError("carries() needs the pass-1 results of at least one chunk")
    terms = OptimTerms(traj.optimizer_spec, list(traj.tensor_names))
    window = problem.resolve_window(int(traj.committed_updates))
    p1s = sorted(pass1s, key=lambda p: p.lo)
    if p1s[0].lo != window[0] or p1s[-1].hi != window[1] or any(x.hi != y.lo for x, y in itertools.pairwise(p1s)):
        raise ValueError(
            f"the pass-1 chunks {[(p.lo, p.hi) for p in p1s]} do not tile the window ({window[0]}, {window[1]}]"
        )
    s_a = window_start_state(traj, problem)
    n = len(p1s)
    u_in: list[dict[str, torch.Tensor]] = [{}] * n
    cur = {k: torch.zeros_like(v) for k, v in p1s[-1].u_total.items()}
    for c in range(n - 1, -1, -1):
        u_in[c] = cur
        if c > 0:
            cur = accumulator_before(terms, cur, p1s[c])
    a_in: list[dict[str, dict[str, torch.Tensor]]] = []
    acc = {part: {k: torch.zeros_like(v) for k, v in d.items()} for part, d in p1s[0].a_total.items()}
    for p in p1s:
        a_in.append(acc)
        acc = momentum_after(terms, acc, p)
    return [Carry(p.lo, p.hi, u_in[c], a_in[c], s_a, p.stats) for c, p in enumerate(p1s)]


__all__ = ["Carry", "accumulator_before", "carries", "chain_carry", "momentum_after", "solo_carry", "window_start_state"]
