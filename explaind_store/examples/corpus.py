"""A real corpus every machine has and no one here wrote: the Python standard library's own ``.py`` files.

:func:`stdlib_bytes` cuts them into byte-level sequences (vocabulary 256) for a causal language model, split by file
into train and validation. It is a built-in dataset factory (``specs.BUILTIN_DATASET_FACTORIES``), so a store can
name it instead of holding the tokens: ``data_spec("explaind_store.examples.corpus:stdlib_bytes", split="train")``.

The files are taken in sorted order of their path relative to the standard library folder, and a file belongs to
the validation split when a seeded hash of that path falls below ``val_fraction``, so the split does not depend on
the machine, only on the Python version (whose files differ): a store recorded under another Python version gets
other data, and its fingerprint check says so.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
VOCAB_SIZE = 256
PAD_ID = 0
IGNORE_INDEX = -100  # = specs.IGNORE_INDEX (kept literal: this module imports no torch)
# folders below the standard library that hold installed packages, not the standard library
_NOT_STDLIB = frozenset({"site-packages", "dist-packages"})


def stdlib_root() -> Path:
    """The folder of this Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _in_val(rel: str, val_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def stdlib_files(split: str = "train", val_fraction: float = 0.1, seed: int = 0) -> list[str]:
    """The standard library ``.py`` files of ``split`` (paths relative to :func:`stdlib_root`, ``/``-separated,
    sorted); every file is in exactly one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    root = stdlib_root()
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not _NOT_STDLIB.intersection(p.relative_to(root).parts)
    )
    want_val = split == "val"
    return [r for r in rels if _in_val(r, val_fraction, seed) == want_val]


def stdlib_bytes(
    split: str = "train",
    context: int = 128,
    val_fraction: float = 0.1,
    max_files: int | None = None,
    max_sequences: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level sequences of the standard library's ``.py`` files of ``split``: ``(inputs, targets)``, both
    int64 of shape ``(N, context)``.

    The split's files (:func:`stdlib_files`, at most ``max_files`` of them) are concatenated in order and cut into
    pieces of ``context`` bytes; targets equal inputs (the ``causal_lm`` loss shifts by itself), except that the
    last short piece is padded with ``PAD_ID`` (0) in inputs and ``IGNORE_INDEX`` (-100) in targets. With
    ``max_sequences`` only the files needed for that many sequences are read."""
    if context < 2:
        raise ValueError(f"context must be at least 2 bytes, got {context!r}")
    for arg, value in (("max_files", max_files), ("max_sequences", max_sequences)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be a positive number or None, got {value!r}")
    files = stdlib_files(split, val_fraction, seed)
    if max_files is not None:
        files = files[:max_files]
    root = stdlib_root()
    need = None if max_sequences is None else max_sequences * context
    parts: list[bytes] = []
    size = 0
    for rel in files:
        if need is not None and size >= need:
            break
        data = (root / rel).read_bytes()
        parts.append(data)
        size += len(data)
    stream = np.frombuffer(b"".join(parts), dtype=np.uint8)
    if need is not None:
        stream = stream[:need]
    n = -(-len(stream) // context)
    inputs = np.full((n, context), PAD_ID, dtype=np.int64)
    inputs.reshape(-1)[: len(stream)] = stream
    targets = inputs.copy()
    targets.reshape(-1)[len(stream):] = IGNORE_INDEX
    return inputs, targets
