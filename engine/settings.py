"""The engine's environment settings (``EXPLAIND_*``), read in one way: a bad value is an error that names the
variable, says what it means and how to fix it, instead of a bare ``int()`` traceback at import."""

from __future__ import annotations

import os

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


def env_flag(name: str, default: bool = True) -> bool:
    """False when ``name`` is 0/false/off/no (any case), True for any other value, ``default`` when unset."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in _OFF


__all__ = ["env_flag", "env_int"]
