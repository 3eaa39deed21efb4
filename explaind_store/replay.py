"""Rebuilding the steps between sparse checkpoints by replaying the optimizer.

A run recorded with ``checkpoint_every=K`` stores parameters and optimizer state at updates 0, K, 2K, ... and the
last one; every update stores its batch, learning rates, weight decays and clipping scale. A step between two
checkpoints is rebuilt by doing what training did: the model built from the store's spec, in the recorded dtype and
training mode, loaded with the checkpoint before it; then, per update, the batch-mean loss gradient of the recorded
batch (the store's loss spec), times the recorded clipping scale, and one ``step()`` of a real torch optimizer of
the recorded type, loaded with the checkpoint's state and given the recorded learning rate and weight decay.

A run whose forward drew random numbers (dropout) is replayed with the generator set, before each micro-batch's
forward, to the state recorded for it (``explaind_store.dropout``), so every mask is the one training drew.

With the same torch build and one torch thread this reproduces training bit for bit; multi-threaded or GPU kernels
(and micro-batched gradient accumulation, whose sum order differs) can differ in the last bits. Readers report
that difference at each checkpoint instead of hiding it (the engine's ``replay_residual``, ``explaind verify``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import dropout, modes
from . import optim as optim_mod
from . import schema, storage
from .dropout import RngRecord
from .specs import batch_loss, loss_weights

if TYPE_CHECKING:
    from .reader import Run


@dataclass
class Segment:
    """Steps ``start .. end`` of a sparse run: row 0 is the stored checkpoint ``start``, rows ``1..`` the replayed
    steps ``start+1 .. end`` (the last one replayed even when ``end`` is itself a checkpoint)."""

    start: int
    end: int
    params: dict[str, torch.Tensor]  # name -> (end - start + 1, *shape)
    state: dict[str, dict[str, torch.Tensor]]  # state name -> tensor name -> (end - start + 1, *shape)

    @property
    def nbytes(self) -> int:
        tensors = [*self.params.values(), *(t for d in self.state.values() for t in d.values())]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CheckpointData:
    """What a checkpoint stores: parameters and optimizer state at ``step``, torch's step counter there, and the
    learning rates and weight decays (per group) of update ``step`` (None at step 0)."""

    step: int
    params: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    opt_step: int
    lr: list[float] | None
    weight_decay: list[float] | None


class Replayer:
    """Replays segments of one run (one model and one optimizer, reused: building them is the expensive part)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.names = list(run.tensor_names)
        self.spec = run.optimizer_spec
        self.state_names = list(run.state_names)
        model = modes.apply_modes(run.build_model(), run.attrs.get(schema.ATTR_TRAIN_MODE))
        dtypes = {t["name"]: getattr(torch, str(t["dtype"])) for t in run.tensors}
        if len(set(dtypes.values())) == 1:  # a model trained in one dtype (e.g. model.double()): buffers too
            model = model.to(next(iter(dtypes.values())))
        own = dict(model.named_parameters())
        missing = [n for n in self.names if n not in own]
        if missing:
            raise storage.StoreError(
                f"the model built from this run's model_spec lacks the recorded tensors {missing[:5]}, so the steps "
                "between its checkpoints cannot be replayed; the model_spec (or the model_factory passed to "
                "open_run) does not build the model that was trained"
            )
        for n, p in own.items():
            p.requires_grad_(n in dtypes)
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])
        self.model = model
        self.params = [own[n] for n in self.names]
        group_of = self.spec.group_of()
        per_group: list[list[torch.Tensor]] = [[] for _ in self.spec.groups]
        for n in self.names:
            per_group[group_of[n]].append(own[n])
        self.optimizer = optim_mod.build_optimizer(self.spec.type, self.spec.groups, per_group)
        self.x, self.y = run.split(schema.TRAIN_SPLIT)

    def _random_forwards(self, batch: torch.Tensor, rng: RngRecord) -> None:
        """An update whose forward drew random numbers (dropout): each micro-batch's forward and backward with the
        generator at the state recorded for it, its loss weighted by its share of the update's batch loss."""
        info = self.run.rng_info or {}
        device = torch.device(str(info.get("device", "cpu")))
        if device.type != dropout.generator_device(self.model).type:
            raise storage.StoreError(
                f"this run drew its dropout masks on {device.type}, so its steps between checkpoints are replayed on "
                f"{device.type} too; build the model there (open the store on a machine with that device)"
            )
        y = self.y[batch]
        if len(rng.sizes) == 1:
            with dropout.generator_at(rng.states[0], device):
                batch_loss(self.run.loss, self.model(self.x[batch]), y).backward()
            return
        w = loss_weights(self.run.loss, y)
        start = 0
        for state, n in zip(rng.states, rng.sizes):
            sl = slice(start, start + n)
            share = float(w[sl].sum()) / len(batch)
            with dropout.generator_at(state, device):
                (batch_loss(self.run.loss, self.model(self.x[batch[sl]]), y[sl]) * share).backward()
            start += n

    def segment(self, start: int, end: int) -> Segment:
        """Replay updates ``start+1 .. end`` from the checkpoint stored at ``start``."""
        run = self.run
        ck = run.checkpoint_data(start)
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(ck.params[n])
        own = dict(zip(self.names, self.params))
        optim_mod.load_recorded_state(
            self.optimizer, self.spec.type, self.params,
            [{s: ck.state[s][n].clone() for s in self.state_names} for n in self.names], ck.opt_step,
            ck.lr, ck.weight_decay,
        )
        rows_p = {n: [ck.params[n].clone()] for n in self.names}
        rows_s = {s: {n: [ck.state[s][n].clone()] for n in self.names} for s in self.state_names}
        recs = run.update_records(start, end) if end > start else None
        for r in range(end - start if recs is not None else 0):
            for g, group in enumerate(self.optimizer.param_groups):
                group["lr"] = float(recs.lr[r, g])
                group["weight_decay"] = float(recs.weight_decay[r, g])
            batch = recs.batches[r]
            self.optimizer.zero_grad(set_to_none=True)
            rng = recs.rng[r] if recs.rng is not None else None
            with torch.enable_grad():
                if rng is None:
                    loss = batch_loss(run.loss, self.model(self.x[batch]), self.y[batch])
                    loss.backward()
                else:
                    self._random_forwards(batch, rng)
            scale = float(recs.grad_scale[r])
            if scale == scale and scale != 1.0:  # NaN: not recorded (index 0 only)
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.optimizer.step()
            for n, p in own.items():
                rows_p[n].append(p.detach().clone())
                st = self.optimizer.state.get(p, {})
                for s in self.state_names:
                    v = st.get(s)
                    rows_s[s][n].append(v.detach().clone() if v is not None else torch.zeros_like(p))
        return Segment(
            start, end,
            {n: torch.stack(v) for n, v in rows_p.items()},
            {s: {n: torch.stack(v) for n, v in d.items()} for s, d in rows_s.items()},
        )
