"""Shared fixtures: small runs recorded through the real Recorder into Zarr stores on disk, and a process LocalCluster.

The tests are a package mirroring the code (``tests/store``, ``tests/engine/{ops,scan,cluster}``, ``tests/app``);
helpers live in ``tests/support`` and are imported as a package, ``from tests.support.store_helpers import train``
(pytest puts the repository root on ``sys.path`` because ``tests/`` has an ``__init__.py``; subprocesses get it
through ``PYTHONPATH``). Comparison helpers for engine results: :mod:`tests.support.compare`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.compare import MLP_SPEC


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 updates of SGD (momentum, dampening, coupled decay, LambdaLR), variable batches, store chunks of 2."""
    from tests.support.store_helpers import train

    path = tmp_path_factory.mktemp("engine") / "digits-sgd.zarr"
    train(path, 12, kind="sgd_momentum", chunk_updates=2, model_spec=MLP_SPEC)
    return path


@pytest.fixture(scope="session")
def adamw_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 updates of AdamW (two groups, decoupled decay, clipping), store chunks of 2."""
    from tests.support.store_helpers import train

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


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons (replay, resume, writer kinds) need the same summation order in both runs: one torch
    thread (multi-threaded CPU kernels are not reproducible run to run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
