"""Shared training loop of the built-in examples: deterministic, resumable bit-for-bit, optionally recorded.

The batch of update ``s`` (1-based) is a pure function of ``(seed, s)`` (see :func:`batch_indices`), so a run that
is stopped and resumed from a store replays exactly the same batches. When recording, the ``Recorder`` restores the
model, optimizer and scheduler to ``rec.updates_done`` and the loop continues with the next update.

Per update the loop does, in this order: ``zero_grad``, forward, mean cross-entropy, ``backward``,
``optimizer.step()``, ``rec.record(batch, loss=...)``, ``scheduler.step()``. So the learning rate the recorder sees
in the optimizer's groups at ``record`` time is the one update ``s`` used, and at the start of update ``s`` the
scheduler's ``last_epoch`` is ``s - 1``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

Data = dict[str, tuple[torch.Tensor, torch.Tensor]]
Callback = Callable[[int, float, nn.Module], "bool | None"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"float32"`` / ``"float64"`` -> torch dtype (factories take strings so model specs stay JSON)."""
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}") from None


def activation(name: str) -> nn.Module:
    """The elementwise activations the examples support: ``"relu"``, ``"gelu"``, ``"tanh"``."""
    acts: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
    try:
        return acts[name]()
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; use one of {', '.join(acts)}") from None


# --- batches: a pure function of (seed, step) ----------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """A stable 63-bit generator seed for ``(seed, epoch)`` (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"explaind-batches:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of epoch ``epoch`` (0-based): a permutation of ``range(n)``, int64."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=gen)


def batches_per_epoch(n: int, batch_size: int | None) -> int:
    """Updates per epoch; the last batch of an epoch holds the ``n % batch_size`` leftovers (if any)."""
    if batch_size is None or batch_size >= n:
        return 1
    return -(-n // batch_size)


def batch_indices(n: int, batch_size: int | None, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of the batch of update ``step`` (1-based), int64.

    ``batch_size=None`` (or ``>= n``) is full-batch: ``arange(n)`` every update. Otherwise update ``step`` takes
    slice ``j`` of the permutation of epoch ``e``, with ``e, j = divmod(step - 1, batches_per_epoch)``.
    """
    if step < 1:
        raise ValueError(f"updates are numbered from 1, got step={step}")
    if batch_size is None or batch_size >= n:
        return torch.arange(n)
    epoch, j = divmod(step - 1, batches_per_epoch(n, batch_size))
    return epoch_permutation(n, seed, epoch)[j * batch_size : (j + 1) * batch_size]


class BatchSchedule:
    """:func:`batch_indices` with the current epoch's permutation cached (same results, less work per update)."""

    def __init__(self, n: int, batch_size: int | None, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.full = batch_size is None or batch_size >= n
        self.per_epoch = batches_per_epoch(n, batch_size)
        self._epoch = -1
        self._perm = torch.arange(n)

    def __call__(self, step: int) -> torch.Tensor:
        if step < 1:
            raise ValueError(f"updates are numbered from 1, got step={step}")
        if self.full:
            return self._perm
        assert self.batch_size is not None
        epoch, j = divmod(step - 1, self.per_epoch)
        if epoch != self._epoch:
            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._epoch = epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]


# --- learning-rate schedule ------------------------------------------------------------------------------------------


def triangular_lr(epoch: int, *, total: int, warmup: int) -> float:
    """LambdaLR factor: update ``u = epoch + 1`` ramps up linearly to 1 at ``u = warmup``, then down towards 0.

    The last update (``u = total``) still gets ``1 / (total + 1 - warmup)`` of the peak, never exactly zero.
    Module-level so ``functools.partial(triangular_lr, total=..., warmup=...)`` keeps the scheduler state JSON-able.
    """
    u = epoch + 1
    if u <= warmup:
        return u / warmup
    return max(0.0, (total + 1 - u) / (total + 1 - warmup))


# --- evaluation and the loop -----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 8192) -> dict[str, float]:
    """Mean cross-entropy and accuracy on every split: ``{"<split>_loss": ..., "<split>_acc": ...}``.

    Touches no random state and leaves the model's train/eval mode as it was, so it never changes a trajectory.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for split, (x, y) in data.items():
            loss_sum, correct = 0.0, 0
            for lo in range(0, len(x), batch_size):
                logits = model(x[lo : lo + batch_size])
                yb = y[lo : lo + batch_size]
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(dim=-1) == yb).sum())
            out[f"{split}_loss"] = loss_sum / max(len(x), 1)
            out[f"{split}_acc"] = correct / max(len(x), 1)
    finally:
        model.train(was_training)
    return out


@dataclass
class TrainResult:
    """What a training call produced.

    ``losses[i]`` is the batch loss of update ``first_update + i`` (at the parameters before it). ``evals`` holds
    ``{"step": s, "train_loss", "train_acc", "val_loss", "val_acc"}`` at the eval points. ``seconds`` is the wall
    time of the updates alone (recording included, evaluation excluded).
    """

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    first_update: int = 1
    updates_done: int = 0
    seconds: float = 0.0
    path: str | None = None


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    *,
    steps: int,
    seed: int,
    batch_size: int | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    out: str | None = None,
    model_spec: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    eval_every: int = 0,
    recorder_kwargs: dict[str, Any] | None = None,
    callback: Callback | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``data["train"]`` for updates ``1..steps`` with mean cross-entropy.

    ``out=None`` trains without recording. Otherwise a ``Recorder`` writes the run to ``out`` (``data["train"]``
    as the training data, the other splits as extra splits); with ``resume=True`` it restores model, optimizer and
    scheduler and the loop continues at ``rec.updates_done + 1``. ``eval_every > 0`` evaluates all splits every that
    many updates (and at the first and last step) outside the timed path. ``callback(step, loss, model)`` runs after
    each update; returning True stops training early (as if interrupted). The progress bar is plain tqdm (text),
    as ``tqdm.auto``'s notebook widget would need ipywidgets.
    """
    x_train, y_train = data["train"]
    n = len(x_train)
    schedule = BatchSchedule(n, batch_size, seed)
    result = TrainResult(model=model, path=None if out is None else str(out))

    rec = None
    if out is not None:
        # imported here: plain training (out=None) does not need the recorder
        from explaind_store import Recorder

        splits = {k: v for k, v in data.items() if k != "train"}
        rec = Recorder(
            out,
            model,
            optimizer,
            data=(x_train, y_train),
            loss="cross_entropy",
            model_spec=model_spec,
            splits=splits,
            scheduler=scheduler,
            resume=resume,
            overwrite=overwrite,
            **(recorder_kwargs or {}),
        )
    try:
        start = 1 if rec is None else rec.updates_done + 1
        if rec is not None and scheduler is not None:
            _align_scheduler(scheduler, rec.updates_done)
        result.first_update, result.updates_done = start, start - 1
        if eval_every > 0 and start <= steps:
            result.evals.append({"step": start - 1, **evaluate(model, data)})
        model.train()
        t_loop = 0.0
        with tqdm(total=steps, initial=start - 1, desc=desc, disable=not progress, leave=False) as bar:
            for s in range(start, steps + 1):
                t0 = time.perf_counter()
                idx = schedule(s)
                xb, yb = (x_train, y_train) if schedule.full else (x_train[idx], y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                value = loss.item()
                if rec is not None:
                    rec.record(idx, loss=value)
                if scheduler is not None:
                    scheduler.step()
                t_loop += time.perf_counter() - t0
                result.losses.append(value)
                result.updates_done = s
                result.seconds = t_loop
                bar.update(1)
                if progress and (s % 10 == 0 or s == steps):
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                stop = bool(callback(s, value, model)) if callback is not None else False
                if eval_every > 0 and (s % eval_every == 0 or s == steps or stop):
                    result.evals.append({"step": s, **evaluate(model, data)})
                if stop:
                    break
    finally:
        if rec is not None:
            rec.close()
    return result


def _align_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, updates_done: int) -> None:
    """Make sure a restored scheduler stands where update ``updates_done + 1`` expects it (``last_epoch``).

    A recorder may have saved the scheduler right at ``record(s)`` (before this loop's ``scheduler.step()``,
    ``last_epoch == s - 1``) or after it (``last_epoch == s``); both are exact, the first needs one more step.
    """
    last = scheduler.last_epoch
    if last == updates_done:
        return
    if last == updates_done - 1 and updates_done > 0:
        scheduler.step()
        return
    raise RuntimeError(
        f"the resumed lr scheduler is at last_epoch={last}, but {updates_done} updates are committed: "
        "the recorder did not restore the scheduler to the committed update"
    )
