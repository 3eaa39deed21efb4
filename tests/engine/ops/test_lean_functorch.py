"""The engine's reverse passes import neither ``torch._dynamo`` nor ``sympy`` (a fresh process's fixed cost), and
give the same gradients as torch's own ``torch.func`` before and after Dynamo is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# In a fresh interpreter: per-sample gradients of the cross-entropy (vmap of grad), a per-sample path integral
# (jacrev under vmap: cotangents) and torch.func.grad, through the engine; then the same with Dynamo loaded (torch's
# own function runs) must agree bit for bit. sympy came with F.cross_entropy under vmap (torch's nll_loss
# decomposition) and with torch.autograd.grad's check of cotangent shapes.
SCRIPT = """
import sys
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from engine.ops.persample import sample_grads
from engine.ops.quadrature import SampleQuery, path_integral

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
p0 = {k: v.detach() for k, v in net.named_parameters()}
dp = {k: 0.1 * torch.randn_like(v) for k, v in p0.items()}
x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
q = SampleQuery(lambda p, xb: functional_call(net, p, (xb,)), x[:3])

def run():
    g = dict(list(sample_grads(net, p0, x, y, {"kind": "cross_entropy"}))[0][1])
    phi = path_integral(q, p0, dp).phi
    h = grad(lambda p: functional_call(net, p, (x,)).pow(2).sum())(p0)
    return g, phi, h

lean = run()
print("DYNAMO_AFTER_ENGINE", "torch._dynamo" in sys.modules)
print("SYMPY_AFTER_ENGINE", "sympy" in sys.modules)
import torch._dynamo  # noqa: F401  (from here on torch's own function runs)
again = run()
same = all(torch.equal(a[k], b[k]) for a, b in zip(lean, again) for k in a)
print("SAME", same)
"""


def test_reverse_passes_import_neither_dynamo_nor_sympy_and_match_torch() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DYNAMO_AFTER_ENGINE False" in r.stdout, r.stdout
    assert "SYMPY_AFTER_ENGINE False" in r.stdout, r.stdout
    assert "SAME True" in r.stdout, r.stdout
