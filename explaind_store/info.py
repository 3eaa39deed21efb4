"""Summaries of a store (what ``explaind info`` prints, and notebooks show): sizes, compression, optimizer, data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import schema, storage
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
    stored = len(run.checkpoint_steps)  # sparse checkpoints: parameters and state only at these steps
    raw = 0
    for tinfo in run.tensors:
        n = 1
        for d in tinfo["shape"]:
            n *= d
        item = 8 if tinfo["dtype"] == "float64" else (2 if tinfo["dtype"] == "float16" else 4)
        raw += n * item * stored * (1 + len(run.state_names))
    disk = run.nbytes_on_disk()
    data_disk = storage.tree_nbytes(storage.join(run.path, schema.DATA))
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
        "parameters": sum(int(math.prod(x["shape"])) for x in run.tensors),
        "state": run.state_names,
        "chunk_updates": run.chunk_updates,
        "checkpoint_every": run.checkpoint_every,
        "checkpoints": stored,
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
    splits = ", ".join(f"{k}: {v['n']} samples ({_split_source(v)})" for k, v in info["data"]["splits"].items())
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
    if info.get("checkpoint_every", 1) > 1:
        lines.append(f"checkpoints    every {info['checkpoint_every']} updates and the last ({info['checkpoints']} "
                     "stored); the steps between are replayed when read")
    if info["nonfinite_updates"]:
        lines.append(f"WARNING        non-finite parameters after updates {info['nonfinite_updates'][:10]}")
    return "\n".join(lines)


__all__ = ["format_info", "run_info"]


def _split_source(split: dict[str, Any]) -> str:
    """``stored``, ``reference``, or ``reference to <factory>`` (a data spec; a store string, so made safe)."""
    spec = split.get("spec")
    if split.get("mode") == "reference" and isinstance(spec, dict):
        return f"reference to {safe_text(spec.get('factory'), 100)}"
    return str(split.get("mode"))
