"""Runs with dropout (issues 14 and 16): the recorder keeps the generator state of every training forward, replay
reproduces training bit for bit (also between sparse checkpoints), and the decomposition regenerates the masks and
applies them per sample, so it adds up and matches a float64 brute force that applies the same masks. Randomness
that is not a dropout call is refused with the cause, never turned into a plausible number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.support.compare import assert_results_close, identity_error
from tests.support.oracle import TrainedRun, oracle, rel
from torch import nn

import engine
from explaind_store import Recorder, open_run, schema
from explaind_store.dropout import DropoutReplayError
from explaind_store.examples.tiny import digits_subset, make_mlp
from explaind_store.specs import loss_spec, model_spec
from explaind_store.trajectory import InMemoryTrajectory

STEPS, BATCH, HIDDEN, P = 12, 8, 8, 0.3
MLP = dict(in_dim=64, hidden=HIDDEN, out_dim=10, depth=1, act="tanh", dropout=P)


def _steps(net, opt, rec, x, y, gen, steps: int) -> None:
    """``steps`` AdamW updates on random batches of ``BATCH``, each recorded with its loss."""
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:BATCH]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record(idx, loss=loss.item())


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = digits_subset(40, 4, seed=0)
    return (*d["train"], *d["val"])


def _train(path: Path, k: int, dtype: str = "float32") -> dict[str, Any]:
    """AdamW on an MLP with nn.Dropout(0.3) in train mode, recorded with checkpoint_every=k. Returns the generator
    states taken by hand before each forward, the masks derived from them independently of the store (checked to be
    the ones training applied) and an in-memory copy of the run for the oracle."""
    x, y, xv, yv = _data()
    x, xv = x.to(getattr(torch, dtype)), xv.to(getattr(torch, dtype))
    spec = {**MLP, "dtype": dtype}
    torch.manual_seed(1)
    net = make_mlp(**spec).train()
    start = {n: t.clone() for n, t in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    states, masks, batches = [], [], []

    def rebuilt() -> nn.Module:
        m = make_mlp(**spec)
        m.load_state_dict(start)
        return m

    traj = InMemoryTrajectory.start(net, opt, rebuilt, {"train": (x, y)}, loss_spec("cross_entropy"))
    with Recorder(path, net, opt, data=(x, y), splits={"val": (xv, yv)}, model_spec=model_spec(make_mlp, **spec),
                  checkpoint_every=k, chunk_updates=4) as rec:
        for _ in range(STEPS):
            idx = torch.randperm(len(x), generator=gen)[:BATCH]
            state = torch.get_rng_state()
            out = net(x[idx])
            with torch.random.fork_rng(devices=[]):  # CPU dropout: bernoulli(1 - p) / (1 - p) of the input's shape
                torch.set_rng_state(state)
                mask = torch.empty(BATCH, HIDDEN, dtype=x.dtype).bernoulli_(1 - P).div_(1 - P)
            with torch.no_grad():
                assert torch.equal(out, net[3](net[1](net[0](x[idx])) * mask))  # the mask training applied
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            lrs = [g["lr"] for g in opt.param_groups]
            opt.step()
            rec.record(idx, loss=loss.item())
            traj.record(net, opt, idx, lrs)
            states.append(state.numpy())
            masks.append(mask)
            batches.append(idx)
    return {"states": states, "masks": masks, "batches": batches, "traj": traj, "factory": rebuilt}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run recorded at K = 1 and K = 8, at one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dropout")
    try:
        return root, {k: _train(root / f"k{k}", k) for k in (1, 8)}
    finally:
        torch.set_num_threads(before)


def _attribute(path: Path, **kw: Any):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return engine.attribute(open_run(path), queries="val", by="sample,step", client="sync", progress=False, **kw)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def results(runs):
    root, _ = runs
    return {k: _attribute(root / f"k{k}") for k in (1, 8)}


def test_recorder_keeps_the_generator_state_of_every_training_forward(runs):
    root, made = runs
    run = open_run(root / "k1")
    assert run.rng_info == {"device": "cpu", "dtype": "float32"}
    states = run.updates[schema.RNG_STATE].values
    assert states.shape == (STEPS + 1, 1, len(made[1]["states"][0])) and states.dtype == np.uint8
    assert not states[0].any()  # index 0: no update
    for s in range(1, STEPS + 1):
        np.testing.assert_array_equal(states[s, 0], made[1]["states"][s - 1])
    np.testing.assert_array_equal(run.updates[schema.MICRO_SIZE].values[1:, 0], BATCH)


def test_sparse_dropout_run_replays_training_bit_for_bit(runs, one_thread):
    root, _ = runs
    dense, sparse = open_run(root / "k1"), open_run(root / "k8")
    assert sparse.sparse and sparse.checkpoint_steps.tolist() == [0, 8, STEPS]
    for s in range(STEPS + 1):
        for name, value in sparse.load_params(s).items():
            torch.testing.assert_close(value, dense.load_params(s)[name], rtol=0, atol=0)
    for run in (dense, sparse):
        rep = run.verify()
        assert rep.ok, rep.table()
        assert rep.gradient_checked and rep.gradient_max_rel_error < 1e-6
    assert [c["max_abs"] for c in sparse.verify(chunks=False).checkpoint_replay] == [0.0, 0.0]


def test_dropout_run_decomposes_exactly_and_alike_at_k1_and_k8(results):
    for ds in results.values():
        change = float(np.abs(np.asarray(ds["final"] - ds["initial"])).max())
        assert identity_error(ds) <= 1e-10 * change
        # the masks regenerated: the rebuilt movement is the stored one up to float32 rounding
        assert ds.attrs["max_rounding_residual"] < 1e-5 * ds.attrs["max_abs_change"]
        assert float(np.abs(ds["data"].values).max()) > 1e-3
    assert float(np.abs(np.asarray(results[8]["replay_residual"])).max()) == 0.0
    assert_results_close(results[8], results[1], rtol=1e-10)


def test_producer_threads_replay_the_masks_on_their_own_models(runs, results):
    """With two torch threads pass 2's producer threads and its helping consumer take the updates as they come,
    each regenerating its updates' masks on its own copy of the model (the dropout state is per thread and per
    model): the result is the one-producer pipeline's bit for bit and the one-thread run's to rounding."""
    import copy

    from engine import settings
    from explaind_store import dropout

    net = make_mlp(**MLP)
    twin = copy.deepcopy(net if dropout.install(net) else net)  # how pass 2 gives each thread its own model
    assert dropout.control(twin) is not None and dropout.control(twin) is not dropout.control(net)
    root, _ = runs
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = {}
        for name, kw in (("one", dict(pipeline_help=False)), ("help", {}), ("two", dict(pipeline_producers=2))):
            with settings.override(**kw):
                out[name] = engine.attribute(open_run(root / "k8"), queries="val", by="sample,step", client="sync",
                                             progress=False)
    finally:
        torch.set_num_threads(before)
    for v in out["one"].data_vars:
        assert np.array_equal(out["help"][v].values, out["one"][v].values, equal_nan=True), v
        assert np.array_equal(out["two"][v].values, out["one"][v].values, equal_nan=True), v
    assert_results_close(out["help"], results[8], rtol=1e-10)


def test_per_sample_contributions_match_a_float64_oracle_with_the_same_masks(tmp_path):
    """Trained in float64, so that the engine and the brute force agree to float64 rounding."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _train(tmp_path / "f64", 1, dtype="float64")
        ds = _attribute(tmp_path / "f64")
    finally:
        torch.set_num_threads(before)
    assert open_run(tmp_path / "f64").rng_info["dtype"] == "float64"
    x, y, xv, yv = _data()
    x, xv = x.double(), xv.double()
    pos = [{int(k): i for i, k in enumerate(b)} for b in run["batches"]]

    def masks(s: int, k: int) -> list[torch.Tensor]:
        return [run["masks"][s - 1][pos[s - 1][k]][None]]

    o = oracle(TrainedRun("dropout", run["traj"], run["factory"], x, y, xv, yv), output="log_softmax",
               dropout_masks=masks)
    assert o.replay_error < 1e-12
    got = ds["data"].values.reshape(-1, *ds["data"].shape[2:])  # (R, N, S)
    assert rel(got, o.data.sum(-1)) < 1e-10
    # without the masks the per-sample split is another one (the test can tell them apart)
    o_plain = oracle(TrainedRun("plain", run["traj"], run["factory"], x, y, xv, yv), output="log_softmax")
    assert rel(got, o_plain.data.sum(-1)) > 1e-2


class _NoisyMLP(nn.Module):
    """Random masks drawn by hand (torch.rand), not by a dropout call: the decomposition cannot regenerate them."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.l1, self.l2, self.functional = nn.Linear(64, 8), nn.Linear(8, 10), functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.functional:  # F.dropout called directly: regenerated like nn.Dropout
            h = F.dropout(h, P, self.training)
        elif self.training:
            h = h * (torch.rand_like(h) > P) / (1 - P)
        return self.l2(h)


def noisy_mlp() -> nn.Module:
    return _NoisyMLP()


def functional_mlp() -> nn.Module:
    return _NoisyMLP(functional=True)


def _record(path: Path, factory) -> Path:
    x, y, xv, yv = _data()
    torch.manual_seed(1)
    net = factory()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    with Recorder(path, net, opt, data=(x, y), splits={"val": (xv, yv)}, model_spec=model_spec(factory)) as rec:
        _steps(net, opt, rec, x, y, gen, 4)
    return path


def test_randomness_outside_dropout_calls_gives_the_cause_not_a_number(tmp_path):
    path = _record(tmp_path / "noisy.zarr", noisy_mlp)
    with pytest.raises(DropoutReplayError, match="outside torch.nn.functional.dropout") as err:
        engine.attribute(open_run(path, model_factory=noisy_mlp), queries="val", client="sync", progress=False)
    assert "nn.Dropout" in str(err.value) and "attn_implementation='eager'" in str(err.value)
    rep = open_run(path, model_factory=noisy_mlp).verify(chunks=False)
    assert not rep.ok and any("outside torch.nn.functional.dropout" in p for p in rep.problems)
    # the same masks drawn by F.dropout inside forward are regenerated: exact
    ok = _record(tmp_path / "functional.zarr", functional_mlp)
    ds = engine.attribute(open_run(ok, model_factory=functional_mlp), queries="val", client="sync", progress=False)
    assert identity_error(ds) <= 1e-10 * float(np.abs(np.asarray(ds["final"] - ds["initial"])).max())


def test_accumulated_micro_batches_must_match_the_training_forwards(tmp_path):
    x, y, _, _ = _data()
    torch.manual_seed(1)
    net = make_mlp(**MLP).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Recorder(tmp_path / "run.zarr", net, opt, data=(x, y), model_spec=model_spec(make_mlp, **MLP)) as rec:
        for sl in (slice(0, 4), slice(4, 8)):  # two micro-batches ...
            F.cross_entropy(net(x[sl]), y[sl]).backward()
        opt.step()
        with pytest.raises(Exception, match="ran 2 training forward"):
            rec.record(range(8))  # ... recorded as one batch


def test_resumed_dropout_recording_keeps_recording_generator_states(tmp_path):
    x, y, xv, yv = _data()
    path = tmp_path / "run.zarr"
    spec = model_spec(make_mlp, **MLP)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    for part in range(2):  # 3 updates, closed; then resumed for 3 more
        net = make_mlp(**MLP).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        with Recorder(path, net, opt, data=(x, y), splits={"val": (xv, yv)}, model_spec=spec, chunk_updates=2,
                      resume=part == 1) as rec:
            _steps(net, opt, rec, x, y, gen, 3)
    run = open_run(path)
    assert run.committed_updates == 6
    states = run.updates[schema.RNG_STATE].values
    assert all(states[s].any() for s in range(1, 7))
    assert run.updates[schema.MICRO_SIZE].values[1:, 0].tolist() == [BATCH] * 6
    rep = run.verify(chunks=False)
    assert rep.ok and rep.gradient_checked and rep.gradient_max_rel_error < 1e-6, rep.table()
