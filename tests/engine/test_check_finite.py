"""``engine.result.check_finite``: every NaN / inf is found, also where a sum-based shortcut could be fooled."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from engine import NonFiniteResultError
from engine.result import check_finite
from explaind_store.schema import QUERY, STEP


def _ds(values: np.ndarray) -> xr.Dataset:
    return xr.Dataset({"data": ((QUERY, STEP), values), "count": ((QUERY,), np.arange(values.shape[0]))})


def test_finite_values_whose_sum_overflows_pass() -> None:
    ds = _ds(np.full((3, 4), 1e308))
    assert check_finite(ds) is ds


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_element_is_found_with_its_place(bad: float) -> None:
    v = np.random.default_rng(0).normal(size=(3, 4))
    v[2, 1] = bad
    with pytest.raises(NonFiniteResultError, match="query 2"):
        check_finite(_ds(v))


def test_opposite_infinities_are_found() -> None:
    v = np.zeros((3, 4))
    v[0, 0], v[1, 3] = np.inf, -np.inf
    with pytest.raises(NonFiniteResultError, match="'data'"):
        check_finite(_ds(v))
