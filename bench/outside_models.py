"""A model written the way users (and the ExPLAIND paper's authors) write theirs, for bench/engine.py.

Not the project's example: per-head ``nn.Linear`` query/key/value and output projections in ``ModuleList``s,
attention computed head by head in a Python loop over all 4 positions (causal), learned positional embeddings, a
ReLU MLP and an unembedding read at the last position. Sequences are ``[a, op, b, =]`` for ``(a + b) mod p``.
With p=23, d_model 32, 4 heads and MLP 96 it has about 12k parameters.

The engine imports this module to rebuild the model from the store, so it must be trusted:
``EXPLAIND_TRUSTED_MODULES=outside_models`` with ``bench/`` on the import path (bench/engine.py sets both for its
child processes and their Dask workers).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PerHeadTransformer(nn.Module):
    """One causal attention layer with per-head projections and one MLP block, no layer norm."""

    def __init__(self, p: int = 23, d_model: int = 32, n_heads: int = 4, d_mlp: int = 96, n_ctx: int = 4):
        super().__init__()
        d_head = d_model // n_heads
        self.d_head = d_head
        self.embed = nn.Embedding(p + 2, d_model)
        self.pos = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))
        self.W_Q = nn.ModuleList([nn.Linear(d_model, d_head, bias=False) for _ in range(n_heads)])
        self.W_K = nn.ModuleList([nn.Linear(d_model, d_head, bias=False) for _ in range(n_heads)])
        self.W_V = nn.ModuleList([nn.Linear(d_model, d_head, bias=False) for _ in range(n_heads)])
        self.W_O = nn.ModuleList([nn.Linear(d_head, d_model, bias=False) for _ in range(n_heads)])
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, p, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[-1]]  # (N, T, d)
        t = x.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        attn = 0
        for wq, wk, wv, wo in zip(self.W_Q, self.W_K, self.W_V, self.W_O):
            q, k, v = wq(h), wk(h), wv(h)
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
            scores = scores.masked_fill(~mask, float("-inf"))
            attn = attn + wo(scores.softmax(dim=-1) @ v)
        h = h + attn
        h = h + self.mlp_out(torch.relu(self.mlp_in(h)))
        return self.unembed(h[:, -1])


def make_model(p: int = 23, d_model: int = 32, n_heads: int = 4, d_mlp: int = 96, dtype: str = "float32") -> nn.Module:
    """The per-head transformer, initialised from torch's global RNG."""
    return PerHeadTransformer(p, d_model, n_heads, d_mlp).to(getattr(torch, dtype))


def make_data(p: int, n_train: int, n_val: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random pairs of the ``p x p`` table as ``[a, op, b, =]`` rows (op = p, = is p + 1)."""
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    a, b = perm // p, perm % p
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    y = (a + b) % p
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    return {"train": (x[tr].clone(), y[tr].clone()), "val": (x[va].clone(), y[va].clone())}


def train(out: str, *, steps: int, n_train: int, n_val: int, seed: int = 0, **model: int) -> None:
    """Full-batch AdamW (lr 1e-3, betas (0.9, 0.98), weight decay 1.0) recorded to ``out``."""
    from explaind_store.examples.training import fit
    from explaind_store.specs import model_spec

    data = make_data(int(model.get("p", 23)), n_train, n_val, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_model(**model)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    fit(net, opt, data, steps=steps, seed=seed, out=out, model_spec=model_spec(make_model, **model),
        overwrite=True, progress=False, eval_every=0, desc="perhead")
