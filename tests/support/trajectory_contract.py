"""What every :class:`~explaind_store.trajectory.Trajectory` must do, as one test class run against each
implementation (as ``zarr.testing.store.StoreTests`` runs against every zarr store).

A subclass provides the ``recorded`` fixture: a :class:`Recorded` made by :func:`record_both`, which trains the
digits MLP once (SGD with momentum, coupled weight decay, a learning-rate schedule, variable batches) and records it
into a store and an in-memory trajectory at the same time, keeping the live parameters as the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from explaind_store import Recorder, open_run
from explaind_store.trajectory import InMemoryTrajectory, Trajectory, TrajectoryBlock
from tests.support.compare import MLP_SPEC
from tests.support.store_helpers import batch_for, digits, lr_factor, make_mlp, make_optimizer

UPDATES = 7


@dataclass
class Recorded:
    """One training run as each backend recorded it, and what it really was."""

    store: Any  # a Run
    memory: InMemoryTrajectory
    params: list[dict[str, torch.Tensor]]  # the live parameters after each update (index = step)
    batches: list[torch.Tensor]  # the sample indices of update s at index s - 1
    lrs: list[list[float]]  # the per-group learning rates of update s at index s - 1
    data: tuple[torch.Tensor, torch.Tensor]


def record_both(path: Path) -> Recorded:
    """Train once, recording into a store at ``path`` and into an :class:`InMemoryTrajectory`."""
    from explaind_store.examples.tiny import make_mlp as trusted_mlp

    torch.manual_seed(0)
    x, y = digits()
    model = make_mlp()
    opt = make_optimizer("sgd_momentum", model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    factory = lambda: trusted_mlp(in_dim=64, hidden=6, out_dim=10, depth=1, act="tanh")  # noqa: E731
    memory = InMemoryTrajectory.start(model, opt, factory, {"train": (x, y)}, {"kind": "cross_entropy"})
    params = [{k: v.detach().clone() for k, v in model.named_parameters()}]
    batches, lrs = [], []
    with Recorder(path, model, opt, data=(x, y), scheduler=sched, chunk_updates=3, model_spec=MLP_SPEC) as rec:
        for s in range(1, UPDATES + 1):
            idx = batch_for(s, len(x))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            used = [float(g["lr"]) for g in opt.param_groups]
            opt.step()
            rec.record(idx, loss=loss.item())
            memory.record(model, opt, idx, used)
            sched.step()
            params.append({k: v.detach().clone() for k, v in model.named_parameters()})
            batches.append(idx.clone())
            lrs.append(used)
    return Recorded(open_run(path), memory, params, batches, lrs, (x, y))


class TrajectoryContract:
    """The shared tests; subclasses set ``backend`` ("store" or "memory")."""

    backend = ""

    @pytest.fixture()
    def traj(self, recorded: Recorded) -> Trajectory:
        return recorded.store if self.backend == "store" else recorded.memory

    def test_is_a_trajectory(self, traj):
        assert isinstance(traj, Trajectory)
        assert traj.committed_updates == UPDATES

    def test_names_optimizer_and_loss(self, traj, recorded):
        assert list(traj.tensor_names) == list(recorded.params[0])
        spec = traj.optimizer_spec
        assert spec.type == "SGD" and spec.state_names == ("momentum_buffer",)
        assert spec.groups[0]["momentum"] == 0.9 and spec.groups[0]["weight_decay"] == 5e-3
        assert traj.loss["kind"] == "cross_entropy"

    @pytest.mark.parametrize("lo,hi", [(0, UPDATES), (2, 5), (3, 4)])
    def test_block_holds_exactly_what_training_did(self, traj, recorded, lo, hi):
        blk = traj.block(lo, hi)
        assert isinstance(blk, TrajectoryBlock) and (blk.lo, blk.hi) == (lo, hi)
        assert list(blk.updates) == list(range(lo + 1, hi + 1))
        for s in range(lo, hi + 1):
            for name, want in recorded.params[s].items():
                assert torch.equal(blk.params_at(s)[name], want), (name, s)
        assert [b.tolist() for b in blk.batches] == [b.tolist() for b in recorded.batches[lo:hi]]
        assert blk.lr.dtype == torch.float64 and blk.lr.tolist() == recorded.lrs[lo:hi]
        assert blk.weight_decay.tolist() == [[5e-3]] * (hi - lo)
        assert blk.grad_scale.tolist() == [1.0] * (hi - lo)
        assert blk.opt_step.tolist() == list(range(lo + 1, hi + 1))
        mom = blk.state_at("momentum_buffer", hi)
        assert set(mom) == set(traj.tensor_names) and all(bool(v.any()) for v in mom.values())

    def test_block_outside_the_run_is_refused(self, traj):
        # the store raises IndexError, the in-memory trajectory ValueError (kept as they were: behaviour unchanged)
        with pytest.raises((IndexError, ValueError), match="outside the recorded updates"):
            traj.block(0, UPDATES + 1)

    def test_model_and_data(self, traj, recorded):
        model = traj.build_model()
        assert [n for n, _ in model.named_parameters()] == list(traj.tensor_names)
        x, y = traj.split("train")
        assert torch.equal(torch.as_tensor(x), recorded.data[0]) and torch.equal(torch.as_tensor(y), recorded.data[1])
