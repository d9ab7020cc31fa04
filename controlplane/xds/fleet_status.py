"""What operators see about connected proxies: one record per stream, and the ``/status`` fleet queries.

One `ProxyRecord` per open ADS stream (a node can briefly have two while Envoy reconnects before the old
stream is noticed dead). The versions a node rejected, which the protocol machines consult, are not kept
here but in `nack_memory.NackMemory`: the registry tells it of streams and NACKs and hands it to the server.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from controlplane.snapshots.snapshot import EXTENSION_CONFIG, TypeSnapshot
from controlplane.xds.nack_memory import NackMemory
from controlplane.xds.protocol import TYPE_LABELS, type_label

if TYPE_CHECKING:
    from controlplane.snapshots.cache import SnapshotCache

ERROR_LIMIT_BYTES = 2048
_TRUNCATED = " …[truncated]"


# Envoy's NACK text quotes the rejected resource as proto debug text, AWS credentials included (observed: an
# `AwsRequestSigningPerRoute` refused in RDS showed `secret_access_key` in clear, only `session_token` redacted).
# Both are secrets (compiler/aws.py): never logged nor kept in the fleet status. Envoy's JSON renderings of a
# message (`"secret_access_key": "..."`, or lowerCamelCase `"secretAccessKey"`) are matched too.
_SECRET_FIELDS = re.compile(
    r'\b(secret_access_key|session_token|secretAccessKey|sessionToken)("?\s*:\s*)"(?:[^"\\]|\\.)*"'
)


def truncate_error(text: str, limit: int = ERROR_LIMIT_BYTES) -> str:
    """At most `limit` UTF-8 bytes: Envoy error texts can be many KB of proto debug output. Secrets quoted in it
    are redacted first (see `_SECRET_FIELDS`)."""
    text = _SECRET_FIELDS.sub(r'\1\2"[redacted]"', text)
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= limit:
        return text
    keep = limit - len(_TRUNCATED.encode())
    return encoded[:keep].decode("utf-8", errors="ignore") + _TRUNCATED


@dataclass(frozen=True, slots=True)
class NackRecord:
    type_url: str
    version: str
    error: str  # truncated
    at: float  # unix time

    def as_dict(self) -> dict[str, Any]:
        return {"type": type_label(self.type_url), "version": self.version, "error": self.error, "at": self.at}


@dataclass(slots=True, eq=False)
class ProxyRecord:
    """One connected stream as the status page shows it."""

    node_id: str
    group: str
    peer: str
    connected_since: float  # unix time
    protocol: str = "sotw"
    acked: dict[str, str] = field(default_factory=dict)  # type URL -> version
    nacks: dict[str, NackRecord] = field(default_factory=dict)  # type URL -> NACK not yet followed by an ACK

    @property
    def last_nack(self) -> NackRecord | None:
        return max(self.nacks.values(), key=lambda n: n.at, default=None)

    def as_dict(self) -> dict[str, Any]:
        last = self.last_nack
        return {
            "node": self.node_id,
            "group": self.group,
            "protocol": self.protocol,
            "connected_since": self.connected_since,
            "peer": self.peer,
            "acked": {type_label(t): v for t, v in sorted(self.acked.items())},
            "last_nack": last.as_dict() if last is not None else None,
        }


class ProxyRegistry:
    """Connected proxies as the status page shows them; tells `rejections` (the NACK memory) of streams and
    NACKs, so a node's memory outlives its streams by exactly the grace period."""

    def __init__(self, rejections: NackMemory | None = None) -> None:
        self.rejections = rejections if rejections is not None else NackMemory()
        self._records: set[ProxyRecord] = set()
        self._ordered: list[ProxyRecord] | None = None  # records in listing order; None after membership changed

    def connect(self, node_id: str, group: str, peer: str, now: float) -> ProxyRecord:
        record = ProxyRecord(node_id, group, peer, now)
        self._records.add(record)
        self._ordered = None
        self.rejections.stream_opened(node_id)
        return record

    def disconnect(self, record: ProxyRecord, now: float | None = None) -> list[str]:
        """Forget the stream; returns the type URLs it was still NACKing (for the rejecting-proxies gauge).

        `now` (any monotonic clock) is passed to the NACK memory (`NackMemory.stream_closed`)."""
        if record not in self._records:
            return []
        self._records.discard(record)
        self._ordered = None
        self.rejections.stream_closed(record.node_id, now)
        return list(record.nacks)

    def acked(self, record: ProxyRecord, type_url: str, version: str, *, refusing: bool = False) -> bool:
        """Record an ACK; True when it ends a NACK of that type (the proxy is no longer rejecting it).

        `refusing`: the proxy still runs without a filter configuration it refused (Envoy ACKs later responses,
        and the refused bytes again, without applying them: docs/envoy-ecds.md §8), so the NACK stays."""
        record.acked[type_url] = version
        return not refusing and record.nacks.pop(type_url, None) is not None

    def nacked(
        self, record: ProxyRecord, type_url: str, version: str, error: str, now: float, *, remember: bool = True
    ) -> bool:
        """Record a NACK on the stream and, with `remember`, in the node's memory (the version is not sent to it
        again); True when the type starts NACKing."""
        if remember:
            self.rejections.remember_rejected(record.node_id, type_url, version)
        starts = type_url not in record.nacks
        record.nacks[type_url] = NackRecord(type_url, version, truncate_error(error), now)
        return starts

    def records(self) -> list[ProxyRecord]:
        return sorted(self._records, key=lambda r: (r.group, r.node_id, r.connected_since))

    def status(self) -> list[dict[str, Any]]:
        """JSON-ready, sorted by group then node id so repeated reads diff cleanly."""
        return [r.as_dict() for r in self.records()]

    def summary(self) -> dict[str, Any]:
        counts: defaultdict[str, int] = defaultdict(int)
        for record in self._records:
            counts[record.group] += 1
        return {"by_group": dict(sorted(counts.items()))}

    def fleet(self, query: FleetQuery, current: CurrentVersions) -> dict[str, Any]:
        """The ``/status`` proxy listing and summary for `query`; see `fleet_status`."""
        return fleet_status(self._in_order(), query, current)

    def _in_order(self) -> list[ProxyRecord]:
        """The records sorted for listing, re-sorted only after a connect or disconnect.

        Sorting 10,000 records costs more than filtering them, and a status poll between reconnects would
        otherwise pay it every time; the sort key (group, node id, connect time) never changes on a record.
        """
        if self._ordered is None:
            self._ordered = sorted(self._records, key=_record_order)
        return self._ordered


# --- the fleet view behind /status ----------------------------------------------------------------------------
#
# At fleet size (10,000 proxies) nobody reads every row: operators ask "which group is behind, on which type,
# and who is rejecting config". So the filters and the summary run server-side over the live records in one
# pass, and only the requested page of rows is turned into JSON.

DEFAULT_LIMIT = 100  # rows listed unless asked for more: a 10k fleet must not answer 10k rows by default
PROTOCOLS = ("sotw", "delta")
VERSIONS_LISTED = 8  # per group and type; more distinct versions than this means churn, counted as a rest
# sds, cds, eds, lds, rds: push order, as the status table shows them. Filter configurations (ECDS) are listed
# (after these) only where a group has some or a proxy holds or rejects one: no compiled policy has them yet.
_TYPE_ORDER = tuple(t for t in TYPE_LABELS if t != EXTENSION_CONFIG)
_NO_EXTENSION_CONFIGS = TypeSnapshot.of(EXTENSION_CONFIG, ()).version  # the version of a group without any
_GLOB_CHARACTERS = frozenset("*?[")

CurrentVersions = Callable[[str], Mapping[str, str]]
"""A group's current snapshot version per type URL: what every proxy of that group should end up holding."""


@dataclass(frozen=True, slots=True)
class FleetQuery:
    """What ``/status`` was asked for. Filters narrow the summary and the listing; limit/offset only the listing."""

    group: str | None = None  # exact gateway group (node.cluster)
    protocol: str | None = None  # "sotw" or "delta"
    node: str | None = None  # a substring of the node id, or a glob (fnmatch) when it has * ? or [
    nacked: bool = False  # only proxies NACKing some type right now
    stale: bool = False  # only proxies holding a version of some type that is not the group's current one
    limit: int | None = DEFAULT_LIMIT  # None: every matching proxy
    offset: int = 0
    proxies: bool = True  # False: the summary only, no rows

    def filters(self) -> dict[str, Any]:
        """The filters in effect, echoed in the answer so a reader knows what the counts cover."""
        given = {
            "group": self.group,
            "protocol": self.protocol,
            "node": self.node,
            "nacked": self.nacked,
            "stale": self.stale,
        }
        return {name: value for name, value in given.items() if value}


def node_matcher(pattern: str | None) -> Callable[[str], object] | None:
    """A substring test, or a whole-id glob when the pattern has glob characters (``gw-prod-*``)."""
    if not pattern:
        return None
    if _GLOB_CHARACTERS.intersection(pattern):
        return re.compile(fnmatch.translate(pattern)).match
    return lambda node_id: pattern in node_id


def is_stale(acked: Iterable[tuple[str, str]], current: Mapping[str, str]) -> bool:
    """True when a proxy holding these (type URL, version) ACKs has some type off the current version.

    A type the proxy never ACKed is not stale: Envoy subscribes to SDS, EDS and RDS only when its config
    needs them, so "no version" is normal and counted separately (``no_ack``). A proxy NACKing the current
    version usually still holds the previous one, so it is stale too, which is the point.
    """
    return any(current.get(type_url, version) != version for type_url, version in acked)


_Shape = tuple[str, str, tuple[tuple[str, str], ...], tuple[str, ...]]
"""What the summary needs of a proxy: group, protocol, ACKed (type URL, version) pairs, types NACKing.

A fleet has few distinct shapes (a handful of versions per group at any time), so the scan only counts shapes,
and the per-type arithmetic runs once per shape instead of once per proxy: that is what keeps 10,000 proxies
in a few milliseconds."""


def _shape(record: ProxyRecord) -> _Shape:
    return (record.group, record.protocol, tuple(record.acked.items()), tuple(record.nacks))


@dataclass(slots=True)
class _GroupTally:
    """Counts for one group, added up from shapes."""

    proxies: int = 0
    nacking: int = 0
    stale: int = 0
    protocols: dict[str, int] = field(default_factory=dict)
    versions: dict[str, dict[str, int]] = field(default_factory=dict)  # type URL -> version -> proxies
    nacking_types: dict[str, int] = field(default_factory=dict)  # type URL -> proxies NACKing it

    def add(self, shape: _Shape, count: int, *, stale: bool) -> None:
        _, protocol, acked, nacking = shape
        self.proxies += count
        self.protocols[protocol] = self.protocols.get(protocol, 0) + count
        self.stale += count if stale else 0
        self.nacking += count if nacking else 0
        for type_url in nacking:
            self.nacking_types[type_url] = self.nacking_types.get(type_url, 0) + count
        for type_url, version in acked:
            held = self.versions.setdefault(type_url, {})
            held[version] = held.get(version, 0) + count

    def as_dict(self, current: Mapping[str, str]) -> dict[str, Any]:
        others = {t for t in (*self.versions, *self.nacking_types, *current) if t not in _TYPE_ORDER}
        used = EXTENSION_CONFIG in self.versions or EXTENSION_CONFIG in self.nacking_types
        if not used and current.get(EXTENSION_CONFIG) == _NO_EXTENSION_CONFIGS:
            others.discard(EXTENSION_CONFIG)  # nothing to show: the group has none, no proxy holds or rejects one
        return {
            "proxies": self.proxies,
            "nacking": self.nacking,
            "stale": self.stale,
            "protocols": dict(sorted(self.protocols.items())),
            "types": {type_label(t): self._type_summary(t, current.get(t)) for t in (*_TYPE_ORDER, *sorted(others))},
        }

    def _type_summary(self, type_url: str, current: str | None) -> dict[str, Any]:
        held = self.versions.get(type_url, {})
        holding = sum(held.values())
        on_current = held.get(current, 0) if current is not None else 0
        ranked = sorted(held.items(), key=lambda item: (-item[1], item[0]))[:VERSIONS_LISTED]
        return {
            "current": current,
            "on_current": on_current,
            "stale": holding - on_current if current is not None else 0,
            "no_ack": self.proxies - holding,
            "nacking": self.nacking_types.get(type_url, 0),
            "versions": dict(ranked),  # most held first
            "other_versions": holding - sum(count for _, count in ranked),
        }


def _memoized(current: CurrentVersions) -> CurrentVersions:
    """Ask for each group's versions once per request, not once per proxy."""
    seen: dict[str, Mapping[str, str]] = {}

    def lookup(group: str) -> Mapping[str, str]:
        versions = seen.get(group)
        if versions is None:
            versions = seen[group] = current(group)
        return versions

    return lookup


def _admission(query: FleetQuery) -> Callable[[ProxyRecord], bool] | None:
    """The filters that need no snapshot versions as one test, or None when there are none (the common case)."""
    node_match = node_matcher(query.node)
    if query.group is None and query.protocol is None and not query.nacked and node_match is None:
        return None

    def admits(record: ProxyRecord) -> bool:
        return (
            (query.group is None or record.group == query.group)
            and (query.protocol is None or record.protocol == query.protocol)
            and (not query.nacked or bool(record.nacks))
            and (node_match is None or bool(node_match(record.node_id)))
        )

    return admits


_record_order = attrgetter("group", "node_id", "connected_since")


def _page(selected: list[ProxyRecord], query: FleetQuery) -> list[ProxyRecord]:
    if not query.proxies:
        return []
    end = None if query.limit is None else query.offset + query.limit
    return selected[query.offset : end]


def fleet_status(records: Sequence[ProxyRecord], query: FleetQuery, current: CurrentVersions) -> dict[str, Any]:
    """Filter, count and page the fleet in one scan.

    ``records`` come in listing order, by group then node id then connect time (`ProxyRegistry` keeps them
    so), which keeps pages stable across reads and spares a sort per request. ``summary`` covers every proxy
    matching the filters (never just the page), ``summary.connected`` the whole fleet, and ``page.total`` is
    what a client pages through; only ``proxies`` (the page) is per row.
    """
    versions = _memoized(current)
    admits = _admission(query)
    shapes: dict[_Shape, int] = {}
    stale_shapes: dict[_Shape, bool] = {}
    selected: list[ProxyRecord] = []
    for record in records:
        if admits is not None and not admits(record):
            continue
        shape = _shape(record)
        if query.stale:
            stale = stale_shapes.get(shape)
            if stale is None:
                stale = stale_shapes[shape] = is_stale(shape[2], versions(shape[0]))
            if not stale:
                continue
        shapes[shape] = shapes.get(shape, 0) + 1
        selected.append(record)
    page = _page(selected, query)
    result: dict[str, Any] = {
        "filters": query.filters(),
        "page": {"total": len(selected), "offset": query.offset, "limit": query.limit, "shown": len(page)},
        "summary": _summary(shapes, len(records), versions),
    }
    if query.proxies:
        result["proxies"] = [record.as_dict() for record in page]
    return result


def _summary(shapes: dict[_Shape, int], connected: int, versions: CurrentVersions) -> dict[str, Any]:
    tallies: dict[str, _GroupTally] = {}
    for shape, count in shapes.items():
        group = shape[0]
        tally = tallies.get(group) or tallies.setdefault(group, _GroupTally())
        tally.add(shape, count, stale=is_stale(shape[2], versions(group)))
    groups = sorted(tallies)
    return {
        "connected": connected,
        "proxies": sum(t.proxies for t in tallies.values()),
        "nacking": sum(t.nacking for t in tallies.values()),
        "stale": sum(t.stale for t in tallies.values()),
        "by_group": {g: tallies[g].proxies for g in groups},
        "groups": {g: tallies[g].as_dict(versions(g)) for g in groups},
    }


def cache_versions(cache: SnapshotCache) -> CurrentVersions:
    """Current versions as the xDS server serves them: a group the policy does not know gets the empty snapshot."""

    def current(group: str) -> Mapping[str, str]:
        return {type_url: typed.version for type_url, typed in cache.get(group).types.items()}

    return current
