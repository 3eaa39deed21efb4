"""A fresh process's first synchronous attribution loads no more than it needs: neither ``torch._dynamo`` (the
``torch.func`` reverse passes, :mod:`engine.ops.lean_functorch`), ``sympy`` (the cross-entropy under ``vmap``,
cotangent shape checks) nor ``distributed`` (dask resolving a scheduler name): together over a second of a short
window's fixed cost (docs/benchmarks.md, issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from engine.api import attribute
ds = attribute({store!r}, queries="val[:2]", by=("sample", "step", "tensor"), steps=(0, 2), client="sync",
               progress=False)
assert ds["data"].shape[0] == 2
print("LOADED", sorted(m for m in ("torch._dynamo", "sympy", "distributed") if m in sys.modules))
"""


def test_first_sync_call_imports_neither_dynamo_sympy_nor_distributed(modadd_store: Path) -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(store=str(modadd_store))], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LOADED []" in r.stdout, r.stdout
