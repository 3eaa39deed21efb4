"""Shared fixtures: small runs recorded through the real Recorder into Zarr stores on disk, a process LocalCluster,
and comparison helpers for engine results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from explaind_store.specs import model_spec

HERE = Path(__file__).parent

# the digits MLP of store_helpers (Linear(64, 6) -> Tanh -> Linear(6, 10)) rebuilt by a built-in (trusted) factory
MLP_SPEC = model_spec("explaind_store.examples.tiny:make_mlp", in_dim=64, hidden=6, out_dim=10, depth=1, act="tanh")


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 updates of SGD (momentum, dampening, coupled decay, LambdaLR), variable batches, store chunks of 2."""
    from store_helpers import train

    path = tmp_path_factory.mktemp("engine") / "digits-sgd.zarr"
    train(path, 12, kind="sgd_momentum", chunk_updates=2, model_spec=MLP_SPEC)
    return path


@pytest.fixture(scope="session")
def adamw_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 updates of AdamW (two groups, decoupled decay, clipping), store chunks of 2."""
    from store_helpers import train

    path = tmp_path_factory.mktemp("engine") / "digits-adamw.zarr"
    train(path, 10, kind="adamw", chunk_updates=2, clip=0.5, model_spec=MLP_SPEC)
    return path


@pytest.fixture(scope="session")
def modadd_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny modular-addition transformer (GELU), full-batch AdamW, 6 updates, store chunks of 3."""
    from explaind_store.examples import modadd

    path = tmp_path_factory.mktemp("engine") / "modadd.zarr"
    modadd.train(str(path), steps=6, p=7, d_model=8, n_heads=2, d_mlp=16, act="gelu", n_train=20, n_val=8,
                 progress=False, eval_every=0, recorder_kwargs={"chunk_updates": 3})
    return path


@pytest.fixture(scope="session")
def cluster():
    """The engine's default LocalCluster (2 worker processes), started once for the session (~3 s).

    ``attribute(client=None)`` reuses it, so tests of the default path do not start another one.
    """
    import engine

    client = engine.local_client(2)
    yield client
    engine.close_local_client()


# --------------------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------------------
COMPARED = ("data", "weight_decay", "momentum", "initial", "final", "residual", "quadrature_residual",
            "rounding_residual", "delta", "movement")


def assert_results_close(got: xr.Dataset, ref: xr.Dataset, rtol: float = 1e-12) -> None:
    """Every variable of ``ref`` (incl. ``param_*``) matches ``got`` to ``rtol`` relative to its largest entry.

    Residuals are float-rounding-sized themselves, so they are judged against the size of the per-update changes
    (``delta``) they are residuals of.
    """
    names = [v for v in ref.data_vars if v in COMPARED or v.startswith("param_")]
    assert names
    change = float(np.abs(np.asarray(ref["delta"])).max(initial=0.0)) if "delta" in ref else 0.0
    for name in names:
        assert name in got.data_vars, f"{name} missing from the result"
        a, b = np.asarray(got[name]), np.asarray(ref[name])
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert got[name].dims == ref[name].dims, (name, got[name].dims, ref[name].dims)
        scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
        if name.endswith("residual"):
            scale = max(scale, change)
        err = float(np.abs(a - b).max(initial=0.0))
        assert err <= rtol * scale, f"{name}: max abs difference {err:.3e} > {rtol:g} x {scale:.3e}"


def identity_error(ds: xr.Dataset) -> float:
    """max |initial + data + weight_decay + momentum + residual - final| over queries and outputs."""

    def total(name: str) -> np.ndarray:
        var = ds[name]
        other = [d for d in var.dims if d not in ("query", "output")]
        return np.asarray(var.sum(other) if other else var)

    lhs = total("initial") + total("data") + total("weight_decay") + total("momentum") + total("residual")
    return float(np.abs(lhs - total("final")).max())
