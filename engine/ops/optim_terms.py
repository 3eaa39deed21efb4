"""Per-optimizer coefficients of the decomposition, for torch's AdamW, Adam (coupled L2) and SGD.

All three update rules share one linear form per parameter tensor (see docs/math.md; ``s`` is an update of the
window ``(a, b]``, ``x_i`` a gradient-like input of update ``i``: the clipped batch-mean gradient ``gs_i g_i`` or,
for coupled decay, ``lam_i theta_{i-1}``)::

    A_s  = beta * A_{s-1} + omega_s * x_s                    (the optimizer's momentum buffer, without m_a / buf_a)
    part_s = -k_s * (e * x_s + h * A_s)                      (movement of update s caused by the inputs)
    carried_s = -k_s * h * beta^(s-a) * S_a                  (movement caused by the momentum stored at a)

with ``u_s = k_s * phi_s``. Swapping the sums over ``s`` and ``i`` gives the reverse accumulator
``U_i = sum_{s>=i} beta^(s-i) u_s`` and the coefficient vector of input ``i``::

    V_i = e * u_i + h * omega_i * U_i      so that   sum_s <phi_s, part_s> = -sum_i <V_i, x_i>

==========  ============================  ==================  =====  =======  ===============================
optimizer   k_s (elementwise)             omega_s             e      h        beta / S_a
==========  ============================  ==================  =====  =======  ===============================
AdamW/Adam  a_s / (1-b1^n_s) / D_s        1 - b1              0      1        b1 / exp_avg at a
SGD         a_s                           1 if n_s == 1       0      1        mu / momentum_buffer at a
                                          else 1 - dampening
nesterov    a_s                           as SGD              1      mu       mu / momentum_buffer at a
plain SGD   a_s                           1                   0      1        0 / none
==========  ============================  ==================  =====  =======  ===============================

``D_s = sqrt(v_s / (1 - b2^n_s)) + eps`` from the stored ``exp_avg_sq`` at ``s``; ``n_s`` is torch's own step counter
(``TrajectoryBlock.opt_step``). AdamW's decay is decoupled and local: ``wd_s = -a_s lam_s theta_{s-1}``, not part of
the recursion. Adam and SGD add ``lam_s theta_{s-1}`` to the gradient, so their decay runs through ``V``.

The coefficients are the ones torch *applied*: a Python scalar such as AdamW's decay factor ``1 - a_s lam_s`` or the
step size ``a_s / (1 - b1^n_s)`` enters a float32 kernel rounded to float32, and ``D_s`` is computed by the same
tensor ops in the state's own dtype. For a run trained in float32 this matters: the decay factor 0.996 rounded to
float32 is off by 8e-9 relative, the same way at every update and for every element, so taking the float64 value
left a systematic rounding residual that grew with the run (3.3e-5 of the 3.4e-5 on the d64 benchmark; the whole
rounding residual is 7.6e-6 with the applied coefficients). In float64 every coefficient is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explaind_store import schema
from explaind_store.trajectory import OptimizerSpec, TrajectoryBlock

KINDS = ("AdamW", "Adam", "SGD")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision torch computes an elementwise op in for tensors of ``dtype`` (its ``opmath_type``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def applied_scalar(x: float, dtype: torch.dtype) -> float:
    """``x`` as a float kernel for ``dtype`` tensors sees it: rounded to float32 unless the tensors are float64."""
    return x if opmath_dtype(dtype) == torch.float64 else float(np.float32(x))


def applied_decay(lr: float, lam: float, dtype: torch.dtype) -> float:
    """AdamW's decoupled decay as applied to ``dtype`` parameters: ``1 - c`` for the factor ``c`` of
    ``param.mul_(1 - lr * lam)``, i.e. ``1 - lr * lam`` rounded to float32 for a float32 run (also in torch's foreach
    and fused kernels). Exact in float64: ``1 - c`` is representable for ``c`` in [0.5, 2]."""
    return 1.0 - applied_scalar(1.0 - lr * lam, dtype)


@dataclass(frozen=True)
class TensorTerms:
    """The static coefficients of one parameter tensor (from its parameter group)."""

    group: int
    beta: float  # decay of the momentum recursion: b1 (Adam) or mu (SGD)
    e: float  # weight of the update's own input in its movement (nesterov: 1)
    h: float  # weight of the momentum buffer in the movement (nesterov: mu)
    dampening: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0


class OptimTerms:
    """Coefficients ``k_s``, ``omega_s``, ``beta``, ``e``, ``h`` per tensor and update (see the module docstring)."""

    def __init__(self, spec: OptimizerSpec, names: list[str]):
        if spec.type not in KINDS:
            raise ValueError(f"optimizer {spec.type!r} is not supported by the engine; use one of {', '.join(KINDS)}")
        self.kind = spec.type
        self.decoupled = spec.type == "AdamW"
        self.adam = spec.type in ("AdamW", "Adam")
        group_of = spec.group_of()
        missing = [n for n in names if n not in group_of]
        if missing:
            raise ValueError(f"tensors {missing} are in no optimizer parameter group")
        self.terms: dict[str, TensorTerms] = {}
        for name in names:
            g = group_of[name]
            hp = spec.groups[g]
            for flag in ("amsgrad", "maximize"):
                if hp.get(flag, False):
                    raise ValueError(f"{spec.type}({flag}=True) is not supported by the engine")
            if self.adam:
                b1, b2 = (float(b) for b in hp.get("betas", (0.9, 0.999)))
                self.terms[name] = TensorTerms(g, b1, 0.0, 1.0, beta2=b2, eps=float(hp.get("eps", 1e-8)))
            else:
                mu = float(hp.get("momentum", 0.0))
                d = float(hp.get("dampening", 0.0))
                if hp.get("nesterov", False):
                    self.terms[name] = TensorTerms(g, mu, 1.0, mu, dampening=d)
                else:
                    self.terms[name] = TensorTerms(g, mu, 0.0, 1.0, dampening=d)
        self.names = list(names)

    # --- which stored state is the carried momentum ------------------------------------------------------------
    @property
    def state_name(self) -> str | None:
        """Store group holding ``S_a`` (exp_avg or momentum_buffer), or None (plain SGD)."""
        if self.adam:
            return schema.EXP_AVG
        if any(t.beta != 0.0 for t in self.terms.values()):
            return schema.MOMENTUM_BUFFER
        return None

    # --- per-update scalars ----------------------------------------------------------------------------------------
    def lr(self, block: TrajectoryBlock, s: int, name: str) -> float:
        return float(block.lr[s - block.lo - 1, self.terms[name].group])

    def lam(self, block: TrajectoryBlock, s: int, name: str) -> float:
        return float(block.weight_decay[s - block.lo - 1, self.terms[name].group])

    def grad_scale(self, block: TrajectoryBlock, s: int) -> float:
        return float(block.grad_scale[s - block.lo - 1])

    def n(self, block: TrajectoryBlock, s: int) -> int:
        return int(block.opt_step[s - block.lo - 1])

    def omega(self, block: TrajectoryBlock, s: int, name: str) -> float:
        """Weight of update ``s``'s input in the momentum recursion."""
        t = self.terms[name]
        if self.adam:
            return 1.0 - t.beta
        if t.beta == 0.0 or self.n(block, s) == 1:  # plain SGD, or torch initialised the buffer with clone(g')
            return 1.0
        return 1.0 - t.dampening

    def k(self, block: TrajectoryBlock, s: int, name: str, device: torch.device | str = "cpu") -> float | torch.Tensor:
        """``u_s = k_s * phi_s``: a float (SGD) or a float64 tensor of the parameter's shape (Adam)."""
        a = self.lr(block, s, name)
        dtype = block.params[name].dtype
        if not self.adam:
            return applied_scalar(a, dtype)  # torch: param.add_(d_p, alpha=-lr)
        t = self.terms[name]
        n = self.n(block, s)
        v = block.state[schema.EXP_AVG_SQ][name][s - block.lo].to(device=device)
        bc1 = 1.0 - t.beta**n
        bc2_sqrt = (1.0 - t.beta2**n) ** 0.5
        # torch's own ops in the state's dtype: (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps), then addcdiv_ with
        # value=-lr/bc1; only then float64
        denom = (v.sqrt() / bc2_sqrt).add_(t.eps).to(torch.float64)
        return denom.reciprocal_().mul_(applied_scalar(a / bc1, dtype))

    def coupled_decay(self, block: TrajectoryBlock, s: int, name: str) -> float:
        """``lam_s`` if the decay enters the gradient (Adam, SGD), else 0 (AdamW: use :meth:`decoupled_decay`).
        As applied: torch's ``grad.add(param, alpha=weight_decay)`` rounds it to float32 for a float32 run."""
        return 0.0 if self.decoupled else applied_scalar(self.lam(block, s, name), block.params[name].dtype)

    def decoupled_decay(self, block: TrajectoryBlock, s: int, name: str) -> float:
        """``a_s * lam_s`` for AdamW (``wd_s = -a_s lam_s theta_{s-1}``), else 0.

        Precisely ``1 - c`` for the factor ``c`` torch multiplied the parameters by: ``param.mul_(1 - lr * wd)``
        rounds ``1 - lr * wd`` to float32 for a float32 run (also in the foreach and fused kernels)."""
        if not self.decoupled:
            return 0.0
        return applied_decay(self.lr(block, s, name), self.lam(block, s, name), block.params[name].dtype)
