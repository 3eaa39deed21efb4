"""``explaind demo lm`` at a tiny size: a GPT-2 trained by the stock Trainer with the callback, decomposed, reported;
a second call reuses every stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from explaind_app.cli import main  # noqa: E402
from explaind_app.demo_lm import LM_QUICK, lm_component_of  # noqa: E402


def test_demo_lm_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["demo", "lm", "--quick", "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    for heading in ("Training and validation loss", "Per-layer, per-component influence over training",
                    "current batch, weight decay, carried momentum", "Most helpful and most harmful training sequences",
                    "Residuals"):
        assert heading in html
    split = json.loads((out / "split.json").read_text())["rows"]
    assert [r["update"] for r in split] == list(range(LM_QUICK.steps - LM_QUICK.split_updates + 1, LM_QUICK.steps + 1))
    for r in split:  # the three parts and the residual add up to each update's change
        parts = r["current batch"] + r["weight decay"] + r["momentum"] + r["residual"]
        assert parts == pytest.approx(r["change"], rel=1e-9, abs=1e-12)
        assert r["max_ratio"] < 1e-4 and r["momentum"] != 0.0 and r["weight decay"] != 0.0
    for name in ("components", "samples"):
        info = json.loads((out / "stages" / f"{name}.json").read_text())["info"]
        assert info["max_ratio"] < 1e-4, (name, info)
    from explaind_store import open_run

    run = open_run(out / "run.zarr")
    splits = run.attrs["data"]["splits"]  # the callback recorded both splits by reference
    assert all(splits[k]["mode"] == "reference" for k in ("train", "val")) and not (out / "run.zarr" / "data").exists()
    # trained with GPT-2's dropout (eager attention): the callback recorded the generator states, and the decompositions
    # above stayed exact with the regenerated masks
    assert LM_QUICK.dropout > 0 and run.rng_info == {"device": "cpu", "dtype": "float32"}
    assert run.model(0).config.attn_pdrop == run.model(0).config.resid_pdrop == LM_QUICK.dropout
    curves = np.load(out / "curves.npz")
    assert curves["val_loss"][-1] < curves["val_loss"][0]
    capsys.readouterr()
    assert main(["demo", "lm", "--quick", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("reusing finished stage") == 6


def test_gpt2_components():
    assert lm_component_of("transformer.wte.weight") == "embeddings"
    assert lm_component_of("transformer.h.3.attn.c_attn.weight") == "layer 3 attention"
    assert lm_component_of("transformer.h.0.ln_2.bias") == "layer 0 MLP"
    assert lm_component_of("transformer.ln_f.weight") == "final LayerNorm"
