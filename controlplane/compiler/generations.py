"""Caches keyed by value that forget what the compiles stopped using, owned by the caller's CompilerMemo.

Not module-level: the compiler keeps no state of its own, and a long-running server's memory follows the
policy in service, not every policy it ever compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, cast

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T", bound=Hashable)


_MISSING = object()


class ValueMemo(Generic[K, V]):
    """`compute(key)` once per key; an entry not used by the last two generations (compiles) is dropped."""

    def __init__(self) -> None:
        self._current: dict[K, V] = {}
        self._previous: dict[K, V] = {}

    def get(self, key: K, compute: Callable[[K], V]) -> V:
        found = self._current.get(key, _MISSING)  # one lookup: hashing a key of nested tuples is not free
        if found is not _MISSING:
            return cast(V, found)
        found = self._previous.get(key, _MISSING)
        value = compute(key) if found is _MISSING else cast(V, found)
        self._current[key] = value
        return value

    def next_generation(self) -> None:
        self._previous, self._current = self._current, {}


class Interner:
    """Equal values as one object: the identity memo compares its inputs by identity."""

    def __init__(self) -> None:
        self._seen: ValueMemo[Hashable, Hashable] = ValueMemo()

    def __call__(self, value: T) -> T:
        return cast(T, self._seen.get(value, _same))

    def next_generation(self) -> None:
        self._seen.next_generation()


def _same(value: Hashable) -> Hashable:
    return value
