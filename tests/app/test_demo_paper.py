"""``explaind demo --paper`` (``explaind_app.demo_paper``) at its tiny ``--quick`` size, and the pure helpers of
``explaind_app.grokking`` it uses (pieces, circuit window, moments)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from explaind_app import grokking as gk
from explaind_app.cli import main
from explaind_app.demo_paper import PAPER, PAPER_QUICK

FIGURES = ("training", "pipeline", "components", "residuals", "samples", "moments")
TABLES = ("components.md", "residuals.md", "top_samples.md", "pipeline.md")


@pytest.fixture(scope="module")
def paper_quick(tmp_path_factory):
    """The tiny paper demo through the Python API, then one piece's marker deleted (as if the first call had been
    interrupted there) and ``explaind demo --paper --quick`` run on the same directory."""
    from explaind_app.demo_paper import run_paper_demo

    out = tmp_path_factory.mktemp("paper")
    first = run_paper_demo(out, quick=True, client="sync", progress=False, log=lambda s: None)
    (out / "stages" / "samples_20_24.json").unlink()
    before = {p.stem: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert main(["demo", "--paper", "--quick", "--sync", "--quiet", "--out", str(out)]) == 0
    after = {p.stem: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    rewritten = sorted(k for k, t in after.items() if before.get(k) != t)
    return out, json.loads((out / "results.json").read_text()), first, rewritten


def test_paper_demo_writes_every_output(paper_quick):
    out, res, _, _ = paper_quick
    assert (out / "run.zarr").is_dir() and (out / "report.md").exists()
    for f in FIGURES:
        assert (out / "figures" / f"{f}.png").stat().st_size > 1000, f
    for t in TABLES:
        assert (out / t).read_text().startswith("|") or "|" in (out / t).read_text(), t
    text = (out / "report.md").read_text()
    for f in FIGURES:
        assert f"figures/{f}.png" in text
    assert res["updates"] == PAPER_QUICK.steps
    assert res["pieces"] == [[0, 12], [12, 24]]  # two resumable pieces of whole store chunks
    # the per-update series covers the whole run once, in order
    assert res["series"]["step"] == list(range(1, PAPER_QUICK.steps + 1))
    assert set(res["series"]["movement"]) == {"data", "weight_decay", "momentum"}
    assert set(res["series"]["movement"]["data"]) == {"embedding", "attention", "MLP in", "MLP out", "unembedding"}


def test_whole_run_closes_across_pieces(paper_quick):
    """initial (first piece) + every piece's data, weight decay, momentum and residual == final (last piece), per
    query; each piece starts where the previous one ended."""
    out, res, _, _ = paper_quick
    assert len(res["identity_error"]) == PAPER_QUICK.component_queries
    assert max(abs(v) for v in res["identity_error"]) < 1e-10
    # the per-update parts (mean over queries) add up to the measured change per update
    parts = sum(np.asarray(y) for p in res["series"]["movement"].values() for y in p.values())
    np.testing.assert_allclose(parts + np.asarray(res["series"]["residual"]), res["series"]["delta"], atol=1e-12)
    a = xr.open_zarr(out / "pieces" / "components_0_12.zarr")
    b = xr.open_zarr(out / "pieces" / "components_12_24.zarr")
    np.testing.assert_allclose(a["final"].values, b["initial"].values, rtol=0, atol=1e-12)
    # the residual is small against the change (float32 training, float64 rebuild)
    assert res["max_abs_residual"] < 1e-3 * res["max_abs_change"]


def test_per_sample_bins_cover_the_circuit_window_and_the_moments(paper_quick):
    out, res, _, _ = paper_quick
    every = PAPER_QUICK.every
    a, b = res["window"]
    wins = [tuple(w) for w in res["sample_pieces"]]
    assert all(hi - lo == every for lo, hi in wins)
    assert {(lo, lo + every) for lo in range(a, b, every)} <= set(wins)
    parts = [xr.open_zarr(out / "pieces" / f"samples_{lo}_{hi}.zarr") for lo, hi in wins]
    bins = gk.sample_bins(parts)
    for m in res["moments"].values():
        i = gk.bin_at(bins, m)
        assert bins["start"][i] < m <= bins["end"][i]
    assert bins["scores"].shape == (PAPER_QUICK.sample_queries, len(wins), PAPER_QUICK.n_train)
    # each bin is one engine result's per-sample data part
    np.testing.assert_allclose(bins["scores"].sum(axis=(0, 2)), [float(d["data"].sum()) for d in parts], atol=1e-9)


def test_second_call_recomputes_only_the_missing_piece(paper_quick):
    """The CLI call after an interrupted first call: only the missing piece and the report are recomputed (their
    markers rewritten), the record and the other pieces reused; the results are the same."""
    _, res, first, rewritten = paper_quick
    assert "record" in first["ran"] and not first["reused"]
    assert {"components_0_12", "components_12_24", "samples_0_4", "samples_20_24"} <= set(first["ran"])
    assert rewritten == ["report", "samples_20_24"]
    assert res["identity_error"] == pytest.approx(first["identity_error"], abs=1e-12)


def test_pieces_are_whole_store_chunks():
    assert gk.pieces(0, 470, 160, 32) == [(0, 160), (160, 320), (320, 470)]
    assert gk.pieces(0, 24, 12, 4) == [(0, 12), (12, 24)]
    assert gk.pieces(0, 24, 10, 8) == [(0, 16), (16, 24)]  # 10 rounded up to two chunks of 8
    assert gk.pieces(0, 5, 160, 32) == [(0, 5)]


def test_circuit_window_and_moments_on_a_grokking_curve():
    steps = np.arange(0, 110, 10)
    novel = np.array([0.0, 0.01, 0.02, 0.05, 0.08, 0.2, 0.5, 0.8, 0.95, 1.0, 1.0])
    val = np.array([0.1, 0.1, 0.1, 0.15, 0.2, 0.4, 0.7, 0.9, 0.98, 0.995, 1.0])
    curves = {"step": steps, "val_novel_acc": novel, "val_acc": val}
    assert gk.circuit_window(curves) == (40, 90)  # last step below 10% novel accuracy; val 99% first reached
    at = gk.moments({"memorised": 60}, (40, 90), 100)
    assert list(at.values()) == sorted(at.values())
    assert at == {"before memorisation": 30, "memorised": 60, "rise (middle of the circuit window)": 65, "end": 100}


def test_paper_config_is_the_papers():
    assert (PAPER.p, PAPER.n_train, PAPER.n_val, PAPER.d_model, PAPER.n_heads, PAPER.d_mlp) == (
        113, 4000, 2000, 64, 4, 512)
    assert (PAPER.lr, PAPER.betas, PAPER.weight_decay, PAPER.dtype) == (1e-3, (0.9, 0.98), 4.0, "float32")
    assert PAPER.component_queries >= 64


def test_paper_flag_refuses_the_lm_demo(tmp_path, capsys):
    assert main(["demo", "lm", "--paper", "--out", str(tmp_path)]) != 0
    assert "drop 'lm' or --paper" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started
