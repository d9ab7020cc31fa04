"""Reuse of unchanged compiler output between compiles, without giving up purity.

Results are keyed by the identity of the frozen model objects they were computed from, and the memo
holds those objects so their ids cannot be reused. A compile with a memo returns exactly what a
compile without one returns; it is only faster when most of the policy did not change. Entries not
used by the latest compile are dropped, so memory follows the policy's size.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from controlplane.compiler.generations import Interner, ValueMemo
from controlplane.compiler.rbac import RbacEncoder

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    def __init__(self) -> None:
        self._previous: dict[tuple[int, ...], tuple[tuple[object, ...], V]] = {}
        self._current: dict[tuple[int, ...], tuple[tuple[object, ...], V]] = {}

    def get(self, inputs: tuple[object, ...], compute: Callable[[], V]) -> V:
        key = tuple(map(id, inputs))
        hit = self._current.get(key) or self._previous.get(key)
        if hit is not None and all(map(operator.is_, hit[0], inputs)):
            self._current[key] = hit
            return hit[1]
        value = compute()
        self._current[key] = (inputs, value)
        return value

    def next_generation(self) -> None:
        self._previous, self._current = self._current, {}


class CompilerMemo:
    """One memo per kind of intermediate result: everything the compiler reuses between compiles, held by
    the caller (the compiler itself keeps nothing between calls)."""

    def __init__(self) -> None:
        self.backends: IdentityMemo[Any] = IdentityMemo()
        self.rbac = RbacEncoder()
        # The deny list changes with finished jobs, not with policy changes: each of its configurations kept
        # encoded, keyed by (name, its ids), so a revocation re-encodes the recent list alone.
        self.revocations: ValueMemo[tuple[str, tuple[str, ...]], bytes] = ValueMemo()
        self.interned = Interner()

    def next_generation(self) -> None:
        self.backends.next_generation()
        self.rbac.next_generation()
        self.revocations.next_generation()
        self.interned.next_generation()
