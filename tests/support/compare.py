"""Comparing engine results: every variable to a relative tolerance, and the exactness identity."""

from __future__ import annotations

import numpy as np
import xarray as xr

from explaind_store.specs import model_spec

# the digits MLP of store_helpers (Linear(64, 6) -> Tanh -> Linear(6, 10)) rebuilt by a built-in (trusted) factory
MLP_SPEC = model_spec("explaind_store.examples.tiny:make_mlp", in_dim=64, hidden=6, out_dim=10, depth=1, act="tanh")

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
