"""The engine's environment settings (``EXPLAIND_*``), read in one way: a bad value is an error that names the
variable, says what it means and how to fix it, instead of a bare ``int()`` traceback at import."""

from __future__ import annotations

import os
import re

_OFF = ("0", "false", "off", "no")


def env_int(name: str, default: int, meaning: str, *, minimum: int = 1) -> int:
    """``int(os.environ[name])``, or ``default`` when unset or empty; at least ``minimum``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}={raw!r}: set it to an integer >= {minimum} ({meaning}), or unset it for the "
                         f"default {default}")
    return value


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """A byte count from ``4000000``, ``"4GB"``, ``"512MiB"``, ``"1.5G"`` (decimal units; ``KiB``/``MiB``/``GiB``
    are binary); ValueError naming the accepted forms otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a size in bytes; use a number with an optional unit, e.g. "
                             "4000000000, 4GB, 512MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"a size in bytes must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``"16.10 GB"``, ``"230.4 MB"``, ``"12.0 kB"`` (decimal units, as ``parse_bytes``
    reads them)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TB", "GB") else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def env_bytes(name: str, meaning: str) -> int | None:
    """``parse_bytes(os.environ[name])``, or None when unset or empty; a bad value names the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse_bytes(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: set it to a positive size such as 4GB or 4000000000 ({meaning}), or "
                         "unset it for the default") from None


def env_flag(name: str, default: bool = True) -> bool:
    """False when ``name`` is 0/false/off/no (any case), True for any other value, ``default`` when unset."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in _OFF


__all__ = ["env_bytes", "env_flag", "env_int", "format_bytes", "parse_bytes"]
