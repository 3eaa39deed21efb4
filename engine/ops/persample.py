"""Per-sample dot products ``<V[r], grad l_k(theta)>`` for every query row ``r`` and training sample ``k`` of a batch.

Two ways, same numbers (float64, agree to ~1e-15):

- ``"grad"``: per-sample gradients by ``vmap(grad(loss_k))`` in chunks of ``sample_chunk`` samples, then one matmul
  per tensor against all query rows. Cost ~ |B| backward passes + R x |B| x P flops; memory ``sample_chunk x P``.
  Gives the per-tensor split for free, and the batch-mean gradient as a by-product.
- ``"jvp"``: one forward-mode derivative of the vector of per-sample losses along ``V[r]`` per query row (vmapped
  over rows). Cost ~ R x |B| forward passes; cheaper only when R (rows, x tensors for a per-tensor split) is tiny.
  **Not thread-safe** (torch forward-mode AD): run it in one thread per process.

The training loss of sample ``k`` is ``per_sample_loss(loss_spec, model(x_k), y_k)`` in the model's eval mode; the
optimizer's gradient is the batch mean of these (``reduction="mean"``), each weighted by ``loss_weights`` of the
whole batch: 1 for per-sample losses, a sequence's token count over the batch's mean for the token-level
``causal_lm`` loss (whose batch loss is the mean over all the batch's tokens). Every per-sample gradient here is of
``w_k l_k``, so dot products and batch means need no further weighting.

Runs with dropout: ``masks`` (the update's dropout masks, each ``(|B|, ...)`` with the batch first, from
:func:`explaind_store.dropout.draw_masks`) are applied as constants at the model's dropout calls, sample ``k``
getting row ``k`` of each (``None``: no dropout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from engine.ops.forward_mode import jvp
from explaind_store.dropout import masks_applied
from explaind_store.specs import loss_weights, per_sample_loss

METHODS = ("auto", "grad", "jvp")

AUTO_JVP_ROWS = 8

# jvp: at most this many (row x sample) forward-mode evaluations at once (activation memory).
JVP_BATCH = 1 << 15


def choose_method(method: str, n_rows: int, batch_size: int, per_tensor: bool) -> str:
    """Resolve ``"auto"``: forward mode for a few query rows, per-sample gradients otherwise.

    ``grad`` costs one backward per sample plus writing the ``|B| x P`` per-sample gradients plus ``R x |B| x P``
    flops; ``jvp`` costs ``R`` forward-mode passes per sample (times the number of tensors for a per-tensor split).
    The batch size cancels out, so the choice depends on R: forward mode wins for a few rows, per-sample gradients
    for many, with the crossover near 8 rows on the benchmark transformer and later on wide MLPs (measurements:
    docs/benchmarks.md, "Measurements behind choices in the code"). So ``auto`` uses ``jvp`` for R <= 8 rows
    without a per-tensor split, else ``grad``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    if per_tensor or batch_size < 2:
        return "grad"
    return "jvp" if n_rows <= AUTO_JVP_ROWS else "grad"


def batch_weights(loss_spec: dict[str, str], y: torch.Tensor) -> torch.Tensor | None:
    """The per-sample weights of one update's whole batch ``y`` in its loss, or None when they are all 1."""
    if loss_spec.get("kind") != "causal_lm":
        return None
    return loss_weights(loss_spec, y).to(y.device)


Masks = list[torch.Tensor] | None


def _sample_loss_fn(model: nn.Module, loss_spec: dict[str, str]) -> Callable:
    def one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        with masks_applied(model, None if masks is None else [m.unsqueeze(0) for m in masks]):
            out = functional_call(model, params, (x.unsqueeze(0),))
        return per_sample_loss(loss_spec, out, y.unsqueeze(0)).sum()

    return one


def _batch_losses_fn(
    model: nn.Module, loss_spec: dict[str, str], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
    masks: Masks = None,
) -> Callable:
    def losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with masks_applied(model, masks):
            out = per_sample_loss(loss_spec, functional_call(model, params, (x,)), y)
        return out if w is None else out * w.to(out.dtype)

    return losses


def batch_mean_grad(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss_spec: dict[str, str],
    masks: Masks = None,
) -> dict[str, torch.Tensor]:
    """The optimizer's (unclipped) batch gradient ``g = mean_k w_k grad l_k(params)``, one reverse pass."""
    losses = _batch_losses_fn(model, loss_spec, x, y, batch_weights(loss_spec, y), masks)
    return grad(lambda p: losses(p).mean())(params)


def batch_mean_grads(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    loss_spec: dict[str, str],
    *,
    max_rows: int = 4096,
    masks: list[Masks] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """:func:`batch_mean_grad` of several updates at once: ``params`` holds each tensor stacked over the updates
    (``(L, *shape)``), ``xs`` / ``ys`` their batches (``masks``: each update's dropout masks). Batches of one size
    go through one ``vmap`` over updates in groups of at most ``max_rows`` samples (one call's fixed overhead shared
    by several updates; docs/benchmarks.md); otherwise (or with dropout masks) one update at a time."""
    n = len(xs)
    if n == 0:
        return []
    same = all(x.shape == xs[0].shape for x in xs) and all(y.shape == ys[0].shape for y in ys)
    dropped = masks is not None and any(m is not None for m in masks)
    if not same or n == 1 or batch_weights(loss_spec, ys[0]) is not None or dropped:  # per update (not vmapped)
        return [batch_mean_grad(model, {k: v[i] for k, v in params.items()}, xs[i], ys[i], loss_spec,
                                None if masks is None else masks[i]) for i in range(n)]

    def mean_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(loss_spec, functional_call(model, p, (x,)), y).mean()

    step = max(1, max_rows // max(1, len(xs[0])))
    g = vmap(grad(mean_loss))
    out: list[dict[str, torch.Tensor]] = []
    for i in range(0, n, step):
        sl = slice(i, min(n, i + step))
        got = g({k: v[sl] for k, v in params.items()}, torch.stack(xs[sl]), torch.stack(ys[sl]))
        out.extend({k: got[k][j] for k in got} for j in range(sl.stop - sl.start))
    return out


def _per_sample_grad(model: nn.Module, loss_spec: dict[str, str], masked: bool) -> Callable:
    """``(params, x, y, masks) -> name -> (B, *shape)``: the gradient of each sample's loss, vmapped over the batch."""
    return vmap(grad(_sample_loss_fn(model, loss_spec)), in_dims=(None, 0, 0, 0 if masked else None))


def _weighted(G: dict[str, torch.Tensor], w: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-sample gradients times their samples' loss weights ``w`` (in place; None: all weights are 1)."""
    if w is None:
        return G
    return {n: g.mul_(w.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1)))) for n, g in G.items()}


def sample_grads(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_spec: dict[str, str],
    *,
    sample_chunk: int = 512,
    masks: Masks = None,
) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Per-sample gradients ``grad l_k(params)`` of the batch, ``sample_chunk`` samples at a time: yields
    ``(slice of the batch, name -> (chunk, *shape))``. Lazy, so a consumer holds one chunk at a time."""
    psg = _per_sample_grad(model, loss_spec, masks is not None)
    B = x.shape[0]
    w = batch_weights(loss_spec, y)  # of the whole batch, before it is cut into chunks
    for c0 in range(0, B, sample_chunk):
        sl = slice(c0, min(B, c0 + sample_chunk))
        G = psg(params, x[sl], y[sl], None if masks is None else [m[sl] for m in masks])
        yield sl, _weighted(G, None if w is None else w[sl])


def sample_grads_many(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    loss_spec: dict[str, str],
) -> list[dict[str, torch.Tensor]]:
    """:func:`sample_grads` of several updates in one call: ``params`` holds each tensor stacked over the updates
    (``(G, *shape)``), ``xs`` / ``ys`` their batches stacked (``(G, B, ...)``, no dropout). A vmapped call's fixed
    cost (functorch dispatch per op, Python) is paid once for the ``G`` updates instead of once each, which is most
    of a small model's per-sample gradient time (docs/benchmarks.md). Returns per update name -> ``(B, *shape)``
    (views into one ``(G, B, *shape)`` tensor per name)."""
    got = vmap(_per_sample_grad(model, loss_spec, False), in_dims=(0, 0, 0, None))(params, xs, ys, None)
    return [_weighted({n: v[i] for n, v in got.items()}, batch_weights(loss_spec, ys[i])) for i in range(xs.shape[0])]


def grad_dots(
    grads: Iterable[tuple[slice, dict[str, torch.Tensor]]],
    V: dict[str, torch.Tensor],
    batch_size: int,
    *,
    per_tensor: bool,
    want_mean_grad: bool = False,
    scale: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """:func:`sample_dots` from per-sample gradients already taken (:func:`sample_grads`' chunks): plain matmuls,
    no ``torch.func`` transform, so it may run in another thread than the one that took the gradients."""
    names = list(V)
    R = next(iter(V.values())).shape[0]
    B = batch_size
    dev = next(iter(V.values())).device
    # per tensor every element is written below; the sum over tensors accumulates into zeros
    out = (torch.empty if per_tensor else torch.zeros)((R, B, len(names)) if per_tensor else (R, B), dtype=torch.float64,
                                                        device=dev)
    Vf = {n: V[n].reshape(R, -1) for n in names}
    sc = {n: 1.0 if scale is None else float(scale.get(n, 1.0)) for n in names}
    mean: dict[str, torch.Tensor] | None = None
    for sl, G in grads:
        C = sl.stop - sl.start
        if want_mean_grad and mean is None:
            mean = {n: torch.zeros(G[n].shape[1:], dtype=G[n].dtype, device=G[n].device) for n in names}
        if per_tensor:
            for t, n in enumerate(names):
                d = Vf[n] @ G[n].reshape(C, -1).T
                out[:, sl, t] = d if sc[n] == 1.0 else d.mul_(sc[n])
        else:
            acc = out[:, sl]
            for n in names:
                acc.addmm_(Vf[n], G[n].reshape(C, -1).T, alpha=sc[n])
        if mean is not None:
            for n in names:
                mean[n].add_(G[n].sum(0))
        del G
    if mean is not None:
        for n in names:
            mean[n].div_(B)
    return out, mean


def sample_dots(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_spec: dict[str, str],
    V: dict[str, torch.Tensor],
    *,
    per_tensor: bool,
    method: str = "grad",
    sample_chunk: int = 512,
    want_mean_grad: bool = False,
    scale: dict[str, float] | None = None,
    masks: Masks = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``dots[r, k(, t)] = <V[r], grad l_k(params)>`` (restricted to tensor ``t`` when ``per_tensor``).

    ``V``: name -> ``(R, *shape)`` float64; ``scale`` (name -> float, default 1) multiplies each tensor's ``V``
    without building the scaled copy. Returns ``(dots, mean_grad)``: dots ``(R, |B|)`` or ``(R, |B|, T)`` in
    ``V``'s tensor order; ``mean_grad`` is the batch-mean gradient when ``want_mean_grad`` (free with ``"grad"``, one
    extra reverse pass with ``"jvp"``), else None.
    """
    B = x.shape[0]
    if method == "grad":
        return grad_dots(sample_grads(model, params, x, y, loss_spec, sample_chunk=sample_chunk, masks=masks), V, B,
                         per_tensor=per_tensor, want_mean_grad=want_mean_grad, scale=scale)
    if method != "jvp":
        raise ValueError(f"unknown method {method!r}; use 'grad' or 'jvp'")
    names = list(V)
    R = next(iter(V.values())).shape[0]
    dev = next(iter(V.values())).device
    out = torch.zeros((R, B, len(names)) if per_tensor else (R, B), dtype=torch.float64, device=dev)
    sc = {n: 1.0 if scale is None else float(scale.get(n, 1.0)) for n in names}
    mean: dict[str, torch.Tensor] | None = None
    rows = max(1, JVP_BATCH // max(1, min(B, sample_chunk)))
    w = batch_weights(loss_spec, y)
    for c0 in range(0, B, sample_chunk):
        sl = slice(c0, min(B, c0 + sample_chunk))
        losses = _batch_losses_fn(model, loss_spec, x[sl], y[sl], None if w is None else w[sl],
                                  None if masks is None else [m[sl] for m in masks])
        if per_tensor:
            for t, n in enumerate(names):

                def f_t(p: torch.Tensor, n: str = n, losses: Callable = losses) -> torch.Tensor:
                    return losses({**params, n: p})

                def tangent_t(v: torch.Tensor, f_t: Callable = f_t, n: str = n) -> torch.Tensor:
                    return jvp(f_t, (params[n],), (v,))[1]

                for r0 in range(0, R, rows):
                    out[r0 : r0 + rows, sl, t] = vmap(tangent_t)(V[n][r0 : r0 + rows]).mul_(sc[n])
        else:

            def tangent(v: dict[str, torch.Tensor], losses: Callable = losses) -> torch.Tensor:
                return jvp(losses, (params,), (v,))[1]

            for r0 in range(0, R, rows):
                v = {n: V[n][r0 : r0 + rows] if sc[n] == 1.0 else V[n][r0 : r0 + rows] * sc[n] for n in names}
                out[r0 : r0 + rows, sl] = vmap(tangent)(v)
    if want_mean_grad:
        mean = batch_mean_grad(model, params, x, y, loss_spec, masks)
    return out, mean
