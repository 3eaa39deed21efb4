"""The ``explaind`` entry point is assembled from the top: the store's parser knows only its own commands, the
application adds the engine's and lists every setting."""

from __future__ import annotations

import json

from explaind_app.cli import main
from explaind_store.cli import build_parser


def _commands(parser) -> set[str]:
    return set(next(a for a in parser._actions if a.dest == "command").choices)


def test_store_parser_has_the_store_commands_and_takes_extensions():
    assert _commands(build_parser()) == {"record", "info", "verify"}
    from explaind_app.cli import add_commands

    assert _commands(build_parser(add_commands)) == {"record", "info", "verify", "attribute", "top", "demo",
                                                     "settings"}


def test_explaind_settings_lists_the_store_and_engine_settings(capsys, monkeypatch):
    from engine import settings

    monkeypatch.setenv("EXPLAIND_PIPELINE", "0")
    assert main(["settings", "--json"]) == 0
    rows = {r["env"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"EXPLAIND_TRUSTED_MODULES"} | {s.env for s in settings.TABLE.values()}
    assert rows["EXPLAIND_PIPELINE"]["value"] is False and rows["EXPLAIND_PIPELINE"]["default"] is True
    assert all(r["meaning"] for r in rows.values())
    assert main(["settings"]) == 0
    assert "EXPLAIND_KEEP_U_BYTES" in capsys.readouterr().out


def test_attribute_summary_shows_the_replay_residual_of_a_sparse_run(tmp_path):
    import engine
    from explaind_app.cli import summarize
    from tests.support.compare import MLP_SPEC
    from tests.support.store_helpers import train

    train(tmp_path / "run", 8, kind="sgd_momentum", chunk_updates=4, checkpoint_every=4, model_spec=MLP_SPEC)
    ds = engine.attribute(str(tmp_path / "run"), queries="val[:1]", by="step", client="sync", progress=False)
    line = next(x for x in summarize(ds).splitlines() if x.startswith("residual"))
    assert f"replay {ds.attrs['max_replay_residual']:.2e}" in line


def test_cli_attribute_leaves_a_default_cluster_it_did_not_start_running(digits_store, cluster, capsys, monkeypatch):
    """main() called in-process (a notebook, a test) must not close the caller's default LocalCluster; the summary
    says when the queries ran in batches to stay within the query memory budget (--query-bytes or the setting)."""
    import warnings

    from engine import QueryMemoryWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QueryMemoryWarning)  # one query is over such a budget
        assert main(["attribute", str(digits_store), "--queries", "val[:2]", "--by", "sample", "--sync",
                     "--quiet", "--query-bytes", "1"]) == 0  # every batch one query
    out = capsys.readouterr().out
    assert "max |residual|" in out and "1 query group in 2 query batches (EXPLAIND_QUERY_BYTES)" in out
    monkeypatch.setenv("EXPLAIND_QUERY_BYTES", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QueryMemoryWarning)
        assert main(["attribute", str(digits_store), "--queries", "val[:2]", "--by", "sample", "--sync",
                     "--quiet"]) == 0
    assert "in 2 query batches" in capsys.readouterr().out
    assert cluster.status == "running"
