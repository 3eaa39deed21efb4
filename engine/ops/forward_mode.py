"""Forward-mode AD (``torch.func.jvp``) behind one process-wide lock.

Pass 2 runs the ``torch.func`` work of several updates at once in producer threads (:mod:`engine.scan.pipeline`).
Reverse-mode transforms (``grad``, ``vjp``, ``jacrev``, ``vmap``) keep their state per thread, but forward mode does
not: its dual levels are process-wide, so two threads inside ``jvp`` at once can pair one thread's tangents with the
other's level (a wrong derivative or an error). Every forward-mode call of the engine (the quadrature's ``dF/dt``
for the adaptive rule and the smooth-row refinement, the per-sample ``"jvp"`` dot products) goes through
:func:`jvp` here, which lets one thread in at a time; reverse-mode work in other threads goes on meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch.func

# reentrant: a jvp may be called inside another one's function (nested forward mode in one thread)
_LOCK = threading.RLock()


def jvp(func: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...], **kwargs: Any) -> Any:
    """``torch.func.jvp(func, primals, tangents, **kwargs)`` while holding the forward-mode lock."""
    with _LOCK:
        return torch.func.jvp(func, primals, tangents, **kwargs)


__all__ = ["jvp"]
