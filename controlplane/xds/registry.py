"""What operators see about connected proxies, and which versions each node has rejected.

One `ProxyRecord` per open ADS stream (a node can briefly have two while Envoy reconnects before the old
stream is noticed dead). The NACK memory is per node id and outlives streams: a version a node rejected is
never pushed to it again, even after a reconnect, because Envoy would only reject it again (and for CDS/LDS
a rejected response can still be partially applied). It is bounded to the most recently seen node ids.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

from controlplane.xds.protocol import type_label

ERROR_LIMIT_BYTES = 2048
NACK_MEMORY_NODES = 10_000
NACK_MEMORY_VERSIONS = 64  # per node and type: enough for any realistic run of bad pushes
_TRUNCATED = " …[truncated]"


def truncate_error(text: str, limit: int = ERROR_LIMIT_BYTES) -> str:
    """At most `limit` UTF-8 bytes: Envoy error texts can be many KB of proto debug output."""
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
    """Connected proxies and the per-node NACK memory; implements protocol.RejectedVersions."""

    def __init__(self, *, memory_nodes: int = NACK_MEMORY_NODES) -> None:
        self._records: set[ProxyRecord] = set()
        self._memory: OrderedDict[str, dict[str, list[str]]] = OrderedDict()
        self._memory_nodes = memory_nodes

    def connect(self, node_id: str, group: str, peer: str, now: float) -> ProxyRecord:
        record = ProxyRecord(node_id, group, peer, now)
        self._records.add(record)
        return record

    def disconnect(self, record: ProxyRecord) -> list[str]:
        """Forget the stream; returns the type URLs it was still NACKing (for the rejecting-proxies gauge)."""
        self._records.discard(record)
        return list(record.nacks)

    def acked(self, record: ProxyRecord, type_url: str, version: str) -> bool:
        """Record an ACK; True when it ends a NACK of that type (the proxy is no longer rejecting it)."""
        record.acked[type_url] = version
        return record.nacks.pop(type_url, None) is not None

    def nacked(self, record: ProxyRecord, type_url: str, version: str, error: str, now: float) -> bool:
        """Record a NACK on the stream and in the node's memory; True when the type starts NACKing."""
        self.remember_rejected(record.node_id, type_url, version)
        starts = type_url not in record.nacks
        record.nacks[type_url] = NackRecord(type_url, version, truncate_error(error), now)
        return starts

    def remember_rejected(self, node_id: str, type_url: str, version: str) -> None:
        by_type = self._memory.pop(node_id, None) or {}
        self._memory[node_id] = by_type  # most recently used last
        versions = by_type.setdefault(type_url, [])
        if version not in versions:
            versions.append(version)
            del versions[:-NACK_MEMORY_VERSIONS]
        while len(self._memory) > self._memory_nodes:
            self._memory.popitem(last=False)

    def is_rejected(self, node_id: str, type_url: str, version: str) -> bool:
        by_type = self._memory.get(node_id)
        return by_type is not None and version in by_type.get(type_url, ())

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
