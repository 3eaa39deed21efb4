"""One Trajectory test class (:mod:`tests.support.trajectory_contract`) run against both implementations: the
store-backed ``Run`` and the in-memory trajectory, recorded from the same training run."""

from __future__ import annotations

import pytest

from tests.support.trajectory_contract import Recorded, TrajectoryContract, record_both


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    return record_both(tmp_path_factory.mktemp("contract") / "run.zarr")


class TestStoreTrajectory(TrajectoryContract):
    backend = "store"


class TestInMemoryTrajectory(TrajectoryContract):
    backend = "memory"
