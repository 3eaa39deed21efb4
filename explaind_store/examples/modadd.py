"""Modular addition ``(a + b) mod p`` with a one-layer transformer (the grokking setup of Nanda et al., 2023).

Inputs are LongTensors ``(N, 3)`` of tokens ``a, b, =`` where ``=`` has id ``p`` (vocabulary ``p + 1``); outputs are
``(N, p)`` logits read at the last position. Paper config: ``p=113``, 30% of the table for training, full-batch
AdamW (lr 1e-3, betas (0.9, 0.98), weight decay as given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..specs import model_spec
from .training import Callback, TrainResult, activation, fit, resolve_dtype


class ModAddTransformer(nn.Module):
    """Embedding, one attention layer and one MLP block (both residual), no positional encoding, no layer norm.

    Attention is written with plain matmuls and softmax (forward-mode AD works, unlike SDPA on CPU). Only the last
    position's output is read, and with one layer it depends only on the last position's query, so queries and the
    MLP are computed for that position alone: the same function as a causal transformer read at ``=``, 3x cheaper.
    """

    def __init__(self, p: int = 113, d_model: int = 64, n_heads: int = 4, d_mlp: int = 512, act: str = "relu"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.p, self.n_heads, self.d_head = p, n_heads, d_model // n_heads
        self.embed = nn.Parameter(torch.randn(p + 1, d_model) / math.sqrt(d_model))
        self.attn_q = nn.Linear(d_model, d_model, bias=False)
        self.attn_k = nn.Linear(d_model, d_model, bias=False)
        self.attn_v = nn.Linear(d_model, d_model, bias=False)
        self.attn_o = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.act = activation(act)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, p, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid = self.embed[x]  # (N, T, d)
        n, t, d = resid.shape
        last = resid[:, -1]  # (N, d)
        q = self.attn_q(last).reshape(n, self.n_heads, self.d_head)
        k = self.attn_k(resid).reshape(n, t, self.n_heads, self.d_head)
        v = self.attn_v(resid).reshape(n, t, self.n_heads, self.d_head)
        scores = torch.einsum("nhe,nthe->nht", q, k) / math.sqrt(self.d_head)
        z = torch.einsum("nht,nthe->nhe", scores.softmax(dim=-1), v).reshape(n, d)
        h = last + self.attn_o(z)
        h = h + self.mlp_out(self.act(self.mlp_in(h)))
        return self.unembed(h)


def make_model(
    p: int = 113, d_model: int = 64, n_heads: int = 4, d_mlp: int = 512, act: str = "relu", dtype: str = "float32"
) -> nn.Module:
    """The modular-addition transformer (``act``: "relu", "gelu" or "tanh"); initialised from torch's global RNG."""
    return ModAddTransformer(p, d_model, n_heads, d_mlp, act).to(resolve_dtype(dtype))


N_TRAIN, N_VAL = 4000, 2000  # the paper's split of the p=113 table (about 30% for training)


def default_sizes(p: int) -> tuple[int, int]:
    """``(n_train, n_val)`` by default: 4,000 and 2,000 pairs, or the whole table split 2:1 when it is smaller."""
    total = p * p
    if total >= N_TRAIN + N_VAL:
        return N_TRAIN, N_VAL
    if total < 3:
        raise ValueError(f"p={p} gives only {total} pair(s), too few for a training and a validation split; use p >= 2")
    n_val = total // 3
    return total - n_val, n_val


def make_data(
    p: int = 113, n_train: int | None = None, n_val: int | None = None, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random pairs ``(a, b)`` of the ``p x p`` table: ``{"train": (x, y), "val": (x, y)}``.

    ``x`` is int64 ``(N, 3)`` rows ``[a, b, p]``, ``y = (a + b) mod p`` int64. Sizes left as None follow
    :func:`default_sizes` (both splits non-empty for any ``p >= 2``). Explicit sizes are clipped to the table:
    ``n_train`` to ``p * p`` and ``n_val`` to what is left after it; a requested validation split that would be left
    empty is an error.
    """
    total = p * p
    d_train, d_val = default_sizes(p)
    n_train = min(d_train if n_train is None else n_train, total)
    want_val = d_val if n_val is None else n_val
    n_val = min(want_val, total - n_train)
    if want_val > 0 and n_val == 0:
        raise ValueError(
            f"p={p} has {total} pairs and n_train={n_train} takes them all, so the validation split would be empty; "
            f"lower n_train below {total} or pass n_val=0 (on the command line, --p sets only p and the split is "
            "chosen to fit)"
        )
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    a, b = perm // p, perm % p
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    train = slice(0, n_train)
    val = slice(n_train, n_train + n_val)
    return {"train": (x[train].clone(), y[train].clone()), "val": (x[val].clone(), y[val].clone())}


def describe_sample(x: torch.Tensor | Sequence[int]) -> str:
    """``"a + b = c"`` for one input row ``[a, b, p]`` (``p`` is read from the ``=`` token)."""
    a, b, p = (int(v) for v in x)
    return f"{a} + {b} = {(a + b) % p}"


def train(
    out: str | None = None,
    *,
    steps: int = 1000,
    seed: int = 0,
    p: int = 113,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 512,
    act: str = "relu",
    n_train: int | None = None,
    n_val: int | None = None,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.98),
    weight_decay: float = 4.0,
    dtype: str = "float32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    eval_every: int = 100,
    recorder_kwargs: dict[str, Any] | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Full-batch AdamW on modular addition; records to ``out`` when given (see ``training.fit``).

    ``seed`` sets the data split and the initialisation (torch's global RNG is left untouched).
    """
    data = make_data(p, n_train, n_val, seed)
    kwargs = {"p": p, "d_model": d_model, "n_heads": n_heads, "d_mlp": d_mlp, "act": act, "dtype": dtype}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(**kwargs)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    return fit(
        model,
        optimizer,
        data,
        steps=steps,
        seed=seed,
        batch_size=None,
        out=out,
        model_spec=model_spec(make_model, **kwargs),
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        eval_every=eval_every,
        recorder_kwargs=recorder_kwargs,
        callback=callback,
        desc="modadd",
    )
