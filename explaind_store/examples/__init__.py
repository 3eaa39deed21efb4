"""Built-in example tasks, shared by the CLI, notebooks, tests and benchmarks.

- :mod:`.modadd`: modular addition with a one-layer transformer (grokking), full-batch AdamW.
- :mod:`.digits_cnn`: a small CNN on scikit-learn's 8x8 digits, minibatch SGD + momentum + lr schedule.
- :mod:`.tiny`: toy models and data for float64 oracle tests.
- :mod:`.corpus`: byte-level sequences of the Python standard library's own source files (a built-in dataset factory).
- :mod:`.training`: the deterministic, resumable (optionally recorded) training loop they share.

Factories here are trusted by ``specs.resolve_factory`` (module prefix ``explaind_store.examples``).
"""

from __future__ import annotations

from . import digits_cnn, modadd, tiny, training
from .training import TrainResult, batch_indices, evaluate, fit

__all__ = ["TrainResult", "batch_indices", "digits_cnn", "evaluate", "fit", "modadd", "tiny", "training"]
