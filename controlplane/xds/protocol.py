"""The State-of-the-World ADS stream protocol as a pure state machine (no I/O, no asyncio, no clock).

Like h11, `AdsStream` is fed what happened (a DiscoveryRequest arrived, a new Snapshot is current) and
returns what to do (`Response` bytes to write, in order) and what it noticed (`Event`s for the registry,
metrics and logs). Keeping the rules here, away from grpc, lets every corner of the protocol be unit-tested
without sockets; the grpc adapter stays a thin pump. Time only matters for push→ACK latency, so callers pass
`now` (any monotonic clock) instead of the machine reading one.

The rules, and the Envoy behaviour behind them, are in docs/xds-protocol.md ("State of the World"):

* nonces are numbered per stream, strictly increasing (Envoy only echoes them); a request with a non-empty
  nonce that is not the last one sent for its type on this stream is stale and ignored entirely, but for a NACK
  of an earlier response still unanswered (a "late" NACK, below), which is reported and changes nothing else;
* a request echoing the last nonce is an ACK (or, with `error_detail`, a NACK of the version sent);
* subscriptions are taken from every non-stale request, ACKs included;
* a version is (re)sent only when it differs from the one last sent or the names grew beyond what was sent,
  and never when this node NACKed it (also on an earlier stream: see `RejectedVersions`);
* a reconnecting client that already holds the current version gets nothing (versions are content hashes);
* clusters that a new snapshot removes are kept (make-before-break) until the listeners and routes of that
  snapshot are ACKed, so no route points at a cluster Envoy already dropped;
* listeners and routes wait while a cluster or endpoint response is unanswered (rule 7), so no route points
  at a cluster Envoy is still warming.

Filter configurations (ECDS, `EXTENSION_CONFIG`) are served like routes: subscribed by name (never a
wildcard), answered, resumed, ACKed and NACKed per type version. They need no hold of their own: Envoy asks
for one only when a listener naming it arrives, and that listener warms (no connection accepted) until the
configuration comes (docs/envoy-ecds.md §2), so an answer can never be early; and they route to no cluster,
so they do not wait for clusters to warm either. A resource the snapshot drops is simply no longer in the
type's next response, which Envoy ignores over SotW (the last configuration stays in force, docs/envoy-ecds.md
§2): retiring one is the listener's business, as it is over Delta.

That same behaviour lets a filter configuration be sent once per stream at the same bytes (docs/envoy-ecds.md
§7): an ECDS response holds only the configurations whose bytes differ from what this stream sent, ACKed or not
yet, and names newly subscribed to (an empty response when none did: Envoy ACKs it and changes nothing). That
matters most at connect: Envoy asks for a listener's filter configurations one request per filter before it ACKs
any, each naming every filter so far (§8); answering each with all of them cost a real Envoy with 17 filters of
about 10 KB 153 configurations and 1.43 MB, now 17 and 163 KB, the same as Delta. The version is still the
content hash of the whole type, so responses in a row may share it (Envoy accepts them), and a reconnect at the
current version still gets nothing. Everything subscribed is sent when what the client holds is not known: on a
new stream (also the first response after a resume), after a NACK, after an ACK of another version than the
one sent.

A NACK crossed by later responses (Envoy's connect burst NACKs the first of its 17 answers after all were sent,
docs/envoy-ecds.md §8) is recognised from `TypeState.recent` (the responses not answered yet, bounded, forgotten
as Envoy answers in order) and reported as a `Nack` of what that response carried, `late`, without withholding its
version (the later responses share it, and Envoy ACKs the last) and without re-sending anything: Envoy ACKs a
configuration it refused when it comes again unchanged, without applying it. That is also why a refused filter
configuration stays in `TypeState.refused`, reported by every later `Ack` (`refusing`, so the NACK stays in the
status), until a response carries it with other bytes or it is unsubscribed.

Some filter configurations go after the others (`SENT_LAST`: the deny list's recent list, docs/envoy-ecds.md §10).
Envoy applies the configurations of one response one by one, in an order not ours, so a response moving job ids
from the recent list into a bucket could let a request pass in between. A seal moves them in two pushes; but a
stream that reconnects with an older version (or skipped the seal's snapshot) would get both moves at once. So
when a response would carry a SENT_LAST configuration the client may already hold an older one of, together with
others, and what the client holds came from this server (it connected with nothing or with a version this server
gave, `memo.Served`, or ACKed a whole response since), it carries the others alone, under the version plus
HELD_SUFFIX, and the held ones follow once the stream answered it: an ACK sends them, a NACK is handled as any (the
version is withheld, so nothing more goes until a newer snapshot). Meanwhile Envoy keeps its previous recent list,
which still denies the ids moved. A change of the recent list alone (a revocation) is never held, nor is one the
client never held (a fresh connect's burst asks for it on its own). Configurations from another replica are
answered as before, in one response: along one server's history ids only move from the recent list into the
buckets, but another replica may have sealed ids this one still lists as recent, and then the buckets first would
open a gap for a round trip instead of closing one; the version cannot tell which.

Endpoint assignments (EDS) are sent as changes the same way: EDS is not a full-state type over SotW, and a real
Envoy given a response with one assignment keeps the others it holds (tests/test_envoy_eds_facts.py,
docs/kubernetes-endpoints.md), so a Kubernetes Service's endpoint change pushes that one cluster's assignment.
Routes and the other types are always sent whole: for LDS and CDS a resource left out is a removal, and the
subset is only proven for filter configurations and endpoint assignments. Streams that hold the same names from
the same snapshot share one subset (`FanOutCache.subsets`), so a deny-list bucket's change is framed once per push,
not once per stream, and a group's proxies connecting alike share each answer of their connect burst.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol, TypeVar

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.compiler.names import REVOKED_RECENTLY_FILTER
from controlplane.snapshots.snapshot import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    SECRET,
    WILDCARD_TYPES,
    EncodedResource,
    Snapshot,
    TypeSnapshot,
    varint,
)
from controlplane.xds.memo import FanOutCache, Interned, PerSnapshot

TYPE_LABELS: Mapping[str, str] = MappingProxyType(
    {SECRET: "sds", CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", EXTENSION_CONFIG: "ecds", ROUTE: "rds"}
)
KEEP_SUFFIX = "+keep"
# The version of a filter-configuration response that leaves the SENT_LAST configurations for a later one: not the
# type's version, so a client that reconnects holding it is not taken to hold those (it gets them again, after).
HELD_SUFFIX = "+held"
# Filter configurations sent after every other one that changes with them (see `AdsStream`): the deny list's recent
# revocations, so an Envoy applies a bucket gaining ids before the recent list that stops holding them.
SENT_LAST: frozenset[str] = frozenset({REVOKED_RECENTLY_FILTER})
# What one stream's node may weigh (docs/xds-and-audit-bounds.md). Envoy's ids are host or pod names (at most
# 253 bytes in DNS and Kubernetes) and groups are policy names (63); a node past these is refused, never kept.
MAX_NODE_ID_BYTES = 512
MAX_NODE_CLUSTER_BYTES = 256
MAX_NODE_METADATA_BYTES = 16 * 1024
MAX_NODE_BYTES = 32 * 1024  # the whole node as kept (without its extension list)
# What one stream may subscribe to, per type (docs/xds-and-audit-bounds.md): names from later requests add up, so
# the 2 MiB message cap alone let one Delta stream hold 1.8M names. A gateway subscribes to one EDS name per
# backend cluster (~1,000 for a large one); compiled names are a prefix and a policy name (under 100 bytes).
MAX_SUBSCRIBED_NAMES = 10_000
MAX_RESOURCE_NAME_BYTES = 512
MAX_UNSUPPORTED_TYPES = 16  # distinct unknown type URLs reported per stream; more are ignored silently
# The types a response may carry only what changed once the client is known to hold the rest (module docstring).
_SENT_AS_CHANGES = frozenset({EXTENSION_CONFIG, ENDPOINT})
# Responses of a type remembered per stream so a NACK that crossed later responses is still recognised (a
# "late" NACK, docs/envoy-ecds.md §8): Envoy answers responses in the order they came, so everything up to the
# answered nonce is dropped on each answer, and only a client that answers nothing holds this many.
# A gateway's connect burst is one ECDS response per filter (18 today); this leaves room for more.
RECENT_NONCES = 64
MAX_NONCE_CHARS = 32  # nonces are this stream's decimal counter: a longer one is not ours, and is shown clipped
# Types whose ACK means "nothing routes to a removed cluster any more" (rule 6, make-before-break).
_CLUSTER_USERS = (LISTENER, ROUTE)
_NO_RESOURCES: Mapping[str, EncodedResource] = MappingProxyType({})
# DiscoveryResponse.nonce and DeltaDiscoveryResponse.nonce are both field 5 (wire type 2).
_NONCE_TAG = b"\x2a"
Names = frozenset[str] | None
"""A subscription: the resource names asked for, or None for a wildcard (all of the type)."""
_T = TypeVar("_T")


def type_label(type_url: str) -> str:
    """The short name used in metrics and status (`cds`...); `other` keeps label cardinality bounded."""
    return TYPE_LABELS.get(type_url, "other")


class InvalidRequest(ValueError):
    """A request is past a documented bound: the stream is refused (INVALID_ARGUMENT).

    The message names the field and the sizes, never the content, so it is safe to log and to send back."""


class InvalidNode(InvalidRequest):
    """The first request's node is past a documented bound."""


class InvalidSubscription(InvalidRequest):
    """A stream asked for more resource names of a type, or a longer name, than any gateway needs."""


def _check_node(node: base_pb2.Node) -> None:
    """Envoy names its node (`--service-node`) and gateway group (`--service-cluster`) in the first request; a
    stream without them is no proxy anyone could tell apart or serve."""
    for name, value in (("id", node.id), ("cluster", node.cluster)):
        if not value:
            raise InvalidNode(f"node.{name} is empty: the first request must name the node and its gateway group")
    for name, size, limit in (
        ("id", len(node.id.encode()), MAX_NODE_ID_BYTES),
        ("cluster", len(node.cluster.encode()), MAX_NODE_CLUSTER_BYTES),
        ("metadata", node.metadata.ByteSize(), MAX_NODE_METADATA_BYTES),
        ("", node.ByteSize(), MAX_NODE_BYTES),
    ):
        if size > limit:
            field_name = f"node.{name}" if name else "node"
            raise InvalidNode(f"{field_name} is {size} bytes, more than the {limit} allowed")


def check_subscription(type_url: str, names: Iterable[str], count: int) -> None:
    """Refuse a request whose names, or the `count` a type would be subscribed to after it, pass the bounds.

    Called before anything of the request is kept; the message names the type and sizes, never a name."""
    label = type_label(type_url)
    if count > MAX_SUBSCRIBED_NAMES:
        raise InvalidSubscription(
            f"{label} subscription would hold {count} resource names, more than the {MAX_SUBSCRIBED_NAMES} allowed"
        )
    for name in names:
        size = len(name) if len(name) * 4 <= MAX_RESOURCE_NAME_BYTES else len(name.encode())  # UTF-8: <= 4 each
        if size > MAX_RESOURCE_NAME_BYTES:
            raise InvalidSubscription(
                f"a {label} resource name is {size} bytes, more than the {MAX_RESOURCE_NAME_BYTES} allowed"
            )


class RejectedVersions(Protocol):
    """Versions a node NACKed on any stream, so a reconnect does not re-send a known-bad config."""

    def is_rejected(self, node_id: str, type_url: str, version: str) -> bool: ...


class _NothingRejected:
    def is_rejected(self, node_id: str, type_url: str, version: str) -> bool:
        return False


# ---------------------------------------------------------------------------------------------- outputs


def clip_nonce(nonce: str) -> str:
    """A nonce as events show it: a client may send megabytes in one, and none of ours is this long."""
    return nonce[:MAX_NONCE_CHARS]


def take_through(recent: dict[str, _T], nonce: str) -> _T | None:
    """Pop `nonce` and every older entry of `recent` (kept in the order sent); None, dropping nothing, when it
    is not there. Envoy answers a type's responses in the order they came: once it answered one, it will not
    answer an older one, so what this drops is never needed again. A nonce that is not ours costs no lookup
    past MAX_NONCE_CHARS and drops nothing, so no client input grows or empties the memory but its answers."""
    if len(nonce) > MAX_NONCE_CHARS or nonce not in recent:
        return None
    while True:
        key = next(iter(recent))
        value = recent.pop(key)
        if key == nonce:
            return value


def remember_recent(recent: dict[str, _T], nonce: str, value: _T) -> None:
    """Add a response just sent, forgetting the oldest past RECENT_NONCES (a client that answers nothing)."""
    recent[nonce] = value
    if len(recent) > RECENT_NONCES:
        del recent[next(iter(recent))]


def refuse(refused: dict[str, str], carried: Iterable[tuple[str, str]]) -> None:
    """Record filter configurations (name, bytes version) as refused by the client."""
    refused.update(carried)


def resend(refused: dict[str, str], carried: Iterable[tuple[str, str]]) -> None:
    """A response carries these (name, version): a refused configuration sent with other bytes is no longer
    refused (the new response's ACK or NACK decides); sent with the same bytes it stays refused, since Envoy
    ACKs bytes it refused without applying them (docs/envoy-ecds.md §8)."""
    for name, version in carried:
        if refused.get(name, version) != version:
            del refused[name]


def forget_unwanted(refused: dict[str, str], wants: Callable[[str], bool]) -> None:
    """Envoy drops a configuration it unsubscribes from: a refusal of it no longer fails anything."""
    for name in [n for n in refused if not wants(n)]:
        del refused[name]


def frame_nonce(nonce: str) -> bytes:
    """The nonce field of a (Delta)DiscoveryResponse, appended to bytes framed without it."""
    data = nonce.encode()
    return _NONCE_TAG + varint(len(data)) + data if data else b""  # proto3 leaves an empty string out


class Response(NamedTuple):
    """One (Delta)DiscoveryResponse, serialized but for this stream's nonce.

    `unsent` is shared by every stream of a fan-out sent the same response (one copy of a multi-megabyte
    route configuration, not one per stream); the bytes on the wire append the stream's own nonce (protobuf
    accepts fields in any order) and are built only when the response is written (`wire`), so a queue of
    responses never holds a copy per stream.

    Outputs are NamedTuples, not frozen dataclasses: a fan-out builds one per stream and construction cost
    is most of the per-stream budget.
    """

    type_url: str
    version: str
    nonce: str
    unsent: bytes
    resource_names: tuple[str, ...]

    @property
    def data(self) -> bytes:
        """The whole response as it goes to the wire: a copy of `unsent`, so build it only to write it."""
        return self.unsent + frame_nonce(self.nonce)

    def wire(self, shared: FanOutCache) -> bytes:
        """`data`, built once for all the streams of a fan-out that send this response under the same nonce.

        Nonces are per stream, but streams of a group that went through the same pushes number them alike, so
        a fan-out usually makes one copy of a multi-megabyte response, not one per stream."""
        frames = shared.wire
        data = frames.get(self.unsent, self.nonce, "")
        return data if data is not None else frames.put(self.unsent, self.nonce, "", self.data)

    @property
    def size(self) -> int:
        """len(data), without building it."""
        return len(self.unsent) + len(frame_nonce(self.nonce))

    @property
    def resource_count(self) -> int:
        return len(self.resource_names)

    @property
    def label(self) -> str:
        return type_label(self.type_url)


@dataclass(frozen=True, slots=True)
class NodeIdentified:
    """The first request named the node; the adapter picks the snapshot by `group` (node.cluster)."""

    node_id: str
    group: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The client's subscription for a type was set or changed (None = wildcard)."""

    type_url: str
    names: Names


@dataclass(frozen=True, slots=True)
class Ack:
    """The client accepted `version`; `latency` is seconds since that response was produced.

    `refusing`: filter configurations it refused earlier and was not sent other bytes for since. Envoy ACKs a
    later response (even one carrying the refused bytes again) without applying them (docs/envoy-ecds.md §8),
    so such an ACK does not end the NACK: the filter still fails closed.
    """

    type_url: str
    version: str
    nonce: str
    latency: float
    refusing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """The client rejected `version` (the one we sent); it still runs `accepted_version`.

    `error` is Envoy's free text: unstable and possibly huge, so store it truncated and never parse it.
    `resources`: the names the refused response carried. `late`: it answers an older response than the last
    sent of its type (it crossed later ones, as in Envoy's connect burst). `rejects_version`: the node is not
    to be sent `version` again; False for a late SotW NACK, whose version later responses share (the burst's
    responses all carry the type's one version, and Envoy ACKs the last), so only the refused bytes are kept
    from it (`TypeState.refused`), not the version.
    """

    type_url: str
    version: str
    nonce: str
    accepted_version: str
    error: str
    code: int
    latency: float
    resources: tuple[str, ...] = ()
    late: bool = False
    rejects_version: bool = True


@dataclass(frozen=True, slots=True)
class Stale:
    """A request answering an older response (it crossed a newer one in flight), or a response this stream did
    not send or no longer remembers; ignored entirely. `nonce` is clipped to MAX_NONCE_CHARS."""

    type_url: str
    nonce: str
    expected: str


@dataclass(frozen=True, slots=True)
class Resumed:
    """A (re)connecting client already holds the current version: nothing is sent, it counts as ACKed."""

    type_url: str
    version: str


@dataclass(frozen=True, slots=True)
class Withheld:
    """The current version was not sent because this node NACKed it before; it waits for a newer one."""

    type_url: str
    version: str


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A request for a type this control plane does not serve (reported once per stream and type)."""

    type_url: str


Event = NodeIdentified | Subscribed | Ack | Nack | Stale | Resumed | Withheld | Unsupported


class Output(NamedTuple):
    """What one input produced: responses to write in this order, and events to record."""

    responses: tuple[Response, ...] = ()
    events: tuple[Event, ...] = ()


_NOTHING = Output()


# ------------------------------------------------------------------------------------------------ state


Answerable = tuple[str, tuple[str, ...], Mapping[str, EncodedResource], float]
"""A response as a late NACK needs it: its version, the names it carried, their bytes (for filter configurations:
references to the shared mapping), when it was sent. A plain tuple: one is made per stream and push."""


@dataclass(slots=True)
class TypeState:
    """Everything the stream knows about one type URL (rule 1)."""

    requested: bool = False
    names: Names = None
    client_version: str = ""  # version_info of the latest request before anything was sent
    sent_version: str | None = None
    sent_nonce: str = ""
    sent_subscription: Names = None  # the subscription the last response answered
    sent_names: tuple[str, ...] = ()  # what the client holds once it accepts the responses sent (every name
    # subscribed and present, also after a filter-configuration subset that carried only some of them)
    # where the bytes of sent_names came from (a snapshot's mapping, shared, or a make-before-break union)
    sent_source: Mapping[str, EncodedResource] = field(default_factory=lambda: _NO_RESOURCES)
    sent_at: float = 0.0
    awaiting: bool = False  # the last response has been neither ACKed nor NACKed yet
    # sent_names' bytes were all sent on this stream (ACKed or not yet) and nothing NACKed since: the client holds
    # them, or will once the responses in flight are applied. Filter configurations are then sent as changes.
    knows_sent: bool = False
    acked_version: str | None = None
    nacked: set[str] = field(default_factory=set)
    withheld: str | None = None  # last version reported as Withheld, to report it once
    # nonce -> what that response carried, oldest first, for the responses not answered yet (RECENT_NONCES)
    recent: dict[str, Answerable] = field(default_factory=dict)
    # filter configurations refused (NACKed) and not sent with other bytes since: name -> the refused bytes'
    # version. At most the names subscribed (dropped on unsubscribe), so bounded by MAX_SUBSCRIBED_NAMES.
    refused: dict[str, str] = field(default_factory=dict)
    # The last response left SENT_LAST configurations for after its answer (`AdsStream._after_the_rest`).
    holding: bool = False
    # SENT_LAST configurations sent on this stream: the client may hold an older one (a subset of SENT_LAST).
    last_sent: frozenset[str] = frozenset()
    # The client ACKed a response carrying every filter configuration it subscribes to: what it holds came from this
    # server (as when it connected with none, or with a version this server gave: `memo.Served`).
    ours: bool = False
    sent_whole: bool = False  # the last response carried every configuration subscribed


class _Target(NamedTuple):
    """The response a type should have: version, body and the names it carries (`sent`), and what the client
    holds once it accepts it: `names`, whose bytes are in `source` (for a whole response `sent` is `names`)."""

    version: str
    body: bytes
    names: tuple[str, ...]
    source: Mapping[str, EncodedResource]
    sent: tuple[str, ...]


def subscription(type_url: str, resource_names: Iterable[str], subscriptions: Interned) -> Names:
    """CDS and LDS with no names or with "*" are wildcards; anything else is the set of names asked for.

    Raises `InvalidSubscription` past the bounds, before the set is interned or kept.

    Every proxy of a group asks for the same names: the set is interned, so ten thousand streams hold one
    frozenset (not ten thousand copies of every cluster name) and the memos below match it by identity.
    """
    names = frozenset(resource_names)
    check_subscription(type_url, names, len(names))  # SotW repeats the whole set: this request is all of it
    if type_url in WILDCARD_TYPES and (not names or "*" in names):
        return None
    return subscriptions.intern(names)


def _forget_unsubscribed(state: TypeState, names: Names, shared: FanOutCache) -> None:
    """Envoy drops the resources it unsubscribes from: what it holds is what was sent AND is still wanted.

    Without this, a later re-subscription would look covered by the old response and never be answered,
    leaving the resource (a warming cluster's endpoints, say) missing in Envoy.
    """
    if names is None or state.sent_version is None:
        return
    held = state.sent_subscription
    if held is not None and held <= names:
        return  # a subscription that grew: nothing is dropped (the common case, EDS after a CDS push)
    state.sent_subscription = names if held is None else shared.subscriptions.intern(held & names)
    state.sent_names = shared.kept_names.call(kept, state.sent_names, names)


def kept(held: tuple[str, ...], names: frozenset[str]) -> tuple[str, ...]:
    return tuple(n for n in held if n in names)


def covered(names: Names, answered: Names) -> bool:
    """True when a response to `answered` already holds everything `names` asks for."""
    return answered is None or names is answered or (names is not None and names <= answered)


def dropped(held: Iterable[str], names: Names, current: TypeSnapshot) -> tuple[str, ...]:
    """The names a client holds and still subscribes to that `current` no longer has."""
    return tuple(n for n in held if n not in current.resources and (names is None or n in names))


def _shared_union(
    shared: FanOutCache,
    current: TypeSnapshot,
    names: Names,
    held: tuple[str, ...],
    held_source: Mapping[str, EncodedResource],
    removed: tuple[str, ...],
) -> _Target:
    """Make-before-break CDS bodies (the snapshot's clusters plus the removed ones still in use), built once
    for all the streams that held the same clusters, instead of a dict and a join per stream. Entries live as
    long as the snapshot they were built for (`PerSnapshot`)."""

    return _shared_by_identity(
        shared.unions, current, names, held, held_source, lambda: _union(current, names, held_source, removed)
    )


def _union(
    current: TypeSnapshot, names: Names, held_source: Mapping[str, EncodedResource], removed: tuple[str, ...]
) -> _Target:
    present = current.entries_for(names)[1]
    merged = {n: current.resources[n] for n in present}
    merged.update((n, held_source[n]) for n in removed)
    ordered = tuple(sorted(merged))
    keep_body = b"".join(merged[n].response_entry for n in ordered)
    return _Target(current.version + KEEP_SUFFIX, keep_body, ordered, MappingProxyType(merged), ordered)


def _shared_changes(
    shared: FanOutCache,
    current: TypeSnapshot,
    names: Names,
    held: tuple[str, ...],
    held_source: Mapping[str, EncodedResource],
) -> _Target:
    """`changes` once for all the streams that were sent the same names from the same snapshot (a group's proxies
    after the same push, or at the same step of their connect burst): they share one body, so the framed
    response is shared too (`FanOutCache.frames`)."""

    return _shared_by_identity(
        shared.subsets, current, names, held, held_source, lambda: changes(current, names, held, held_source)
    )


def _shared_by_identity(
    cache: PerSnapshot,
    current: TypeSnapshot,
    names: Names,
    held: tuple[str, ...],
    held_source: Mapping[str, EncodedResource],
    compute: Callable[[], _Target],
) -> _Target:
    """`compute()` once for the streams holding the same `held` and `held_source` objects (keyed by identity, and
    checked, since an id() may be reused once an object is gone)."""

    def build() -> tuple[object, object, _Target]:
        return held, held_source, compute()

    found = cache.get(current, None, (id(held), id(held_source), names), build)
    if found[0] is held and found[1] is held_source:
        return found[2]
    return build()[2]  # an id() reused by other objects: rare, and then simply not shared


def changes(
    current: TypeSnapshot, names: Names, held: tuple[str, ...], held_source: Mapping[str, EncodedResource]
) -> _Target:
    """The response to a client sent `held` (bytes in `held_source`): only the subscribed resources of
    `current` it was not sent with the same bytes; it holds all of them once it accepts it."""
    body, present = current.entries_for(names)
    known = frozenset(held)
    fresh = tuple(n for n in present if n not in known or not same(held_source.get(n), current.resources[n]))
    if len(fresh) == len(present):
        return _Target(current.version, body, present, current.resources, present)  # the whole body, shared
    subset = b"".join(current.resources[n].response_entry for n in fresh)
    return _Target(current.version, subset, present, current.resources, fresh)


def same(held: EncodedResource | None, resource: EncodedResource) -> bool:
    """True when `held` has the bytes of `resource` (versions are hashes of the framed entry, as Delta uses)."""
    return held is resource or (held is not None and held.version == resource.version)


def _shared_dropped(shared: FanOutCache, held: tuple[str, ...], names: Names, current: TypeSnapshot) -> tuple[str, ...]:
    """`dropped` per snapshot: every stream that held the same clusters asks the same question."""

    def compute() -> tuple[tuple[str, ...], tuple[str, ...]]:
        return held, dropped(held, names, current)

    found = shared.removals.get(current, None, (id(held), names), compute)
    return found[1] if found[0] is held else compute()[1]


def frame_unsent(body: bytes, version: str, type_url: str) -> bytes:
    """DiscoveryResponse bytes but the nonce, from pre-framed `resources` entries: shared by every stream sent
    the same response, each appending its own nonce (`frame_nonce`)."""
    tail = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url)
    encoded: bytes = tail.SerializeToString()
    return body + encoded


def frame_response(body: bytes, version: str, type_url: str, nonce: str) -> bytes:
    """DiscoveryResponse bytes from pre-framed `resources` entries: protobuf accepts fields in any order."""
    return frame_unsent(body, version, type_url) + frame_nonce(nonce)


# ----------------------------------------------------------------------------------------------- stream


class StreamIdentity:
    """What SotW and Delta streams share: the node (only the first request carries it) and unsupported types."""

    def __init__(self) -> None:
        self.node: base_pb2.Node | None = None
        self._unsupported: set[str] = set()

    @property
    def node_id(self) -> str:
        return self.node.id if self.node is not None else ""

    @property
    def group(self) -> str:
        return self.node.cluster if self.node is not None else ""

    def _identify(self, node: base_pb2.Node, events: list[Event]) -> None:
        if self.node is None:
            # set_node_on_first_message_only: later requests may carry no node, so keep the first. Without
            # its extension list: Envoy names every extension it was built with (KBs per proxy), unused here.
            kept = base_pb2.Node()
            kept.CopyFrom(node)
            kept.ClearField("extensions")
            _check_node(kept)  # raises before anything of it is kept
            self.node = kept
            events.append(NodeIdentified(self.node.id, self.node.cluster))

    def _supported(self, type_url: str, events: list[Event]) -> bool:
        """False for a type we do not serve, reported once per stream."""
        if type_url in TYPE_LABELS:
            return True
        if type_url not in self._unsupported and len(self._unsupported) < MAX_UNSUPPORTED_TYPES:
            self._unsupported.add(type_url)
            events.append(Unsupported(type_url))
        return False


class AdsStream(StreamIdentity):
    """The protocol state of one SotW ADS stream.

    Requests that arrive before the first snapshot is set are recorded and answered by `set_snapshot`, so
    the adapter can pick the snapshot by the node's group after the first request (`NodeIdentified`).
    """

    def __init__(
        self, shared: FanOutCache, rejected: RejectedVersions | None = None, last: frozenset[str] = SENT_LAST
    ) -> None:
        """`shared`: the server's cache of what every stream of a fan-out computes alike. `last`: the filter
        configurations sent after the others that change with them (see the module's docstring)."""
        super().__init__()
        self.snapshot: Snapshot | None = None
        self._shared = shared
        self._rejected: RejectedVersions = rejected if rejected is not None else _NothingRejected()
        self._last = last
        self._types: dict[str, TypeState] = {}
        self._nonces = 0  # the last nonce sent on this stream, of any type

    def type_state(self, type_url: str) -> TypeState | None:
        """Read-only view for status and tests; do not mutate."""
        return self._types.get(type_url)

    # -- inputs

    def receive(self, request: discovery_pb2.DiscoveryRequest, now: float) -> Output:
        """Handle one DiscoveryRequest; `now` is used for push→ACK latency only."""
        events: list[Event] = []
        self._identify(request.node, events)
        type_url = request.type_url
        if not self._supported(type_url, events):
            return Output((), tuple(events))
        names = subscription(
            type_url, request.resource_names, self._shared.subscriptions
        )  # refuses past the bounds, before anything is kept
        state = self._types.setdefault(type_url, TypeState())
        if not self._accept(type_url, state, request, names, now, events):
            return Output((), tuple(events))
        return self._plan(now, events)

    def set_snapshot(self, snapshot: Snapshot, now: float) -> Output:
        """Make `snapshot` current and push what changed, in PUSH_ORDER."""
        if snapshot is self.snapshot:
            return _NOTHING
        self.snapshot = snapshot
        if self._last:
            self._shared.served.note_snapshot(snapshot.types.get(EXTENSION_CONFIG))
        return self._plan(now, [])

    # -- request handling

    def _accept(
        self,
        type_url: str,
        state: TypeState,
        request: discovery_pb2.DiscoveryRequest,
        names: Names,
        now: float,
        events: list[Event],
    ) -> bool:
        """Apply a request to the type's state; False when it was stale and must be ignored (rule 2)."""
        nonce = request.response_nonce
        if nonce and nonce != state.sent_nonce:
            answered = take_through(state.recent, nonce)
            if answered is not None and request.HasField("error_detail"):
                events.append(self._late_nack(type_url, state, request, answered, now))
            else:
                events.append(Stale(type_url, clip_nonce(nonce), state.sent_nonce))
            return False
        if state.refused and names is not None:
            forget_unwanted(state.refused, names.__contains__)  # before the ACK reports what is still refused
        if nonce:
            events.append(self._answer(type_url, state, request, now))
        elif state.sent_version is None:
            state.client_version = request.version_info
        if not state.requested or names != state.names:
            state.requested = True
            state.names = names
            _forget_unsubscribed(state, names, self._shared)
            events.append(Subscribed(type_url, names))
        return True

    def _late_nack(
        self,
        type_url: str,
        state: TypeState,
        request: discovery_pb2.DiscoveryRequest,
        answered: Answerable,
        now: float,
    ) -> Nack:
        """A NACK of an older response than the last sent (docs/envoy-ecds.md §8): seen, but the stream is left as
        it is. The later responses were sent, and Envoy applies them after this one, so they decide what it holds
        (their own ACK or NACK follows); its subscription is older than theirs. Nothing is re-sent: Envoy ACKs a
        filter configuration it refused when it comes again with the same bytes, without applying it. What it
        keeps is which filter configurations were refused at which bytes, unless sent since with other bytes."""
        version, carried, source, at = answered
        if type_url == EXTENSION_CONFIG:
            wanted, latest = state.names, state.sent_source
            refuse(
                state.refused,
                (
                    (n, resource.version)
                    for n in carried
                    if (resource := source.get(n)) is not None
                    and (wanted is None or n in wanted)
                    and same(latest.get(n), resource)
                ),
            )
        detail = request.error_detail
        latency = max(0.0, now - at)
        return Nack(
            type_url,
            version,
            request.response_nonce,
            request.version_info,
            detail.message,
            detail.code,
            latency,
            carried,
            late=True,
            rejects_version=False,
        )

    def _answer(
        self, type_url: str, state: TypeState, request: discovery_pb2.DiscoveryRequest, now: float
    ) -> Ack | Nack:
        """The request echoes our last nonce: it is the ACK or NACK of that response (rule 3)."""
        state.awaiting = False
        state.holding = False  # answered: what it held back may go (after a NACK, as far as the version may)
        latency = max(0.0, now - state.sent_at)
        sent = state.sent_version or ""
        answered = state.recent.get(state.sent_nonce)
        state.recent.clear()  # every response remembered is this one or older: answered, in Envoy's order
        if request.HasField("error_detail"):
            state.nacked.add(sent)
            state.knows_sent = False  # Envoy may have applied part of the response, or none of it
            _, carried, source, _ = answered if answered is not None else ("", (), _NO_RESOURCES, 0.0)
            if type_url == EXTENSION_CONFIG:
                # Which of several it refused is not known (its text is not parsed): all of them, until re-sent
                # with other bytes. The gateway's responses carry one each but on a new stream or after a NACK.
                refuse(state.refused, ((n, r.version) for n in carried if (r := source.get(n)) is not None))
            detail = request.error_detail
            return Nack(
                type_url, sent, state.sent_nonce, request.version_info, detail.message, detail.code, latency, carried
            )
        state.acked_version = request.version_info
        if state.sent_whole and request.version_info == sent:
            state.ours = True
        if request.version_info != sent:
            state.knows_sent = False  # Envoy's ACK names the version it accepted, the one sent: anything else is odd
        refusing = tuple(sorted(state.refused)) if state.refused else ()
        return Ack(type_url, request.version_info, state.sent_nonce, latency, refusing)

    # -- deciding what to send

    def _plan(self, now: float, events: list[Event]) -> Output:
        """Bring every subscribed type up to date with the snapshot, in push order (rules 4 to 6)."""
        snapshot = self.snapshot
        if snapshot is None:
            return Output((), tuple(events))
        responses: list[Response] = []
        for type_url in PUSH_ORDER:
            state = self._types.get(type_url)
            current = snapshot.types.get(type_url)
            if state is None or not state.requested or current is None:
                continue
            if state.sent_version is None and state.client_version == current.version:
                self._resume(type_url, state, current, events)
                continue
            if type_url in _CLUSTER_USERS and state.sent_version is not None and self._warming():
                continue  # an update, not a first answer: sent when the clusters' ACKs arrive (they run _plan)
            response = self._respond(type_url, state, current, now, events)
            if response is not None:
                responses.append(response)
        return Output(tuple(responses), tuple(events))

    def _warming(self) -> bool:
        """True while a CDS or EDS response is unanswered: new listeners and routes wait for it (warming).

        Envoy applies a route as soon as it arrives, but a new cluster serves only once its endpoints came
        (warming): a route moved to it before that answers 503. Envoy subscribes to a new cluster's
        endpoints before it ACKs the clusters, so "both ACKed" means warm, and a client that ACKs without
        subscribing is not held up. A change that touches no cluster is not delayed at all, nor is the first
        answer to a listener or route request: Envoy asks for those only once its clusters are initialised.
        Filter configurations (ECDS) never wait: they name no cluster, and a listener waiting for one warms.
        """
        return any(
            state is not None and state.requested and state.awaiting
            for state in (self._types.get(CLUSTER), self._types.get(ENDPOINT))
        )

    def _resume(self, type_url: str, state: TypeState, current: TypeSnapshot, events: list[Event]) -> None:
        """Rule 4: the client already holds this version; act as if we had sent it and it was ACKed."""
        _, names = current.entries_for(state.names)
        state.sent_version = state.acked_version = current.version
        state.sent_subscription = state.names
        state.sent_names = names
        state.sent_source = current.resources
        # Which names it holds is not known: the version says nothing of a name asked for after accepting it and
        # never answered. The next filter-configuration response is whole (then only what it was not sent).
        state.knows_sent = False
        events.append(Resumed(type_url, current.version))

    def _respond(
        self, type_url: str, state: TypeState, current: TypeSnapshot, now: float, events: list[Event]
    ) -> Response | None:
        answered = covered(state.names, state.sent_subscription)
        if state.sent_version == current.version and answered:
            return None  # the fast path of a fan-out: this type did not change
        target = self._target(type_url, state, current)
        if type_url == EXTENSION_CONFIG and self._last:
            held = self._after_the_rest(state, target)
            if held is None:
                return None  # only configurations waiting for the answer to the response sent before them
            target = held
        if target.version == state.sent_version and answered:
            return None
        if target.version in state.nacked or self._rejected.is_rejected(self.node_id, type_url, target.version):
            if state.withheld != target.version:
                state.withheld = target.version
                events.append(Withheld(type_url, target.version))
            return None
        return self._send(type_url, state, target, now)

    def _target(self, type_url: str, state: TypeState, current: TypeSnapshot) -> _Target:
        """What the client should get now: the snapshot, for CDS the make-before-break union (rule 6), and for
        filter configurations and endpoint assignments (`_SENT_AS_CHANGES`) only what changed when the client is
        known to hold the last response."""
        if type_url in _SENT_AS_CHANGES and state.knows_sent:
            return _shared_changes(self._shared, current, state.names, state.sent_names, state.sent_source)
        body, names = current.entries_for(state.names)
        if type_url != CLUSTER:
            return _Target(current.version, body, names, current.resources, names)
        removed = _shared_dropped(self._shared, state.sent_names, state.names, current)
        if not removed or not any(self._unsettled(t) for t in _CLUSTER_USERS):
            return _Target(current.version, body, names, current.resources, names)
        return _shared_union(self._shared, current, state.names, state.sent_names, state.sent_source, removed)

    def _after_the_rest(self, state: TypeState, target: _Target) -> _Target | None:
        """`target` without the SENT_LAST configurations it carries, when they must wait (None: nothing else to
        send now); `target` itself when they need not.

        They wait while the answer to a response that held them back is due, and are held back from a response
        that carries others too when the client may hold an older one (it reported a version when it connected, or
        this stream sent it one) and what it holds came from this server: it connected with nothing or with a
        version this server gave (`memo.Served`), or ACKed a whole response since. Once the answer comes, the next
        plan sends them (`changes`: the response held back leaves them out of what the client is known to hold)."""
        last = self._last
        late = [n for n in target.sent if n in last]
        if not late:
            return target
        if not (state.awaiting and state.holding):
            if len(late) == len(target.sent):
                return target  # a change of the recent list alone: a revocation, never delayed
            if not state.client_version and state.last_sent.isdisjoint(late):
                return target  # the client holds none of them: none to keep in force
            if not (state.ours or not state.client_version or state.client_version in self._shared.served):
                return target  # another replica's configurations: which order is safe is not known
        rest = tuple(n for n in target.sent if n not in last)
        if not rest:
            return None
        resources = target.source
        body = b"".join(resources[n].response_entry for n in rest)
        names = tuple(n for n in target.names if n not in late)
        return _Target(target.version + HELD_SUFFIX, body, names, resources, rest)

    def _unsettled(self, type_url: str) -> bool:
        """True while the client may still route by an older listener/route config than the snapshot's.

        A NACKed current version counts as unsettled: Envoy keeps the previous listeners and routes, which
        may still point at the clusters being removed, so they stay until a newer snapshot fixes it.
        """
        state = self._types.get(type_url)
        if state is None or not state.requested or self.snapshot is None:
            return False
        current = self.snapshot.types.get(type_url)
        return state.awaiting or (current is not None and state.acked_version != current.version)

    def _send(self, type_url: str, state: TypeState, target: _Target, now: float) -> Response:
        body, version, frames = target.body, target.version, self._shared.frames
        unsent = frames.get(body, version, type_url) or frames.put(
            body, version, type_url, frame_unsent(body, version, type_url)
        )
        self._nonces += 1
        nonce = str(self._nonces)
        state.sent_version = target.version
        state.sent_nonce = nonce
        state.sent_subscription = state.names
        state.sent_names = target.names
        state.sent_source = target.source
        state.sent_at = now
        state.awaiting = True
        # Sent, and so known, until a NACK says otherwise (Envoy applies SotW responses in order; one that leaves a
        # configuration out keeps the one sent before in force, docs/envoy-ecds.md §2).
        state.knows_sent = True
        state.withheld = None
        if type_url == EXTENSION_CONFIG and self._last:
            state.holding = target.version.endswith(HELD_SUFFIX)
            if state.holding:
                self._shared.served.note(target.version)  # so a reconnect holding it counts as ours
            if not self._last.isdisjoint(target.sent):
                state.last_sent = state.last_sent.union(self._last.intersection(target.sent))
            state.sent_whole = len(target.sent) == len(target.names)
        # Filter configurations only need their bytes kept (the only type whose refusals outlive an ACK); the other
        # types keep the names alone, so a client that answers nothing pins no route or cluster mapping.
        source = target.source if type_url == EXTENSION_CONFIG else _NO_RESOURCES
        if state.refused:
            resend(state.refused, ((n, target.source[n].version) for n in target.sent))
        recent = state.recent  # `remember_recent`, inlined: this runs once per stream and push
        recent[nonce] = (target.version, target.sent, source, now)
        if len(recent) > RECENT_NONCES:
            del recent[next(iter(recent))]
        return Response(type_url, target.version, nonce, unsent, target.sent)
