"""``run.verify()`` / ``explaind verify``: is this record exact enough to decompose?

1. Replay: rebuild theta_s from theta_{s-1} and the recorded optimizer state; report the residual against the stored
   theta_s (relative to the size of the update).
2. Batches: recompute the batch-mean gradient at theta_{s-1} from the stored batch and data (float64) and compare it
   with the gradient the recorded optimizer-state change implies. A wrong batch record fails this.
3. Chunks: every chunk file the metadata says must exist is there (a listing, no decoding: a missing file would read
   as fill values), and decode every chunk of every array; chunks failing their CRC32C checksum are listed by array
   and index. Stored data splits are compared with the sha256 fingerprint recorded at creation.
Also flags non-finite parameters.

A run with sparse checkpoints is read segment by segment: the steps after each checkpoint are replayed from it
(explaind_store.replay), and at the next checkpoint the replayed parameters are compared with the stored ones; that
difference is reported per checkpoint (``checkpoint_replay``), relative to how far the parameters moved over the
segment. One torch thread replays training bit for bit (0); other thread counts differ in the last bits; a wrong
record (batches, lr, state, a changed checkpoint) misses by far more.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from . import storage
from . import dropout
from . import integrity
from . import modes
from . import optim as optim_mod
from . import schema
from .specs import FactorySpecError, UntrustedFactoryError, batch_loss

if TYPE_CHECKING:
    from .reader import Run

REPLAY_TOL = 1e-3  # relative to the update size; float32 training gives ~1e-6, a wrong state O(1)
GRADIENT_TOL = 1e-3  # relative gradient mismatch; float32 training gives ~1e-6, a wrong batch O(0.1..1)


@dataclass
class VerifyReport:
    path: str
    updates: int
    checked_updates: int = 0
    replay_max_residual: float = 0.0  # max |replayed - stored theta_s| / max|dtheta_s|
    replay_worst_update: int | None = None
    replay_excess: float = 0.0  # max error / (REPLAY_TOL * update + 8 ulps of the parameters); > 1 fails
    gradient_max_rel_error: float | None = None
    gradient_worst_update: int | None = None
    gradient_checked: bool = False
    # sparse checkpoints: per checkpoint c > 0, {"step", "max_abs", "relative", "excess"}: stored theta_c against
    # theta_c replayed from the checkpoint before it ("relative": to the movement over that segment)
    checkpoint_replay: list[dict[str, Any]] = field(default_factory=list)
    chunks_checked: int = 0
    bad_chunks: list[dict[str, Any]] = field(default_factory=list)
    missing_chunks: list[dict[str, Any]] = field(default_factory=list)
    data_checksums: dict[str, str] = field(default_factory=dict)  # split -> "ok" | "mismatch" | "by reference" | ...
    nonfinite_updates: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        def fmt_num(x: float | None) -> str:
            return "-" if x is None else f"{x:.3e}"

        rows = [
            ("store", self.path, ""),
            ("committed updates", str(self.updates), ""),
            ("updates checked", str(self.checked_updates), ""),
            (
                "replay residual (rel. to update)",
                fmt_num(self.replay_max_residual),
                "ok" if self.replay_excess <= 1 else "FAIL",
            ),
            (
                "batch gradient rel. error",
                fmt_num(self.gradient_max_rel_error) if self.gradient_checked else "skipped",
                "" if not self.gradient_checked else (
                    "ok" if (self.gradient_max_rel_error or 0) <= GRADIENT_TOL else "FAIL"),
            ),
            *([(
                "checkpoint replay (rel. to segment)",
                fmt_num(max((c["relative"] for c in self.checkpoint_replay), default=0.0)),
                "ok" if all(c["excess"] <= 1 for c in self.checkpoint_replay) else "FAIL",
            )] if self.checkpoint_replay else []),
            ("missing chunks", str(len(self.missing_chunks)), "ok" if not self.missing_chunks else "FAIL"),
            (
                "data checksums",
                ", ".join(f"{k} {v}" for k, v in self.data_checksums.items()) or "skipped",
                "" if not self.data_checksums else (
                    "FAIL" if any(v in ("mismatch", "missing chunks", "refused") for v in self.data_checksums.values())
                    else "ok"),
            ),
            ("chunks checked", str(self.chunks_checked), "ok" if not self.bad_chunks else "FAIL"),
            ("non-finite updates", str(self.nonfinite_updates[:10] or "none"), "ok" if not self.nonfinite_updates else "FAIL"),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        for mc in self.missing_chunks[:20]:
            what = "steps" if mc["axis"] == schema.STEP else "rows"
            lines.append(f"  missing chunk: {mc['array']} chunk {mc['chunk']} ({what} {mc['first']}..{mc['last']})")
        for c in self.checkpoint_replay[:20]:
            lines.append(f"  checkpoint {c['step']}: replayed - stored max |{c['max_abs']:.3e}|, "
                         f"{c['relative']:.3e} of the segment's movement")
        for bc in self.bad_chunks[:20]:
            lines.append(f"  bad chunk: {bc['array']} chunk {bc['chunk']} ({bc['error']})")
        lines.extend(f"warning: {w}" for w in self.warnings)
        lines.append("RESULT: " + ("OK" if self.ok else "FAILED\n  - " + "\n  - ".join(self.problems)))
        return "\n".join(lines)


def _chunk_indices(arr: zarr.Array) -> list[tuple[int, ...]]:
    grid = [range(math.ceil(s / c)) if s else range(0) for s, c in zip(arr.shape, arr.chunks)]
    return list(itertools.product(*grid))


def check_chunks(run: Run, progress: bool = False) -> tuple[int, list[dict[str, Any]]]:
    """Decode every chunk; return (number checked, bad chunks with array path, chunk index and error)."""
    bad: list[dict[str, Any]] = []
    arrays = list(integrity.walk_arrays(run.root))
    checked = 0
    for path, arr in tqdm(arrays, desc="chunks", disable=not progress, leave=False):
        for idx in _chunk_indices(arr):
            sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape))
            checked += 1
            try:
                arr[sl]
            except Exception as exc:  # noqa: BLE001 - any decode failure is a bad chunk
                bad.append({"array": path, "chunk": list(idx), "error": f"{type(exc).__name__}: {exc}"[:200]})
    return checked, bad


def verify(
    run: Run,
    *,
    gradients: bool = True,
    chunks: bool = True,
    max_updates: int | None = None,
    progress: bool = False,
    steps: tuple[int, int] | None = None,
    checkpoints: bool = True,
) -> VerifyReport:
    """Run the three checks; ``max_updates`` checks that many evenly spaced updates instead of all.

    The missing-chunk check (a listing) always runs; ``chunks`` adds decoding every chunk and the data checksums.
    ``steps=(a, b)`` limits the missing-chunk check of step arrays and the replay to the window ``(a, b]``.
    ``checkpoints=False`` skips the replay of a run with sparse checkpoints (its steps between checkpoints are
    replayed, so only the comparison at checkpoints tells anything; the engine reports that as its replay
    residual). With ``max_updates`` only the segments holding the sampled updates are replayed.
    """
    t = run.committed_updates
    rep = VerifyReport(path=str(run.path), updates=t, nonfinite_updates=run.nonfinite_updates)
    if rep.nonfinite_updates:
        rep.problems.append(
            f"parameters are NaN/inf after update(s) {rep.nonfinite_updates[:10]}: training diverged there; "
            "decompose a window before it (steps=slice(0, first_bad - 1))"
        )
    missing = integrity.missing_chunks(run, steps=steps)
    rep.missing_chunks = [m.to_dict() for m in missing]
    if missing:
        rep.problems.append(integrity.describe_missing(run, missing))
    if chunks:
        rep.data_checksums = _check_data(run, {m.array for m in missing}, rep.problems)
    if missing:
        return rep  # the numeric checks would read fill values (or stop at the first missing chunk)
    if chunks:
        rep.chunks_checked, rep.bad_chunks = check_chunks(run, progress)
        if rep.bad_chunks:
            rep.problems.append(
                f"{len(rep.bad_chunks)} chunk(s) fail their checksum or cannot be decoded (listed above); the store "
                "is damaged there: re-record, or restrict analysis to the steps before the first bad chunk"
            )
            return rep  # the numeric checks would only repeat the decode errors
    if t == 0 or (run.sparse and not checkpoints):
        return rep
    a, b = (0, t) if steps is None else steps
    updates = list(range(a + 1, b + 1))
    if max_updates is not None and max_updates < len(updates):
        updates = sorted({int(round(x)) for x in np.linspace(a + 1, b, max_updates)})
    spec = run.optimizer_spec
    group_of = spec.group_of()
    checker = None
    if gradients:
        try:
            checker = GradientChecker(run)
            rep.gradient_checked = True
        except (UntrustedFactoryError, FactorySpecError, integrity.DataChecksumError) as exc:
            # a refused factory is an error, never a quiet skip: the store names code the user has not trusted;
            # so is training data (built from a data spec) that is not what the run was trained on
            rep.problems.append(
                f"the model or its training data could not be rebuilt for the batch-gradient check: {exc} (or skip "
                "that check with "
                "--no-gradients / gradients=False)"
            )
            rep.gradient_checked = False
        except Exception as exc:  # noqa: BLE001 - report why the gradient check could not run
            rep.warnings.append(f"batch-gradient check skipped: {exc}")
            rep.gradient_checked = False
    worst_g = 0.0
    worst_match: GradientMatch | None = None
    k = run.chunk_updates
    todo = set(updates)
    if run.sparse:  # one block per segment: replayed from its checkpoint, compared with the next one
        edges = sorted({a, b, *(int(c) for c in run.checkpoint_steps if a < c < b)})
        bounds = list(zip(edges[:-1], edges[1:]))
    else:
        bounds = [(lo, min(lo + k, b)) for lo in range(a, b, k)]  # inside the window only: damage outside it is not read
    for lo, hi in tqdm(bounds, desc="verify", disable=not progress, leave=False):
        if not todo.intersection(range(lo + 1, hi + 1)):
            continue
        try:
            blk = run.block(lo, hi)
        except (storage.StoreError, UntrustedFactoryError, FactorySpecError) as exc:
            if not run.sparse:
                raise
            rep.problems.append(
                f"the steps between checkpoints could not be replayed (this run stores parameters every "
                f"{run.checkpoint_every} updates, and replay rebuilds the model): {exc}"
            )
            return rep
        if blk.stored_end is not None:
            rep.checkpoint_replay.append(_checkpoint_replay(blk))
        for s in blk.updates:
            if s not in todo:
                continue
            r = s - lo - 1
            n = int(blk.opt_step[r])
            prev, nxt = blk.params_at(s - 1), blk.params_at(s)
            for name in run.tensor_names:
                g = group_of[name]
                hp = spec.groups[g]
                lr, wd = float(blk.lr[r, g]), float(blk.weight_decay[r, g])
                if spec.type == "SGD" and not run.state_names:
                    continue  # plain SGD keeps no state: the update itself is what the gradient check tests
                sp = {sn: blk.state_at(sn, s - 1)[name] for sn in run.state_names}
                sn_ = {sn: blk.state_at(sn, s)[name] for sn in run.state_names}
                replayed = optim_mod.replay_update(spec.type, hp, prev[name], None, sp, sn_, lr, wd, n)
                dtheta = (nxt[name].double() - prev[name].double()).abs().max().item()
                err = (replayed - nxt[name].double()).abs().max().item()
                res = err / max(dtheta, 1e-30)
                # A tiny update cannot be stored more precisely than the parameter's own rounding, so the
                # pass criterion allows a few ulps of the stored values on top of REPLAY_TOL of the update.
                ulps = 8 * torch.finfo(nxt[name].dtype).eps * nxt[name].double().abs().max().item()
                excess = err / (REPLAY_TOL * dtheta + ulps + 1e-300)
                if excess > rep.replay_excess or math.isnan(excess):
                    rep.replay_excess = excess
                if res > rep.replay_max_residual or math.isnan(res):
                    rep.replay_max_residual, rep.replay_worst_update = res, s
            if checker is not None:
                try:
                    match = checker.check(blk, s, lo)
                except dropout.DropoutReplayError as exc:
                    rep.problems.append(str(exc))
                    checker, rep.gradient_checked = None, False
                    rep.checked_updates += 1
                    continue
                if match.rel_error > worst_g or math.isnan(match.rel_error):
                    worst_g, rep.gradient_worst_update, worst_match = match.rel_error, s, match
            rep.checked_updates += 1
    if checker is not None:
        rep.gradient_max_rel_error = worst_g
    if rep.replay_excess > 1 or math.isnan(rep.replay_excess):
        rep.problems.append(
            f"replaying update {rep.replay_worst_update} from the recorded optimizer state misses the stored "
            f"parameters by {rep.replay_max_residual:.2e} of the update size: parameters and optimizer state "
            "disagree (a different optimizer, or state edited outside optimizer.step())"
        )
    bad_ck = [c for c in rep.checkpoint_replay if not c["excess"] <= 1]
    if bad_ck:
        first = bad_ck[0]  # later checkpoints fail too when a wrong one was replayed from
        rep.problems.append(
            f"replaying the updates before checkpoint {first['step']} from the checkpoint before it misses the "
            f"stored parameters by {first['relative']:.2e} of how far they moved ({len(bad_ck)} checkpoint(s) fail): "
            "the per-update records (batches, learning rates, clipping) or a checkpoint do not match what training "
            "did, or the model's forward is not reproducible (randomness other than recorded dropout, changing buffers)"
        )
    if rep.gradient_checked and (worst_g > GRADIENT_TOL or math.isnan(worst_g)):
        rep.problems.append(
            f"update {rep.gradient_worst_update}: the gradient recomputed from the recorded batch differs from the "
            f"one the optimizer used by {worst_g:.2e} (relative, beyond the rounding of the recorded state). The "
            "batch indices, data, loss spec or grad_scale passed to record() do not match what training did "
            "(random augmentation also causes this)."
            + (f" {worst_match.explain()}" if worst_match is not None else "")
        )
    return rep


def _checkpoint_replay(blk: Any) -> dict[str, Any]:
    """Stored against replayed parameters at the checkpoint ``blk.hi`` that ends a replayed block."""
    err = move = ulps = 0.0
    for name, stored in blk.stored_end.items():
        replayed = blk.params[name][-1]
        err = max(err, (stored.double() - replayed.double()).abs().max().item())
        move = max(move, (stored.double() - blk.params[name][0].double()).abs().max().item())
        ulps = max(ulps, 8 * torch.finfo(stored.dtype).eps * stored.double().abs().max().item())
    return {"step": int(blk.hi), "max_abs": err, "relative": err / max(move, 1e-30),
            "excess": err / (REPLAY_TOL * move + ulps + 1e-300)}


def _check_data(run: Run, missing_arrays: set[str], problems: list[str]) -> dict[str, str]:
    """Each stored split against its recorded fingerprint (reading it through ``run.split``, which remembers the
    result); problems are appended to ``problems``."""
    out: dict[str, str] = {}
    for name in run.splits:
        info = run.attrs[schema.ATTR_DATA]["splits"][name]
        if info.get("mode") != "stored":
            if "spec" not in info or name in run._attached:
                out[name] = "by reference"
                continue
            try:  # built through its dataset factory (trusted only) and checked against the fingerprint
                run.split(name)
                out[name] = "ok (from its data spec)"
            except integrity.DataChecksumError as exc:
                out[name] = "mismatch"
                problems.append(str(exc))
            except (UntrustedFactoryError, FactorySpecError) as exc:
                out[name] = "refused"
                problems.append(f"the data of split {name!r} could not be rebuilt: {exc}")
            continue
        if any(p.startswith(schema.data_path(name) + "/") for p in missing_arrays):
            out[name] = "missing chunks"  # already reported by name
            continue
        try:
            run.split(name)
            out[name] = "ok"
        except integrity.DataChecksumError as exc:
            out[name] = "mismatch"
            problems.append(str(exc))
        except storage.StoreError:  # a chunk that cannot be decoded: listed (and failed) by the chunk check
            out[name] = "unreadable"
    return out


@dataclass
class GradientMatch:
    """How the gradient the optimizer used (implied by the recorded state change) compares with the one recomputed
    from the recorded batch, times the recorded ``grad_scale``, at update ``update``."""

    update: int
    rel_error: float  # |implied - recomputed| beyond the state's rounding bound, relative to |recomputed|
    scale: float  # least-squares factor: implied ~ scale * recomputed
    cosine: float
    batch_size: int
    grad_scale: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= GRADIENT_TOL

    def explain(self) -> str:
        """The likely cause, in words."""
        s, b = self.update, self.batch_size
        if self.ok:
            return (
                f"The batch gradient of update {s} matches the optimizer's (relative error {self.rel_error:.1e}), so "
                "batch, loss and clipping were recorded right; the forward pass differs between training and the "
                "rebuilt model instead: BatchNorm running statistics or other buffers that changed during training, "
                "a module trained in another mode, or a model factory that builds a different model."
            )
        head = (f"At update {s} the optimizer used {self.scale:.3g} x the recomputed batch gradient "
                f"(cosine {self.cosine:.3f})")
        if self.cosine > 0.999 and self.scale < 1:
            return (f"{head}: the gradient was scaled down, as gradient clipping does; pass the clipping factor "
                    "to rec.record(batch, grad_scale=min(1, max_norm / norm)).")
        if self.cosine > 0.999 and self.scale > 1:
            near_b = abs(self.scale / b - 1) < 0.05
            return (f"{head}: the gradient was scaled up{f', by the batch size {b}' if near_b else ''}, as a "
                    "sum-reduced loss (reduction='sum') or a multiplied loss does; train with the batch-mean loss.")
        return (f"{head}: they point in different directions, so the recorded batch is not what the optimizer "
                "trained on: wrong batch indices, different data, or a random forward the store cannot regenerate.")


class GradientChecker:
    """The batch-gradient check, one update at a time (``verify`` runs it on every update, ``attribute`` on the
    updates whose residual is large).

    The gradient the optimizer used is recovered from the recorded state change and compared with the batch
    gradient recomputed from the stored batch and data in float64, times the recorded ``grad_scale``. Two kinds of
    rounding are allowed for, element by element, so a clean long run passes: the rounding of the recorded state the
    gradient is recovered from (:func:`optim.implied_gradient_bound`), and the rounding of the training's own
    gradient in its dtype, estimated as ``|g_train_dtype - g_float64|`` of the same recomputation (late in training,
    when a near-zero loss makes the gradient a cancellation of much larger terms, float32 gets it wrong by tens of
    percent; a wrong batch, unrecorded clipping or a sum-reduced loss then only shows where it exceeds that).
    """

    ROUNDING_MARGIN = 4.0  # the training's rounding may differ from this recomputation's (other kernels, order)

    def __init__(self, run: Run) -> None:
        self.run = run
        self.model = modes.apply_modes(run.build_model(), run.attrs.get(schema.ATTR_TRAIN_MODE)).double()
        dtypes = {str(t.get("dtype")) for t in run.tensors}
        coarse = [getattr(torch, d) for d in ("float16", "float32") if d in dtypes]
        self.train_dtype = coarse[0] if coarse else None
        self.model_train = copy.deepcopy(self.model).to(self.train_dtype) if self.train_dtype is not None else None
        self.rng = run.rng_info
        if self.rng is not None:  # dropout: masks regenerated from the recorded generator states, as constants
            dropout.install(self.model)
            if self.model_train is not None:
                dropout.install(self.model_train)
        self.x, self.y = run.split(schema.TRAIN_SPLIT)
        self.spec = run.optimizer_spec
        self.group_of = self.spec.group_of()

    def _masks(
        self, blk: Any, r: int, s: int, prev: dict[str, torch.Tensor], batch: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """Update ``s``'s dropout masks regenerated from its recorded generator states (None: it drew none); raises
        :class:`~explaind_store.dropout.DropoutReplayError` when they do not give the recorded training loss."""
        rec = None if blk.rng is None else blk.rng[r]
        if rec is None or self.rng is None:
            return None
        ps = {k: v.to(torch.float64) for k, v in prev.items()}
        xb = self.x[batch]
        xb = xb.double() if xb.is_floating_point() else xb
        yb = self.y[batch]
        yb = yb.double() if yb.is_floating_point() else yb
        masks, out = dropout.draw_masks(
            self.model, lambda sl: torch.func.functional_call(self.model, ps, (xb[sl],)), rec, self.rng["device"],
            getattr(torch, self.rng["dtype"]),
        )
        if blk.loss is not None:
            dropout.check_loss(s, float(blk.loss[r]), float(batch_loss(self.run.loss, out, yb)))
        return masks

    def update(self, s: int) -> GradientMatch:
        """Check update ``s`` alone (reads one update of the store)."""
        return self.check(self.run.block(s - 1, s), s, s - 1)

    def check(self, blk: Any, s: int, lo: int) -> GradientMatch:
        """Check update ``s`` of a block that holds updates ``lo+1..``."""
        run, spec = self.run, self.spec
        r = s - lo - 1
        n = int(blk.opt_step[r])
        prev, nxt = blk.params_at(s - 1), blk.params_at(s)
        scale = float(blk.grad_scale[r])
        batch = blk.batches[r]
        masks = self._masks(blk, r, s, prev, batch)
        grads = _batch_gradient(self.model, run, prev, self.x, self.y, batch, torch.float64, masks)
        coarse = (
            _batch_gradient(self.model_train, run, prev, self.x, self.y, batch, self.train_dtype, masks)
            if self.model_train is not None else None
        )
        over = ref = dot = imp = 0.0
        for name in run.tensor_names:
            g = self.group_of[name]
            hp = spec.groups[g]
            lr, wd = float(blk.lr[r, g]), float(blk.weight_decay[r, g])
            sp = {sn: blk.state_at(sn, s - 1)[name] for sn in run.state_names}
            sn_ = {sn: blk.state_at(sn, s)[name] for sn in run.state_names}
            implied = optim_mod.implied_gradient(spec.type, hp, prev[name], nxt[name], sp, sn_, lr, wd, n)
            bound = optim_mod.implied_gradient_bound(spec.type, hp, prev[name], nxt[name], sp, sn_, lr, n)
            want = scale * grads[name]
            if coarse is not None:
                err = (coarse[name].double() - grads[name]).abs() * abs(scale)
                bound = bound + self.ROUNDING_MARGIN * (err + err.pow(2).mean().sqrt())
            # only the part of the difference beyond the rounding of state and training gradient is a mismatch
            over += float(((implied - want).abs() - bound).clamp(min=0).pow(2).sum())
            ref += float(want.pow(2).sum())
            dot += float((implied * want).sum())
            imp += float(implied.pow(2).sum())
        return GradientMatch(
            update=s,
            rel_error=math.sqrt(over / max(ref, 1e-300)),
            scale=dot / max(ref, 1e-300),
            cosine=dot / max(math.sqrt(ref * imp), 1e-300),
            batch_size=len(batch),
            grad_scale=scale,
        )


def _batch_gradient(
    model: torch.nn.Module,
    run: Run,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch: torch.Tensor,
    dtype: torch.dtype,
    masks: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The batch-mean loss gradient at ``params``, computed in ``dtype`` (``model`` must be in that dtype), with
    the update's dropout ``masks`` applied (runs with dropout)."""
    ps = {k: v.detach().to(dtype, copy=True).requires_grad_(True) for k, v in params.items()}
    xb = x[batch]
    xb = xb.to(dtype) if xb.is_floating_point() else xb
    yb = y[batch]
    yb = yb.to(dtype) if yb.is_floating_point() else yb
    with dropout.masks_applied(model, masks):
        out = torch.func.functional_call(model, ps, (xb,))
    loss = batch_loss(run.loss, out, yb)
    grads = torch.autograd.grad(loss, list(ps.values()))
    return dict(zip(ps.keys(), grads))
