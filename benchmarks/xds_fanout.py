"""Fan-out of one snapshot change to N ADS streams, inside the server process (no sockets).

Method: N `AdsStream` state machines go through Envoy's startup sequence and ACK all four types; then a
snapshot in which one of C clusters changed is handed to every stream (what the server does on a policy
change) and the wall time to produce every stream's response bytes is measured, median of REPEAT. The bytes
include each stream's own nonce (`Response.wire`, which the grpc adapter calls as it writes), so the figure
is what a fan-out costs up to the socket, not only the shared part. `--skew` numbers every stream's responses
differently (as streams with different histories do), so no two share the bytes on the wire.

Baseline in the same run: the same fan-out done the obvious way, building and serializing a
DiscoveryResponse message per stream (the protobuf work serialize-once avoids).
"""

from __future__ import annotations

import argparse
import statistics
import time

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.any_pb2 import Any as AnyProto

from controlplane.snapshots.snapshot import CLUSTER, Snapshot
from controlplane.xds.memo import FanOutCache
from controlplane.xds.protocol import AdsStream


def snapshot(clusters: int, changed: str) -> Snapshot:
    def cluster(i: int) -> cluster_pb2.Cluster:
        name = f"backend-{i:04d}"
        tag = changed if i == 0 else "v1"
        return cluster_pb2.Cluster(name=name, alt_stat_name=f"{name}-{tag}", type=cluster_pb2.Cluster.EDS)

    return Snapshot.build("fleet", {CLUSTER: [(f"backend-{i:04d}", cluster(i)) for i in range(clusters)]})


def connected(streams: int, first: Snapshot, shared: FanOutCache, skew: bool) -> list[AdsStream]:
    out = []
    for i in range(streams):
        stream = AdsStream(shared)
        stream.set_snapshot(first, 0.0)
        request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
        request.node.id, request.node.cluster = f"envoy-{i}", "fleet"
        (response,) = stream.receive(request, 0.0).responses
        ack = discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER, version_info=response.version, response_nonce=response.nonce
        )
        stream.receive(ack, 0.0)
        if skew:
            stream._nonces += i  # as if it had been sent i more responses than the first stream
        out.append(stream)
    return out


def naive(streams: int, snap: Snapshot) -> None:
    """Per stream: a new DiscoveryResponse, every Any copied in, serialized."""
    anys = [AnyProto.FromString(r.any_bytes) for r in snap.types[CLUSTER].resources.values()]
    for i in range(streams):
        response = discovery_pb2.DiscoveryResponse(
            version_info=snap.version(CLUSTER), type_url=CLUSTER, nonce=str(i), resources=anys
        )
        response.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skew", action="store_true", help="no two streams share a nonce")
    args = parser.parse_args()
    ours, base = [], []
    for r in range(args.repeat):
        shared = FanOutCache()  # one per server, as XdsServer hands its own to every stream
        streams = connected(args.streams, snapshot(args.clusters, "v1"), shared, args.skew)
        changed = snapshot(args.clusters, f"v{r + 2}")
        started = time.perf_counter()
        for stream in streams:
            (pushed,) = stream.set_snapshot(changed, 1.0).responses  # exactly one CDS response each
            pushed.wire(shared)  # what grpc's serializer writes: the shared bytes and this stream's nonce
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        naive(args.streams, changed)
        base.append(time.perf_counter() - started)
    size = len(changed.types[CLUSTER].all_entries) / 1024
    per_stream = statistics.median(ours) / args.streams * 1e6
    baseline = statistics.median(base) / args.streams * 1e6
    what = f"{args.clusters} clusters, {size:.1f} KiB"
    print(f"one CDS change ({what}) to {args.streams} streams, median of {args.repeat}")
    for label, samples, each in (
        ("state machine + serialize-once:", ours, per_stream),
        ("baseline, a message per stream:", base, baseline),
    ):
        print(f"  {label:<36} {statistics.median(samples) * 1000:7.1f} ms  ({each:5.1f} us/stream)")
    print(f"  serialize-once is {baseline / per_stream:.1f}x cheaper per stream")


if __name__ == "__main__":
    main()
