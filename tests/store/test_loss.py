"""The per-sample training losses (``explaind_store.specs.per_sample_loss``) are torch's own ``F.cross_entropy`` /
``F.nll_loss`` bit for bit, values and derivatives, eager and under ``torch.func`` (they are written out with
``gather`` so that ``vmap`` does not import ``sympy``; tests/engine/ops/test_lean_functorch.py checks that)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from explaind_store.specs import IGNORE_INDEX, loss_spec, per_sample_loss


def _torch_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The definitions per_sample_loss had before it was written out (torch's functions)."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    if kind == "nll":
        return F.nll_loss(out, y, reduction="none")
    labels = y[:, 1:]
    tok = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").reshape(labels.shape)
    return tok.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(tok.dtype)


def _case(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "causal_lm":
        out = torch.randn(5, 6, 11, generator=g, dtype=dtype) * 3
        y = torch.randint(0, 11, (5, 6), generator=g)
        y[1, 2:] = IGNORE_INDEX  # padding
        y[3, :] = IGNORE_INDEX  # a sequence with nothing to predict
        return out, y
    out = torch.randn(7, 5, generator=g, dtype=dtype) * 3
    if kind == "nll":
        out = out.log_softmax(1)
    y = torch.randint(0, 5, (7,), generator=g)
    y[2] = IGNORE_INDEX
    return out, y


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["cross_entropy", "nll", "causal_lm"])
def test_per_sample_loss_is_torchs_bit_for_bit(kind: str, dtype: torch.dtype) -> None:
    spec = loss_spec(kind)
    out, y = _case(kind, dtype)
    w = torch.linspace(0.5, 2.0, out.shape[0], dtype=dtype)

    def ours(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(spec, o, t)

    def theirs(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _torch_loss(kind, o, t)

    for f_ours, f_theirs, what in [
        (lambda o: ours(o, y), lambda o: theirs(o, y), "eager values"),
        (lambda o: grad(lambda z: (ours(z, y) * w).sum())(o), lambda o: grad(lambda z: (theirs(z, y) * w).sum())(o),
         "gradient"),
        # per-sample gradients, as engine/ops/persample.py takes them (torch decomposes nll_loss under vmap)
        (lambda o: vmap(grad(lambda z, t: ours(z[None], t[None]).sum()))(o, y),
         lambda o: vmap(grad(lambda z, t: theirs(z[None], t[None]).sum()))(o, y), "vmap(grad)"),
        (lambda o: jvp(lambda z: ours(z, y), (o,), (torch.ones_like(o),))[1],
         lambda o: jvp(lambda z: theirs(z, y), (o,), (torch.ones_like(o),))[1], "jvp"),
        (lambda o: vmap(lambda z, t: ours(z[None], t[None]))(o, y),
         lambda o: vmap(lambda z, t: theirs(z[None], t[None]))(o, y), "vmap values"),
    ]:
        a, b = f_ours(out), f_theirs(out)
        assert _same(a, b), f"{kind} {dtype} {what}: max diff {(a - b).abs().max()}"
    if kind != "causal_lm":
        assert per_sample_loss(spec, out, y)[2] == 0  # the ignored sample


def test_other_targets_still_go_to_torch() -> None:
    """Class-probability targets and extra dimensions ``(N, C, d)`` are F.cross_entropy's, as before."""
    g = torch.Generator().manual_seed(4)
    out = torch.randn(4, 3, dtype=torch.float64, generator=g)
    probs = torch.rand(4, 3, dtype=torch.float64, generator=g).softmax(1)
    assert torch.equal(per_sample_loss(loss_spec("cross_entropy"), out, probs),
                       F.cross_entropy(out, probs, reduction="none"))
    out3 = torch.randn(4, 3, 2, dtype=torch.float64, generator=g)
    y3 = torch.randint(0, 3, (4, 2), generator=g)
    assert torch.equal(per_sample_loss(loss_spec("cross_entropy"), out3, y3),
                       F.cross_entropy(out3, y3, reduction="none"))
    assert torch.equal(per_sample_loss(loss_spec("nll"), out3.log_softmax(1), y3),
                       F.nll_loss(out3.log_softmax(1), y3, reduction="none"))
