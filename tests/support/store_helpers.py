"""A tiny, deterministic training loop on real data (scikit-learn digits) used by the store tests and the crash
worker. Batches are a pure function of (seed, step) so a killed and resumed run can replay exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from explaind_store import Recorder


def make_mlp(hidden: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def digits(n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:n], dtype=torch.int64)
    return x, y


def batch_for(step: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    size = 16 + (step % 3) * 5  # variable batch sizes
    return torch.randperm(n, generator=g)[:size]


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    first, second = model[0].parameters(), model[2].parameters()
    if kind == "adamw":
        return torch.optim.AdamW(
            [{"params": first, "weight_decay": 0.1}, {"params": second, "lr": 3e-3, "weight_decay": 0.0}],
            lr=1e-2, betas=(0.9, 0.98),
        )
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    if kind == "adam_nowd":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.1, weight_decay=5e-3)
    if kind == "sgd_nesterov":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    raise ValueError(kind)


def lr_factor(epoch: int) -> float:
    return 1.0 if epoch < 5 else 0.5


def train(
    path: str | Path,
    steps: int,
    *,
    kind: str = "sgd_momentum",
    resume: bool = False,
    chunk_updates: int = 4,
    snapshots: list[dict[str, torch.Tensor]] | None = None,
    clip: float | None = None,
    **rec_kwargs: Any,
) -> None:
    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer(kind, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    with Recorder(path, model, opt, data=(x, y), splits={"val": (x[:10], y[:10])}, scheduler=sched,
                  resume=resume, chunk_updates=chunk_updates, **rec_kwargs) as rec:
        if snapshots is not None:
            snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
        for s in range(rec.updates_done + 1, steps + 1):
            idx = batch_for(s, len(x))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            scale = None
            if clip is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                scale = min(1.0, clip / (norm + 1e-6))
            opt.step()
            rec.record(idx, loss=loss.item(), grad_scale=scale)
            sched.step()
            if snapshots is not None:
                snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})


def arrays_of(path: str | Path) -> dict[str, np.ndarray]:
    """Every committed array of a store, for bit-for-bit comparisons."""
    from explaind_store import open_run

    run = open_run(path)
    t = run.committed_updates
    out = {}
    for group in ["params", *run.state_names, "updates"]:
        g = run.root[group]
        for name, arr in g.arrays():
            out[f"{group}/{name}"] = np.asarray(arr[: t + 1])
    return out
