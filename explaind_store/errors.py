"""The store's base error, in a module of its own so that every layer of the store can raise it."""

from __future__ import annotations


class StoreError(Exception):
    """A path is not a readable explaind store, or the store cannot be used as asked."""


__all__ = ["StoreError"]
