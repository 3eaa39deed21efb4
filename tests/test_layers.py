"""The layout's rules: the store never imports the engine, no import runs from a lower layer to a higher one, and no
two files import each other (directly or round a circle).

Layers, lowest first: ``explaind_store``; ``engine.settings`` and ``engine.result``; ``engine.ops``; ``engine.plan``;
``engine.scan``; ``engine.cluster``; ``engine.api``, ``engine.topk``, ``engine.guard`` and the ``engine`` package;
``explaind_app``; ``experiments``.
Every import counts, at module level or inside a function, except those under ``if TYPE_CHECKING:`` (annotations
only, never executed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("explaind_store", "engine", "explaind_app", "experiments")
LAYERS = (
    ("explaind_store",),
    ("engine.settings", "engine.result", "engine.progress"),
    ("engine.ops",),
    ("engine.plan",),
    ("engine.scan",),
    ("engine.cluster",),
    ("engine.api", "engine.topk", "engine.guard", "engine"),  # engine.guard: the exactness check (branch exact)
    ("explaind_app",),
    ("experiments",),  # the paper's experiments use everything; nothing imports them
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub`` when that is a module)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    full = f"{base}.{a.name}"
                    found.add(full if full in modules else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def _layer(name: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{name} is in no layer: add it to LAYERS"
    return rank


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_runs_up_a_layer():
    graph = _graph()
    assert "engine.scan.backward" in graph and "explaind_app.cli" in graph  # the walk found the rooms
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if _layer(b) > _layer(a))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    # a module's package __init__ is imported with it: edges into a package's own __init__ from inside are fine
    edges = {a: {b for b in deps if not a.startswith(b + ".")} for a, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    assert not circles, f"import circles: {circles}"


def test_store_commands_never_import_the_engine(tmp_path):
    """Importing the store and running ``explaind record | info | verify`` through the store's own command line
    leaves the engine (and the application) out of ``sys.modules``."""
    store = tmp_path / "run.zarr"
    script = f"""
import sys
import explaind_store
from explaind_store.cli import main
assert main(["record", "modadd", "--out", {str(store)!r}, "--steps", "3", "--p", "5", "--quiet"]) == 0
assert main(["info", {str(store)!r}, "--json"]) == 0
assert main(["verify", {str(store)!r}, "--json"]) == 0
import explaind_store.examples, explaind_store.trajectory, explaind_store.verify, explaind_store.info
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("engine", "explaind_app"))
print("LOADED", loaded)
sys.exit(1 if loaded else 0)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LOADED []" in r.stdout
