"""A store from someone else never runs code: every hostile model_spec is refused by ``run.model()``,
``explaind verify`` (non-zero exit) and ``engine.attribute``, before anything it names is imported or called."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.support.compare import MLP_SPEC
from tests.support.store_helpers import train
from torch import nn

import engine
from explaind_store import open_run
from explaind_app.cli import main as cli_main  # the store's commands and the engine's
from explaind_store.specs import (
    BUILTIN_FACTORIES,
    FactorySpecError,
    UntrustedFactoryError,
    load_factory,
    model_spec,
    resolve_factory,
    trust_entry_problem,
)

REFUSED = (UntrustedFactoryError, FactorySpecError)
MODADD = "explaind_store.examples.modadd"
TINY = "explaind_store.examples.tiny"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "r.zarr"
    train(path, 3, kind="sgd", chunk_updates=2, model_spec=MLP_SPEC)
    return path


@pytest.fixture
def hostile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path holding modules that leave a marker file when imported or called."""
    marker = tmp_path / "PWNED"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef make(**kw):\n    return None\n")
    (tmp_path / "mymodels_evil.py").write_text((tmp_path / "evilmod.py").read_text())
    (tmp_path / "mymodels.py").write_text(textwrap.dedent(f"""
        import os
        import json
        from os import system
        from json import loads
        from torch import nn
        from torch.nn import Linear
        from explaind_store.examples.tiny import make_mlp

        CONST = 3

        def make(hidden=4):
            return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

        alias = make

        class Net(nn.Module):
            def __init__(self, hidden=4):
                super().__init__()
                self.lin = nn.Linear(64, hidden)

            @staticmethod
            def build(**kw):
                open({str(marker)!r}, 'w').close()

        class NotAModule:
            def __init__(self, **kw):
                open({str(marker)!r}, 'w').close()

        def _private(**kw):
            open({str(marker)!r}, 'w').close()

        def outer():
            def inner(**kw):
                open({str(marker)!r}, 'w').close()
            return inner

        def touch(**kw):
            open({str(marker)!r}, 'w').close()
            return 1

        lam = lambda **kw: open({str(marker)!r}, 'w').close()
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("evilmod", "mymodels", "mymodels_evil"):
        sys.modules.pop(mod, None)
    return tmp_path


def _set_spec(store: Path, spec: object) -> None:
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["model_spec"] = spec
    meta.write_text(json.dumps(doc))


def _copy(recorded: Path, tmp_path: Path, spec: object) -> Path:
    dst = tmp_path / "hostile.zarr"
    shutil.copytree(recorded, dst)
    _set_spec(dst, spec)
    return dst


def _system(marker: Path) -> dict[str, str]:
    return {"command": f"touch {marker}"}


# Every factory string here must be refused, whatever the kwargs. Each is written into a real store's zarr.json.
HOSTILE_FACTORIES = [
    # attribute chains after the colon
    f"{MODADD}:torch.os.system",
    f"{MODADD}:math.sqrt",
    f"{MODADD}:nn.Linear",
    f"{TINY}:modadd.make_model",
    # dunder and private names
    f"{MODADD}:__builtins__",
    f"{MODADD}:__import__",
    f"{MODADD}:__class__",
    f"{MODADD}:__loader__",
    f"{MODADD}:_private",
    f"explaind_store.examples.__init__:make_model",
    # module objects and builtins reached through a trusted module
    f"{MODADD}:torch",
    f"{MODADD}:math",
    f"{MODADD}:nn",
    f"{TINY}:modadd",
    f"{MODADD}:print",
    f"{MODADD}:eval",
    f"{MODADD}:exec",
    f"{MODADD}:open",
    # functions and classes of explaind-store that are not model factories (train writes stores, fit trains)
    f"{MODADD}:train",
    f"{MODADD}:model_spec",
    f"{MODADD}:fit",
    f"{MODADD}:activation",
    "explaind_store.examples.digits_cnn:OrderedDict",
    "explaind_store.examples.training:fit",
    "explaind_store.cli:main",
    "explaind_store.recorder:Recorder",
    # the standard library and whole third-party packages
    "os:system",
    "posix:system",
    "builtins:eval",
    "subprocess:run",
    "shutil:rmtree",
    "torch.utils.cpp_extension:load",
    "numpy:load",
    # modules that would run code on import
    "evilmod:make",
    "mymodels_evil:make",
    # unicode look-alikes (Cyrillic a / e, fullwidth colon, fullwidth letters)
    "explaind_store.ex\u0430mples.modadd:make_model",
    f"{MODADD}:make_mod\u0435l",
    f"{MODADD}\uff1amake_model",
    f"{MODADD}:\uff4dake_model",
    # malformed paths and prefix tricks
    "explaind_store.examples..modadd:make_model",
    "explaind_store.examples_evil:make_model",
    ".examples.modadd:make_model",
    "explaind_store/examples/modadd:make_model",
    f"{MODADD}:make_model:x",
    f"{MODADD}",
    f":make_model",
    f"{MODADD}:",
    f" {MODADD}:make_model",
    f"{MODADD}:make_model\n",
    f"{MODADD}:make_model ",
    f"{MODADD}: make_model",
    f"{MODADD}:make_model\x00",
    f"{MODADD}:make_model\x1b[2J",
    # very long strings
    f"{MODADD}:" + "a" * 1_000_000,
    "explaind_store." * 20_000 + "examples.modadd:make_model",
    # not a string
    42,
    True,
    [MODADD, "make_model"],
    {"module": MODADD, "name": "make_model"},
]


@pytest.mark.parametrize("factory", HOSTILE_FACTORIES, ids=lambda f: ascii(f)[:60])
def test_hostile_factory_is_refused_by_model_verify_and_attribute(recorded, hostile_dir, factory, capsys):
    marker = hostile_dir / "PWNED"
    store = _copy(recorded, hostile_dir, {"factory": factory, "kwargs": _system(marker)})
    with pytest.raises(REFUSED):
        open_run(store).model()
    rep = open_run(store).verify(chunks=False, max_updates=1)
    assert not rep.ok and "could not be rebuilt" in rep.problems[0]
    with pytest.raises(REFUSED):
        engine.attribute(store, queries="val[:2]", client="sync", progress=False)
    assert not marker.exists()
    # whatever the message quotes from the store, it is short and printable (no terminal escapes, no megabytes)
    try:
        open_run(store).model()
    except REFUSED as exc:
        assert len(str(exc)) < 1500 and str(exc).isprintable()


@pytest.mark.parametrize(
    "factory", [f"{MODADD}:torch.os.system", "os:system", f"{MODADD}:eval", f"{MODADD}:train"], ids=str
)
def test_explaind_verify_and_attribute_fail_with_nonzero_exit(recorded, hostile_dir, factory, capsys):
    marker = hostile_dir / "PWNED"
    store = _copy(recorded, hostile_dir, {"factory": factory, "kwargs": _system(marker)})
    assert cli_main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "RESULT: FAILED" in out and "RESULT: OK" not in out
    assert cli_main(["attribute", str(store), "--queries", "val[:2]", "--sync", "--quiet"]) == 2
    assert not marker.exists()


def test_the_issue_example_through_a_real_cli_process(recorded, tmp_path):
    marker = tmp_path / "PWNED"
    store = _copy(recorded, tmp_path, {"factory": f"{MODADD}:torch.os.system", "kwargs": _system(marker)})
    proc = subprocess.run([sys.executable, "-m", "explaind_store.cli", "verify", str(store)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "RESULT: FAILED" in proc.stdout, proc.stdout + proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("kwargs", [[1, 2], "hidden=6", 5, True])
def test_kwargs_must_be_a_json_object(recorded, tmp_path, kwargs):
    store = _copy(recorded, tmp_path, {"factory": f"{TINY}:make_mlp", "kwargs": kwargs})
    with pytest.raises(FactorySpecError, match="kwargs must be a JSON object"):
        open_run(store).model()
    assert not open_run(store).verify(chunks=False, max_updates=1).ok
    with pytest.raises(FactorySpecError, match="string keys"):
        resolve_factory({"factory": f"{TINY}:make_mlp", "kwargs": {1: 2}})


@pytest.mark.parametrize("spec", ["explaind_store.examples.tiny:make_mlp", [1], 3])
def test_model_spec_must_be_an_object(recorded, tmp_path, spec):
    store = _copy(recorded, tmp_path, spec)
    with pytest.raises(FactorySpecError, match="model_spec"):
        open_run(store).model()
    assert not open_run(store).verify(chunks=False, max_updates=1).ok


def test_hints_never_suggest_trusting_a_library(recorded, tmp_path):
    for factory in ("os:system", "subprocess:run", "torch:load", f"{MODADD}:torch", "builtins:eval"):
        store = _copy(recorded, tmp_path / factory.replace(":", "_"), {"factory": factory})
        with pytest.raises(UntrustedFactoryError) as info:
            open_run(store).model()
        assert "EXPLAIND_TRUSTED_MODULES=" not in str(info.value), str(info.value)
        assert "damaged or hostile" in str(info.value)
    # a module of the user's own project: the hint names exactly that module
    store = _copy(recorded, tmp_path / "own", {"factory": "mypkg.models:make"})
    with pytest.raises(UntrustedFactoryError, match=r"EXPLAIND_TRUSTED_MODULES=mypkg\.models;"):
        open_run(store).model()


@pytest.mark.parametrize("entry", ["os", "os.path", "subprocess", "builtins", "torch", "numpy", "explaind_store",
                                   "explaind_store.examples", "engine", "my models", "a..b", "mod\u0435ls"])
def test_trusting_a_library_wholesale_is_refused(recorded, tmp_path, monkeypatch, entry):
    assert trust_entry_problem(entry) is not None
    monkeypatch.setenv("EXPLAIND_TRUSTED_MODULES", f"mymodels,{entry}")
    with pytest.raises(UntrustedFactoryError, match="EXPLAIND_TRUSTED_MODULES lists .* cannot be trusted"):
        open_run(_copy(recorded, tmp_path, {"factory": "os:system", "kwargs": {"command": "true"}})).model()


def test_every_builtin_factory_resolves_and_specs_of_examples_are_builtin():
    for name in sorted(BUILTIN_FACTORIES):
        obj = load_factory(name)
        assert callable(obj)
    from explaind_store.examples import digits_cnn, modadd, tiny

    for fn in (modadd.make_model, modadd.ModAddTransformer, digits_cnn.make_model, tiny.make_mlp,
               tiny.make_tiny_transformer):
        assert model_spec(fn)["factory"] in BUILTIN_FACTORIES


def test_model_spec_refuses_nested_and_lambda_factories():
    def local_factory() -> nn.Module:
        return nn.Linear(1, 1)

    class Local(nn.Module):
        pass

    for bad in (local_factory, Local, lambda: nn.Linear(1, 1)):
        with pytest.raises(FactorySpecError, match="top level"):
            model_spec(bad)
    with pytest.raises(FactorySpecError):
        model_spec("pkg.mod:Outer.inner")


def test_user_module_trusted_by_env_and_names_imported_into_it_are_refused(recorded, hostile_dir, monkeypatch):
    marker = hostile_dir / "PWNED"
    monkeypatch.setenv("EXPLAIND_TRUSTED_MODULES", "mymodels")
    store = _copy(recorded, hostile_dir, {"factory": "mymodels:make", "kwargs": {"hidden": 6}})
    model = open_run(store).model()
    assert isinstance(model, nn.Sequential) and not model.training
    assert open_run(store).verify(max_updates=2).ok
    for name in ("Net",):
        assert issubclass(load_factory(f"mymodels:{name}"), nn.Module)
    # imported into the trusted module from elsewhere, not a factory, or not a top-level definition: refused
    for name in ("os", "json", "system", "loads", "Linear", "nn", "make_mlp", "CONST", "alias", "NotAModule",
                 "_private", "inner", "lam", "print", "missing", "Net.build"):
        with pytest.raises(REFUSED):
            open_run(_copy(recorded, hostile_dir / name, {"factory": f"mymodels:{name}"})).model()
    # a trusted module that returns something other than a model: called (the user trusted it), then refused
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        open_run(_copy(recorded, hostile_dir / "touch", {"factory": "mymodels:touch"})).model()
    marker.unlink()
    # the prefix is matched on whole dotted components
    with pytest.raises(UntrustedFactoryError):
        open_run(_copy(recorded, hostile_dir / "evil", {"factory": "mymodels_evil:make"})).model()
    assert not marker.exists()


def test_user_module_through_the_cli_environment(recorded, hostile_dir):
    store = _copy(recorded, hostile_dir, {"factory": "mymodels:make", "kwargs": {"hidden": 6}})
    env = {**__import__("os").environ, "EXPLAIND_TRUSTED_MODULES": "mymodels",
           "PYTHONPATH": f"{hostile_dir}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "explaind_store.cli", "verify", str(store), "--max-updates", "1"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "RESULT: OK" in proc.stdout, proc.stdout + proc.stderr
