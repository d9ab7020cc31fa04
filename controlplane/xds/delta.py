"""The Delta (incremental) ADS stream protocol as a pure state machine, the sibling of `protocol.AdsStream`.

Same contract as the SotW machine: fed requests and snapshots, it returns `protocol.Output` (responses already
serialized, events for the registry, metrics and logs), with no I/O and no clock. The rules, from
`xds-protocol-observed.md` §2 and §7:

* per type the stream keeps a wildcard flag (CDS/LDS with an EMPTY first subscribe list, as Envoy 1.40 sends
  it, or "*"), the explicit subscriptions, and what the client holds (name → version), seeded from
  `initial_resource_versions` on reconnect and updated optimistically when a resource is sent;
* a response carries only resources whose version differs from what the client holds, plus
  `removed_resources` for names it holds, still wants, and the snapshot no longer has; so a reconnecting
  client holding the current content gets nothing (versions are content hashes);
* subscription changes arrive as separate requests with an empty nonce and are always applied: they are
  diffs, so dropping one (even one with an unknown nonce) would lose it for good;
* a request echoing an outstanding nonce ACKs (or, with `error_detail`, NACKs) that response; a NACKed
  resource version is remembered for the node (`RejectionMemory`, shared with reconnects) and never sent
  again, while a later snapshot with a different version of that resource is.

Make-before-break for removed clusters needs no union here: each type's removal travels in its own response
and the push order (SECRET, CDS, EDS, LDS, RDS) is the SotW one.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots.snapshot import PUSH_ORDER, WILDCARD_TYPES, EncodedResource, Snapshot, TypeSnapshot, varint
from controlplane.xds.protocol import (
    Ack,
    Event,
    Nack,
    Output,
    RejectedVersions,
    Response,
    Resumed,
    Stale,
    StreamIdentity,
    Subscribed,
    Withheld,
)

WILDCARD = "*"
# A client that never ACKs must not grow the stream's memory: older outstanding responses are forgotten.
MAX_OUTSTANDING = 16
_RESOURCES_TAG = b"\x12"  # DeltaDiscoveryResponse.resources = 2, wire type 2
_NAME_TAG = b"\x1a"  # Resource.name = 3
_VERSION_TAG = b"\x0a"  # Resource.version = 1


class RejectionMemory(RejectedVersions, Protocol):
    """`RejectedVersions` that can also be told: Delta learns per resource which versions a node rejected.

    `ProxyRegistry` is one; the machine stores `resource_key(name, version)` under the type URL, so the
    memory survives the stream exactly as SotW type versions do.
    """

    def remember_rejected(self, node_id: str, type_url: str, version: str) -> None: ...


class _Forgetful:
    def is_rejected(self, node_id: str, type_url: str, version: str) -> bool:
        return False

    def remember_rejected(self, node_id: str, type_url: str, version: str) -> None:
        pass


def resource_key(name: str, version: str) -> str:
    """How a rejected resource version is remembered (versions are content hashes, not unique per name)."""
    return f"{name}@{version}"


def _frame_resource(resource: EncodedResource) -> bytes:
    """`DeltaDiscoveryResponse.resources` entry: `Resource{name, version, resource}` around the stored bytes.

    `response_entry` is tag 2 + length + Any, and `Resource.resource` is field 2 as well, so it is already
    the encoded `resource` field: the Any is neither parsed nor re-serialized.
    """
    name = resource.name.encode()
    version = resource.version.encode()
    head = _NAME_TAG + varint(len(name)) + name + _VERSION_TAG + varint(len(version)) + version
    size = len(head) + len(resource.response_entry)
    return b"".join((_RESOURCES_TAG, varint(size), head, resource.response_entry))


class _FramedResources:
    """Framed entries per resource (and so per version), built once however many streams a fan-out reaches.

    Keyed weakly by the EncodedResource, so an entry lives exactly as long as a snapshot holding it.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[EncodedResource, bytes] = weakref.WeakKeyDictionary()

    def entry(self, resource: EncodedResource) -> bytes:
        framed = self._entries.get(resource)
        if framed is None:
            framed = self._entries[resource] = _frame_resource(resource)
        return framed


_FRAMED = _FramedResources()


def frame_delta_response(
    entries: bytes, version: str, type_url: str, nonce: str, removed: tuple[str, ...] = ()
) -> bytes:
    """DeltaDiscoveryResponse bytes from pre-framed `resources` entries (protobuf takes fields in any order)."""
    tail = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=version, type_url=type_url, nonce=nonce, removed_resources=removed
    )
    encoded: bytes = tail.SerializeToString()
    return entries + encoded


class _Sent(NamedTuple):
    """An outstanding response: what it changed in `held`, so a NACK can undo exactly that."""

    version: str
    at: float
    keys: tuple[str, ...]  # resource_key of every resource it carried
    previous: tuple[tuple[str, str | None], ...]  # name → version held before it (None = not held)


@dataclass(slots=True)
class DeltaTypeState:
    """Everything the stream knows about one type URL."""

    requested: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    held: dict[str, str] = field(default_factory=dict)  # what the client has: name → version
    answered: bool = False  # a response was sent, or the client was found up to date (Resumed)
    outstanding: dict[str, _Sent] = field(default_factory=dict)  # nonce → response not yet ACKed/NACKed
    acked_version: str = ""
    nacked: set[str] = field(default_factory=set)  # resource keys rejected on this stream
    withheld: str | None = None  # snapshot version last reported as Withheld, to report it once

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def subscription(self) -> frozenset[str] | None:
        return None if self.wildcard else frozenset(self.names)


class DeltaStream(StreamIdentity):
    """The protocol state of one Delta ADS stream (the node is identified as in `AdsStream`)."""

    def __init__(self, rejected: RejectionMemory | None = None) -> None:
        super().__init__()
        self.snapshot: Snapshot | None = None
        self._rejected: RejectionMemory = rejected if rejected is not None else _Forgetful()
        self._types: dict[str, DeltaTypeState] = {}
        self._last_nonce = 0

    def type_state(self, type_url: str) -> DeltaTypeState | None:
        """Read-only view for status and tests; do not mutate."""
        return self._types.get(type_url)

    # -- inputs

    def receive(self, request: discovery_pb2.DeltaDiscoveryRequest, now: float) -> Output:
        """Handle one DeltaDiscoveryRequest; `now` is used for push→ACK latency only."""
        events: list[Event] = []
        self._identify(request.node, events)
        type_url = request.type_url
        if not self._supported(type_url, events):
            return Output((), tuple(events))
        state = self._types.setdefault(type_url, DeltaTypeState())
        if request.response_nonce:
            self._answer(type_url, state, request, now, events)
        self._subscribe(type_url, state, request, events)
        return self._plan(now, events)

    def set_snapshot(self, snapshot: Snapshot, now: float) -> Output:
        """Make `snapshot` current and push what changed, in PUSH_ORDER."""
        if snapshot is self.snapshot:
            return Output()
        self.snapshot = snapshot
        return self._plan(now, [])

    # -- request handling

    def _subscribe(
        self, type_url: str, state: DeltaTypeState, request: discovery_pb2.DeltaDiscoveryRequest, events: list[Event]
    ) -> None:
        before = state.subscription() if state.requested else ()
        subscribe = set(request.resource_names_subscribe)
        if not state.requested:
            state.requested = True
            # Legacy wildcard: Envoy opens CDS/LDS with an empty list, not "*" (reference §7.7).
            state.wildcard = WILDCARD in subscribe or (type_url in WILDCARD_TYPES and not subscribe)
            state.held = dict(request.initial_resource_versions)
            state.names.update(n for n in state.held if not state.wildcard)
        elif WILDCARD in subscribe:
            state.wildcard = True
        subscribe.discard(WILDCARD)
        state.names |= subscribe
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
                state.held = {n: v for n, v in state.held.items() if n in state.names}
            else:
                state.names.discard(name)
                if not state.wildcard:
                    state.held.pop(name, None)  # Envoy drops what it unsubscribes from
        after = state.subscription()
        if after != before:
            events.append(Subscribed(type_url, after))

    def _answer(
        self,
        type_url: str,
        state: DeltaTypeState,
        request: discovery_pb2.DeltaDiscoveryRequest,
        now: float,
        events: list[Event],
    ) -> None:
        """The request names a response: ACK or NACK it, or report it Stale when it is not outstanding."""
        nonce = request.response_nonce
        sent = state.outstanding.pop(nonce, None)
        if sent is None:
            events.append(Stale(type_url, nonce, max(state.outstanding, key=int, default="")))
            return
        latency = max(0.0, now - sent.at)
        if not request.HasField("error_detail"):
            state.acked_version = sent.version
            events.append(Ack(type_url, sent.version, nonce, latency))
            return
        for key in sent.keys:
            state.nacked.add(key)
            self._rejected.remember_rejected(self.node_id, type_url, key)
        for name, version in sent.previous:  # the client did not take them: it holds what it had
            if version is None:
                state.held.pop(name, None)
            else:
                state.held[name] = version
        detail = request.error_detail
        events.append(Nack(type_url, sent.version, nonce, state.acked_version, detail.message, detail.code, latency))

    # -- deciding what to send

    def _plan(self, now: float, events: list[Event]) -> Output:
        snapshot = self.snapshot
        if snapshot is None:
            return Output((), tuple(events))
        responses: list[Response] = []
        for type_url in PUSH_ORDER:
            state = self._types.get(type_url)
            current = snapshot.types.get(type_url)
            if state is None or not state.requested or current is None:
                continue
            response = self._respond(type_url, state, current, now, events)
            if response is not None:
                responses.append(response)
        return Output(tuple(responses), tuple(events))

    def _respond(
        self, type_url: str, state: DeltaTypeState, current: TypeSnapshot, now: float, events: list[Event]
    ) -> Response | None:
        resources = current.resources
        wanted: Mapping[str, EncodedResource] | list[str] = resources if state.wildcard else sorted(state.names)
        changed: list[EncodedResource] = []
        blocked = False
        for name in wanted:
            resource = resources.get(name)
            if resource is None or state.held.get(name) == resource.version:
                continue
            if self._is_rejected(type_url, state, name, resource.version):
                blocked = True
            else:
                changed.append(resource)
        removed = tuple(sorted(n for n in state.held if n not in resources and state.wants(n)))
        if blocked and state.withheld != current.version:
            state.withheld = current.version
            events.append(Withheld(type_url, current.version))
        if changed or removed or (not state.answered and not state.held):
            # An empty first answer is still sent: Envoy's initialisation waits for CDS/LDS to answer.
            return self._send(type_url, state, current.version, changed, removed, now)
        if not state.answered:
            state.answered = True
            state.acked_version = current.version
            events.append(Resumed(type_url, current.version))
        return None

    def _is_rejected(self, type_url: str, state: DeltaTypeState, name: str, version: str) -> bool:
        key = resource_key(name, version)
        return key in state.nacked or self._rejected.is_rejected(self.node_id, type_url, key)

    def _send(
        self,
        type_url: str,
        state: DeltaTypeState,
        version: str,
        changed: list[EncodedResource],
        removed: tuple[str, ...],
        now: float,
    ) -> Response:
        self._last_nonce += 1
        nonce = str(self._last_nonce)
        held = state.held
        previous = tuple((r.name, held.get(r.name)) for r in changed)
        previous += tuple((n, held[n]) for n in removed)
        for resource in changed:
            held[resource.name] = resource.version
        for name in removed:
            del held[name]
        keys = tuple(resource_key(r.name, r.version) for r in changed)
        state.outstanding[nonce] = _Sent(version, now, keys, previous)
        if len(state.outstanding) > MAX_OUTSTANDING:
            del state.outstanding[next(iter(state.outstanding))]
        state.answered = True
        entries = b"".join(_FRAMED.entry(r) for r in changed)
        data = frame_delta_response(entries, version, type_url, nonce, removed)
        return Response(type_url, version, nonce, data, tuple(r.name for r in changed))
