"""A small CNN on scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn: no download).

No batch norm, dropout or pooling: downsampling is a stride-2 convolution, so the only kinks are the ReLUs.
Trained with SGD + momentum, coupled weight decay, a triangular learning-rate schedule and shuffled minibatches
(the last batch of each epoch is smaller).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..specs import model_spec
from .training import Callback, TrainResult, fit, resolve_dtype, triangular_lr

N_DIGITS = 1797
N_CLASSES = 10


def make_model(channels: Sequence[int] = (8, 16), hidden: int = 32, dtype: str = "float32") -> nn.Module:
    """3x3 convolutions with ReLU (the first keeps 8x8, each next one has stride 2), then MLP ``hidden -> 10``.

    Input ``(N, 1, 8, 8)``, output ``(N, 10)`` logits. Parameter names: ``conv1.weight``, ..., ``fc.weight``,
    ``out.weight``. Layers feeding a ReLU get Kaiming-normal weights (torch's default leaves a long plateau at the
    start of training); biases keep torch's nonzero default, so blank pixels do not put units exactly on a ReLU kink.
    Initialised from torch's global RNG.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in, size = 1, 8
    for i, c in enumerate(channels):
        stride = 1 if i == 0 else 2
        layers[f"conv{i + 1}"] = nn.Conv2d(c_in, int(c), kernel_size=3, stride=stride, padding=1)
        layers[f"relu{i + 1}"] = nn.ReLU()
        c_in, size = int(c), (size - 1) // stride + 1
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c_in * size * size, hidden)
    layers["relu_fc"] = nn.ReLU()
    layers["out"] = nn.Linear(hidden, N_CLASSES)
    for name, layer in layers.items():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and name != "out":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return nn.Sequential(layers).to(resolve_dtype(dtype))


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def load_all() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images float32 ``(N, 1, 8, 8)`` in ``[0, 1]`` and labels int64 ``(N,)``."""
    images, labels = _load_digits()
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.copy())


def split_indices(n_val: int = 297, seed: int = 0, n: int = N_DIGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic disjoint ``(train, val)`` index sets of ``range(n)``, each sorted; ``val`` has ``n_val``."""
    if not 0 <= n_val <= n:
        raise ValueError(f"n_val={n_val} must lie in 0..{n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def make_data(n_val: int = 297, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (x, y), "val": (x, y)}``: x float32 ``(N, 1, 8, 8)`` in ``[0, 1]``, y int64; 1,500 / 297 default."""
    x, y = load_all()
    tr, va = split_indices(n_val, seed)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va])}


def train(
    out: str | None = None,
    *,
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 64,
    lr_peak: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-3,
    warmup_frac: float = 0.2,
    channels: Sequence[int] = (8, 16),
    hidden: int = 32,
    n_val: int = 297,
    dtype: str = "float32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    eval_every: int = 50,
    recorder_kwargs: dict[str, Any] | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Minibatch SGD with momentum and a triangular lr (peak after ``warmup_frac`` of ``steps``); see ``fit``.

    ``seed`` sets the data split, the initialisation and the batch order (torch's global RNG is left untouched).
    """
    data = make_data(n_val, seed)
    if dtype != "float32":
        data = {k: (x.to(resolve_dtype(dtype)), y) for k, (x, y) in data.items()}
    kwargs: dict[str, Any] = {"channels": [int(c) for c in channels], "hidden": hidden, "dtype": dtype}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(**kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_peak, momentum=momentum, weight_decay=weight_decay)
    warmup = max(1, round(warmup_frac * steps))
    schedule = functools.partial(triangular_lr, total=steps, warmup=warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return fit(
        model,
        optimizer,
        data,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        scheduler=scheduler,
        out=out,
        model_spec=model_spec(make_model, **kwargs),
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        eval_every=eval_every,
        recorder_kwargs=recorder_kwargs,
        callback=callback,
        desc="digits",
    )
