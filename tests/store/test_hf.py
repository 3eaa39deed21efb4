"""The Hugging Face integration: a stock ``transformers.Trainer`` run of a tiny GPT-2, recorded by the callback
(clipping, gradient accumulation 2, linear warm-up, padded sequences), verifies, with and without dropout (attention
dropout inside a fused kernel is refused with the settings to change); the plain-loop recorder API for micro-batches
and clipping norms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from explaind_store import RecorderError, open_run  # noqa: E402
from explaind_store.integrations.hf import ExplaindCallback  # noqa: E402
from explaind_store.recorder import clip_scale  # noqa: E402
from explaind_store.specs import batch_loss, loss_weights, per_sample_loss  # noqa: E402

N, T, V = 20, 16, 64


def _config(dropout: float = 0.0, attn: str | None = None) -> GPT2Config:
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    if attn is not None:
        cfg._attn_implementation = attn
    return cfg


def _dataset(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences of different lengths, labels -100 under the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (N, T), generator=g)
    lens = torch.randint(6, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i], "labels": labels[i], "attention_mask": mask[i]} for i in range(N)]


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=7,
        max_grad_norm=0.1, warmup_steps=2, lr_scheduler_type="linear", learning_rate=1e-2, weight_decay=0.01,
        report_to=[], save_strategy="no", logging_steps=100, disable_tqdm=True, seed=3,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_run_recorded_by_the_callback_verifies(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config())
    ds = _dataset()
    cb = ExplaindCallback(tmp_path / "run.zarr")
    norms: list[float] = []
    losses: list[float] = []

    class Norms(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "grad_norm" in logs:
                norms.append(logs["grad_norm"])
                losses.append(logs["loss"])

    Trainer(model=model, args=_args(tmp_path), train_dataset=ds, callbacks=[cb, Norms()]).train()
    run = open_run(tmp_path / "run.zarr")
    assert run.committed_updates == 7
    # 20 rows in micro-batches of 4 with accumulation 2: updates of 8, 8, 4 rows per epoch, each epoch a permutation
    blk = run.block(0, 7)
    assert [len(b) for b in blk.batches] == [8, 8, 4, 8, 8, 4, 8]
    for epoch in (blk.batches[:3], blk.batches[3:6]):
        assert sorted(np.concatenate([np.asarray(b) for b in epoch]).tolist()) == list(range(N))
    assert np.allclose(run.updates["loss"].values[1:8], losses[:7], rtol=1e-6)  # the update loss, summed over micro-batches
    lr = np.asarray(blk.lr)[:, 0]
    assert lr[0] == 0.0 and lr[1] == pytest.approx(5e-3) and lr[2] == pytest.approx(1e-2)  # linear warm-up
    scales = np.asarray(blk.grad_scale)
    assert np.all(scales < 1) and np.allclose(scales, [clip_scale(n, 0.1) for n in norms[:7]], rtol=0, atol=0)
    names = run.tensor_names
    assert names.count("transformer.wte.weight") == 1 and not any("lm_head" in n for n in names)  # tied: once
    rep = run.verify()
    assert rep.ok, rep.table()
    assert rep.gradient_checked and rep.gradient_max_rel_error < 1e-3
    assert rep.replay_excess <= 1


def test_callback_refuses_attention_dropout_in_a_fused_kernel_naming_the_settings(tmp_path):
    model = GPT2LMHeadModel(_config(dropout=0.1, attn="sdpa"))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(),
                      callbacks=[ExplaindCallback(tmp_path / "run.zarr")])
    with pytest.raises(RecorderError, match=r"attn_pdrop=0\.0") as err:
        trainer.train()
    assert "attn_implementation='eager'" in str(err.value) and "resid_pdrop" not in str(err.value)
    assert not (tmp_path / "run.zarr").exists()


def test_trainer_run_with_dropout_verifies_and_decomposes(tmp_path):
    """GPT-2's default dropout (0.1: embeddings, residuals and, with eager attention, the attention weights) with
    clipping, accumulation 2 and warm-up, stored every 3 updates: the replay between checkpoints sets the generator
    to each micro-batch's recorded state, and the decomposition regenerates the masks."""
    import engine
    from tests.support.compare import identity_error

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config(dropout=0.1, attn="eager"))
    cb = ExplaindCallback(tmp_path / "run.zarr", checkpoint_every=3)
    Trainer(model=model, args=_args(tmp_path, max_steps=5), train_dataset=_dataset(), callbacks=[cb]).train()
    run = open_run(tmp_path / "run.zarr")
    assert run.rng_info == {"device": "cpu", "dtype": "float32"} and run.checkpoint_steps.tolist() == [0, 3, 5]
    micro = run.updates["micro_size"].values
    assert micro[1:].tolist() == [[4, 4], [4, 4], [4, 0], [4, 4], [4, 4]]  # one state per micro-batch
    assert np.all(np.asarray(run.block(0, 5).grad_scale) < 1)  # clipping active
    rep = run.verify()
    assert rep.ok, rep.table()
    assert rep.gradient_checked and rep.gradient_max_rel_error < 1e-3
    # replayed between checkpoints: float32 rounding (micro-batch sums in another order), not a different run
    assert rep.checkpoint_replay and max(c["relative"] for c in rep.checkpoint_replay) < 1e-4
    ds = engine.attribute(run, queries="train[:1]", output="loss", by=("sample",), client="sync", progress=False)
    change = float(np.abs(np.asarray(ds["final"] - ds["initial"])).max())
    assert identity_error(ds) <= 1e-10 * change
    assert ds.attrs["max_rounding_residual"] < 1e-5 * change  # the masks regenerated: float32 rounding only


def test_callback_refuses_left_padding(tmp_path):
    ds = _dataset()
    for row in ds:  # move the padding to the left
        row["input_ids"], row["labels"], row["attention_mask"] = (
            row["input_ids"].flip(0), row["labels"].flip(0), row["attention_mask"].flip(0))
    trainer = Trainer(model=GPT2LMHeadModel(_config()), args=_args(tmp_path, max_steps=1), train_dataset=ds,
                      callbacks=[ExplaindCallback(tmp_path / "run.zarr")])
    with pytest.raises(RecorderError, match="padding_side = 'right'"):
        trainer.train()


def test_clip_scale_reproduces_torch_clipping_bit_for_bit():
    torch.manual_seed(1)
    for max_norm in (0.05, 0.3, 1.0, 100.0):
        grads = [torch.randn(7, 5), torch.randn(3) * 0.1, torch.randn(2, 2, 2)]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        s = clip_scale(norm, max_norm)
        assert (s == 1.0) == (max_norm == 100.0)
        for p, g in zip(params, grads):
            assert torch.equal(g * torch.tensor(s, dtype=torch.float32), p.grad)


def test_causal_lm_loss_is_the_token_mean_of_the_whole_batch():
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 2:] = -100
    labels[2, :] = -100  # a row with no predicted token
    spec = {"kind": "causal_lm", "reduction": "mean"}
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                            ignore_index=-100)
    assert torch.allclose(batch_loss(spec, logits, labels), ref)
    per = per_sample_loss(spec, logits, labels)
    w = loss_weights(spec, labels)
    assert w.tolist() == [1 * 3 / 5, 4 * 3 / 5, 0.0]
    assert torch.allclose((w * per).mean(), ref) and per[2] == 0


def test_plain_loop_records_micro_batches_and_clipping_norms(tmp_path):
    from explaind_store import Recorder
    from tests.support.compare import MLP_SPEC
    from tests.support.store_helpers import digits, make_mlp

    torch.manual_seed(0)
    x, y = digits(64)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def accumulate(micro: list[torch.Tensor]) -> torch.Tensor:
        for idx in micro:  # equal micro-batches, each loss / 2: the gradient of the mean over all 16
            (torch.nn.functional.cross_entropy(model(x[idx]), y[idx]) / 2).backward()
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)

    with Recorder(tmp_path / "r.zarr", model, opt, data=(x, y), max_grad_norm=0.2, model_spec=MLP_SPEC) as rec:
        for step in range(4):
            micro = [torch.arange(8 * step, 8 * step + 8), torch.arange(40, 48)]
            norm = accumulate(micro)
            opt.step()
            opt.zero_grad()
            with pytest.raises(RecorderError, match="grad_norm"):
                rec.record(micro)  # clipping was announced: the norm is required (and nothing is lost)
            rec.record(micro, grad_norm=norm)
    run = open_run(tmp_path / "r.zarr")
    blk = run.block(0, run.committed_updates)
    assert [len(b) for b in blk.batches] == [16] * 4
    assert np.all(np.asarray(blk.grad_scale) < 1)
    rep = run.verify()
    assert rep.ok and rep.gradient_checked, rep.table()


class _WithUnused(torch.nn.Module):
    """An MLP with a pooler the forward never uses (as Hugging Face models often carry)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10))
        self.pooler = torch.nn.Linear(10, 10)

    def forward(self, x: torch.Tensor, use_pooler: bool = False) -> torch.Tensor:
        out = self.body(x)
        return self.pooler(out) if use_pooler else out


def _loop(rec, model, opt, x, y, steps: range, pooler_at: int | None = None) -> None:
    for step in steps:
        idx = torch.arange(8 * (step % 8), 8 * (step % 8) + 8)
        out = model(x[idx], use_pooler=step == pooler_at)
        torch.nn.functional.cross_entropy(out, y[idx]).backward()
        opt.step()
        opt.zero_grad()
        rec.record(idx)


def test_parameters_without_gradient_are_recorded_as_constants(tmp_path):
    from explaind_store import Recorder
    from explaind_store import schema
    from tests.support.store_helpers import digits

    torch.manual_seed(0)
    x, y = digits(64)
    model = _WithUnused()
    pooler0 = model.pooler.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with Recorder(tmp_path / "c.zarr", model, opt, data=(x, y)) as rec:
        _loop(rec, model, opt, x, y, range(3))
    run = open_run(tmp_path / "c.zarr", model_factory=_WithUnused)
    assert run.tensor_names == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]
    assert run.attrs[schema.ATTR_CONSTANTS] == ["pooler.bias", "pooler.weight"]
    assert all("pooler" not in n for g in run.attrs[schema.ATTR_OPTIMIZER]["groups"] for n in g["tensors"])
    assert torch.equal(dict(run.model().named_parameters())["pooler.weight"], pooler0)
    rep = run.verify()
    assert rep.ok and rep.gradient_checked, rep.table()

    # resume keeps them constant; a constant that starts receiving gradients is refused, the record kept
    model2 = _WithUnused()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
    with Recorder(tmp_path / "c.zarr", model2, opt2, resume=True) as rec:
        assert torch.equal(model2.pooler.weight.detach(), pooler0)
        _loop(rec, model2, opt2, x, y, range(3, 5))
        with pytest.raises(RecorderError, match="got a gradient, though they had none at the first update"):
            _loop(rec, model2, opt2, x, y, range(5, 6), pooler_at=5)
    run = open_run(tmp_path / "c.zarr", model_factory=_WithUnused)
    assert run.committed_updates == 5
    assert run.verify().ok


def test_a_parameter_that_loses_its_gradient_later_is_refused(tmp_path):
    from explaind_store import Recorder
    from tests.support.store_helpers import digits

    torch.manual_seed(0)
    x, y = digits(64)
    model = _WithUnused()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Recorder(tmp_path / "d.zarr", model, opt, data=(x, y)) as rec:
        _loop(rec, model, opt, x, y, range(1), pooler_at=0)
        with pytest.raises(RecorderError, match="got no gradient, though they had one"):
            _loop(rec, model, opt, x, y, range(1, 2))


def test_callback_refuses_a_collator_that_changes_the_rows_and_keeps_what_was_recorded(tmp_path):
    from transformers import default_data_collator

    calls = []

    def masking_collator(rows):  # changes the labels after the first update's micro-batches
        batch = default_data_collator(rows)
        calls.append(1)
        if len(calls) > 3:
            batch["labels"] = batch["labels"].masked_fill(batch["labels"] % 2 == 0, -100)
        return batch

    torch.manual_seed(0)
    cb = ExplaindCallback(tmp_path / "run.zarr")
    trainer = Trainer(model=GPT2LMHeadModel(_config()), args=_args(tmp_path, max_steps=3), train_dataset=_dataset(),
                      data_collator=masking_collator, callbacks=[cb])
    with pytest.raises(RecorderError, match="data collator that changes input_ids or labels"):
        trainer.train()
    run = open_run(tmp_path / "run.zarr")
    assert run.committed_updates == 1 and run.verify().ok


# --- resuming a killed Trainer run (train(resume_from_checkpoint=...)) ------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]



def _train(store, out, max_steps: int, save_steps: int, kill_at: int | None = None, resume: str | None = None,
           flush: bool = True, **cb_kwargs) -> ExplaindCallback:
    """A Trainer run recorded into ``store`` that saves a Trainer checkpoint every ``save_steps`` updates; with
    ``kill_at`` the process dies right after update ``kill_at`` was recorded (and committed with ``flush``: the
    store then runs ahead of the Trainer's last checkpoint)."""
    import os

    torch.manual_seed(0)
    cb = ExplaindCallback(store, **cb_kwargs)

    class Kill(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == kill_at:
                if flush:
                    cb.recorder.flush()
                os._exit(0)

    args = _args(Path(out), max_steps=max_steps, save_strategy="steps", save_steps=save_steps)
    trainer = Trainer(model=GPT2LMHeadModel(_config()), args=args, train_dataset=_dataset(), callbacks=[cb, Kill()])
    trainer.train(resume_from_checkpoint=resume)
    return cb


def _killed(store, out, max_steps: int, save_steps: int, kill_at: int, flush: bool = True, **cb_kwargs) -> None:
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from tests.store.test_hf import _train\n"
        f"_train({str(store)!r}, {str(out)!r}, {max_steps}, {save_steps}, kill_at={kill_at}, flush={flush}, "
        f"**{cb_kwargs!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)


def _assert_same_store(a, b) -> None:
    from tests.support.store_helpers import arrays_of

    x, y = arrays_of(a), arrays_of(b)
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(y[key], x[key], err_msg=key)


def test_trainer_resumed_from_its_checkpoint_continues_the_store_bit_for_bit(tmp_path, one_thread):
    ref, store = tmp_path / "ref.zarr", tmp_path / "run.zarr"
    _train(ref, tmp_path / "a", 7, save_steps=2)
    # killed after update 5 was committed to the store; the Trainer's last checkpoint is update 4 (mid-epoch:
    # 3 updates per epoch, so the resumed Trainer skips the first 2 micro-batches of the epoch's permutation)
    _killed(store, tmp_path / "b", 7, save_steps=2, kill_at=5)
    assert open_run(store).committed_updates == 5
    # a checkpoint the store has not reached (update 6 of the uninterrupted run) is refused; the store is kept
    with pytest.raises(RecorderError, match="holds only 5 committed updates"):
        _train(store, tmp_path / "b", 7, save_steps=2, resume=str(tmp_path / "a" / "out" / "checkpoint-6"))
    assert open_run(store).committed_updates == 5
    mine = tmp_path / "b" / "out" / "checkpoint-4"
    with pytest.raises(RecorderError, match="overwrite=True would delete"):
        _train(store, tmp_path / "b", 7, save_steps=2, resume=str(mine), overwrite=True)
    _train(store, tmp_path / "b", 7, save_steps=2, resume=str(mine))
    run = open_run(store)
    assert run.committed_updates == 7
    assert [len(b) for b in run.block(0, 7).batches] == [8, 8, 4, 8, 8, 4, 8]
    _assert_same_store(ref, store)  # params, AdamW state, batch indices, lrs, clip scales, losses
    rep = run.verify()
    assert rep.ok, rep.table()


def test_sparse_trainer_recording_resumes_between_its_checkpoints(tmp_path, one_thread):
    ref, store = tmp_path / "ref.zarr", tmp_path / "run.zarr"
    _train(ref, tmp_path / "a", 9, save_steps=5, checkpoint_every=4)
    # killed after update 7, with nothing committed after the Trainer saved its checkpoint of update 5 (the
    # callback commits the store whenever the Trainer saves); the store's last checkpoint is update 4
    _killed(store, tmp_path / "b", 9, save_steps=5, kill_at=7, flush=False, checkpoint_every=4)
    assert open_run(store).committed_updates == 5
    mine = tmp_path / "b" / "out" / "checkpoint-5"
    _train(store, tmp_path / "b", 9, save_steps=5, resume=str(mine), checkpoint_every=4)
    run = open_run(store)
    assert run.committed_updates == 9 and run.checkpoint_steps.tolist() == [0, 4, 8, 9]
    _assert_same_store(ref, store)
    rep = run.verify()
    assert rep.ok, rep.table()


def test_recorder_resume_at_continues_from_the_callers_own_checkpoint(tmp_path, one_thread):
    import copy

    from explaind_store import Recorder
    from tests.support.compare import MLP_SPEC
    from tests.support.store_helpers import digits, make_mlp

    x, y = digits(64)

    def loop(path, steps, model, opt, saved=None, **kw):
        with Recorder(path, model, opt, data=(x, y), model_spec=MLP_SPEC, **kw) as rec:
            for step in steps:
                idx = torch.arange(8 * step, 8 * step + 8)
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
                rec.record(idx)
                if saved is not None and step == 2:  # the loop's own checkpoint of update 3
                    saved.update(model=copy.deepcopy(model.state_dict()), opt=copy.deepcopy(opt.state_dict()))

    def fresh():
        torch.manual_seed(0)
        model = make_mlp()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    loop(tmp_path / "ref", range(6), *fresh())
    saved: dict = {}
    loop(tmp_path / "r", range(6), *fresh(), saved=saved)
    model, opt = fresh()
    with pytest.raises(RecorderError, match="optimizer has taken 0 steps, at update 3 the store's had taken 3"):
        loop(tmp_path / "r", range(3, 6), model, opt, resume_at=3)
    opt.load_state_dict(saved["opt"])  # the optimizer restored, the model not: nothing is dropped
    with pytest.raises(RecorderError, match="params/0.weight differs from the store's update 3"):
        loop(tmp_path / "r", range(3, 6), model, opt, resume_at=3)
    model.load_state_dict(saved["model"])
    with pytest.raises(RecorderError, match="holds only 6 committed updates"):
        loop(tmp_path / "r", range(9, 10), model, opt, resume_at=9)
    assert open_run(tmp_path / "r").committed_updates == 6
    loop(tmp_path / "r", range(3, 6), model, opt, resume_at=3)
    _assert_same_store(tmp_path / "ref", tmp_path / "r")


def test_trainer_run_with_sparse_checkpoints_replays_and_decomposes(tmp_path):
    """checkpoint_every=4 (passed on to the Recorder): parameters stored at updates 0, 4 and 7 only; the steps between are
    replayed (clipping and accumulation included), verify passes, and the engine's identity closes with the replay
    residual at the checkpoint that ends a chunk."""
    import engine
    from tests.support.compare import identity_error

    torch.manual_seed(0)
    cb = ExplaindCallback(tmp_path / "run.zarr", checkpoint_every=4)
    Trainer(model=GPT2LMHeadModel(_config()), args=_args(tmp_path), train_dataset=_dataset(), callbacks=[cb]).train()
    run = open_run(tmp_path / "run.zarr")
    assert run.committed_updates == 7 and run.checkpoint_every == 4
    assert list(run.checkpoint_steps) == [0, 4, 7] and not run.is_stored(2)
    rep = run.verify()
    assert rep.ok, rep.table()
    ds = engine.attribute(run, queries="train[:2]", output="loss", by=("step",), client="sync", progress=False)
    assert "max_replay_residual" in ds.attrs
    change = float(np.abs(ds["final"] - ds["initial"]).max())
    assert identity_error(ds) <= 1e-10 * change
    assert float(np.abs(ds["replay_residual"]).max()) <= 1e-3 * change  # replay close to training
