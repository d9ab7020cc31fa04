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

from controlplane.compiler.generations import Interner
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


class LatestMemo(Generic[V]):
    """Per name, the value for the last ids it was computed with. The deny list's configurations change one at a
    time and hold up to thousands of ids: a tuple does not cache its hash, so keying by value would hash every
    bucket's ids on every compile (4 ms at 200,000 listed); the service hands an unchanged bucket as the same
    object, which `is` recognises at once. Bounded by the names (17)."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[tuple[str, ...], V]] = {}

    def get(self, name: str, ids: tuple[str, ...], compute: Callable[[str, tuple[str, ...]], V]) -> V:
        hit = self._latest.get(name)
        if hit is not None and (hit[0] is ids or hit[0] == ids):
            return hit[1]
        value = compute(name, ids)
        self._latest[name] = (ids, value)
        return value


class CompilerMemo:
    """One memo per kind of intermediate result: everything the compiler reuses between compiles, held by
    the caller (the compiler itself keeps nothing between calls)."""

    def __init__(self) -> None:
        self.backends: IdentityMemo[Any] = IdentityMemo()
        self.rbac = RbacEncoder()
        # The deny list changes with finished jobs, not with policy changes: each of its configurations kept
        # encoded with its ids, so a revocation re-encodes the recent list alone.
        self.revocations: LatestMemo[bytes] = LatestMemo()
        self.interned = Interner()

    def next_generation(self) -> None:
        self.backends.next_generation()
        self.rbac.next_generation()
        self.interned.next_generation()
