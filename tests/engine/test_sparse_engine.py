"""The engine on runs with sparse checkpoints: chunks replay from their checkpoint, and the jump to each stored
checkpoint is the ``replay_residual``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from tests.support.compare import MLP_SPEC, assert_results_close, identity_error
from tests.support.store_helpers import train

import engine
from engine import plan
from explaind_store import open_run, schema

STEPS = 20
BY = "sample,step"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same run (SGD with momentum and coupled decay) recorded at K = 1, 4, 16, at one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sparse_engine")
    try:
        for k in (1, 4, 16):
            train(root / f"k{k}", STEPS, kind="sgd_momentum", chunk_updates=4, checkpoint_every=k,
                  model_spec=MLP_SPEC)
    finally:
        torch.set_num_threads(before)
    return root


def _attribute(path, **kw):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return engine.attribute(open_run(path), queries="val[:2]", by=BY, client="sync", progress=False, **kw)
    finally:
        torch.set_num_threads(before)


def _relative_identity_error(ds) -> float:
    return identity_error(ds) / float(np.abs(np.asarray(ds["final"] - ds["initial"])).max())


def test_plan_puts_chunk_boundaries_on_checkpoints():
    assert plan.plan_chunks((0, 20), store_chunk=4, checkpoints=[0, 16, 20]) == [(0, 16), (16, 20)]
    assert plan.plan_chunks((2, 20), store_chunk=4, checkpoints=[0, 8, 16, 20], max_updates=5) == [
        (2, 7), (7, 8), (8, 13), (13, 16), (16, 20)]


@pytest.fixture(scope="module")
def dense_result(stores):
    return _attribute(stores / "k1")


@pytest.mark.parametrize("k", [1, 4, 16])
def test_sparse_results_agree_with_the_dense_run(stores, dense_result, k):
    ds = _attribute(stores / f"k{k}")
    run = open_run(stores / f"k{k}")
    if run.sparse:  # every checkpoint inside the window ends a chunk
        assert ds.attrs["n_chunks"] >= len([c for c in run.checkpoint_steps if 0 < c < STEPS]) + 1
    assert _relative_identity_error(ds) <= 1e-10
    # at one torch thread replay is bit-exact: nothing to report, and the same decomposition as the dense run
    assert float(np.abs(np.asarray(ds["replay_residual"])).max()) == 0.0
    assert ds.attrs["max_replay_residual"] == 0.0
    assert_results_close(ds, dense_result, rtol=1e-10)


def test_perturbed_checkpoint_shows_as_a_replay_residual_of_its_size(stores, tmp_path):
    import shutil

    path = tmp_path / "k4"
    shutil.copytree(stores / "k4", path)
    run = open_run(path)
    name, c, delta = run.tensor_names[0], 8, 1e-3
    arr = zarr.open_array(str(path / schema.PARAMS / name), mode="r+")
    value = np.asarray(arr[c])
    value[0, :] += delta  # one row of the first layer's weights, moved by a known amount
    arr[c] = value
    run = open_run(path)
    replayed = open_run(stores / "k1").load_params(c)  # what replay gives at c (bit-exact at one thread)
    x, _ = run.split("val")

    def f(params):
        model = run.build_model().double()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
            return torch.log_softmax(model(x[:2].double()), dim=-1).numpy()

    expect = f(run.load_params(c)) - f(replayed)
    assert np.abs(expect).max() > 1e-5  # the perturbation is visible in the outputs
    # by default the guard refuses it, naming the checkpoint: the replay of updates 5..8 misses the stored state
    with pytest.raises(engine.InexactRecordError, match="checkpoint of step 8: replaying updates 5..8"):
        _attribute(path)
    ds = _attribute(path, residual_tol=None)  # and reports it at its size when asked for the result anyway
    got = np.asarray(ds["replay_residual"].sel(step=c))
    np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-14)
    # before c replay is exact; after c it starts from the perturbed parameters, so the later stored checkpoints
    # (from the real training) differ from it too, and only checkpoints carry replay residuals
    res = np.abs(np.asarray(ds["replay_residual"])).max(axis=(0, 1))
    steps = ds["step"].values
    assert res[steps < c].max() == 0.0
    assert res[[not run.is_stored(int(s)) for s in steps]].max() == 0.0
    assert res[steps == 12].max() > 0.0
    assert _relative_identity_error(ds) <= 1e-10


def test_workers_replay_their_chunks(stores, dense_result):
    """On a LocalCluster each chunk task opens the run and replays its segment itself. Workers may use two torch
    threads, so replay need not be bit-exact there: the results then differ from the dense run's by about the
    reported replay residual, and the identity still closes."""
    # client=None: the engine's own LocalCluster (another test may have closed the session's one)
    ds = engine.attribute(open_run(stores / "k4"), queries="val[:2]", by=BY, client=None, chunk_updates=4,
                          progress=False)
    assert "workers" in ds.attrs["scheduler"]
    assert ds.attrs["n_chunks"] >= 5
    assert _relative_identity_error(ds) <= 1e-10
    reported = float(np.abs(np.asarray(ds["replay_residual"])).sum(axis=-1).max())
    for name in ("data", "weight_decay", "momentum", "initial", "final"):
        scale = float(np.abs(np.asarray(dense_result[name])).max())
        diff = float(np.abs(np.asarray(ds[name] - dense_result[name])).max())
        assert diff <= reported + 1e-12 * scale, (name, diff, reported)


def test_a_wrong_batch_between_checkpoints_is_refused_at_the_next_checkpoint(stores, tmp_path):
    """Between checkpoints the engine replays the records, so a batch record that is not what was trained on is
    self-consistent there and shows only where the replay meets the next stored checkpoint: the guard refuses it,
    naming that checkpoint (the dense store's rounding check cannot see it in a sparse run)."""
    import shutil

    path = tmp_path / "k4"
    shutil.copytree(stores / "k4", path)
    arr = zarr.open_array(str(path / schema.UPDATES / schema.BATCH), mode="r+")
    row = np.asarray(arr[6])
    n = int(open_run(path).attrs["data"]["splits"]["train"]["n"])
    arr[6] = np.where(row >= 0, (row + 1) % n, row)  # other samples of the same size, all in range
    with pytest.raises(engine.InexactRecordError, match="checkpoint of step 8: replaying updates 5..8"):
        _attribute(path)
