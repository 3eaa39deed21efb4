"""``explaind demo --paper``: one seed of the paper's grokking configuration, recorded and decomposed end to end.

Configuration (ExPLAIND, Eichin et al., arXiv:2505.20076, Section 5 / Nanda et al. 2023): p = 113, 4,000 training
pairs (2,000 validation), one-layer transformer d_model 64, 4 heads, MLP 512, full-batch AdamW lr 1e-3, betas
(0.9, 0.98), weight decay 4.0, float32, up to 4,000 updates, stopped once training and validation accuracy are both
100% (checked every :attr:`PaperConfig.every` updates). Seed 3 reaches that at update 470.

Stages (each resumable across invocations; a finished stage or piece is reused when its parameters are unchanged):

1. ``record``         train and record ``run.zarr`` (an interrupted recording resumes where it stopped).
2. ``curves``         accuracy / loss every ``every`` updates, also on validation pairs whose mirror was (not)
                      trained; the phases (``explaind_app.report.find_phases``) and the circuit-formation window.
3. ``pipeline``       the pipeline-alignment test (``explaind_app.grokking.pipeline_alignment``) every ``every``.
4. ``components_A_B`` ``engine.attribute`` of the loss of ``component_queries`` validation points by step and
                      tensor over updates ``(A, B]``, one stage per piece of the whole run.
5. ``samples_A_B``    ``engine.attribute`` of the target log-probability of ``sample_queries`` validation points
                      (mirror not trained) by training sample over bins ``(A, B]`` of ``every`` updates: the bins of
                      the circuit-formation window and the bins holding each moment (one stage per bin).
6. ``report``         figures (PNG), markdown tables, ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explaind_app.demo import DemoConfig, _attribute_stage, _record, novel_mask, pick_queries
from explaind_app.stages import Stages, Timed, _digest, _jsonable, _table, _threads


@dataclass(frozen=True)
class PaperConfig(DemoConfig):
    """The paper's grokking configuration (fields of :class:`explaind_app.demo.DemoConfig`) plus: ``every``
    (evaluation and pipeline-checkpoint spacing, and the width of the per-sample bins), ``piece`` (updates per
    resumable engine piece, rounded up to whole store chunks), ``stop_at_100`` (stop when training and validation
    accuracy are both 100%) and ``chunk_updates`` (the store's chunk length; None: the recorder's default)."""

    p: int = 113
    n_train: int = 4000
    n_val: int = 2000
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 512
    lr: float = 1e-3
    weight_decay: float = 4.0
    dtype: str = "float32"
    seed: int = 3
    steps: int = 4000
    component_queries: int = 64
    component_rule: str = "kink"
    sample_queries: int = 4
    sample_rule: str = "kink"
    every: int = 10
    piece: int = 160
    stop_at_100: bool = True
    chunk_updates: int | None = None


PAPER = PaperConfig()
# seconds, for tests (``explaind demo --paper --quick``): tiny table and model, two pieces of 12 updates
PAPER_QUICK = PaperConfig(p=11, n_train=80, n_val=40, d_model=16, n_heads=2, d_mlp=32, lr=1e-2, weight_decay=1.0,
                          seed=0, steps=24, component_queries=4, sample_queries=2, every=4, piece=12,
                          chunk_updates=4)


def add_paper_option(demo: argparse.ArgumentParser) -> None:
    """Add ``--paper`` to the ``explaind demo`` parser: with it, :func:`run_paper_demo` runs instead of the default
    demo (``--out``, ``--quick``, ``--seed``, ``--steps``, ``--workers``, ``--sync``, ``--quiet`` apply to it)."""
    demo.add_argument("--paper", action="store_true",
                      help="the paper's grokking configuration (p = 113, 4,000 pairs, MLP 512, AdamW lr 1e-3, weight "
                           "decay 4, float32), seed 3 until 100%% training and validation accuracy: the whole run "
                           "decomposed, the pipeline test, DIR/report.md (default DIR demo-paper-out; resumable)")
    plain = demo.get_default("func")

    def cmd(args: argparse.Namespace) -> int:
        if not args.paper:
            return int(plain(args) or 0)
        if args.which == "lm":
            raise ValueError("--paper runs the modular-addition grokking transformer at the paper's configuration; it "
                             "does not apply to the lm demo: drop 'lm' or --paper")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        res = run_paper_demo(args.out or "demo-paper-out", quick=args.quick, seed=args.seed, steps=args.steps,
                             workers=args.workers, client="sync" if args.sync else None, progress=not args.quiet)
        return 0 if Path(res["report"]).exists() else 1

    demo.set_defaults(func=cmd)


def run_paper_demo(
    out_dir: str | Path = "demo-paper-out",
    *,
    quick: bool = False,
    seed: int | None = None,
    steps: int | None = None,
    workers: int | None = None,
    client: Any = None,
    config: PaperConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Record one seed at the paper's configuration, decompose the whole run and write ``report.md``.

    Args:
        out_dir: where ``run.zarr``, ``pieces/``, ``figures/``, the tables, ``results.json`` and ``report.md`` go.
        quick: the tiny configuration :data:`PAPER_QUICK` (seconds; for tests).
        seed, steps: override the seed / the most updates to record.
        workers, client: as in :func:`explaind_app.demo.run_demo` (``client="sync"``: the engine in this process).
        config: a full :class:`PaperConfig` (default :data:`PAPER`).
        progress, log: progress bars; where status lines go (default: print).

    Returns ``{"out_dir", "report", "figures", "tables", "ran", "reused", "seconds", "total_seconds", "updates",
    "phases", "window", "identity_error", "max_abs_residual", ...}``.
    """
    import torch

    log = log or (lambda s: print(s, flush=True))
    cfg = config or (PAPER_QUICK if quick else PAPER)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    if steps is not None:
        if int(steps) < 2:
            raise ValueError(f"steps must be at least 2, got {steps}")
        cfg = dataclasses.replace(cfg, steps=int(steps))
    with _threads(torch, 1):
        return _run(Path(out_dir), cfg, workers, client, progress, log)


def _stop_callback(cfg: PaperConfig, log: Callable[[str], None]) -> Callable[[int, float, Any], bool]:
    """Evaluate every ``cfg.every`` updates; True (stop) once training and validation accuracy are both 100%."""
    import torch

    from explaind_store.examples import modadd
    from explaind_store.examples.training import evaluate

    data = modadd.make_data(cfg.p, cfg.n_train, cfg.n_val, cfg.seed)
    (xt, _), (xv, yv) = data["train"], data["val"]
    novel = torch.from_numpy(novel_mask(xt.numpy(), xv.numpy(), cfg.p))
    sets = {**data, "novel": (xv[novel], yv[novel])}
    say_every = max(cfg.every, (cfg.steps // 20) // cfg.every * cfg.every)

    def callback(step: int, loss: float, model: Any) -> bool:
        if step % cfg.every:
            return False
        ev = evaluate(model, sets)
        done = cfg.stop_at_100 and ev["train_acc"] == 1.0 and ev["val_acc"] == 1.0
        if step % say_every == 0 or done:
            log(f"  update {step:5d}: accuracy train {ev['train_acc']:6.1%}  validation {ev['val_acc']:6.1%}  "
                f"(mirror not trained: {ev['novel_acc']:6.1%})" + ("  -> both 100%, stopping" if done else ""))
        return bool(done)

    return callback


def _run(out: Path, cfg: PaperConfig, workers: int | None, client: Any, progress: bool,
         log: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out, log)
    t_start = time.perf_counter()
    run_path, curves_path = out / "run.zarr", out / "curves.npz"

    # --- 1. record -------------------------------------------------------------------------------------------
    rec_params = {"train": cfg.train_kwargs(), "steps": cfg.steps, "every": cfg.every, "stop": cfg.stop_at_100,
                  "chunk_updates": cfg.chunk_updates}

    def record() -> Timed:
        log(f"training until training and validation accuracy are both 100% (at most {cfg.steps} updates)")
        return _record(cfg, run_path, st, rec_params, progress, log, callback=_stop_callback(cfg, log),
                       recorder_kwargs={"chunk_updates": cfg.chunk_updates} if cfg.chunk_updates else None)

    st.run("record", rec_params, [run_path], record)
    rec_digest = _digest(rec_params)
    # a recording redone in this call (same parameters, e.g. its marker was deleted) invalidates everything after it
    fresh = "record" in st.ran

    from explaind_app import grokking as gk
    from explaind_app import report as rep
    from explaind_store import open_run

    run = open_run(run_path)
    n_upd = int(run.committed_updates)
    x_train, _ = (t.numpy() for t in run.split("train"))
    x_val, y_val = (t.numpy() for t in run.split("val"))
    novel = novel_mask(x_train, x_val, cfg.p)

    # --- 2. curves -------------------------------------------------------------------------------------------
    cur_params = {"run": rec_digest, "every": cfg.every}

    def compute_curves() -> None:
        curves = rep.compute_curves(run, every=cfg.every, progress=progress,
                                    extra={"val_novel": (x_val[novel], y_val[novel]),
                                           "val_mirror": (x_val[~novel], y_val[~novel])})
        np.savez(curves_path, **curves)

    st.run("curves", cur_params, [curves_path], compute_curves, recompute=fresh)
    curves = dict(np.load(curves_path))
    phases = rep.find_phases(curves)
    window = gk.circuit_window(curves)
    at = gk.moments(phases, window, n_upd)

    # --- 3. pipeline -----------------------------------------------------------------------------------------
    pipe_path = out / "pipeline.json"
    st.run("pipeline", cur_params, [pipe_path],
           lambda: _write_json(pipe_path, gk.pipeline_alignment(run, every=cfg.every)), recompute=fresh)
    pipeline = json.loads(pipe_path.read_text())

    # --- 4./5. engine pieces ---------------------------------------------------------------------------------
    comp_q = pick_queries(len(x_val), cfg.component_queries, cfg.seed + 1)
    samp_q = pick_queries(len(x_val), cfg.sample_queries, cfg.seed + 2, mask=novel)
    windows = gk.pieces(0, n_upd, cfg.piece, int(run.chunk_updates))
    jobs = []
    for lo, hi in windows:
        jobs.append((f"components_{lo}_{hi}", {
            "run": rec_digest, "queries": comp_q, "output": cfg.component_output, "by": ["step", "tensor"],
            "rule": cfg.component_rule, "steps": [lo, hi]}))
    # per-sample scores in bins of ``every`` updates, one engine call each, over the circuit-formation window and at
    # each moment. Not over the whole run: per-sample scores by origin update cost grows faster than the window
    # length (each batch's gradient is followed through the later updates its momentum reaches), and at 160-update
    # pieces it was the one stage that did not fit an hour on this machine
    samp_windows = _sample_windows(window, at, cfg.every, n_upd)
    for lo, hi in samp_windows:
        jobs.append((f"samples_{lo}_{hi}", {
            "run": rec_digest, "queries": samp_q, "output": cfg.sample_output, "by": ["sample"],
            "rule": cfg.sample_rule, "method": cfg.sample_method, "steps": [lo, hi]}))
    pieces_dir = out / "pieces"
    todo = st.pending([(name, params, [pieces_dir / f"{name}.zarr"]) for name, params in jobs], recompute=fresh)
    if todo:
        _engine_pieces([job for job in jobs if job[0] in todo], run_path, pieces_dir, st, client, workers, progress,
                       log)

    import xarray as xr

    comp = [xr.open_zarr(pieces_dir / f"components_{lo}_{hi}.zarr") for lo, hi in windows]
    samp = [xr.open_zarr(pieces_dir / f"samples_{lo}_{hi}.zarr") for lo, hi in samp_windows]

    # --- 6. report -------------------------------------------------------------------------------------------
    rep_params = {"stages": [_marker_digest(st, n) for n in ("curves", "pipeline", *(n for n, _ in jobs))],
                  "version": 1}
    report_path, results_path = out / "report.md", out / "results.json"
    engine_on = ("this process (--sync)" if client == "sync" else
                 "a local Dask process cluster" if client is None else f"the Dask scheduler {client}")
    st.run("report", rep_params, [report_path, results_path], lambda: _report(
        out, cfg, st, curves, phases, window, at, pipeline, comp, samp, comp_q, samp_q, x_train, x_val, y_val,
        windows, samp_windows, n_upd, engine_on))
    results = json.loads(results_path.read_text())
    total = time.perf_counter() - t_start
    log("\n" + _table([
        ("updates", f"{n_upd} (seed {cfg.seed}; p = {cfg.p}, {cfg.n_train} training / {cfg.n_val} validation pairs)"),
        ("phases", f"memorised {phases['memorised']}, novel validation 50% {phases['rise']}, validation 95% "
                   f"{phases['grokked']}; circuit window ({window[0]}, {window[1]}]"),
        ("identity", f"initial + parts + residual - final: max {max(abs(v) for v in results['identity_error']):.1e}"),
        ("max residual", f"{results['max_abs_residual']:.2e} over a change of {results['max_abs_change']:.3g}"),
        ("stages", f"computed: {', '.join(st.ran) or 'none'}; reused: {len(st.reused)}"),
        ("this call", f"{total:.1f} s"), ("report", str(report_path.resolve())),
    ]))
    return {
        "out_dir": str(out), "report": str(report_path), "results": str(results_path), "run": str(run_path),
        "figures": sorted(str(p) for p in (out / "figures").glob("*.png")),
        "tables": sorted(str(p) for p in out.glob("*.md") if p.name != "report.md"),
        "ran": list(st.ran), "reused": list(st.reused), "seconds": dict(st.seconds), "total_seconds": total,
        "updates": n_upd, "phases": phases, "window": list(window), "moments": at, "config": dataclasses.asdict(cfg),
        "identity_error": results["identity_error"], "max_abs_residual": results["max_abs_residual"],
        "component_queries": comp_q, "sample_queries": samp_q,
    }


def _sample_windows(window: tuple[int, int], at: dict[str, int], every: int, n_upd: int) -> list[tuple[int, int]]:
    """Bins ``(lo, lo + every]`` covering the circuit-formation ``window`` and holding each moment, sorted."""
    los = set(range(window[0] // every * every, window[1], every))
    los |= {max(0, (m - 1) // every * every) for m in at.values()}
    return sorted((lo, min(lo + every, n_upd)) for lo in los if lo < n_upd)


def _marker_digest(st: Stages, name: str) -> str:
    """Digest of a finished stage's marker (its parameters and when it finished): a stage recomputed with the same
    parameters still changes it, so whatever was built on the old output is rebuilt."""
    return _digest(json.loads(st.path(name).read_text()))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj)))
    tmp.replace(path)


def _engine_pieces(todo: list[tuple[str, dict[str, Any]]], run_path: Path, pieces_dir: Path, st: Stages,
                   client: Any, workers: int | None, progress: bool, log: Callable[[str], None]) -> None:
    import engine

    pieces_dir.mkdir(parents=True, exist_ok=True)
    own = client is None
    if own:
        log("starting a local Dask process cluster (" + (f"{workers} workers" if workers else "one worker per core") + ")")
        client = engine.local_client(workers)

    def compute(path: Path, params: dict[str, Any]) -> Timed:
        ds, secs = _attribute_stage(run_path, path, params, client, progress)
        return Timed(secs, {
            "max_abs_residual": float(ds.attrs.get("max_abs_residual", float("nan"))),
            "max_abs_change": float(ds.attrs.get("max_abs_change", float("nan"))),
            "load_1min": os.getloadavg()[0],  # the machine's load when the piece ended (timings depend on it)
        })

    try:
        for name, params in todo:
            path = pieces_dir / f"{name}.zarr"
            st.run(name, params, [path], functools.partial(compute, path, params), recompute=True)
    finally:
        if own:
            engine.close_local_client()


def _report(out: Path, cfg: PaperConfig, st: Stages, curves: dict[str, np.ndarray], phases: dict[str, Any],
            window: tuple[int, int], at: dict[str, int], pipeline: dict[str, Any], comp: list[Any], samp: list[Any],
            comp_q: list[int], samp_q: list[int], x_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            windows: list[tuple[int, int]], samp_windows: list[tuple[int, int]], n_upd: int, engine_on: str) -> None:
    from explaind_app import grokking as gk
    from explaind_app import report as rep

    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    series = gk.component_series(comp)
    res_rows = gk.residual_table(comp)
    bins = gk.sample_bins(samp)
    answers = (x_train[:, 0].astype(int) + x_train[:, 1].astype(int)) % cfg.p
    answers_q = [int(y_val[i]) for i in samp_q]
    labels = [f"val #{i}: {int(x_val[i, 0])}+{int(x_val[i, 1])}={int(y_val[i])}" for i in samp_q]
    win_scores = gk.window_scores(bins, window)

    def save(name: str, fig: Any) -> str:
        fig.savefig(figs / name, dpi=80)
        return f"figures/{name}"

    pngs = {
        "training": save("training.png", rep.fig_training(curves, phases)),
        "pipeline": save("pipeline.png", gk.fig_pipeline(pipeline, phases)),
        "components": save("components.png", gk.fig_components_whole(series, phases, window)),
        "residuals": save("residuals.png", gk.fig_residuals_whole(series, [hi for _, hi in windows[:-1]])),
        "samples": save("samples.png", gk.fig_sample_time(bins, answers, answers_q, labels, phases, window)),
        "moments": save("moments.png", gk.fig_moments(bins, at, answers, cfg.p, labels, answers_q)),
    }
    comps = list(series["movement"]["data"])
    totals = {part: {c: float(np.sum(series["movement"][part][c])) for c in comps} for part in gk.MOVEMENT_PARTS}
    in_win = [(s > window[0]) and (s <= window[1]) for s in series["step"]]
    win_totals = {part: {c: float(np.sum(np.asarray(series["movement"][part][c])[in_win])) for c in comps}
                  for part in gk.MOVEMENT_PARTS}
    comp_rows = [[c] + [f"{totals[p][c]:+.4f}" for p in gk.MOVEMENT_PARTS]
                 + [f"{win_totals[p][c]:+.4f}" for p in gk.MOVEMENT_PARTS] for c in comps]
    comp_md = rep.md_table(["component", "data (whole run)", "weight decay (whole run)", "momentum (whole run)",
                            f"data ({window[0]}, {window[1]}]", f"weight decay ({window[0]}, {window[1]}]",
                            f"momentum ({window[0]}, {window[1]}]"], comp_rows)
    res_md = gk.residual_markdown(res_rows)
    top_md = gk.top_samples_markdown(win_scores, x_train, labels, cfg.p)
    pipe_md = gk.pipeline_summary(pipeline, phases)
    for name, text in (("components.md", comp_md), ("residuals.md", res_md), ("top_samples.md", top_md),
                       ("pipeline.md", pipe_md)):
        (out / name).write_text(text)
    ident = np.asarray(series["identity_error"])
    change = np.asarray(series["final"]) - np.asarray(series["initial"])
    results = {
        "config": dataclasses.asdict(cfg), "updates": n_upd, "phases": {k: phases[k] for k in
                                                                         ("memorised", "rise", "grokked", "grokking")},
        "window": list(window), "moments": at, "pieces": [list(w) for w in windows],
        "sample_pieces": [list(w) for w in samp_windows], "engine_on": engine_on,
        "component_queries": comp_q, "sample_queries": samp_q,
        "identity_error": ident.tolist(),
        "max_abs_residual": float(np.abs(series["residual_total"]).max()),
        "max_abs_change": float(np.abs(change).max()), "mean_change": float(change.mean()),
        "totals": totals, "window_totals": win_totals, "residual_windows": res_rows,
        "seconds": dict(st.seconds),
        "load_1min": {k: v["load_1min"] for k, v in st.info.items() if "load_1min" in v},
        "notes": {k: v["note"] for k, v in st.info.items() if "note" in v},
        "series": {"step": series["step"], "delta": series["delta"], "residual": series["residual"],
                   "movement": series["movement"]},
    }
    _write_json(out / "results.json", results)
    mean_res = float(np.sum(series["residual"]))
    text = [
        f"# explaind demo --paper: seed {cfg.seed}\n",
        f"p = {cfg.p}, {cfg.n_train} training / {cfg.n_val} validation pairs; one-layer transformer d_model "
        f"{cfg.d_model}, {cfg.n_heads} heads, MLP {cfg.d_mlp}; full-batch AdamW lr {cfg.lr:g}, betas "
        f"{tuple(cfg.betas)}, weight decay {cfg.weight_decay:g}, {cfg.dtype}. {n_upd} updates recorded "
        f"(stopped when training and validation accuracy were both 100%, checked every {cfg.every}).\n",
        f"Phases: training accuracy 99% at {phases['memorised']}, accuracy on validation pairs whose mirror was not "
        f"trained 50% at {phases['rise']}, validation accuracy 95% at {phases['grokked']}. Circuit-formation "
        f"window (novel validation accuracy from 10% to validation accuracy 99%): ({window[0]}, {window[1]}].\n",
        f"![training]({pngs['training']})\n",
        "## Whole run: the validation loss per component\n",
        f"Loss of {len(comp_q)} fixed validation points, decomposed by update and tensor over ({0}, {n_upd}] in "
        f"{len(windows)} pieces (quadrature {cfg.component_rule}). Mean over the points of the change "
        f"{float(change.mean()):+.4f}; the parts sum to it up to the residual {mean_res:+.2e}. \"momentum\" is the "
        "AdamW first moment carried into each piece (gradients of batches before the piece); data + momentum is "
        "what the training batches moved.\n",
        comp_md, f"\n![components]({pngs['components']})\n",
        "## Residuals per window\n",
        "Largest over the query points; relative = residual / change. The quadrature residual is the error of the "
        "path integral; the rounding residual is what the recorded float32 update and its float64 rebuild disagree "
        "on.\n", res_md, f"\n![residuals]({pngs['residuals']})\n",
        f"Closing identity per query (initial + data + weight decay + momentum + residual - final), largest: "
        f"{float(np.abs(ident).max()):.1e}.\n",
        "## Per-sample scores over the circuit-formation window\n",
        f"Target log-probability of {len(samp_q)} validation points whose mirror was not trained, by training "
        f"sample, updates summed into bins of {cfg.every}. Scores summed over ({window[0]}, {window[1]}]:\n",
        top_md, f"\n![samples]({pngs['samples']})\n",
        "## The query x training-sample matrix at moments\n",
        ", ".join(f"{k}: update {v}" for k, v in at.items()) + ".\n", f"![moments]({pngs['moments']})\n",
        "## Pipeline alignment\n", pipe_md, f"\n![pipeline]({pngs['pipeline']})\n",
        "## Time per stage (seconds)\n",
        rep.md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in st.seconds.items()]),
    ]
    (out / "report.md").write_text("\n".join(text))
