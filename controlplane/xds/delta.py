"""The Delta (incremental) ADS stream protocol as a pure state machine, the sibling of `protocol.AdsStream`.

Same contract as the SotW machine: fed requests and snapshots, it returns `protocol.Output` (responses already
serialized, events for the registry, metrics and logs), with no I/O and no clock. The rules, from
docs/xds-protocol.md ("Delta"):

* per type the stream keeps a wildcard flag (CDS/LDS with an EMPTY first subscribe list, as Envoy 1.40 sends
  it, or "*"), the explicit subscriptions, and what the client holds (name → version), seeded from
  `initial_resource_versions` on reconnect and updated optimistically when a resource is sent; a newly
  subscribed name is not held (Envoy drops what it unsubscribes from), unless the first request of the
  type, which carries both, reports it held (a reconnect subscribes EDS/RDS names by their versions);
* a response carries only resources whose version differs from what the client holds, plus
  `removed_resources` for names it holds, still wants, and the snapshot no longer has; so a reconnecting
  client holding the current content gets nothing (versions are content hashes);
* subscription changes arrive as separate requests with an empty nonce and are always applied: they are
  diffs, so dropping one (even one with an unknown nonce) would lose it for good;
* a request echoing an outstanding nonce ACKs (or, with `error_detail`, NACKs) that response; a NACKed
  resource version (or removal) is remembered for the node (`RejectionMemory`, shared with reconnects) and
  never sent again, while a later snapshot with a different version of that resource is. A NACK of a response
  past the 16 outstanding, still in `recent`, is one too (Envoy's connect burst sends 17 or more, and NACKs the
  first after all were answered: docs/envoy-ecds.md §8); a refused filter configuration stays refused, reported
  by every later `Ack` (`refusing`), until it is sent with other bytes or unsubscribed;
* make-before-break: a cluster that a new snapshot removes is kept (not listed in `removed_resources`, nor its
  endpoints) while the client may still route to it, i.e. until the listeners and routes of that snapshot are
  ACKed by this stream. Additions and changes go out at once, in PUSH_ORDER (SECRET, CDS, EDS, LDS, ECDS, RDS).
  Delta needs this as much as SotW: each type travels in its own response, and Envoy applies a CDS removal
  before it has seen the RDS update that stops routing to the cluster.
* filter configurations (ECDS) are named subscriptions like RDS and EDS, one resource per filter, so a change
  to one sends only that one. No hold applies to them: Envoy asks for one when a listener naming it arrives,
  and the listener warms until it comes (docs/envoy-ecds.md §2). A removal is sent as for any named type, and
  Envoy then falls back to the filter's `default_config` (or fails every request): a resource is retired by
  a listener that stops naming it, which unsubscribes it, not by dropping it first.
* the SENT_LAST filter configurations (the deny list's recent list) go after the others that change with them,
  as over SotW (`protocol`'s docstring, docs/envoy-ecds.md §10): a response that would carry one the client holds
  an older version of (`initial_resource_versions` on a reconnect, or sent on this stream) together with other
  resources carries the others alone, and the held one waits (the client keeps its version) until that response
  is answered. An ACK sends it; a NACK is handled as any (the refused resource is not sent again, the rest is).

Cost of a push. What a client holds is not copied per stream: per type the stream keeps a *base*, the
TypeSnapshot it was last brought in line with (shared by every stream of the group), and a small dict of
*overrides* where the client differs from it (withheld or kept resources, fresh subscriptions, reconnect
versions not yet reconciled). On a new snapshot the diff base → current is computed once for the whole
fan-out (`_diff`), filtered and framed once per subscription (`_View`), and each stream only looks at that
diff and its own overrides: CPU per stream and push is O(changed + overrides), memory per stream O(overrides).
Streams sent the same change share one framed response but for the nonce (`_View.unsent`); each stream
numbers its own responses. These memos live in the server's `FanOutCache`, handed to every stream, exactly as
long as the snapshot they describe (`PerSnapshot`): old snapshots are freed by reference counting as soon as
no stream's base or outstanding response names them.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots.snapshot import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    WILDCARD_TYPES,
    EncodedResource,
    Snapshot,
    TypeSnapshot,
    varint,
)
from controlplane.xds.memo import FanOutCache, PerResource, Served
from controlplane.xds.protocol import (
    MAX_SUBSCRIBED_NAMES,
    SENT_LAST,
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
    check_subscription,
    clip_nonce,
    forget_unwanted,
    frame_nonce,
    refuse,
    remember_recent,
    resend,
    take_through,
)

WILDCARD = "*"
# A client that never ACKs must not grow the stream's memory: older outstanding responses are forgotten, and
# kept past that (up to `protocol.RECENT_NONCES`) without what the client held before, only so that a NACK of one
# is still seen (Envoy's connect burst has one ECDS response per filter, 18 today: docs/envoy-ecds.md §8).
MAX_OUTSTANDING = 16
# The "version" of a removal in a resource key, per snapshot version: a NACKed removal is not retried until
# the type changes again (otherwise each request would re-send it, and each NACK ask for it again).
REMOVAL = "removed:"
# Types whose ACK means "nothing routes to a removed cluster any more" (make-before-break).
_CLUSTER_USERS = (LISTENER, ROUTE)
_RESOURCES_TAG = b"\x12"  # DeltaDiscoveryResponse.resources = 2, wire type 2
_SYSTEM_VERSION_TAG = b"\x0a"  # DeltaDiscoveryResponse.system_version_info = 1
_TYPE_URL_TAG = b"\x22"  # DeltaDiscoveryResponse.type_url = 4
_REMOVED_TAG = b"\x32"  # DeltaDiscoveryResponse.removed_resources = 6
_NAME_TAG = b"\x1a"  # Resource.name = 3
_VERSION_TAG = b"\x0a"  # Resource.version = 1
_NO_OVERRIDES: Mapping[str, str | None] = MappingProxyType({})
_NO_VERSIONS: Mapping[str, str] = MappingProxyType({})

Holding = str | None
"""The version of a resource a client holds, None when it holds none."""


class RejectionMemory(RejectedVersions, Protocol):
    """`RejectedVersions` that can also be told: Delta learns per resource which versions a node rejected.

    `ProxyRegistry` is one; the machine stores `resource_key(name, version)` under the type URL, so the
    memory survives the stream exactly as SotW type versions do.
    """

    def remember_rejected(self, node_id: str, type_url: str, version: str) -> None: ...

    def has_rejections(self, node_id: str, type_url: str) -> bool:
        """Whether this node rejected anything of the type: a push then need not ask about each resource."""
        ...


class _Forgetful:
    def is_rejected(self, node_id: str, type_url: str, version: str) -> bool:
        return False

    def remember_rejected(self, node_id: str, type_url: str, version: str) -> None:
        pass

    def has_rejections(self, node_id: str, type_url: str) -> bool:
        return False


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


def framed_body(entries: PerResource, resources: Iterable[EncodedResource]) -> bytes:
    """The `resources` entries of a response, each framed once per resource however many streams it reaches
    (`entries` is the server's `FanOutCache.resource_entries`)."""
    entry = entries.get
    return b"".join(entry(r, _frame_resource) for r in resources)


def _string(tag: bytes, value: str) -> bytes:
    data = value.encode()
    return tag + varint(len(data)) + data if data else b""  # proto3 leaves an empty string out


def frame_unsent(entries: bytes, version: str, type_url: str, removed: tuple[str, ...]) -> bytes:
    """A DeltaDiscoveryResponse but its nonce: shared by every stream sent the same change, which only
    appends its own nonce (`frame_nonce`); protobuf takes fields in any order."""
    head = _string(_SYSTEM_VERSION_TAG, version) + _string(_TYPE_URL_TAG, type_url)
    return b"".join((entries, head, *(_string(_REMOVED_TAG, n) for n in removed)))


def frame_delta_response(
    entries: bytes, version: str, type_url: str, nonce: str, removed: tuple[str, ...] = ()
) -> bytes:
    """DeltaDiscoveryResponse bytes from pre-framed `resources` entries, without a protobuf message."""
    return frame_unsent(entries, version, type_url, removed) + frame_nonce(nonce)


# ------------------------------------------------------------------------------- shared, per fan-out


def _version_in(snapshot: TypeSnapshot | None, name: str) -> Holding:
    resource = snapshot.resources.get(name) if snapshot is not None else None
    return None if resource is None else resource.version


class Diff(NamedTuple):
    """How `current` differs from a base, by name (both in name order)."""

    changed: tuple[str, ...]  # in current with another version than in the base, or not in the base
    removed: tuple[str, ...]  # in the base, not in current


def diff(base: TypeSnapshot | None, current: TypeSnapshot) -> Diff:
    """The one O(resources) step of a push; `_diff` runs it once per (base, current) for all streams."""
    resources = current.resources
    if base is None:
        return Diff(tuple(resources), ())
    if base is current:
        return Diff((), ())
    old = base.resources
    changed = tuple(
        n for n, r in resources.items() if (was := old.get(n)) is None or (was is not r and was.version != r.version)
    )
    return Diff(changed, tuple(n for n in old if n not in resources))


def _diff(shared: FanOutCache, base: TypeSnapshot | None, current: TypeSnapshot) -> Diff:
    """`diff` memoized per (base, current): a fan-out computes it once, not once per stream."""
    return shared.diffs.get(current, base, None, lambda: diff(base, current))


class _View:
    """A diff as one subscription sees it: what to send and to remove, with the keys to check and the body.

    Every stream with the same base, snapshot and subscription shares one view, so the resources, their
    names, their rejection keys and the framed body (built on first use) exist once per fan-out. It holds no
    reference to the snapshots it was computed from (see `PerSnapshot`), only their resources.
    """

    __slots__ = ("_entries", "_unsent", "keys", "names", "removed", "removed_keys", "resources", "type_url", "version")

    def __init__(
        self,
        shared: FanOutCache,
        resources: tuple[EncodedResource, ...],
        removed: tuple[str, ...],
        current: TypeSnapshot,
    ) -> None:
        self._entries = shared.resource_entries  # not `shared`: it holds this view (no cycle)
        self.resources = resources
        self.names = tuple(r.name for r in resources)
        self.keys = tuple(resource_key(r.name, r.version) for r in resources)
        self.removed = removed
        self.removed_keys = tuple(resource_key(n, REMOVAL + current.version) for n in removed)
        self.version = current.version
        self.type_url = current.type_url
        self._unsent: bytes | None = None

    @property
    def unsent(self) -> bytes:
        """The whole response but the nonce (`frame_unsent`), built on first use."""
        if self._unsent is None:
            body = framed_body(self._entries, self.resources)
            self._unsent = frame_unsent(body, self.version, self.type_url, self.removed)
        return self._unsent


def _view(
    shared: FanOutCache, base: TypeSnapshot | None, current: TypeSnapshot, wanted: frozenset[str] | None
) -> _View:
    """The view of `diff(base, current)` for a subscription (`wanted` None = wildcard)."""
    resources = current.resources
    if base is None and wanted is not None:  # a first answer: the subscription is usually the smaller side
        names: Iterable[str] = sorted(n for n in wanted if n in resources)
        removed: tuple[str, ...] = ()
    else:
        changes = _diff(shared, base, current)
        names, removed = changes.changed, changes.removed
        if wanted is not None:
            names = [n for n in names if n in wanted]
            removed = tuple(n for n in removed if n in wanted)
    return _View(shared, tuple(resources[n] for n in names), removed, current)


def _shared_view(
    shared: FanOutCache, base: TypeSnapshot | None, current: TypeSnapshot, wanted: frozenset[str] | None
) -> _View:
    """`_view` memoized per snapshots (by identity, see `PerSnapshot`) and interned subscription (by value)."""
    return shared.views.get(current, base, wanted, lambda: _view(shared, base, current, wanted))


_NOTHING: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------------------- per stream


class _Sent(NamedTuple):
    """An outstanding response: what it carried, and what the client held before, so a NACK can undo it.

    The tuples are usually the shared `_View`'s and `base` the shared snapshot: an outstanding response
    costs a stream a few references, not a copy of what it changed.
    """

    version: str
    at: float
    resources: tuple[EncodedResource, ...]
    removed: tuple[str, ...]
    base: TypeSnapshot | None  # held before = prior[name] if present, else base's version
    prior: Mapping[str, Holding]


@dataclass(slots=True)
class DeltaTypeState:
    """Everything the stream knows about one type URL.

    What the client holds of a name it wants is `overrides[name]` if present, else the version `base` has;
    of a name it does not want, nothing.
    """

    requested: bool = False
    wildcard: bool = False
    names: frozenset[str] = _NOTHING  # explicit subscriptions, interned (shared between streams)
    base: TypeSnapshot | None = None
    overrides: dict[str, Holding] = field(default_factory=dict)  # never shared: a `_Sent` keeps old ones
    kept: frozenset[str] = _NOTHING  # CDS: removed clusters still held for make-before-break
    answered: bool = False  # a response was sent, or the client was found up to date (Resumed)
    outstanding: dict[str, _Sent] = field(default_factory=dict)  # nonce → response not yet ACKed/NACKed
    acked_version: str = ""
    nacked: frozenset[str] = _NOTHING  # resource keys rejected on this stream
    withheld: str | None = None  # snapshot version last reported as Withheld, to report it once
    # responses pushed out of `outstanding` (without `base` and `prior`: they must not pin old snapshots), oldest first
    recent: dict[str, _Sent] = field(default_factory=dict)
    # filter configurations refused and not sent with other bytes since: name -> refused version (see protocol.Ack)
    refused: dict[str, str] = field(default_factory=dict)
    # the nonce of the last response that held SENT_LAST configurations back: they wait while it is unanswered
    held_back_by: str = ""

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def subscription(self) -> frozenset[str] | None:
        return None if self.wildcard else self.names

    def holding(self, name: str) -> Holding:
        if name in self.overrides:
            return self.overrides[name]
        return _version_in(self.base, name) if self.wants(name) else None

    def hold(self, name: str, version: Holding) -> None:
        """Record that the client holds `version` of `name` (None: nothing), as an override only if needed."""
        if version == (_version_in(self.base, name) if self.wants(name) else None):
            self.overrides.pop(name, None)
        else:
            self.overrides[name] = version

    @property
    def held(self) -> dict[str, str]:
        """What the client holds, materialized: O(resources), for status, tests and rare transitions only."""
        base = self.base.resources if self.base is not None else {}
        out = {n: r.version for n, r in base.items() if self.wants(n)}
        for name, version in self.overrides.items():
            if version is None:
                out.pop(name, None)
            else:
                out[name] = version
        return out

    def in_line_with(self, current: TypeSnapshot) -> bool:
        """True when the client holds exactly `current` of everything it wants and nothing is in flight."""
        base = self.base
        return base is not None and base.version == current.version and not self.overrides and not self.outstanding


class _Plan(NamedTuple):
    """One stream's answer for a type: the resources and removals to send, framed but for the nonce."""

    resources: tuple[EncodedResource, ...]
    names: tuple[str, ...]
    removed: tuple[str, ...]
    unsent: bytes
    blocked: bool  # something was withheld because this node rejected it


def _check_growth(type_url: str, state: DeltaTypeState | None, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
    """Refuse a request that would take the type past the subscription bounds, before anything of it is kept.

    Delta requests carry changes, so names from later requests add up: the bound is on what the stream would
    hold after this one, `initial_resource_versions` included (they are subscribed too, see `_open`)."""
    subscribe = request.resource_names_subscribe
    initial: Collection[str] = () if state is not None and state.requested else request.initial_resource_versions
    held = state.names if state is not None else _NOTHING
    count = len(held) + len(subscribe) + len(initial)  # an upper bound, counted exactly only past the bound
    if count > MAX_SUBSCRIBED_NAMES:
        count = len((held | set(subscribe) | set(initial)) - set(request.resource_names_unsubscribe) - {WILDCARD})
    check_subscription(type_url, itertools.chain(subscribe, initial), count)


class DeltaStream(StreamIdentity):
    """The protocol state of one Delta ADS stream (the node is identified as in `AdsStream`)."""

    def __init__(
        self, shared: FanOutCache, rejected: RejectionMemory | None = None, last: frozenset[str] = SENT_LAST
    ) -> None:
        """`shared`: the server's cache of what every stream of a fan-out computes alike. `last`: the filter
        configurations sent after the others that change with them (see the module's docstring)."""
        super().__init__()
        self.snapshot: Snapshot | None = None
        self._shared = shared
        self._last = last
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
        _check_growth(type_url, self._types.get(type_url), request)
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
        if self._last:
            self._shared.served.note_snapshot(snapshot.types.get(EXTENSION_CONFIG))
        return self._plan(now, [])

    # -- request handling

    def _subscribe(
        self, type_url: str, state: DeltaTypeState, request: discovery_pb2.DeltaDiscoveryRequest, events: list[Event]
    ) -> None:
        if state.requested and not request.resource_names_subscribe and not request.resource_names_unsubscribe:
            return  # an ACK or NACK: nothing to rebuild
        before = state.subscription() if state.requested else ()
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        reported: Mapping[str, str] = _NO_VERSIONS
        if not state.requested:
            reported = self._open(type_url, state, request, subscribe)
        elif WILDCARD in subscribe and not state.wildcard:
            # Every name becomes wanted, and a name the base has must not count as held: drop the base.
            state.overrides, state.base = dict(state.held), None
            state.wildcard = True
        subscribe.discard(WILDCARD)
        # A reconnecting client subscribes to what it holds in the same request that reports it: those names
        # are held as reported, not fresh (else every reconnect would re-send every EDS and RDS resource).
        fresh = [n for n in subscribe if not state.wants(n) and n not in reported]
        if WILDCARD in unsubscribe:
            state.wildcard = False
        names = (state.names | subscribe) - unsubscribe
        if names != state.names:
            state.names = self._shared.subscriptions.intern(names)
        for name in fresh:
            state.hold(name, None)  # a new subscription is not held, whatever the base has
        for name in [n for n in state.overrides if not state.wants(n)]:
            del state.overrides[name]  # Envoy drops what it unsubscribes from
        if state.refused:
            forget_unwanted(state.refused, state.wants)
        after = state.subscription()
        if after != before:
            events.append(Subscribed(type_url, after))

    @staticmethod
    def _open(
        type_url: str, state: DeltaTypeState, request: discovery_pb2.DeltaDiscoveryRequest, subscribe: set[str]
    ) -> Mapping[str, str]:
        """The first request of a type: wildcard or not, and what a reconnecting client already holds.

        Returns `initial_resource_versions` (name → version held): only this request carries them, and the
        names it reports are subscribed too, even if `resource_names_subscribe` omits them.
        """
        state.requested = True
        # Legacy wildcard: Envoy opens CDS/LDS with an empty list, not "*" (reference §7.7).
        state.wildcard = WILDCARD in subscribe or (type_url in WILDCARD_TYPES and not subscribe)
        initial: Mapping[str, str] = request.initial_resource_versions
        state.overrides = {sys.intern(n): v for n, v in initial.items()}
        if not state.wildcard:
            subscribe.update(initial)
        return initial

    def _answer(
        self,
        type_url: str,
        state: DeltaTypeState,
        request: discovery_pb2.DeltaDiscoveryRequest,
        now: float,
        events: list[Event],
    ) -> None:
        """The request names a response: ACK or NACK it, or report it Stale when it is not outstanding.

        A NACK of a response no longer outstanding but still remembered (`recent`) is a NACK all the same: in
        Envoy's connect burst it answers the first of 17 or more responses after the server sent them all."""
        nonce = request.response_nonce
        sent = state.outstanding.pop(nonce, None)
        late = sent is None
        if sent is not None:
            state.recent.clear()  # older than every outstanding response: Envoy answers in order
        elif request.HasField("error_detail"):
            sent = take_through(state.recent, nonce)
        else:
            take_through(state.recent, nonce)  # an ACK of one of them: the older ones will not be answered
        if sent is None:
            events.append(Stale(type_url, clip_nonce(nonce), max(state.outstanding, key=int, default="")))
            return
        latency = max(0.0, now - sent.at)
        if not request.HasField("error_detail"):
            state.acked_version = sent.version
            events.append(
                Ack(type_url, sent.version, nonce, latency, tuple(sorted(state.refused)) if state.refused else ())
            )
            return
        self._reject(type_url, state, sent)
        detail = request.error_detail
        names = tuple(r.name for r in sent.resources) + sent.removed
        events.append(
            Nack(
                type_url,
                sent.version,
                nonce,
                state.acked_version,
                detail.message,
                detail.code,
                latency,
                names,
                late=late,
            )
        )

    def _reject(self, type_url: str, state: DeltaTypeState, sent: _Sent) -> None:
        """A NACK: remember what the response carried as rejected; the client still holds what it had (for a
        late one, nothing: what it held before is no longer known, and a later change is sent as for a new name).
        A filter configuration it refused stays refused until it is sent with other bytes (see `protocol.Ack`)."""
        if type_url == EXTENSION_CONFIG:
            refuse(
                state.refused,
                (
                    (r.name, r.version)
                    for r in sent.resources
                    if state.wants(r.name) and state.holding(r.name) == r.version
                ),
            )
        keys = [resource_key(r.name, r.version) for r in sent.resources]
        keys += [resource_key(n, REMOVAL + sent.version) for n in sent.removed]
        state.nacked = state.nacked.union(keys)
        for key in keys:
            self._rejected.remember_rejected(self.node_id, type_url, key)
        undo = [(r.name, r.version) for r in sent.resources] + [(n, None) for n in sent.removed]
        for name, version in undo:
            # Not if a later response changed it again, or it was unsubscribed since.
            if state.wants(name) and state.holding(name) == version:
                previous = sent.prior[name] if name in sent.prior else _version_in(sent.base, name)
                state.hold(name, previous)

    # -- deciding what to send

    def _plan(self, now: float, events: list[Event]) -> Output:
        snapshot = self.snapshot
        if snapshot is None:
            return Output((), tuple(events))
        responses: list[Response] = []
        for type_url in PUSH_ORDER:
            self._update(type_url, snapshot, now, events, responses)
        cds = self._types.get(CLUSTER)
        if cds is not None and cds.kept and self._users_settled():
            # The listeners and routes needed nothing: the kept clusters (and endpoints) can go at once.
            for type_url in (CLUSTER, ENDPOINT):
                self._update(type_url, snapshot, now, events, responses)
        return Output(tuple(responses), tuple(events))

    def _update(
        self, type_url: str, snapshot: Snapshot, now: float, events: list[Event], responses: list[Response]
    ) -> None:
        state = self._types.get(type_url)
        current = snapshot.types.get(type_url)
        if state is None or not state.requested or current is None:
            return
        if type_url in _CLUSTER_USERS and state.answered and self._warming():
            return  # an update, not a first answer: sent when the clusters' ACKs arrive (they run _plan)
        response = self._respond(type_url, state, current, now, events)
        if response is not None:
            responses.append(response)

    def _respond(
        self, type_url: str, state: DeltaTypeState, current: TypeSnapshot, now: float, events: list[Event]
    ) -> Response | None:
        base = state.base
        if state.answered and not state.overrides and base is not None and base.version == current.version:
            state.base = current  # the fast path of a fan-out: nothing this type has changed
            return None
        # An empty first answer is still sent: Envoy's initialisation waits for CDS/LDS to answer.
        before = state.overrides
        empty_handed = not state.answered and base is None and all(v is None for v in before.values())
        plan = self._reconcile(type_url, state, current)
        held_back = False
        if type_url == EXTENSION_CONFIG and self._last and plan.resources:
            plan, held_back = self._after_the_rest(state, current, plan, before, base)
        if plan.blocked and state.withheld != current.version:
            state.withheld = current.version
            events.append(Withheld(type_url, current.version))
        if plan.resources or plan.removed or empty_handed:
            # `before` is kept only once replaced: the state's own dict changes in place.
            prior = before if before is not state.overrides else _NO_OVERRIDES
            response = self._send(
                type_url, state, _Sent(current.version, now, plan.resources, plan.removed, base, prior), plan
            )
            if held_back:
                state.held_back_by = response.nonce
            return response
        if not state.answered:
            state.answered = True
            state.acked_version = current.version
            events.append(Resumed(type_url, current.version))
        return None

    def _reconcile(self, type_url: str, state: DeltaTypeState, current: TypeSnapshot) -> _Plan:
        """Decide what to send, looking only at the shared diff and this stream's overrides, and rebase."""
        view = _shared_view(self._shared, state.base, current, state.subscription())
        keep = self._keeper(type_url, state, view)
        if not state.overrides and keep is None and not self._any_rejected(type_url, state, view):
            state.base = current
            state.kept = _NOTHING
            return _Plan(view.resources, view.names, view.removed, view.unsent, False)
        return self._reconcile_each(type_url, state, current, view, keep or _keeps_nothing)

    def _reconcile_each(
        self,
        type_url: str,
        state: DeltaTypeState,
        current: TypeSnapshot,
        view: _View,
        keep: Callable[[str], bool],
    ) -> _Plan:
        """The general case, name by name: the view's names not overridden, then the overrides."""
        overrides, base, resources = state.overrides, state.base, current.resources
        send: list[EncodedResource] = []
        removed: list[str] = []
        after: dict[str, Holding] = {}  # the overrides against `current`: what the client keeps of its own
        kept: list[str] = []

        def settle(name: str, held: Holding, resource: EncodedResource | None) -> None:
            if resource is not None:
                if self._rejected_version(type_url, state, name, resource.version):
                    after[name] = held
                else:
                    send.append(resource)
            elif keep(name):
                after[name] = held
                kept.append(name)
            elif self._rejected_version(type_url, state, name, REMOVAL + current.version):
                after[name] = held
            else:
                removed.append(name)

        for resource in view.resources:
            if resource.name not in overrides:
                settle(resource.name, _version_in(base, resource.name), resource)
        for name in view.removed:
            if name not in overrides:
                settle(name, _version_in(base, name), None)
        for name, held in overrides.items():
            wanted = resources.get(name)
            if (wanted.version if wanted is not None else None) != held:
                settle(name, held, wanted)
        if overrides or after:
            state.overrides = after
        state.base = current
        state.kept = frozenset(kept) if kept else _NOTHING
        blocked = len(after) > len(kept)
        if not overrides and len(send) == len(view.resources) and len(removed) == len(view.removed):
            return _Plan(view.resources, view.names, view.removed, view.unsent, blocked)
        send.sort(key=lambda r: r.name)
        gone = tuple(sorted(removed))
        unsent = frame_unsent(framed_body(self._shared.resource_entries, send), current.version, current.type_url, gone)
        return _Plan(tuple(send), tuple(r.name for r in send), gone, unsent, blocked)

    def _after_the_rest(
        self,
        state: DeltaTypeState,
        current: TypeSnapshot,
        plan: _Plan,
        before: Mapping[str, Holding],
        base: TypeSnapshot | None,
    ) -> tuple[_Plan, bool]:
        """`plan` without the SENT_LAST configurations it carries when they must wait, and whether it left any.

        They wait while a response that held them back is unanswered (outstanding, or past MAX_OUTSTANDING still
        remembered), and are held back from a plan carrying others too when the client holds an older version and
        every version it holds of what the plan changes came from this server (`memo.Served`: from another
        replica's, which order is safe is not known). What it held before this plan is `before` (its overrides)
        over `base`. A held one is recorded as still holding that version, so the plan after the answer sends it."""
        last = self._last
        late = [r for r in plan.resources if r.name in last]
        if not late:
            return plan, False

        def prior(name: str) -> Holding:
            return before[name] if name in before else _version_in(base, name)

        waiting = state.held_back_by
        if not (waiting and (waiting in state.outstanding or waiting in state.recent)):
            if len(late) == len(plan.resources) and not plan.removed:
                return plan, False  # a change of the recent list alone: a revocation, never delayed
            if all(prior(r.name) is None for r in late):
                return plan, False  # the client holds none of them: none to keep in force
            served = self._shared.served
            if any((v := prior(r.name)) is not None and Served.key(r.name, v) not in served for r in plan.resources):
                return plan, False  # another replica's configurations: which order is safe is not known
        rest = tuple(r for r in plan.resources if r.name not in last)
        state.overrides = dict(state.overrides)  # a copy: a `_Sent` may keep the dict it replaced
        for resource in late:
            state.hold(resource.name, prior(resource.name))
        body = framed_body(self._shared.resource_entries, rest)
        unsent = frame_unsent(body, current.version, current.type_url, plan.removed)
        return _Plan(rest, tuple(r.name for r in rest), plan.removed, unsent, plan.blocked), True

    def _keeper(self, type_url: str, state: DeltaTypeState, view: _View) -> Callable[[str], bool] | None:
        """Which removals to hold back (make-before-break), or None when nothing is.

        CDS keeps every removed cluster while the client may still route to it; EDS keeps the endpoints of
        the clusters CDS keeps (this stream's CDS was planned first, in PUSH_ORDER).
        """
        if type_url == CLUSTER:
            unsettled = (view.removed or state.overrides) and not self._users_settled()
            return _keeps_everything if unsettled else None
        cds = self._types.get(CLUSTER)
        if type_url == ENDPOINT and cds is not None and cds.kept:
            return cds.kept.__contains__
        return None

    def _warming(self) -> bool:
        """True while a CDS or EDS response is unanswered: listener and route updates wait for it, as in SotW
        (see `protocol.AdsStream._warming`), so no route moves to a cluster Envoy is still warming."""
        return any(
            state is not None and state.requested and bool(state.outstanding)
            for state in (self._types.get(CLUSTER), self._types.get(ENDPOINT))
        )

    def _users_settled(self) -> bool:
        """False while the client may still route by older listeners/routes than the snapshot's.

        A NACKed current version counts as unsettled: Envoy keeps the previous listeners and routes (held as
        overrides here), which may still point at the clusters being removed.
        """
        snapshot = self.snapshot
        if snapshot is None:
            return True
        for type_url in _CLUSTER_USERS:
            state = self._types.get(type_url)
            current = snapshot.types.get(type_url)
            if state is not None and state.requested and current is not None and not state.in_line_with(current):
                return False
        return True

    def _any_rejected(self, type_url: str, state: DeltaTypeState, view: _View) -> bool:
        """O(1) for a node that never rejected a resource of the type, else O(changed)."""
        if not state.nacked and not self._rejected.has_rejections(self.node_id, type_url):
            return False
        rejected = functools.partial(self._rejected.is_rejected, self.node_id, type_url)
        for keys in (view.keys, view.removed_keys):
            if not state.nacked.isdisjoint(keys) or any(map(rejected, keys)):
                return True
        return False

    def _rejected_version(self, type_url: str, state: DeltaTypeState, name: str, version: str) -> bool:
        key = resource_key(name, version)
        return key in state.nacked or self._rejected.is_rejected(self.node_id, type_url, key)

    def _send(self, type_url: str, state: DeltaTypeState, sent: _Sent, plan: _Plan) -> Response:
        self._last_nonce += 1
        nonce = str(self._last_nonce)
        state.outstanding[nonce] = sent
        if len(state.outstanding) > MAX_OUTSTANDING:
            oldest = next(iter(state.outstanding))
            remember_recent(
                state.recent, oldest, state.outstanding.pop(oldest)._replace(base=None, prior=_NO_OVERRIDES)
            )
        if state.refused:
            resend(state.refused, ((r.name, r.version) for r in sent.resources))
        state.answered = True
        return Response(type_url, sent.version, nonce, plan.unsent, plan.names)


def _keeps_everything(name: str) -> bool:
    return True


def _keeps_nothing(name: str) -> bool:
    return False
