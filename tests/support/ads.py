"""An ADS client that speaks as Envoy does, for the tests that drive the xDS server over real gRPC without Envoy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.xds.server import SERVICE

TIMEOUT = 5.0
T = TypeVar("T")


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    classes = {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
    }
    out = []
    for packed in response.resources:
        message = classes[packed.type_url].FromString(packed.value)
        out.append(message.cluster_name if packed.type_url == ENDPOINT else message.name)
    return out


def ads_method(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The ADS method on `channel` (blocking or asyncio), carrying Envoy's discovery messages."""
    return channel.stream_stream(
        f"/{SERVICE}/StreamAggregatedResources",
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )


def delta_method(channel: grpc.aio.Channel) -> Any:
    """The Delta ADS method on `channel`, carrying Envoy's incremental discovery messages."""
    return channel.stream_stream(
        f"/{SERVICE}/DeltaAggregatedResources",
        request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
    )


def first_delta_request(type_url: str, node_id: str, group: str) -> discovery_pb2.DeltaDiscoveryRequest:
    """A Delta stream's first request: the only one that names the node."""
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
    request.node.id, request.node.cluster = node_id, group
    return request


def first_request(type_url: str, node_id: str, group: str = "ci-gateway") -> discovery_pb2.DiscoveryRequest:
    """A stream's first request: the only one that names the node."""
    request = discovery_pb2.DiscoveryRequest(type_url=type_url)
    request.node.id, request.node.cluster = node_id, group
    return request


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, TIMEOUT)


class FakeEnvoy:
    """One ADS stream that sends what Envoy sends (node on the first message only)."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, group: str) -> None:
        self.call = ads_method(channel)()
        self.node_id = node_id
        self.group = group
        self.sent_node = False

    async def send(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
        )
        if not self.sent_node:
            request.node.id, request.node.cluster = self.node_id, self.group
            self.sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        await within(self.call.write(request))

    async def recv(self) -> discovery_pb2.DiscoveryResponse:
        response = await within(self.call.read())
        assert isinstance(response, discovery_pb2.DiscoveryResponse), response
        return response

    async def ack(self, response: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> None:
        await self.send(response.type_url, names, version=response.version_info, nonce=response.nonce)

    async def startup(self) -> dict[str, discovery_pb2.DiscoveryResponse]:
        """Envoy's initial sequence (§1.3): CDS, EDS (warming), LDS, RDS, each ACKed."""
        got = {}
        for type_url, names in ((CLUSTER, ()), (ENDPOINT, ("backend",)), (LISTENER, ()), (ROUTE, ("local_route",))):
            await self.send(type_url, names)
            got[type_url] = await self.recv()
            assert got[type_url].type_url == type_url
            await self.ack(got[type_url], names)
        return got

    async def barrier(self, names: Iterable[str]) -> discovery_pb2.DiscoveryResponse:
        """An EDS subscription change must be answered next: proves nothing else was queued before it."""
        await self.send(ENDPOINT, names)
        response = await self.recv()
        assert response.type_url == ENDPOINT and set(names_of(response)) <= set(names)
        return response
