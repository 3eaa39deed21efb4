"""Dropout in train mode: what the store keeps of it and how readers reproduce it exactly.

The recorder keeps no masks. It keeps, for every training forward of every update (one per micro-batch), the state
of the default torch generator of the model's device as it was when the forward began (``updates/rng_state``,
bytes; ``updates/micro_size``, the micro-batch's number of samples), and only for runs whose forward actually
draws random numbers (the generator moved during a training forward).

Readers use it two ways:

- **Replay** (``explaind_store.replay``): the generator is set to the recorded state before each micro-batch's
  forward, and the model runs in train mode as in training, so every random op draws what it drew then (bit for
  bit at one torch thread), whatever produced the randomness.
- **Recomputation** (the engine's per-sample gradients, ``verify``'s batch-gradient check): :func:`draw_masks`
  sets the generator to the recorded state and runs the forward with every dropout call
  (``torch.nn.functional.dropout`` / ``dropout1d`` / ``2d`` / ``3d`` with ``training=True`` and ``p > 0``, which
  covers ``nn.Dropout`` modules and functional dropout alike) replaced by ``input * mask``, where ``mask`` is
  the same function applied to ones of the input's shape, strides and recorded training dtype on the recorded
  device: that consumes the generator exactly as training's call did, so ``mask`` is training's mask (scaled by
  ``1/(1-p)``). Every later evaluation for that update then applies the captured masks as constants
  (:func:`masks_applied`; per sample under ``vmap``, sample ``k`` gets row ``k`` of each mask), so per-sample
  gradients are the derivatives of exactly the loss the optimizer differentiated. Outside
  :func:`masks_applied` / :func:`draw_masks` a model with :func:`install` applies no dropout at all (queries are
  deterministic).

Randomness that is not such a dropout call (attention dropout inside ``F.scaled_dot_product_attention``,
``torch.rand`` masks, noise injection) is missing from the recomputation; :func:`check_loss` notices it by
comparing the recomputed training loss of an update with the recorded one (:class:`DropoutReplayError`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .storage import StoreError

# dropout calls whose random mask is regenerated and applied (mask = f(ones) exactly, since f(x) = x * mask)
_MASKED = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
# random calls that are not a multiplicative mask: refused by name when they draw in a recorded forward
_REFUSED = (F.alpha_dropout, F.feature_alpha_dropout)

# the relative difference between the recorded and the recomputed training loss of an update beyond which the
# recomputation is not the training forward (float32 losses agree to ~1e-6; missing dropout changes them by O(p))
LOSS_TOL = 1e-4

# the default generators are process-wide: two threads drawing masks at once would draw from each other's states
_GENERATOR_LOCK = threading.Lock()

FIX = (
    "Exact decompositions reproduce dropout through torch.nn.functional.dropout (nn.Dropout modules, or "
    "F.dropout(x, p, self.training) calls); other randomness in the forward cannot be reproduced. Use nn.Dropout "
    "(or F.dropout) for every random mask; for Hugging Face models, train with attn_implementation='eager' or "
    "attention dropout 0 (attn_pdrop=0.0 / attention_dropout=0.0: fused attention draws its masks inside the "
    "kernel); or train without the random op (eval mode, p=0)."
)


class DropoutReplayError(StoreError):
    """The recorded training forward's randomness cannot be reproduced; the message says why and what to do."""


@dataclass(frozen=True)
class RngRecord:
    """One update's generator states: ``states[m]`` (uint8 bytes) at the start of micro-batch ``m``'s forward, whose
    samples are the next ``sizes[m]`` entries of the update's batch."""

    states: np.ndarray  # (micro, bytes) uint8
    sizes: tuple[int, ...]


def generator_device(model: nn.Module) -> torch.device:
    """The device whose default generator the model's training forward draws from (its first parameter's)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def rng_state(device: torch.device | str) -> np.ndarray:
    """The default generator state of ``device`` as uint8 bytes (``torch.get_rng_state`` or the CUDA one)."""
    return state_reader(device)().numpy().copy()


def state_reader(device: torch.device | str) -> Callable[[], torch.Tensor]:
    """A function returning a fresh copy of ``device``'s default generator state (a uint8 CPU tensor), for code
    that reads it at every forward (the recorder): the device is resolved once, not per call. Refused (when
    called) for devices whose generator the store cannot keep."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.get_rng_state(device)
    if device.type == "cpu":
        return torch.get_rng_state

    def refuse() -> torch.Tensor:
        raise DropoutReplayError(
            f"a random training forward on {device.type} cannot be recorded (only the CPU and CUDA generators are "
            "kept); train on the CPU or a CUDA GPU, or without dropout"
        )

    return refuse


@contextlib.contextmanager
def generator_at(state: np.ndarray, device: torch.device | str) -> Iterator[None]:
    """Run the block with ``device``'s default generator set to ``state``; the caller's generator state is restored
    afterwards (so reading a store never changes the random numbers of the program that reads it)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DropoutReplayError(
            "this run drew its dropout masks on a CUDA GPU, and they are regenerated from the recorded generator "
            "state on the same kind of device: open the store on a machine with a CUDA GPU"
        )
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        t = torch.from_numpy(np.ascontiguousarray(state, dtype=np.uint8))
        try:
            if device.type == "cuda":
                torch.cuda.set_rng_state(t, device)
            else:
                torch.set_rng_state(t)
        except RuntimeError as exc:
            raise DropoutReplayError(
                f"the recorded generator state ({t.numel()} bytes) is not a {device.type} generator state: the store "
                f"was damaged or recorded on another kind of device ({exc})"
            ) from None
        yield


def _dropout_args(func: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, float, bool]:
    x = args[0] if args else kwargs["input"]
    p = float(kwargs.get("p", args[1] if len(args) > 1 else 0.5))
    training = bool(kwargs.get("training", args[2] if len(args) > 2 else True))
    return x, p, training


class _State(threading.local):
    """Per thread (the engine evaluates two updates at once in two threads): what dropout calls do now."""

    def __init__(self) -> None:
        self.kind: str | None = None  # None: no dropout; "draw"; "apply"
        self.masks: list[torch.Tensor] = []
        self.i = 0
        self.draw: tuple[torch.device, torch.dtype, int] | None = None
        self.calls: list[tuple[Any, tuple[int, ...], tuple[int, ...], float]] = []  # draw: (func, shape, stride, p)


class _Mode(TorchFunctionMode):
    def __init__(self, ctl: DropoutControl) -> None:
        super().__init__()
        self.ctl = ctl

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MASKED:
            x, p, training = _dropout_args(func, args, kwargs)
            if training and p > 0:
                return self.ctl._dropout(func, x, p)
        elif func in _REFUSED:
            x, p, training = _dropout_args(func, args, kwargs)
            if training and p > 0:
                raise DropoutReplayError(
                    f"the model calls {func.__name__} in train mode, whose random output is not a mask times the "
                    f"input, so its randomness cannot be replayed in the decomposition. {FIX}"
                )
        return func(*args, **kwargs)


class DropoutControl:
    """Installed on a reader's model (:func:`install`): every dropout call of its forward is off, drawing masks
    (:func:`draw_masks`) or applying given masks (:func:`masks_applied`), per thread."""

    def __init__(self, model: nn.Module) -> None:
        self.state = _State()
        self._modes: threading.local = threading.local()
        self.handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def __deepcopy__(self, memo: dict[int, Any]) -> DropoutControl:
        """The control of a deep copy of the model (whose hooks are copied with it and call this copy): the same
        behaviour with fresh per-thread state (a ``threading.local`` cannot be copied)."""
        new = DropoutControl.__new__(DropoutControl)
        memo[id(self)] = new
        new.state = _State()
        new._modes = threading.local()
        new.handles = []
        return new

    def _enter(self, module: nn.Module, args: Any) -> None:
        stack = getattr(self._modes, "stack", None)
        if stack is None:
            stack = self._modes.stack = []
        mode = _Mode(self)
        mode.__enter__()
        stack.append(mode)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = getattr(self._modes, "stack", None)
        if stack:
            stack.pop().__exit__(None, None, None)

    def _dropout(self, func: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        st = self.state
        if st.kind is None:
            return x  # outside a training-loss evaluation: deterministic (queries, checks)
        if st.kind == "draw":
            assert st.draw is not None
            device, dtype, n = st.draw
            if x.ndim == 0 or x.shape[0] != n:
                raise DropoutReplayError(
                    f"a dropout input of shape {tuple(x.shape)} does not have the micro-batch ({n} samples) as its "
                    "first dimension, so its mask cannot be split per sample; apply dropout to activations whose "
                    "first dimension is the batch"
                )
            ones = torch.ones_like(x, dtype=dtype, device=device)  # strides too: the generator fills memory order
            mask = func(ones, p=p, training=True)
            st.masks.append(mask)
            st.calls.append((func, tuple(ones.shape), tuple(ones.stride()), p))
            return x * mask.to(device=x.device, dtype=x.dtype)
        if st.i >= len(st.masks):
            raise DropoutReplayError(
                f"the forward calls dropout more often ({st.i + 1}) than when its masks were drawn "
                f"({len(st.masks)}): the model's forward is not the same function of its input each time"
            )
        mask = st.masks[st.i]
        st.i += 1
        if tuple(mask.shape) != tuple(x.shape):
            raise DropoutReplayError(
                f"dropout mask {st.i} has shape {tuple(mask.shape)} but the forward's input there has shape "
                f"{tuple(x.shape)}: the model's forward is not the same function of its input each time"
            )
        return x * mask.to(x.dtype)


def install(model: nn.Module) -> DropoutControl:
    """Put a :class:`DropoutControl` on ``model`` (once): its dropout calls are off until masks are drawn or applied."""
    ctl = getattr(model, "_explaind_dropout", None)
    if isinstance(ctl, DropoutControl):
        return ctl
    ctl = DropoutControl(model)
    object.__setattr__(model, "_explaind_dropout", ctl)
    return ctl


def control(model: nn.Module) -> DropoutControl | None:
    """The :class:`DropoutControl` installed on ``model``, if any."""
    ctl = getattr(model, "_explaind_dropout", None)
    return ctl if isinstance(ctl, DropoutControl) else None


@contextlib.contextmanager
def masks_applied(model: nn.Module, masks: Sequence[torch.Tensor] | None) -> Iterator[None]:
    """Within the block, the forwards of ``model`` apply ``masks`` (in call order) at its dropout calls; ``None``:
    nothing changes. Use around one forward (the count restarts at each entry)."""
    if masks is None:
        yield
        return
    ctl = control(model)
    if ctl is None:
        raise DropoutReplayError("masks were given for a model without dropout.install(model)")
    st = ctl.state
    saved = (st.kind, st.masks, st.i, st.draw)
    st.kind, st.masks, st.i, st.draw = "apply", list(masks), 0, None
    try:
        yield
        if st.i != len(st.masks):
            raise DropoutReplayError(
                f"the forward called dropout {st.i} times, but {len(st.masks)} masks were drawn for it: the model's "
                "forward is not the same function of its input each time"
            )
    finally:
        st.kind, st.masks, st.i, st.draw = saved


def draw_masks(
    model: nn.Module,
    forward: Callable[[slice], torch.Tensor],
    rec: RngRecord,
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One update's dropout masks, regenerated from its recorded generator states.

    ``forward(sl)`` runs ``model`` on the samples ``sl`` of the update's batch (micro-batch ``m`` holds the next
    ``rec.sizes[m]``); each micro-batch's forward runs with the generator of ``device`` at its recorded state and
    draws its masks in ``dtype`` (the training dtype). Returns the masks of the whole batch (each micro-batch's
    concatenated along the batch dimension, in call order) and the concatenated outputs of those forwards (with
    the masks applied: the training forward, for :func:`check_loss`).

    Raises :class:`DropoutReplayError` when a forward draws random numbers outside dropout calls (the generator
    moves further than the masks alone move it): those would differ at every later evaluation."""
    ctl = control(model)
    if ctl is None:
        raise DropoutReplayError("dropout.install(model) must come before draw_masks")
    st = ctl.state
    per_micro: list[list[torch.Tensor]] = []
    outs: list[torch.Tensor] = []
    start = 0
    saved = (st.kind, st.masks, st.i, st.draw, st.calls)
    try:
        for m, n in enumerate(rec.sizes):
            st.kind, st.masks, st.i, st.draw, st.calls = "draw", [], 0, (torch.device(device), dtype, int(n)), []
            with _GENERATOR_LOCK, torch.no_grad():
                with generator_at(rec.states[m], device):
                    outs.append(forward(slice(start, start + n)))
                    after = rng_state(device)
                with generator_at(rec.states[m], device):  # the masks alone, drawn again
                    for func, shape, stride, p in st.calls:
                        ones = torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(1)
                        func(ones, p=p, training=True)
                    masks_only = rng_state(device)
            if not np.array_equal(after, masks_only):
                raise DropoutReplayError(
                    "the training forward draws random numbers outside torch.nn.functional.dropout calls (the "
                    "generator moves further than its dropout masks move it: e.g. torch.rand / torch.bernoulli masks, "
                    "noise added to activations, attention dropout inside a fused kernel), so the decomposition "
                    f"cannot reproduce the loss the optimizer differentiated. {FIX}"
                )
            per_micro.append(st.masks)
            start += n
    finally:
        st.kind, st.masks, st.i, st.draw, st.calls = saved
    counts = {len(ms) for ms in per_micro}
    if len(counts) > 1:
        raise DropoutReplayError(
            f"the micro-batches of one update called dropout different numbers of times ({sorted(counts)}): the "
            "model's forward is not the same function of its input each time"
        )
    masks = [torch.cat([ms[i] for ms in per_micro]) for i in range(counts.pop() if counts else 0)]
    return masks, torch.cat(outs) if len(outs) > 1 else outs[0]


def check_loss(update: int, recorded: float, recomputed: float) -> None:
    """Raise :class:`DropoutReplayError` when update ``update``'s training loss recomputed with the regenerated
    masks is not the one recorded (NaN: not recorded, nothing to compare)."""
    if recorded != recorded:
        return
    if abs(recomputed - recorded) <= LOSS_TOL * max(abs(recorded), abs(recomputed), 1e-12):
        return
    raise DropoutReplayError(
        f"update {update}: the training loss recomputed from the recorded batch with the dropout masks regenerated "
        f"from the recorded generator state is {recomputed:.9g}, but training reported {recorded:.9g} "
        f"(relative difference {abs(recomputed - recorded) / max(abs(recorded), 1e-300):.2g}). The training forward "
        "drew random numbers that are not dropout calls, so the decomposition would not be of the run that was "
        f"trained. {FIX} (If the loss passed to record() is not the update's batch-mean training loss, pass that, "
        "or none.)"
    )
