"""The seam between storage and analysis: a trajectory read block by block.

The engine never touches Zarr directly. It asks a ``Trajectory`` (a store-backed ``Run``, or an in-memory
recording for tests and small experiments) for a ``TrajectoryBlock`` covering the updates of one chunk, so the same
per-chunk math runs in-process, on Dask workers, or on tensors built by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import schema
from .dropout import RngRecord
from .optim import optimizer_kind, state_names


@dataclass(frozen=True)
class OptimizerSpec:
    """What the math needs to know about the optimizer (static hyperparameters per group).

    ``groups[g]`` holds torch's hyperparameters for group ``g`` (``betas``, ``eps``, ``momentum``, ``dampening``,
    ``nesterov``, ...) and ``"tensors"``: the names of the tensors in it. The learning rate and weight decay of each
    update are per-update records, not taken from here.
    """

    type: str  # "AdamW" | "Adam" | "SGD"
    groups: tuple[dict[str, Any], ...]

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> OptimizerSpec:
        return cls(type=attrs["type"], groups=tuple(dict(g) for g in attrs["groups"]))

    def to_attrs(self) -> dict[str, Any]:
        return {"type": self.type, "groups": [dict(g) for g in self.groups]}

    def group_of(self) -> dict[str, int]:
        """Tensor name -> parameter-group index."""
        return {name: g for g, grp in enumerate(self.groups) for name in grp["tensors"]}

    @property
    def state_names(self) -> tuple[str, ...]:
        """Optimizer state groups the store holds for this optimizer."""
        return state_names(self.type, self.groups)


@dataclass
class TrajectoryBlock:
    """Everything about updates ``lo+1 .. hi`` (the window ``(lo, hi]``).

    Step-indexed tensors hold steps ``lo .. hi`` (``hi - lo + 1`` rows: row ``r`` is step ``lo + r``).
    Per-update records hold updates ``lo+1 .. hi`` (``hi - lo`` rows: row ``r`` is update ``lo + 1 + r``).
    """

    lo: int
    hi: int
    params: dict[str, torch.Tensor]  # name -> (hi-lo+1, *shape)
    state: dict[str, dict[str, torch.Tensor]]  # state name -> tensor name -> (hi-lo+1, *shape)
    lr: torch.Tensor  # (hi-lo, n_groups) float64
    weight_decay: torch.Tensor  # (hi-lo, n_groups) float64
    opt_step: torch.Tensor  # (hi-lo,) int64: torch's step counter after the update (for bias corrections)
    grad_scale: torch.Tensor  # (hi-lo,) float64: clipping scale applied to the gradient (1.0 if none)
    batches: list[torch.Tensor]  # hi-lo int64 tensors of sample indices
    # sparse checkpoints: the stored parameters at ``hi`` when ``hi`` is a checkpoint whose row was replayed (the
    # replayed row continues the block's trajectory; the stored one is where the next block starts)
    stored_end: dict[str, torch.Tensor] | None = None
    # runs with dropout (explaind_store.dropout): per update, its training forwards' generator states (None: the
    # update drew nothing), and the training loss recorded for each update (NaN: not given)
    rng: list[RngRecord | None] | None = None
    loss: torch.Tensor | None = None

    @property
    def updates(self) -> range:
        return range(self.lo + 1, self.hi + 1)

    def params_at(self, step: int) -> dict[str, torch.Tensor]:
        r = step - self.lo
        return {k: v[r] for k, v in self.params.items()}

    def state_at(self, name: str, step: int) -> dict[str, torch.Tensor]:
        r = step - self.lo
        return {k: v[r] for k, v in self.state[name].items()}


@dataclass
class UpdateRecords:
    """The per-update records of updates ``lo+1 .. hi`` (``hi - lo`` rows), as in :class:`TrajectoryBlock`."""

    lr: torch.Tensor
    weight_decay: torch.Tensor
    opt_step: torch.Tensor
    grad_scale: torch.Tensor
    batches: list[torch.Tensor]
    rng: list[RngRecord | None] | None = None
    loss: torch.Tensor | None = None


@runtime_checkable
class Trajectory(Protocol):
    """A recorded training run, readable block by block (implemented by ``Run`` and ``InMemoryTrajectory``)."""

    @property
    def committed_updates(self) -> int: ...

    @property
    def optimizer_spec(self) -> OptimizerSpec: ...

    @property
    def loss(self) -> dict[str, str]: ...

    @property
    def tensor_names(self) -> list[str]: ...

    def block(self, lo: int, hi: int) -> TrajectoryBlock: ...

    def build_model(self) -> nn.Module: ...

    def split(self, name: str = schema.TRAIN_SPLIT) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class InMemoryTrajectory:
    """A trajectory held in lists, for tests and tiny experiments. ``record`` mirrors ``Recorder.record``."""

    model_factory: Callable[[], nn.Module]
    optimizer_spec: OptimizerSpec
    loss: dict[str, str]
    data: dict[str, tuple[torch.Tensor, torch.Tensor]]
    tensor_names: list[str]
    steps_params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    steps_state: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    lrs: list[list[float]] = field(default_factory=list)
    wds: list[list[float]] = field(default_factory=list)
    opt_steps: list[int] = field(default_factory=list)
    grad_scales: list[float] = field(default_factory=list)
    batch_list: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_factory: Callable[[], nn.Module],
        data: dict[str, tuple[torch.Tensor, torch.Tensor]],
        loss: dict[str, str],
    ) -> InMemoryTrajectory:
        """Begin recording: capture theta_0 and the (empty) initial optimizer state."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        id_to_name = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for g in optimizer.param_groups:
            hp = {k: v for k, v in g.items() if k != "params" and _jsonable(v)}
            if "betas" in hp:
                hp["betas"] = list(hp["betas"])
            hp["tensors"] = [id_to_name[id(p)] for p in g["params"]]
            groups.append(hp)
        spec = OptimizerSpec(type=optimizer_kind(optimizer), groups=tuple(groups))
        traj = cls(model_factory, spec, loss, data, names)
        traj._snapshot(model, optimizer)
        return traj

    def _snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.tensor_names}
        state: dict[str, dict[str, torch.Tensor]] = {}
        by_name = dict(model.named_parameters())
        for sname in self.optimizer_spec.state_names:
            state[sname] = {}
            for n in self.tensor_names:
                st = optimizer.state.get(by_name[n], {})
                val = st.get(sname)
                state[sname][n] = val.detach().clone() if val is not None else torch.zeros_like(by_name[n])
        self.steps_params.append(params)
        self.steps_state.append(state)

    def record(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: Sequence[int] | torch.Tensor,
        lrs: Sequence[float],
        grad_scale: float = 1.0,
    ) -> None:
        """Call after ``optimizer.step()``; ``lrs`` are the per-group learning rates that step used."""
        self._snapshot(model, optimizer)
        self.lrs.append([float(x) for x in lrs])
        self.wds.append([float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups])
        first = dict(model.named_parameters())[self.tensor_names[0]]
        st = optimizer.state.get(first, {})
        self.opt_steps.append(int(st["step"]) if "step" in st else len(self.lrs))
        self.grad_scales.append(float(grad_scale))
        self.batch_list.append(torch.as_tensor(batch, dtype=torch.int64).clone())

    @property
    def committed_updates(self) -> int:
        return len(self.lrs)

    def block(self, lo: int, hi: int) -> TrajectoryBlock:
        if not (0 <= lo < hi <= self.committed_updates):
            raise ValueError(f"block ({lo}, {hi}] is outside the recorded updates 0..{self.committed_updates}")
        rows = range(lo, hi + 1)
        params = {n: torch.stack([self.steps_params[s][n] for s in rows]) for n in self.tensor_names}
        state = {
            sn: {n: torch.stack([self.steps_state[s][sn][n] for s in rows]) for n in self.tensor_names}
            for sn in self.optimizer_spec.state_names
        }
        return TrajectoryBlock(
            lo=lo,
            hi=hi,
            params=params,
            state=state,
            lr=torch.tensor(self.lrs[lo:hi], dtype=torch.float64),
            weight_decay=torch.tensor(self.wds[lo:hi], dtype=torch.float64),
            opt_step=torch.tensor(self.opt_steps[lo:hi], dtype=torch.int64),
            grad_scale=torch.tensor(self.grad_scales[lo:hi], dtype=torch.float64),
            batches=list(self.batch_list[lo:hi]),
        )

    def build_model(self) -> nn.Module:
        return self.model_factory()

    def split(self, name: str = schema.TRAIN_SPLIT) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[name]


def _jsonable(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, type(None))) or (
        isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v)
    )
