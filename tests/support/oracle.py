"""Float64 brute force: the project's definition of an "exact" decomposition.

Nothing here uses the engine. Tiny models are trained in float64 with the real torch optimizers and recorded into an
``InMemoryTrajectory``. The oracle then

1. computes ``phi_s`` with its own quadrature: Gauss-Legendre nodes, a full ``jacrev`` Jacobian per node in a plain
   loop (or an exact kink-splitting rule for a one-hidden-layer ReLU MLP);
2. replays each optimizer update from torch's update rule written out by hand, with the momentum buffer split into
   explicit pieces: one per (training sample, update whose batch held it), one per coupled-decay term, one for the
   momentum stored at the window start. The pieces are decayed and moved exactly like the buffer, so their sum must
   reproduce the stored ``dtheta_s`` (checked: ``replay_error``);
3. scores every piece at every later update with ``<phi_s, movement of the piece>`` (the double sum over updates),
   per tensor and element-wise.

Sizes are tiny (N ~ 20 samples, ~10 updates, a few hundred parameters), so plain loops are fine.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from explaind_store.examples.tiny import (
    digits_subset,
    make_mlp,
    make_tiny_transformer,
    modadd_subset,
)
from explaind_store.specs import loss_spec
from explaind_store.trajectory import InMemoryTrajectory

F64 = torch.float64


# ==============================================================================================================
# Training runs
# ==============================================================================================================
@dataclass
class TrainedRun:
    name: str
    traj: InMemoryTrajectory
    factory: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def model_and_data(model: str, dtype: str = "float64", seed: int = 0):
    """(factory, train (x, y), query (x, y)) for "mlp" (tanh), "transformer" (GELU), "relu" (1 hidden layer)."""
    if model == "mlp":
        data = digits_subset(20, 3, seed=seed)
        factory = lambda: make_mlp(64, 8, 10, depth=2, act="tanh", dtype=dtype)
    elif model == "relu":
        data = digits_subset(20, 3, seed=seed)
        factory = lambda: make_mlp(64, 12, 10, depth=1, act="relu", dtype=dtype)
    elif model == "transformer":
        data = modadd_subset(p=7, n_train=20, n_val=3, seed=seed)
        factory = lambda: make_tiny_transformer(p=7, d_model=8, n_heads=2, d_mlp=16, act="gelu", dtype=dtype)
    else:
        raise ValueError(model)
    (x, y), (xq, yq) = data["train"], data["val"]
    if x.is_floating_point():
        x, xq = x.to(getattr(torch, dtype)), xq.to(getattr(torch, dtype))
    return factory, (x, y), (xq, yq)


def _groups(model: nn.Module, hp0: dict, hp1: dict) -> list[dict]:
    """Two parameter groups: weights of the first half of the tensors, and the rest."""
    params = list(model.parameters())
    half = len(params) // 2
    return [{"params": params[:half], **hp0}, {"params": params[half:], **hp1}]


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    # AdamW: two groups (different lr and decay), lr schedule (set in train), clipping
    "adamw": lambda m: torch.optim.AdamW(
        _groups(m, {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.005, "weight_decay": 0.3}), betas=(0.9, 0.98), eps=1e-6
    ),
    # Adam, coupled L2: groups with different betas and decay
    "adam_wd": lambda m: torch.optim.Adam(
        _groups(m, {"lr": 0.01, "weight_decay": 0.05, "betas": (0.9, 0.999)},
                {"lr": 0.02, "weight_decay": 0.01, "betas": (0.8, 0.99)}),
    ),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    # SGD momentum + dampening + decay, groups with different momentum and dampening
    "sgd_momentum": lambda m: torch.optim.SGD(
        _groups(m, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
                {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.02}),
    ),
    "sgd_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01),
}
SCHEDULED = {"adamw", "adam_wd", "sgd_momentum"}
CLIPPED = {"adamw": 0.5, "sgd_momentum": 0.3}


def batch_plan(n: int, n_updates: int, batch_size: int, seed: int, with_replacement: bool = False) -> list[torch.Tensor]:
    """Epochs of shuffled batches (the last batch of an epoch is smaller), or batches drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < n_updates:
        if with_replacement:
            out.append(torch.randint(0, n, (batch_size,), generator=gen))
            continue
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:n_updates]


def train(
    model: str,
    opt: str,
    *,
    n_updates: int = 10,
    batch_size: int = 6,
    dtype: str = "float64",
    seed: int = 0,
    warmup: int = 0,
) -> TrainedRun:
    """Train with the real torch optimizer and record every update into an InMemoryTrajectory.

    ``warmup`` updates run before recording starts (warm optimizer state at step 0, torch's step counter ahead of
    the recorded update index)."""
    factory, (x, y), (xq, yq) = model_and_data(model, dtype, seed)
    torch.manual_seed(seed + 1)
    net = factory()
    optimizer = OPTIMIZERS[opt](net)
    sched = None
    if opt in SCHEDULED:  # warm-up then decay, per group
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / 3) * 0.9 ** max(0, e - 2))
    ls = loss_spec("cross_entropy")
    batches = batch_plan(len(x), n_updates + warmup, batch_size, seed, with_replacement=(opt == "sgd"))
    traj = None
    clips = 0
    for u, idx in enumerate(batches):
        if u == warmup:
            start = {k: v.clone() for k, v in net.state_dict().items()}

            def rebuilt(start: dict = start) -> nn.Module:
                m = factory()
                m.load_state_dict(start)
                return m

            traj = InMemoryTrajectory.start(net, optimizer, rebuilt, {"train": (x, y)}, ls)
        optimizer.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        scale = 1.0
        if opt in CLIPPED:
            total = float(torch.nn.utils.clip_grad_norm_(net.parameters(), CLIPPED[opt]))
            scale = min(1.0, CLIPPED[opt] / (total + 1e-6))  # torch: clip_coef clamped to 1
            clips += scale < 1.0
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        if traj is not None:
            traj.record(net, optimizer, idx, lrs, scale)
            if "step" not in next(iter(optimizer.state.values()), {}):  # SGD: count like the store's Recorder
                traj.opt_steps[-1] = u + 1
        if sched is not None:
            sched.step()
    return TrainedRun(f"{model}-{opt}", traj, rebuilt, x, y, xq, yq, {"clipped_updates": clips})


def padded_sequences(n: int, t: int, vocab: int, min_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token sequences of random lengths: (input ids with 0 under the padding, labels with -100)."""
    ids = torch.randint(1, vocab, (n, t), generator=gen)
    lens = torch.randint(min_len, t + 1, (n,), generator=gen)
    pad = torch.arange(t)[None] >= lens[:, None]
    return ids.masked_fill(pad, 0), ids.masked_fill(pad, -100)


def gpt2_config(vocab: int = 16, t: int = 8) -> dict[str, Any]:
    """A 2-layer GPT-2 of width 8 (no dropout), as the kwargs of ``integrations.hf.causal_lm_from_config``."""
    from transformers import GPT2Config

    cfg = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=vocab, n_positions=t, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return cfg.to_dict()


def train_causal_lm(n_updates: int = 6, batch_size: int = 4, n: int = 12, t: int = 8, vocab: int = 16,
                    seed: int = 0) -> TrainedRun:
    """A 2-layer GPT-2 trained in float64 with AdamW (warm-up, clipping) on right-padded sequences of different
    lengths, with the Trainer's loss (token-loss sum over the batch's labelled next tokens / their count); the
    queries are 3 more such sequences and their labels."""
    from explaind_store.integrations.hf import causal_lm_from_config

    config = gpt2_config(vocab, t)
    gen = torch.Generator().manual_seed(seed)
    x, y = padded_sequences(n, t, vocab, 3, gen)
    xq, yq = padded_sequences(3, t, vocab, 3, gen)
    torch.manual_seed(seed + 1)

    def factory() -> nn.Module:
        return causal_lm_from_config(**config).double().eval()

    net = factory()
    start = {k: v.clone() for k, v in net.state_dict().items()}

    def rebuilt() -> nn.Module:
        m = factory()
        m.load_state_dict(start)
        return m

    optimizer = torch.optim.AdamW(net.parameters(), lr=0.02, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / 3))
    traj = InMemoryTrajectory.start(net, optimizer, rebuilt, {"train": (x, y), "val": (xq, yq)}, loss_spec("causal_lm"))
    for idx in batch_plan(n, n_updates, batch_size, seed):
        optimizer.zero_grad()
        logits = net(x[idx])
        lab = y[idx][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), lab.reshape(-1), ignore_index=-100, reduction="sum")
        (loss / (lab != -100).sum()).backward()
        total = float(torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5))
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        traj.record(net, optimizer, idx, lrs, min(1.0, 0.5 / (total + 1e-6)))
        sched.step()
    return TrainedRun("gpt2-adamw", traj, rebuilt, x, y, xq, yq)


# ==============================================================================================================
# Query function (written independently of engine.outputs)
# ==============================================================================================================
def query_values(model: nn.Module, params: dict, xq: torch.Tensor, yq: torch.Tensor, output: str) -> torch.Tensor:
    out = functional_call(model, params, (xq,))
    if output == "logits":
        v = out
    elif output == "log_softmax":
        v = out - torch.logsumexp(out, dim=-1, keepdim=True)
    elif output == "loss":
        v = F.cross_entropy(out, yq, reduction="none")[:, None]
    elif output == "target_logprob":
        v = (out - torch.logsumexp(out, dim=-1, keepdim=True))[torch.arange(len(yq)), yq][:, None]
    elif output == "lm_loss":  # causal LM: each sequence's mean loss over its labelled next tokens
        rows = []
        for q in range(len(yq)):
            terms = [-(out[q, p - 1] - torch.logsumexp(out[q, p - 1], -1))[yq[q, p]] for p in range(1, yq.shape[1])
                     if int(yq[q, p]) != -100]
            rows.append(torch.stack(terms).sum() / len(terms))
        v = torch.stack(rows)[:, None]
    elif output == "token_logprob":  # causal LM: log-probability of each labelled next token, summed per sequence
        rows = []
        for q in range(len(yq)):
            terms = [(out[q, p - 1] - torch.logsumexp(out[q, p - 1], -1))[yq[q, p]] for p in range(1, yq.shape[1])
                     if int(yq[q, p]) != -100]
            rows.append(torch.stack(terms).sum())
        v = torch.stack(rows)[:, None]
    elif output == "margin":
        rows = []
        for q in range(len(yq)):
            t = int(yq[q])
            others = torch.cat([out[q, :t], out[q, t + 1 :]])
            rows.append(out[q, t] - others.max())
        v = torch.stack(rows)[:, None]
    else:
        raise ValueError(output)
    return v.reshape(-1)


# ==============================================================================================================
# Path integrals
# ==============================================================================================================
def gauss_legendre(a: float, b: float, n: int) -> list[tuple[float, float]]:
    x, w = np.polynomial.legendre.leggauss(n)
    return [(0.5 * (a + b) + 0.5 * (b - a) * xi, 0.5 * (b - a) * wi) for xi, wi in zip(x, w)]


def phi_gauss(fq: Callable, theta0: dict, dtheta: dict, breakpoints: Sequence[float] = (), nodes: int = 12) -> dict:
    """``sum_j w_j J_F(theta0 + t_j dtheta)``, Gauss-Legendre on each piece between breakpoints, jacrev per node."""
    edges = [0.0, *sorted(t for t in breakpoints if 0.0 < t < 1.0), 1.0]
    phi = {k: None for k in theta0}
    for a, b in itertools.pairwise(edges):
        for t, w in gauss_legendre(a, b, nodes):
            J = jacrev(fq)({k: theta0[k] + t * dtheta[k] for k in theta0})
            for k in theta0:
                phi[k] = w * J[k] if phi[k] is None else phi[k] + w * J[k]
    return phi


def margin_breakpoints(fq_logits: Callable, yq: torch.Tensor, grid: int = 64, iters: int = 60) -> Callable:
    """Breakpoints of the "margin" output along a segment: where a query's runner-up class changes (grid search,
    then bisection on the runner-up's identity to ~1e-18)."""

    def runner_up(theta0: dict, dtheta: dict, t: float) -> torch.Tensor:
        out = fq_logits({k: theta0[k] + t * dtheta[k] for k in theta0}).detach().clone()
        out[torch.arange(len(yq)), yq] = -torch.inf
        return out.argmax(-1)

    def find(theta0: dict, dtheta: dict) -> list[float]:
        ts = np.linspace(0.0, 1.0, grid + 1)
        ups = [runner_up(theta0, dtheta, float(t)) for t in ts]
        found = []
        for i in range(grid):
            for q in torch.nonzero(ups[i] != ups[i + 1]).flatten().tolist():
                lo, hi = float(ts[i]), float(ts[i + 1])
                for _ in range(iters):
                    mid = 0.5 * (lo + hi)
                    if runner_up(theta0, dtheta, mid)[q] == ups[i][q]:
                        lo = mid
                    else:
                        hi = mid
                found.append(0.5 * (lo + hi))
        return found

    return find


def relu1_breakpoints(theta0: dict, dtheta: dict, xq: torch.Tensor) -> list[float]:
    """Exact kinks of ``Linear -> ReLU -> Linear`` (names "0.weight", "0.bias"): hidden pre-activations are
    linear in t along the segment, so every unit switches at ``t = -z0 / dz``."""
    z0 = xq @ theta0["0.weight"].T + theta0["0.bias"]
    dz = xq @ dtheta["0.weight"].T + dtheta["0.bias"]
    t = -z0 / dz
    return sorted(float(v) for v in t[(t > 0) & (t < 1)])


# ==============================================================================================================
# The oracle
# ==============================================================================================================
@dataclass
class OracleResult:
    """Numpy float64 arrays with R = Q*O rows (row q*O + o), S window updates, N samples, T tensors."""

    data: np.ndarray  # (R, N, S, T) by origin update
    weight_decay: np.ndarray  # (R, S, T) by origin update (AdamW: the update itself)
    momentum: np.ndarray  # (R, T)
    movement: np.ndarray  # (R, S, 3, T) <phi_s, part of dtheta_s>
    param: dict[str, np.ndarray]  # name -> (R, 3, *shape)
    f: np.ndarray  # (S+1, R) F(theta_s), s = a..b
    quad: np.ndarray  # (R, S) <phi_s, dtheta_s>
    replay_error: float  # max |sum of piece movements - dtheta_s| / max |dtheta_s|
    tensors: list[str]


def oracle(
    run: TrainedRun,
    output: str = "log_softmax",
    window: tuple[int, int] | None = None,
    nodes: int = 12,
    breakpoints: Callable[[dict, dict], list[float]] | None = None,
    dropout_masks: Callable[[int, int], list[torch.Tensor]] | None = None,
) -> OracleResult:
    """``dropout_masks(s, k)``: the masks training applied to sample ``k`` at update ``s``, one ``(1, ...)`` tensor
    per ``nn.Dropout`` module of the model in module order (applied after each, the model otherwise in eval mode)."""
    traj = run.traj
    spec = traj.optimizer_spec
    names = list(traj.tensor_names)
    T = len(names)
    group_of = spec.group_of()
    a, b = window or (0, traj.committed_updates)
    S = b - a
    N = len(run.x)
    model = run.factory().double().eval()
    xq = run.xq.double() if run.xq.is_floating_point() else run.xq
    x = run.x.double() if run.x.is_floating_point() else run.x

    def fq(p: dict) -> torch.Tensor:
        return query_values(model, p, xq, run.yq, output)

    theta = [{k: v.to(F64) for k, v in traj.steps_params[s].items()} for s in range(a, b + 1)]
    f = np.stack([fq(th).detach().numpy() for th in theta])
    R = f.shape[1]

    lm = dict(traj.loss).get("kind") == "causal_lm"

    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]

    def sample_grad(params: dict, k: int, batch: list[int], s: int = 0) -> dict:
        """Gradient of sample k's share of the batch loss, times the batch size (the caller divides by it)."""
        p = {n: params[n].clone().requires_grad_(True) for n in names}
        hooks = []
        if dropout_masks is not None:
            for m, mask in zip(drops, dropout_masks(s, k), strict=True):
                hooks.append(m.register_forward_hook(lambda mod, inp, out, mask=mask: out * mask.to(out.dtype)))
        try:
            out = functional_call(model, p, (x[k : k + 1],))
        finally:
            for h in hooks:
                h.remove()
        if lm:  # the Trainer's loss: token-loss sum over the tokens of the whole batch, so k weighs by its tokens
            lab = run.y[k, 1:]
            tok_sum = F.cross_entropy(out[0, :-1], lab, ignore_index=-100, reduction="sum")
            n_batch = sum(int((run.y[j, 1:] != -100).sum()) for j in batch)
            loss = tok_sum * len(batch) / n_batch
        else:
            loss = F.cross_entropy(out, run.y[k : k + 1])
        return dict(zip(names, torch.autograd.grad(loss, [p[n] for n in names])))

    kind = spec.type
    adam = kind in ("Adam", "AdamW")
    hp = {n: spec.groups[group_of[n]] for n in names}

    # momentum pieces: key -> {name: buffer}; key = ("data", k, i) | ("wd", i) | ("carried",)
    pieces: dict[tuple, dict[str, torch.Tensor]] = {}
    state = "exp_avg" if adam else "momentum_buffer"
    if state in traj.steps_state[a]:  # nonzero for a > 0 or a warm-started recording
        pieces[("carried",)] = {n: traj.steps_state[a][state][n].to(F64).clone() for n in names}

    data = np.zeros((R, N, S, T))
    wd = np.zeros((R, S, T))
    mom = np.zeros((R, T))
    movement = np.zeros((R, S, 3, T))
    param = {n: np.zeros((R, 3, *theta[0][n].shape)) for n in names}
    quad = np.zeros((R, S))
    replay_err = 0.0

    for j, s in enumerate(range(a + 1, b + 1)):
        th0, th1 = theta[j], theta[j + 1]
        dth = {n: th1[n] - th0[n] for n in names}
        bps = breakpoints(th0, dth) if breakpoints else ()
        phi = phi_gauss(fq, th0, dth, bps, nodes)
        for t, n in enumerate(names):
            quad[:, j] += (phi[n].reshape(R, -1) @ dth[n].reshape(-1)).detach().numpy()
        lr = traj.lrs[s - 1]
        lam = traj.wds[s - 1]
        n_s = traj.opt_steps[s - 1]
        gs = traj.grad_scales[s - 1]
        batch = traj.batch_list[s - 1].tolist()
        # raw inputs of update s (what enters the gradient g'_s), as new pieces
        new: dict[tuple, dict[str, torch.Tensor]] = {}
        for k in batch:
            g = sample_grad(th0, k, batch, s)
            key = ("data", k, s)
            if key not in new:
                new[key] = {n: torch.zeros_like(th0[n]) for n in names}
            for n in names:
                new[key][n] += gs / len(batch) * g[n]
        if kind != "AdamW":
            new[("wd", s)] = {n: lam[group_of[n]] * th0[n] for n in names}
        moves: dict[tuple, dict[str, torch.Tensor]] = {}
        if adam:
            for n in names:
                b1, b2 = hp[n]["betas"]
                eps = hp[n]["eps"]
                a_s = lr[group_of[n]]
                v = traj.steps_state[s]["exp_avg_sq"][n].to(F64)
                denom = v.sqrt() / math.sqrt(1 - b2**n_s) + eps
                step_size = a_s / (1 - b1**n_s)
                for key in list(pieces):
                    pieces[key][n] = b1 * pieces[key][n]
                for key, val in new.items():
                    pieces.setdefault(key, {m: torch.zeros_like(th0[m]) for m in names})
                    pieces[key][n] = pieces[key][n] + (1 - b1) * val[n]
                for key in pieces:
                    moves.setdefault(key, {})[n] = -step_size * pieces[key][n] / denom
                if kind == "AdamW":
                    moves.setdefault(("wd", s), {})[n] = -a_s * lam[group_of[n]] * th0[n]
        else:
            for n in names:
                mu = hp[n].get("momentum", 0.0)
                d = hp[n].get("dampening", 0.0)
                nesterov = hp[n].get("nesterov", False)
                a_s = lr[group_of[n]]
                w = 1.0 if (mu == 0.0 or n_s == 1) else 1.0 - d
                for key in list(pieces):
                    pieces[key][n] = mu * pieces[key][n]
                for key, val in new.items():
                    pieces.setdefault(key, {m: torch.zeros_like(th0[m]) for m in names})
                    pieces[key][n] = pieces[key][n] + w * val[n]
                for key in pieces:
                    if mu == 0.0:
                        moves.setdefault(key, {})[n] = -a_s * new[key][n] if key in new else torch.zeros_like(th0[n])
                    elif nesterov:
                        raw = new[key][n] if key in new else torch.zeros_like(th0[n])
                        moves.setdefault(key, {})[n] = -a_s * (raw + mu * pieces[key][n])
                    else:
                        moves.setdefault(key, {})[n] = -a_s * pieces[key][n]
        # replay check: the pieces' movements add up to the stored dtheta_s
        num = max(float((sum(mv[n] for mv in moves.values()) - dth[n]).abs().max()) for n in names)
        den = max(float(dth[n].abs().max()) for n in names)
        replay_err = max(replay_err, num / den)
        # the double sum: score every piece at this update
        for key, mv in moves.items():
            for t, n in enumerate(names):
                ph = phi[n].reshape(R, -1)
                val = (ph @ mv[n].reshape(-1)).detach().numpy()
                elem = (phi[n] * mv[n]).detach().numpy()
                if key[0] == "data":
                    _, k, i = key
                    data[:, k, i - a - 1, t] += val
                    movement[:, j, 0, t] += val
                    param[n][:, 0] += elem
                elif key[0] == "wd":
                    wd[:, key[1] - a - 1, t] += val
                    movement[:, j, 1, t] += val
                    param[n][:, 1] += elem
                else:
                    mom[:, t] += val
                    movement[:, j, 2, t] += val
                    param[n][:, 2] += elem
        if not adam and all(hp[n].get("momentum", 0.0) == 0.0 for n in names):
            pieces.clear()
    return OracleResult(data, wd, mom, movement, param, f, quad, replay_err, names)


def rel(x: Any, ref: Any) -> float:
    """max |x - ref| / max |ref| (0 when both vanish)."""
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = float(np.abs(ref).max(initial=0.0))
    err = float(np.abs(x - ref).max(initial=0.0))
    return err / scale if scale > 0 else err
