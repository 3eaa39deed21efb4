"""What the store needs to know about torch optimizers: which ones are supported, their static hyperparameters,
their state, and an exact replay of one update (used by ``verify``).

The replay follows torch's own update rules (see docs/math.md): AdamW with decoupled decay, Adam with coupled L2
decay, SGD with momentum, dampening, nesterov and coupled decay.
"""

from __future__ import annotations

from typing import Any

import torch

from . import schema

SUPPORTED = "AdamW, Adam (amsgrad=False, maximize=False) and SGD (maximize=False)"

# Hyperparameters that must stay fixed during a run (lr and weight_decay are recorded per update instead).
STATIC_KEYS = {
    "AdamW": ("betas", "eps"),
    "Adam": ("betas", "eps"),
    "SGD": ("momentum", "dampening", "nesterov"),
}


class UnsupportedOptimizerError(TypeError):
    """The optimizer (or one of its options) is outside what the decomposition supports."""


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The update rule the math must use: ``"AdamW"``, ``"Adam"`` or ``"SGD"``; refuses anything else."""
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.Adam) and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        for g in optimizer.param_groups:
            for flag in ("amsgrad", "maximize", "differentiable"):
                if g.get(flag, False):
                    raise UnsupportedOptimizerError(
                        f"{name}({flag}=True) is not supported. Supported: {SUPPORTED}. Set {flag}=False."
                    )
        decoupled = [bool(g.get("decoupled_weight_decay", False)) for g in optimizer.param_groups]
        if len(set(decoupled)) > 1:
            raise UnsupportedOptimizerError("parameter groups disagree on decoupled_weight_decay; use one value")
        return "AdamW" if decoupled[0] else "Adam"
    if type(optimizer) is torch.optim.SGD:
        for g in optimizer.param_groups:
            if g.get("maximize", False):
                raise UnsupportedOptimizerError(f"SGD(maximize=True) is not supported. Supported: {SUPPORTED}.")
        return "SGD"
    raise UnsupportedOptimizerError(
        f"optimizer {name} is not supported: the exact decomposition is derived for {SUPPORTED}. "
        "Use one of those (torch.optim.AdamW, torch.optim.Adam or torch.optim.SGD)."
    )


def state_names(kind: str, groups: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> tuple[str, ...]:
    """Optimizer state arrays the store keeps for this optimizer."""
    if kind in ("AdamW", "Adam"):
        return (schema.EXP_AVG, schema.EXP_AVG_SQ)
    if kind == "SGD" and any(float(g.get("momentum", 0.0)) != 0.0 for g in groups):
        return (schema.MOMENTUM_BUFFER,)
    return ()


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_scalar(x) for x in v]
    return v


def group_hyperparams(optimizer: torch.optim.Optimizer, kind: str, names: dict[int, str]) -> list[dict[str, Any]]:
    """JSON description of every parameter group: static hyperparameters and the tensor names in it."""
    groups = []
    for g in optimizer.param_groups:
        hp: dict[str, Any] = {k: _scalar(g[k]) for k in STATIC_KEYS[kind] if k in g}
        hp["lr"] = float(_scalar(g["lr"]))
        hp["weight_decay"] = float(_scalar(g.get("weight_decay", 0.0)))
        hp["tensors"] = [names[id(p)] for p in g["params"] if id(p) in names]
        groups.append(hp)
    return groups


def optimizer_attrs(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """The ``optimizer`` attribute of a store."""
    kind = optimizer_kind(optimizer)
    return {"type": kind, "torch_class": type(optimizer).__name__, "groups": group_hyperparams(optimizer, kind, names)}


_ALL_STATIC = tuple(sorted({k for ks in STATIC_KEYS.values() for k in ks}))


def static_fingerprint(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """What must not change during a run (static hyperparameters and each group's tensors), cheap enough to compare
    at every step; :func:`static_mismatch` explains a difference."""
    # map() rather than generator expressions: this runs before every optimizer step
    return tuple((tuple(map(_scalar, map(g.get, _ALL_STATIC))), tuple(map(id, g["params"])))
                 for g in optimizer.param_groups)


def static_mismatch(recorded: dict[str, Any], optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    """Differences between a store's optimizer attribute and a live optimizer (empty when compatible)."""
    try:
        live = optimizer_attrs(optimizer, names)
    except UnsupportedOptimizerError as exc:
        return [str(exc)]
    problems = []
    if live["type"] != recorded["type"]:
        problems.append(f"optimizer is {live['type']} but the store was recorded with {recorded['type']}")
        return problems
    if len(live["groups"]) != len(recorded["groups"]):
        problems.append(f"{len(live['groups'])} parameter groups, the store has {len(recorded['groups'])}")
        return problems
    for i, (a, b) in enumerate(zip(live["groups"], recorded["groups"])):
        for key in (*STATIC_KEYS[live["type"]], "tensors"):
            if a.get(key) != b.get(key):
                problems.append(f"group {i} {key}: now {a.get(key)!r}, in the store {b.get(key)!r}")
    return problems


def replay_update(
    kind: str,
    hp: dict[str, Any],
    theta: torch.Tensor,
    grad: torch.Tensor | None,
    state_prev: dict[str, torch.Tensor],
    state_next: dict[str, torch.Tensor],
    lr: float,
    weight_decay: float,
    n: int,
) -> torch.Tensor:
    """The parameters after one update, rebuilt from the recorded state (float64).

    When ``grad`` is None the recorded next state (``exp_avg``/``exp_avg_sq`` or the momentum buffer) is used, which
    checks that parameters and state agree; with a gradient the full optimizer step is replayed.
    """
    theta = theta.double()
    if kind in ("AdamW", "Adam"):
        b1, b2 = hp["betas"]
        eps = hp["eps"]
        m, v = state_next[schema.EXP_AVG].double(), state_next[schema.EXP_AVG_SQ].double()
        if grad is not None:
            g = grad.double() + (weight_decay * theta if kind == "Adam" else 0.0)
            m = b1 * state_prev[schema.EXP_AVG].double() + (1 - b1) * g
            v = b2 * state_prev[schema.EXP_AVG_SQ].double() + (1 - b2) * g * g
        base = theta * (1 - lr * weight_decay) if kind == "AdamW" else theta
        denom = (v / (1 - b2**n)).sqrt() + eps
        return base - lr / (1 - b1**n) * m / denom
    # SGD
    mu = float(hp.get("momentum", 0.0))
    if mu == 0.0:
        if grad is None:
            raise ValueError("plain SGD keeps no state; replay needs the gradient")
        return theta - lr * (grad.double() + weight_decay * theta)
    buf = state_next[schema.MOMENTUM_BUFFER].double()
    damp = 0.0 if n == 1 else float(hp.get("dampening", 0.0))
    if grad is not None:
        g_eff = grad.double() + weight_decay * theta
        buf = g_eff.clone() if n == 1 else mu * state_prev[schema.MOMENTUM_BUFFER].double() + (1 - damp) * g_eff
    elif n == 1:
        g_eff = buf
    else:
        g_eff = (buf - mu * state_prev[schema.MOMENTUM_BUFFER].double()) / (1 - damp)
    if hp.get("nesterov", False):
        return theta - lr * (g_eff + mu * buf)
    return theta - lr * buf


def implied_gradient(
    kind: str,
    hp: dict[str, Any],
    theta_prev: torch.Tensor,
    theta_next: torch.Tensor,
    state_prev: dict[str, torch.Tensor],
    state_next: dict[str, torch.Tensor],
    lr: float,
    weight_decay: float,
    n: int,
) -> torch.Tensor:
    """The batch gradient (after clipping, before any coupled weight decay) that the recorded state change implies.

    ``verify`` compares it with the gradient recomputed from the stored batch: this proves that the batch record is
    the one the optimizer used.
    """
    theta_prev = theta_prev.double()
    if kind in ("AdamW", "Adam"):
        b1 = hp["betas"][0]
        g = (state_next[schema.EXP_AVG].double() - b1 * state_prev[schema.EXP_AVG].double()) / (1 - b1)
        return g - weight_decay * theta_prev if kind == "Adam" else g
    mu = float(hp.get("momentum", 0.0))
    if mu == 0.0:
        g = -(theta_next.double() - theta_prev) / lr
    elif n == 1:
        g = state_next[schema.MOMENTUM_BUFFER].double()
    else:
        damp = float(hp.get("dampening", 0.0))
        g = (state_next[schema.MOMENTUM_BUFFER].double() - mu * state_prev[schema.MOMENTUM_BUFFER].double()) / (1 - damp)
    return g - weight_decay * theta_prev


def implied_gradient_bound(
    kind: str,
    hp: dict[str, Any],
    theta_prev: torch.Tensor,
    theta_next: torch.Tensor,
    state_prev: dict[str, torch.Tensor],
    state_next: dict[str, torch.Tensor],
    lr: float,
    n: int,
) -> torch.Tensor:
    """Element-wise bound on the rounding error of :func:`implied_gradient` (float64).

    The implied gradient is a difference of rounded numbers: ``(m_s - beta1 m_{s-1}) / (1 - beta1)`` for Adam, the
    momentum-buffer difference for SGD, ``-(theta_s - theta_{s-1}) / lr`` for plain SGD. Late in training the
    gradient can be tiny next to the state it is recovered from, so the rounding of that state (a few ulps of each
    operand, in the dtype it was stored in) can exceed any relative tolerance on the gradient.
    """
    ulps = 4.0  # the stored state's own rounding plus the rounding of the training's update arithmetic
    if kind in ("AdamW", "Adam"):
        b1 = hp["betas"][0]
        m1, m0 = state_next[schema.EXP_AVG], state_prev[schema.EXP_AVG]
        eps = torch.finfo(m1.dtype).eps
        return ulps * eps * (m1.double().abs() + b1 * m0.double().abs()) / (1 - b1)
    mu = float(hp.get("momentum", 0.0))
    if mu == 0.0:
        eps = torch.finfo(theta_next.dtype).eps
        return ulps * eps * (theta_next.double().abs() + theta_prev.double().abs()) / lr
    b1_, b0 = state_next[schema.MOMENTUM_BUFFER], state_prev[schema.MOMENTUM_BUFFER]
    eps = torch.finfo(b1_.dtype).eps
    if n == 1:
        return ulps * eps * b1_.double().abs()
    damp = float(hp.get("dampening", 0.0))
    return ulps * eps * (b1_.double().abs() + mu * b0.double().abs()) / (1 - damp)


def build_optimizer(kind: str, groups: list[dict[str, Any]] | tuple[dict[str, Any], ...],
                    params: list[list[torch.Tensor]]) -> torch.optim.Optimizer:
    """A real torch optimizer of the recorded ``kind`` with the recorded static hyperparameters of each group
    (``groups``, as in a store's ``optimizer`` attribute) over ``params[g]`` (the tensors of group ``g``). Learning
    rate and weight decay are set per update by the caller."""
    torch_groups = []
    for hp, ps in zip(groups, params):
        g: dict[str, Any] = {"params": ps, "lr": float(hp.get("lr", 0.0)), "weight_decay": float(hp.get("weight_decay", 0.0))}
        for key in STATIC_KEYS[kind]:
            if key in hp:
                g[key] = tuple(hp[key]) if key == "betas" else hp[key]
        torch_groups.append(g)
    if kind == "AdamW":
        return torch.optim.AdamW(torch_groups)
    if kind == "Adam":
        return torch.optim.Adam(torch_groups)
    if kind == "SGD":
        return torch.optim.SGD(torch_groups)
    raise UnsupportedOptimizerError(f"optimizer {kind!r} cannot be rebuilt; supported: {SUPPORTED}")


def load_recorded_state(
    optimizer: torch.optim.Optimizer,
    kind: str,
    params: list[torch.Tensor],
    state: list[dict[str, torch.Tensor]],
    opt_step: int,
    lrs: Any = None,
    wds: Any = None,
) -> None:
    """Put the recorded optimizer state of one step into ``optimizer``: ``state[i]`` holds the state tensors of
    ``params[i]`` by store name, ``opt_step`` is torch's step counter there (no state when it is 0: a fresh
    optimizer), and ``lrs`` / ``wds`` (per group) the learning rates and weight decays of that update."""
    sd = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    new: dict[int, dict[str, Any]] = {}
    if opt_step > 0:
        for p, st in zip(params, state):
            entry: dict[str, Any] = dict(st)
            if kind in ("AdamW", "Adam"):
                entry["step"] = torch.tensor(float(opt_step), dtype=torch.float32)
            if entry:
                new[index[id(p)]] = entry
    sd["state"] = new
    if lrs is not None and wds is not None:
        for g, lr, wd in zip(sd["param_groups"], lrs, wds):
            g["lr"], g["weight_decay"] = float(lr), float(wd)
    optimizer.load_state_dict(sd)
