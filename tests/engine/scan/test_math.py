"""The engine's per-update math and chunked two-pass algorithm against the float64 brute force (tests/oracle.py).

"Exact" means: engine scores equal the oracle's explicit double sums to 1e-10 relative (max abs error over max abs
value of the array), all parts add up to ``final - initial - residual`` to 1e-10, and different chunkings agree
to 1e-12.
"""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
import xarray as xr
from tests.support.oracle import (
    margin_breakpoints,
    oracle,
    query_values,
    rel,
    relu1_breakpoints,
    train,
)
from torch.func import functional_call

from engine.scan import Problem, attribute_local, carries, context, pass1, pass2, result_meta
from engine.plan import chunk_bounds
from engine.ops.optim_terms import applied_decay, applied_scalar
from engine.ops.persample import choose_method
from engine.result import assemble, chunk_shapes, combine, finalize_attrs, param_var

ALL_BY = frozenset({"sample", "step", "tensor", "param"})
OPTS = ("adamw", "adam_wd", "adam", "sgd_momentum", "sgd_nesterov", "sgd")
EXACT = "gauss:8"  # smooth models, tiny steps: converged to float64 rounding (the oracle uses 12 nodes)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def run_of(model: str, opt: str, dtype: str = "float64", warmup: int = 0):
    return train(model, opt, dtype=dtype, warmup=warmup)


@functools.cache
def oracle_of(model: str, opt: str, output: str = "log_softmax", window: tuple[int, int] | None = None):
    run = run_of(model, opt)
    bps = None
    if output == "margin":
        net = run.factory().double()
        xq = run.xq.double() if run.xq.is_floating_point() else run.xq
        bps = margin_breakpoints(lambda p: functional_call(net, p, (xq,)), run.yq)
    return oracle(run, output=output, window=window, breakpoints=bps)


def engine(run, chunk_updates: int = 3, **kw) -> xr.Dataset:
    kw.setdefault("by", ALL_BY)
    kw.setdefault("rule", EXACT)
    keep_u = kw.pop("keep_u", None)
    return attribute_local(run.traj, Problem(run.xq, run.yq, **kw), chunk_updates=chunk_updates, keep_u=keep_u)


def rows(ds: xr.Dataset, name: str) -> np.ndarray:
    """A variable with (query, output) flattened to the oracle's R rows."""
    v = ds[name].values
    return v.reshape(-1, *v.shape[2:])


def total(ds: xr.Dataset, name: str) -> np.ndarray:
    v = ds[name]
    return v.sum([d for d in v.dims if d not in ("query", "output")]).values.reshape(-1)


def same(ds: xr.Dataset, ref: xr.Dataset, tol: float = 1e-12, what: object = "") -> None:
    """Every variable of ``ds`` equals ``ref``'s to ``tol`` relative; residual-like variables (pure rounding noise
    in float64) relative to the size of the explained change instead of their own size."""
    scale = ref.attrs["max_abs_change"]
    for v in ref.data_vars:
        a, b = np.asarray(ds[v].values, dtype=np.float64), np.asarray(ref[v].values, dtype=np.float64)
        floor = scale if "residual" in v else 0.0
        err = float(np.abs(a - b).max(initial=0.0)) / max(float(np.abs(b).max(initial=0.0)), floor, 1e-300)
        assert err < tol, (what, v, err)


def check_identities(ds: xr.Dataset, tol: float = 1e-10) -> dict[str, float]:
    """The sums every result must satisfy; returns the measured relative errors."""
    change = total(ds, "final") - total(ds, "initial")
    parts = total(ds, "data") + total(ds, "weight_decay") + total(ds, "momentum")
    err = {"identity": rel(parts + total(ds, "residual"), change)}
    # per update: movement parts + residual == delta, and residual == quadrature + rounding
    mov = ds["movement"]
    mov = mov.sum([d for d in mov.dims if d not in ("query", "output", "step")])
    err["per_update"] = rel((mov + ds["residual"]).values, ds["delta"].values)
    err["residual_split"] = rel(ds["residual"].values, (ds["quadrature_residual"] + ds["rounding_residual"]).values)
    err["telescoping"] = rel(ds["delta"].sum("step").values.reshape(-1), change)
    # origin-step totals == movement-step totals, per part
    for i, part in enumerate(("data", "weight_decay", "momentum")):
        m = ds["movement"].isel(part=i)
        err[f"movement_{part}"] = rel(m.sum([d for d in m.dims if d not in ("query", "output")]).values.reshape(-1),
                                      total(ds, part))
    # element-wise scores add up to the totals
    pvars = [v for v in ds.data_vars if v.startswith("param_")]
    if pvars:
        for i, part in enumerate(("data", "weight_decay", "momentum")):
            s = sum(ds[v].isel(part=i).sum([d for d in ds[v].dims if d not in ("query", "output", "part")])
                    for v in pvars)
            err[f"param_{part}"] = rel(s.values.reshape(-1), total(ds, part))
    for k, v in err.items():
        assert v < tol, (k, v, err)
    return err


def compare(ds: xr.Dataset, o, tol: float = 1e-10, what: str = "") -> dict[str, float]:
    R = o.f.shape[1]
    S = o.quad.shape[1]
    err = {
        "initial": rel(total(ds, "initial"), o.f[0]),
        "final": rel(total(ds, "final"), o.f[-1]),
        "delta": rel(rows(ds, "delta"), (o.f[1:] - o.f[:-1]).T),
        "data": rel(rows(ds, "data"), o.data),
        "weight_decay": rel(rows(ds, "weight_decay"), o.weight_decay),
        "momentum": rel(rows(ds, "momentum"), o.momentum),
        "movement": rel(rows(ds, "movement").reshape(R, S, 3, -1), o.movement),
        "quad": rel(rows(ds, "delta") - rows(ds, "quadrature_residual"), o.quad),
    }
    if any(v.startswith("param_") for v in ds.data_vars):
        err["param"] = max(rel(rows(ds, param_var(n)), o.param[n]) for n in o.tensors)
    bad = {k: v for k, v in err.items() if not v < tol}
    assert not bad, (what, bad, err)
    return err


# ----------------------------------------------------------------------------------------------------------------
# The main oracle comparison: every optimizer setting on both model families
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("opt", OPTS)
def test_matches_oracle(model, opt):
    run = run_of(model, opt)
    o = oracle_of(model, opt)
    # the oracle's hand-written update rule, split into pieces, reproduces torch's stored movement
    assert o.replay_error < 1e-12, o.replay_error
    if opt in ("adamw", "sgd_momentum"):
        assert run.info["clipped_updates"] > 0  # clipping was active: grad_scale != 1 is exercised
    ds = engine(run)
    compare(ds, o, what=run.name)
    check_identities(ds)
    # trained in float64: the movement rebuilt from recomputed gradients matches the stored one
    assert ds.attrs["max_rounding_residual"] < 1e-13 * ds.attrs["max_abs_change"]
    # something was actually attributed to every part that exists for this optimizer
    assert np.abs(ds["data"].values).max() > 1e-4
    if opt != "adam":
        assert np.abs(ds["weight_decay"].values).max() > 1e-8


WINDOW_CASES = [("mlp", o) for o in OPTS] + [("transformer", "adamw"), ("transformer", "sgd_nesterov")]


@pytest.mark.parametrize("model,opt", WINDOW_CASES)
def test_window_matches_oracle(model, opt):
    """Windows (a, b) with a > 0: carried momentum from the stored state at a; parts sum to F(b) - F(a)."""
    run = run_of(model, opt)
    window = (3, 9)
    o = oracle_of(model, opt, window=window)
    assert o.replay_error < 1e-12
    ds = engine(run, window=window)
    assert list(ds["step"].values) == list(range(4, 10))
    compare(ds, o, what=f"{run.name} window {window}")
    check_identities(ds)
    if opt != "sgd":  # every optimizer with momentum carries some over the window start
        assert np.abs(ds["momentum"].values).max() > 1e-6
    else:
        assert np.abs(ds["momentum"].values).max() == 0.0


@pytest.mark.parametrize("opt", ["adamw", "sgd_momentum"])
def test_warm_started_recording(opt):
    """Recording starts from a warm optimizer: momentum stored at step 0 is carried over, and torch's step counter
    (bias corrections, SGD's first-update weight) runs ahead of the recorded update index."""
    run = run_of("mlp", opt, warmup=3)
    assert run.traj.opt_steps[0] == 4
    o = oracle(run)
    assert o.replay_error < 1e-12
    ds = engine(run)
    compare(ds, o, what=f"{run.name} warm")
    check_identities(ds)
    assert np.abs(ds["momentum"].values).max() > 1e-6


def test_default_rule_smooth_residual():
    for model in ("mlp", "transformer"):
        run = run_of(model, "adamw")
        ds = attribute_local(run.traj, Problem(run.xq, run.yq), chunk_updates=4)
        assert ds.attrs["rule"] == "kink"
        assert ds.attrs["max_abs_residual"] < 1e-8 * ds.attrs["max_abs_change"], ds.attrs
        assert (ds["kinks"].values == 0).all() and (ds["nodes"].values > 0).all()
        check_identities(ds)


# ----------------------------------------------------------------------------------------------------------------
# Chunking, kept u vs recomputation, the chunk API
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["adamw", "sgd_nesterov", "adam_wd"])
def test_chunk_sizes_identical(opt):
    run = run_of("mlp", opt)
    window = (2, 10)
    ref = engine(run, chunk_updates=3, window=window, keep_u=True)
    for chunk, keep in [(1, True), (4, False), (8, True), (100, False)]:
        ds = engine(run, chunk_updates=chunk, window=window, keep_u=keep)
        same(ds, ref, what=(chunk, keep))


def test_chunk_api_contract():
    run = run_of("mlp", "adam_wd")
    prob = Problem(run.xq, run.yq, by=ALL_BY, rule=EXACT, window=(1, 9))
    bounds = chunk_bounds((1, 9), 3)
    assert bounds == [(1, 4), (4, 7), (7, 9)]
    p1s = [pass1(run.traj, prob, lo, hi, keep_u=True) for lo, hi in bounds]
    # carries gets picklable summaries (no kept u), in any order
    summaries = [pickle.loads(pickle.dumps(p.summary())) for p in p1s]
    assert all(s.u is None for s in summaries)
    cs = carries(run.traj, prob, summaries[::-1])
    cs = [pickle.loads(pickle.dumps(c)) for c in cs]
    meta = result_meta(run.traj, prob)
    kept = [pass2(run.traj, prob, lo, hi, c, p) for (lo, hi), c, p in zip(bounds, cs, p1s)]
    fresh = [pass2(run.traj, prob, lo, hi, c) for (lo, hi), c in zip(bounds, cs)]
    for (lo, hi), k in zip(bounds, kept):
        shapes = chunk_shapes(meta, lo, hi)
        assert set(shapes) == set(k.arrays)
        for key, arr in k.arrays.items():
            assert arr.shape == shapes[key], key
    ref = attribute_local(run.traj, prob, chunk_updates=3)
    same(assemble(prob, meta, combine(kept, meta)), ref, what="kept u")
    same(assemble(prob, meta, fresh), ref, what="recomputed u")
    # lazily combined dask blocks give the same Dataset
    import dask.array as da

    blocks = [{k: da.from_array(a, chunks=a.shape) for k, a in r.arrays.items()} for r in kept]
    lazy = assemble(prob, meta, combine(blocks, meta))
    assert "max_abs_residual" not in lazy.attrs
    lazy = finalize_attrs(lazy.compute())
    same(lazy, ref, what="dask")
    assert lazy.attrs["max_abs_residual"] == pytest.approx(ref.attrs["max_abs_residual"], rel=1e-9, abs=1e-300)
    # misuse is refused
    with pytest.raises(ValueError, match="tile"):
        carries(run.traj, prob, summaries[:2])
    with pytest.raises(ValueError, match="carry"):
        pass2(run.traj, prob, 1, 4, cs[1])
    with pytest.raises(ValueError, match="window"):
        pass1(run.traj, prob, 0, 3)


@pytest.mark.parametrize("by", [set(), {"sample"}, {"step"}, {"tensor"}, {"param"}, {"sample", "tensor"}])
def test_by_subsets_are_sums_of_full(by):
    run = run_of("transformer", "sgd_momentum")
    full = engine(run, rule="kink", window=(2, 10))
    ds = engine(run, rule="kink", window=(2, 10), by=frozenset(by))
    for name in ("data", "weight_decay", "momentum"):
        keep = ds[name].dims
        drop = [d for d in full[name].dims if d not in keep]
        assert rel(ds[name].values, full[name].sum(drop).transpose(*keep).values) < 1e-12, name
    assert ("param_embed" in ds.data_vars) == ("param" in by)
    check_identities(ds)


# ----------------------------------------------------------------------------------------------------------------
# Output modes, grad vs jvp, ReLU kinks, float32 rounding
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["log_softmax", "logits", "loss", "target_logprob", "margin"])
def test_output_modes(output):
    run = run_of("mlp", "adamw")
    ds = engine(run, output=output, rule="kink:8", by=frozenset({"sample", "step", "tensor"}))
    # F at theta_a / theta_b, evaluated directly (independent implementation of the modes)
    net = run.factory().double().eval()
    th = run.traj.steps_params
    for s, var in ((0, "initial"), (10, "final")):
        direct = query_values(net, {k: v.double() for k, v in th[s].items()}, run.xq.double(), run.yq, output)
        assert rel(total(ds, var), direct.detach().numpy()) < 1e-13, (output, var)
    n_out = 10 if output in ("log_softmax", "logits") else 1
    assert ds.sizes["output"] == n_out
    if n_out == 1:
        assert list(ds["output"].values) == [output]
    check_identities(ds)
    # margin: the oracle splits at runner-up changes it finds by bisection, the engine at the kinks it finds
    compare(ds, oracle_of("mlp", "adamw", output), what=output)
    if output == "margin":
        assert ds["kinks"].values.sum() > 0  # the runner-up class changed somewhere: kinks found


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward-AD init
@pytest.mark.parametrize("by", [{"sample", "step"}, {"sample", "tensor", "param"}])
def test_grad_and_jvp_agree(by):
    run = run_of("transformer", "adam_wd")
    res = {m: engine(run, method=m, by=frozenset(by), window=(1, 10), rule="kink") for m in ("grad", "jvp")}
    same(res["jvp"], res["grad"], what="jvp vs grad")
    assert res["jvp"].attrs["method"] == "jvp"
    assert choose_method("auto", 4, 20, per_tensor=False) == "jvp"
    assert choose_method("auto", 30, 20, per_tensor=False) == "grad"
    assert choose_method("auto", 1, 20, per_tensor=True) == "grad"


@pytest.mark.parametrize("model,opt", [("transformer", "adamw"), ("mlp", "sgd_momentum")])
def test_grouped_per_sample_gradients_match_oracle(model, opt, monkeypatch):
    """Pass 2 takes the per-sample gradients of several updates in one vmapped call (settings grad_group_updates):
    the scores equal the ungrouped run's and the oracle's, and the grouping really happened (groups of up to 4
    consecutive updates with batches of one size, within chunks of 5)."""
    from engine import settings
    from engine.scan import backward

    calls: list[int] = []
    real = backward.sample_grads_many

    def spy(model_, params, xs, ys, loss):
        calls.append(int(xs.shape[0]))
        return real(model_, params, xs, ys, loss)

    monkeypatch.setattr(backward, "sample_grads_many", spy)
    run = run_of(model, opt)
    with settings.override(grad_group_updates=1):
        ref = engine(run, method="grad", chunk_updates=5)
    assert calls == []
    with settings.override(grad_group_updates=4):
        ds = engine(run, method="grad", chunk_updates=5)
    assert calls and 2 <= max(calls) <= 4 and sum(calls) == int(ds.sizes["step"]), calls
    same(ds, ref, what="grouped vs one update at a time")
    compare(ds, oracle_of(model, opt), what=run.name)
    check_identities(ds)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward-AD init
@pytest.mark.parametrize(
    "model,opt,by,method,window",
    [
        ("mlp", "adamw", ALL_BY, "auto", None),
        ("transformer", "sgd_nesterov", ALL_BY, "auto", None),
        ("mlp", "sgd_momentum", ALL_BY, "auto", (3, 10)),  # carried-in momentum and rebuilt movement
        ("mlp", "adam_wd", frozenset({"param", "step"}), "auto", None),  # no per-sample dots: the producer takes g
        ("transformer", "adam_wd", frozenset({"sample", "step"}), "jvp", None),  # jvp dots: one thread after all
    ],
)
def test_pipelined_pass2_matches_oracle(model, opt, by, method, window, monkeypatch):
    """With two torch threads pass 2 takes the path integrals and per-sample gradients ahead in a producer thread
    (engine.scan.pipeline) and, while it is busy, in the consuming thread, each with its own model; the scores
    equal those of one producer alone and of two producers bit for bit, and still match the oracle and the
    one-thread run."""
    from engine import settings
    from engine.scan import pipeline

    seen: list[object] = []
    real = pipeline.run_two_stage

    def spy(items, produce, consume, threads, **kw):
        seen.append(threads)
        if threads is not None:  # every producing thread has its own model
            fns = [*produce, *([kw["helper"]] if kw.get("helper") else [])]
            assert len({id(f.args[0].ctx.model) for f in fns}) == len(fns) == threads_that_produce[0]
        return real(items, produce, consume, threads, **kw)

    monkeypatch.setattr(pipeline, "run_two_stage", spy)
    run = run_of(model, opt)
    threads_that_produce = [2]
    torch.set_num_threads(2)
    try:  # nothing kept: the producers also recompute the path integrals (or, first chunk, make them)
        ds = engine(run, by=by, method=method, keep_u=False, window=window)  # the consumer helps
        other = {}
        for n, kw in ((1, dict(pipeline_help=False)), (3, dict(pipeline_producers=2))):
            threads_that_produce[0] = n
            with settings.override(**kw):
                other[n] = engine(run, by=by, method=method, keep_u=False, window=window)
    finally:
        torch.set_num_threads(1)
    assert seen and all(t == ((1, 1) if method != "jvp" else None) for t in seen), seen
    for v in ds.data_vars:  # whichever thread took an update changes no bit
        for one in other.values():
            assert np.array_equal(ds[v].values, one[v].values, equal_nan=True), v
    seen.clear()
    ref = engine(run, by=by, method=method, window=window)
    assert seen and all(t is None for t in seen), seen  # one torch thread: no pipeline
    same(ds, ref, what="pipelined, recomputed u vs one thread, kept u")
    if by == ALL_BY:
        compare(ds, oracle_of(model, opt, window=window), what=run.name)
    check_identities(ds)


def test_relu_kink_rule_matches_exact_reference():
    """ReLU MLP: the default kink rule equals the oracle's exact piecewise integral (kinks solved in closed form);
    a fixed 100-node midpoint rule misses by orders of magnitude (so this test can fail)."""
    run = run_of("relu", "sgd_momentum")
    xq = run.xq.double()
    o = oracle(run, breakpoints=lambda th, d: relu1_breakpoints(th, d, xq))
    ds = engine(run, rule="kink", by=frozenset({"sample", "step", "tensor"}), chunk_updates=4)
    assert ds["kinks"].values.sum() > 0
    assert ds.attrs["max_abs_residual"] < 1e-12 * ds.attrs["max_abs_change"]
    compare(ds, o, what="relu kink")
    check_identities(ds)
    mid = engine(run, rule="midpoint:100", by=frozenset({"sample"}), chunk_updates=4)
    assert mid.attrs["max_abs_residual"] > 1e-7 * mid.attrs["max_abs_change"]
    assert rel(rows(mid, "data"), o.data.sum(axis=(2, 3))) > 1e-7


def test_float32_training_rounding_residual():
    run = run_of("mlp", "adamw", "float32")
    ds = engine(run, rule="kink", by=frozenset({"sample", "step"}))
    check_identities(ds)  # holds by construction: the rounding residual closes the gap
    scale = ds.attrs["max_abs_change"]
    assert 1e-12 * scale < ds.attrs["max_rounding_residual"] < 1e-4 * scale
    assert ds.attrs["max_quadrature_residual"] < 1e-8 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [False, True])
def test_coefficients_are_the_ones_torch_applied(dtype, fused):
    """AdamW's decay factor and step size as the engine uses them reproduce torch's float32 update bit for bit
    (computed in float64 from the same inputs, then rounded once). The float64 factor 1 - lr*wd does not: in float32 it
    is off by 8e-9 relative at every update, which left a systematic rounding residual growing with the run."""
    lr, wd, b1, b2, eps = 1e-3, 4.0, 0.9, 0.98, 1e-8
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, generator=gen, dtype=dtype))
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, fused=fused)
    p0 = p.detach().clone()
    p.grad = torch.zeros_like(p)  # zero gradient, fresh state: a pure decay step
    opt.step()
    decayed = p0.double() * (1.0 - applied_decay(lr, wd, dtype))
    assert torch.equal(decayed.to(dtype), p.detach())
    if dtype == torch.float32:
        naive = p0.double() * (1.0 - lr * wd)
        assert not torch.equal(naive.to(dtype), p.detach())  # so this test has teeth
        assert applied_scalar(0.1, dtype) != 0.1
    else:
        assert applied_decay(lr, wd, dtype) == pytest.approx(lr * wd, rel=1e-13)
        assert applied_scalar(0.1, dtype) == 0.1


# ----------------------------------------------------------------------------------------------------------------
# Validation and misc
# ----------------------------------------------------------------------------------------------------------------
def test_problem_validation():
    run = run_of("mlp", "sgd")
    xq, yq = run.xq, run.yq
    with pytest.raises(ValueError, match="unknown output mode"):
        Problem(xq, yq, output="probs")
    for mode in ("loss", "target_logprob", "margin"):
        with pytest.raises(ValueError, match="needs the query targets"):
            Problem(xq, None, output=mode)
    with pytest.raises(ValueError, match="entries"):
        Problem(xq, yq[:1])
    with pytest.raises(ValueError, match="unknown 'by'"):
        Problem(xq, yq, by=frozenset({"sample", "layer"}))
    with pytest.raises(ValueError, match="0 <= a < b"):
        Problem(xq, yq, window=(5, 5))
    with pytest.raises(ValueError, match="0 <= a < b"):
        Problem(xq, yq, window=(-1, 3))
    with pytest.raises(ValueError, match="unknown method"):
        Problem(xq, yq, method="fd")
    with pytest.raises(ValueError):
        Problem(xq, yq, rule="simpson:3")
    with pytest.raises(ValueError, match="outside the recorded updates"):
        attribute_local(run.traj, Problem(xq, yq, window=(0, 11)))
    p = Problem(xq, yq, by={"sample", "step"}, window=[0, 3])
    assert p.by == frozenset({"sample", "step"}) and p.window == (0, 3)
    assert pickle.loads(pickle.dumps(p)).window == (0, 3)
    ds = attribute_local(run.traj, p)
    assert ds.attrs["window"] == [0, 3]
    assert set(ds["data"].dims) == {"query", "output", "sample", "step"}
    assert context(run.traj, p) is context(run.traj, p)  # cached per (trajectory, problem)
