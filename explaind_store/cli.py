"""The ``explaind`` command line: record built-in examples, inspect and verify stores, and (via ``engine.cli``)
attribute predictions, show top contributors and run the demo.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import format as fmt
from . import schema
from .specs import safe_text


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def run_info(path: str | Path) -> dict[str, Any]:
    """Summary of a store: updates, tensors, bytes on disk, compression ratio, optimizer, data."""
    from .reader import open_run

    run = open_run(path)
    t = run.committed_updates
    steps = t + 1
    raw = 0
    for tinfo in run.tensors:
        n = 1
        for d in tinfo["shape"]:
            n *= d
        item = 8 if tinfo["dtype"] == "float64" else (2 if tinfo["dtype"] == "float16" else 4)
        raw += n * item * steps * (1 + len(run.state_names))
    disk = run.nbytes_on_disk()
    data_disk = sum(f.stat().st_size for f in (run.path / schema.DATA).rglob("*") if f.is_file()) if (
        run.path / schema.DATA).exists() else 0
    traj_disk = disk - data_disk
    opt = run.optimizer_spec
    lr_range = None
    if t > 0:
        lr = run.updates[schema.LR].values[1:]
        lr_range = [[float(lr[:, g].min()), float(lr[:, g].max())] for g in range(lr.shape[1])]
    return {
        "lr_range": lr_range,
        "path": str(run.path),
        "format_version": run.attrs[schema.ATTR_FORMAT_VERSION],
        "committed_updates": t,
        "tensors": len(run.tensor_names),
        "parameters": sum(int(__import__("math").prod(x["shape"])) for x in run.tensors),
        "state": run.state_names,
        "chunk_updates": run.chunk_updates,
        "bytes_on_disk": disk,
        "trajectory_bytes_raw": raw,
        "compression_ratio": raw / traj_disk if traj_disk else None,
        "bytes_per_update": traj_disk / steps if steps else None,
        "optimizer": opt.to_attrs(),
        "loss": run.loss,
        "model_spec": run.model_spec,
        "data": run.attrs[schema.ATTR_DATA],
        "codec": run.attrs.get(schema.ATTR_CODEC),
        "nonfinite_updates": run.nonfinite_updates,
        "created": run.attrs.get(schema.ATTR_CREATED),
    }


def format_info(info: dict[str, Any]) -> str:
    opt = info["optimizer"]
    lr_range = info.get("lr_range") or [None] * len(opt["groups"])
    groups = "; ".join(
        ", ".join(f"{k}={v}" for k, v in g.items() if k not in ("tensors", "lr"))
        + (f", lr {r[0]:.3g}..{r[1]:.3g} over the updates" if r else "")
        + f" ({len(g['tensors'])} tensors)"
        for g, r in zip(opt["groups"], lr_range)
    )
    splits = ", ".join(f"{k}: {v['n']} samples ({v['mode']})" for k, v in info["data"]["splits"].items())
    spec = info["model_spec"] if isinstance(info["model_spec"], dict) else {}
    factory = spec.get("factory", "?")
    if not (isinstance(factory, str) and factory.isprintable() and len(factory) <= 200):
        factory = safe_text(factory)  # a store's strings are hostile: no terminal escapes, no megabytes
    kwargs_text = json.dumps(spec.get("kwargs", {}), ensure_ascii=True)
    kwargs_text = kwargs_text if len(kwargs_text) <= 200 else kwargs_text[:200] + "..."
    lines = [
        f"store          {info['path']} (format v{info['format_version']})",
        f"updates        {info['committed_updates']} committed (steps 0..{info['committed_updates']})",
        f"model          {factory} {kwargs_text}",
        f"tensors        {info['tensors']} tensors, {info['parameters']:,} parameters; state: "
        f"{', '.join(info['state']) or 'none'}",
        f"optimizer      {opt['type']}: {groups}",
        f"loss           {info['loss']['kind']} (mean over the batch)",
        f"data           {splits}",
        f"on disk        {_human(info['bytes_on_disk'])}; {_human(info['bytes_per_update'] or 0)} per update; "
        f"compression {info['compression_ratio']:.2f}x" if info["compression_ratio"] else "on disk        -",
        f"chunks         {info['chunk_updates']} updates per chunk; codec {info['codec']['compressor']['cname']} "
        f"level {info['codec']['compressor']['clevel']} + {info['codec']['checksum']}"
        + (f"; LOSSY bitround keepbits={info['codec']['lossy']['bitround_keepbits']}" if info["codec"]["lossy"] else ""),
    ]
    if info["nonfinite_updates"]:
        lines.append(f"WARNING        non-finite parameters after updates {info['nonfinite_updates'][:10]}")
    return "\n".join(lines)


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
    if args.task == "modadd":
        from .examples import modadd

        kwargs: dict[str, Any] = {}
        if args.p is not None:
            kwargs["p"] = args.p
        modadd.train(args.out, steps=args.steps, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.quiet, **kwargs)
    else:
        from .examples import digits_cnn

        digits_cnn.train(args.out, steps=args.steps, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.quiet)


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


def build_parser() -> argparse.ArgumentParser:
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

    from engine.cli import add_commands  # attribute, top, demo

    add_commands(sub)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """One line for Ctrl-C: for ``record``, what is safe on disk and how to continue."""
    if getattr(args, "command", None) != "record":
        return "explaind: interrupted"
    try:
        committed = int(fmt.open_root(args.out, check=False).attrs[schema.ATTR_COMMITTED])
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "record" and args.steps is None:
        args.steps = 1000 if args.task == "modadd" else 300
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    except (fmt.StoreError, KeyError, ValueError, PermissionError, RuntimeError, IndexError, TypeError,
            FloatingPointError) as exc:
        print(f"explaind: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
