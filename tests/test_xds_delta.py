"""The Delta ADS state machine without sockets: subscriptions, diffs, removal, reconnect, NACK memory."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.compiler.names import REVOKED_RECENTLY_FILTER, revocation_bucket_filter
from controlplane.snapshots.snapshot import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    ROUTE,
    EncodedResource,
    Snapshot,
    TypeSnapshot,
)
from controlplane.xds import delta
from controlplane.xds.delta import DeltaStream
from controlplane.xds.memo import FanOutCache, PerResource
from controlplane.xds.nack_memory import NackMemory
from controlplane.xds.protocol import RECENT_NONCES, Ack, Nack, Output, Response, Resumed, Stale, Withheld


def snap(clusters: dict[str, str]) -> Snapshot:
    """Clusters named by key, their content varied by value (so versions change with it)."""
    return Snapshot.build(
        "g",
        {
            CLUSTER: [(n, cluster_pb2.Cluster(name=n, alt_stat_name=t)) for n, t in clusters.items()],
            ENDPOINT: [(n, endpoint(n, t)) for n, t in clusters.items()],
        },
    )


def endpoint(name: str, tag: str) -> endpoint_pb2.ClusterLoadAssignment:
    zone = base_pb2.Locality(zone=tag)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(locality=zone)]
    )


def request(type_url: str = CLUSTER, **fields: Any) -> discovery_pb2.DeltaDiscoveryRequest:
    message = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields)
    message.node.id, message.node.cluster = "n1", "g"
    return message


def decode(output: Output) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    return [discovery_pb2.DeltaDiscoveryResponse.FromString(r.data) for r in output.responses]


def held(response: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, str]:
    return {r.name: r.version for r in response.resources}


def connect(stream: DeltaStream, snapshot: Snapshot, **fields: Any) -> discovery_pb2.DeltaDiscoveryResponse:
    stream.receive(request(**fields), 0.0)
    (response,) = decode(stream.set_snapshot(snapshot, 0.0))
    return response


def test_empty_initial_subscribe_is_a_wildcard_and_resources_are_framed_losslessly() -> None:
    snapshot = snap({"a": "1", "b": "1"})
    response = connect(DeltaStream(FanOutCache()), snapshot)
    assert response.type_url == CLUSTER and response.nonce
    assert response.system_version_info == snapshot.version(CLUSTER)
    assert held(response) == {n: r.version for n, r in snapshot.types[CLUSTER].resources.items()}
    for resource in response.resources:
        assert resource.resource.SerializeToString() == snapshot.types[CLUSTER].resources[resource.name].any_bytes


def test_explicit_subscribe_and_unsubscribe() -> None:
    stream = DeltaStream(FanOutCache())
    snapshot = snap({"a": "1", "b": "1"})
    stream.set_snapshot(snapshot, 0.0)
    (first,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["a"]), 0.0))
    assert list(held(first)) == ["a"]
    (second,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["b"]), 0.0))
    assert list(held(second)) == ["b"]  # only the new name, not "a" again
    assert decode(stream.receive(request(ENDPOINT, resource_names_unsubscribe=["a"]), 0.0)) == []
    state = stream.type_state(ENDPOINT)
    assert state is not None and state.names == {"b"} and set(state.held) == {"b"}
    # Re-subscribing after an unsubscribe sends it again: Envoy dropped it.
    (again,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["a"]), 0.0))
    assert list(held(again)) == ["a"]


def test_only_changed_resources_are_sent_and_removals_are_listed() -> None:
    stream = DeltaStream(FanOutCache())
    connect(stream, snap({"a": "1", "b": "1", "c": "1"}))
    (changed,) = decode(stream.set_snapshot(snap({"a": "1", "b": "2", "c": "1"}), 0.0))
    assert list(held(changed)) == ["b"] and list(changed.removed_resources) == []
    (removed,) = decode(stream.set_snapshot(snap({"a": "1", "b": "2"}), 0.0))
    assert list(held(removed)) == [] and list(removed.removed_resources) == ["c"]
    assert decode(stream.set_snapshot(snap({"a": "1", "b": "2"}), 0.0)) == []


def test_reconnect_with_initial_versions_sends_nothing_for_unchanged_resources() -> None:
    snapshot = snap({"a": "1", "b": "1"})
    versions = held(connect(DeltaStream(FanOutCache()), snapshot))
    stream = DeltaStream(FanOutCache())
    stream.receive(request(initial_resource_versions=versions), 0.0)
    output = stream.set_snapshot(snapshot, 0.0)
    assert output.responses == ()
    assert Resumed(CLUSTER, snapshot.version(CLUSTER)) in output.events
    # A client holding an older "a" and a vanished "z" gets just the difference.
    stream = DeltaStream(FanOutCache())
    stream.receive(request(initial_resource_versions={"a": "old", "b": versions["b"], "z": "x"}), 0.0)
    (response,) = decode(stream.set_snapshot(snapshot, 0.0))
    assert list(held(response)) == ["a"] and list(response.removed_resources) == ["z"]


def test_ack_and_nacked_versions_are_never_resent_even_after_reconnect() -> None:
    memory = NackMemory()
    stream = DeltaStream(FanOutCache(), memory)
    first = connect(stream, snap({"a": "1"}))
    ack = stream.receive(request(response_nonce=first.nonce), 1.0)
    assert [type(e) for e in ack.events] == [Ack]
    (bad,) = decode(stream.set_snapshot(snap({"a": "bad"}), 1.0))
    error = {"code": 13, "message": "rejected"}
    nack = stream.receive(request(response_nonce=bad.nonce, error_detail=error), 2.0)
    (event,) = [e for e in nack.events if isinstance(e, Nack)]
    assert isinstance(event, Nack) and event.error == "rejected" and event.accepted_version == first.system_version_info
    assert decode(nack) == []
    # Another unrelated change does not carry the rejected resource again.
    output = stream.set_snapshot(snap({"a": "bad", "b": "1"}), 3.0)
    (response,) = decode(output)
    assert list(held(response)) == ["b"]
    assert any(isinstance(e, Withheld) for e in output.events)
    # Nor does a new stream of the same node (the NACK memory remembers), holding the good "a".
    fresh = DeltaStream(FanOutCache(), memory)
    fresh.receive(request(initial_resource_versions={"a": held(first)["a"]}), 0.0)
    (reconnected,) = decode(fresh.set_snapshot(snap({"a": "bad", "b": "1"}), 0.0))
    assert list(held(reconnected)) == ["b"]
    # A fixed version of "a" is sent.
    (fixed,) = decode(stream.set_snapshot(snap({"a": "good", "b": "1"}), 4.0))
    assert list(held(fixed)) == ["a"]


def test_stale_or_unknown_nonce_is_reported_but_subscription_changes_still_apply() -> None:
    stream = DeltaStream(FanOutCache())
    connect(stream, snap({"a": "1", "b": "1"}), type_url=ENDPOINT, resource_names_subscribe=["a"])
    output = stream.receive(request(ENDPOINT, response_nonce="99", resource_names_subscribe=["b"]), 0.0)
    assert [type(e) for e in output.events if not isinstance(e, Resumed)][:1] == [Stale]
    (response,) = decode(output)
    assert list(held(response)) == ["b"]


def test_subscribing_to_the_wildcard_sends_what_the_client_does_not_hold_yet() -> None:
    stream = DeltaStream(FanOutCache())
    connect(stream, snap({"a": "1", "b": "1"}), type_url=ENDPOINT, resource_names_subscribe=["a"])
    (response,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["*"]), 0.0))
    assert list(held(response)) == ["b"]  # "a" is held already, "b" was in the base but never sent


def test_a_nacked_removal_is_not_retried_until_the_type_changes() -> None:
    stream = DeltaStream(FanOutCache())
    first = connect(stream, snap({"a": "1", "b": "1"}))
    stream.receive(request(response_nonce=first.nonce), 0.0)
    (removal,) = decode(stream.set_snapshot(snap({"a": "1"}), 0.0))
    assert list(removal.removed_resources) == ["b"]
    nack = stream.receive(request(response_nonce=removal.nonce, error_detail={"code": 13, "message": "no"}), 0.0)
    assert decode(nack) == []  # the next request does not ask for the same rejection again
    (retried,) = decode(stream.set_snapshot(snap({"a": "2"}), 0.0))
    assert list(held(retried)) == ["a"] and list(retried.removed_resources) == ["b"]


# --- the cost of a push --------------------------------------------------------------------------


class CountingResources(Mapping[str, EncodedResource]):
    """A snapshot's resources that count every read, to measure the work a push does (not its time)."""

    def __init__(self, inner: Mapping[str, EncodedResource]) -> None:
        self.inner = inner
        self.reads = 0

    def __getitem__(self, name: str) -> EncodedResource:
        self.reads += 1
        return self.inner[name]

    def __iter__(self) -> Iterator[str]:
        for name in self.inner:
            self.reads += 1
            yield name

    def __len__(self) -> int:
        return len(self.inner)


class CountingRejections:
    """A `RejectionMemory` that rejects nothing and counts the questions."""

    def __init__(self) -> None:
        self.asked = 0

    def is_rejected(self, node_id: str, type_url: str, version: str) -> bool:
        self.asked += 1
        return False

    def remember_rejected(self, node_id: str, type_url: str, version: str) -> None:
        pass

    def has_rejections(self, node_id: str, type_url: str) -> bool:
        return False  # one O(1) question per stream and type; `asked` counts the per-resource ones


def counted(snapshot: Snapshot) -> tuple[Snapshot, list[CountingResources]]:
    wrapped = {t: CountingResources(s.resources) for t, s in snapshot.types.items()}
    types = {t: TypeSnapshot(t, s.version, wrapped[t]) for t, s in snapshot.types.items()}
    return Snapshot(snapshot.group, MappingProxyType(types)), list(wrapped.values())


def ack_all(stream: DeltaStream, output: Output) -> None:
    """Envoy's side: ACK every response, and whatever the ACKs bring."""
    for response in output.responses:
        ack_all(stream, stream.receive(request(response.type_url, response_nonce=response.nonce), 0.0))


def test_a_push_reads_only_the_changed_resources_per_stream_and_diffs_once() -> None:
    resources, streams = 2000, 500
    names = [f"c{i:04d}" for i in range(resources)]
    before = snap(dict.fromkeys(names, "1"))
    rejections, shared = CountingRejections(), FanOutCache()
    fleet = [DeltaStream(shared, rejections) for _ in range(streams)]
    for stream in fleet:
        stream.set_snapshot(before, 0.0)
        ack_all(stream, stream.receive(request(), 0.0))
        ack_all(stream, stream.receive(request(ENDPOINT, resource_names_subscribe=names), 0.0))
    states = [s.type_state(ENDPOINT) for s in fleet]
    assert all(s is not None and s.names is states[0].names and not s.overrides for s in states if states[0])
    after, counters = counted(snap({**dict.fromkeys(names, "1"), "c0007": "2"}))
    diffs, rejections.asked = shared.diffs.computed, 0
    for stream in fleet:
        output = stream.set_snapshot(after, 1.0)
        assert [r.resource_names for r in output.responses] == [("c0007",), ("c0007",)]  # CDS, then EDS
        ack_all(stream, output)
    assert shared.diffs.computed - diffs == 2  # one diff per type for the whole fan-out
    reads = sum(c.reads for c in counters)
    # Each of the two diffs reads every resource three times (key, value, removal check); then each stream
    # reads O(changed), where walking the subscription would be 2,000 reads per stream and type.
    assert reads <= 2 * 3 * resources + 4 * streams, reads
    assert rejections.asked == 0  # no stream of this memory ever rejected a resource: nothing to ask
    for stream in fleet:
        for type_url in (CLUSTER, ENDPOINT):
            state = stream.type_state(type_url)
            assert state is not None and state.base is after.types[type_url] and not state.overrides


def test_streams_in_sync_share_one_framed_body(monkeypatch: pytest.MonkeyPatch) -> None:
    initial, pushed = snap({"a": "1", "b": "1"}), snap({"a": "2", "b": "2"})
    cache = FanOutCache()
    fleet = [DeltaStream(cache) for _ in range(3)]
    for stream in fleet:
        connect(stream, initial)
    framed: list[bytes] = []
    build = delta.framed_body

    def framing(entries: PerResource, resources: Iterable[EncodedResource]) -> bytes:
        framed.append(build(entries, resources))
        return framed[-1]

    monkeypatch.setattr(delta, "framed_body", framing)
    responses = [one(stream.set_snapshot(pushed, 0.0)) for stream in fleet]
    assert len(framed) == 1 and all(r.data.startswith(framed[0]) for r in responses)
    assert all(r.unsent is responses[0].unsent for r in responses)  # all but the nonce, each stream's own
    third = snap({"a": "3", "b": "3"})
    shared = one(fleet[1].set_snapshot(third, 0.0))
    (later,) = fleet[0].receive(request(ENDPOINT, resource_names_subscribe=["a"]), 0.0).responses
    fresh = fleet[0].set_snapshot(third, 0.0).responses[0]
    assert fresh.type_url == CLUSTER and fresh.resource_names == shared.resource_names == ("a", "b")
    assert fresh.unsent is shared.unsent  # the same change: the same bytes, for a stream that moved on since
    assert int(fresh.nonce) > int(later.nonce)  # under a nonce newer than its own last one


def one(output: Output) -> Response:
    (response,) = output.responses
    return response


# --- make-before-break ---------------------------------------------------------------------------


def gateway(clusters: dict[str, str], target: str, routes: dict[str, str] | None = None, host: str = "v") -> Snapshot:
    """Clusters as in `snap`, one listener, and route "r" sending everything to `target` (more in `routes`);
    `host` names the virtual hosts, to change a route without changing where it goes."""

    def route(name: str, cluster: str) -> route_pb2.RouteConfiguration:
        action = route_components_pb2.RouteAction(cluster=cluster)
        match = route_components_pb2.RouteMatch(prefix="/")
        vhost = route_components_pb2.VirtualHost(
            name=host, domains=["*"], routes=[route_components_pb2.Route(match=match, route=action)]
        )
        return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])

    plain = snap(clusters)
    every = {"r": target, **(routes or {})}
    return Snapshot.build(
        "g",
        {
            CLUSTER: [(n, r.payload) for n, r in plain.types[CLUSTER].resources.items()],
            ENDPOINT: [(n, r.payload) for n, r in plain.types[ENDPOINT].resources.items()],
            LISTENER: [("l", listener_pb2.Listener(name="l", stat_prefix="l"))],
            ROUTE: [(n, route(n, c)) for n, c in every.items()],
        },
    )


def envoy(snapshot: Snapshot, endpoints: list[str]) -> DeltaStream:
    """A stream through Envoy's startup: CDS and LDS wildcards, EDS and RDS named, everything ACKed."""
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(snapshot, 0.0)
    for type_url, names in ((CLUSTER, []), (ENDPOINT, endpoints), (LISTENER, []), (ROUTE, ["r"])):
        ack_all(stream, stream.receive(request(type_url, resource_names_subscribe=names), 0.0))
    return stream


def by_type(output: Output) -> dict[str, discovery_pb2.DeltaDiscoveryResponse]:
    decoded = decode(output)
    assert len({r.type_url for r in decoded}) == len(decoded), "one response per type"
    return {r.type_url: r for r in decoded}


def removals(output: Output) -> dict[str, list[str]]:
    return {t: list(r.removed_resources) for t, r in by_type(output).items() if r.removed_resources}


def respond(stream: DeltaStream, response: discovery_pb2.DeltaDiscoveryResponse, **fields: Any) -> Output:
    return stream.receive(request(response.type_url, response_nonce=response.nonce, **fields), 0.0)


def warm_swap(stream: DeltaStream, snapshot: Snapshot) -> discovery_pb2.DeltaDiscoveryResponse:
    """Push `snapshot` moving route "r" to the new cluster "b", as Envoy goes through it: CDS, the new cluster's
    endpoints, both ACKed (the cluster is warm); returns the RDS response that follows only then, unACKed."""
    (cds,) = decode(stream.set_snapshot(snapshot, 1.0))
    assert cds.type_url == CLUSTER and "b" in held(cds)
    (eds,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["b"]), 0.0))
    assert list(held(eds)) == ["b"]
    assert respond(stream, cds).responses == ()
    (rds,) = decode(respond(stream, eds))
    assert rds.type_url == ROUTE and list(held(rds)) == ["r"]
    return rds


def test_a_swapped_cluster_is_removed_only_after_the_new_routes_are_acked() -> None:
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    pushed = stream.set_snapshot(gateway({"b": "1"}, "b"), 1.0)
    assert [r.type_url for r in pushed.responses] == [CLUSTER]  # the routes wait for "b" to be warm
    (cds,) = decode(pushed)
    assert list(held(cds)) == ["b"] and list(cds.removed_resources) == []
    # Envoy asks for the new cluster's endpoints (before it ACKs CDS); the old ones stay while the cluster does.
    (eds,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["b"]), 0.0))
    assert list(held(eds)) == ["b"] and list(eds.removed_resources) == []
    assert respond(stream, cds).responses == ()  # "b"'s endpoints are still in flight: not warm yet
    warm = respond(stream, eds)
    assert [r.type_url for r in warm.responses] == [ROUTE]  # the listener is unchanged
    assert removals(warm) == {}
    (rds,) = decode(warm)
    assert list(held(rds)) == ["r"]
    released = respond(stream, rds)
    assert [r.type_url for r in released.responses] == [CLUSTER, ENDPOINT]
    assert removals(released) == {CLUSTER: ["a"], ENDPOINT: ["a"]}
    state = stream.type_state(CLUSTER)
    assert state is not None and set(state.held) == {"b"} and not state.kept


def test_a_nacked_route_keeps_the_removed_cluster_until_a_fixed_one_is_acked() -> None:
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    rds = warm_swap(stream, gateway({"b": "1"}, "b"))
    nacked = respond(stream, rds, error_detail={"code": 13, "message": "bad route"})
    assert removals(nacked) == {}
    state = stream.type_state(CLUSTER)
    assert state is not None and set(state.held) == {"a", "b"} and state.kept == {"a"}
    # Unrelated requests do not release it either: Envoy still routes by the old route to "a".
    assert removals(stream.receive(request(ENDPOINT, resource_names_subscribe=["c"]), 0.0)) == {}
    # A newer snapshot that leaves the rejected route as it is does not release it...
    assert removals(stream.set_snapshot(gateway({"b": "1"}, "b", {"extra": "b"}), 2.0)) == {}
    # ...a fixed route does, once ACKed (no cluster changes: it is not held back).
    fixed = by_type(stream.set_snapshot(gateway({"b": "1"}, "b", host="fixed"), 3.0))
    assert set(fixed) == {ROUTE} and list(held(fixed[ROUTE])) == ["r"]
    assert removals(respond(stream, fixed[ROUTE])) == {CLUSTER: ["a"], ENDPOINT: ["a"]}


def test_a_newer_snapshot_restoring_the_cluster_cancels_its_removal() -> None:
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    (cds,) = decode(stream.set_snapshot(gateway({"b": "1"}, "b"), 1.0))
    (eds,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["b"]), 0.0))
    restored = stream.set_snapshot(gateway({"a": "1", "b": "1"}, "b"), 2.0)
    assert restored.responses == ()  # the client still holds "a"; the routes still wait for "b"
    assert respond(stream, cds).responses == ()
    warm = respond(stream, eds)
    assert removals(warm) == {} and set(by_type(warm)) == {ROUTE}
    assert removals(respond(stream, by_type(warm)[ROUTE])) == {}
    state = stream.type_state(CLUSTER)
    assert state is not None and set(state.held) == {"a", "b"} and not state.kept and not state.overrides


def test_a_removal_nothing_routes_to_is_sent_at_once() -> None:
    stream = envoy(gateway({"a": "1", "unused": "1"}, "a"), ["a", "unused"])
    pushed = stream.set_snapshot(gateway({"a": "1"}, "a"), 1.0)
    assert removals(pushed) == {CLUSTER: ["unused"], ENDPOINT: ["unused"]}


def test_routes_this_stream_does_not_subscribe_to_do_not_hold_a_removal_back() -> None:
    """The route type's version changes, but not "r": the release comes in the same output, after RDS."""
    stream = envoy(gateway({"a": "1", "unused": "1"}, "a", {"other": "unused"}), ["a", "unused"])
    pushed = stream.set_snapshot(gateway({"a": "1"}, "a", {"other": "a"}), 1.0)
    assert [r.type_url for r in pushed.responses] == [CLUSTER, ENDPOINT]
    assert removals(pushed) == {CLUSTER: ["unused"], ENDPOINT: ["unused"]}


def test_hand_framed_responses_parse_as_the_message_protobuf_would_build() -> None:
    resource = snap({"a": "1"}).types[CLUSTER].resources["a"]
    entries = delta.framed_body(FanOutCache().resource_entries, [resource])
    for version, removed in (("v1", ("x", "y")), ("", ())):
        data = delta.frame_delta_response(entries, version, CLUSTER, "7", removed)
        expected = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=CLUSTER, nonce="7", removed_resources=removed
        )
        expected.resources.add(name="a", version=resource.version).resource.ParseFromString(resource.any_bytes)
        assert discovery_pb2.DeltaDiscoveryResponse.FromString(data) == expected


# --- warming: listeners and routes wait for the clusters they use ----------------------------------


def test_routes_wait_until_the_clusters_they_use_are_warm() -> None:
    """Envoy applies routes at once but serves a new cluster only once its endpoints came: a route moved to
    it earlier answers 503. So listener and route updates follow the ACKs of CDS and of the endpoints it led to."""
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    new = gateway({"a": "1", "b": "1"}, "b")
    (cds,) = decode(stream.set_snapshot(new, 1.0))  # "a"'s endpoints are unchanged: CDS alone
    assert cds.type_url == CLUSTER and list(held(cds)) == ["b"]
    # Envoy warms "b": it subscribes to its endpoints (an empty-nonce request), then ACKs CDS.
    (eds,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["b"]), 0.0))
    assert eds.type_url == ENDPOINT and list(held(eds)) == ["b"]
    assert respond(stream, cds).responses == ()  # the new cluster's endpoints are still in flight
    (rds,) = decode(respond(stream, eds))
    assert rds.type_url == ROUTE and rds.system_version_info == new.version(ROUTE) and list(held(rds)) == ["r"]
    assert respond(stream, rds).responses == ()
    state = stream.type_state(ROUTE)
    assert state is not None and state.in_line_with(new.types[ROUTE])


def test_routes_wait_for_the_endpoints_even_when_they_are_acked_first() -> None:
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    (cds,) = decode(stream.set_snapshot(gateway({"a": "1", "b": "1"}, "b"), 1.0))
    (eds,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["b"]), 0.0))
    assert respond(stream, eds).responses == ()  # CDS is still unanswered
    assert [r.type_url for r in respond(stream, cds).responses] == [ROUTE]


def test_a_change_touching_no_cluster_is_not_delayed() -> None:
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    pushed = stream.set_snapshot(gateway({"a": "1"}, "a", host="w"), 1.0)
    assert [r.type_url for r in pushed.responses] == [ROUTE]


def test_envoy_startup_answers_first_listener_and_route_requests_at_once() -> None:
    """§2: Envoy asks for listeners after its CDS ACK, while the endpoints are still unACKed, and for routes
    while the listener is unACKed. A first answer is never held (Envoy's initialisation waits for it)."""
    snapshot = gateway({"a": "1"}, "a")
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(snapshot, 0.0)
    (cds,) = decode(stream.receive(request(CLUSTER), 0.0))
    (eds,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["a"]), 0.0))
    assert respond(stream, cds).responses == ()
    (lds,) = decode(stream.receive(request(LISTENER), 0.0))  # EDS still outstanding
    assert lds.type_url == LISTENER and list(held(lds)) == ["l"]
    assert respond(stream, eds).responses == ()
    (rds,) = decode(stream.receive(request(ROUTE, resource_names_subscribe=["r"]), 0.0))
    assert rds.type_url == ROUTE and list(held(rds)) == ["r"]
    assert respond(stream, lds).responses == () and respond(stream, rds).responses == ()


def test_a_reconnect_answers_every_first_request_at_once() -> None:
    """§2: on reconnect the four initial requests arrive together; listeners and routes the client holds an
    older version of are sent at once, even though the clusters and endpoints are being updated too."""
    old, new = gateway({"a": "1"}, "a"), gateway({"a": "2"}, "a", host="w")
    versions = {t: {n: r.version for n, r in old.types[t].resources.items()} for t in old.types}
    versions[LISTENER] = {"l": "older"}
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(new, 0.0)
    sent = []
    for type_url, names in ((CLUSTER, []), (ENDPOINT, ["a"]), (LISTENER, []), (ROUTE, ["r"])):
        initial = request(type_url, resource_names_subscribe=names, initial_resource_versions=versions[type_url])
        sent += decode(stream.receive(initial, 0.0))
    assert [(r.type_url, list(held(r))) for r in sent] == [
        (CLUSTER, ["a"]),
        (ENDPOINT, ["a"]),
        (LISTENER, ["l"]),
        (ROUTE, ["r"]),
    ]


def test_a_nacked_cluster_update_releases_the_routes() -> None:
    """A NACK answers the clusters too: the routes are not held forever (Envoy kept its old clusters)."""
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    (cds,) = decode(stream.set_snapshot(gateway({"a": "1", "b": "1"}, "b"), 1.0))
    released = respond(stream, cds, error_detail={"code": 13, "message": "bad cluster"})
    assert [r.type_url for r in released.responses] == [ROUTE]
    assert any(isinstance(e, Nack) for e in released.events)


def test_a_nacked_swap_still_sends_the_routes_and_then_the_removal() -> None:
    """Neither the routes nor the make-before-break removal wait forever behind a rejected CDS update."""
    stream = envoy(gateway({"a": "1"}, "a"), ["a"])
    (cds,) = decode(stream.set_snapshot(gateway({"b": "1"}, "b"), 1.0))
    (rds,) = decode(respond(stream, cds, error_detail={"code": 13, "message": "bad cluster"}))
    assert rds.type_url == ROUTE
    assert removals(respond(stream, rds)) == {CLUSTER: ["a"], ENDPOINT: ["a"]}


# --- reconnect -----------------------------------------------------------------------------------


def reconnect(snapshot: Snapshot, versions: Mapping[str, Mapping[str, str]]) -> Output:
    """A new stream of a reconnecting Envoy: per type one request with both the names (explicit for EDS/RDS,
    empty for the CDS/LDS wildcards) and `initial_resource_versions`; returns every output, merged."""
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(snapshot, 0.0)
    responses: list[Response] = []
    events: list[Any] = []
    for type_url, names in ((CLUSTER, []), (ENDPOINT, ["a"]), (LISTENER, []), (ROUTE, ["r"])):
        held = versions[type_url]
        output = stream.receive(request(type_url, resource_names_subscribe=names, initial_resource_versions=held), 0.0)
        responses += output.responses
        events += output.events
    return Output(tuple(responses), tuple(events))


def versions_of(snapshot: Snapshot) -> dict[str, dict[str, str]]:
    return {t: {n: r.version for n, r in s.resources.items()} for t, s in snapshot.types.items()}


def test_a_reconnect_holding_the_current_versions_gets_nothing_for_explicit_names_too() -> None:
    """§2/§7: Envoy subscribes EDS and RDS by name in the very request reporting the versions it holds; those
    names are held, not fresh, so an unchanged reconnect costs no response at all, of any type."""
    snapshot = gateway({"a": "1"}, "a")
    output = reconnect(snapshot, versions_of(snapshot))
    assert output.responses == ()
    assert {e.type_url for e in output.events if isinstance(e, Resumed)} == {CLUSTER, ENDPOINT, LISTENER, ROUTE}


def test_a_reconnect_holding_an_older_endpoint_gets_just_that_endpoint() -> None:
    old, new = gateway({"a": "1", "b": "1"}, "a"), gateway({"a": "1", "b": "2"}, "a")
    versions = versions_of(new)
    versions[ENDPOINT] = {"a": versions[ENDPOINT]["a"], "b": old.types[ENDPOINT].resources["b"].version}
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(new, 0.0)
    names = ["a", "b"]
    (eds,) = decode(
        stream.receive(
            request(ENDPOINT, resource_names_subscribe=names, initial_resource_versions=versions[ENDPOINT]), 0.0
        )
    )
    assert held(eds) == {"b": new.types[ENDPOINT].resources["b"].version} and not eds.removed_resources
    # And the routes, held current, are not re-sent either.
    output = reconnect(new, {**versions_of(new), ROUTE: {"r": "older"}})
    assert [(r.type_url, r.resource_names) for r in output.responses] == [(ROUTE, ("r",))]


def test_names_reported_held_and_subscribed_later_are_not_re_sent() -> None:
    """The other order: the first request reports what is held (so subscribes it), a later one names it."""
    snapshot = gateway({"a": "1"}, "a")
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(snapshot, 0.0)
    held_now = versions_of(snapshot)[ENDPOINT]
    first = stream.receive(request(ENDPOINT, initial_resource_versions=held_now), 0.0)
    assert first.responses == () and any(isinstance(e, Resumed) for e in first.events)
    assert stream.receive(request(ENDPOINT, resource_names_subscribe=["a"]), 0.0).responses == ()
    # Whereas a name subscribed after an unsubscribe is not held any more (Envoy dropped it): sent again.
    assert stream.receive(request(ENDPOINT, resource_names_unsubscribe=["a"]), 0.0).responses == ()
    (again,) = decode(stream.receive(request(ENDPOINT, resource_names_subscribe=["a"]), 0.0))
    assert list(held(again)) == ["a"]


def test_a_fresh_subscription_with_no_reported_version_is_still_sent_on_reconnect() -> None:
    snapshot = gateway({"a": "1", "b": "1"}, "a")
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(snapshot, 0.0)
    current = versions_of(snapshot)[ENDPOINT]
    initial = request(ENDPOINT, resource_names_subscribe=["a", "b"], initial_resource_versions={"a": current["a"]})
    (eds,) = decode(stream.receive(initial, 0.0))
    assert list(held(eds)) == ["b"]


# --- filter configurations (ECDS) -------------------------------------------------------------------


def with_filters(base: Snapshot, **denied: str) -> Snapshot:
    """`base` plus filter configurations (ECDS): filter name → the job an RBAC deny list holds."""
    resources: dict[str, list[tuple[str, Any]]] = {
        t: [(n, r.payload) for n, r in s.resources.items()] for t, s in base.types.items()
    }
    resources[EXTENSION_CONFIG] = []
    for name, job in denied.items():
        config = extension_pb2.TypedExtensionConfig(name=name)
        config.typed_config.Pack(rbac_pb2.RBAC(rules_stat_prefix=job))
        resources[EXTENSION_CONFIG].append((name, config))
    return Snapshot.build(base.group, resources)


def filters_stream(snapshot: Snapshot, names: list[str], memory: NackMemory | None = None) -> DeltaStream:
    """Envoy's startup, then the filter configurations its listener names, subscribed and ACKed."""
    stream = envoy(snapshot, ["a"]) if memory is None else DeltaStream(FanOutCache(), memory)
    if memory is not None:
        stream.set_snapshot(snapshot, 0.0)
    (ecds,) = decode(stream.receive(request(EXTENSION_CONFIG, resource_names_subscribe=names), 0.0))
    assert ecds.type_url == EXTENSION_CONFIG and list(held(ecds)) == sorted(names)
    assert [type(e) for e in respond(stream, ecds).events] == [Ack]
    return stream


def test_filter_configs_are_named_and_a_change_to_one_sends_only_it() -> None:
    base = gateway({"a": "1"}, "a")
    stream = filters_stream(with_filters(base, one="1", two="2", unnamed="3"), ["one", "two"])
    state = stream.type_state(EXTENSION_CONFIG)
    assert state is not None and not state.wildcard and state.names == {"one", "two"}
    pushed = stream.set_snapshot(with_filters(base, one="1", two="22", unnamed="33"), 1.0)
    (ecds,) = decode(pushed)
    assert ecds.type_url == EXTENSION_CONFIG and list(held(ecds)) == ["two"] and not ecds.removed_resources
    config = extension_pb2.TypedExtensionConfig()
    assert ecds.resources[0].resource.Unpack(config) and config.name == "two"
    # Not held while clusters warm (ECDS names no cluster), and pushed after listeners, before routes.
    changed = gateway({"a": "2"}, "a", routes={"r2": "a"})
    types = [r.type_url for r in stream.set_snapshot(with_filters(changed, one="9", two="22"), 2.0).responses]
    assert types == [CLUSTER, ENDPOINT, EXTENSION_CONFIG]


def test_a_nacked_filter_config_is_withheld_on_this_stream_and_after_reconnect() -> None:
    memory = NackMemory()
    base = gateway({"a": "1"}, "a")
    stream = filters_stream(with_filters(base, one="1", two="2"), ["one", "two"], memory)
    (bad,) = decode(stream.set_snapshot(with_filters(base, one="bad", two="2"), 1.0))
    error = {"code": 13, "message": "RE2 program size"}
    nack = stream.receive(request(EXTENSION_CONFIG, response_nonce=bad.nonce, error_detail=error), 2.0)
    assert [e.error for e in nack.events if isinstance(e, Nack)] == ["RE2 program size"] and nack.responses == ()
    output = stream.set_snapshot(with_filters(base, one="bad", two="22"), 3.0)
    (other,) = decode(output)
    assert list(held(other)) == ["two"] and any(isinstance(e, Withheld) for e in output.events)
    fresh = filters_stream(with_filters(base, one="1", two="2"), ["one", "two"], memory)
    (reconnected,) = decode(fresh.set_snapshot(with_filters(base, one="bad", two="22"), 0.0))
    assert list(held(reconnected)) == ["two"]
    (fixed,) = decode(stream.set_snapshot(with_filters(base, one="good", two="22"), 4.0))
    assert list(held(fixed)) == ["one"]


def test_a_reconnect_holding_the_current_filter_configs_gets_nothing() -> None:
    snapshot = with_filters(gateway({"a": "1"}, "a"), one="1", two="2")
    current = versions_of(snapshot)[EXTENSION_CONFIG]
    stream = DeltaStream(FanOutCache())
    stream.set_snapshot(snapshot, 0.0)
    subscribe = request(EXTENSION_CONFIG, resource_names_subscribe=["one", "two"], initial_resource_versions=current)
    output = stream.receive(subscribe, 0.0)
    assert output.responses == () and Resumed(EXTENSION_CONFIG, snapshot.version(EXTENSION_CONFIG)) in output.events
    older = DeltaStream(FanOutCache())
    older.set_snapshot(snapshot, 0.0)
    versions = {"one": current["one"], "two": "older"}
    subscribe = request(EXTENSION_CONFIG, resource_names_subscribe=["one", "two"], initial_resource_versions=versions)
    (ecds,) = decode(older.receive(subscribe, 0.0))
    assert list(held(ecds)) == ["two"]


def test_an_unsubscribed_filter_config_is_not_removed_and_a_dropped_one_is() -> None:
    """Unsubscribing (a listener that stops naming it) needs no answer; a configuration the snapshot drops while
    still subscribed is listed in removed_resources (Envoy falls back to its default: docs/envoy-ecds.md §2)."""
    base = gateway({"a": "1"}, "a")
    stream = filters_stream(with_filters(base, one="1", two="2"), ["one", "two"])
    assert stream.receive(request(EXTENSION_CONFIG, resource_names_unsubscribe=["one"]), 0.0).responses == ()
    assert stream.set_snapshot(with_filters(base, one="11", two="2"), 1.0).responses == ()  # "one" not wanted
    # Subscribed again (a listener names it again): Envoy dropped it, so it is sent again.
    (again,) = decode(stream.receive(request(EXTENSION_CONFIG, resource_names_subscribe=["one"]), 0.0))
    assert list(held(again)) == ["one"] and not again.removed_resources
    respond(stream, again)
    (removed,) = decode(stream.set_snapshot(with_filters(base, one="11"), 2.0))
    assert removed.type_url == EXTENSION_CONFIG and list(removed.removed_resources) == ["two"] and not held(removed)


# --- the deny list's recent configuration after the buckets it follows (SENT_LAST) -------------------------

B0, B1, RECENT = revocation_bucket_filter(0), revocation_bucket_filter(1), REVOKED_RECENTLY_FILTER
DENY_LIST = [B0, B1, RECENT]


def tiers(b0: str = "", b1: str = "", recent: str = "") -> Snapshot:
    """Two deny-list buckets and the recent list, each naming the jobs it denies (as a tag)."""
    return with_filters(gateway({"a": "1"}, "a"), **{B0: b0, B1: b1, RECENT: recent})


SEALED, UNSEALED = tiers(b0="7"), tiers(recent="7")  # job 7 in its bucket, in the recent list


def denied(output: Output) -> dict[str, str]:
    """Filter name → the jobs its deny list holds, as Envoy would read the one response of `output`."""
    found = {}
    for resource in one_response(output).resources:
        config, deny_list = extension_pb2.TypedExtensionConfig(), rbac_pb2.RBAC()
        assert resource.resource.Unpack(config) and config.typed_config.Unpack(deny_list)
        found[config.name] = deny_list.rules_stat_prefix
    return found


def one_response(output: Output) -> discovery_pb2.DeltaDiscoveryResponse:
    (response,) = decode(output)
    return response


def reconnected(current: Snapshot, held_: Snapshot, *, failover: bool = False) -> tuple[DeltaStream, Output]:
    """A new stream from an Envoy holding the filter configurations of `held_`: a reconnect to the server that gave
    them, or a failover from another one."""
    shared = FanOutCache()
    if not failover:
        DeltaStream(shared).set_snapshot(held_, 0.0)
    stream = DeltaStream(shared)
    stream.set_snapshot(current, 0.0)
    versions = {n: r.version for n, r in held_.types[EXTENSION_CONFIG].resources.items()}
    subscribe = request(EXTENSION_CONFIG, resource_names_subscribe=DENY_LIST, initial_resource_versions=versions)
    return stream, stream.receive(subscribe, 1.0)


def test_a_reconnect_across_a_seal_gets_the_buckets_first_and_the_recent_list_after_their_ack() -> None:
    stream, out = reconnected(SEALED, UNSEALED)
    assert denied(out) == {B0: "7"}  # the recent list it holds still denies job 7
    assert ecds_state(stream).held[RECENT] == UNSEALED.types[EXTENSION_CONFIG].resources[RECENT].version
    assert stream.set_snapshot(tiers(b0="7"), 2.0).responses == ()  # the same content: it still waits
    after = answer(stream, out.responses[0])
    assert events_of(after, Ack) and denied(after) == {RECENT: ""}
    assert answer(stream, after.responses[0]).responses == ()
    assert ecds_state(stream).held == {n: r.version for n, r in SEALED.types[EXTENSION_CONFIG].resources.items()}
    assert denied(stream.set_snapshot(tiers(b0="7", recent="8"), 3.0)) == {RECENT: "8"}  # a revocation: at once


def test_a_nack_of_the_buckets_is_handled_as_any_and_the_recent_list_follows() -> None:
    """As before: the refused bucket is not sent again, the rest of the snapshot is."""
    stream, out = reconnected(SEALED, UNSEALED)
    nacked = answer(stream, out.responses[0], REFUSED)
    assert events_of(nacked, Nack) and denied(nacked) == {RECENT: ""}
    assert ecds_state(stream).refused.keys() == {B0}


def test_a_change_while_the_recent_list_is_held_goes_at_once_and_the_recent_list_after_its_answer() -> None:
    stream, out = reconnected(SEALED, UNSEALED)
    assert denied(second := stream.set_snapshot(tiers(b0="7", b1="9"), 2.0)) == {B1: "9"}
    assert stream.set_snapshot(tiers(b0="7", b1="9", recent="10"), 3.0).responses == ()  # waits for the answer
    assert answer(stream, out.responses[0]).responses == ()  # the older one's answer: the newer is still due
    assert denied(answer(stream, second.responses[0])) == {RECENT: "10"}


def test_a_recent_list_unsubscribed_while_held_is_not_sent_and_comes_alone_when_named_again() -> None:
    stream, out = reconnected(SEALED, UNSEALED)
    assert stream.receive(request(EXTENSION_CONFIG, resource_names_unsubscribe=[RECENT]), 2.0).responses == ()
    assert answer(stream, out.responses[0]).responses == ()
    again = stream.receive(request(EXTENSION_CONFIG, resource_names_subscribe=[RECENT]), 3.0)
    assert denied(again) == {RECENT: ""}


def test_a_failover_from_another_server_is_answered_in_one_response_and_held_back_once_it_holds_ours() -> None:
    """Another replica may have sealed ids this one still holds as recent: the buckets first could then be the unsafe
    order, and the versions cannot tell. Once the client holds this server's versions, the order is known."""
    stream, out = reconnected(SEALED, UNSEALED, failover=True)
    assert set(denied(out)) == {B0, RECENT}
    answer(stream, out.responses[0])
    assert denied(stream.set_snapshot(tiers(b0="7", recent="8"), 2.0)) == {RECENT: "8"}
    split = stream.set_snapshot(tiers(b0="7,8"), 3.0)
    assert denied(split) == {B0: "7,8"}
    assert denied(answer(stream, split.responses[0])) == {RECENT: ""}


def test_a_connected_stream_gets_a_revocation_at_once_and_a_seal_it_skipped_in_two_responses() -> None:
    stream = filters_stream(UNSEALED, DENY_LIST)
    assert denied(stream.set_snapshot(tiers(recent="7,8"), 1.0)) == {RECENT: "7,8"}
    split = stream.set_snapshot(tiers(b0="7,8"), 2.0)
    assert denied(split) == {B0: "7,8"}
    assert denied(answer(stream, split.responses[0])) == {RECENT: ""}


def test_a_fresh_connect_is_answered_as_before() -> None:
    """An Envoy that holds no recent list has none to keep in force: nothing is held back from it."""
    stream = envoy(SEALED, ["a"])
    assert set(denied(stream.receive(request(EXTENSION_CONFIG, resource_names_subscribe=DENY_LIST), 1.0))) == set(
        DENY_LIST
    )
    stream = envoy(SEALED, ["a"])
    burst = [one(stream.receive(request(EXTENSION_CONFIG, resource_names_subscribe=[n]), 1.0)) for n in DENY_LIST]
    assert [r.resource_names for r in burst] == [(n,) for n in DENY_LIST]


def test_without_configurations_to_send_last_the_seal_goes_in_one_response() -> None:
    stream = DeltaStream(FanOutCache(), last=frozenset())
    stream.set_snapshot(SEALED, 0.0)
    versions = {n: r.version for n, r in UNSEALED.types[EXTENSION_CONFIG].resources.items()}
    subscribe = request(EXTENSION_CONFIG, resource_names_subscribe=DENY_LIST, initial_resource_versions=versions)
    assert set(denied(stream.receive(subscribe, 1.0))) == {B0, RECENT}


# --- a NACK of an earlier response (docs/envoy-ecds.md §8) ---------------------------------------------

SEVENTEEN = [f"f{i:02}" for i in range(17)]
REFUSED = {"code": 13, "message": "RE2 program size"}


def seventeen(**changed: str) -> Snapshot:
    return with_filters(gateway({"a": "1"}, "a"), **({n: "1" for n in SEVENTEEN} | changed))


def refused_burst(memory: NackMemory | None = None, **changed: str) -> tuple[DeltaStream, list[Response]]:
    """Envoy's connect burst for a listener of 17 filters (one subscribe request each, docs/envoy-ecds.md §8),
    all answered before Envoy answers any; `f00`, the first, is the one it refuses."""
    snapshot = seventeen(f00="bad", **changed)
    stream = envoy(snapshot, ["a"]) if memory is None else DeltaStream(FanOutCache(), memory)
    stream.set_snapshot(snapshot, 0.0)
    burst = [one(stream.receive(request(EXTENSION_CONFIG, resource_names_subscribe=[n]), 1.0)) for n in SEVENTEEN]
    assert [r.resource_names for r in burst] == [(n,) for n in SEVENTEEN]
    return stream, burst


def answer(stream: DeltaStream, response: Response, error: dict[str, Any] | None = None, nonce: str = "") -> Output:
    fields: dict[str, Any] = {"response_nonce": nonce or response.nonce}
    if error is not None:
        fields["error_detail"] = error
    return stream.receive(request(response.type_url, **fields), 20.0)


def ecds_state(stream: DeltaStream) -> delta.DeltaTypeState:
    state = stream.type_state(EXTENSION_CONFIG)
    assert state is not None
    return state


def events_of(output: Output, kind: type[Any]) -> list[Any]:
    return [e for e in output.events if isinstance(e, kind)]


def test_a_nack_of_the_first_of_17_responses_is_seen_after_the_burst() -> None:
    """17 responses outstanding is past MAX_OUTSTANDING: the first was pushed out before Envoy NACKed it. It is
    still recognised, and the refused configuration stays refused through the ACKs that follow."""
    assert len(SEVENTEEN) > delta.MAX_OUTSTANDING
    stream, burst = refused_burst()
    out = answer(stream, burst[0], REFUSED)
    (nack,) = events_of(out, Nack)
    assert (nack.version, nack.nonce, nack.resources, nack.late, nack.error) == (
        burst[0].version, burst[0].nonce, ("f00",), True, "RE2 program size"
    )  # fmt: skip
    assert out.responses == () and set(ecds_state(stream).refused) == {"f00"}
    for response in burst[1:]:
        (acked,) = events_of(answer(stream, response), Ack)
        assert acked.refusing == ("f00",)
    # A change elsewhere is sent alone (the refused bytes are withheld) and its ACK still refuses f00.
    pushed = stream.set_snapshot(seventeen(f00="bad", f09="2"), 21.0)
    assert one(pushed).resource_names == ("f09",)
    assert events_of(answer(stream, one(pushed)), Ack)[0].refusing == ("f00",)
    fixed = one(stream.set_snapshot(seventeen(f09="2"), 22.0))
    assert fixed.resource_names == ("f00",) and ecds_state(stream).refused == {}
    assert events_of(answer(stream, fixed), Ack)[0].refusing == ()


def test_a_late_nack_is_remembered_for_the_node_like_any_other() -> None:
    """As for any Delta NACK, the refused bytes are remembered for the node: a reconnect is not sent them again."""
    memory = NackMemory()
    stream, burst = refused_burst(memory)
    answer(stream, burst[0], REFUSED)
    again = DeltaStream(FanOutCache(), memory)
    again.set_snapshot(seventeen(f00="bad"), 0.0)
    output = again.receive(request(EXTENSION_CONFIG, resource_names_subscribe=SEVENTEEN), 1.0)
    assert one(output).resource_names == tuple(SEVENTEEN[1:]) and events_of(output, Withheld)
    assert not ecds_state(again).refused  # a new stream knows of no refusal of its own (docs/envoy-ecds.md §8)


def test_a_refusal_ends_when_the_configuration_is_unsubscribed() -> None:
    stream, burst = refused_burst()
    answer(stream, burst[0], REFUSED)
    stream.receive(request(EXTENSION_CONFIG, resource_names_unsubscribe=["f00"]), 21.0)
    assert ecds_state(stream).refused == {}
    assert events_of(answer(stream, burst[-1]), Ack)[0].refusing == ()


@pytest.mark.parametrize("nonce", ["999", "0", "-1", "01", "x", "1" * 33, "\u00e9"])
def test_a_nack_naming_a_nonce_never_sent_is_stale_and_changes_nothing(nonce: str) -> None:
    stream, burst = refused_burst()
    state = ecds_state(stream)
    outstanding, recent = dict(state.outstanding), dict(state.recent)
    out = answer(stream, burst[0], REFUSED, nonce=nonce)
    assert [type(e) for e in out.events] == [Stale] and out.responses == ()
    assert state.outstanding == outstanding and state.recent == recent and state.refused == {}


def test_a_huge_nonce_is_stale_shown_clipped_and_kept_nowhere() -> None:
    stream, burst = refused_burst()
    huge = burst[0].nonce + "7" * 1_000_000
    (stale,) = events_of(answer(stream, burst[0], REFUSED, nonce=huge), Stale)
    assert stale.nonce == huge[: len(stale.nonce)] and len(stale.nonce) <= 32
    assert events_of(answer(stream, burst[0], REFUSED), Nack)  # the real one still counts


def test_a_client_spraying_nonces_grows_nothing() -> None:
    stream, burst = refused_burst()
    state = ecds_state(stream)
    outstanding, recent = dict(state.outstanding), dict(state.recent)
    for i in range(5_000):
        assert [type(e) for e in answer(stream, burst[0], REFUSED, nonce=f"{10_000 + i}").events] == [Stale]
    assert state.outstanding == outstanding and state.recent == recent and state.refused == {} and not state.nacked
    assert events_of(answer(stream, burst[0], REFUSED), Nack)


def test_a_replayed_late_nack_counts_once() -> None:
    stream, burst = refused_burst()
    assert events_of(answer(stream, burst[0], REFUSED), Nack)
    assert [type(e) for e in answer(stream, burst[0], REFUSED).events] == [Stale]


def test_an_answer_to_an_outstanding_response_forgets_the_older_ones() -> None:
    """Envoy answers in order: once it answered an outstanding response, a NACK of an older one is not Envoy's."""
    stream, burst = refused_burst()
    answer(stream, burst[3])
    assert ecds_state(stream).recent == {}
    assert [type(e) for e in answer(stream, burst[0], REFUSED).events] == [Stale]


def test_a_client_that_answers_nothing_holds_a_bounded_memory_that_pins_no_snapshot() -> None:
    stream = filters_stream(with_filters(gateway({"a": "1"}, "a"), one="1"), ["one"])
    pushes = [one(stream.set_snapshot(with_filters(gateway({"a": "1"}, "a"), one=str(i)), 0.0)) for i in range(300)]
    state = ecds_state(stream)
    assert len(state.outstanding) == delta.MAX_OUTSTANDING and len(state.recent) == RECENT_NONCES
    assert all(sent.base is None and not sent.prior for sent in state.recent.values())
    assert [type(e) for e in answer(stream, pushes[0], REFUSED).events] == [Stale]  # forgotten
    oldest = pushes[-delta.MAX_OUTSTANDING - RECENT_NONCES]
    assert events_of(answer(stream, oldest, REFUSED), Nack)[0].late


# --- memory ----------------------------------------------------------------------------------------


def test_old_snapshots_are_freed_by_reference_counting_once_every_stream_moved_past_them() -> None:
    """The shared diffs, views and framed bodies must not keep a pushed-over snapshot alive, nor need the
    cycle collector to free it: a server pushing policy all day would otherwise grow (a 256-push sawtooth)."""
    fleet = [envoy(gateway({"a": "1", "b": "1"}, "a"), ["a", "b"]) for _ in range(3)]
    gc.disable()
    try:
        dead: list[weakref.ref[Any]] = []
        for push in range(6):
            # Routes change on every push, clusters on every other one (with a make-before-break swap).
            target = "a" if push % 4 < 2 else "b"
            snapshot = gateway({"a": "1", target: "1", "c": str(push // 2)}, target, host=f"h{push}")
            for stream in fleet:
                ack_all(stream, stream.set_snapshot(snapshot, 0.0))
            dead += [weakref.ref(snapshot), *(weakref.ref(t) for t in snapshot.types.values())]
            del snapshot
        last = fleet[0].snapshot
        assert last is not None
        alive = [ref() for ref in dead if ref() is not None]
        current = [last, *last.types.values()]
        assert [t for t in alive if not any(t is c for c in current)] == []  # only the current one is alive
    finally:
        gc.enable()
