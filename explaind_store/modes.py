"""Train/eval mode and forward-pass state: what makes a model's training forward reproducible from the store.

The decomposition recomputes every batch gradient from the stored parameters, batch and data. That is exact only
when the forward pass is a pure function of those (and of the generator states the recorder keeps for dropout,
:mod:`explaind_store.dropout`): no random numbers drawn outside ``torch.nn.functional.dropout``, no batch statistics
that couple the samples of a batch (BatchNorm in train mode, or without running statistics), and no state the
forward changes behind the recorder's back (running statistics, other buffers; they are stored once, at creation).
:func:`forward_problems` names the modules that break this, :func:`describe_modes` / :func:`apply_modes` record
the mode every module trained in and rebuild a model in it (``verify`` and the engine), and
:class:`BufferWatch` notices buffers that change during training anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# attribute names that hold a dropout probability on modules that apply dropout internally
# (nn.MultiheadAttention, nn.RNN/LSTM/GRU: ``dropout``; some attention implementations: ``dropout_p``)
_DROPOUT_ATTRS = ("dropout", "dropout_p", "attention_dropout")


def _dropout_p(m: nn.Module) -> float:
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return float(m.p)
    return _internal_dropout_p(m)


def _internal_dropout_p(m: nn.Module) -> float:
    """The dropout probability of a module that applies dropout inside its own kernels (not an nn.Dropout)."""
    for attr in _DROPOUT_ATTRS:
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return 0.0


def forward_problems(model: nn.Module) -> list[str]:
    """Modules whose training forward the store cannot reproduce, one line each (empty when the model is fine).

    Checked in each module's current mode: modules that apply dropout inside their own kernels
    (``nn.MultiheadAttention(dropout=...)``, RNN dropout; alpha dropout) with ``p > 0`` in train mode, BatchNorm
    in train mode (batch statistics, and it updates its running buffers), BatchNorm without running statistics
    (batch statistics in every mode), and any other normalisation layer that updates running statistics in train
    mode. ``nn.Dropout`` / ``Dropout1d/2d/3d`` in train mode are fine: the recorder keeps the generator state of
    every training forward and readers regenerate their masks (:mod:`explaind_store.dropout`).
    """
    out = []
    for name, m in model.named_modules():
        label = name or type(model).__name__
        alpha = isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout)) and m.p > 0
        if m.training and (_internal_dropout_p(m) > 0 or alpha):
            p = m.p if alpha else _internal_dropout_p(m)
            out.append(f"{label} ({type(m).__name__}, dropout p={p:g}) is in train mode and draws its random "
                       "numbers where they cannot be replayed (only nn.Dropout / F.dropout masks can)")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not m.track_running_stats or m.running_mean is None:
                out.append(f"{label} ({type(m).__name__}) normalises with batch statistics (track_running_stats=False)")
            elif m.training:
                out.append(f"{label} ({type(m).__name__}) is in train mode (batch statistics, running buffers change)")
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            out.append(f"{label} ({type(m).__name__}) is in train mode with track_running_stats=True (buffers change)")
    return out


def watched_modules(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`forward_problems` could object to in some mode (dropout with p > 0, normalisation)."""
    return [m for m in model.modules() if _dropout_p(m) > 0 or isinstance(m, nn.modules.batchnorm._NormBase)]


FORWARD_ADVICE = (
    "Each recorded update must be reproducible from the stored parameters, batch, data and generator states alone: "
    "dropout inside a module's own kernels (nn.MultiheadAttention(dropout=...), RNN dropout) or alpha dropout draws "
    "random numbers whose masks cannot be regenerated, and BatchNorm in train mode mixes the samples of a batch and "
    "changes running buffers the store keeps only from the start, so a decomposition of such a run would not add "
    "up. Use nn.Dropout modules for dropout (they are recorded), or put those modules in eval mode for training "
    "(module.eval(); the recorded mode is used to rebuild the model) or set their dropout to 0, and use "
    "LayerNorm/GroupNorm (or BatchNorm in eval mode with fixed statistics) instead of train-mode BatchNorm."
)


def describe_modes(model: nn.Module) -> dict[str, Any]:
    """The store attribute ``train_mode``: the root module's mode and the modules whose mode differs from it."""
    root = bool(model.training)
    return {"training": root, "differ": [n for n, m in model.named_modules() if n and bool(m.training) != root]}


def parse_modes(value: Any) -> tuple[bool, frozenset[str]] | None:
    """(root mode, names whose mode differs) from a stored ``train_mode`` attribute (None: not recorded).

    The value comes from a store and may be anything; a malformed one raises ValueError.
    """
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("training"), bool)
        or not isinstance(value.get("differ", []), list)
        or not all(isinstance(n, str) for n in value.get("differ", []))
    ):
        raise ValueError(
            "the store's train_mode attribute is malformed (expected {'training': bool, 'differ': [module names]}); "
            "the store was edited or damaged: re-record it"
        )
    return value["training"], frozenset(value.get("differ", []))


def apply_modes(model: nn.Module, value: Any) -> nn.Module:
    """Put ``model`` (and each submodule) in the mode it was trained in, as a stored ``train_mode`` says.

    Stores recorded before the attribute existed are rebuilt in eval mode (what the engine always used). Module
    names are only compared with ``model.named_modules()``, never looked up, so a hostile name does nothing.
    """
    parsed = parse_modes(value)
    if parsed is None:
        return model.eval()
    root, differ = parsed
    for name, m in model.named_modules():
        m.training = (not root) if name in differ else root
    return model


class BufferWatch:
    """Notices buffers that change during training (they are stored once, so ``run.model(s)`` would be wrong).

    ``check(full=False)`` compares the version counters of the buffers seen at creation (free); ``check(full=True)``
    also finds buffers replaced or added and compares the values with a copy taken at creation (a kernel such as
    batch_norm updates running statistics without bumping the version counter). Returns the changed buffers' names.
    """

    def __init__(self, model: nn.Module) -> None:
        self._buffers = dict(model.named_buffers())
        self._ids = {n: (id(b), b._version) for n, b in self._buffers.items()}
        self._copies = {n: b.detach().clone() for n, b in self._buffers.items()}
        self._model = model

    def check(self, full: bool = False) -> list[str]:
        if not self._buffers:
            return []
        if not full:  # the version counters of the tensors seen at creation: no walk over the modules
            return [n for n, b in self._buffers.items() if b._version != self._ids[n][1]]
        live = dict(self._model.named_buffers())
        changed = sorted(set(live) ^ set(self._buffers))
        for n, b in live.items():
            if n not in self._buffers:
                continue
            if (id(b), b._version) != self._ids[n] or not torch.equal(b.detach(), self._copies[n]):
                changed.append(n)
        return changed
