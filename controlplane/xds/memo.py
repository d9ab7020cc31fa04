"""A memo whose entries live exactly as long as the snapshot they were computed from.

Both xDS machines answer the same questions for every stream of a fan-out (which resources changed, what is
left after a removal, the make-before-break union); computing each once per snapshot keeps a push
O(streams). Keeping the answers in a plain bounded dict would keep old snapshots, and everything they
reference, alive until the bound is reached, so server memory would climb for hundreds of pushes.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar, cast

from controlplane.snapshots.snapshot import TypeSnapshot

_T = TypeVar("_T")
_MemoEntry = tuple["weakref.ref[TypeSnapshot] | None", object]  # (the base, weakly; the result)


class PerSnapshot:
    """Results computed from a `current` TypeSnapshot (and a base, and a subscription), kept exactly as long as
    `current` lives: a fan-out computes each once, not once per stream.

    Why not a bounded dict holding the snapshots: every push would then keep its snapshot, its diff and its
    framed bodies alive until the bound is reached (a 256-push sawtooth of server memory). Here `current` is
    held weakly (its entries go with it, by reference counting alone) and the base is held weakly too, so a
    memo never keeps an old snapshot, nor the chain of snapshots before it, alive. The cached values must not
    refer to `current` either (`_View` keeps only its version and type URL). A recycled id() cannot match: an
    entry is found through the live `current` and checked against the live base.
    """

    LIMIT = 256  # per current snapshot: the distinct (base, subscription) pairs of its streams

    def __init__(self) -> None:
        self._memos: dict[int, tuple[weakref.ref[TypeSnapshot], dict[tuple[int, object], _MemoEntry]]] = {}

    def __len__(self) -> int:
        """How many snapshots have memos (tests check that old ones are gone)."""
        return len(self._memos)

    def get(self, current: TypeSnapshot, base: TypeSnapshot | None, extra: object, compute: Callable[[], _T]) -> _T:
        """The memoized `compute()` for (current, base, extra); `extra` is compared by value."""
        memo = self._memo(current)
        key = (id(base), extra)
        hit = memo.get(key)
        if hit is not None and (hit[0]() if hit[0] is not None else None) is base:
            return cast(_T, hit[1])
        result = compute()
        if len(memo) >= self.LIMIT:
            memo.clear()
        memo[key] = (weakref.ref(base) if base is not None else None, result)
        return result

    def _memo(self, current: TypeSnapshot) -> dict[tuple[int, object], _MemoEntry]:
        key = id(current)
        known = self._memos.get(key)
        if known is not None and known[0]() is current:
            return known[1]
        ref = weakref.ref(current, functools.partial(self._forget, key))
        memo: dict[tuple[int, object], _MemoEntry] = {}
        self._memos[key] = (ref, memo)
        return memo

    def _forget(self, key: int, ref: weakref.ref[TypeSnapshot]) -> None:
        """`current` died: drop its results (unless its id() was already reused for a newer snapshot)."""
        known = self._memos.get(key)
        if known is not None and known[0] is ref:
            del self._memos[key]


class Interned:
    """Canonical instances of equal subscriptions: every proxy of a group sends the same EDS/RDS names, so
    their streams share one frozenset (bounded: a runaway variety only costs the sharing)."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._sets: dict[frozenset[str], frozenset[str]] = {}

    def intern(self, names: Iterable[str]) -> frozenset[str]:
        names = frozenset(names)
        known = self._sets.get(names)
        if known is not None:
            return known
        if len(self._sets) >= self.LIMIT:
            self._sets.clear()
        names = frozenset(sys.intern(n) for n in names)
        self._sets[names] = names
        return names


# One table for both protocols: SotW and Delta streams of a group subscribe to the same names.
SUBSCRIPTIONS = Interned()
