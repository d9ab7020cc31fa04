"""CPU per stream of one push, Delta against SotW, as the number of clusters grows (issue #5).

Method: S in-process streams (pure state machines, no grpc) go through Envoy's startup for CDS (wildcard)
and EDS (every cluster named) and ACK everything, with one `NackMemory` as the rejection memory and one
`FanOutCache`, as the server gives its streams. Then snapshots are pushed to every stream in turn, and
every response is ACKed, for two kinds of change of N clusters: one cluster (and its endpoints) changed,
and all of them. `time.process_time` is taken around the fan-out (`set_snapshot` on every stream) and
around the ACKs; the median over REPEAT pushes is reported in µs per stream. The same snapshots go to
`protocol.AdsStream`, the SotW machine, as the baseline: it sends whole types, sharing one framed body per
fan-out.

What to expect: Delta's push costs O(changed) per stream, so "1 of N" stays flat as N grows, and "all N"
grows with N (every changed resource is checked against the node's rejections, and sent).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, Snapshot
from controlplane.xds.delta import DeltaStream
from controlplane.xds.memo import FanOutCache
from controlplane.xds.nack_memory import NackMemory
from controlplane.xds.protocol import AdsStream, Output


def names(clusters: int) -> list[str]:
    return [f"backend-{i:05d}" for i in range(clusters)]


def snapshot(clusters: int, tag: Callable[[int], str], previous: Snapshot | None) -> Snapshot:
    def cluster(i: int, name: str) -> cluster_pb2.Cluster:
        return cluster_pb2.Cluster(name=name, alt_stat_name=f"{name}-{tag(i)}", type=cluster_pb2.Cluster.EDS)

    def endpoints(i: int, name: str) -> endpoint_pb2.ClusterLoadAssignment:
        zone = endpoint_components_pb2.LocalityLbEndpoints(locality=base_pb2.Locality(zone=tag(i)))
        return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[zone])

    every = list(enumerate(names(clusters)))
    resources = {
        CLUSTER: [(n, cluster(i, n).SerializeToString()) for i, n in every],
        ENDPOINT: [(n, endpoints(i, n).SerializeToString()) for i, n in every],
    }
    return Snapshot.build("fleet", resources, previous)


class Fleet:
    """S streams of one protocol, and how that protocol's client ACKs."""

    def __init__(self, protocol: str, streams: int, first: Snapshot, clusters: int) -> None:
        self.protocol = protocol
        self.names = names(clusters)
        rejections, shared = NackMemory(), FanOutCache()  # as the server shares them between its streams
        self.streams: list[AdsStream | DeltaStream] = []
        for i in range(streams):
            stream: AdsStream | DeltaStream = (
                DeltaStream(shared, rejections) if protocol == "delta" else AdsStream(shared, rejections)
            )
            stream.set_snapshot(first, 0.0)
            node = base_pb2.Node(id=f"envoy-{i}", cluster="fleet")
            self.ack(stream, self.receive(stream, self.request(CLUSTER, node=node)))
            self.ack(stream, self.receive(stream, self.request(ENDPOINT, names=self.names)))
            self.streams.append(stream)

    def request(
        self, type_url: str, *, names: Sequence[str] = (), nonce: str = "", node: base_pb2.Node | None = None
    ) -> discovery_pb2.DeltaDiscoveryRequest | discovery_pb2.DiscoveryRequest:
        if self.protocol == "delta":
            subscribe = names if not nonce else ()
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=subscribe, response_nonce=nonce, node=node
            )
        # SotW repeats the subscription in every request, ACKs included.
        subscription = self.names if type_url == ENDPOINT else ()
        return discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=subscription, response_nonce=nonce, node=node
        )

    @staticmethod
    def receive(
        stream: AdsStream | DeltaStream, request: discovery_pb2.DeltaDiscoveryRequest | discovery_pb2.DiscoveryRequest
    ) -> Output:
        if isinstance(stream, DeltaStream):
            assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
            return stream.receive(request, 0.0)
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        return stream.receive(request, 0.0)

    def ack(self, stream: AdsStream | DeltaStream, output: Output) -> None:
        for response in output.responses:
            request = self.request(response.type_url, nonce=response.nonce)
            if isinstance(request, discovery_pb2.DiscoveryRequest):
                request.version_info = response.version
            self.ack(stream, self.receive(stream, request))

    def push(self, snapshot: Snapshot) -> tuple[float, float]:
        """CPU seconds of the fan-out, then of the ACKs."""
        started = time.process_time()
        outputs = [stream.set_snapshot(snapshot, 1.0) for stream in self.streams]
        pushed = time.process_time()
        for stream, output in zip(self.streams, outputs, strict=True):
            self.ack(stream, output)
        return pushed - started, time.process_time() - pushed


def one_changed(push: int, index: int) -> str:
    return f"v{push}" if index == 0 else "v0"


def all_changed(push: int, index: int) -> str:
    return f"w{push}"


def measure(clusters: int, streams: int, repeat: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(protocol, change) → median µs per stream of (push, ack)."""
    first = snapshot(clusters, functools.partial(one_changed, 0), None)
    changes = {
        "1 of N": [snapshot(clusters, functools.partial(one_changed, r), first) for r in range(1, repeat + 1)],
        "all N": [snapshot(clusters, functools.partial(all_changed, r), first) for r in range(1, repeat + 1)],
    }
    results = {}
    for protocol in ("delta", "sotw"):
        fleet = Fleet(protocol, streams, first, clusters)
        for change, snapshots in changes.items():
            samples = [fleet.push(s) for s in snapshots]
            push = statistics.median(p for p, _ in samples) / streams * 1e6
            ack = statistics.median(a for _, a in samples) / streams * 1e6
            results[protocol, change] = (push, ack)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--clusters", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU µs per stream and push (CDS + EDS), {args.streams} streams, median of {args.repeat} pushes")
    print(f"{'N':>6} {'change':<8} {'delta push':>11} {'delta ack':>10} {'sotw push':>10} {'sotw ack':>9}")
    for clusters in args.clusters:
        results = measure(clusters, args.streams, args.repeat)
        for change in ("1 of N", "all N"):
            delta, sotw = results["delta", change], results["sotw", change]
            print(f"{clusters:>6} {change:<8} {delta[0]:>11.1f} {delta[1]:>10.1f} {sotw[0]:>10.1f} {sotw[1]:>9.1f}")


if __name__ == "__main__":
    main()
