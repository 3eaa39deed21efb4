"""The store's commands of the ``explaind`` command line: ``record``, ``info``, ``verify``.

:func:`build_parser` takes extensions that register more commands (the application, :mod:`explaind_app.cli`, adds
the engine's ``attribute``, ``top``, ``demo`` and ``settings``); the store itself never imports the engine, so
``python -m explaind_store.cli`` runs the store's commands alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path  # noqa: F401 - kept for code that merges in here
from typing import Any

from . import storage
from . import schema  # noqa: F401 - kept for code that merges in here
from .info import format_info, run_info  # re-exported: `from explaind_store.cli import run_info` keeps working


def _cmd_record(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    before = torch.get_num_threads()
    # one thread by default: torch's multi-threaded kernels sum in a schedule-dependent order, so two runs with the
    # same --seed would differ in the last bits from update 1 on
    torch.set_num_threads(args.threads)
    try:
        _train_example(args)
    finally:
        torch.set_num_threads(before)
    print(format_info(run_info(args.out)))
    return 0


def _train_example(args: argparse.Namespace) -> None:
    rec_kwargs = None if args.checkpoint_every is None else {"checkpoint_every": args.checkpoint_every}
    if args.task == "modadd":
        from .examples import modadd

        kwargs: dict[str, Any] = {}
        if args.p is not None:
            kwargs["p"] = args.p
        modadd.train(args.out, steps=args.steps, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.quiet, recorder_kwargs=rec_kwargs, **kwargs)
    else:
        from .examples import digits_cnn

        digits_cnn.train(args.out, steps=args.steps, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.quiet, recorder_kwargs=rec_kwargs)


def _cmd_info(args: argparse.Namespace) -> int:
    info = run_info(args.path)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .reader import open_run

    run = open_run(args.path)
    rep = run.verify(gradients=not args.no_gradients, max_updates=args.max_updates, progress=not args.json)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.table())
    return 0 if rep.ok else 1


def build_parser(*extensions: Callable[[Any], None]) -> argparse.ArgumentParser:
    """The ``explaind`` parser with the store's commands; each extension is called with the subparsers to add its
    own."""
    parser = argparse.ArgumentParser(
        prog="explaind", description="Record training trajectories and decompose predictions exactly (ExPLAIND)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("record", help="train a built-in example while recording it")
    rec.add_argument("task", choices=["modadd", "digits-cnn"])
    rec.add_argument("--out", required=True, help="store path to write")
    rec.add_argument("--steps", type=int, default=None, help="number of optimizer updates")
    rec.add_argument("--seed", type=int, default=0,
                     help="seeds the data split, initialisation and batch order; two runs with the same seed are "
                          "bit-identical at --threads 1 (the default)")
    rec.add_argument("--threads", type=int, default=1,
                     help="torch threads for training (default 1; more can be faster, but runs then differ in the "
                          "last bits from run to run)")
    rec.add_argument("--p", type=int, default=None,
                     help="modadd: the modulus (default 113; a table of p*p pairs smaller than 6,000 is split 2:1 "
                          "into training and validation pairs)")
    rec.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                     help="store parameters and optimizer state only every K updates (and at the end); the steps "
                          "between are rebuilt by replaying the optimizer when read (default 1: every update)")
    rec.add_argument("--resume", action="store_true", help="continue a killed or shorter run at --out")
    rec.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.set_defaults(func=_cmd_record)

    info = sub.add_parser("info", help="summarise a store")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)

    ver = sub.add_parser("verify", help="check a store: optimizer replay, batch gradients, chunk checksums")
    ver.add_argument("path")
    ver.add_argument("--json", action="store_true")
    ver.add_argument("--no-gradients", action="store_true", help="skip the (slower) batch-gradient check")
    ver.add_argument("--max-updates", type=int, default=None, help="check this many evenly spaced updates")
    ver.set_defaults(func=_cmd_verify)

    for extend in extensions:
        extend(sub)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """One line for Ctrl-C: for ``record``, what is safe on disk and how to continue."""
    if getattr(args, "command", None) != "record":
        return "explaind: interrupted"
    try:
        committed = int(storage.open_root(args.out, check=False).attrs[schema.ATTR_COMMITTED])
    except Exception:  # noqa: BLE001 - interrupted before the store existed
        return "explaind: interrupted before anything was recorded"
    held = f"updates 1..{committed} committed" if committed > 0 else "no committed update yet"
    return (
        f"explaind: interrupted; {args.out} holds {held} (safe on disk). Continue with "
        f"`explaind record {args.task} --out {args.out} --steps {args.steps} --seed {args.seed}"
        + (f" --p {args.p}" if args.p is not None else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "")
        + " --resume`"
    )


def main(argv: list[str] | None = None, *, extensions: Sequence[Callable[[Any], None]] = ()) -> int:
    """Run one ``explaind`` command (the store's, plus those the ``extensions`` register); errors print as one
    line and return 2 (Ctrl-C: 130)."""
    parser = build_parser(*extensions)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "record" and args.steps is None:
        args.steps = 1000 if args.task == "modadd" else 300
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    except (storage.StoreError, KeyError, ValueError, PermissionError, RuntimeError, IndexError, TypeError,
            FloatingPointError) as exc:
        print(f"explaind: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
