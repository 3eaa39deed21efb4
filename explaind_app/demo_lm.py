"""``explaind demo lm``: a GPT-2-architecture byte-level language model trained with the stock ``transformers.Trainer``
on the Python standard library's own source files, recorded by :class:`~explaind_store.integrations.hf.ExplaindCallback`
and decomposed exactly (issue 16).

Stages (each resumable like ``explaind demo``: a finished stage is reused when its parameters are unchanged):

1. ``record``      train with the Trainer (AdamW, weight decay, warm-up + cosine decay, ``max_grad_norm=1.0``) and
                   record every update (``run.zarr``); the training and validation splits are recorded by
                   reference (the built-in corpus factory and a fingerprint), not copied.
2. ``curves``      the training loss of every update (recorded) and the validation loss (mean over all validation
                   tokens) at evenly spaced steps, evaluated from the recorded parameters.
3. ``components``  ``engine.attribute`` of a few validation sequences' loss ``by=("step", "tensor")`` over the whole
                   run: the influence of every layer's attention and MLP and of the embeddings, update by update.
4. ``split``       the last ``split_updates`` updates one at a time (window ``(s-1, s]``): the change of the
                   validation loss at update ``s`` split exactly into the current batch, weight decay and the momentum
                   carried from earlier batches (the published method's LLM analysis).
5. ``samples``     ``engine.attribute`` ``by=("sample",)`` over the last ``sample_updates`` updates: the most helpful
                   and most harmful training sequences for a few validation sequences, shown as text.
6. ``report``      figures and ``report.html``.

The model trains with GPT-2's default dropout (0.1 on the embeddings, the residual branches and, with eager
attention, the attention weights): the callback records the generator state of every training forward and the engine
regenerates the masks (``explaind_store.dropout``); queries and the validation curve run without dropout (eval mode).
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explaind_app.stages import Stages, Timed, _digest, _table, _threads

LM_STAGES = ("record", "curves", "components", "split", "samples", "report")


@dataclass(frozen=True)
class LMDemoConfig:
    """Everything that determines the LM demo's results (changing a field reruns the stages that depend on it)."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    context: int = 64
    train_sequences: int = 4096
    val_sequences: int = 64
    batch_size: int = 32
    steps: int = 250
    lr: float = 5e-3
    weight_decay: float = 0.1
    warmup_steps: int = 25
    scheduler: str = "cosine_with_min_lr"
    min_lr_rate: float = 0.1  # the decay ends at 10% of lr, so the last updates (the split stage) still move
    max_grad_norm: float = 1.0
    dropout: float = 0.1  # GPT-2's default (embeddings, residual branches, attention weights), recorded
    seed: int = 0
    # engine
    component_queries: int = 2
    split_updates: int = 5
    sample_queries: int = 2
    sample_updates: int = 5
    rule: str | None = None  # None: the engine's default (kink rule, smooth rows refined)
    curve_points: int = 20

    def n_params(self) -> int:
        d, v, t = self.n_embd, 256, self.context
        return v * d + t * d + self.n_layer * (12 * d * d + 13 * d) + 2 * d

    def gpt2_kwargs(self) -> dict[str, Any]:
        return {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head, "n_positions": self.context,
                "vocab_size": 256, "resid_pdrop": self.dropout, "embd_pdrop": self.dropout,
                "attn_pdrop": self.dropout, "bos_token_id": 0, "eos_token_id": 0,
                # fused (sdpa) attention draws its dropout masks inside the kernel, which cannot be regenerated
                "attn_implementation": "eager"}


LM_DEMO = LMDemoConfig()
# seconds-long version for tests
LM_QUICK = LMDemoConfig(n_layer=1, n_embd=16, n_head=2, context=16, train_sequences=64, val_sequences=8, batch_size=8,
                        steps=12, lr=1e-2, warmup_steps=2, component_queries=2, split_updates=2, sample_queries=2,
                        sample_updates=3, curve_points=4)


# ==============================================================================================================
# Model components of GPT-2
# ==============================================================================================================
def lm_component_of(tensor: str) -> str:
    """``"embeddings"``, ``"layer i attention"`` (its LayerNorm included), ``"layer i MLP"`` (its LayerNorm
    included) or ``"final LayerNorm"`` for a GPT-2 tensor name (others: the name itself)."""
    if re.match(r"transformer\.(wte|wpe)\.", tensor):
        return "embeddings"
    m = re.match(r"transformer\.h\.(\d+)\.(attn|ln_1|mlp|ln_2)\.", tensor)
    if m:
        return f"layer {m.group(1)} " + ("attention" if m.group(2) in ("attn", "ln_1") else "MLP")
    if tensor.startswith("transformer.ln_f."):
        return "final LayerNorm"
    return tensor


def byte_text(ids: np.ndarray) -> str:
    """A byte sequence as readable text (padding dropped, undecodable bytes replaced)."""
    b = bytes(int(i) for i in ids if int(i) != 0)
    return b.decode("utf-8", errors="replace")


CORPUS = "explaind_store.examples.corpus:stdlib_bytes"


def _corpus_kwargs(cfg: LMDemoConfig, split: str) -> dict[str, Any]:
    n = cfg.train_sequences if split == "train" else cfg.val_sequences
    return {"split": split, "context": cfg.context, "max_sequences": n, "seed": cfg.seed}


def _load(cfg: LMDemoConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    from explaind_store.examples.corpus import stdlib_bytes

    return stdlib_bytes(**_corpus_kwargs(cfg, split))


def unigram_entropy(targets: np.ndarray) -> float:
    """Entropy (nats) of the byte frequencies of the labelled tokens: the loss of the best context-free model."""
    t = targets[targets >= 0]
    p = np.bincount(t, minlength=256) / max(len(t), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ==============================================================================================================
# Stages
# ==============================================================================================================
def _scheduler_kwargs(cfg: LMDemoConfig) -> dict[str, Any]:
    return {"min_lr_rate": cfg.min_lr_rate} if cfg.scheduler == "cosine_with_min_lr" else {}


def _record(cfg: LMDemoConfig, run_path: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from explaind_store.integrations.hf import ExplaindCallback
    from explaind_store.specs import data_spec

    x, y = _load(cfg, "train")
    xv, yv = _load(cfg, "val")
    rows = [{"input_ids": torch.from_numpy(x[i]), "labels": torch.from_numpy(y[i])} for i in range(len(x))]
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg.gpt2_kwargs()))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.scheduler, lr_scheduler_kwargs=_scheduler_kwargs(cfg), max_grad_norm=cfg.max_grad_norm, report_to=[], save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, seed=cfg.seed, use_cpu=True, dataloader_num_workers=0,
    )
    # both splits by reference (the built-in corpus factory + a fingerprint): the store does not copy the tokens
    specs = {k: data_spec(CORPUS, **_corpus_kwargs(cfg, k)) for k in ("train", "val")}
    cb = ExplaindCallback(run_path, overwrite=True, splits={"val": (xv, yv)}, data_specs=specs)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb])
    for c in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(c)  # the callback asks for a log line per update (the gradient norm)
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    return {"seconds": secs, "seconds_per_update": secs / cfg.steps, "train_tokens": int((y[:, 1:] >= 0).sum())}


def _val_loss(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Mean loss over all labelled next tokens of the split (the Trainer's token-level loss)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        total, count = 0.0, 0
        for i in range(0, len(x), 64):
            xb, yb = torch.from_numpy(x[i : i + 64]), torch.from_numpy(y[i : i + 64])
            logits = model(xb)
            lab = yb[:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((lab != -100).sum())
    return total / max(count, 1)


def _curves(cfg: LMDemoConfig, run: Any) -> dict[str, np.ndarray]:
    t = int(run.committed_updates)
    steps = sorted(set(np.linspace(0, t, cfg.curve_points + 1).round().astype(int).tolist()))
    xv, yv = (a.numpy() for a in run.split("val"))
    xt, yt = (a.numpy()[: cfg.val_sequences * 2] for a in run.split("train"))
    val, train = [], []
    for s in steps:
        model = run.model(s).eval()
        val.append(_val_loss(model, xv, yv))
        train.append(_val_loss(model, xt, yt))
    upd = np.asarray(run.updates["loss"].values, dtype=float)
    return {"step": np.asarray(steps), "val_loss": np.asarray(val), "train_subset_loss": np.asarray(train),
            "update_loss": upd[1:], "unigram_entropy": np.asarray(unigram_entropy(yv))}


def _attribute(run_path: Path, queries: list[int], by: tuple[str, ...], steps: tuple[int, int] | None,
               rule: str | None, out: Path | None) -> Any:
    import engine

    return engine.attribute(str(run_path), queries="val[[" + ",".join(map(str, queries)) + "]]", output="loss", by=by,
                            steps=None if steps is None else slice(*steps), quadrature=rule, client="sync",
                            out=None if out is None else str(out), progress=False)


def _residual_info(ds: Any) -> dict[str, float]:
    """Residuals against the changes they explain (max over queries): ``max_ratio``, the whole window's residual
    against ``F(theta_b) - F(theta_a)``; ``update_ratio``, each update's residual against that update's change, over
    the updates whose change is at least 1e-3 of the largest (smaller changes are float32 rounding of the training
    step: their absolute residual is ``max_update_residual``)."""
    res = np.abs(np.asarray(ds["residual"].values, dtype=float)).reshape(-1, ds.sizes["step"])
    delta = np.abs(np.asarray(ds["delta"].values, dtype=float)).reshape(-1, ds.sizes["step"])
    tot_res = np.abs(np.asarray(ds["residual"].values, dtype=float).reshape(-1, ds.sizes["step"]).sum(axis=1))
    change = np.abs(np.asarray((ds["final"] - ds["initial"]).values, dtype=float)).reshape(-1)
    big = delta >= 1e-3 * delta.max(axis=1, keepdims=True)
    return {"max_ratio": float((tot_res / np.maximum(change, 1e-300)).max()),
            "update_ratio": float((res[big] / delta[big]).max()) if big.any() else 0.0,
            "max_update_residual": float(res.max()), "max_update_change": float(delta.max()),
            "total_residual": float(tot_res.max()), "total_change": float(change.max())}


def _split(cfg: LMDemoConfig, run_path: Path, queries: list[int], t: int) -> dict[str, Any]:
    """Single-update windows at the end: what changed the mean validation loss at each of them."""
    rows = []
    for s in range(max(1, t - cfg.split_updates + 1), t + 1):
        ds = _attribute(run_path, queries, ("step",), (s - 1, s), cfg.rule, None)

        def mean(name: str) -> float:
            return float(np.asarray(ds[name].values, dtype=float).mean(axis=0).sum())

        rows.append({"update": s, "change": mean("delta"), "current batch": mean("data"),
                     "weight decay": mean("weight_decay"), "momentum": mean("momentum"),
                     "residual": mean("residual"), **_residual_info(ds)})
    return {"rows": rows}


# ==============================================================================================================
# Report
# ==============================================================================================================
def _fig_curves(curves: dict[str, np.ndarray]) -> Any:
    from explaind_app.report import _subplots

    fig, ax = _subplots(1, 1, figsize=(8, 4))
    upd = curves["update_loss"]
    ax.plot(np.arange(1, len(upd) + 1), upd, color="0.7", lw=0.8, label="training loss of each update's batch")
    ax.plot(curves["step"], curves["val_loss"], "o-", color="C3", label="validation loss (all tokens)")
    ax.axhline(float(curves["unigram_entropy"]), color="k", ls="--", lw=0.8, label="unigram entropy (validation)")
    ax.set(xlabel="update", ylabel="loss (nats per byte)", title="Training and validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def component_totals(ds: Any) -> dict[str, np.ndarray]:
    """Per GPT-2 component (:func:`lm_component_of`): the data + weight-decay movement per update, mean over
    queries, shape (steps,)."""
    mov = ds["movement"]
    if "part" in mov.dims:
        mov = mov.sum("part")
    mov = mov.mean([d for d in mov.dims if d not in ("step", "tensor")])
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(ds["tensor"].values):
        c = lm_component_of(str(t))
        v = np.asarray(mov.isel(tensor=i).values, dtype=float)
        out[c] = out.get(c, 0) + v
    return out


def _fig_components(ds: Any) -> Any:
    from explaind_app.report import _subplots

    tot = component_totals(ds)
    steps = np.asarray(ds["step"].values)
    fig, axes = _subplots(2, 1, figsize=(9, 7), sharex=True)
    for i, (c, v) in enumerate(sorted(tot.items())):
        w = max(1, len(v) // 40)
        sm = np.convolve(v, np.ones(w) / w, mode="same")
        axes[0].plot(steps, sm, lw=1, color=f"C{i}", label=c)
        axes[1].plot(steps, np.cumsum(v), lw=1.5, color=f"C{i}", label=c)
    axes[0].set(ylabel="change of validation loss per update", title="Influence per component (smoothed)")
    axes[1].set(xlabel="update", ylabel="cumulative", title="Cumulative influence per component")
    axes[1].legend(fontsize=7, ncol=2)
    for a in axes:
        a.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    return fig


def _top_rows(samples: Any, x_train: np.ndarray, x_query: np.ndarray, k: int = 3) -> list[tuple[str, str, str]]:
    from engine.topk import top_k

    tk = top_k(samples, k, along="sample")
    out = []
    for q in range(tk.sizes["query"]):
        out.append((f"validation sequence {q}", "", byte_text(x_query[q])))
        # the loss falls when a score is negative: the most helpful sequences have the lowest scores
        for kind, name in (("most helpful", "bottom"), ("most harmful", "top")):
            idx = np.asarray(tk[f"{name}_index"].isel(query=q)).reshape(-1)[:k]
            val = np.asarray(tk[f"{name}_value"].isel(query=q)).reshape(-1)[:k]
            for i, v in zip(idx, val):
                out.append((kind, f"{v:+.2e} (#{int(i)})", byte_text(x_train[int(i)])))
    return out


def _write_report(out: Path, summary: list[tuple[str, str]], curves: dict[str, np.ndarray], components: Any,
                  split: dict[str, Any], samples: Any, x_train: np.ndarray, x_query: np.ndarray,
                  residuals: list[tuple[str, str]]) -> Path:
    import base64

    from explaind_app.report import CSS, png_bytes
    from explaind_app.report import _table as html_table

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>ExPLAIND: a language model</title>"
             f"<style>{CSS} pre {{ white-space: pre-wrap; font-size: 0.8em; background: #f7f7f7; margin: 0; }}"
             "</style></head><body>",
             "<h1>ExPLAIND demo: a GPT-2 byte-level language model trained with the Hugging Face Trainer</h1>",
             html_table(summary)]

    def fig(name: str, f: Any, heading: str, caption: str) -> None:
        data = png_bytes(f)
        (fig_dir / f"{name}.png").write_bytes(data)
        parts.append(f"<h2>{html.escape(heading)}</h2><img alt='{html.escape(heading)}' "
                     f"src='data:image/png;base64,{base64.b64encode(data).decode()}'><p class='caption'>{caption}</p>")

    fig("curves", _fig_curves(curves), "Training and validation loss",
        "The validation split holds other standard-library files than training. The validation and "
        "training-subset losses are evaluated without dropout (eval mode); the per-update training loss is the "
        "Trainer's, with the recorded dropout of training.")
    fig("components", _fig_components(components), "Per-layer, per-component influence over training",
        "The change of the mean validation loss of a few validation sequences, split exactly over updates and "
        "tensors (data + weight decay of every update), summed per component: the token and position embeddings, "
        "each layer's attention (with its LayerNorm) and MLP (with its LayerNorm). Negative = lowered the loss.")
    rows = split["rows"]
    parts.append("<h2>The last updates: current batch, weight decay, carried momentum</h2>")
    parts.append(html_table([[r["update"], f"{r['change']:+.3e}", f"{r['current batch']:+.3e}",
                              f"{r['weight decay']:+.3e}", f"{r['momentum']:+.3e}", f"{r['residual']:+.1e}"]
                             for r in rows],
                            ["update", "change of validation loss", "current batch", "weight decay",
                             "momentum from earlier batches", "residual"]))
    parts.append("<p class='caption'>Each update s decomposed on its own (window (s-1, s]): the AdamW step moves the "
                 "parameters by the current batch's gradient (through the first moment), the decoupled weight decay "
                 "and the momentum carried from all earlier batches; the mean over the validation sequences.</p>")
    parts.append("<h2>Most helpful and most harmful training sequences</h2>")
    parts.append(f"<p class='caption'>Per training sequence, its contribution to the change of each validation "
                 f"sequence's loss over updates {samples.attrs.get('window')}. Negative = lowered the loss "
                 "(helpful).</p><table><tr><th>what</th><th>score</th><th>text</th></tr>")
    for a, b, c in _top_rows(samples, x_train, x_query):
        parts.append(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td><pre>{html.escape(c)}</pre></td>"
                     "</tr>")
    parts.append("</table><h2>Residuals</h2>")
    parts.append(html_table(residuals, ["decomposition", "largest residual against the change it explains"]))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ==============================================================================================================
# The pipeline
# ==============================================================================================================
class _CpuStages(Stages):
    """Stages that also note each stage's CPU seconds (this process; the demo runs one torch thread, so on an idle
    machine wall time is close to CPU time, while on a shared one it shows what the work itself cost)."""

    def start(self, name: str) -> None:
        self._cpu0 = time.process_time()
        super().start(name)

    def done(self, name: str, params: Any, seconds: float, info: dict[str, Any] | None = None) -> None:
        super().done(name, params, seconds, {**(info or {}), "cpu_seconds": time.process_time() - self._cpu0})


def run_lm_demo(out_dir: str | Path = "demo-lm-out", *, quick: bool = False, config: LMDemoConfig | None = None,
                steps: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, record, decompose and report (see the module docstring); returns a summary dict with ``report``,
    ``seconds`` per stage, ``ran`` / ``reused`` stages, ``residuals`` and the final losses."""
    import torch

    with _threads(torch, 1):
        return _run(out_dir, quick=quick, config=config, steps=steps, log=log)


def _run(out_dir: str | Path, *, quick: bool, config: LMDemoConfig | None, steps: int | None,
         log: Callable[[str], None] | None) -> dict[str, Any]:
    import xarray as xr

    from explaind_store import open_run

    log = log or (lambda s: print(s, flush=True))
    cfg = config or (LM_QUICK if quick else LM_DEMO)
    if steps is not None:
        if int(steps) < cfg.split_updates + 1:
            raise ValueError(f"steps must be at least {cfg.split_updates + 1}, got {steps}")
        cfg = dataclasses.replace(cfg, steps=int(steps))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = _CpuStages(out, log)
    t_start = time.perf_counter()
    run_path = out / "run.zarr"

    rec_params = dataclasses.asdict(cfg) | {"what": "record"}
    for k in ("component_queries", "split_updates", "sample_queries", "sample_updates", "rule", "curve_points"):
        rec_params.pop(k)

    def record() -> Timed:
        log(f"training a GPT-2 of {cfg.n_params():,} parameters for {cfg.steps} updates with the Trainer, recorded")
        info = _record(cfg, run_path, out)
        return Timed(info["seconds"], info)

    st.run("record", rec_params, [run_path], record)
    rec = _digest(rec_params)
    run = open_run(run_path)
    t = int(run.committed_updates)

    curves_path = out / "curves.npz"
    cur_params = {"run": rec, "points": cfg.curve_points}
    def compute_curves() -> dict[str, float]:
        c = _curves(cfg, run)
        np.savez(curves_path, **c)
        return {"final_val_loss": float(c["val_loss"][-1]), "unigram_entropy": float(c["unigram_entropy"])}

    st.run("curves", cur_params, [curves_path], compute_curves)
    curves = dict(np.load(curves_path))

    n_val = len(run.split("val")[0])
    rng = np.random.default_rng(cfg.seed + 1)
    comp_q = sorted(rng.choice(n_val, size=min(cfg.component_queries, n_val), replace=False).tolist())
    samp_q = comp_q[: cfg.sample_queries]
    comp_path, samp_path, split_path = out / "components.zarr", out / "samples.zarr", out / "split.json"
    comp_params = {"run": rec, "queries": comp_q, "rule": cfg.rule}
    split_params = {"run": rec, "queries": comp_q, "rule": cfg.rule, "updates": cfg.split_updates}
    window = (max(0, t - cfg.sample_updates), t)
    samp_params = {"run": rec, "queries": samp_q, "rule": cfg.rule, "window": list(window)}

    st.run("components", comp_params, [comp_path], lambda: _residual_info(
        _attribute(run_path, comp_q, ("step", "tensor"), None, cfg.rule, comp_path)))
    def compute_split() -> None:
        split_path.write_text(json.dumps(_split(cfg, run_path, comp_q, t), indent=1))

    st.run("split", split_params, [split_path], compute_split)
    split = json.loads(split_path.read_text())
    st.run("samples", samp_params, [samp_path], lambda: _residual_info(
        _attribute(run_path, samp_q, ("sample",), window, cfg.rule, samp_path)))

    components, samples = xr.open_zarr(comp_path), xr.open_zarr(samp_path)
    res_c, res_s = _residual_info(components), _residual_info(samples)
    res_split = max(r["max_ratio"] for r in split["rows"])

    def describe(r: dict[str, float]) -> str:
        return (f"{r['max_ratio']:.1e} (total residual {r['total_residual']:.1e} against a change of "
                f"{r['total_change']:.3g}); per update {r['update_ratio']:.1e} of its change (largest absolute "
                f"{r['max_update_residual']:.1e})")

    residuals = [
        (f"components: every update, {len(comp_q)} validation sequences' loss", describe(res_c)),
        ("per-update split: each of the last updates on its own", f"{res_split:.1e} of that update's change"),
        ("training sequences: the last updates", describe(res_s)),
    ]
    worst = max(res_c["max_ratio"], res_split, res_s["max_ratio"])  # each decomposition against its change
    x_train = run.split("train")[0].numpy()
    x_val = run.split("val")[0].numpy()
    rec_info = st.info.get("record", {})
    summary = [
        ("model", f"GPT-2 ({cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, context {cfg.context}, "
                  f"byte vocabulary 256, tied embeddings, dropout {cfg.dropout:g}"
                  f"{' with eager attention, recorded' if cfg.dropout else ''}): "
                  f"{cfg.n_params():,} parameters"),
        ("data", f"Python standard library .py files, split by file: {cfg.train_sequences} training / "
                 f"{n_val} validation sequences of {cfg.context} bytes"),
        ("training", f"transformers.Trainer, {t} updates of {cfg.batch_size} sequences, AdamW lr {cfg.lr:g}, "
                     f"weight decay {cfg.weight_decay:g}, {cfg.warmup_steps} warm-up updates then {cfg.scheduler} "
                     f"decay (to {cfg.min_lr_rate:g} lr), max_grad_norm {cfg.max_grad_norm:g}; recorded by ExplaindCallback"),
        ("validation loss", f"{curves['val_loss'][0]:.3f} -> {curves['val_loss'][-1]:.3f} nats per byte (unigram "
                            f"entropy {float(curves['unigram_entropy']):.3f})"),
        ("time (wall / CPU)", "; ".join(f"{k} {v:.0f} / {st.info.get(k, {}).get('cpu_seconds', float('nan')):.0f} s"
                                        for k, v in st.seconds.items())),
        ("largest residual / change", f"{worst:.1e}"),
    ]
    rep_params = {"c": _digest(comp_params), "s": _digest(samp_params), "sp": _digest(split_params),
                  "cur": _digest(cur_params), "version": 1}
    report = out / "report.html"
    def compute_report() -> None:
        _write_report(out, summary, curves, components, split, samples, x_train, x_val[samp_q], residuals)

    st.run("report", rep_params, [report], compute_report)
    total = time.perf_counter() - t_start
    log("\n" + _table([*summary, ("this call", f"{total:.1f} s"), ("report", str(report.resolve()))]))
    return {"report": str(report), "run": str(run_path), "seconds": dict(st.seconds),
            "cpu_seconds": {k: st.info.get(k, {}).get("cpu_seconds") for k in st.seconds}, "ran": list(st.ran),
            "reused": list(st.reused), "total_seconds": total, "max_residual_ratio": worst,
            "val_loss": curves["val_loss"].tolist(), "unigram_entropy": float(curves["unigram_entropy"]),
            "split": split["rows"], "config": dataclasses.asdict(cfg), "record": rec_info}


__all__ = ["LM_DEMO", "LM_QUICK", "LM_STAGES", "LMDemoConfig", "byte_text", "component_totals", "lm_component_of", "run_lm_demo",
           "unigram_entropy"]
