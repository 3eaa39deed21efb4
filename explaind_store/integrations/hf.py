"""Record a stock ``transformers.Trainer`` run of a causal language model (the ``[hf]`` extra)::

    from explaind_store.integrations.hf import ExplaindCallback
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[ExplaindCallback("run.zarr")])
    trainer.train()

What the callback takes from the Trainer, and how (transformers 5.23):

- Data: ``train_dataset`` rows are dicts of ``input_ids`` and ``labels`` (and optionally ``attention_mask``), all
  padded to one length; the store keeps ``input_ids`` as inputs ``(N, T)`` and ``labels`` as targets ``(N, T)``
  (-100 = not predicted). Padding must be on the right with label -100 under it: causal attention then never lets
  a predicted position see a padded one and GPT-style positions are ``arange(T)``, so the mask changes no loss
  term and the store replays without it (anything else is refused).
- Batches: the sampler the Trainer's dataloader draws from is tapped; every training forward takes its samples'
  indices from the tap and checks its ``input_ids`` and ``labels`` against the stored rows. All micro-batches
  between two optimizer steps (``gradient_accumulation_steps``, fewer at the end of an epoch) form that update's
  batch.
- Loss: the Trainer passes ``num_items_in_batch`` (tokens of the whole update) and the model divides each
  micro-batch's token-loss sum by it, so the update's loss is the token-loss sum over the whole accumulated batch
  over that count: the store's ``causal_lm`` loss. The Trainer counts ``labels[..., 1:] != -100`` (the predicted
  tokens) for models whose ``loss_type`` maps to ``ForCausalLMLoss`` (``LlamaForCausalLM``), but every label
  that is not -100, position 0 included, for the others (``GPT2LMHeadModel`` has ``loss_type`` None): the loss
  spec's ``count`` (``"predicted"`` or ``"labels"``) says which, and the callback checks the count every update.
- Learning rate and weight decay of every update: the recorder's optimizer hooks (whatever the scheduler set).
- Clipping: the Trainer clips at ``max_grad_norm`` before the step and logs the total norm; the callback asks for
  a log at every update and stores ``clip_scale(grad_norm, max_grad_norm)``, exactly torch's factor (so the
  Trainer prints a log line per update).
- Resuming: ``trainer.train(resume_from_checkpoint=...)`` with a new callback on the same path continues the
  store at the Trainer's checkpoint update S (``Recorder(resume_at=S)``): the store's updates after S are dropped
  and recorded again, the model and optimizer the Trainer restored are checked against the store's update S, and
  the indices of the batches the resumed Trainer skips are skipped too. The callback commits the store whenever
  the Trainer saves a checkpoint, so a run killed after a checkpoint can resume from it; a store behind the
  checkpoint (killed between the Trainer's save and the commit) is refused.
- Dropout: recorded. The recorder keeps the generator state at the start of every training forward (one per
  micro-batch) and readers regenerate the masks from it (``explaind_store.dropout``): GPT-2's ``embd_pdrop`` and
  ``resid_pdrop`` (``nn.Dropout`` modules) and, under ``attn_implementation="eager"``, ``attn_pdrop`` (a
  ``F.dropout`` call on the attention weights). Attention dropout inside a fused kernel (``"sdpa"``, the default,
  or flash attention, with ``attn_pdrop > 0``) draws masks that cannot be regenerated: refused at
  ``on_train_begin``, naming the settings to change. Mixed precision, label smoothing and several processes are
  refused too.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from .. import modes
from ..recorder import Recorder, RecorderError
from ..specs import IGNORE_INDEX, loss_spec, token_counts

_ROW_KEYS = ("input_ids", "labels", "attention_mask")


def _logits_only(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
    return output.logits


def causal_lm_from_config(**config: Any) -> nn.Module:
    """A Hugging Face causal LM built from its config (JSON kwargs, as ``config.to_dict()`` gives them), returning
    logits ``(N, T, V)`` from ``model(input_ids)``: the model factory of stores the callback records. Built with
    eager attention (torch.func's forward mode has no CPU rule for fused attention) and without a KV cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    if "auto_map" in config or config.get("trust_remote_code"):
        raise ValueError("this config asks for remote code (auto_map); only built-in transformers models are rebuilt")
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError("the config has no model_type; it was not written by config.to_dict()")
    cfg = AutoConfig.for_model(model_type, **config)
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.register_forward_hook(_logits_only)
    return model


def causal_lm_spec(model: nn.Module) -> dict[str, Any]:
    """The model spec (for :class:`~explaind_store.Recorder`) that rebuilds ``model`` with
    :func:`causal_lm_from_config`."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    return {"factory": f"{__name__}:causal_lm_from_config", "kwargs": config}


def trainer_token_count(model: nn.Module) -> str:
    """What ``transformers.Trainer`` (5.23) divides a causal LM's accumulated loss by: ``"predicted"`` tokens
    when the model's ``loss_type`` maps to ``ForCausalLMLoss`` (and it is not an encoder-decoder), else every
    ``"labels"`` entry that is not -100 (the rule of ``Trainer._loss_shifts_labels``)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    shifts = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    encdec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return "predicted" if shifts and not encdec else "labels"


def dropout_settings(model: nn.Module) -> list[str]:
    """The config entries of ``model`` that switch dropout on (``name=value`` with value > 0)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    items = cfg.to_dict().items()
    return [f"{k}={v}" for k, v in items if "drop" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]


def fused_attention_dropout(model: nn.Module) -> list[str]:
    """The attention-dropout settings (``name=value`` > 0) of a model whose attention runs in a fused kernel (any
    ``attn_implementation`` but ``"eager"``), which draws its masks inside the kernel where they cannot be
    regenerated; empty when there are none (or attention is eager, whose dropout is an ``F.dropout`` call)."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if cfg is None or impl in (None, "eager"):
        return []
    return [s for s in dropout_settings(model) if "att" in s.split("=")[0]]


def _stack(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    try:
        return np.stack([np.asarray(r[key]) for r in rows]).astype(np.int64)
    except ValueError:
        raise RecorderError(
            f"the training rows' {key!r} have different lengths; pad every sequence to one length in the dataset "
            "(tokenizer(..., padding='max_length', max_length=T), labels -100 under the padding)"
        ) from None


def dataset_arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, labels)`` of a Trainer dataset of dicts, checked to be replayable without its attention mask."""
    rows = [dataset[i] for i in range(len(dataset))]
    if not rows:
        raise RecorderError("the training dataset is empty")
    keys = set(rows[0])
    extra = keys - set(_ROW_KEYS)
    if "input_ids" not in keys or "labels" not in keys or extra:
        raise RecorderError(
            f"training rows have the keys {sorted(keys)}; the recorder needs exactly input_ids and labels (-100 "
            "where no token is predicted), optionally attention_mask. Put the labels into the dataset rows (the "
            "store must know every update's targets) and drop other columns."
        )
    ids, labels = _stack(rows, "input_ids"), _stack(rows, "labels")
    if ids.shape != labels.shape or ids.ndim != 2:
        raise RecorderError(f"input_ids {ids.shape} and labels {labels.shape} must both be (N, T)")
    if "attention_mask" in keys:
        mask = _stack(rows, "attention_mask")
        right = bool(np.all(mask[:, :-1] >= mask[:, 1:])) and bool(np.all((mask == 0) | (mask == 1)))
        if mask.shape != ids.shape or not right or np.any(labels[mask == 0] != IGNORE_INDEX):
            raise RecorderError(
                "the attention masks are not right padding with labels -100 under the padding: the store replays "
                "the model without its mask, which is only exact when padding follows the text. Pad on the right "
                "(tokenizer.padding_side = 'right') and set labels to -100 where attention_mask is 0."
            )
    return ids, labels


class _IndexTap:
    """Wraps a sampler: every index it yields is also appended to ``fifo`` (a new epoch starts a new list), except
    the first ``skip`` of its next pass (the samples of the batches a resumed Trainer skips without training)."""

    def __init__(self, sampler: Any, fifo: deque[int], skip: int = 0) -> None:
        self.__dict__["sampler"] = sampler
        self.__dict__["fifo"] = fifo
        self.__dict__["skip"] = skip

    def __iter__(self) -> Any:
        self.fifo.clear()
        skip, self.__dict__["skip"] = self.skip, 0
        for k, i in enumerate(self.sampler):
            if k >= skip:
                self.fifo.append(int(i))
            yield i

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["sampler"], name)


def _skipped_samples(args: Any, resumed: int, train_dataloader: Any, batch_sampler: Any) -> int:
    """How many sampled indices a Trainer resumed at update ``resumed`` draws and skips before it trains again:
    the micro-batches of the resumed epoch's first ``resumed % updates_per_epoch`` updates (the rule of
    ``Trainer._init_training_state``; none with ``ignore_data_skip``)."""
    if not resumed or getattr(args, "ignore_data_skip", False):
        return 0
    accum = int(args.gradient_accumulation_steps)
    micro = len(train_dataloader)
    per_epoch = max(micro // accum + int(micro % accum > 0), 1)
    return (resumed % per_epoch) * accum * int(batch_sampler.batch_size)


class ExplaindCallback(TrainerCallback):
    """Records a ``transformers.Trainer`` run of a causal LM into an explaind store at ``path``.

    Args:
        path: directory of the store.
        overwrite: replace an existing store at ``path``.
        model_spec: how to rebuild the model (default: :func:`causal_lm_spec` of the trained model).
        **recorder_kwargs: passed to :class:`~explaind_store.Recorder` (``chunk_updates``, ``lossy_keepbits``,
            ``splits``, ``store_data``, ...).

    After training, ``callback.recorder`` is the (closed) recorder and ``open_run(path)`` reads the run.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, model_spec: dict[str, Any] | None = None,
                 **recorder_kwargs: Any) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.model_spec = model_spec
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None
        self._fifo: deque[int] = deque()
        self._hooks: list[Any] = []
        self._micro: list[np.ndarray] = []
        self._loss = 0.0
        self._items: list[int] = []
        self._pending = False
        self._tapped: tuple[Any, Any] | None = None

    # --- set-up ---------------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        if self.recorder is not None:
            raise RecorderError("this ExplaindCallback already recorded a run; make a new one (another path) per train()")
        self._check_args(args)
        assert model is not None and optimizer is not None and train_dataloader is not None
        was = model.training
        model.train()  # the Trainer trains in train mode: check the forward it will run
        problems = modes.forward_problems(model)
        model.train(was)
        if problems:
            raise RecorderError(
                "this model's training forward draws random numbers the store cannot regenerate, or depends on "
                "batch statistics:\n  - " + "\n  - ".join(problems) + f"\n{modes.FORWARD_ADVICE}"
            )
        fused = fused_attention_dropout(model)
        if fused:
            impl = model.config._attn_implementation
            raise RecorderError(
                f"this model applies attention dropout ({', '.join(fused)}) inside its fused attention kernel "
                f"(attn_implementation={impl!r}), which draws the masks where the store cannot regenerate them, so "
                "the run could not be decomposed exactly. Build the model with eager attention "
                "(AutoModelForCausalLM.from_config(cfg, attn_implementation='eager'), or "
                "GPT2LMHeadModel(cfg) after cfg._attn_implementation = 'eager'), whose attention dropout is "
                f"recorded, or set {', '.join(s.split('=')[0] + '=0.0' for s in fused)} in the config (the other "
                "dropout settings may stay on)."
            )
        ids, labels = dataset_arrays(train_dataloader.dataset)
        self._ids, self._labels = torch.from_numpy(ids), torch.from_numpy(labels)
        batch_sampler = getattr(train_dataloader, "batch_sampler", None)
        if batch_sampler is None or not hasattr(batch_sampler, "sampler"):
            raise RecorderError(
                "the Trainer's dataloader has no batch sampler with a .sampler to take the sample indices from "
                "(a custom batch sampler or an iterable dataset); use a map-style dataset and the default sampler"
            )
        resumed = int(state.global_step)  # > 0: train(resume_from_checkpoint=...) restored update `resumed`
        if resumed and self.overwrite:
            raise RecorderError(
                f"the Trainer resumed from its checkpoint of update {resumed}, but overwrite=True would delete the "
                f"store of the updates before it. Leave overwrite out to continue the store at {self.path}."
            )
        skip = _skipped_samples(args, resumed, train_dataloader, batch_sampler)
        self._tapped = (batch_sampler, batch_sampler.sampler)
        batch_sampler.sampler = _IndexTap(batch_sampler.sampler, self._fifo, skip)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        spec = self.model_spec if self.model_spec is not None else causal_lm_spec(model)
        max_norm = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        self._loss_spec = loss_spec("causal_lm", count=trainer_token_count(model))
        extra = {"resume_at": resumed} if resumed else {}
        kwargs = {"micro_batches": int(args.gradient_accumulation_steps), **self.recorder_kwargs}
        self.recorder = Recorder(
            self.path, model, inner, data=(ids, labels), loss=self._loss_spec, model_spec=spec,
            overwrite=self.overwrite, max_grad_norm=max_norm, **extra, **kwargs,
        )
        self._hooks.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._post_forward))

    @staticmethod
    def _check_args(args: Any) -> None:
        problems = []
        if getattr(args, "world_size", 1) > 1 or getattr(args, "n_gpu", 1) > 1:
            problems.append("training runs on several processes or GPUs (record a single-device run)")
        if getattr(args, "fp16", False) or getattr(args, "bf16", False):
            problems.append("mixed precision (fp16/bf16) computes the gradients in a precision the store does not "
                            "replay; train in float32 (fp16=False, bf16=False)")
        if getattr(args, "label_smoothing_factor", 0.0):
            problems.append("label_smoothing_factor > 0 changes the loss; set it to 0")
        if problems:
            raise RecorderError("this Trainer run cannot be recorded exactly:\n  - " + "\n  - ".join(problems))

    # --- per micro-batch --------------------------------------------------------------------------------------
    def _refuse(self, message: str) -> RecorderError:
        """Stop recording (the updates recorded so far stay committed) and return the error to raise."""
        self._pending = False
        self.close()
        return RecorderError(message + " The updates recorded before this one are kept.")

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return  # evaluation and generation are not training updates
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if ids is None or labels is None:
            raise self._refuse("a training forward got no input_ids or labels; the Trainer must pass both.")
        n = ids.shape[0]
        if len(self._fifo) < n:
            raise self._refuse(
                f"a training micro-batch of {n} rows came with only {len(self._fifo)} sampled indices: the Trainer's "
                "sampler is not the one the batches came from (the callback could not tap it)."
            )
        idx = np.array([self._fifo.popleft() for _ in range(n)], dtype=np.int64)
        if not (torch.equal(ids.detach().cpu().long(), self._ids[idx])
                and torch.equal(labels.detach().cpu().long(), self._labels[idx])):
            raise self._refuse(
                "a training micro-batch differs from the dataset rows its sampled indices name: a data collator "
                "that changes input_ids or labels (masking, dynamic padding) is not supported; pad and label the "
                "rows in the dataset and use the default collator. (In a run resumed from a Trainer checkpoint it can "
                "also mean that the Trainer skipped other batches than the callback expected: record with the "
                "Trainer's default sampler.)"
            )
        self._micro.append(idx)
        items = kwargs.get("num_items_in_batch")
        self._items.append(-1 if items is None else int(items))

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled() and module.training and getattr(output, "loss", None) is not None:
            self._loss += float(output.loss.detach())

    # --- per update ---------------------------------------------------------------------------------------------
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is None:
            return
        labels = self._labels[np.concatenate(self._micro)] if self._micro else self._labels[:0]
        count = int(token_counts(self._loss_spec, labels).sum())
        # without num_items_in_batch the model divides a lone micro-batch by its own predicted tokens
        alone = len(self._micro) == 1 and self._loss_spec["count"] == "predicted"
        if any(i != count and not (alone and i == -1) for i in self._items):
            raise self._refuse(
                f"the Trainer normalised the update's loss by {sorted(set(self._items))} items (-1: not given, so "
                f"each micro-batch was averaged on its own), not by the {count} tokens the store's loss "
                f"{self._loss_spec} divides by, so the record would not be the run. Use a model whose forward "
                "accepts num_items_in_batch (Hugging Face causal LMs do)."
            )
        self._pending = True
        if self.recorder.max_grad_norm is None:
            self._record(None)
        else:
            control.should_log = True  # the Trainer's log carries the update's total gradient norm

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._pending and logs is not None and "grad_norm" in logs:
            self._record(logs["grad_norm"])

    def _record(self, grad_norm: float | None) -> None:
        assert self.recorder is not None
        self.recorder.record(list(self._micro), loss=self._loss, grad_norm=grad_norm)
        self._micro, self._items, self._loss, self._pending = [], [], 0.0, False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Commit the store up to the Trainer's checkpoint, so that a run killed after it can resume from it.
        if self.recorder is not None and not self._pending:
            self.recorder.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks, give the sampler back and commit the store (``on_train_end`` does this)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._tapped is not None:
            self._tapped[0].sampler = self._tapped[1]
            self._tapped = None
        if self.recorder is not None:
            pending = self._pending
            self.recorder.close()
            if pending:
                raise RecorderError("the last update's gradient norm never reached the log, so it was not recorded")
