"""The demo pipeline (``explaind_app.demo``) and its report (``explaind_app.report``), in the tiny ``quick``
configuration."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from explaind_app import report as rep
from explaind_app.demo import QUICK, check_disk, disk_needed, novel_mask, run_demo

FIGURE_TITLES = (
    rep.TITLE_TRAINING,
    rep.TITLE_COMPONENTS,
    rep.TITLE_TOP,
    rep.TITLE_MATRIX,
    rep.TITLE_PARAM,
    rep.TITLE_RESIDUAL,
)
FIGURES = ("training", "components", "param_scores", "top_samples", "contribution_matrix", "residuals")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo (in-process engine: no cluster start-up), then a second call on the same directory."""
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    first = run_demo(out, quick=True, client="sync", progress=False, log=lines.append)
    first_lines = list(lines)
    lines.clear()
    second = run_demo(out, quick=True, client="sync", progress=False, log=lines.append)
    return out, first, second, first_lines, list(lines)


def test_quick_demo_writes_a_self_contained_report(quick_demo):
    out, first, _, lines, _ = quick_demo
    assert first["ran"] == ["record", "curves", "components", "samples", "report"] and not first["reused"]
    html = (out / "report.html").read_text()
    assert Path(first["report"]) == out / "report.html"
    for title in FIGURE_TITLES:
        assert title in html, title
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == len(FIGURES)
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src=\"http" not in html and "<script" not in html  # nothing external
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 1000, name
    # the summary table was printed at the end
    table = lines[-1]
    for label in ("updates", "store size", "engine time", "max residual", "report"):
        assert re.search(rf"^{label}\s", table, re.MULTILINE), label
    assert "needs about" in "\n".join(lines)  # disk need announced before training


def test_quick_demo_result_stores_open_with_xarray_and_are_exact(quick_demo):
    out, first, _, _, _ = quick_demo
    comp = xr.open_zarr(out / "components.zarr")
    samp = xr.open_zarr(out / "samples.zarr")
    assert {"step", "tensor"} <= set(comp["data"].dims) and "param_embed" in comp
    assert "sample" in samp["data"].dims and samp.sizes["sample"] == QUICK.n_train
    assert samp.sizes["query"] == QUICK.sample_queries
    for ds in (comp, samp):
        for row in rep.identity_rows(ds):
            assert abs(row["identity_error"]) < 1e-9
    assert first["updates"] == QUICK.steps
    assert np.isfinite(first["max_residual"]) and first["max_residual"] < 1e-2
    curves = np.load(out / "curves.npz")
    assert curves["step"][0] == 0 and curves["step"][-1] == QUICK.steps
    assert {"train_acc", "val_acc", "val_novel_acc", "weight_norm"} <= set(curves.files)


def test_second_call_reuses_every_stage(quick_demo):
    _, first, second, _, lines = quick_demo
    assert second["reused"] == ["record", "curves", "components", "samples", "report"] and not second["ran"]
    for stage in second["reused"]:
        assert any(line.startswith(f"reusing finished stage {stage}") for line in lines), stage
    assert second["summary"]["updates"] == first["summary"]["updates"]
    assert second["total_seconds"] < first["total_seconds"]


def test_changed_parameter_reruns_only_what_depends_on_it(tmp_path):
    lines: list[str] = []
    run_demo(tmp_path, quick=True, client="sync", progress=False, steps=24, log=lines.append)
    lines.clear()
    # more updates: the recording resumes (no retraining from scratch) and everything after it is recomputed
    res = run_demo(tmp_path, quick=True, client="sync", progress=False, steps=32, log=lines.append)
    assert res["ran"] == ["record", "curves", "components", "samples", "report"]
    assert any("resuming the recording at update 25" in line for line in lines)
    assert res["updates"] == 32
    marker = json.loads((tmp_path / "stages" / "record.json").read_text())
    assert marker["info"]["resumed_from"] == 24


def test_interrupted_recording_resumes(tmp_path):
    from explaind_store import open_run
    from explaind_store.examples import modadd

    cfg = QUICK
    # a recording killed after 20 of 48 updates (the demo writes record.started.json before training)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "record.started.json").write_text(json.dumps(
        {"train": {**cfg.train_kwargs(), "betas": list(cfg.betas)}, "steps": cfg.steps}))
    modadd.train(str(tmp_path / "run.zarr"), steps=20, **cfg.train_kwargs(), progress=False, eval_every=0)
    lines: list[str] = []
    res = run_demo(tmp_path, quick=True, client="sync", progress=False, log=lines.append)
    assert any("resuming the recording at update 21" in line for line in lines)
    assert open_run(tmp_path / "run.zarr").committed_updates == cfg.steps == res["updates"]


def test_disk_check_refuses_when_short(tmp_path, monkeypatch):
    import shutil

    need = disk_needed(QUICK)
    assert need > (QUICK.steps + 1) * QUICK.n_params() * 4 * 3
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need // 2))
    with pytest.raises(RuntimeError, match="needs about .* only .* free"):
        check_disk(tmp_path, QUICK)


def test_novel_mask_marks_pairs_whose_mirror_was_not_trained():
    x_train = np.array([[1, 2, 5], [3, 3, 5]])
    x_val = np.array([[2, 1, 5], [1, 3, 5], [3, 3, 5], [4, 0, 5]])
    assert novel_mask(x_train, x_val, 5).tolist() == [False, True, False, True]


def test_components_map_every_modadd_tensor():
    from explaind_store.examples import modadd

    names = [n for n, _ in modadd.make_model(p=7, d_model=8, n_heads=2, d_mlp=16).named_parameters()]
    groups = rep.component_groups(names)
    assert list(groups) == list(rep.COMPONENTS)
    assert groups["attention"] == ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_o.weight"]
    assert groups["MLP in"] == ["mlp_in.weight", "mlp_in.bias"] and groups["unembedding"] == ["unembed.weight"]


def test_find_phases_on_a_grokking_curve():
    steps = np.arange(0, 1001, 50)
    train = np.clip(steps / 300, 0, 1)
    val = np.where(steps < 700, 0.2, np.clip(0.2 + (steps - 700) / 200, 0, 1))
    ph = rep.find_phases({"step": steps, "train_acc": train, "val_acc": val})
    assert ph["memorised"] == 300 and ph["rise"] == 800 and ph["grokked"] == 850 and ph["grokking"]
    assert [p[0] for p in ph["phases"]] == ["memorisation", "circuit formation", "cleanup"]


@pytest.mark.slow
def test_cli_demo_quick_on_a_process_cluster(tmp_path):
    """``explaind demo --quick --out DIR`` end to end, engine on a local Dask process cluster (~30-40 s)."""
    cmd = [sys.executable, "-m", "explaind_app.cli"]  # what the `explaind` script runs (explaind_app.cli:main)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "demo"
    proc = subprocess.run([*cmd, "demo", "--quick", "--quiet", "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "report.html").exists()
    assert "engine time" in proc.stdout and "workers" in proc.stdout
    again = subprocess.run([*cmd, "demo", "--quick", "--quiet", "--out", str(out)], capture_output=True, text=True,
                           env=env, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("reusing finished stage") == 5
