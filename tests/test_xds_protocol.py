"""The SotW ADS state machine, rule by rule, without sockets (rules as numbered in the xDS brief)."""

from __future__ import annotations

import gc
import hashlib
import weakref
from collections.abc import Iterable, Mapping
from typing import TypeVar

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from google.rpc import status_pb2  # type: ignore[import-untyped]

from controlplane.compiler.names import REVOKED_RECENTLY_FILTER, revocation_bucket_filter
from controlplane.snapshots.snapshot import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    SECRET,
    Snapshot,
    TypeSnapshot,
)
from controlplane.xds.delta import DeltaStream
from controlplane.xds.memo import FanOutCache, Interned, Served
from controlplane.xds.protocol import (
    HELD_SUFFIX,
    KEEP_SUFFIX,
    MAX_NODE_ID_BYTES,
    MAX_NONCE_CHARS,
    MAX_RESOURCE_NAME_BYTES,
    MAX_SUBSCRIBED_NAMES,
    MAX_UNSUPPORTED_TYPES,
    RECENT_NONCES,
    Ack,
    AdsStream,
    InvalidNode,
    InvalidSubscription,
    Nack,
    NodeIdentified,
    Output,
    Response,
    Resumed,
    Stale,
    Subscribed,
    TypeState,
    Unsupported,
    Withheld,
    covered,
    frame_response,
    subscription,
    type_label,
)

GROUP = "ci"
NODE = "envoy-1"

# -------------------------------------------------------------------------------------------- helpers


def cluster(name: str, tag: str) -> Message:
    return cluster_pb2.Cluster(name=name, alt_stat_name=tag)


def endpoint(name: str, tag: str) -> Message:
    locality = endpoint_components_pb2.LocalityLbEndpoints(locality=base_pb2.Locality(zone=tag))
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[locality])


def listener(name: str, tag: str) -> Message:
    return listener_pb2.Listener(name=name, stat_prefix=tag)


def route(name: str, tag: str) -> Message:
    return route_pb2.RouteConfiguration(name=name, internal_only_headers=[tag])


MESSAGES = {CLUSTER: cluster_pb2.Cluster, ENDPOINT: endpoint_pb2.ClusterLoadAssignment}
MESSAGES |= {LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration}
MESSAGES |= {EXTENSION_CONFIG: extension_pb2.TypedExtensionConfig}


def snap(
    clusters: Mapping[str, str] | Iterable[str] = ("backend",),
    endpoints: Mapping[str, str] | Iterable[str] | None = None,
    listeners: Mapping[str, str] | Iterable[str] = ("listener_0",),
    routes: Mapping[str, str] | Iterable[str] = ("local_route",),
    group: str = GROUP,
) -> Snapshot:
    """A snapshot from name→content-tag maps (a plain list of names means tag "v1" for each)."""

    def tagged(items: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
        return dict(items) if isinstance(items, Mapping) else dict.fromkeys(items, "v1")

    cds = tagged(clusters)
    eds = tagged(endpoints if endpoints is not None else cds)
    return Snapshot.build(
        group,
        {
            CLUSTER: [(n, cluster(n, t)) for n, t in cds.items()],
            ENDPOINT: [(n, endpoint(n, t)) for n, t in eds.items()],
            LISTENER: [(n, listener(n, t)) for n, t in tagged(listeners).items()],
            ROUTE: [(n, route(n, t)) for n, t in tagged(routes).items()],
        },
    )


def req(
    type_url: str,
    names: Iterable[str] = (),
    *,
    version: str = "",
    nonce: str = "",
    node: bool = False,
    error: str | None = None,
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=type_url, version_info=version, resource_names=list(names), response_nonce=nonce
    )
    if node:
        request.node.id = NODE
        request.node.cluster = GROUP
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    return request


def decode(response: Response) -> tuple[discovery_pb2.DiscoveryResponse, list[str]]:
    """Parse the bytes as Envoy would and return the message and its resource names."""
    message = discovery_pb2.DiscoveryResponse.FromString(response.data)
    names = []
    for packed in message.resources:
        assert packed.type_url == message.type_url
        resource = MESSAGES[message.type_url].FromString(packed.value)
        names.append(resource.cluster_name if message.type_url == ENDPOINT else resource.name)
    return message, names


def one(output: Output) -> Response:
    assert len(output.responses) == 1, output.responses
    return output.responses[0]


E = TypeVar("E")


def of_type(output: Output, kind: type[E]) -> list[E]:
    return [e for e in output.events if isinstance(e, kind)]


class Rejected:
    """A stand-in for the registry's per-node memory."""

    def __init__(self, *entries: tuple[str, str, str]) -> None:
        self.entries = set(entries)

    def is_rejected(self, node_id: str, type_url: str, version: str) -> bool:
        return (node_id, type_url, version) in self.entries


def ack(stream: AdsStream, response: Response, names: Iterable[str] = (), now: float = 0.0) -> Output:
    return stream.receive(req(response.type_url, names, version=response.version, nonce=response.nonce), now)


def started(snapshot: Snapshot | None = None) -> tuple[AdsStream, dict[str, Response]]:
    """A stream that went through Envoy's startup sequence and ACKed all four types."""
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snapshot or snap(), 0.0)
    sent = {}
    for type_url, names in ((CLUSTER, ()), (ENDPOINT, ("backend",)), (LISTENER, ()), (ROUTE, ("local_route",))):
        sent[type_url] = one(stream.receive(req(type_url, names, node=type_url == CLUSTER), 0.0))
        ack(stream, sent[type_url], names)
    return stream, sent


# ------------------------------------------------------------------------------------ helpers under test


def test_subscription_wildcards_only_for_cds_and_lds() -> None:
    assert subscription(CLUSTER, [], Interned()) is None
    assert subscription(LISTENER, ["*"], Interned()) is None
    assert subscription(CLUSTER, ["*", "a"], Interned()) is None
    assert subscription(CLUSTER, ["a"], Interned()) == frozenset({"a"})
    assert subscription(ENDPOINT, [], Interned()) == frozenset()
    assert subscription(ROUTE, ["*"], Interned()) == frozenset({"*"})


def test_covered() -> None:
    assert covered(frozenset({"a"}), None)
    assert covered(None, None)
    assert not covered(None, frozenset({"a"}))
    assert covered(frozenset({"a"}), frozenset({"a", "b"}))
    assert not covered(frozenset({"a", "c"}), frozenset({"a", "b"}))


def test_framed_bytes_equal_a_normally_serialized_response() -> None:
    s = snap(clusters=("a", "b"))
    body, _ = s.types[CLUSTER].entries_for(None)
    data = frame_response(body, "v9", CLUSTER, "7")
    expected = discovery_pb2.DiscoveryResponse(version_info="v9", type_url=CLUSTER, nonce="7")
    for resource in s.types[CLUSTER].resources.values():
        expected.resources.append(AnyProto.FromString(resource.any_bytes))
    assert discovery_pb2.DiscoveryResponse.FromString(data) == expected


def test_type_labels() -> None:
    assert [type_label(t) for t in (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)] == ["sds", "cds", "eds", "lds", "rds"]
    assert type_label(EXTENSION_CONFIG) == "ecds"
    assert type_label("type.googleapis.com/envoy.service.runtime.v3.Runtime") == "other"


def _with_secrets(base: Snapshot, **values: str) -> Snapshot:
    """`base` plus generic secrets (name → value), as the compiler delivers injected upstream credentials."""
    resources: dict[str, list[tuple[str, Message | bytes]]] = {
        t: [(n, r.payload) for n, r in s.resources.items()] for t, s in base.types.items()
    }
    resources[SECRET] = [
        (n, secret_pb2.Secret(name=n, generic_secret=secret_pb2.GenericSecret(secret={"inline_string": v})))
        for n, v in values.items()
    ]
    return Snapshot.build(base.group, resources)


def test_secrets_are_a_named_subscription_served_like_any_type() -> None:
    assert (
        subscription(SECRET, [], Interned()) == frozenset()
    )  # never a wildcard: a proxy only gets the secrets it names
    stream, _ = started(_with_secrets(snap(), **{"backend-a-credential": "one", "backend-b-credential": "x"}))
    sds = one(stream.receive(req(SECRET, ["backend-a-credential"]), 0.0))
    message = discovery_pb2.DiscoveryResponse.FromString(sds.data)
    (packed,) = message.resources
    assert message.type_url == packed.type_url == SECRET
    assert secret_pb2.Secret.FromString(packed.value).generic_secret.secret.inline_string == "one"
    assert sds.resource_names == ("backend-a-credential",)
    ack(stream, sds, ["backend-a-credential"])
    changed = stream.set_snapshot(
        _with_secrets(snap(), **{"backend-a-credential": "two", "backend-b-credential": "x"}), 1.0
    )
    assert [r.type_url for r in changed.responses] == [SECRET]  # a new value is an SDS push, nothing else


def test_secrets_are_pushed_before_clusters() -> None:
    stream, _ = started(_with_secrets(snap(), s="one"))
    ack(stream, one(stream.receive(req(SECRET, ["s"]), 0.0)), ["s"])
    out = stream.set_snapshot(_with_secrets(snap(clusters={"backend": "v2"}), s="two"), 1.0)
    assert [r.type_url for r in out.responses] == [SECRET, CLUSTER, ENDPOINT]


def _with_filters(base: Snapshot, **denied: str) -> Snapshot:
    """`base` plus filter configurations (ECDS): filter name → the job an RBAC deny list holds."""
    resources: dict[str, list[tuple[str, Message | bytes]]] = {
        t: [(n, r.payload) for n, r in s.resources.items()] for t, s in base.types.items()
    }
    resources[EXTENSION_CONFIG] = []
    for name, job in denied.items():
        config = extension_pb2.TypedExtensionConfig(name=name)
        config.typed_config.Pack(rbac_pb2.RBAC(rules_stat_prefix=job))
        resources[EXTENSION_CONFIG].append((name, config))
    return Snapshot.build(base.group, resources)


def _filter_stream(snapshot: Snapshot) -> tuple[AdsStream, Response]:
    """A started stream that asked for (as a listener naming it makes Envoy do) and ACKed the filter "deny"."""
    stream, _ = started(snapshot)
    ecds = one(stream.receive(req(EXTENSION_CONFIG, ["deny"]), 0.0))
    ack(stream, ecds, ["deny"])
    return stream, ecds


def test_filter_configs_are_a_named_subscription_served_like_routes() -> None:
    assert subscription(EXTENSION_CONFIG, [], Interned()) == frozenset()  # never a wildcard
    s = _with_filters(snap(), deny="1001", other="7")
    stream, ecds = _filter_stream(s)
    message, names = decode(ecds)
    assert message.type_url == EXTENSION_CONFIG and names == ["deny"] and ecds.version == s.version(EXTENSION_CONFIG)
    config = extension_pb2.TypedExtensionConfig.FromString(message.resources[0].value)
    deny_list = rbac_pb2.RBAC()
    assert config.typed_config.Unpack(deny_list) and deny_list.rules_stat_prefix == "1001"
    # A new deny list is an ECDS push and nothing else: no listener, no route.
    out = stream.set_snapshot(_with_filters(snap(), deny="1002", other="7"), 1.0)
    assert [r.type_url for r in out.responses] == [EXTENSION_CONFIG] and decode(one(out))[1] == ["deny"]


def test_filter_configs_are_not_held_while_clusters_warm_and_precede_routes() -> None:
    """ECDS names no cluster: it does not wait for CDS/EDS ACKs; it goes after listeners, before routes."""
    stream, _ = _filter_stream(_with_filters(snap(), deny="1001"))
    out = stream.set_snapshot(
        _with_filters(snap(clusters={"backend": "v2"}, routes={"local_route": "v2"}), deny="2"), 0
    )
    assert [r.type_url for r in out.responses] == [CLUSTER, ENDPOINT, EXTENSION_CONFIG]
    assert [r.type_url for r in warm(stream, out)] == [ROUTE]
    changed = snap(clusters={"backend": "v2"}, listeners={"listener_0": "v3"}, routes={"local_route": "v3"})
    out = stream.set_snapshot(_with_filters(changed, deny="3"), 0.0)
    assert [r.type_url for r in out.responses] == [LISTENER, EXTENSION_CONFIG, ROUTE]
    assert PUSH_ORDER.index(LISTENER) < PUSH_ORDER.index(EXTENSION_CONFIG) < PUSH_ORDER.index(ROUTE)


def test_a_nacked_filter_config_is_withheld_until_a_newer_one() -> None:
    stream, good = _filter_stream(_with_filters(snap(), deny="1001"))
    bad = _with_filters(snap(), deny="bad", other="x")
    push = one(stream.set_snapshot(bad, 1.0))
    out = stream.receive(req(EXTENSION_CONFIG, ["deny"], version=good.version, nonce=push.nonce, error="RE2"), 2.0)
    assert of_type(out, Nack) == [
        Nack(EXTENSION_CONFIG, push.version, push.nonce, good.version, "RE2", 13, 1.0, ("deny",))
    ]
    assert out.responses == ()
    grown = stream.receive(req(EXTENSION_CONFIG, ["deny", "other"], version=good.version, nonce=push.nonce), 2.0)
    assert grown.responses == () and of_type(grown, Withheld) == [
        Withheld(EXTENSION_CONFIG, bad.version(EXTENSION_CONFIG))
    ]
    fixed = one(stream.set_snapshot(_with_filters(snap(), deny="fixed", other="x"), 3.0))
    assert fixed.type_url == EXTENSION_CONFIG and decode(fixed)[1] == ["deny", "other"]


def test_a_reconnect_holding_the_current_filter_configs_gets_nothing() -> None:
    s = _with_filters(snap(), deny="1001")
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(s, 0.0)
    stream.receive(req(LISTENER, version=s.version(LISTENER), node=True), 0.0)
    out = stream.receive(req(EXTENSION_CONFIG, ["deny"], version=s.version(EXTENSION_CONFIG)), 0.0)
    assert out.responses == () and of_type(out, Resumed) == [Resumed(EXTENSION_CONFIG, s.version(EXTENSION_CONFIG))]
    out = stream.set_snapshot(_with_filters(snap(), deny="1002"), 0.0)
    assert [r.type_url for r in out.responses] == [EXTENSION_CONFIG]
    # An older version is answered at once.
    older = AdsStream(FanOutCache())
    older.set_snapshot(s, 0.0)
    older.receive(req(LISTENER, version=s.version(LISTENER), node=True), 0.0)
    assert decode(one(older.receive(req(EXTENSION_CONFIG, ["deny"], version="older"), 0.0)))[1] == ["deny"]


def test_unsubscribed_and_removed_filter_configs() -> None:
    """Unsubscribing needs no answer and a re-subscription is answered again. A removed configuration is just
    missing from the next response (Envoy keeps the last one over SotW: docs/envoy-ecds.md §2)."""
    s = _with_filters(snap(), deny="1001", other="7")
    stream, ecds = _filter_stream(s)
    assert ack(stream, ecds, []).responses == ()
    again = one(stream.receive(req(EXTENSION_CONFIG, ["deny"], version=ecds.version, nonce=ecds.nonce), 0.0))
    assert again.version == ecds.version and decode(again)[1] == ["deny"]
    ack(stream, again, ["deny"])
    gone = one(stream.set_snapshot(_with_filters(snap(), other="7"), 1.0))
    assert gone.type_url == EXTENSION_CONFIG and decode(gone)[1] == []


def test_a_snapshot_without_filter_configs_keeps_its_summary_version() -> None:
    """Counted only when present, so every snapshot compiled today keeps the name it had before ECDS."""
    s = snap()
    legacy = hashlib.sha256()
    for type_url in (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE):
        legacy.update(s.version(type_url).encode())
    assert s.summary_version == legacy.hexdigest()[:12]
    assert _with_filters(s, deny="1").summary_version != s.summary_version


# ------------------------------------------------ filter configurations: only what changed, after an ACK


BUCKETS = ("a", "b", "c")


def _buckets(**changed: str) -> Snapshot:
    """Three deny-list buckets ("a", "b", "c", each denying job "1" unless `changed` says otherwise)."""
    return _with_filters(snap(), **({n: "1" for n in BUCKETS} | changed))


def _bucket_stream(snapshot: Snapshot, shared: FanOutCache | None = None) -> tuple[AdsStream, Response]:
    """A started stream subscribed to (and ACKing) the three buckets, as a listener naming them makes Envoy do."""
    stream = AdsStream(shared or FanOutCache())
    stream.set_snapshot(snapshot, 0.0)
    for type_url, names in ((CLUSTER, ()), (ENDPOINT, ("backend",)), (LISTENER, ()), (ROUTE, ("local_route",))):
        ack(stream, one(stream.receive(req(type_url, names, node=type_url == CLUSTER), 0.0)), names)
    ecds = one(stream.receive(req(EXTENSION_CONFIG, BUCKETS), 0.0))
    ack(stream, ecds, BUCKETS)
    return stream, ecds


def _denied(response: Response) -> dict[str, str]:
    """Filter name → the job its deny list holds, as Envoy would read the response."""
    found = {}
    for packed in discovery_pb2.DiscoveryResponse.FromString(response.data).resources:
        config = extension_pb2.TypedExtensionConfig.FromString(packed.value)
        deny_list = rbac_pb2.RBAC()
        assert config.typed_config.Unpack(deny_list)
        found[config.name] = deny_list.rules_stat_prefix
    return found


def test_after_an_ack_a_filter_config_response_carries_only_what_changed() -> None:
    stream, first = _bucket_stream(_buckets())
    assert _denied(first) == {"a": "1", "b": "1", "c": "1"}  # the first answer: everything subscribed
    changed = _buckets(b="2")
    push = one(stream.set_snapshot(changed, 1.0))
    assert (push.type_url, push.resource_names, _denied(push)) == (EXTENSION_CONFIG, ("b",), {"b": "2"})
    # The version is still the content hash of the whole type: the same as a full response's.
    assert push.version == changed.version(EXTENSION_CONFIG) == decode(push)[0].version_info
    assert of_type(ack(stream, push, BUCKETS), Ack) == [Ack(EXTENSION_CONFIG, push.version, push.nonce, 0.0)]
    both = one(stream.set_snapshot(_buckets(a="3", b="2", c="3"), 2.0))
    assert _denied(both) == {"a": "3", "c": "3"}
    assert stream.set_snapshot(_buckets(a="3", b="2", c="3"), 3.0).responses == ()  # same bytes: nothing


def test_unchanged_filter_configs_are_never_resent() -> None:
    stream, _ = _bucket_stream(_buckets())
    for round_ in range(2, 7):
        push = one(stream.set_snapshot(_buckets(b=str(round_)), float(round_)))
        assert _denied(push) == {"b": str(round_)}
        assert ack(stream, push, BUCKETS).responses == ()
    assert stream.type_state(EXTENSION_CONFIG).sent_names == BUCKETS  # type: ignore[union-attr]


def test_a_whole_change_is_the_whole_body_shared_with_full_responses() -> None:
    stream, _ = _bucket_stream(_buckets())
    everything = _buckets(a="2", b="2", c="2")
    push = one(stream.set_snapshot(everything, 1.0))
    assert push.resource_names == BUCKETS
    assert push.unsent.startswith(everything.types[EXTENSION_CONFIG].entries_for(frozenset(BUCKETS))[0])


def test_a_reconnect_with_an_older_or_unknown_version_gets_every_filter_config() -> None:
    old, current = _buckets(), _buckets(b="2")
    for held in (old.version(EXTENSION_CONFIG), "", "unknown"):
        stream = AdsStream(FanOutCache())
        stream.set_snapshot(current, 0.0)
        stream.receive(req(LISTENER, version=current.version(LISTENER), node=True), 0.0)
        response = one(stream.receive(req(EXTENSION_CONFIG, BUCKETS, version=held), 0.0))
        assert _denied(response) == {"a": "1", "b": "2", "c": "1"}, held


def test_a_reconnect_holding_the_current_filter_configs_gets_nothing_then_everything_once() -> None:
    """The version a reconnecting Envoy reports says nothing of a name it asked for after accepting it and was never
    answered: after a resume what it holds is not known, so the next push is whole, and subsets start after its ACK."""
    current = _buckets()
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(current, 0.0)
    stream.receive(req(LISTENER, version=current.version(LISTENER), node=True), 0.0)
    out = stream.receive(req(EXTENSION_CONFIG, BUCKETS, version=current.version(EXTENSION_CONFIG)), 0.0)
    assert out.responses == () and of_type(out, Resumed) == [
        Resumed(EXTENSION_CONFIG, current.version(EXTENSION_CONFIG))
    ]
    whole = one(stream.set_snapshot(_buckets(c="2"), 1.0))
    assert _denied(whole) == {"a": "1", "b": "1", "c": "2"}
    ack(stream, whole, BUCKETS)
    assert _denied(one(stream.set_snapshot(_buckets(b="2", c="2"), 2.0))) == {"b": "2"}


def test_after_a_nack_every_filter_config_is_sent() -> None:
    stream, good = _bucket_stream(_buckets())
    bad = one(stream.set_snapshot(_buckets(b="bad"), 1.0))
    assert _denied(bad) == {"b": "bad"}
    out = stream.receive(req(EXTENSION_CONFIG, BUCKETS, version=good.version, nonce=bad.nonce, error="RE2"), 2.0)
    assert out.responses == () and len(of_type(out, Nack)) == 1
    fixed = one(stream.set_snapshot(_buckets(b="fixed"), 3.0))
    assert _denied(fixed) == {"a": "1", "b": "fixed", "c": "1"}  # what it holds after a NACK is not known for sure
    ack(stream, fixed, BUCKETS)
    assert _denied(one(stream.set_snapshot(_buckets(b="fixed", c="2"), 4.0))) == {"c": "2"}  # ACKed: subsets again


def test_an_ack_naming_another_version_than_the_one_sent_makes_the_next_response_whole() -> None:
    """Envoy's ACK carries the version it accepted, which is the one sent; anything else is not trusted."""
    stream, first = _bucket_stream(_buckets())
    push = one(stream.set_snapshot(_buckets(b="2"), 1.0))
    stream.receive(req(EXTENSION_CONFIG, BUCKETS, version=first.version, nonce=push.nonce), 2.0)
    assert _denied(one(stream.set_snapshot(_buckets(b="2", c="2"), 3.0))) == {"a": "1", "b": "2", "c": "2"}


def test_a_push_while_the_last_one_is_unanswered_sends_only_what_was_not_sent() -> None:
    """A configuration sent and not yet ACKed is not sent again: Envoy applies SotW responses in order, and one that
    leaves it out keeps it in force (docs/envoy-ecds.md §2); a NACK of either response makes the next one whole."""
    stream, _ = _bucket_stream(_buckets())
    assert _denied(one(stream.set_snapshot(_buckets(b="2"), 1.0))) == {"b": "2"}
    assert _denied(one(stream.set_snapshot(_buckets(b="2", c="2"), 2.0))) == {"c": "2"}


def test_a_newly_subscribed_filter_config_is_sent_without_the_held_ones() -> None:
    s = _buckets()
    stream, _ = _bucket_stream(s)
    grown = (*BUCKETS, "d")
    both = _with_filters(snap(), a="1", b="1", c="1", d="9")
    one_more = one(stream.set_snapshot(both, 1.0))
    assert one_more.resource_names == ()  # "d" is in the snapshot, but nobody asked for it yet: an empty response
    answered = one(ack(stream, one_more, grown))  # the listener naming "d" arrived: Envoy asks for it
    assert (answered.version, _denied(answered)) == (one_more.version, {"d": "9"})
    ack(stream, answered, grown)
    # A new name and a change in the same push: both, and only them.
    stream2, _ = _bucket_stream(s)
    push = one(stream2.receive(req(EXTENSION_CONFIG, grown, version=s.version(EXTENSION_CONFIG)), 1.0))
    assert _denied(push) == {}  # "d" is not in the stream's snapshot yet
    ack(stream2, push, grown)
    assert _denied(one(stream2.set_snapshot(_with_filters(snap(), a="2", b="1", c="1", d="9"), 2.0))) == {
        "a": "2",
        "d": "9",
    }


def test_a_change_nobody_subscribed_to_is_an_empty_response_envoy_acks() -> None:
    """Envoy ACKs an empty SotW ECDS response and changes nothing (docs/envoy-ecds.md §2): the client is then at
    the new version, which its status shows, and the next change is again only what changed."""
    stream, _ = _bucket_stream(_buckets())
    elsewhere = _with_filters(snap(), a="1", b="1", c="1", other="x")
    empty = one(stream.set_snapshot(elsewhere, 1.0))
    assert (empty.resource_names, decode(empty)[1], empty.version) == ((), [], elsewhere.version(EXTENSION_CONFIG))
    ack(stream, empty, BUCKETS)
    removed = one(stream.set_snapshot(_with_filters(snap(), a="1", c="1", other="x"), 2.0))  # "b" removed
    assert removed.resource_names == ()  # Envoy keeps a configuration left out over SotW; the listener retires it
    ack(stream, removed, BUCKETS)
    assert _denied(one(stream.set_snapshot(_with_filters(snap(), a="1", b="1", c="1", other="x"), 3.0))) == {"b": "1"}


def test_routes_and_the_other_types_are_still_sent_whole() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(routes=("r1", "r2")), 0.0)
    ack(stream, one(stream.receive(req(ROUTE, ["r1", "r2"], node=True), 0.0)), ["r1", "r2"])
    out = stream.set_snapshot(snap(routes={"r1": "v1", "r2": "v2"}), 1.0)
    assert decode(one(out))[1] == ["r1", "r2"]


def test_streams_at_the_same_acked_version_share_one_subset() -> None:
    shared, first = FanOutCache(), _buckets()
    streams = [_bucket_stream(first, shared)[0] for _ in range(3)]
    computed = shared.subsets.computed
    changed = _buckets(b="2")
    pushes = [one(s.set_snapshot(changed, 1.0)) for s in streams]
    assert shared.subsets.computed == computed + 1  # one diff for the fan-out
    assert all(p.unsent is pushes[0].unsent for p in pushes)  # one framed body
    assert all(p.wire(shared) is pushes[0].wire(shared) for p in pushes)  # same history, same nonce: one copy
    assert all(_denied(p) == {"b": "2"} for p in pushes)
    # ACKed or not yet, streams that were sent the same get the same subset, framed once; one that NACKed, whole.
    ack(streams[0], pushes[0], BUCKETS)
    nack = req(EXTENSION_CONFIG, BUCKETS, version=first.version(EXTENSION_CONFIG), nonce=pushes[1].nonce, error="x")
    assert of_type(streams[1].receive(nack, 1.0), Nack)
    later = _buckets(b="2", c="2")
    subset, whole, subset2 = (one(s.set_snapshot(later, 2.0)) for s in streams)
    assert subset.unsent is subset2.unsent and _denied(subset) == {"c": "2"}
    assert _denied(whole) == {"a": "1", "b": "2", "c": "2"}


SEVENTEEN = tuple(f"f{i:02}" for i in range(17))


def _seventeen(**changed: str) -> Snapshot:
    """issue 13's listener: 17 filter configurations (jwt_authn and 16 deny-list buckets, here all RBAC)."""
    return _with_filters(snap(), **({n: "1" for n in SEVENTEEN} | changed))


def _connect_burst(stream: AdsStream, version: str = "") -> list[Response]:
    """What Envoy sends when a listener with 17 ECDS filters arrives (docs/envoy-ecds.md §8): one request per filter,
    each naming every filter so far, all with an empty nonce (before it ACKs anything)."""
    responses: list[Response] = []
    for count in range(1, len(SEVENTEEN) + 1):
        responses += stream.receive(req(EXTENSION_CONFIG, SEVENTEEN[:count], version=version), float(count)).responses
    return responses


def test_a_connect_burst_of_growing_requests_sends_each_filter_config_once() -> None:
    current = _seventeen()
    stream, _ = started(current)
    burst = _connect_burst(stream)
    assert [r.resource_names for r in burst] == [(n,) for n in SEVENTEEN]  # 17 answers, one configuration each
    assert {r.version for r in burst} == {current.version(EXTENSION_CONFIG)}  # all at the type's version
    assert sum(r.size for r in burst) < 2 * len(current.types[EXTENSION_CONFIG].all_entries)  # not 17 x 9 of them
    for response in burst[:-1]:  # Envoy then answers each in order: all but the last are stale
        assert of_type(ack(stream, response, SEVENTEEN), Stale) and stream.type_state(EXTENSION_CONFIG).awaiting  # type: ignore[union-attr]
    assert of_type(ack(stream, burst[-1], SEVENTEEN), Ack) == [
        Ack(EXTENSION_CONFIG, burst[-1].version, burst[-1].nonce, 0.0)
    ]
    assert _denied(one(stream.set_snapshot(_seventeen(f09="2"), 20.0))) == {"f09": "2"}


def test_streams_in_the_same_connect_burst_share_every_answer() -> None:
    shared, current = FanOutCache(), _seventeen()
    streams = [AdsStream(shared) for _ in range(3)]
    for stream in streams:
        stream.set_snapshot(current, 0.0)
        stream.receive(req(LISTENER, node=True), 0.0)
    bursts = [_connect_burst(stream) for stream in streams]
    assert all(len(b) == 17 for b in bursts)
    for answers in zip(*bursts, strict=True):
        assert all(a.unsent is answers[0].unsent and a.wire(shared) is answers[0].wire(shared) for a in answers)


def test_a_nack_in_the_middle_of_a_burst_makes_the_next_response_whole() -> None:
    current = _seventeen(f05="bad")
    stream, _ = started(current)
    version = current.version(EXTENSION_CONFIG)
    burst = [one(stream.receive(req(EXTENSION_CONFIG, SEVENTEEN[:count]), 1.0)) for count in range(1, 9)]
    assert [r.resource_names for r in burst] == [(n,) for n in SEVENTEEN[:8]]
    nacked = stream.receive(req(EXTENSION_CONFIG, SEVENTEEN[:8], nonce=burst[-1].nonce, error="f05"), 2.0)
    assert of_type(nacked, Nack) and nacked.responses == ()
    grown = stream.receive(req(EXTENSION_CONFIG, SEVENTEEN, nonce=burst[-1].nonce), 3.0)
    assert grown.responses == () and of_type(grown, Withheld) == [Withheld(EXTENSION_CONFIG, version)]
    fixed = one(stream.set_snapshot(_seventeen(f05="2"), 4.0))
    assert fixed.resource_names == SEVENTEEN  # what it holds after a NACK is not known: everything, once
    ack(stream, fixed, SEVENTEEN)
    assert _denied(one(stream.set_snapshot(_seventeen(f05="2", f16="2"), 5.0))) == {"f16": "2"}


def test_a_reconnect_in_a_burst_gets_everything_it_names_once() -> None:
    """A new stream resuming at the current version holds something, but not known what: the first answer holds
    every name asked for so far, later ones only the new names. With an older version, each name once from the
    start."""
    current = _seventeen()
    version = current.version(EXTENSION_CONFIG)
    resumed = AdsStream(FanOutCache())
    resumed.set_snapshot(current, 0.0)
    resumed.receive(req(LISTENER, node=True), 0.0)
    burst = _connect_burst(resumed, version)
    assert [r.resource_names for r in burst] == [SEVENTEEN[:2], *((n,) for n in SEVENTEEN[2:])]
    older = AdsStream(FanOutCache())
    older.set_snapshot(current, 0.0)
    older.receive(req(LISTENER, node=True), 0.0)
    assert [r.resource_names for r in _connect_burst(older, "older")] == [(n,) for n in SEVENTEEN]


# ----------------------------------- the deny list's recent configuration after the buckets it follows (SENT_LAST)

B0, B1, RECENT = revocation_bucket_filter(0), revocation_bucket_filter(1), REVOKED_RECENTLY_FILTER
DENY_LIST = (B0, B1, RECENT)


def _tiers(b0: str = "", b1: str = "", recent: str = "") -> Snapshot:
    """Two deny-list buckets and the recent list, each naming the jobs it denies (as a tag)."""
    return _with_filters(snap(), **{B0: b0, B1: b1, RECENT: recent})


SEALED, UNSEALED = _tiers(b0="7", recent=""), _tiers(b0="", recent="7")  # job 7 in its bucket, in the recent list


def _served(*snapshots: Snapshot) -> FanOutCache:
    """A server's cache whose streams were given `snapshots` before."""
    shared = FanOutCache()
    for snapshot in snapshots:
        AdsStream(shared).set_snapshot(snapshot, 0.0)
    return shared


def _reconnected(current: Snapshot, held: str, shared: FanOutCache | None = None) -> tuple[AdsStream, Output]:
    """A new stream from an Envoy that holds the filter configurations of version `held` and asks for them again: a
    reconnect to the server that gave it `held` (by default, UNSEALED's) or a failover from another one."""
    stream = AdsStream(shared if shared is not None else _served(UNSEALED))
    stream.set_snapshot(current, 0.0)
    stream.receive(req(LISTENER, version=current.version(LISTENER), node=True), 0.0)
    return stream, stream.receive(req(EXTENSION_CONFIG, DENY_LIST, version=held), 1.0)


def test_a_reconnect_across_a_seal_gets_the_buckets_first_and_the_recent_list_after_their_ack() -> None:
    """Envoy applies one response's configurations one by one: job 7 must never be in neither tier."""
    stream, out = _reconnected(SEALED, UNSEALED.version(EXTENSION_CONFIG))
    first = one(out)
    version = SEALED.version(EXTENSION_CONFIG)
    assert (first.version, _denied(first)) == (version + HELD_SUFFIX, {B0: "7", B1: ""})  # no recent list
    assert decode(first)[0].version_info == version + HELD_SUFFIX
    assert stream.set_snapshot(_tiers(b0="7"), 2.0).responses == ()  # the same content again: it still waits
    (acked,) = of_type(out := ack(stream, first, DENY_LIST, 3.0), Ack)
    assert acked.version == version + HELD_SUFFIX
    after = one(out)
    assert (after.version, _denied(after)) == (version, {RECENT: ""})
    assert ack(stream, after, DENY_LIST).responses == ()
    assert _ecds(stream).acked_version == version and not _ecds(stream).holding
    # Connected and up to date: a revocation is the recent list alone, sent at once.
    revoked = one(stream.set_snapshot(_tiers(b0="7", recent="8"), 4.0))
    assert (revoked.version, _denied(revoked)) == (_tiers(b0="7", recent="8").version(EXTENSION_CONFIG), {RECENT: "8"})


def test_a_reconnect_holding_the_held_back_version_gets_the_buckets_again_then_the_recent_list() -> None:
    """Acking the response held back is not holding the type's version: a reconnect then resumes nothing."""
    shared = _served(UNSEALED)
    _, out = _reconnected(SEALED, UNSEALED.version(EXTENSION_CONFIG), shared)
    stream, again = _reconnected(SEALED, one(out).version, shared)
    assert of_type(again, Resumed) == [] and set(_denied(one(again))) == {B0, B1}
    assert _denied(one(ack(stream, one(again), DENY_LIST))) == {RECENT: ""}


def test_a_nack_of_the_buckets_sends_no_recent_list_and_withholds_the_version_as_any_nack() -> None:
    stream, out = _reconnected(SEALED, UNSEALED.version(EXTENSION_CONFIG))
    first = one(out)
    nacked = stream.receive(_nack(first, DENY_LIST, version=UNSEALED.version(EXTENSION_CONFIG)), 2.0)
    assert nacked.responses == () and of_type(nacked, Nack)[0].version == first.version
    # Envoy keeps its previous recent list, which still denies job 7; the version stays withheld.
    again = stream.receive(req(EXTENSION_CONFIG, DENY_LIST, version=UNSEALED.version(EXTENSION_CONFIG)), 3.0)
    assert again.responses == ()
    fixed = _tiers(b0="7", b1="9", recent="")
    split = one(stream.set_snapshot(fixed, 4.0))  # a newer snapshot: whole (unknown after a NACK), buckets first
    assert (split.version, set(_denied(split))) == (fixed.version(EXTENSION_CONFIG) + HELD_SUFFIX, {B0, B1})
    assert _denied(one(ack(stream, split, DENY_LIST))) == {RECENT: ""}


def test_a_change_while_the_recent_list_is_held_goes_at_once_and_the_recent_list_after_its_answer() -> None:
    stream, out = _reconnected(SEALED, UNSEALED.version(EXTENSION_CONFIG))
    first = one(out)
    newer = _tiers(b0="7", b1="9", recent="")
    second = one(stream.set_snapshot(newer, 2.0))  # bucket 01 changed: sent, the recent list still not
    assert (second.version, _denied(second)) == (newer.version(EXTENSION_CONFIG) + HELD_SUFFIX, {B1: "9"})
    only_recent = _tiers(b0="7", b1="9", recent="10")
    assert stream.set_snapshot(only_recent, 3.0).responses == ()  # a revocation waits for the answer due
    assert of_type(ack(stream, first, DENY_LIST), Stale)  # the first's ACK is no answer to the last
    last = one(ack(stream, second, DENY_LIST))
    assert (last.version, _denied(last)) == (only_recent.version(EXTENSION_CONFIG), {RECENT: "10"})


def test_a_recent_list_unsubscribed_while_held_is_not_sent_and_comes_alone_when_named_again() -> None:
    stream, out = _reconnected(SEALED, UNSEALED.version(EXTENSION_CONFIG))
    empty = one(ack(stream, one(out), (B0, B1)))  # the listener no longer names it: the type's version, nothing
    assert (empty.version, empty.resource_names) == (SEALED.version(EXTENSION_CONFIG), ())
    assert not _ecds(stream).holding
    again = req(EXTENSION_CONFIG, DENY_LIST, version=empty.version, nonce=empty.nonce)
    assert _denied(one(stream.receive(again, 2.0))) == {RECENT: ""}  # named again: alone, at once


def test_a_failover_from_another_server_is_answered_in_one_response_and_held_back_once_it_acked_ours() -> None:
    """Another replica may have sealed ids this one still holds as recent: the buckets first could then be the unsafe
    order, and the versions cannot tell. Once the stream ACKed every configuration from here, the order is known."""
    stream, out = _reconnected(SEALED, UNSEALED.version(EXTENSION_CONFIG), FanOutCache())
    whole = one(out)
    assert (whole.version, set(_denied(whole))) == (SEALED.version(EXTENSION_CONFIG), set(DENY_LIST))
    assert not _ecds(stream).ours
    ack(stream, whole, DENY_LIST)
    assert _ecds(stream).ours
    stream.set_snapshot(_tiers(b0="7", recent="8"), 2.0)  # unanswered: the next change is sent as a subset
    settled = _tiers(b0="7,8")
    split = one(stream.set_snapshot(settled, 3.0))
    assert (split.version, _denied(split)) == (settled.version(EXTENSION_CONFIG) + HELD_SUFFIX, {B0: "7,8"})


def test_the_versions_served_are_a_bounded_memory_noted_once_per_snapshot() -> None:
    served = Served(limit=4)
    typed = SEALED.types[EXTENSION_CONFIG]
    served.note_snapshot(typed)
    assert typed.version in served and Served.key(B0, typed.resources[B0].version) in served
    served.note("x")
    served.note_snapshot(typed)  # the same snapshot again (every stream of a fan-out): nothing moves
    assert "x" in served
    for n in range(4):
        served.note(str(n))
    assert "x" not in served and typed.version not in served and "3" in served and len(served._seen) == 4


def test_a_connected_stream_gets_a_revocation_at_once_and_a_seal_it_skipped_in_two_responses() -> None:
    """A fan-out pass slower than the settle serves the seal and its settle in one snapshot: two responses again."""
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(UNSEALED, 0.0)
    stream.receive(req(LISTENER, node=True), 0.0)
    ack(stream, one(stream.receive(req(EXTENSION_CONFIG, DENY_LIST), 0.0)), DENY_LIST)
    revoked = _tiers(recent="7,8")
    assert _denied(one(stream.set_snapshot(revoked, 1.0))) == {RECENT: "7,8"}  # unanswered, and still not held
    settled = _tiers(b0="7,8", recent="")
    split = one(stream.set_snapshot(settled, 2.0))
    assert (split.version, _denied(split)) == (settled.version(EXTENSION_CONFIG) + HELD_SUFFIX, {B0: "7,8"})
    assert _denied(one(ack(stream, split, DENY_LIST))) == {RECENT: ""}


def test_a_fresh_connect_is_answered_as_before_whatever_order_it_names_the_deny_list_in() -> None:
    """An Envoy that holds no recent list has none to keep in force: its per-filter burst and a request naming all
    at once are answered without holding anything back."""
    for order in (DENY_LIST, (RECENT, B0, B1), (B0, RECENT, B1)):
        stream = AdsStream(FanOutCache())
        stream.set_snapshot(SEALED, 0.0)
        stream.receive(req(LISTENER, node=True), 0.0)
        burst = [one(stream.receive(req(EXTENSION_CONFIG, order[:n]), 1.0)) for n in range(1, 4)]
        assert [r.resource_names for r in burst] == [(n,) for n in order]
        assert {r.version for r in burst} == {SEALED.version(EXTENSION_CONFIG)}
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(SEALED, 0.0)
    stream.receive(req(LISTENER, node=True), 0.0)
    whole = one(stream.receive(req(EXTENSION_CONFIG, DENY_LIST), 1.0))
    assert (whole.version, whole.resource_names) == (SEALED.version(EXTENSION_CONFIG), tuple(sorted(DENY_LIST)))


def test_without_configurations_to_send_last_the_seal_goes_in_one_response() -> None:
    stream = AdsStream(FanOutCache(), last=frozenset())
    stream.set_snapshot(SEALED, 0.0)
    stream.receive(req(LISTENER, version=SEALED.version(LISTENER), node=True), 0.0)
    out = stream.receive(req(EXTENSION_CONFIG, DENY_LIST, version=UNSEALED.version(EXTENSION_CONFIG)), 1.0)
    assert one(out).version == SEALED.version(EXTENSION_CONFIG) and set(_denied(one(out))) == set(DENY_LIST)


# ------------------------------------------------------ a NACK of an earlier response (docs/envoy-ecds.md §8)


def _nack(response: Response, names: Iterable[str], error: str = "RE2 program size", version: str = "") -> AdsRequest:
    return req(response.type_url, names, version=version, nonce=response.nonce, error=error)


AdsRequest = discovery_pb2.DiscoveryRequest


def _refused_burst(**changed: str) -> tuple[AdsStream, list[Response]]:
    """A stream through the 17-filter connect burst where Envoy refuses `f00` (the burst's first answer)."""
    stream, _ = started(_seventeen(f00="bad", **changed))
    return stream, _connect_burst(stream)


def _ecds(stream: AdsStream) -> TypeState:
    state = stream.type_state(EXTENSION_CONFIG)
    assert state is not None
    return state


def test_a_nack_of_the_first_response_of_a_burst_is_seen_after_the_burst() -> None:
    """Envoy NACKs the response carrying the configuration it refuses only after it sent all 17 requests (and was
    answered 17 times): that NACK is of the first response, not the last sent. It is a NACK all the same."""
    stream, burst = _refused_burst()
    version = burst[0].version
    out = stream.receive(_nack(burst[0], SEVENTEEN[:1]), 20.0)
    assert out.responses == ()  # nothing re-sent: Envoy ACKs refused bytes that come again, unapplied
    assert of_type(out, Nack) == [
        Nack(EXTENSION_CONFIG, version, burst[0].nonce, "", "RE2 program size", 13, 19.0, ("f00",), True, False)
    ]
    assert _ecds(stream).refused == {"f00": _seventeen(f00="bad").types[EXTENSION_CONFIG].resources["f00"].version}
    assert version not in _ecds(stream).nacked  # the later responses share the version: they are not withheld
    for response in burst[1:-1]:  # then it answers the others in order: stale, as before
        assert of_type(ack(stream, response, SEVENTEEN), Stale)
    (acked,) = of_type(ack(stream, burst[-1], SEVENTEEN), Ack)
    assert acked.version == version and acked.refusing == ("f00",)  # ACKed, still refusing f00


def test_a_refused_config_stays_refused_through_acks_until_sent_with_other_bytes() -> None:
    stream, burst = _refused_burst()
    stream.receive(_nack(burst[0], SEVENTEEN[:1]), 20.0)
    ack(stream, burst[-1], SEVENTEEN)
    other = one(stream.set_snapshot(_seventeen(f00="bad", f09="2"), 21.0))
    assert other.resource_names == ("f09",)  # only what changed: f00's refused bytes are not sent again
    assert of_type(ack(stream, other, SEVENTEEN), Ack)[0].refusing == ("f00",)
    fixed = one(stream.set_snapshot(_seventeen(f09="2"), 22.0))
    assert fixed.resource_names == ("f00",) and _ecds(stream).refused == {}  # other bytes: the new answer decides
    assert of_type(ack(stream, fixed, SEVENTEEN), Ack)[0].refusing == ()


def test_a_refused_config_resent_whole_with_the_same_bytes_stays_refused() -> None:
    """After a NACK of the last response everything is sent (what Envoy holds is not known), the refused bytes too:
    Envoy ACKs them without applying them, so the ACK does not end the refusal."""
    stream, first = _bucket_stream(_buckets())
    bad = one(stream.set_snapshot(_buckets(a="bad"), 1.0))
    (nack,) = of_type(stream.receive(_nack(bad, BUCKETS, version=first.version), 2.0), Nack)
    assert nack.resources == ("a",) and not nack.late and nack.rejects_version
    whole = one(stream.set_snapshot(_buckets(a="bad", b="2"), 3.0))
    assert _denied(whole) == {"a": "bad", "b": "2", "c": "1"}
    assert of_type(ack(stream, whole, BUCKETS), Ack)[0].refusing == ("a",)
    fixed = one(stream.set_snapshot(_buckets(a="good", b="2"), 4.0))
    assert _denied(fixed) == {"a": "good"}
    assert of_type(ack(stream, fixed, BUCKETS), Ack)[0].refusing == ()


def test_a_late_nack_of_bytes_since_sent_again_differently_leaves_nothing_refused() -> None:
    """The snapshot changed the refused configuration while the NACK was in flight: the newer bytes decide."""
    stream, _ = started(_seventeen(f00="bad"))
    first = one(stream.receive(req(EXTENSION_CONFIG, SEVENTEEN[:1]), 1.0))
    changed = one(stream.set_snapshot(_seventeen(f00="good"), 2.0))
    assert changed.resource_names == ("f00",)
    (nack,) = of_type(stream.receive(_nack(first, SEVENTEEN[:1]), 3.0), Nack)
    assert nack.late and nack.version == first.version and _ecds(stream).refused == {}
    assert of_type(ack(stream, changed, SEVENTEEN[:1]), Ack)[0].refusing == ()


def test_unsubscribing_a_refused_config_ends_its_refusal() -> None:
    """A listener that stops naming the filter unsubscribes it; Envoy drops it, and nothing fails for want of it."""
    stream, burst = _refused_burst()
    stream.receive(_nack(burst[0], SEVENTEEN[:1]), 20.0)
    assert of_type(ack(stream, burst[-1], SEVENTEEN[1:]), Ack)[0].refusing == ()
    assert _ecds(stream).refused == {}


def test_a_late_nack_keeps_no_subscription_and_sends_nothing() -> None:
    stream, burst = _refused_burst()
    out = stream.receive(_nack(burst[0], ["f00", "elsewhere"]), 20.0)
    assert out.responses == () and not of_type(out, Subscribed) and _ecds(stream).names == frozenset(SEVENTEEN)


def test_a_late_nack_of_another_type_is_seen_and_the_later_response_decides() -> None:
    """Any type: a NACK crossed by a later response is reported, and its version is not withheld (the later
    response carries the type again and its own ACK or NACK decides); only filter configurations stay refused."""
    stream, sent = started()
    first = one(stream.set_snapshot(snap(listeners={"listener_0": "bad"}), 1.0))
    second = one(stream.set_snapshot(snap(listeners={"listener_0": "good"}), 2.0))
    (nack,) = of_type(stream.receive(_nack(first, (), "bad listener", sent[LISTENER].version), 3.0), Nack)
    assert (nack.type_url, nack.version, nack.resources, nack.late) == (LISTENER, first.version, ("listener_0",), True)
    assert nack.accepted_version == sent[LISTENER].version and nack.latency == 2.0 and not nack.rejects_version
    state = stream.type_state(LISTENER)
    assert state is not None and state.nacked == set() and state.refused == {}
    assert list(state.recent) == [second.nonce]
    assert of_type(ack(stream, second), Ack)[0].refusing == ()


@pytest.mark.parametrize("nonce", ["999", "0", "-1", "01", " 1", "x", "1" * 33, "\u00e9"])
def test_a_nack_naming_a_nonce_never_sent_is_stale_and_changes_nothing(nonce: str) -> None:
    stream, _ = _refused_burst()
    before = dict(_ecds(stream).recent)
    out = stream.receive(req(EXTENSION_CONFIG, SEVENTEEN, nonce=nonce, error="x"), 20.0)
    assert out.responses == () and [type(e) for e in out.events] == [Stale]
    assert _ecds(stream).recent == before and _ecds(stream).refused == {}


def test_a_huge_nonce_is_stale_shown_clipped_and_kept_nowhere() -> None:
    stream, burst = _refused_burst()
    huge = burst[0].nonce + "9" * 1_000_000
    out = stream.receive(req(EXTENSION_CONFIG, SEVENTEEN, nonce=huge, error="x" * 100_000), 20.0)
    (stale,) = of_type(out, Stale)
    assert stale.nonce == huge[:MAX_NONCE_CHARS] and len(_ecds(stream).recent) == len(burst)
    assert of_type(stream.receive(_nack(burst[0], SEVENTEEN[:1]), 21.0), Nack)  # the real one still counts


def test_a_client_spraying_nonces_grows_nothing() -> None:
    stream, burst = _refused_burst()
    state = _ecds(stream)
    recent = dict(state.recent)
    for i in range(5_000):
        out = stream.receive(req(EXTENSION_CONFIG, SEVENTEEN, nonce=f"{10_000 + i}", error="x"), 20.0)
        assert [type(e) for e in out.events] == [Stale]
    assert state.recent == recent and state.refused == {} and state.nacked == set()
    assert of_type(stream.receive(_nack(burst[0], SEVENTEEN[:1]), 21.0), Nack)


def test_a_replayed_late_nack_counts_once() -> None:
    stream, burst = _refused_burst()
    assert of_type(stream.receive(_nack(burst[0], SEVENTEEN[:1]), 20.0), Nack)
    again = stream.receive(_nack(burst[0], SEVENTEEN[:1]), 21.0)
    assert [type(e) for e in again.events] == [Stale] and again.responses == ()


def test_a_nack_of_another_types_response_is_stale() -> None:
    stream, burst = _refused_burst()
    out = stream.receive(req(ROUTE, ["local_route"], nonce=burst[0].nonce, error="x"), 20.0)
    assert [type(e) for e in out.events] == [Stale] and len(_ecds(stream).recent) == len(burst)


def test_once_a_later_response_is_answered_an_earlier_one_is_forgotten() -> None:
    """Envoy answers a type's responses in the order they came: after it answered the fifth, a NACK of the
    first is not Envoy's, and the memory of the first five is gone."""
    stream, burst = _refused_burst()
    assert of_type(ack(stream, burst[4], SEVENTEEN), Stale)
    assert list(_ecds(stream).recent) == [r.nonce for r in burst[5:]]
    assert not of_type(stream.receive(_nack(burst[0], SEVENTEEN[:1]), 20.0), Nack)
    ack(stream, burst[-1], SEVENTEEN)
    assert _ecds(stream).recent == {}  # the last one answered: nothing left to answer


def test_a_client_that_answers_nothing_holds_a_bounded_memory() -> None:
    stream, _ = _bucket_stream(_buckets())
    pushes = [one(stream.set_snapshot(_buckets(a=str(i)), float(i))) for i in range(2, 2 + 3 * RECENT_NONCES)]
    state = _ecds(stream)
    assert len(state.recent) == RECENT_NONCES and list(state.recent) == [p.nonce for p in pushes[-RECENT_NONCES:]]
    assert not of_type(stream.receive(_nack(pushes[0], BUCKETS), 500.0), Nack)  # forgotten
    (nack,) = of_type(stream.receive(_nack(pushes[-RECENT_NONCES], BUCKETS), 500.0), Nack)
    assert nack.late and nack.resources == ("a",)
    assert len(state.refused) <= len(BUCKETS)


def test_routes_remembered_for_a_late_nack_pin_no_route_mapping() -> None:
    """Only filter configurations need the bytes a response carried; other types keep its names alone."""
    stream, _ = started()
    one(stream.set_snapshot(snap(routes={"local_route": "v2"}), 1.0))
    ((_, sent, source, _),) = stream.type_state(ROUTE).recent.values()  # type: ignore[union-attr]
    assert sent == ("local_route",) and source == {}


# ------------------------------------------------------------------------ rule 1: node and per-type state


def test_node_from_first_request_is_kept_when_later_requests_have_none() -> None:
    stream = AdsStream(FanOutCache())
    out = stream.receive(req(CLUSTER, node=True), 0.0)
    assert of_type(out, NodeIdentified) == [NodeIdentified(NODE, GROUP)]
    stream.receive(req(LISTENER), 0.0)
    assert (stream.node_id, stream.group) == (NODE, GROUP)
    later = req(ENDPOINT, ["a"])
    later.node.id = "someone-else"
    assert of_type(stream.receive(later, 0.0), NodeIdentified) == []
    assert stream.node_id == NODE


def test_requests_before_the_snapshot_are_answered_when_it_is_set() -> None:
    stream = AdsStream(FanOutCache())
    assert stream.receive(req(CLUSTER, node=True), 0.0).responses == ()
    assert stream.receive(req(ENDPOINT, ["backend"]), 0.0).responses == ()
    out = stream.set_snapshot(snap(), 1.0)
    assert [r.type_url for r in out.responses] == [CLUSTER, ENDPOINT]


def test_per_type_state_is_tracked() -> None:
    stream, sent = started()
    state = stream.type_state(ENDPOINT)
    assert state is not None
    assert state.names == frozenset({"backend"})
    assert state.sent_version == state.acked_version == sent[ENDPOINT].version
    assert state.sent_nonce == sent[ENDPOINT].nonce
    assert state.sent_names == ("backend",)
    assert not state.awaiting and state.nacked == set()
    assert stream.type_state("nope") is None


def test_subscribed_event_on_first_request_and_on_change_only() -> None:
    stream, sent = started()
    out = ack(stream, sent[ENDPOINT], ["backend"])
    assert of_type(out, Subscribed) == []
    out = stream.receive(req(ENDPOINT, ["backend", "x"], version="v", nonce=sent[ENDPOINT].nonce), 0.0)
    assert of_type(out, Subscribed) == [Subscribed(ENDPOINT, frozenset({"backend", "x"}))]


# ------------------------------------------------------------------------- Envoy's observed startup (§1.3)


def test_envoy_startup_sequence_exactly() -> None:
    s = snap()
    stream = AdsStream(FanOutCache())
    assert stream.set_snapshot(s, 0.0).responses == ()  # nothing subscribed yet

    cds = one(stream.receive(req(CLUSTER, node=True), 1.0))
    assert cds.version == s.version(CLUSTER)
    message, names = decode(cds)
    assert names == ["backend"] and message.version_info == s.version(CLUSTER) and message.nonce == cds.nonce

    eds = one(stream.receive(req(ENDPOINT, ["backend"]), 1.1))
    assert decode(eds)[1] == ["backend"]

    out = ack(stream, cds, now=1.5)
    assert out.responses == ()
    assert out.events == (Ack(CLUSTER, s.version(CLUSTER), cds.nonce, 0.5),)

    lds = one(stream.receive(req(LISTENER), 2.0))
    assert decode(lds)[1] == ["listener_0"]
    assert ack(stream, eds, ["backend"]).responses == ()
    rds = one(stream.receive(req(ROUTE, ["local_route"]), 2.0))
    assert decode(rds)[1] == ["local_route"]
    assert len({cds.nonce, eds.nonce, lds.nonce, rds.nonce}) == 4
    assert ack(stream, lds).responses == ()
    assert ack(stream, rds, ["local_route"]).responses == ()


def test_response_metadata() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(clusters=("a", "b")), 0.0)
    response = one(stream.receive(req(CLUSTER, node=True), 0.0))
    assert response.resource_names == ("a", "b") and response.resource_count == 2
    assert response.label == "cds" and response.type_url == CLUSTER


# --------------------------------------------------------------------------------- rule 2: nonces, stale


def test_nonces_are_unique_and_increasing_across_types_and_pushes() -> None:
    stream, sent = started()
    nonces = [int(r.nonce) for r in sent.values()]
    out = stream.set_snapshot(snap(clusters={"backend": "v2"}, routes={"local_route": "v2"}), 0.0)
    nonces += [int(r.nonce) for r in (*out.responses, *warm(stream, out))]
    assert nonces == sorted(nonces) and len(set(nonces)) == len(nonces) == 7


def test_streams_sent_the_same_response_share_its_bytes_but_not_its_nonce() -> None:
    """Serialize-once down to the frame: a fan-out to N streams makes one copy of each response, not N; each
    stream's own nonce is appended only when its response is written."""
    s = snap(clusters=("a", "b"))
    shared = FanOutCache()
    first, second = AdsStream(shared), AdsStream(shared)
    second.set_snapshot(s, 0.0)
    one(second.receive(req(LISTENER, node=True), 0.0))  # the second stream has numbered a response already
    first.set_snapshot(s, 0.0)
    a = one(first.receive(req(CLUSTER, node=True), 0.0))
    b = one(second.receive(req(CLUSTER), 0.0))
    assert a.unsent is b.unsent and (a.nonce, b.nonce) == ("1", "2")  # nonces are per stream
    for response in (a, b):
        message = discovery_pb2.DiscoveryResponse.FromString(response.data)
        assert message.nonce == response.nonce and len(response.data) == response.size
    assert ack(first, a).events == (Ack(CLUSTER, a.version, a.nonce, 0.0),)


def test_the_bytes_on_the_wire_are_shared_only_by_streams_whose_nonces_coincide() -> None:
    """Streams with the same history number their responses alike: one copy on the wire serves them all."""
    s, shared = snap(clusters=("a", "b")), FanOutCache()
    streams = [AdsStream(shared) for _ in range(3)]
    for stream in streams:
        stream.set_snapshot(s, 0.0)
    one(streams[2].receive(req(LISTENER, node=True), 0.0))  # the third has sent a response already
    responses = [one(stream.receive(req(CLUSTER, node=True), 0.0)) for stream in streams]
    wire = [r.wire(shared) for r in responses]
    assert wire[0] is wire[1] and wire[2] is not wire[0] and [r.nonce for r in responses] == ["1", "1", "2"]
    assert wire == [r.data for r in responses]


def test_a_shared_response_is_never_resent_to_a_stream_under_an_older_nonce() -> None:
    """A stream that holds nonce N for a type only ever gets nonces above N for it, even when a framed copy
    of the same bytes made earlier for another stream is still cached."""
    s1, s2 = snap(clusters={"backend": "v1"}), snap(clusters={"backend": "v2"})
    shared = FanOutCache()
    early = AdsStream(shared)
    early.set_snapshot(s1, 0.0)
    old = one(early.receive(req(CLUSTER, node=True), 0.0))
    late = AdsStream(shared)
    late.set_snapshot(s2, 0.0)
    newer = one(late.receive(req(CLUSTER, node=True), 0.0))
    ack(late, newer)
    back = one(late.set_snapshot(s1, 0.0))  # a rollback to the very bytes `early` was sent
    assert decode(back)[0].resources == decode(old)[0].resources and back.version == old.version
    assert int(back.nonce) > int(newer.nonce)


def test_stale_request_is_ignored_entirely_even_its_names() -> None:
    """§1.3: EDS names change sent with the previous nonce while a newer EDS response was in flight."""
    stream, sent = started()
    push = stream.set_snapshot(snap(clusters=("backend", "backend2"), endpoints=("backend", "backend2")), 0.0)
    eds = next(r for r in push.responses if r.type_url == ENDPOINT)
    # The subscription was still [backend], whose assignment did not change: EDS goes as changes, so none.
    assert decode(eds)[1] == []

    stale = stream.receive(
        req(ENDPOINT, ["backend2", "backend"], version=sent[ENDPOINT].version, nonce=sent[ENDPOINT].nonce), 0.0
    )
    assert stale.responses == ()
    assert stale.events == (Stale(ENDPOINT, sent[ENDPOINT].nonce, eds.nonce),)
    state = stream.type_state(ENDPOINT)
    assert state is not None and state.names == frozenset({"backend"}) and state.awaiting

    # The ACK of the newer response re-states the names: same version, new nonce, the one it lacks.
    out = ack(stream, eds, ["backend2", "backend"])
    again = one(out)
    assert again.version == eds.version and int(again.nonce) > int(eds.nonce)
    assert decode(again)[1] == ["backend2"]
    assert of_type(out, Ack)
    assert of_type(out, Subscribed)


def test_unknown_nonce_is_stale() -> None:
    stream, sent = started()
    out = stream.receive(req(CLUSTER, version=sent[CLUSTER].version, nonce="999", error="boom"), 0.0)
    assert out.responses == () and of_type(out, Stale) and not of_type(out, Nack)


def test_nonce_for_a_type_never_sent_is_stale() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(), 0.0)
    out = stream.receive(req(CLUSTER, nonce="1", node=True), 0.0)
    assert out.responses == () and of_type(out, Stale) == [Stale(CLUSTER, "1", "")]


# ---------------------------------------------------------------------------------- rule 3: ACK / NACK


def test_ack_records_version_and_latency() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(), 0.0)
    cds = one(stream.receive(req(CLUSTER, node=True), 10.0))
    out = ack(stream, cds, now=10.25)
    assert out.events == (Ack(CLUSTER, cds.version, cds.nonce, 0.25),)
    state = stream.type_state(CLUSTER)
    assert state is not None and state.acked_version == cds.version and not state.awaiting


def test_nack_records_the_sent_version_and_does_not_resend_it() -> None:
    stream, sent = started()
    bad = snap(listeners={"listener_0": "bad"})
    lds = one(stream.set_snapshot(bad, 5.0))
    out = stream.receive(
        req(LISTENER, version=sent[LISTENER].version, nonce=lds.nonce, error="duplicate listener"), 5.002
    )
    assert out.responses == ()
    (nack,) = of_type(out, Nack)
    assert nack == Nack(
        LISTENER,
        lds.version,
        lds.nonce,
        sent[LISTENER].version,
        "duplicate listener",
        13,
        nack.latency,
        ("listener_0",),
    )
    assert nack.latency == pytest.approx(0.002)
    state = stream.type_state(LISTENER)
    assert state is not None and state.nacked == {lds.version} and state.acked_version == sent[LISTENER].version

    # Envoy's next requests for LDS (e.g. a re-statement) never bring the rejected version back.
    assert stream.receive(req(LISTENER, version=sent[LISTENER].version, nonce=lds.nonce), 6.0).responses == ()
    # A snapshot that changes only routes pushes routes, not the rejected listener.
    out = stream.set_snapshot(snap(listeners={"listener_0": "bad"}, routes={"local_route": "v2"}), 7.0)
    assert [r.type_url for r in out.responses] == [ROUTE]
    # A fixed listener is a new version and is pushed.
    fixed = one(stream.set_snapshot(snap(listeners={"listener_0": "fixed"}, routes={"local_route": "v2"}), 8.0))
    assert fixed.type_url == LISTENER


def test_nacked_version_is_withheld_even_when_names_grow() -> None:
    stream, sent = started()
    push = one(stream.set_snapshot(snap(endpoints={"backend": "bad"}), 0.0))
    stream.receive(req(ENDPOINT, ["backend"], version=sent[ENDPOINT].version, nonce=push.nonce, error="x"), 0.0)
    out = stream.receive(req(ENDPOINT, ["backend", "new"], version=sent[ENDPOINT].version), 0.0)
    assert out.responses == ()
    assert of_type(out, Withheld) == [Withheld(ENDPOINT, push.version)]
    # Reported once, not on every request.
    assert of_type(stream.receive(req(ENDPOINT, ["backend"], version=sent[ENDPOINT].version), 0.0), Withheld) == []


def test_ack_whose_names_shrink_needs_no_response() -> None:
    stream, _ = started()
    push = one(stream.set_snapshot(snap(endpoints=("backend", "other"), clusters=("backend",)), 0.0))
    again = one(ack(stream, push, ["backend", "other"]))
    assert decode(again)[1] == ["other"]  # EDS goes as changes: only what the client lacks
    out = ack(stream, again, ["other"])
    assert out.responses == () and of_type(out, Subscribed) == [Subscribed(ENDPOINT, frozenset({"other"}))]


def test_unsubscribe_then_resubscribe_sends_the_resource_again() -> None:
    """Envoy drops what it unsubscribes from; when it asks again it must get the resource, same version."""
    stream, _ = started()
    push = one(stream.set_snapshot(snap(endpoints=("backend", "other"), clusters=("backend",)), 0.0))
    both = one(ack(stream, push, ["backend", "other"]))
    assert ack(stream, both, ["other"]).responses == ()  # unsubscribed from backend
    stream.receive(req(ENDPOINT, ["other"], version=both.version, nonce=both.nonce), 0.0)
    again = one(stream.receive(req(ENDPOINT, ["backend", "other"], version=both.version, nonce=both.nonce), 0.0))
    assert again.version == both.version and again.nonce != both.nonce
    assert decode(again)[1] == ["backend"]  # EDS goes as changes: "other" is held


def test_nack_with_an_equal_version_field_is_still_a_nack() -> None:
    stream, _ = started()
    push = one(stream.set_snapshot(snap(routes={"local_route": "v2"}), 0.0))
    out = stream.receive(req(ROUTE, ["local_route"], version=push.version, nonce=push.nonce, error=""), 0.0)
    assert of_type(out, Nack) and not of_type(out, Ack)  # error_detail present, even with an empty message


# ------------------------------------------------------------------------------- rule 4: when to respond


def test_reconnect_holding_the_current_versions_gets_nothing() -> None:
    s = snap()
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(s, 0.0)
    outs = [
        stream.receive(req(CLUSTER, version=s.version(CLUSTER), node=True), 0.0),
        stream.receive(req(ENDPOINT, ["backend"], version=s.version(ENDPOINT)), 0.0),
        stream.receive(req(LISTENER, version=s.version(LISTENER)), 0.0),
        stream.receive(req(ROUTE, ["local_route"], version=s.version(ROUTE)), 0.0),
    ]
    assert all(o.responses == () for o in outs)
    assert [e for o in outs for e in of_type(o, Resumed)] == [
        Resumed(t, s.version(t)) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
    ]
    state = stream.type_state(ROUTE)
    assert state is not None and state.acked_version == s.version(ROUTE) and state.sent_nonce == ""

    # The next change is pushed as usual, and only what changed.
    out = stream.set_snapshot(snap(routes={"local_route": "v2"}), 0.0)
    assert [r.type_url for r in out.responses] == [ROUTE]


def test_resumed_stream_answers_a_later_subscription_change_with_empty_nonce() -> None:
    s = snap(clusters=("a", "b"))
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(s, 0.0)
    stream.receive(req(ENDPOINT, ["a"], version=s.version(ENDPOINT), node=True), 0.0)
    response = one(stream.receive(req(ENDPOINT, ["a", "b"], version=s.version(ENDPOINT)), 0.0))
    assert response.version == s.version(ENDPOINT) and decode(response)[1] == ["a", "b"]


def test_reconnect_before_the_snapshot_is_set_also_resumes() -> None:
    s = snap()
    stream = AdsStream(FanOutCache())
    stream.receive(req(CLUSTER, version=s.version(CLUSTER), node=True), 0.0)
    out = stream.set_snapshot(s, 0.0)
    assert out.responses == () and out.events == (Resumed(CLUSTER, s.version(CLUSTER)),)


def test_reconnect_with_an_old_version_is_answered() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(), 0.0)
    assert one(stream.receive(req(CLUSTER, version="old", node=True), 0.0)).type_url == CLUSTER


def test_node_that_rejected_the_current_version_on_an_earlier_stream_does_not_get_it() -> None:
    s = snap()
    stream = AdsStream(FanOutCache(), Rejected((NODE, LISTENER, s.version(LISTENER))))
    stream.set_snapshot(s, 0.0)
    assert one(stream.receive(req(CLUSTER, node=True), 0.0)).type_url == CLUSTER
    out = stream.receive(req(LISTENER, version="older"), 0.0)
    assert out.responses == () and out.events[-1] == Withheld(LISTENER, s.version(LISTENER))


def test_unchanged_snapshot_pushes_nothing() -> None:
    stream, _ = started()
    assert stream.set_snapshot(snap(), 0.0) == Output()  # equal content, new object
    same = stream.snapshot
    assert same is not None and stream.set_snapshot(same, 0.0) == Output()


def test_types_never_requested_are_not_pushed() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(), 0.0)
    stream.receive(req(CLUSTER, node=True), 0.0)
    out = stream.set_snapshot(snap(clusters={"backend": "v2"}, listeners={"listener_0": "v2"}), 0.0)
    assert [r.type_url for r in out.responses] == [CLUSTER]


def test_push_does_not_wait_for_the_previous_ack() -> None:
    stream, _ = started()
    first = one(stream.set_snapshot(snap(routes={"local_route": "v2"}), 0.0))
    second = one(stream.set_snapshot(snap(routes={"local_route": "v3"}), 0.0))
    assert first.version != second.version
    # The late ACK of the first is now stale, the ACK of the second counts.
    assert of_type(ack(stream, first, ["local_route"]), Stale)
    assert of_type(ack(stream, second, ["local_route"]), Ack)


# ----------------------------------------------------------------------------------- rule 5: push order


def warm(stream: AdsStream, out: Output) -> list[Response]:
    """ACK the CDS and EDS responses of `out` as Envoy does once the clusters are warm; returns what follows."""
    followed: list[Response] = []
    for response in out.responses:
        if response.type_url == CLUSTER:
            followed += ack(stream, response).responses
        elif response.type_url == ENDPOINT:
            followed += ack(stream, response, ["backend"]).responses
    return followed


def test_push_order_and_only_changed_types() -> None:
    stream, _ = started()
    out = stream.set_snapshot(
        snap(clusters={"backend": "v2"}, endpoints={"backend": "v2"}, routes={"local_route": "v2"}), 0.0
    )
    assert [r.type_url for r in out.responses] == [CLUSTER, ENDPOINT]
    routes = warm(stream, out)
    assert [r.type_url for r in routes] == [ROUTE]
    ack(stream, routes[0], ["local_route"])
    out = stream.set_snapshot(
        snap(
            clusters={"backend": "v3"},
            endpoints={"backend": "v3"},
            listeners={"listener_0": "v3"},
            routes={"local_route": "v3"},
        ),
        0.0,
    )
    assert [r.type_url for r in out.responses] == [CLUSTER, ENDPOINT]
    assert [r.type_url for r in warm(stream, out)] == [LISTENER, ROUTE]


def test_routes_wait_until_the_clusters_they_use_are_warm() -> None:
    """Envoy applies routes at once but serves a new cluster only once its endpoints came: a route moved to
    it earlier answers 503. So listeners and routes follow the ACKs of CDS and of the endpoints it led to."""
    stream, _ = two_cluster_stream()
    new = snap(clusters=("backend", "old", "new"), routes={"local_route": "uses-new"})
    cds, eds = stream.set_snapshot(new, 0.0).responses
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    # Envoy subscribes to the new cluster's endpoints in its ACK of the endpoints, then ACKs CDS.
    eds2 = one(ack(stream, eds, ["backend", "old", "new"]))
    assert decode(eds2)[1] == ["new"]  # EDS goes as changes: the others are held
    assert ack(stream, cds).responses == ()  # the new cluster's endpoints are still in flight
    rds = one(ack(stream, eds2, ["backend", "old", "new"]))
    assert rds.type_url == ROUTE and rds.version == new.version(ROUTE)


def test_a_change_touching_no_cluster_is_not_delayed() -> None:
    stream, _ = started()
    out = stream.set_snapshot(snap(routes={"local_route": "v2"}), 0.0)
    assert [r.type_url for r in out.responses] == [ROUTE]


# ------------------------------------------------------------------------ rule 6: make-before-break (CDS)


def two_cluster_stream() -> tuple[AdsStream, dict[str, Response]]:
    s = snap(clusters=("backend", "old"), routes={"local_route": "uses-old"})
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(s, 0.0)
    sent = {}
    for type_url, names in (
        (CLUSTER, ()),
        (ENDPOINT, ("backend", "old")),
        (LISTENER, ()),
        (ROUTE, ("local_route",)),
    ):
        sent[type_url] = one(stream.receive(req(type_url, names, node=type_url == CLUSTER), 0.0))
        ack(stream, sent[type_url], names)
    return stream, sent


def test_removed_cluster_is_kept_until_listeners_and_routes_are_acked() -> None:
    stream, before = two_cluster_stream()
    new = snap(clusters=("backend", "new"), routes={"local_route": "uses-new"}, listeners={"listener_0": "v2"})
    out = stream.set_snapshot(new, 0.0)
    assert [r.type_url for r in out.responses] == [CLUSTER, ENDPOINT]  # routes wait for warm clusters
    union, eds = out.responses
    assert union.version == new.version(CLUSTER) + KEEP_SUFFIX
    assert union.version not in (new.version(CLUSTER), before[CLUSTER].version)
    assert decode(union)[1] == ["backend", "new", "old"]
    # The kept cluster's bytes are the ones the client already has.
    kept = discovery_pb2.DiscoveryResponse.FromString(union.data).resources[2]
    assert cluster_pb2.Cluster.FromString(kept.value).name == "old"
    assert decode(eds)[1] == []  # EDS follows CDS (no keep there), as changes: "backend" did not change

    assert ack(stream, union).responses == ()
    eds2 = one(ack(stream, eds, ["backend", "old", "new"]))  # names grew: the new cluster's endpoints
    assert eds2.type_url == ENDPOINT
    lds, rds = ack(stream, eds2, ["backend", "old", "new"]).responses  # warm: listeners and routes follow
    assert ack(stream, lds).responses == ()  # routes not yet ACKed: keep holding
    final = one(ack(stream, rds, ["local_route"]))
    assert (final.type_url, final.version) == (CLUSTER, new.version(CLUSTER))
    assert decode(final)[1] == ["backend", "new"]
    assert ack(stream, final).responses == ()


def test_removal_with_nothing_pending_sends_the_final_version_directly() -> None:
    stream, _ = two_cluster_stream()
    new = snap(clusters=("backend",), routes={"local_route": "uses-old"})
    out = stream.set_snapshot(new, 0.0)
    assert [(r.type_url, r.version) for r in out.responses] == [
        (CLUSTER, new.version(CLUSTER)),
        (ENDPOINT, new.version(ENDPOINT)),
    ]
    assert decode(out.responses[0])[1] == ["backend"]


def test_removal_waits_for_an_earlier_unacked_route_push() -> None:
    stream, _ = two_cluster_stream()
    rds = one(stream.set_snapshot(snap(clusters=("backend", "old"), routes={"local_route": "v2"}), 0.0))
    out = stream.set_snapshot(snap(clusters=("backend",), routes={"local_route": "v2"}), 0.0)
    union = out.responses[0]
    assert union.version.endswith(KEEP_SUFFIX) and decode(union)[1] == ["backend", "old"]
    assert one(ack(stream, rds, ["local_route"])).version == snap(clusters=("backend",)).version(CLUSTER)


def test_newer_snapshot_during_keep_recomputes_the_union() -> None:
    stream, _ = two_cluster_stream()
    s2 = snap(clusters=("backend", "c"), routes={"local_route": "r2"})
    union2 = stream.set_snapshot(s2, 0.0).responses[0]
    assert decode(union2)[1] == ["backend", "c", "old"]
    s3 = snap(clusters=("backend",), routes={"local_route": "r3"})
    out = stream.set_snapshot(s3, 0.0)
    union3 = out.responses[0]
    assert union3.version == s3.version(CLUSTER) + KEEP_SUFFIX
    assert decode(union3)[1] == ["backend", "c", "old"]  # old still held by the client, c newly removed
    (rds3,) = warm(stream, out)
    final = one(ack(stream, rds3, ["local_route"]))
    assert decode(final)[1] == ["backend"] and final.version == s3.version(CLUSTER)


def test_newer_snapshot_restoring_the_cluster_ends_the_keep() -> None:
    stream, _ = two_cluster_stream()
    stream.set_snapshot(snap(clusters=("backend",), routes={"local_route": "r2"}), 0.0)
    back = snap(clusters=("backend", "old"), routes={"local_route": "r3"})
    out = stream.set_snapshot(back, 0.0)
    assert out.responses[0].version == back.version(CLUSTER)
    assert decode(out.responses[0])[1] == ["backend", "old"]


def test_keep_is_held_while_the_new_listener_is_nacked() -> None:
    stream, sent = two_cluster_stream()
    new = snap(clusters=("backend",), listeners={"listener_0": "bad"}, routes={"local_route": "uses-old"})
    out = stream.set_snapshot(new, 0.0)
    union = out.responses[0]
    assert union.version.endswith(KEEP_SUFFIX)
    (lds,) = warm(stream, out)
    out = stream.receive(req(LISTENER, version=sent[LISTENER].version, nonce=lds.nonce, error="bad"), 0.0)
    assert out.responses == ()  # the old listener may still use "old"
    fixed = snap(clusters=("backend",), listeners={"listener_0": "fixed"}, routes={"local_route": "uses-old"})
    lds2 = stream.set_snapshot(fixed, 0.0).responses[-1]
    assert lds2.type_url == LISTENER
    final = one(ack(stream, lds2))
    assert final.version == fixed.version(CLUSTER) and decode(final)[1] == ["backend"]


def test_nacked_union_still_gets_the_final_version() -> None:
    stream, sent = two_cluster_stream()
    new = snap(clusters=("backend",), routes={"local_route": "r2"})
    union, eds = stream.set_snapshot(new, 0.0).responses
    stream.receive(req(CLUSTER, version=sent[CLUSTER].version, nonce=union.nonce, error="no"), 0.0)
    rds = one(ack(stream, eds, ["backend"]))  # a NACK answers the clusters too: routes are not held forever
    final = one(ack(stream, rds, ["local_route"]))
    assert final.version == new.version(CLUSTER)


def test_named_cds_keeps_only_subscribed_clusters() -> None:
    s = snap(clusters=("a", "b", "c"), routes={"local_route": "r1"})
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(s, 0.0)
    cds = one(stream.receive(req(CLUSTER, ["a", "b"], node=True), 0.0))
    ack(stream, cds, ["a", "b"])
    rds = one(stream.receive(req(ROUTE, ["local_route"]), 0.0))
    ack(stream, rds, ["local_route"])
    out = stream.set_snapshot(snap(clusters=("a",), routes={"local_route": "r2"}), 0.0)
    assert decode(out.responses[0])[1] == ["a", "b"]


# ------------------------------------------------------------------------ rule 7: absent named resources


def test_named_resource_absent_from_snapshot_is_simply_not_in_the_response() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(), 0.0)
    response = one(stream.receive(req(ENDPOINT, ["backend", "ghost"], node=True), 0.0))
    assert decode(response)[1] == ["backend"] and response.resource_names == ("backend",)


def test_named_resource_removed_from_snapshot_disappears_from_the_next_push() -> None:
    stream, _ = two_cluster_stream()
    out = stream.set_snapshot(
        snap(clusters=("backend",), endpoints=("backend",), routes={"local_route": "uses-old"}), 0.0
    )
    eds = next(r for r in out.responses if r.type_url == ENDPOINT)
    assert decode(eds)[1] == []  # EDS goes as changes: "backend" did not change, "old" is not sent


# ------------------------------------------------------------------------------- rule 8: empty snapshot


def test_empty_snapshot_answers_wildcards_with_zero_resources() -> None:
    empty = Snapshot.empty("unknown")
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(empty, 0.0)
    for type_url in (CLUSTER, LISTENER):
        response = one(stream.receive(req(type_url, node=True), 0.0))
        message, names = decode(response)
        assert names == [] and message.version_info == empty.version(type_url) and message.type_url == type_url


# ------------------------------------------------------------------------------------- other inputs


def test_unsupported_type_is_reported_once_and_not_answered() -> None:
    secret = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(), 0.0)
    out = stream.receive(req(secret, ["cert"], node=True), 0.0)
    assert out.responses == () and of_type(out, Unsupported) == [Unsupported(secret)]
    assert of_type(stream.receive(req(secret, ["cert"]), 0.0), Unsupported) == []


def test_unknown_types_are_remembered_up_to_a_bound_per_stream() -> None:
    stream = AdsStream(FanOutCache())
    stream.set_snapshot(snap(), 0.0)
    reported = [
        of_type(stream.receive(req(f"type.googleapis.com/made.up.T{i}", node=i == 0), 0.0), Unsupported)
        for i in range(MAX_UNSUPPORTED_TYPES * 4)
    ]
    assert sum(len(r) for r in reported) == MAX_UNSUPPORTED_TYPES


@pytest.mark.parametrize("machine", [AdsStream, DeltaStream])
def test_a_node_past_its_bounds_is_refused_before_anything_of_it_is_kept(machine: type[AdsStream]) -> None:
    stream = machine(FanOutCache())
    request = (discovery_pb2.DeltaDiscoveryRequest if machine is DeltaStream else discovery_pb2.DiscoveryRequest)(
        type_url=CLUSTER
    )
    request.node.id, request.node.cluster = "n" * (MAX_NODE_ID_BYTES + 1), GROUP
    with pytest.raises(InvalidNode, match=r"node\.id is 513 bytes, more than the 512 allowed"):
        stream.receive(request, 0.0)  # type: ignore[arg-type]
    assert stream.node is None and stream.node_id == ""
    request.node.id = "n" * MAX_NODE_ID_BYTES
    request.node.extensions.add().name = "x" * 100_000  # Envoy's extension list is dropped, never counted
    assert of_type(stream.receive(request, 0.0), NodeIdentified) == [NodeIdentified(request.node.id, GROUP)]  # type: ignore[arg-type]


def _subscribing(machine: type[AdsStream], names: list[str], held: list[str]) -> Message:
    """A request asking for `names` on top of `held` (SotW repeats the whole set; Delta sends what is new)."""
    if machine is DeltaStream:
        return discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names)
    return discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=held + names)


@pytest.mark.parametrize("machine", [AdsStream, DeltaStream])
def test_subscriptions_past_the_bound_in_several_requests_are_refused_and_nothing_of_them_is_kept(
    machine: type[AdsStream],
) -> None:
    """One Delta stream sending 30 requests of 60,000 names held 1.8M names (RSS 417 -> 1,767 MB)."""
    stream = machine(FanOutCache())
    first = _subscribing(machine, [], [])
    first.node.id, first.node.cluster = NODE, GROUP  # type: ignore[attr-defined]
    stream.receive(first, 0.0)  # type: ignore[arg-type]
    held: list[str] = []
    step = MAX_SUBSCRIBED_NAMES // 4
    for i in range(4):  # exactly at the bound, in four requests: accepted
        names = [f"e-{i}-{n}" for n in range(step)]
        stream.receive(_subscribing(machine, names, held), 0.0)  # type: ignore[arg-type]
        held += names
    state = stream.type_state(ENDPOINT)
    assert state is not None and len(state.names or ()) == MAX_SUBSCRIBED_NAMES
    with pytest.raises(InvalidSubscription, match=rf"more than the {MAX_SUBSCRIBED_NAMES} allowed") as refused:
        stream.receive(_subscribing(machine, ["one-more"], held), 0.0)  # type: ignore[arg-type]
    assert "one-more" not in str(refused.value) and "e-0-0" not in str(refused.value)
    assert "one-more" not in (state.names or ()) and len(state.names or ()) == MAX_SUBSCRIBED_NAMES


@pytest.mark.parametrize("machine", [AdsStream, DeltaStream])
def test_a_resource_name_past_the_length_bound_is_refused_and_one_at_it_is_accepted(machine: type[AdsStream]) -> None:
    stream = machine(FanOutCache())
    long_name = "n" * (MAX_RESOURCE_NAME_BYTES + 1)
    request = _subscribing(machine, ["fine", long_name], [])
    request.node.id, request.node.cluster = NODE, GROUP  # type: ignore[attr-defined]
    with pytest.raises(InvalidSubscription, match=rf"is {MAX_RESOURCE_NAME_BYTES + 1} bytes, more than the") as e:
        stream.receive(request, 0.0)  # type: ignore[arg-type]
    assert long_name not in str(e.value) and stream.type_state(ENDPOINT) is None
    at_bound = "é" * (MAX_RESOURCE_NAME_BYTES // 2)  # counted in bytes, not characters
    request = _subscribing(machine, [at_bound], [])
    stream.receive(request, 0.0)  # type: ignore[arg-type]
    state = stream.type_state(ENDPOINT)
    assert state is not None and state.names == frozenset([at_bound])
    with pytest.raises(InvalidSubscription):
        stream.receive(_subscribing(machine, [at_bound + "x"], [at_bound]), 0.0)  # type: ignore[arg-type]


def test_delta_initial_resource_versions_count_against_the_bounds() -> None:
    """A reconnecting client reports what it holds: those names are subscribed, so they are counted too."""
    stream = DeltaStream(FanOutCache())
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=["a"])
    request.node.id, request.node.cluster = NODE, GROUP
    for n in range(MAX_SUBSCRIBED_NAMES):
        request.initial_resource_versions[f"held-{n}"] = "v1"
    with pytest.raises(InvalidSubscription, match="resource names"):
        stream.receive(request, 0.0)
    assert stream.type_state(ENDPOINT) is None
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT)
    request.initial_resource_versions["h" * (MAX_RESOURCE_NAME_BYTES + 1)] = "v1"
    with pytest.raises(InvalidSubscription, match="bytes"):
        stream.receive(request, 0.0)
    assert stream.type_state(ENDPOINT) is None


def test_old_snapshots_are_freed_by_reference_counting_once_every_stream_moved_past_them() -> None:
    """Memos live as long as their snapshot: a server pushing for weeks must not keep every old one."""
    gc.disable()
    try:
        streams = [started()[0] for _ in range(3)]
        old: list[weakref.ref[TypeSnapshot]] = []
        for i in range(6):
            s = snap(clusters=("backend", f"extra-{i}"), routes={"local_route": f"r{i}"})
            old += [weakref.ref(t) for t in s.types.values()]
            for stream in streams:
                settle(stream, stream.set_snapshot(s, 0.0))
        del s
        alive = [r for r in old if r() is not None]
        assert len(alive) <= len(PUSH_ORDER)  # the current snapshot's types, nothing older
    finally:
        gc.enable()


def settle(stream: AdsStream, out: Output) -> None:
    """ACK everything as Envoy would (subscribing to every cluster's endpoints) until nothing more is sent."""
    pending = list(out.responses)
    while pending:
        response = pending.pop(0)
        names = decode(response)[1] if response.type_url == CLUSTER else ()
        if response.type_url == CLUSTER:
            pending += stream.receive(req(ENDPOINT, names), 0.0).responses
        state = stream.type_state(response.type_url)
        held = () if state is None or state.names is None else tuple(state.names)
        pending += ack(stream, response, held).responses


@pytest.mark.parametrize("machine", [AdsStream, DeltaStream])
@pytest.mark.parametrize(("node_id", "cluster"), [("", ""), ("", GROUP), ("n1", "")])
def test_a_first_request_without_a_node_id_and_cluster_is_refused(
    machine: type[AdsStream], node_id: str, cluster: str
) -> None:
    """A stream that names no node was registered as node '' of group '': a proxy nobody can tell apart."""
    stream = machine(FanOutCache())
    request = (discovery_pb2.DeltaDiscoveryRequest if machine is DeltaStream else discovery_pb2.DiscoveryRequest)(
        type_url=CLUSTER
    )
    request.node.id, request.node.cluster = node_id, cluster
    with pytest.raises(InvalidNode, match=r"node\.(id|cluster) is empty"):
        stream.receive(request, 0.0)  # type: ignore[arg-type]
    assert stream.node is None
