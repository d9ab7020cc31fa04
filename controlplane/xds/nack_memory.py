"""Which versions each node has rejected: the memory the xDS state machines consult before every push.

The NACK memory is per node id and outlives streams: a version a node rejected is never pushed to it again,
even after a reconnect, because Envoy would only reject it again (and for CDS/LDS a rejected response can
still be partially applied). It is bounded to the most recently seen node ids, and a node's memory is
forgotten once it has had no stream for `forget_after` seconds (10 minutes): Envoy reconnects within seconds
(0.1 to 2.6 s observed), so only a node that is gone for good, or a client that invented its id, is
forgotten, and nothing a departed client sent stays behind. A new process under the same node id (its first
request holds no version) starts with no memory (`forget`): it is sent what it asks for, as a new node would be.
"""

from __future__ import annotations

from collections import OrderedDict

NACK_MEMORY_NODES = 10_000
NACK_MEMORY_VERSIONS = 64  # per node and type: enough for any realistic run of bad pushes
FORGET_AFTER = 600.0  # seconds without a stream after which a node's NACK memory is dropped


class NackMemory:
    """Rejected versions per node and type; implements `protocol.RejectedVersions` and `delta.RejectionMemory`.

    It learns of streams (`stream_opened`, `stream_closed`) only to know when a node is gone for good.
    """

    def __init__(self, *, memory_nodes: int = NACK_MEMORY_NODES, forget_after: float = FORGET_AFTER) -> None:
        self._memory: OrderedDict[str, dict[str, list[str]]] = OrderedDict()
        self._memory_nodes = memory_nodes
        self._forget_after = forget_after
        self._streams: dict[str, int] = {}  # node id -> open streams
        self._gone: OrderedDict[str, float] = OrderedDict()  # node id -> when its last stream ended, oldest first

    def stream_opened(self, node_id: str) -> None:
        self._streams[node_id] = self._streams.get(node_id, 0) + 1
        self._gone.pop(node_id, None)

    def stream_closed(self, node_id: str, now: float | None) -> None:
        """`now` (any monotonic clock) starts the node's grace period when this was its last stream, and drops
        the memory of nodes gone for longer than `forget_after`; None leaves the memory as it is."""
        left = self._streams.get(node_id, 1) - 1
        if left > 0:
            self._streams[node_id] = left
        else:
            self._streams.pop(node_id, None)
            if now is not None:
                self._gone[node_id] = now
        if now is not None:
            self._expire(now)

    def _expire(self, now: float) -> None:
        while self._gone:
            node_id, since = next(iter(self._gone.items()))
            if now - since <= self._forget_after:
                return
            del self._gone[node_id]
            self._memory.pop(node_id, None)

    def forget(self, node_id: str) -> None:
        """A new Envoy process took this node id (its first request holds no version): what an earlier process
        refused says nothing of this one, which may run another bootstrap (the remedy for a refused RE2 program
        size, docs/envoy-ecds.md §9) or binary. It refuses a version again if it must."""
        self._memory.pop(node_id, None)

    def memory_size(self) -> int:
        """Node ids with remembered rejections (bounded by `memory_nodes`)."""
        return len(self._memory)

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

    def has_rejections(self, node_id: str, type_url: str) -> bool:
        by_type = self._memory.get(node_id)
        return by_type is not None and bool(by_type.get(type_url))
