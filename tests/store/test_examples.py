"""The built-in example tasks: models, data, batches and the resumable training loop."""

from __future__ import annotations

import copy
import functools
import itertools
import json
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import explaind_store
from explaind_store.examples import digits_cnn, modadd, tiny
from explaind_store.examples.training import (
    BatchSchedule,
    batch_indices,
    evaluate,
    triangular_lr,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: one thread is fastest and does not suffer when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- data -------------------------------------------------------------------------------------------------------------


def _pairs(x: torch.Tensor, p: int) -> set[int]:
    return set((x[:, 0] * p + x[:, 1]).tolist())


def test_modadd_data_paper_config_disjoint_and_correct():
    d = modadd.make_data()
    (xt, yt), (xv, yv) = d["train"], d["val"]
    assert xt.shape == (4000, 3) and xv.shape == (2000, 3)
    assert xt.dtype == yt.dtype == torch.int64
    assert (xt[:, 2] == 113).all() and (xv[:, 2] == 113).all()
    assert ((xt[:, 0] + xt[:, 1]) % 113 == yt).all() and ((xv[:, 0] + xv[:, 1]) % 113 == yv).all()
    assert len(_pairs(xt, 113)) == 4000 and len(_pairs(xv, 113)) == 2000
    assert not _pairs(xt, 113) & _pairs(xv, 113)
    again = modadd.make_data()
    assert torch.equal(again["train"][0], xt) and torch.equal(again["val"][0], xv)
    assert not torch.equal(modadd.make_data(seed=1)["train"][0], xt)


def test_modadd_data_clips_to_table():
    d = modadd.make_data(p=7, n_train=40, n_val=20)
    assert len(d["train"][0]) == 40 and len(d["val"][0]) == 9
    assert _pairs(d["train"][0], 7) | _pairs(d["val"][0], 7) == set(range(49))
    with pytest.raises(ValueError, match="validation split would be empty"):
        modadd.make_data(p=7, n_train=100, n_val=5)
    d = modadd.make_data(p=7, n_train=100, n_val=0)
    assert len(d["train"][0]) == 49 and len(d["val"][0]) == 0


def test_describe_sample():
    assert modadd.describe_sample(torch.tensor([100, 20, 113])) == "100 + 20 = 7"
    assert modadd.describe_sample([3, 5, 7]) == "3 + 5 = 1"


def test_digits_data_split():
    d = digits_cnn.make_data()
    (xt, yt), (xv, yv) = d["train"], d["val"]
    assert xt.shape == (1500, 1, 8, 8) and xv.shape == (297, 1, 8, 8)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert 0.0 <= float(xt.min()) and float(xt.max()) == 1.0
    assert set(yt.tolist()) == set(range(10))
    tr, va = digits_cnn.split_indices(297, 0)
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(digits_cnn.N_DIGITS))
    x_all, y_all = digits_cnn.load_all()
    assert torch.equal(x_all[va], xv) and torch.equal(y_all[tr], yt) and torch.equal(y_all[va], yv)
    assert torch.equal(digits_cnn.make_data()["val"][0], xv)
    assert not torch.equal(digits_cnn.split_indices(297, 1)[1], va)


def test_tiny_data():
    d = tiny.digits_subset()
    assert d["train"][0].shape == (24, 64) and d["val"][0].shape == (8, 64)
    assert d["train"][0].dtype == torch.float32 and d["train"][1].dtype == torch.int64
    rows = {tuple(r) for r in d["train"][0].tolist()}
    assert not rows & {tuple(r) for r in d["val"][0].tolist()}
    m = tiny.modadd_subset()
    assert m["train"][0].shape == (20, 3) and m["val"][0].shape == (8, 3)
    assert not _pairs(m["train"][0], 7) & _pairs(m["val"][0], 7)


# --- models -----------------------------------------------------------------------------------------------------------


def _modadd_small(act: str = "relu", dtype: str = "float32") -> nn.Module:
    return modadd.make_model(p=7, d_model=16, n_heads=4, d_mlp=32, act=act, dtype=dtype)


def _modadd_x(n: int = 5) -> torch.Tensor:
    return tiny.modadd_subset(p=7, n_train=n)["train"][0]


def _digits_x(n: int = 4) -> torch.Tensor:
    return digits_cnn.make_data()["train"][0][:n]


def _flat_digits_x(n: int = 4) -> torch.Tensor:
    return tiny.digits_subset(n, 0)["train"][0]


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], int]] = {
    "modadd-relu": (lambda: _modadd_small("relu"), _modadd_x, 7),
    "modadd-gelu": (tiny.make_tiny_transformer, _modadd_x, 7),
    "modadd-tanh": (lambda: _modadd_small("tanh"), _modadd_x, 7),
    "digits-cnn": (digits_cnn.make_model, _digits_x, 10),
    "mlp-tanh": (tiny.make_mlp, _flat_digits_x, 10),
    "mlp-relu": (functools.partial(tiny.make_mlp, act="relu"), _flat_digits_x, 10),
    "mlp-gelu": (functools.partial(tiny.make_mlp, act="gelu", depth=3), _flat_digits_x, 10),
}


@pytest.mark.parametrize("name", list(CASES))
def test_model_shapes_and_deterministic_init(name):
    factory, inputs, n_out = CASES[name]
    x = inputs()
    torch.manual_seed(3)
    a = factory()
    torch.manual_seed(3)
    b = factory()
    torch.manual_seed(4)
    c = factory()
    assert a(x).shape == (len(x), n_out)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(isinstance(p, nn.Parameter) for p in a.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_float64_functional_jvp_matches_finite_difference(name):
    factory, inputs, _ = CASES[name]
    torch.manual_seed(0)
    model = factory().double()
    x = inputs()
    if x.is_floating_point():
        x = x.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    tangent = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    norm = sum(float((t**2).sum()) for t in tangent.values()) ** 0.5
    tangent = {k: t / norm for k, t in tangent.items()}

    def f(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, ps, (x,))

    out, dout = jvp(f, (params,), (tangent,))
    assert out.dtype == torch.float64 and torch.allclose(out, model(x))
    h = 1e-6
    plus = f({k: v + h * tangent[k] for k, v in params.items()})
    minus = f({k: v - h * tangent[k] for k, v in params.items()})
    fd = (plus - minus) / (2 * h)
    assert dout.abs().max() > 1e-4  # the direction actually moves the outputs
    torch.testing.assert_close(dout, fd, rtol=1e-6, atol=1e-8)

    # jacrev agrees with jvp: J @ t == jvp
    jac = jacrev(f)(params)
    via_jac = sum((jac[k] * tangent[k]).reshape(*out.shape, -1).sum(-1) for k in params)
    torch.testing.assert_close(via_jac, dout, rtol=1e-10, atol=1e-12)

    # vmap(grad) per-sample gradients equal one autograd pass per sample
    def sample_loss(ps: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, ps, (xi.unsqueeze(0),))[0].logsumexp(-1)

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    for i in (0, len(x) - 1):
        model.zero_grad()
        model(x[i : i + 1])[0].logsumexp(-1).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-10, atol=1e-12)


def test_dtype_factory_argument():
    torch.manual_seed(0)
    m32 = modadd.make_model(p=7, d_model=8, n_heads=2, d_mlp=16)
    torch.manual_seed(0)
    m64 = modadd.make_model(p=7, d_model=8, n_heads=2, d_mlp=16, dtype="float64")
    for (k, a), (_, b) in zip(m32.named_parameters(), m64.named_parameters(), strict=True):
        assert b.dtype == torch.float64 and torch.equal(a.double(), b), k
    with pytest.raises(ValueError):
        tiny.make_mlp(dtype="float16")
    with pytest.raises(ValueError):
        tiny.make_mlp(act="swish")


def test_modadd_has_no_sdpa_and_digits_has_only_relu_kinks():
    kinds = {type(m) for m in digits_cnn.make_model().modules()}
    assert kinds <= {nn.Sequential, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear}
    strides = [m.stride for m in digits_cnn.make_model().modules() if isinstance(m, nn.Conv2d)]
    assert strides == [(1, 1), (2, 2)]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in modadd.make_model().modules())
    assert sum(p.numel() for p in modadd.make_model().parameters()) == 97024


# --- batches and schedule ---------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step():
    n, bs = 100, 32  # 4 batches per epoch: 32, 32, 32, 4
    assert torch.equal(batch_indices(n, bs, 0, 7), batch_indices(n, bs, 0, 7))
    assert not torch.equal(batch_indices(n, bs, 0, 1), batch_indices(n, bs, 0, 2))
    assert not torch.equal(batch_indices(n, bs, 0, 1), batch_indices(n, bs, 1, 1))
    assert not torch.equal(batch_indices(n, bs, 0, 1), batch_indices(n, bs, 0, 5))  # next epoch reshuffles
    for epoch in range(3):
        parts = [batch_indices(n, bs, 0, 4 * epoch + j) for j in (1, 2, 3, 4)]
        assert [len(b) for b in parts] == [32, 32, 32, 4]
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
    sched = BatchSchedule(n, bs, 0)
    for s in (9, 1, 2, 12, 5, 5, 3):  # any access order gives the same batches
        assert torch.equal(sched(s), batch_indices(n, bs, 0, s))
    assert torch.equal(batch_indices(n, None, 0, 3), torch.arange(n))
    assert torch.equal(batch_indices(n, 500, 0, 3), torch.arange(n))
    with pytest.raises(ValueError):
        batch_indices(n, bs, 0, 0)


def test_triangular_schedule_and_json_state():
    f = functools.partial(triangular_lr, total=10, warmup=3)
    lrs = [f(e) for e in range(10)]  # update u = e + 1
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))
    assert lrs[-1] > 0
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    state = json.loads(json.dumps(sched.state_dict()))
    assert state["last_epoch"] == 0


# --- training ---------------------------------------------------------------------------------------------------------


def test_modadd_learns_tiny_task():
    r = modadd.train(
        steps=60, p=7, n_train=35, n_val=14, d_model=32, n_heads=4, d_mlp=64, lr=1e-2, weight_decay=1.0,
        progress=False, eval_every=30,
    )
    assert [e["step"] for e in r.evals] == [0, 30, 60]
    assert len(r.losses) == 60 and r.updates_done == 60
    assert r.evals[-1]["train_loss"] < 0.2 * r.evals[0]["train_loss"]
    assert r.evals[-1]["train_acc"] >= 0.9 > r.evals[0]["train_acc"]


def test_digits_loss_decreases_and_eval_does_not_change_trajectory():
    state = torch.get_rng_state()
    a = digits_cnn.train(steps=30, progress=False, eval_every=0)
    b = digits_cnn.train(steps=30, progress=False, eval_every=1)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert sum(a.losses[-5:]) < 0.7 * sum(a.losses[:5])
    assert a.losses == b.losses and not a.evals and len(b.evals) == 31
    for (k, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), k
    c = digits_cnn.train(steps=30, seed=1, progress=False, eval_every=0)
    assert c.losses != a.losses
    ev = evaluate(a.model, digits_cnn.make_data())
    assert set(ev) == {"train_loss", "train_acc", "val_loss", "val_acc"} and ev["val_acc"] > 0.5


# --- the recorder-facing path, with an in-memory stand-in for the Recorder --------------------------------------------


class FakeRecorder:
    """Mimics the Recorder contract: commits every ``chunk_updates`` records and at close; restores on resume."""

    stores: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, path, model, optimizer, *, data, loss, model_spec, splits, scheduler=None, resume=False,
                 overwrite=False, chunk_updates=None):
        self.path, self.model, self.optimizer, self.scheduler = str(path), model, optimizer, scheduler
        self.chunk = chunk_updates or 4
        assert loss == "cross_entropy" and model_spec["factory"].startswith("explaind_store.examples.")
        assert set(splits) == {"val"} and len(data) == 2
        store = self.stores.get(self.path)
        if store is not None and not (resume or overwrite):
            raise FileExistsError(self.path)
        if store is None or overwrite:
            store = {"batches": [], "losses": [], "lrs": [], "commit": None, "spec": model_spec, "n": len(data[0])}
            self.stores[self.path] = store
            self.updates_done = 0
        else:
            c = store["commit"]
            model.load_state_dict(c["model"])
            optimizer.load_state_dict(c["opt"])
            if scheduler is not None:
                scheduler.load_state_dict(json.loads(c["sched"]))
            self.updates_done = c["updates"]
            for key in ("batches", "losses", "lrs"):
                del store[key][self.updates_done :]
        self.store = store

    def record(self, batch, loss=None):
        self.store["batches"].append(torch.as_tensor(batch).clone())
        self.store["losses"].append(loss)
        self.store["lrs"].append([g["lr"] for g in self.optimizer.param_groups])
        if len(self.store["batches"]) % self.chunk == 0:
            self._commit()

    def _commit(self):
        self.store["commit"] = {
            "updates": len(self.store["batches"]),
            "model": copy.deepcopy(self.model.state_dict()),
            "opt": copy.deepcopy(self.optimizer.state_dict()),
            "sched": None if self.scheduler is None else json.dumps(self.scheduler.state_dict()),
        }

    def close(self):
        c = self.store["commit"]
        if c is None or c["updates"] < len(self.store["batches"]):
            self._commit()


@pytest.mark.parametrize("stop", [8, 10])  # 8: committed inside record() (before scheduler.step); 10: at close()
def test_resume_is_bit_for_bit_with_recorder_contract(monkeypatch, stop):
    monkeypatch.setattr(explaind_store, "Recorder", FakeRecorder, raising=False)
    FakeRecorder.stores.clear()
    # 1500 = 5 * 256 + 220: ragged batches
    kw: dict[str, Any] = {"steps": 20, "batch_size": 256, "progress": False, "eval_every": 0}
    ref = digits_cnn.train("full", **kw)
    part = digits_cnn.train("part", callback=lambda s, loss, m: s == stop, **kw)
    assert part.updates_done == stop and len(FakeRecorder.stores["part"]["batches"]) == stop
    rest = digits_cnn.train("part", resume=True, **kw)
    assert rest.first_update == stop + 1 and len(rest.losses) == 20 - stop
    full, resumed = FakeRecorder.stores["full"], FakeRecorder.stores["part"]
    assert full["lrs"] == resumed["lrs"] and full["losses"] == resumed["losses"]
    used = [0.05 * triangular_lr(s - 1, total=20, warmup=4) for s in range(1, 21)]  # lr of update s, at record
    assert [lr for (lr,) in full["lrs"]] == pytest.approx(used)
    assert all(torch.equal(a, b) for a, b in zip(full["batches"], resumed["batches"], strict=True))
    assert [len(b) for b in full["batches"][:6]] == [256] * 5 + [220]
    for s, b in enumerate(full["batches"], start=1):
        assert torch.equal(b, batch_indices(1500, 256, 0, s))
    assert full["spec"] == {"factory": "explaind_store.examples.digits_cnn:make_model",
                            "kwargs": {"channels": [8, 16], "hidden": 32, "dtype": "float32"}}
    plain = digits_cnn.train(None, **kw)  # recording does not change the trajectory either
    assert plain.losses == ref.losses
    for (k, p), (_, q), (_, r) in zip(ref.model.named_parameters(), rest.model.named_parameters(),
                                      plain.model.named_parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r), k


def test_modadd_resume_full_batch_adamw(monkeypatch):
    monkeypatch.setattr(explaind_store, "Recorder", FakeRecorder, raising=False)
    FakeRecorder.stores.clear()
    sizes = {"p": 7, "n_train": 30, "n_val": 10, "d_model": 8, "n_heads": 2, "d_mlp": 16}
    kw: dict[str, Any] = {"steps": 12, "progress": False, "eval_every": 0, **sizes}
    ref = modadd.train(**kw)
    modadd.train("m", callback=lambda s, loss, m: s == 5, **kw)
    rest = modadd.train("m", resume=True, **kw)
    store = FakeRecorder.stores["m"]
    assert all(torch.equal(b, torch.arange(30)) for b in store["batches"]) and len(store["batches"]) == 12
    assert store["losses"] == ref.losses
    assert store["spec"]["kwargs"] == {"p": 7, "d_model": 8, "n_heads": 2, "d_mlp": 16, "act": "relu",
                                       "dtype": "float32"}
    for (k, p), (_, q) in zip(ref.model.named_parameters(), rest.model.named_parameters(), strict=True):
        assert torch.equal(p, q), k


def test_resume_rejects_a_scheduler_that_was_not_restored(monkeypatch):
    class NoSchedulerRestore(FakeRecorder):
        def __init__(self, *args, scheduler=None, **kwargs):
            super().__init__(*args, scheduler=None, **kwargs)

    monkeypatch.setattr(explaind_store, "Recorder", NoSchedulerRestore, raising=False)
    FakeRecorder.stores.clear()
    kw: dict[str, Any] = {"steps": 10, "progress": False, "eval_every": 0}
    digits_cnn.train("x", callback=lambda s, loss, m: s == 6, **kw)
    with pytest.raises(RuntimeError, match="scheduler"):
        digits_cnn.train("x", resume=True, **kw)


# --- the real Recorder, once it exists --------------------------------------------------------------------------------


def test_real_recorder_resume_matches_plain_training(tmp_path):
    try:
        from explaind_store import Recorder  # noqa: F401
    except ImportError:
        pytest.skip("explaind_store.recorder is not there yet")
    kw: dict[str, Any] = {"steps": 12, "progress": False, "eval_every": 0}
    plain = digits_cnn.train(None, **kw)
    out = str(tmp_path / "digits.zarr")
    digits_cnn.train(out, callback=lambda s, loss, m: s == 7, **kw)
    rest = digits_cnn.train(out, resume=True, **kw)
    assert rest.first_update == 8 and rest.losses == plain.losses[7:]
    for (k, p), (_, q) in zip(plain.model.named_parameters(), rest.model.named_parameters(), strict=True):
        assert torch.equal(p, q), k
