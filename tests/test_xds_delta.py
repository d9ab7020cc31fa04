"""The Delta ADS state machine without sockets: subscriptions, diffs, removal, reconnect, NACK memory."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, Snapshot
from controlplane.xds.delta import DeltaStream
from controlplane.xds.protocol import Ack, Nack, Output, Resumed, Stale, Withheld
from controlplane.xds.registry import ProxyRegistry


def snap(clusters: dict[str, str]) -> Snapshot:
    """Clusters named by key, their content varied by value (so versions change with it)."""
    return Snapshot.build(
        "g",
        {
            CLUSTER: [(n, cluster_pb2.Cluster(name=n, alt_stat_name=t)) for n, t in clusters.items()],
            ENDPOINT: [(n, endpoint_pb2.ClusterLoadAssignment(cluster_name=n)) for n in clusters],
        },
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
    response = connect(DeltaStream(), snapshot)
    assert response.type_url == CLUSTER and response.nonce == "1"
    assert response.system_version_info == snapshot.version(CLUSTER)
    assert held(response) == {n: r.version for n, r in snapshot.types[CLUSTER].resources.items()}
    for resource in response.resources:
        assert resource.resource.SerializeToString() == snapshot.types[CLUSTER].resources[resource.name].any_bytes


def test_explicit_subscribe_and_unsubscribe() -> None:
    stream = DeltaStream()
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
    stream = DeltaStream()
    connect(stream, snap({"a": "1", "b": "1", "c": "1"}))
    (changed,) = decode(stream.set_snapshot(snap({"a": "1", "b": "2", "c": "1"}), 0.0))
    assert list(held(changed)) == ["b"] and list(changed.removed_resources) == []
    (removed,) = decode(stream.set_snapshot(snap({"a": "1", "b": "2"}), 0.0))
    assert list(held(removed)) == [] and list(removed.removed_resources) == ["c"]
    assert decode(stream.set_snapshot(snap({"a": "1", "b": "2"}), 0.0)) == []


def test_reconnect_with_initial_versions_sends_nothing_for_unchanged_resources() -> None:
    snapshot = snap({"a": "1", "b": "1"})
    versions = held(connect(DeltaStream(), snapshot))
    stream = DeltaStream()
    stream.receive(request(initial_resource_versions=versions), 0.0)
    output = stream.set_snapshot(snapshot, 0.0)
    assert output.responses == ()
    assert Resumed(CLUSTER, snapshot.version(CLUSTER)) in output.events
    # A client holding an older "a" and a vanished "z" gets just the difference.
    stream = DeltaStream()
    stream.receive(request(initial_resource_versions={"a": "old", "b": versions["b"], "z": "x"}), 0.0)
    (response,) = decode(stream.set_snapshot(snapshot, 0.0))
    assert list(held(response)) == ["a"] and list(response.removed_resources) == ["z"]


def test_ack_and_nacked_versions_are_never_resent_even_after_reconnect() -> None:
    registry = ProxyRegistry()
    stream = DeltaStream(registry)
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
    # Nor does a new stream of the same node (the registry remembers), holding the good "a".
    fresh = DeltaStream(registry)
    fresh.receive(request(initial_resource_versions={"a": held(first)["a"]}), 0.0)
    (reconnected,) = decode(fresh.set_snapshot(snap({"a": "bad", "b": "1"}), 0.0))
    assert list(held(reconnected)) == ["b"]
    # A fixed version of "a" is sent.
    (fixed,) = decode(stream.set_snapshot(snap({"a": "good", "b": "1"}), 4.0))
    assert list(held(fixed)) == ["a"]


def test_stale_or_unknown_nonce_is_reported_but_subscription_changes_still_apply() -> None:
    stream = DeltaStream()
    connect(stream, snap({"a": "1", "b": "1"}), type_url=ENDPOINT, resource_names_subscribe=["a"])
    output = stream.receive(request(ENDPOINT, response_nonce="99", resource_names_subscribe=["b"]), 0.0)
    assert [type(e) for e in output.events if not isinstance(e, Resumed)][:1] == [Stale]
    (response,) = decode(output)
    assert list(held(response)) == ["b"]
