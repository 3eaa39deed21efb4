"""Tiny models and data for the engine's float64 oracle tests (a few hundred parameters, a few dozen samples)."""

from __future__ import annotations

import torch
from torch import nn

from . import digits_cnn, modadd
from .training import activation, resolve_dtype


def make_mlp(
    in_dim: int = 64, hidden: int = 8, out_dim: int = 10, depth: int = 2, act: str = "tanh", dtype: str = "float32",
    dropout: float = 0.0,
) -> nn.Module:
    """``depth`` hidden layers ``Linear -> act`` of width ``hidden``, then ``Linear -> out_dim`` (``depth=0``: linear).

    ``act``: "tanh", "relu" or "gelu"; ``dropout > 0``: an ``nn.Dropout(dropout)`` after each hidden layer.
    Initialised from torch's global RNG.
    """
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), activation(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers).to(resolve_dtype(dtype))


def make_tiny_transformer(
    p: int = 7, d_model: int = 8, n_heads: int = 2, d_mlp: int = 16, act: str = "gelu", dtype: str = "float32"
) -> nn.Module:
    """The modular-addition transformer at toy size (see ``modadd.make_model``)."""
    return modadd.make_model(p=p, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, act=act, dtype=dtype)


def make_byte_lm(vocab: int = 256, d_model: int = 8, dtype: str = "float32") -> nn.Module:
    """A bigram language model over bytes (``examples.corpus``): embedding then a linear read-out, logits
    ``(N, T, vocab)`` for the ``causal_lm`` loss."""
    return nn.Sequential(nn.Embedding(vocab, d_model), nn.Linear(d_model, vocab)).to(resolve_dtype(dtype))


def digits_subset(n_train: int = 24, n_val: int = 8, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random digits, flattened to 64 features in ``[0, 1]`` (float32), labels int64."""
    x, y = digits_cnn.load_all()
    if n_train + n_val > len(x):
        raise ValueError(f"n_train + n_val = {n_train + n_val} exceeds the {len(x)} digits")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    x = x.reshape(len(x), -1)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va])}


def modadd_subset(
    p: int = 7, n_train: int = 20, n_val: int = 8, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A small modular-addition split (see ``modadd.make_data``; clipped to the ``p * p`` table)."""
    return modadd.make_data(p=p, n_train=n_train, n_val=n_val, seed=seed)
