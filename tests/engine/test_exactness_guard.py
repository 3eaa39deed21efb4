"""Issue 11, defect 3: an inexact record never gives a quiet wrong answer.

The recorder refuses forwards it cannot reproduce (alpha or in-kernel dropout / BatchNorm in train mode, buffers that
change; nn.Dropout in train mode is recorded: tests/engine/test_dropout.py),
``attribute`` fails with the first bad update and its likely cause when a record does not add up (unrecorded
clipping, wrong batch indices, a sum-reduced loss), and ``verify`` neither fails clean runs whose late gradients
are tiny next to the optimizer state nor models trained with dropout modules in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.support.compare import MLP_SPEC
from tests.support.store_helpers import batch_for, digits
from torch import nn

import engine
from engine.guard import DEFAULT_RESIDUAL_TOL, FLOOR_ULPS, training_eps
from explaind_store import Recorder, open_run
from explaind_store.recorder import RecorderError
from explaind_store.specs import model_spec


def _mlp(hidden: int = 6, extra: nn.Module | None = None) -> nn.Module:
    layers = [nn.Linear(64, hidden), nn.Tanh()] + ([extra] if extra is not None else []) + [nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


def _train(
    path: Path,
    *,
    model: nn.Module | None = None,
    kind: str = "sgd",
    steps: int = 6,
    clip: float | None = None,
    record_clip: bool = True,
    wrong_batch_at: int | None = None,
    reduction: str = "mean",
    spec: dict[str, Any] | None = MLP_SPEC,
) -> Path:
    """A few real updates on digits, recorded; the options make the record inexact in one way each."""
    torch.manual_seed(0)
    x, y = digits()
    model = _mlp() if model is None else model
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if kind == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    with Recorder(path, model, opt, data=(x, y), splits={"val": (x[:6], y[:6])}, model_spec=spec,
                  chunk_updates=3) as rec:
        for s in range(1, steps + 1):
            idx = batch_for(s, len(x))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction=reduction)
            opt.zero_grad()
            loss.backward()
            scale = None
            if clip is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                scale = min(1.0, clip / (norm + 1e-6)) if record_clip else None
            opt.step()
            recorded = (idx + 1) % len(x) if s == wrong_batch_at else idx
            rec.record(recorded, loss=loss.item(), grad_scale=scale)
    return path


def _attribute(path: Path, **kw: Any) -> Any:
    return engine.attribute(path, queries="val[:3]", client="sync", progress=False, **kw)


# --- the recorder refuses forwards it cannot reproduce ---------------------------------------------------------
@pytest.mark.parametrize(
    "extra, words",
    [
        (nn.AlphaDropout(0.2), "AlphaDropout, dropout p=0.2"),
        (nn.BatchNorm1d(6), "BatchNorm1d) is in train mode"),
    ],
)
def test_recorder_refuses_train_mode_dropout_and_batchnorm(tmp_path: Path, extra: nn.Module, words: str) -> None:
    path = tmp_path / "run.zarr"
    with pytest.raises(RecorderError, match="cannot be reproduced") as err:
        _train(path, model=_mlp(extra=extra))
    assert words in str(err.value) and "eval" in str(err.value)
    assert not path.exists()  # refused before anything was written


def test_recorder_refuses_batch_statistics_and_internal_dropout(tmp_path: Path) -> None:
    bn = _mlp(extra=nn.BatchNorm1d(6, track_running_stats=False)).eval()
    with pytest.raises(RecorderError, match="batch statistics"):
        _train(tmp_path / "bn.zarr", model=bn)
    mha = nn.MultiheadAttention(8, 2, dropout=0.1)
    opt = torch.optim.SGD(mha.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="MultiheadAttention, dropout p=0.1"):
        Recorder(tmp_path / "mha.zarr", mha, opt, data=(torch.zeros(4, 8), torch.zeros(4)))


def test_recorder_refuses_alpha_dropout_switched_on_after_construction(tmp_path: Path) -> None:
    x, y = digits()
    model = _mlp(extra=nn.AlphaDropout(0.5)).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "run.zarr", model, opt, data=(x, y), model_spec=MLP_SPEC) as rec:
        model.train()  # the usual "model.train()" at the top of the loop
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
        with pytest.raises(RecorderError, match="AlphaDropout"):
            rec.record(range(8))


class _Counting(nn.Module):
    """Updates a buffer in forward behind autograd's back (``.data``: no version bump), as some norm layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.data += len(x)
        return x


def test_recorder_refuses_buffers_that_change(tmp_path: Path) -> None:
    with pytest.raises(RecorderError, match=r"buffers \['2.seen'\] changed during training"):
        _train(tmp_path / "run.zarr", model=_mlp(extra=_Counting()), spec=None)


def dropout_mlp() -> nn.Module:
    """A model factory (top level: a store can only name those) with a dropout module."""
    return _mlp(extra=nn.Dropout(0.5))


def test_dropout_in_eval_mode_records_verifies_and_attributes(tmp_path: Path) -> None:
    """Dropout modules kept in eval mode: the recorded mode is used to rebuild the model (verify used train)."""
    factory = dropout_mlp
    path = _train(tmp_path / "run.zarr", model=factory().eval(), spec=model_spec(factory))
    run = open_run(path, model_factory=factory)
    assert run.attrs["train_mode"] == {"training": False, "differ": []}
    rep = run.verify(chunks=False)
    assert rep.ok, rep.table()
    assert rep.gradient_max_rel_error < 1e-6
    engine.attribute(run, queries="val[:3]", client="sync", progress=False)  # exact: no InexactRecordError


# --- attribute fails on inexact records, with the first bad update and the cause ---------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_attribute_fails_on_unrecorded_clipping(tmp_path: Path, kind: str) -> None:
    path = _train(tmp_path / "run.zarr", kind=kind, clip=0.2, record_clip=False)
    with pytest.raises(engine.InexactRecordError, match=r"not exact at update 1:") as err:
        _attribute(path)
    assert "as gradient clipping does" in str(err.value) and "grad_scale=" in str(err.value)
    # the same training with the clipping factor recorded is exact
    _attribute(_train(tmp_path / "ok.zarr", kind=kind, clip=0.2))


def test_attribute_fails_on_wrong_batch_indices(tmp_path: Path) -> None:
    path = _train(tmp_path / "run.zarr", wrong_batch_at=4)
    with pytest.raises(engine.InexactRecordError, match=r"not exact at update 4:") as err:
        _attribute(path)
    assert "different directions" in str(err.value) and "explaind verify" in str(err.value)


def test_attribute_fails_on_sum_reduced_loss(tmp_path: Path) -> None:
    path = _train(tmp_path / "run.zarr", reduction="sum")
    with pytest.raises(engine.InexactRecordError, match=r"not exact at update 1:") as err:
        _attribute(path)
    assert "by the batch size 21" in str(err.value) and "reduction='sum'" in str(err.value)


def test_guard_runs_on_streamed_results_and_can_be_turned_off(tmp_path: Path) -> None:
    path = _train(tmp_path / "run.zarr", clip=0.2, record_clip=False)
    with pytest.raises(engine.InexactRecordError):
        _attribute(path, out=tmp_path / "res.zarr")
    for off in (None, float("inf")):
        ds = _attribute(path, residual_tol=off)
        assert float(np.abs(ds["residual"]).max()) > 1e-3  # the inexactness is there, the caller asked anyway
    with pytest.raises(ValueError, match="residual_tol must be a number"):
        _attribute(path, residual_tol=-1)


def test_guard_passes_clean_runs_with_margin(digits_store: Path, adamw_store: Path, modadd_store: Path) -> None:
    """Clean float32 runs stay far below the default tolerance (the adamw store clips, recorded)."""
    for path in (digits_store, adamw_store, modadd_store):
        ds = engine.attribute(path, queries="val[:3]", client="sync", progress=False)
        res = np.abs(ds["rounding_residual"].values).reshape(-1, ds.sizes["step"]).max(0)
        delta = np.abs(ds["delta"].values).reshape(-1, ds.sizes["step"]).max(0)
        size = max(np.abs(ds["initial"].values).max(), np.abs(ds["final"].values).max())
        floor = FLOOR_ULPS * training_eps(open_run(path)) * size
        assert (res / (DEFAULT_RESIDUAL_TOL * delta + floor)).max() < 0.1


# --- verify: tolerances follow the rounding of what it recovers ---------------------------------------------------
def _tiny_late_gradient_run(path: Path, wrong_batch_at: int | None = None) -> Path:
    """Full AdamW steps on hard samples, then on samples the model fits with a huge margin: the late gradients are
    ~1e-7 of exp_avg, so recovering them as (m_s - b1 m_{s-1}) / (1 - b1) is dominated by float32 rounding."""
    torch.manual_seed(0)
    n = 16
    x = torch.randn(n, 4)
    y = torch.randint(0, 3, (n,))
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    easy = torch.arange(8, 16)
    with torch.no_grad():  # samples 8..15: far out along their own class direction
        x[easy] = 0.0
        x[easy, 0] = 60.0
        y[easy] = 0
        model.weight.zero_()
        model.weight[0, 0] = 1.0
    with Recorder(path, model, opt, data=(x, y), loss="cross_entropy", chunk_updates=4) as rec:
        for s in range(1, 9):
            idx = torch.arange(0, 8) if s <= 4 else easy
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.record((idx + 1) % n if s == wrong_batch_at else idx)
    return path


def test_verify_passes_tiny_late_gradients_but_catches_a_wrong_batch(tmp_path: Path) -> None:
    factory = lambda: nn.Linear(4, 3)  # noqa: E731 - the caller vouches for it
    rep = open_run(_tiny_late_gradient_run(tmp_path / "ok.zarr"), model_factory=factory).verify(chunks=False)
    assert rep.ok, rep.table()
    bad = open_run(_tiny_late_gradient_run(tmp_path / "bad.zarr", wrong_batch_at=3), model_factory=factory)
    rep = bad.verify(chunks=False)
    assert not rep.ok and rep.gradient_worst_update == 3
