"""Metrics comparing a model's predictions with a reference model's (used by the pipeline-alignment test of
``explaind demo --paper`` and by the pruning experiment)."""

from __future__ import annotations

import torch


@torch.no_grad()
def prediction_metrics(logits_ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy of ``logits``, agreement of its argmax with ``logits_ref``'s, and the mean KL(ref || new).

    KL is ``sum_c p_ref(c) (log p_ref(c) - log p(c))`` per point, averaged over points (0 when identical).
    """
    lp_ref = torch.log_softmax(logits_ref.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(dim=-1)
    pred = logits.argmax(dim=-1)
    return {
        "accuracy": float((pred == targets).double().mean()),
        "agreement": float((pred == logits_ref.argmax(dim=-1)).double().mean()),
        "kl": float(kl.mean()),
    }
