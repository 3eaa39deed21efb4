"""Write ``docs/experiments.md`` and its figures (``docs/img/experiments_*.png``) from the saved results.

Every number and table in the page comes from ``experiments/results/`` (written by the experiment scripts); the
prose around them is fixed here. Sections whose results are missing say so.

    python -m experiments.report [--docs docs]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common
from experiments.grokking import phase_text

HEAD = """# Experiments: the paper's findings recomputed exactly

The paper (ExPLAIND, Eichin et al., [arXiv:2505.20076](https://arxiv.org/abs/2505.20076)) makes three kinds of
claims this page checks with the exact decomposition of this project, on a 2-core CPU shared with other jobs:
parameter pruning by ExPLAIND's element-wise scores is "comparable to existing methods"; the grokking transformer's
last phase is "one of alignment of input embeddings and final layers around a representation pipeline learned after
the memorization phase" (both from the abstract; the pruning comparison and the pipeline-alignment plots are in the
paper's pruning and grokking sections); and, a question the paper does not ask, whether per-sample scores predict
retraining (a linear datamodeling score, LDS).

Everything below is written by `python -m experiments.report` from the results the scripts saved under
`experiments/results/`; `notebooks/05_experiments.ipynb` redraws the plots from the same files.
"""

REPRO = """## Reproduce

The commands that produced the results above (each resumable; work files under `experiments-work/`, or
`$EXPLAIND_EXPERIMENTS_WORK`):

```bash
python -m experiments.pruning                    # 5 seeds: record, score 148 validation points element-wise, prune
python -m experiments.pruning_grokked             # seeds 3 2 1 0 (grokking configuration): record, score 1,000 pairs, prune
python -m experiments.lds                        # 100 subsets x 64 validation points
python -m experiments.grokking --stage train --seeds 43                        # recorded, up to 4,000 updates
python -m experiments.grokking --stage train --seeds 0 1 2 --max-steps 1200    # the other seeds, as run here
python -m experiments.grokking --stage train pipeline --seeds 43 0 1 2 3 --record 43 3 --max-steps 1200
python -m experiments.grokking --stage decompose --seeds 43 --window 0:1000 --piece 50
python -m experiments.grokking --stage whole     # = explaind demo --paper (seed 3), tables/figures copied as whole_*
python -m experiments.report                     # this page and docs/img/experiments_*.png
```

`python -m experiments.grokking --stage train` without `--max-steps` runs every seed to 4,000 updates (the
paper's budget). The tests of the pure pieces (importance, masks, metrics, Spearman, LDS) and of the pipeline
query are in `tests/app/test_experiments.py`; `notebooks/05_experiments.ipynb` redraws the plots from
`experiments/results/`.

`explaind demo --paper [--out DIR]` runs the whole-run decomposition of seed 3 on its own (record, curves, pipeline
test, engine pieces, report.md; every stage resumable across invocations); `explaind demo --paper --quick` is the
same pipeline at a tiny size (seconds), which `tests/app/test_demo_paper.py` runs.
"""


def _img(src: Path, docs: Path, name: str) -> str | None:
    if not src.exists():
        # result PNGs are not committed (experiments/results/**/*.png is ignored): a checkout that did not run the
        # experiment keeps the figure committed under docs/img
        return f"![{name}](img/{name})" if (docs / "img" / name).exists() else None
    (docs / "img").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, docs / "img" / name)
    return f"![{name}](img/{name})"


def verdict(agg: list[dict[str, Any]], scope: str, lo: float, hi: float, n_test: int) -> str:
    """Which method has the best mean accuracy / the lowest mean KL at each kept fraction in ``[lo, hi)``."""
    # accuracies within half a test point of the best count as a tie (the differences are single points)
    wins: dict[str, dict[str, int]] = {"accuracy": {}, "kl": {}}
    cells = sorted({a["kept"] for a in agg if a["scope"] == scope and lo <= a["kept"] < hi})
    for kept in cells:
        sel = [a for a in agg if (a["scope"], a["kept"]) == (scope, kept)]
        for metric, pick, tol in (("accuracy", max, 0.5 / n_test), ("kl", min, 1e-12)):
            best = pick(a[f"{metric}_mean"] for a in sel)
            winners = [a["method"] for a in sel if abs(a[f"{metric}_mean"] - best) <= tol]
            key = winners[0] if len(winners) == 1 else "several methods (tied)"
            wins[metric][key] = wins[metric].get(key, 0) + 1
    fmt = lambda w: ", ".join(f"{m} at {n}" for m, n in sorted(w.items(), key=lambda t: -t[1]))
    return (f"best mean test accuracy: {fmt(wins['accuracy'])}; lowest mean KL to the unpruned model: "
            f"{fmt(wins['kl'])} (of {len(cells)} kept fractions)")


def verdicts(agg: list[dict[str, Any]], n_test: int) -> str:
    """:func:`verdict` for both scopes, on the paper's grids and below them (markdown bullets)."""
    return "\n".join(
        f"- {scope.replace('_', '-')}, {label}: {verdict(agg, scope, lo, hi, n_test)}."
        for scope in ("global", "per_module")
        for label, lo, hi in (("the paper's grids (kept 0.7-0.999)", 0.7, 1.01), ("kept below 0.7", 0.0, 0.7)))


def pruning_section(res: Path, docs: Path) -> str:
    d = res / "pruning"
    if not (d / "pruning.json").exists():
        return "## 1. Pruning\n\nNot run yet (`python -m experiments.pruning`).\n"
    j = common.read_json(d / "pruning.json")
    agg = j["aggregate"]
    seeds = j["config"]["seeds"]
    eng = [t["engine_s"] for t in j["timing"].values()]
    res_max = max(t["max_abs_residual"] for t in j["timing"].values())
    # which method has the best mean accuracy / the lowest mean KL at each (scope, kept), on the paper's grids and
    # on the fractions added below them
    n_test = j["config"]["n_val"] - j["config"]["held_out"]

    text_verdict = verdicts(agg, n_test)
    img = _img(d / "pruning.png", docs, "experiments_pruning.png") or ""
    return f"""## 1. Pruning by element-wise scores (digits CNN)

**Paper:** pruning parameters by ExPLAIND's parameter-wise scores is comparable to existing methods (abstract; the
paper's pruning experiment uses a CNN on CIFAR-2 trained with SGD, momentum, weight decay and a triangular
learning-rate schedule, with kept fractions 0.7-0.99 and 0.97-0.999).

**Ours:** the digits CNN (`explaind_store/examples/digits_cnn.py`: 8x8 scikit-learn digits, convolutions 8 and 16
channels, MLP 32; SGD momentum 0.9, weight decay 5e-3, triangular lr peaking at 0.05 after 20% of {j['config']['steps']}
updates, batch 64), trained and recorded once per seed (seeds {', '.join(map(str, seeds))}: each seed is its own
data split, initialisation and batch order). Importance of a parameter element = |its contribution to the
log-softmax outputs (all 10 classes) of the first {j['config']['held_out']} validation points, summed over those
points, classes and the parts data / weight decay / momentum| (`engine.attribute(..., by=("param",))`, summed with
signs, absolute value last; `explaind_per_class` takes the absolute value per class and then sums over the classes,
so effects on different classes cannot cancel). Baselines: |theta| (magnitude) and uniform random scores. Pruned elements are set to 0,
either ranked over all tensors together (global) or within each tensor (per module); the pruned model is measured on
the other {j['config']['n_val'] - j['config']['held_out']} validation points against the unpruned one.
Engine time per seed (one process, one torch thread, machine shared): {np.mean(eng):.0f} s on average
({min(eng):.0f}-{max(eng):.0f} s); largest total residual of the decomposition {res_max:.1e}.

{text_verdict}

{(d / 'pruning.md').read_text()}
{img}
"""


def _at_kept(agg: list[dict[str, Any]], methods: tuple[str, ...], kept: tuple[float, ...]) -> str:
    """One bullet per scope and kept fraction: the mean ± std test accuracy of each method."""
    by = {(a["method"], a["scope"], a["kept"]): a for a in agg}
    lines = []
    for scope in ("global", "per_module"):
        for k in kept:
            cells = [f"{m} {common.pm(by[(m, scope, k)]['accuracy_mean'], by[(m, scope, k)]['accuracy_std'])}"
                     for m in methods if (m, scope, k) in by]
            lines.append(f"- {scope.replace('_', '-')}, kept {k:g}: test accuracy " + ", ".join(cells) + ".")
    return "\n".join(lines)


def pruning_grokked_section(res: Path, docs: Path) -> str:
    d = res / "pruning_grokked"
    head = "### 1b. Pruning the grokked transformer\n\n"
    if not (d / "pruning_grokked.json").exists():
        return head + "Not run yet (`python -m experiments.pruning_grokked`).\n"
    j = common.read_json(d / "pruning_grokked.json")
    c, seeds = j["config"], j["seeds"]
    n_test = c["n_val"] - c["held_out"]
    rows = [[s, v["updates"], v["val100"], f"{v['final_val_acc']:.3f}",
             # a store recorded by an earlier, interrupted call is resumed in no time: its training time is not known
             f"{v['train_s']:.0f}" if v["train_s"] >= 1 else "(earlier call)", f"{v['engine_s']:.0f}",
             f"{v['change']:.4g}", f"{v['residual']:.2e}", f"{v['abs_residual']:.2e}"] for s, v in seeds.items()]
    seed_table = common.md_table(["seed", "updates", "val acc 100% at", "final val acc", "train + record s",
                                  "engine s", "change of the summed log-probabilities", "total residual",
                                  "sum of abs residuals per update"], rows)
    groups = "; ".join(f"{g}: {', '.join(ts)}" for g, ts in c["groups"].items())
    img = _img(d / "pruning_grokked.png", docs, "experiments_pruning_grokked.png") or ""
    return head + f"""**Paper:** the same claim, "comparable to existing methods" (abstract), made for the parameter-wise scores of
both models the paper studies, the CNN and the grokking transformer; the paper's pruning figure compares its
scores with magnitude and random pruning on the same kept-fraction grids (0.7-0.99 and 0.97-0.999). Its values are
not copied here.

**Ours:** the paper's grokking configuration (section 3; p = {c['p']}, {c['n_train']} training pairs, d_model
{c['d_model']}, {c['n_heads']} heads, MLP {c['d_mlp']}, full-batch AdamW lr {c['lr']:g}, betas {tuple(c['betas'])}, weight decay
{c['weight_decay']:g}, {c['dtype']}), each seed trained and recorded until training and validation accuracy are both
100% (at most {c['max_steps']} updates) and decomposed over its whole run. Importance of a parameter element =
|its contribution to the log-softmax outputs (all {c['p']} classes) of the first {c['held_out']} validation pairs, summed
over those pairs, classes and the parts data / weight decay / momentum|, as for the CNN. Because the score is
linear in the explained function, the sum over pairs and classes is decomposed as one function, the sum of their
log-probabilities (`experiments.pruning_grokked.with_query_sets`: one output instead of {c['held_out']} x {c['p']};
`tests/app/test_experiments.py` checks that both give the same scores). Quadrature `{c['rule']}` on every update
(the kink rule would cut each update at every unit flip of any of the {c['held_out']} pairs: 118-255 kinks per
update measured on 20 pairs); the residual it leaves is in the table below. The per-class variant of the CNN
(`explaind_per_class`) is not computed: it needs {c['p']} outputs; `explaind_per_part` takes the absolute value of
each part (data, weight decay, momentum) before summing the parts. Baselines: |theta| and uniform random scores
({c['random_draws']} random draws per training seed). Per module = per component ({groups}). Pruned models are
measured on the other {n_test} validation pairs. Seeds {', '.join(map(str, c['seeds']))} (one process each, one torch
thread, on the 2-core machine shared with other jobs, so the engine seconds depend on its load at the time):

{seed_table}
{verdicts(j["aggregate"], n_test)}
{_at_kept(j["aggregate"], ("explaind", "explaind_per_part", "magnitude", "random"), (0.9, 0.99))}

The importance is the change of the explained function that an element's movement over the whole run caused, not
how much the function depends on the element's final value, which is what zeroing it tests; under weight decay 4.0
an element's data and decay contributions can cancel while its final value still matters. `explaind_per_part`
(the absolute value of each part, then summed) removes that cancellation: compare its rows with `explaind`'s.

{(d / 'pruning_grokked.md').read_text()}
{img}
"""


def lds_section(res: Path, docs: Path) -> str:
    d = res / "lds"
    if not (d / "lds.json").exists():
        return "## 2. Linear datamodeling score\n\nNot run yet (`python -m experiments.lds`).\n"
    j = common.read_json(d / "lds.json")
    c, t = j["config"], j["timing"]
    img = _img(d / "lds.png", docs, "experiments_lds.png") or ""
    m = j["methods"]
    best = max(m, key=lambda k: m[k]["mean"])
    return f"""## 2. Does a per-sample score predict retraining? (LDS, digits CNN)

**Paper:** not measured there. ExPLAIND's per-sample scores are exact for the recorded run (they sum to the change
of the output), which does not imply that they predict what retraining without those samples would do.

**Ours:** the digits CNN (seed {c['seed']}, {c['steps']} updates) recorded once; per-sample effects on the loss of
{c['queries']} validation points from (a) ExPLAIND (`engine.attribute(..., output="loss", by=("sample",))`, the
`data` part; {t['explaind_s']:.0f} s), (b) the gradient dot product at the final parameters and (c) TracIn over
checkpoints every {c['tracin_every']} updates weighted by the learning rate ({t['baselines_s']:.0f} s for both).
{c['subsets']} retrainings with the same recipe, initialisation and number of updates on random
{c['fraction']:.0%} subsets; the actual change of each validation loss (subset model minus the model retrained on
all data) against the predicted change (minus the summed effects of the removed samples), Spearman correlation over
subsets per validation point. The highest mean LDS here: **{best}**.

{(d / 'lds.md').read_text()}
{img}
"""


def grokking_section(res: Path, docs: Path) -> str:
    d = res / "grokking"
    out = ["""## 3. Grokking at the paper's configuration

**Paper:** p = 113, 4,000 training pairs, one-layer transformer (d_model 64, 4 heads, MLP 512), full-batch AdamW lr
1e-3, betas (0.9, 0.98), weight decay 4.0; the model memorises, forms a circuit and cleans up (the three phases of
Nanda et al.), and in the last phase the embedding and final layers align around a "pipeline" (attention, MLP in)
learned after memorisation.

**Ours:** the same configuration (`explaind_store/examples/modadd.py`, float32), up to 4,000 updates or until
training and validation accuracy are both 100%, evaluated every 10 updates. "Mirror not trained": validation pairs
(a, b) whose mirror (b, a) is not a training pair (the model has no positional encoding, so it answers (a, b) like
(b, a)); phases from `explaind_app.report.find_phases` (memorised = training accuracy 99%; circuit formation until
novel validation accuracy 50%; grokked = validation accuracy 95%, counted as grokking when at least 1.5x the
memorisation step).
"""]
    if (d / "seeds.md").exists():
        out.append((d / "seeds.md").read_text())
        out.append(_img(d / "curves.png", docs, "experiments_grokking_curves.png") or "")
    else:
        out.append("Training not run yet (`python -m experiments.grokking --stage train`).\n")
    out.append("""
### Pipeline alignment (from the recorded store of seed 43)

For every checkpoint s (every 10 updates) the final model's tensors of a variant replace the checkpoint's, the rest
(at least the attention, the "pipeline") stays at step s; validation accuracy and KL(final || hybrid) over s. If
the pipeline exists before validation accuracy rises, the "final outer" hybrid reaches high accuracy at checkpoints
before the run itself does.
""")
    seeds = {r["seed"]: r for r in common.read_json(d / "seeds.json")} if (d / "seeds.json").exists() else {}
    rec = seeds.get(43)
    if rec is not None and rec["phases"].get("grokked") is None:
        out.append(f"Seed 43 did not reach 95% validation accuracy within its {rec['updates']} updates, so the \"final\" "
                   "model of this test is not a grokked model: the test asks whether the last checkpoint's outer layers "
                   "fit the pipelines of earlier checkpoints, not the paper's question about a grokked model.\n")
    if (d / "pipeline.md").exists():
        out.append((d / "pipeline.md").read_text())
        out.append(_img(d / "pipeline.png", docs, "experiments_pipeline.png") or "")
    else:
        out.append("Not run yet (`python -m experiments.grokking --stage pipeline`).\n")
    for f in sorted(d.glob("pipeline_seed*.md")):
        seed = f.stem.split("seed")[-1]
        r = seeds.get(int(seed))
        out.append(f"\n**Seed {seed}** (also recorded" + (f"; {phase_text(r)}" if r else "") + "), the same test:\n")
        out.append(f.read_text())
        out.append(_img(d / f"pipeline_seed{seed}.png", docs, f"experiments_pipeline_seed{seed}.png") or "")
    out.append("\n### Decomposition of seed 43\n")
    if (d / "decompose.md").exists():
        out.append((d / "decompose.md").read_text())
        times = common.read_json(d / "decompose.json")
        n = sum(t["window"][1] - t["window"][0] for t in times)
        secs = sum(t["seconds"] for t in times)
        full = rec["updates"] if rec is not None else 4000
        out.append(f"\n{n} updates took {secs:.0f} s ({secs / max(n, 1):.0f} s per update on this shared CPU, one "
                   f"process); the whole recorded run ({full} updates) would take about {secs / max(n, 1) * full / 3600:.1f} "
                   "hours at that rate, so only this window was decomposed here. The stage is resumable: "
                   "`python -m experiments.grokking --stage decompose --window A:B` adds pieces.\n")
        comp = _img(d / "components.png", docs, "experiments_grokking_components.png")
        if comp:
            out.append("Cumulative change of the mean loss of the 64 validation points per component over the decomposed "
                       "window, from the training data (left) and from weight decay (right):\n\n" + comp + "\n")
    else:
        out.append("Not run in this session (`python -m experiments.grokking --stage decompose`): see the stage "
                   "times below when it has.\n")
    out.append(whole_section(d, docs))
    return "\n".join(out)


def whole_section(d: Path, docs: Path) -> str:
    """The whole run of one seed decomposed (``python -m experiments.grokking --stage whole``, i.e. ``explaind demo
    --paper``), from ``whole.json`` and the ``whole_*`` tables and figures."""
    if not (d / "whole.json").exists():
        return ("\n### Whole run decomposed\n\nNot run yet (`python -m experiments.grokking --stage whole`, or "
                "`explaind demo --paper`).\n")
    w = common.read_json(d / "whole.json")
    cfg, ph, win = w["config"], w["phases"], w["window"]
    secs = w["seconds"]
    rec = secs.get("record", 0.0)
    comp_s = sum(v for k, v in secs.items() if k.startswith("components_"))
    samp_s = sum(v for k, v in secs.items() if k.startswith("samples_"))
    other = {k: v for k, v in secs.items() if not k.startswith(("components_", "samples_"))}
    total = sum(secs.values())
    loads = list(w.get("load_1min", {}).values())
    res_rows = w["residual_windows"]
    quad = max(r["max_quadrature_per_update"] for r in res_rows)
    rnd = max(r["max_rounding_per_update"] for r in res_rows)
    worst = max(res_rows, key=lambda r: r["relative"])
    ident = max(abs(v) for v in w["identity_error"])
    out = [f"""
### Whole run of seed {cfg['seed']} decomposed (`explaind demo --paper`)

Seed {cfg['seed']} recorded again at the paper's configuration and stopped when training and validation accuracy were
both 100% (checked every {cfg['every']} updates): {w['updates']} updates. Phases: training accuracy 99% at
{ph['memorised']}, novel validation accuracy 50% at {ph['rise']}, validation accuracy 95% at {ph['grokked']}; the
circuit-formation window (novel validation accuracy from 10% to validation accuracy 99%) is ({win[0]}, {win[1]}].
The whole run was decomposed in {len(w['pieces'])} resumable pieces ({', '.join(f'({a}, {b}]' for a, b in w['pieces'])}):
the loss of {len(w['component_queries'])} fixed validation points by update and tensor (quadrature
{cfg['component_rule']}), and the target log-probability of {len(w['sample_queries'])} validation points whose mirror
was not trained by training sample, over bins of {cfg['every']} updates covering the circuit-formation window and
holding each moment below ({len(w['sample_pieces'])} engine calls, one per bin: scores by training sample and origin
update over a 160-update piece did not finish within half an hour on this loaded machine, while a 10-update bin
takes under a minute, so the per-sample scores do not cover the whole run).

**Per component, split into data, weight decay and momentum** (change of the mean loss of the
{len(w['component_queries'])} points, whole run and circuit window; "momentum" is the AdamW first moment carried
into each piece, i.e. gradients of batches before the piece, so data + momentum is what the training batches
moved). Mean change of the loss over the run {w['mean_change']:+.4f}.
""", (d / "whole_components.md").read_text(),
           _img(d / "whole_components.png", docs, "experiments_whole_components.png") or "",
           f"""
**Residuals per window.** The closing identity (initial + data + weight decay + momentum + residual - final, per
query, over all pieces) holds to {ident:.1e}. Per update the quadrature residual (the error of the path integral)
stays below {quad:.1e} and the rounding residual (what the recorded float32 update and its float64 rebuild from the
recorded gradients disagree on) reaches {rnd:.1e}""" + (
        ": the residual is the float32 training arithmetic, not the quadrature (the same run trained in float64 would "
        "rebuild to float64 rounding; AdamW divides by the root of small second moments, which magnifies the float32 "
        "rounding of small gradients)" if rnd > 10 * quad else "") + f""". The
largest residual relative to its window's change is {worst['relative']:.1e}, in ({worst['window'][0]},
{worst['window'][1]}].
""", (d / "whole_residuals.md").read_text(),
           _img(d / "whole_residuals.png", docs, "experiments_whole_residuals.png") or "",
           f"""
**Per-sample scores over the circuit-formation window** ({win[0]}, {win[1]}]: the most helpful and most harmful
training samples per validation point (scores summed over the window's bins), and per bin the summed scores of the
training samples that share the point's answer (a + b) mod p against all others. A bin's scores are what its own
batches moved through its own updates; the momentum carried into a bin is not split by sample:
""", (d / "whole_top_samples.md").read_text(),
           _img(d / "whole_samples.png", docs, "experiments_whole_samples.png") or "",
           f"\n**The query x training-sample matrix sorted by (a + b) mod p** in the {cfg['every']}-update bin at each "
           "moment ("
           + ", ".join(f"{k}: update {v}" for k, v in w["moments"].items()) + "):\n",
           _img(d / "whole_moments.png", docs, "experiments_whole_moments.png") or "",
           f"""
**Time** (`explaind demo --paper` on this 2-core CPU shared with other jobs, one torch thread per engine process;
the stage times summed over the invocations that computed them, the last of which ran the engine on
{w.get('engine_on')}): record {rec:.0f} s, engine
pieces {comp_s:.0f} s (components) + {samp_s:.0f} s (per-sample), curves and pipeline
{sum(v for k, v in other.items() if k != 'record'):.0f} s; {total:.0f} s in all ({total / 60:.0f} min)""" + (f", with a 1-minute load average of {min(loads):.1f} to {max(loads):.1f} when the "
                                 "engine pieces ended" if loads else "") + ".\n"
           + "".join(f"{k}: {v}.\n" for k, v in w.get("notes", {}).items()),
           common.md_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in secs.items()])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    docs, res = Path(args.docs), Path(args.results)
    parts = [HEAD, pruning_section(res, docs), pruning_grokked_section(res, docs), lds_section(res, docs), grokking_section(res, docs), REPRO]
    (docs / "experiments.md").write_text("\n".join(p.rstrip() + "\n" for p in parts))
    common.log(f"wrote {docs / 'experiments.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
