"""The ``explaind`` entry point, assembled from the top: the store's parser (``record``, ``info``, ``verify``,
:func:`explaind_store.cli.build_parser`) plus the engine's ``attribute`` and ``top``, ``demo`` and ``settings``
(:func:`add_commands`).

Errors raise ``ValueError`` / ``KeyError`` / ``StoreError``; ``explaind_store.cli.main`` prints them as one line and
exits 2.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import numpy as np

from explaind_store.schema import OUTPUT, QUERY, SAMPLE

if TYPE_CHECKING:  # xarray is imported by the commands themselves: registering them stays cheap
    import xarray as xr

PART_VARS = ("data", "weight_decay", "momentum", "residual")


def _by(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _size(text: str) -> int:
    from engine.settings import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_commands(subparsers: Any) -> None:
    """Register ``attribute`` and ``top`` on the ``explaind`` parser's subparsers."""
    att = subparsers.add_parser(
        "attribute",
        help="decompose query predictions of a recorded run into training samples, steps, tensors",
        description="Decompose F(theta_b) - F(theta_a) exactly (ExPLAIND) and stream the result into a Zarr store.",
    )
    att.add_argument("run", help="the recorded run (store path)")
    att.add_argument("--queries", required=True, help="a split selection, e.g. val[:10], val, train[0:3], val[[1,5,7]]")
    att.add_argument("--output", default="log_softmax",
                     help="log_softmax (default), logits, loss, target_logprob or margin")
    att.add_argument("--by", default="sample", help="comma-separated: sample, step, tensor, param (default: sample)")
    att.add_argument("--out", default=None, help="Zarr path to write the result to (default: keep it in memory)")
    att.add_argument("--steps", default=None, help="window A:B: decompose F(theta_B) - F(theta_A) (default: all)")
    att.add_argument("--quadrature", default=None, help="kink (default), gauss:N, midpoint:N, adaptive:TOL")
    where = att.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, help="address of a running dask scheduler (tcp://host:port)")
    where.add_argument("--workers", type=_positive, default=None, help="start a local cluster with N workers")
    where.add_argument("--sync", action="store_true", help="run in this process (dask's synchronous scheduler)")
    att.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    att.add_argument("--chunk-updates", type=_positive, default=None,
                     help="updates per task (a multiple of the store's chunk size)")
    att.add_argument("--method", default="auto", choices=["auto", "grad", "jvp"], help="per-sample dot products")
    att.add_argument("--step-bins", type=_positive, default=None, help="sum the step axis into N bins")
    att.add_argument("--residual-tol", type=float, default=None,
                     help="exactness guard: fail when an update's rounding residual exceeds this fraction of its "
                          "change (default 1e-3; inf turns the check off)")
    att.add_argument("--max-result-bytes", type=_size, default=None,
                     help="largest result kept in memory, e.g. 4GB (default: $EXPLAIND_MAX_RESULT_BYTES, else a "
                          "quarter of the available memory); larger results need --out")
    att.add_argument("--query-bytes", type=_size, default=None,
                     help="memory the query rows may hold, e.g. 2GB; more queries run in batches one after another "
                          "(default: $EXPLAIND_QUERY_BYTES, else a quarter of the available memory)")
    att.add_argument("--top", type=_positive, default=5, help="top samples to print per query (default 5)")
    att.add_argument("--quiet", action="store_true", help="no progress bar")
    att.set_defaults(func=_cmd_attribute)

    top = subparsers.add_parser("top", help="largest and smallest contributors of an attribution result")
    top.add_argument("path", help="an attribution result written with --out")
    top.add_argument("-k", type=_positive, default=10, help="how many (default 10)")
    top.add_argument("--query", type=int, default=None, help="only this query (position; default: all)")
    top.add_argument("--output", default="predicted",
                     help="output label, 'all', or 'predicted' (default: each query's largest final value)")
    top.add_argument("--along", default="sample", help="sample (default), step or tensor")
    top.add_argument("--part", default="data", help="result variable (default data)")
    top.set_defaults(func=_cmd_top)

    from explaind_app.demo import add_demo_command
    from explaind_app.demo_paper import add_paper_option

    add_paper_option(add_demo_command(subparsers))

    st = subparsers.add_parser("settings", help="list the EXPLAIND_* settings: meaning, default, current value")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_settings)


def _cmd_attribute(args: argparse.Namespace) -> int:
    from engine.api import attribute
    from engine.cluster.runners import close_local_client, local_client, local_client_running

    # a default cluster this command starts is closed when it ends; one that was up before (main() called from a
    # notebook or a test) belongs to the caller
    started_here = not local_client_running()
    client: Any = None
    if args.sync:
        client = "sync"
    elif args.scheduler:
        client = args.scheduler
    elif args.workers:
        client = local_client(args.workers)
    try:
        ds = attribute(
            args.run, queries=args.queries, output=args.output, by=_by(args.by), steps=args.steps,
            quadrature=args.quadrature, client=client, device=args.device, out=args.out,
            chunk_updates=args.chunk_updates, method=args.method, progress=not args.quiet, step_bins=args.step_bins,
            **({} if args.residual_tol is None else {"residual_tol": args.residual_tol}),
            max_result_bytes=args.max_result_bytes, query_bytes=args.query_bytes,
        )
        print(summarize(ds, top=args.top))
        if args.out:
            print(f"result         {args.out} (xarray.open_zarr; `explaind top {args.out}`)")
    finally:
        if started_here:
            close_local_client()
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from engine.topk import open_result, top_k

    ds = open_result(args.path)
    if args.query is not None and not 0 <= args.query < ds.sizes[QUERY]:
        raise ValueError(f"--query {args.query} is out of range: the result has {ds.sizes[QUERY]} queries")
    res = top_k(ds, args.k, along=args.along, part=args.part)
    print(format_top(ds, res, query=args.query, output=args.output))
    return 0


# ==============================================================================================================
# Text summaries
# ==============================================================================================================
def _total(ds: xr.Dataset, name: str) -> np.ndarray:
    """Per (query, output) total of a variable (every other axis summed)."""
    var = ds[name]
    other = [d for d in var.dims if d not in (QUERY, OUTPUT)]
    return np.asarray(var.sum(other, skipna=False) if other else var)  # a NaN must show, not be skipped


def _chosen_outputs(ds: xr.Dataset, how: str) -> list[list[int]]:
    """Output positions to show per query: 'predicted' (largest final value), 'all', or one label."""
    n_q, n_o = ds.sizes[QUERY], ds.sizes[OUTPUT]
    if how == "all" or n_o == 1:
        return [list(range(n_o))] * n_q
    if how == "predicted":
        final = np.asarray(ds["final"])
        return [[int(np.argmax(final[q]))] for q in range(n_q)]
    labels = [str(v) for v in np.asarray(ds[OUTPUT].values)]
    if how not in labels:
        raise ValueError(f"--output {how!r} is not an output label of this result; labels: {labels[:20]}")
    return [[labels.index(how)]] * n_q


def _count(n: object, noun: str) -> str:
    """``1 chunk``, ``3 chunks``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _batches_note(attrs: dict) -> str:
    """" in 4 query batches" when the queries ran in batches to stay within the query memory budget."""
    n, groups = attrs.get("query_batches", 1), attrs.get("query_groups", 1)
    return "" if n == groups else f" in {n} query batches (EXPLAIND_QUERY_BYTES)"


def _replay_note(attrs: dict) -> str:
    """", replay X" for a run with sparse checkpoints (results of older engines lack the attribute)."""
    value = attrs.get("max_replay_residual")
    return "" if value is None else f", replay {float(value):.2e}"


def summarize(ds: xr.Dataset, top: int = 5, max_queries: int = 5) -> str:
    """A few lines: window, residuals, the total of each part, and the top training samples of the first queries."""
    from engine.result import NonFiniteResultError
    from engine.topk import top_k

    attrs = ds.attrs
    a, b = attrs.get("window", [None, None])
    change = _total(ds, "final") - _total(ds, "initial")
    totals = "; ".join(f"{name} {float(_total(ds, name).sum()):+.6g}" for name in PART_VARS)
    lines = [
        (f"window         updates ({a}, {b}]; output {attrs.get('output')}; {ds.sizes[QUERY]} queries x "
         f"{ds.sizes[OUTPUT]} outputs; by {','.join(attrs.get('by', [])) or '-'}; rule {attrs.get('rule')}"),
        (f"scheduler      {attrs.get('scheduler', '-')}; {_count(attrs.get('n_chunks', '?'), 'chunk')} of <= "
         f"{attrs.get('chunk_updates', '?')} updates ({attrs.get('scan', '-')}, "
         f"{_count(attrs.get('query_groups', 1), 'query group')}{_batches_note(attrs)}); device "
         f"{attrs.get('device', 'cpu')}"),
        (f"residual       max |residual| {attrs.get('max_abs_residual', float('nan')):.3e} (quadrature "
         f"{attrs.get('max_quadrature_residual', float('nan')):.2e}, rounding "
         f"{attrs.get('max_rounding_residual', float('nan')):.2e}{_replay_note(attrs)}) against max |final - initial| "
         f"{attrs.get('max_abs_change', float('nan')):.3e}"),
        (f"totals         {totals}; final - initial {float(change.sum()):+.6g} (summed over queries and "
         "outputs)"),
    ]
    if SAMPLE in ds["data"].dims and ds.sizes[SAMPLE] > 0:
        try:
            res = top_k(ds, top, along=SAMPLE, part="data")
        except NonFiniteResultError:
            lines.append("top            not ranked: the result holds NaN or inf (see the totals above)")
        else:
            lines.append(format_top(ds, res, query=None, output="predicted", max_queries=max_queries))
    return "\n".join(lines)


def format_top(
    ds: xr.Dataset, res: xr.Dataset, *, query: int | None, output: str = "predicted", max_queries: int | None = None
) -> str:
    """Table of the top / bottom contributors per query (and chosen outputs)."""
    along, part = res.attrs["along"], res.attrs["part"]
    queries = [query] if query is not None else list(range(ds.sizes[QUERY]))
    shown = queries[:max_queries] if max_queries else queries
    outs = _chosen_outputs(ds, output)
    labels = np.asarray(ds[OUTPUT].values)
    has_label = "top_label" in res
    lines = [f"top {res.attrs['k']} {along}s by {part}" + (f" (summed over {', '.join(res.attrs['summed_over'])})"
                                                           if res.attrs["summed_over"] else "")]
    def fmt(kind: str, q: int, o: int) -> str:
        idx = res[f"{kind}_label" if has_label else f"{kind}_index"].values[q, o]
        val = res[f"{kind}_value"].values[q, o]
        return ", ".join(f"{i}: {v:+.3e}" for i, v in zip(idx, val))

    for q in shown:
        for o in outs[q]:
            head = f"query {q} output {labels[o]}"
            lines.append(f"  {head}  top [{fmt('top', q, o)}]")
            lines.append(f"  {' ' * len(head)}  bottom [{fmt('bottom', q, o)}]")
    if len(shown) < len(queries):
        lines.append(f"  ... {len(queries) - len(shown)} more queries (`explaind top PATH --query Q`)")
    return "\n".join(lines)


# the store's own settings (explaind_store never imports the engine's table, so they are listed here)
STORE_SETTINGS = (
    ("EXPLAIND_TRUSTED_MODULES", "str", "", "store", "comma-separated modules whose model factories a store may "
     "name (besides the built-in examples); the engine hands the caller's list to its workers with every job"),
)


def settings_rows() -> list[dict[str, Any]]:
    """Every ``EXPLAIND_*`` setting: the store's and the engine's table (:mod:`engine.settings`)."""
    import os

    from engine import settings
    from explaind_store.specs import TRUSTED_ENV

    rows = [{"env": env, "name": env.removeprefix("EXPLAIND_").lower(), "type": typ, "default": default,
             "value": os.environ.get(env, default), "scope": scope, "meaning": meaning}
            for env, typ, default, scope, meaning in STORE_SETTINGS]
    assert rows[0]["env"] == TRUSTED_ENV
    return rows + settings.rows()


def _cmd_settings(args: argparse.Namespace) -> int:
    import json

    rows = settings_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["env"]) for r in rows)
    for r in rows:
        print(f"{r['env']:<{width}}  {r['type']:<4}  default {r['default']!r:<11}  now {r['value']!r:<11}  "
              f"({r['scope']}) {r['meaning']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``explaind`` console script: the store's commands plus the engine's and the application's."""
    from explaind_store.cli import main as store_main

    return store_main(argv, extensions=(add_commands,))


__all__ = ["add_commands", "format_top", "main", "settings_rows", "summarize"]


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
