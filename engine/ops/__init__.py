"""The per-update math, on tensors: path integrals of the query Jacobian (:mod:`~engine.ops.quadrature`, with the
kink search of :mod:`~engine.ops.kinks`), the optimizers' coefficients (:mod:`~engine.ops.optim_terms`), per-sample
dot products (:mod:`~engine.ops.persample`) and the query output modes (:mod:`~engine.ops.output_modes`)."""

from engine.ops.lean_functorch import install as _lean_functorch

_lean_functorch()  # before any torch.func reverse pass: no Dynamo import (lean_functorch's docstring)
