"""Engine benchmark: our engine against a published-style baseline, and how time and memory scale.

    python bench/engine.py [--quick] [--workdir DIR] [--baseline-updates N] [--skip-scaling] [--skip-cluster]

Prints Markdown tables (paste into docs/benchmarks.md, section "Engine"):

(a) Head-to-head on the modular-addition transformer (p=23, 170 training pairs, 100 full-batch AdamW updates with
    lr 1e-3, betas (0.9, 0.98), weight decay 4.0; 10 validation queries, all 23 log-softmax outputs) with
    d_model 32 / MLP 128 ("tiny") and d_model 64 / MLP 512 ("d64"), and a model written the way users write theirs
    ("perhead", bench/outside_models.py: per-head projections in ModuleLists, attention head by head, 12k
    parameters; fixed cost of a 10-update window next to the steady state): ``engine.attribute(..., by=("sample",
    "step", "tensor"))`` end to end from the store, on the synchronous scheduler (1 torch thread, and one per
    core) and on the default ``LocalCluster`` (the engine plans query groups and torch threads), each repeated
    ``--repeats`` times interleaved (median, min-max); its max quadrature residual; and the *total max error*, max
    over queries and outputs of
    ``|F(theta_T) of the real float32 model - (F(theta_0) + sum of all parts)|``, which includes the float32
    rounding of training itself.
(b) A reimplementation of the published method's cost structure on the same recorded run ("published-style":
    100 midpoint nodes per update, a full Jacobian of all query outputs per node, per-sample N x P momentum
    buffers updated every update, float32 like the published code). It is slow, so it runs on the first
    ``--baseline-updates`` updates and its time is extrapolated linearly to 100 (labelled so). Its max error is
    exact for the quadrature part (forward-mode derivatives at its 100 nodes, all updates) plus the same
    float32-training rounding as ours.
(c) Scaling: time and peak memory as updates, queries, training samples and parameters each grow 4x and 16x from a
    small base (synchronous scheduler, ``by=("sample", "tensor")`` so the output does not grow with the
    updates), and the speedup of the default LocalCluster over one thread.

Every measured configuration runs in a fresh subprocess (``python bench/engine.py --child JSON``) and reports
its own peak RSS (``ru_maxrss``; for clusters, the largest of the client and worker processes), so numbers are
clean. Torch runs one thread per process (dask parallelises over processes). This machine is shared: the load
average is printed with every table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()  # a child's process start, for the cold-call fixed cost
REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
# `python bench/engine.py` puts bench/ first on sys.path, where this file would shadow the `engine` package; the repo
# goes last, so an engine on PYTHONPATH (e.g. an older checkout, for --per-update) takes precedence
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]
    sys.path.append(str(REPO))
# bench/outside_models.py (a model written the way users write theirs) is imported as the top-level module
# `outside_models`, after the repo so that bench/engine.py never shadows the engine package; children and their
# Dask workers get the same path and trust it (they rebuild the model from the store's model_spec)
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))
OUTSIDE_MODULE = "outside_models"
HEAD_TO_HEAD = {
    "tiny": {"p": 23, "d_model": 32, "d_mlp": 128},
    "d64": {"p": 23, "d_model": 64, "d_mlp": 512},
    # per-head ModuleLists, attention head by head over 4 positions, ~12k parameters (issue 13)
    "perhead": {"p": 23, "d_model": 32, "d_mlp": 96, "outside": True},
}
# the published implementation's one-thread time on the same problem size: seconds, GB, max error (issue texts)
PUBLISHED = {"tiny": (177.0, 0.5, 2.8e-4), "d64": (900.0, 1.5, 2.0e-3), "perhead": (175.0, 0.57, None)}
BY = ("sample", "step", "tensor")
CORES = os.cpu_count() or 1


# ==============================================================================================================
# helpers
# ==============================================================================================================
def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds (user + system) this process used so far: robust to other load on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _trust_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the repo and bench/ on PYTHONPATH (in that order) and the bench's model module trusted."""
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in (str(REPO), str(BENCH)) if p not in path])
    trusted = [m for m in env.get("EXPLAIND_TRUSTED_MODULES", "").split(",") if m.strip()]
    env["EXPLAIND_TRUSTED_MODULES"] = ",".join(trusted + ([] if OUTSIDE_MODULE in trusted else [OUTSIDE_MODULE]))
    return env


def _record(path: Path, steps: int, n_train: int, n_val: int, **model: Any) -> None:
    if (path / ".bench-done").exists():
        return
    if model.pop("outside", False):
        import outside_models

        outside_models.train(str(path), steps=steps, n_train=n_train, n_val=n_val, seed=0, **model)
    else:
        from explaind_store.examples import modadd

        modadd.train(str(path), steps=steps, n_train=n_train, n_val=n_val, seed=0, progress=False, overwrite=True,
                     eval_every=0, **model)
    (path / ".bench-done").write_text("ok")


def _child(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns its JSON result."""
    env = _trust_env(dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {spec['kind']} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1])


def _query_set(run: Any, n: int) -> tuple[Any, Any]:
    xv, yv = run.split("val")
    return xv[:n], yv[:n]


def _f32_final(run: Any, n_queries: int, dtype: str = "float32") -> Any:
    """F(theta_T) of the real model, in the dtype it was trained in, as float64 numbers: (Q, O)."""
    import torch

    model = run.model(int(run.committed_updates)).to(getattr(torch, dtype)).eval()
    x, _ = _query_set(run, n_queries)
    with torch.no_grad():
        return torch.log_softmax(model(x), dim=-1).double().numpy()


def _parts_total(ds: Any) -> Any:
    """F(theta_a) + every part summed (data, weight decay, momentum): (Q, O)."""
    total = ds["initial"].values.copy()
    for name in ("data", "weight_decay", "momentum"):
        v = ds[name]
        total = total + v.sum([d for d in v.dims if d not in ("query", "output")]).values
    return total


# ==============================================================================================================
# children
# ==============================================================================================================
def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """engine.attribute end to end from the store; sync or a fresh LocalCluster of n workers."""
    import numpy as np
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))  # sync: this process's torch threads
    from engine.api import attribute
    from explaind_store.reader import open_run

    path, n_workers = spec["path"], spec.get("workers", 0)
    by = tuple(spec.get("by", BY))
    q = int(spec["queries"])
    client: Any = "sync"
    startup = 0.0
    if n_workers:
        from engine.cluster.runners import local_client

        t0 = time.perf_counter()
        client = local_client(n_workers)
        client.wait_for_workers(n_workers)
        attribute(path, queries="val[:1]", output="log_softmax", by=("sample",), steps=(0, 1), client=client,
                  progress=False)  # spawn + import + first task on every worker: not timed below
        startup = time.perf_counter() - t0
    if spec.get("warm") and not n_workers:
        attribute(path, queries=f"val[:{q}]", output="log_softmax", by=by, steps=(0, 1), client=client,
                  progress=False)  # first-call costs (lazy imports, torch dispatch caches, zarr): not timed
    cpu0 = _cpu_s() + (sum(client.run(_cpu_s).values()) if n_workers else 0.0)
    t0 = time.perf_counter()
    window = tuple(spec["steps"]) if spec.get("steps") else None
    ds = attribute(path, queries=f"val[:{q}]", output="log_softmax", by=by, client=client, progress=False,
                   quadrature=spec.get("quadrature"), steps=window)
    seconds = time.perf_counter() - t0
    cpu = _cpu_s() + (sum(client.run(_cpu_s).values()) if n_workers else 0.0) - cpu0
    rss = {"client": _rss_mb()}
    if n_workers:
        for addr, mb in client.run(_rss_mb).items():
            rss[addr] = mb
    out: dict[str, Any] = {
        "seconds": seconds,
        "since_start": time.perf_counter() - T_START,
        "cpu": cpu,
        "startup": startup,
        "peak_mb": max(rss.values()),
        "peak_client_mb": rss["client"],
        "result_mb": float(ds.nbytes) / 2**20,
        "qres": float(ds.attrs["max_quadrature_residual"]),
        "residual": float(ds.attrs["max_abs_residual"]),
        "load": _load(),
        "plan": f"{ds.attrs.get('query_groups', 1)} group(s) x {ds.attrs.get('torch_threads') or 1} thread(s), "
                f"{ds.attrs.get('scan', '-')}",
    }
    if spec.get("error", True):
        run = open_run(path)
        f32 = _f32_final(run, q, spec.get("trained", "float32"))
        out["total_error"] = float(np.abs(f32 - _parts_total(ds)).max())
        out["rounding"] = float(np.abs(ds["rounding_residual"].sum("step").values).max())
        out["f64_vs_f32"] = float(np.abs(f32 - ds["final"].values).max())
        if spec.get("save_rounding"):
            np.savez(spec["save_rounding"], rounding=ds["rounding_residual"].sum("step").values,
                     initial=ds["initial"].values)
    return out


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The published method's cost structure on the first ``updates`` updates (float32, one thread)."""
    import torch
    from torch.func import functional_call, grad, jacrev, vmap

    torch.set_num_threads(1)
    from explaind_store import schema
    from explaind_store.reader import open_run
    from explaind_store.specs import per_sample_loss

    run = open_run(spec["path"])
    L, q = int(spec["updates"]), int(spec["queries"])
    model = run.build_model().float().eval()
    names = list(run.tensor_names)
    x_tr, y_tr = run.split("train")
    xq, _ = _query_set(run, q)
    opt = run.optimizer_spec.groups[0]
    b1, b2 = (float(b) for b in opt.get("betas", (0.9, 0.999)))
    eps = float(opt.get("eps", 1e-8))
    blk = run.block(0, L)
    N = len(x_tr)

    def F(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.log_softmax(functional_call(model, p, (xq,)), dim=-1).reshape(-1)

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(run.loss, functional_call(model, p, (x[None],)), y[None]).sum()

    psg = vmap(grad(loss_one), in_dims=(None, 0, 0))
    shapes = {n: tuple(blk.params[n].shape[1:]) for n in names}
    sizes = [math.prod(shapes[n]) for n in names]
    P = sum(sizes)
    R = q * int(F({n: blk.params[n][0].float() for n in names}).numel() // q)
    M = torch.zeros(N, P)  # per-sample momentum buffers, decayed every update
    scores = torch.zeros(R, N, L, len(names))  # per-sample, per-step, per-tensor
    wd_scores = torch.zeros(R, L, len(names))
    mid = (torch.arange(100, dtype=torch.float32) + 0.5) / 100
    t0, cpu0 = time.perf_counter(), _cpu_s()
    for j, s in enumerate(range(1, L + 1)):
        th0 = {n: blk.params[n][s - 1].float() for n in names}
        th1 = {n: blk.params[n][s].float() for n in names}
        d = {n: th1[n] - th0[n] for n in names}
        idx = blk.batches[s - 1].long()
        G = psg(th0, x_tr[idx], y_tr[idx])
        Gf = torch.cat([G[n].reshape(len(idx), -1) for n in names], 1)
        M.mul_(b1)
        M.index_add_(0, idx, Gf, alpha=(1 - b1) / len(idx))
        lr = float(blk.lr[j, 0])
        lam = float(blk.weight_decay[j, 0])
        n_opt = int(blk.opt_step[j])
        v = torch.cat([blk.state[schema.EXP_AVG_SQ][n][j + 1].float().reshape(-1) for n in names])
        coef = -lr / (1 - b1**n_opt) / ((v / (1 - b2**n_opt)).sqrt() + eps)
        phi = torch.zeros(R, P)
        for t in mid:  # a full Jacobian of all query outputs at every node
            jac = jacrev(F)({n: th0[n] + t * d[n] for n in names})
            phi.add_(torch.cat([jac[n].reshape(R, -1) for n in names], 1), alpha=1 / 100)
        mov = M * coef  # per-sample movement of this update (N x P)
        th0f = torch.cat([th0[n].reshape(-1) for n in names])
        c0 = 0
        for t_i, size in enumerate(sizes):
            sl = slice(c0, c0 + size)
            scores[:, :, j, t_i] = phi[:, sl] @ mov[:, sl].T
            wd_scores[:, j, t_i] = phi[:, sl] @ th0f[sl] * (-lr * lam)
            c0 += size
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    return {"seconds": seconds, "cpu": cpu, "updates": L, "peak_mb": _rss_mb(), "params": P, "rows": R,
            "load": _load()}


def child_baseline_error(spec: dict[str, Any]) -> dict[str, Any]:
    """Total max error of the published-style decomposition over all updates: its quadrature part exactly
    (forward-mode dF/dt at its 100 midpoint nodes of every update), plus the float32-training rounding residual
    our engine measured (the same rebuilt-vs-stored movement)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from engine.ops import output_modes as _outputs
    from engine.ops.quadrature import dfdt_at, midpoint_nodes
    from explaind_store.reader import open_run

    run = open_run(spec["path"])
    q = int(spec["queries"])
    model = run.build_model().double().eval()
    xq, _ = _query_set(run, q)
    qf = _outputs.make_query_fn(model, xq, None, "log_softmax", dict(run.loss))
    T = int(run.committed_updates)
    blk = run.block(0, T)
    names = list(run.tensor_names)
    ts, ws = midpoint_nodes(100)
    total = None
    for s in range(1, T + 1):
        th0 = {n: blk.params[n][s - 1].double() for n in names}
        d = {n: blk.params[n][s].double() - th0[n] for n in names}
        est = ws @ dfdt_at(qf, th0, d, ts)
        total = est if total is None else total + est
    saved = np.load(spec["rounding"])
    O = saved["initial"].shape[1]
    parts = saved["initial"] + total.numpy().reshape(q, O) - saved["rounding"]
    f32 = _f32_final(run, q)
    return {"total_error": float(np.abs(f32 - parts).max())}


def _time_calls(acc: dict[str, float], mod: Any, name: str, key: str) -> None:
    """Replace ``mod.name`` (if it exists) by a wrapper that adds each call's CPU seconds to ``acc[key]``."""
    f = getattr(mod, name, None)
    if f is None:
        return

    def g(*a: Any, **k: Any) -> Any:
        t = time.process_time()
        r = f(*a, **k)
        acc[key] = acc.get(key, 0.0) + time.process_time() - t
        return r

    setattr(mod, name, g)


def child_per_update(spec: dict[str, Any]) -> dict[str, Any]:
    """CPU ms per update of pass 1 / pass 2 and their path integrals and per-sample dot products, on updates
    ``lo+1 .. lo+L`` as a window's first chunk and as a later chunk (whatever ``engine`` is importable)."""
    import torch

    torch.set_num_threads(1)
    import engine.scan.forward as P1
    import engine.scan.backward as P2
    from engine.scan import Problem, carries, context, pass1, pass2
    from explaind_store.reader import open_run

    run = open_run(spec["path"])
    lo, L, q = int(spec["lo"]), int(spec["updates"]), int(spec["queries"])
    xq, yq = _query_set(run, q)
    by = frozenset(BY)
    acc: dict[str, float] = {}
    for name, key in (("path_integral", "path integral"), ("phi_given", "path integral"), ("sample_dots", "dots")):
        for mod in (P1, P2):  # the scan modules that call the function
            _time_calls(acc, mod, name, key)

    def timed(fn: Any) -> dict[str, float]:
        acc.clear()
        t = time.process_time()
        fn()
        out = {"total": time.process_time() - t, **acc}
        return {k: round(1000 * v / L, 1) for k, v in out.items()}

    first = Problem(xq, yq, output="log_softmax", by=by, window=(lo, lo + L))
    later = Problem(xq, yq, output="log_softmax", by=by, window=(lo - 1, lo + L))
    warm = Problem(xq, yq, output="log_softmax", by=by, window=(lo, lo + 2))
    pass2(run, warm, lo, lo + 2, carries(run, warm, [pass1(run, warm, lo, lo + 2).summary()])[0])
    res: dict[str, Any] = {}
    box: dict[str, Any] = {}
    res["pass1 first"] = timed(lambda: box.__setitem__("p1", pass1(run, first, lo, lo + L, ctx=context(run, first))))
    res["pass1 later"] = timed(lambda: box.__setitem__("p1l", pass1(run, later, lo, lo + L, ctx=context(run, later))))
    c_first = carries(run, first, [box["p1"].summary()])[0]
    head = pass1(run, later, lo - 1, lo, ctx=context(run, later))
    c_later = carries(run, later, [head.summary(), box["p1l"].summary()])[1]
    res["pass2 first"] = timed(lambda: pass2(run, first, lo, lo + L, c_first, ctx=context(run, first)))
    res["pass2 later"] = timed(lambda: pass2(run, later, lo, lo + L, c_later, ctx=context(run, later)))
    return res


def per_update(args: argparse.Namespace, work: Path) -> list[str]:
    cases = {"tiny": (HEAD_TO_HEAD["tiny"], 6), "d64": (HEAD_TO_HEAD["d64"], 3)}
    lines = [
        f"### Per-update cost (CPU ms per update, updates 41..41+L, engine from {_engine_origin()})",
        "",
        ("| case | L | pass 1, first chunk | pass 1, later chunk (path integral) | pass 2, first chunk (path "
         "integral, sample dots) | pass 2, later chunk (path integral, sample dots) |"),
        "|---|---|---|---|---|---|",
    ]
    for name, (model, L) in cases.items():
        path = work / f"{name}-100"
        _record(path, 100, 170, 100, **model)
        r = _child({"kind": "per_update", "path": str(path), "lo": 40, "updates": L, "queries": args.queries})

        def cell(k: str, r: dict[str, Any] = r) -> str:
            d = r[k]
            inner = ", ".join(f"{d[x]:g}" for x in ("path integral", "dots") if x in d)
            return f"{d['total']:g}" + (f" ({inner})" if inner else "")

        lines.append(f"| {name} | {L} | {cell('pass1 first')} | {cell('pass1 later')} | {cell('pass2 first')} | "
                     f"{cell('pass2 later')} |")
    lines += ["", f"Load average (1/5/15 min) after the table: {_load()}.", ""]
    return lines


def _engine_origin() -> str:
    import importlib.util

    spec = importlib.util.find_spec("engine")
    return str(Path(spec.origin).parent) if spec and spec.origin else "?"


def child_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """What a child holds before any work: the interpreter with the engine's imports and the store opened."""
    import dask  # noqa: F401
    import torch  # noqa: F401
    import xarray  # noqa: F401

    import engine.api  # noqa: F401
    from explaind_store.reader import open_run

    open_run(spec["path"]).split("train")
    return {"peak_mb": _rss_mb()}


def child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """One warm one-thread ``attribute`` with its phases timed (CPU s), and the floor under it: the per-sample dot
    products' own matmuls (every tensor's ``(R, P_t) @ (P_t, N)`` in float64, exactly the shapes pass 2 multiplies)
    timed alone on random data, per update."""
    import torch

    torch.set_num_threads(1)
    import engine.ops.persample as PS
    import engine.ops.quadrature as Q
    import engine.scan.backward as B
    from engine.api import attribute

    acc: dict[str, float] = {}
    # the leaves of the phase tree only (no phase inside another): Jacobians, kink search, gradients, dots
    for mod, name, key in ((Q, "_phi_rows", "path integral (Jacobians)"), (Q, "search_kinks", "kink search"),
                           (Q, "_drop_flat_kinks", "kink search"), (B, "sample_grads_many", "per-sample gradients"),
                           (B, "sample_grads", "per-sample gradients"), (PS, "sample_grads", "per-sample gradients"),
                           (B, "grad_dots", "dot products"), (PS, "grad_dots", "dot products")):
        _time_calls(acc, mod, name, key)
    path, q = spec["path"], int(spec["queries"])
    kw = {"queries": f"val[:{q}]", "output": "log_softmax", "by": BY, "client": "sync", "progress": False}
    attribute(path, steps=(0, 1), **kw)
    acc.clear()
    t = time.process_time()
    ds = attribute(path, **kw)
    total = time.process_time() - t
    steps = int(ds.sizes["step"])
    from explaind_store.reader import open_run

    run = open_run(path)
    shapes = [int(p.numel()) for p in run.build_model().parameters()]
    R = int(ds.sizes["query"]) * int(ds.sizes["output"])
    N = int(run.split("train")[0].shape[0])
    V = [torch.randn(R, n, dtype=torch.float64) for n in shapes]
    G = [torch.randn(N, n, dtype=torch.float64) for n in shapes]
    for v, g in zip(V, G):
        v @ g.T
    reps = 10
    t = time.process_time()
    for _ in range(reps):
        for v, g in zip(V, G):
            v @ g.T
    gemm = (time.process_time() - t) / reps
    per = {k: 1000 * v / steps for k, v in acc.items()}
    per["rest"] = 1000 * total / steps - sum(per.values())
    return {"per_update_ms": per, "total_ms": 1000 * total / steps, "gemm_ms": 1000 * gemm, "R": R, "N": N,
            "P": sum(shapes), "T": len(shapes), "gflop": 2 * R * N * sum(shapes) / 1e9, "load": _load()}


def floor(args: argparse.Namespace, work: Path) -> list[str]:
    """Where one thread's time per update goes, against the dot products' float64 matmul floor."""
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    keys = ("path integral (Jacobians)", "kink search", "per-sample gradients", "dot products", "rest")
    lines = [
        "### Where an update's time goes (one thread, CPU ms per update), and the matmul floor",
        "",
        "| case | params (tensors) | rows R x samples N | dot products: GFlop per update | their matmuls alone "
        "(the floor) | " + " | ".join(keys) + " | total | 30x the published code needs |",
        "|---|---|---|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for name in names:
        path = work / f"{name}-100"
        _record(path, 100, 170, 100, **HEAD_TO_HEAD[name])
        r = _child({"kind": "floor", "path": str(path), "queries": args.queries})
        per = r["per_update_ms"]
        lines.append(
            f"| {name} | {r['P']} ({r['T']}) | {r['R']} x {r['N']} | {r['gflop']:.2f} | {r['gemm_ms']:.1f} | "
            + " | ".join(f"{per.get(k, 0.0):.1f}" for k in keys)
            + f" | {r['total_ms']:.1f} | {1000 * PUBLISHED[name][0] / 30 / 100:.1f} |"
        )
        print(f"[bench] {name} done, load {r['load']}", file=sys.stderr)
    lines += ["", f"Load average (1/5/15 min) after the table: {_load()}.", ""]
    return lines


CHILDREN = {"ours": child_ours, "baseline": child_baseline, "baseline_error": child_baseline_error, "idle": child_idle,
            "per_update": child_per_update, "floor": child_floor}


# ==============================================================================================================
# tables
# ==============================================================================================================
def _fmt_s(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _median_run(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time, with the min / max time of all and the first run's error fields."""
    ordered = sorted(rs, key=lambda r: r["seconds"])
    out = dict(ordered[len(ordered) // 2])
    for key in ("total_error", "f64_vs_f32"):
        if key in rs[0]:
            out[key] = rs[0][key]
    out.update(min=ordered[0]["seconds"], max=ordered[-1]["seconds"], n=len(rs))
    return out


def head_to_head(args: argparse.Namespace, work: Path) -> list[str]:
    steps, n_train = (10, 60) if args.quick else (100, 170)
    names = ["tiny"] if args.quick else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in HEAD_TO_HEAD]
    if unknown:
        raise SystemExit(f"--cases: unknown case(s) {unknown}; choose from {', '.join(HEAD_TO_HEAD)}")
    cases = {c: HEAD_TO_HEAD[c] for c in names}
    lines = [
        (f"### Head-to-head ({steps} updates, {n_train} training pairs, {args.queries} queries x 23 log-softmax "
         f"outputs, by=sample+step+tensor)"),
        "",
        ("| case | params | method | scheduler | time (s), median (min-max) | CPU (s) | vs published-style (time) | "
         "vs published, 1 thread (time) | peak RSS (MB) | result (MB) | max quadrature residual | total max error |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fixed: list[str] = []
    summary: list[str] = []
    for name, model in cases.items():
        path = work / f"{name}-{steps}"
        _record(path, steps, n_train, 100, **model)
        rounding = work / f"{name}-{steps}-rounding.npz"
        specs = {
            "sync, 1 torch thread (cold: fresh process)": {"save_rounding": str(rounding)},
            "sync, 1 torch thread (warm)": {"warm": True, "error": False},
            f"sync, {CORES} torch threads (warm)": {"warm": True, "error": False, "threads": CORES},
        }
        if not args.skip_cluster:
            specs[f"default LocalCluster ({CORES} workers)"] = {"workers": CORES, "error": False}
        # interleaved repeats (this machine is noisy: the same run varies by up to 30%); the median is reported
        reps: dict[str, list[dict[str, Any]]] = {k: [] for k in specs}
        for rep in range(args.repeats):
            for label, extra in specs.items():
                spec = {"kind": "ours", "path": str(path), "queries": args.queries, **extra}
                if rep and "save_rounding" in spec:
                    spec = {k: v for k, v in spec.items() if k != "save_rounding"} | {"error": False}
                reps[label].append(_child(spec))
        runs = {label: _median_run(rs) for label, rs in reps.items()}
        n_base = min(steps, args.baseline_updates if not args.quick else 2)
        base = _child({"kind": "baseline", "path": str(path), "queries": args.queries, "updates": n_base})
        base_err = _child({"kind": "baseline_error", "path": str(path), "queries": args.queries,
                           "rounding": str(rounding)})
        x = steps / n_base
        base_s, base_cpu = base["seconds"] * x, base["cpu"] * x
        P = base["params"]
        lab = f"published-style, {n_base} of {steps} updates, extrapolated x{x:g}" if n_base < steps else "published-style"
        ext = " (extrap.)" if n_base < steps else ""
        pub_s = PUBLISHED[name][0] if name in PUBLISHED and not args.quick else None

        def vs_pub(sec: float) -> str:
            return (f"{pub_s / sec:.0f}x" if pub_s / sec >= 10 else f"{pub_s / sec:.2g}x") if pub_s else ""

        lines.append(f"| {name} | {P} | {lab} | 1 process | {_fmt_s(base_s)}{ext} | {_fmt_s(base_cpu)}{ext} | 1.0x | "
                     f"{vs_pub(base_s)} | {base['peak_mb']:.0f} | | (midpoint:100) | {base_err['total_error']:.1e} |")
        for sched, r in runs.items():
            err = f"{r['total_error']:.1e}" if "total_error" in r else "same"
            start = f" (+{r['startup']:.1f} s cluster start)" if r.get("startup") else ""
            sched = f"{sched}: {r['plan']}" if "plan" in r else sched
            spread = f" ({_fmt_s(r['min'])}-{_fmt_s(r['max'])})" if r.get("n", 1) > 1 else ""
            lines.append(f"| {name} | {P} | ours (kink rule) | {sched}{start} | {_fmt_s(r['seconds'])}{spread} | "
                         f"{_fmt_s(r['cpu'])} | {base_s / r['seconds']:.0f}x | {vs_pub(r['seconds'])} | "
                         f"{r['peak_mb']:.0f} | {r['result_mb']:.0f} | {r['qres']:.1e} | {err} |")
        if pub_s:
            s, gb, e = PUBLISHED[name]
            lines.append(f"| {name} | | published implementation (issue text, other machine) | 1 thread | {s:.0f} | | | "
                         f"1x | {gb * 1024:.0f} | | | {'' if e is None else f'{e:.1e}'} |")
        fixed_cost = None
        if steps >= 50:
            row, fixed_cost = _fixed_cost_row(name, path, args, runs["sync, 1 torch thread (warm)"], steps)
            fixed.append(row)
        summary.append(_summary_row(name, P, runs, pub_s, fixed_cost))
        print(f"[bench] {name} done, load {_load()}", file=sys.stderr)
    lines += ["", f"Load average (1/5/15 min) after the table: {_load()}.", ""]
    lines = [
        "### Summary: one thread against one thread, and the default client (same run as the tables below)",
        "",
        *SUMMARY_HEADER,
        *summary,
        "",
        *lines,
    ]
    if fixed:
        lines += [
            "### Fixed cost of a call: a 10-update window (updates 41..50) against the steady state",
            "",
            FIXED_HEADER,
            "|---|---|---|---|---|---|",
            *fixed,
            "",
            f"Load average (1/5/15 min) after the table: {_load()}.",
            "",
        ]
    return lines


FIXED_HEADER = (
    "| case | steady state per update, wall / CPU s (1 thread, warm, all updates / count) | 10-update window, warm "
    "call: wall / CPU s | 10-update window, fresh process: the call's wall / CPU s / process start to end (s) | "
    "fixed cost by wall, warm / fresh call (s) | fixed cost by CPU, warm / fresh call (s) |"
)


def _fixed_cost_row(
    name: str, path: Path, args: argparse.Namespace, full: dict[str, Any], steps: int
) -> tuple[str, tuple[float, float]]:
    """One-thread sync: a 10-update window warm (after a 1-update call) and in a fresh process, against 10 x the
    steady-state seconds per update of the whole run. Returns the table row and (warm, fresh) fixed cost."""
    win = {"kind": "ours", "path": str(path), "queries": args.queries, "error": False, "steps": [40, 50]}
    warm = _median_run([_child(dict(win, warm=True)) for _ in range(args.repeats)])
    cold = _median_run([_child(win) for _ in range(args.repeats)])
    per, per_cpu = full["seconds"] / steps, full["cpu"] / steps
    # CPU seconds: on a shared machine wall times of a loaded process are not comparable between runs
    cost = (warm["cpu"] - 10 * per_cpu, cold["cpu"] - 10 * per_cpu)
    return (f"| {name} | {per:.3f} / {per_cpu:.3f} | {_fmt_s(warm['seconds'])} / {_fmt_s(warm['cpu'])} | "
            f"{_fmt_s(cold['seconds'])} / {_fmt_s(cold['cpu'])} / {_fmt_s(cold['since_start'])} | "
            f"{warm['seconds'] - 10 * per:.2f} / {cold['seconds'] - 10 * per:.2f} | "
            f"{cost[0]:.2f} / {cost[1]:.2f} |"), cost


SUMMARY_HEADER = (
    "| case | params | 1 thread (warm): CPU s / wall s | vs published, 1 thread (CPU) | default client: wall s / "
    "CPU s | peak RSS 1 thread / default (MB) | result (MB) | fixed cost of a 10-update window, warm / fresh "
    "process (CPU s) |",
    "|---|---|---|---|---|---|---|---|",
)


def _summary_row(name: str, P: int, runs: dict[str, dict[str, Any]], pub_s: float | None,
                 fixed: tuple[float, float] | None) -> str:
    """The issue-13 summary: one thread (CPU seconds are the honest number on a shared machine), the default
    client, peak RSS next to the result's size, the fixed cost of a short window."""
    one = runs["sync, 1 torch thread (warm)"]
    dflt = next((r for k, r in runs.items() if k.startswith("default")), None)
    ratio = f"{pub_s / one['cpu']:.0f}x" if pub_s else ""
    cl = f"{_fmt_s(dflt['seconds'])} / {_fmt_s(dflt['cpu'])}" if dflt else "(skipped)"
    peak = f"{one['peak_mb']:.0f} / {dflt['peak_mb']:.0f}" if dflt else f"{one['peak_mb']:.0f}"
    fc = f"{fixed[0]:.2f} / {fixed[1]:.2f}" if fixed else ""  # CPU seconds
    return (f"| {name} | {P} | {_fmt_s(one['cpu'])} / {_fmt_s(one['seconds'])} | {ratio} | {cl} | {peak} | "
            f"{one['result_mb']:.0f} | {fc} |")


def summary_only(args: argparse.Namespace, work: Path) -> list[str]:
    """Only the issue-13 summary (no published-style baseline, no cold / 2-thread rows): per case one warm
    one-thread run (with its errors), the default client unless ``--skip-cluster``, and the fixed cost of a
    10-update window. For a machine too loaded for the full head-to-head in the time at hand."""
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    rows = []
    for name in names:
        path = work / f"{name}-100"
        _record(path, 100, 170, 100, **HEAD_TO_HEAD[name])
        base = {"kind": "ours", "path": str(path), "queries": args.queries}
        runs = {"sync, 1 torch thread (warm)": _child(dict(base, warm=True))}
        if not args.skip_cluster and name not in args.no_cluster_for.split(","):
            runs[f"default LocalCluster ({CORES} workers)"] = _child(dict(base, workers=CORES, error=False))
        row, cost = _fixed_cost_row(name, path, args, runs["sync, 1 torch thread (warm)"], 100)
        one = runs["sync, 1 torch thread (warm)"]
        P = sum(p.numel() for p in _model_params(path))
        rows.append((_summary_row(name, P, runs, PUBLISHED[name][0], cost), row,
                     f"| {name} | {one['qres']:.1e} | {one['total_error']:.1e} | {one['plan']} |"))
        print(f"[bench] {name} done, load {_load()}", file=sys.stderr)
    return [
        "### Summary: one thread against one thread, and the default client",
        "",
        *SUMMARY_HEADER,
        *(r[0] for r in rows),
        "",
        "| case | max quadrature residual | total max error | plan |",
        "|---|---|---|---|",
        *(r[2] for r in rows),
        "",
        FIXED_HEADER,
        "|---|---|---|---|---|---|",
        *(r[1] for r in rows),
        "",
        f"Load average (1/5/15 min) after the tables: {_load()}.",
        "",
    ]


def _model_params(path: Path) -> list[Any]:
    from explaind_store.reader import open_run

    return list(open_run(str(path)).build_model().parameters())


def float64_trained(args: argparse.Namespace, work: Path) -> list[str]:
    """The d64 case recorded in float64: the total max error without float32 training rounding."""
    path = work / "d64-100-float64"
    _record(path, 100, 170, 100, dtype="float64", **HEAD_TO_HEAD["d64"])
    r = _child({"kind": "ours", "path": str(path), "queries": args.queries, "warm": True, "threads": CORES,
                "trained": "float64"})
    return [
        "### The same d64 run trained in float64",
        "",
        "| case | scheduler | time (s) | max quadrature residual | max rounding residual (summed over updates) | "
        "total max error |",
        "|---|---|---|---|---|---|",
        f"| d64, trained in float64 | sync, {CORES} torch threads (warm) | {_fmt_s(r['seconds'])} | {r['qres']:.1e} | "
        f"{r['rounding']:.1e} | {r['total_error']:.1e} |",
        "",
    ]


SCALE_BASE = {"p": 37, "d_model": 32, "d_mlp": 128, "n_train": 64, "steps": 16, "queries": 4}
SCALE_PARAMS = {4: (64, 256), 16: (128, 512)}  # (d_model, MLP) for ~4x and ~14x the base's parameters


def scaling(args: argparse.Namespace, work: Path) -> list[str]:
    factors = (1, 4) if args.quick else (1, 4, 16)
    base = dict(SCALE_BASE)
    if args.quick:
        base["steps"] = 4
    configs: list[tuple[str, int, dict[str, Any]]] = []
    for f in factors:
        if f == 1:
            configs.append(("base", 1, dict(base)))
            continue
        configs.append(("updates", f, dict(base, steps=base["steps"] * f)))
        configs.append(("queries", f, dict(base, queries=base["queries"] * f)))
        configs.append(("training samples", f, dict(base, n_train=base["n_train"] * f)))
        dm = SCALE_PARAMS[f]
        configs.append(("parameters", f, dict(base, d_model=dm[0], d_mlp=dm[1])))
    lines = [
        "### Scaling (synchronous scheduler, 1 thread, by=sample+tensor)",
        "",
        (f"Base: p={base['p']}, d_model {base['d_model']}, MLP {base['d_mlp']}, {base['n_train']} training pairs "
         f"(full batch), {base['steps']} AdamW updates, {base['queries']} queries x {base['p']} outputs."),
        "",
        ("| grows | factor | updates | queries | train samples | params | time (s) | CPU (s) | CPU / base | "
         "peak RSS (MB) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    t_base = None
    for what, f, c in configs:
        path = work / f"scale-{c['p']}-{c['d_model']}-{c['d_mlp']}-{c['n_train']}-{c['steps']}"
        _record(path, c["steps"], c["n_train"], 64, p=c["p"], d_model=c["d_model"], d_mlp=c["d_mlp"])
        r = _child({"kind": "ours", "path": str(path), "queries": c["queries"], "by": ["sample", "tensor"],
                    "error": False, "warm": True})
        P = _n_params(c)
        t_base = r["cpu"] if what == "base" else t_base
        assert t_base is not None
        lines.append(f"| {what} | {f}x | {c['steps']} | {c['queries']} | {c['n_train']} | {P} | "
                     f"{_fmt_s(r['seconds'])} | {_fmt_s(r['cpu'])} | {r['cpu'] / t_base:.1f}x | {r['peak_mb']:.0f} |")
        print(f"[bench] scaling {what} {f}x: {r['seconds']:.2f}s", file=sys.stderr)
    # parallel speedup on the largest-updates config
    big = next(c for what, f, c in configs if what == "updates" and f == factors[-1])
    path = work / f"scale-{big['p']}-{big['d_model']}-{big['d_mlp']}-{big['n_train']}-{big['steps']}"
    idle = _child({"kind": "idle", "path": str(path)})
    one = _child({"kind": "ours", "path": str(path), "queries": big["queries"], "by": ["sample", "tensor"],
                  "error": False, "warm": True})
    two = _child({"kind": "ours", "path": str(path), "queries": big["queries"], "by": ["sample", "tensor"],
                  "error": False, "workers": CORES})
    lines += [
        "",
        (f"Parallel speedup ({big['steps']} updates config): sync with 1 torch thread {_fmt_s(one['seconds'])} s, "
         f"the default LocalCluster on {CORES} cores ({two['plan']}) {_fmt_s(two['seconds'])} s: "
         f"**{one['seconds'] / two['seconds']:.2f}x** wall clock."),
        "",
        (f"Peak RSS includes the interpreter with torch, dask and xarray imported and the store opened: "
         f"{idle['peak_mb']:.0f} MB. Times are warm (after a 1-update call in the same process)."),
        "",
        f"Load average (1/5/15 min) after the table: {_load()}.",
        "",
    ]
    return lines


def _n_params(c: dict[str, Any]) -> int:
    p, d, m = c["p"], c["d_model"], c["d_mlp"]
    return (p + 1) * d + 4 * d * d + d * m + m + m * d + d + p * d


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}; load average at start {_load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny case, few updates)")
    ap.add_argument("--workdir", default=os.environ.get("EXPLAIND_BENCH_DIR", "/tmp/explaind-bench"),
                    help="where the recorded runs are kept (reused between invocations)")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of our runs (median reported)")
    ap.add_argument("--baseline-updates", type=int, default=4,
                    help="updates the published-style baseline runs (its time is extrapolated to all)")
    ap.add_argument("--cases", default=",".join(HEAD_TO_HEAD), help="head-to-head cases, e.g. tiny or tiny,d64")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--skip-f64", action="store_true", help="no d64 run recorded in float64")
    ap.add_argument("--skip-cluster", action="store_true", help="no LocalCluster runs (sync only)")
    ap.add_argument("--per-update", action="store_true",
                    help="only the per-update phase table (CPU ms); the engine is whatever `import engine` finds, so "
                         "PYTHONPATH=<old checkout> measures an older engine on the same runs")
    ap.add_argument("--floor", action="store_true",
                    help="only the table of where one thread's time per update goes, against the dot products' "
                         "float64 matmul floor, for --cases")
    ap.add_argument("--f64-only", action="store_true", help="only the d64 case recorded in float64 (total error)")
    ap.add_argument("--summary-only", action="store_true",
                    help="only the summary table (warm one thread, default client, fixed cost) for --cases")
    ap.add_argument("--no-cluster-for", default="", help="with --summary-only: cases without the default client run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.update(_trust_env(dict(os.environ)))  # the bench's own model module, for recording and children
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
        return
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    if args.per_update:
        print("\n".join(per_update(args, Path(args.workdir) / "full")))
        return
    if args.floor:
        print("\n".join(floor(args, Path(args.workdir) / "full")))
        return
    out = ["## Engine", "", f"Machine: {machine()}.", ""]
    if args.f64_only:
        print("\n".join(float64_trained(args, work)))
        return
    if args.summary_only:
        print("\n".join(out + summary_only(args, work)))
        return
    out += head_to_head(args, work)
    if not args.quick and not args.skip_f64:
        out += float64_trained(args, work)
    if not args.skip_scaling:
        out += scaling(args, work)
    print("\n".join(out))


if __name__ == "__main__":
    main()
