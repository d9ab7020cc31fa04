"""The work a fan-out shares between its streams, in one object the server owns: `FanOutCache`.

Both xDS machines answer the same questions for every stream of a fan-out (which resources changed, what is
left after a removal, the make-before-break union, the framed bytes of a response); computing each once per
snapshot keeps a push O(streams). The memos live in an object handed to every stream machine, not in module
globals, so the state machines stay pure: two servers (or two tests) never see each other's entries.

Keeping the answers in a plain bounded dict would keep old snapshots, and everything they reference, alive
until the bound is reached, so server memory would climb for hundreds of pushes: `PerSnapshot` ties each
entry to the snapshot it was computed from.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar, cast

from controlplane.snapshots.snapshot import EncodedResource, TypeSnapshot

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
        self.computed = 0  # how many results were actually computed (tests count a fan-out's work with it)

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
        self.computed += 1
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


class IdentityMemo:
    """Results of pure functions of shared immutable arguments (no snapshots), computed once per fan-out.

    Streams that were sent the same response hold the same tuple of names and subscriptions are interned, so
    "what is left after this unsubscribe?" has the same arguments by identity on every stream. Entries keep
    their arguments alive, so a recycled id() can never match; they hold names only, never a snapshot.
    """

    LIMIT = 256

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[tuple[object, ...], object]] = {}

    def call(self, fn: Callable[..., _T], *args: object) -> _T:
        key = (id(fn), *map(id, args))
        hit = self._entries.get(key)
        if hit is not None and all(x is y for x, y in zip(hit[0], (fn, *args), strict=True)):
            return cast(_T, hit[1])
        result = fn(*args)
        if len(self._entries) >= self.LIMIT:
            self._entries.clear()
        self._entries[key] = ((fn, *args), result)
        return result


class Frames:
    """Bytes framed around a shared body, kept for every stream that frames the same body with the same fields.

    A multi-megabyte route configuration is framed once per push, not once per stream. Bounded in entries and
    bytes (bodies and frames counted): past either, the cache starts over and the current push's frames are
    rebuilt once by the next stream asking.
    """

    LIMIT = 32

    def __init__(self, bytes_limit: int) -> None:
        self._entries: dict[tuple[int, str, str], tuple[bytes, bytes]] = {}
        self._bytes = 0
        self._bytes_limit = bytes_limit

    def get(self, body: bytes, first: str, second: str) -> bytes | None:
        """The frame kept for (body, first, second), if any; `body` is matched by identity."""
        hit = self._entries.get((id(body), first, second))
        return hit[1] if hit is not None and hit[0] is body else None

    def put(self, body: bytes, first: str, second: str, data: bytes) -> bytes:
        """Keep `data` as the frame for (body, first, second) and return it (no closure per call: a fan-out
        asks once per stream)."""
        size = len(body) + len(data)
        if len(self._entries) >= self.LIMIT or self._bytes + size > self._bytes_limit:
            self._entries.clear()
            self._bytes = 0
        self._entries[(id(body), first, second)] = (body, data)
        self._bytes += size
        return data


class PerResource:
    """Bytes derived from one EncodedResource (Delta's framed entry), built once however many streams a
    fan-out reaches. Keyed weakly by the resource, so an entry lives exactly as long as a snapshot holding it."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[EncodedResource, bytes] = weakref.WeakKeyDictionary()

    def get(self, resource: EncodedResource, build: Callable[[EncodedResource], bytes]) -> bytes:
        found = self._entries.get(resource)
        if found is None:
            found = self._entries[resource] = build(resource)
        return found


class Served:
    """Filter-configuration versions this server's streams were given, the latest LIMIT of them: the SotW type
    versions, and Delta's per-resource keys (`delta.resource_key`).

    A configuration sent after the others (`protocol.SENT_LAST`, the deny list's recent list) is held back only
    from a client whose configurations all come from this server's history: along it, job ids only move from the
    recent list into the buckets, so the buckets first is the safe order. A client that holds another replica's
    (a failover) may need the other order (that replica sealed ids this one still holds as recent), which the
    versions cannot tell: it is answered as before. Noted once per snapshot, not per stream (`note_snapshot`)."""

    LIMIT = 16_384

    def __init__(self, limit: int = LIMIT) -> None:
        self._seen: dict[str, None] = {}
        self._limit = limit
        self._last: weakref.ref[TypeSnapshot] | None = None

    @staticmethod
    def key(name: str, version: str) -> str:
        """One resource's version as noted (the form of `delta.resource_key`)."""
        return f"{name}@{version}"

    def note_snapshot(self, typed: TypeSnapshot | None) -> None:
        """Note `typed`'s version and the key of each of its resources (a fan-out notes it once)."""
        if typed is None or (self._last is not None and self._last() is typed):
            return
        self._last = weakref.ref(typed)
        self.note(typed.version)
        for name, resource in typed.resources.items():
            self.note(self.key(name, resource.version))

    def note(self, version: str) -> None:
        """Remember `version` as the latest seen, forgetting the oldest past the limit."""
        seen = self._seen
        seen.pop(version, None)
        seen[version] = None
        if len(seen) > self._limit:
            del seen[next(iter(seen))]

    def __contains__(self, version: object) -> bool:
        return version in self._seen


class FanOutCache:
    """Everything the streams of a fan-out compute once and share, owned by the server (`XdsServer.fan_out`)
    and handed to every `AdsStream` and `DeltaStream` it creates.

    Sharing is what keeps a push O(streams) rather than O(streams x resources); only streams given the same
    object share, so a test builds a fresh one (or one for the streams whose sharing it checks). Nothing in it
    is per stream: nonces are the streams' own, and only the bytes of responses that happen to carry the same
    nonce (streams with the same history, the usual case in a group) are shared whole (`wire`).
    """

    def __init__(self) -> None:
        # One table for both protocols: SotW and Delta streams of a group subscribe to the same names.
        self.subscriptions = Interned()
        # SotW: what a stream still holds after an unsubscribe, make-before-break CDS unions, removed clusters,
        # and responses framed but for the nonce (a few pushes of a multi-megabyte route configuration).
        self.kept_names = IdentityMemo()
        self.unions = PerSnapshot()
        self.removals = PerSnapshot()
        # SotW filter configurations: what changed for the streams holding the same names (`protocol.changes`).
        self.subsets = PerSnapshot()
        self.frames = Frames(bytes_limit=64 << 20)
        # Both: whole responses as written, nonce included (`protocol.Response.wire`), for streams whose nonces
        # coincide; the responses of the push being written, at most.
        self.wire = Frames(bytes_limit=32 << 20)
        # Delta: framed resource entries, the diff base -> current, and that diff as each subscription sees it.
        self.resource_entries = PerResource()
        self.diffs = PerSnapshot()
        self.views = PerSnapshot()
        # Both: the filter-configuration versions streams were given (`Served`).
        self.served = Served()
