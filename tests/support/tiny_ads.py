"""The smallest ADS server that can feed a real Envoy any resource type, over SotW and Delta, for tests that
observe Envoy's own behaviour (ECDS today) rather than the control plane's.

Resources are held as packed `Any` by type URL and name; `put`/`remove` wake every stream, which sends what
its subscription lacks. SotW sends a type only once it holds at least one resource of it (or had one):
a type never set is never answered, which is how a test keeps a resource "not yet arrived".
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane.xds.server import SERVICE
from tests.support.ports import LOOPBACK

_WAKE = object()
_END = object()


class TinyAds:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {}
        self._streams: list[queue.Queue[Any]] = []
        self._counter = itertools.count(1)
        self.nacks: list[str] = []
        self.sent: list[tuple[str, str]] = []  # (type URL, nonce) of every response, oldest first
        self.answered: set[str] = set()  # the nonces Envoy has ACKed or NACKed
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString,
            ),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")

    def __enter__(self) -> TinyAds:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for stream in self._streams:
                stream.put(_END)
        self._server.stop(grace=None)

    # -- the resources ----------

    def put(self, type_url: str, name: str, message: Message) -> None:
        packed = any_pb2.Any()
        packed.Pack(message)
        with self._lock:
            self._resources.setdefault(type_url, {})[name] = (str(next(self._counter)), packed)
        self._wake()

    def remove(self, type_url: str, name: str) -> None:
        with self._lock:
            self._resources.setdefault(type_url, {}).pop(name, None)
        self._wake()

    def last_answered(self, type_url: str) -> bool:
        """Envoy has ACKed or NACKed the last response of `type_url` sent on any stream."""
        nonces = [nonce for sent_type, nonce in self.sent if sent_type == type_url]
        return bool(nonces) and nonces[-1] in self.answered

    def _wake(self) -> None:
        with self._lock:
            for stream in self._streams:
                stream.put(_WAKE)

    def _inbox(self, requests: Iterator[Any]) -> queue.Queue[Any]:
        inbox: queue.Queue[Any] = queue.Queue()

        def read() -> None:
            try:
                for request in requests:
                    self.answered.add(request.response_nonce)
                    if request.HasField("error_detail"):
                        self.nacks.append(request.error_detail.message)
                    inbox.put(request)
            except grpc.RpcError:
                pass
            inbox.put(_END)

        with self._lock:
            self._streams.append(inbox)
        threading.Thread(target=read, daemon=True).start()
        return inbox

    # -- State of the World ----------

    def _sotw(self, requests: Iterator[discovery_pb2.DiscoveryRequest], context: Any) -> Iterator[Any]:
        inbox = self._inbox(requests)
        names: dict[str, set[str]] = {}
        sent: dict[str, tuple[tuple[str, str], ...]] = {}
        while (item := inbox.get()) is not _END:
            if item is not _WAKE:
                names[item.type_url] = set(item.resource_names)
            for type_url, wanted in names.items():
                with self._lock:
                    if type_url not in self._resources:
                        continue
                    held = {n: r for n, r in self._resources[type_url].items() if not wanted or n in wanted}
                versions = tuple(sorted((n, v) for n, (v, _) in held.items()))
                if sent.get(type_url) == versions:
                    continue
                sent[type_url] = versions
                nonce = str(next(self._counter))
                self.sent.append((type_url, nonce))
                yield discovery_pb2.DiscoveryResponse(
                    type_url=type_url,
                    version_info=nonce,
                    nonce=nonce,
                    resources=[packed for _, packed in held.values()],
                )

    # -- Delta ----------

    def _delta(self, requests: Iterator[discovery_pb2.DeltaDiscoveryRequest], context: Any) -> Iterator[Any]:
        inbox = self._inbox(requests)
        names: dict[str, set[str]] = {}
        sent: dict[str, dict[str, str]] = {}
        while (item := inbox.get()) is not _END:
            if item is not _WAKE:
                wanted = names.setdefault(item.type_url, set())
                wanted.update(item.resource_names_subscribe)
                wanted.difference_update(item.resource_names_unsubscribe)
            for type_url, wanted in names.items():
                wildcard = not wanted or "*" in wanted
                with self._lock:
                    held = {n: r for n, r in self._resources.get(type_url, {}).items() if wildcard or n in wanted}
                known = sent.setdefault(type_url, {})
                changed = [
                    discovery_pb2.Resource(name=n, version=v, resource=packed)
                    for n, (v, packed) in held.items()
                    if known.get(n) != v
                ]
                removed = [n for n in known if n not in held]
                if not changed and not removed:
                    continue
                for resource in changed:
                    known[resource.name] = resource.version
                for name in removed:
                    del known[name]
                nonce = str(next(self._counter))
                self.sent.append((type_url, nonce))
                yield discovery_pb2.DeltaDiscoveryResponse(
                    type_url=type_url,
                    system_version_info=nonce,
                    nonce=nonce,
                    resources=changed,
                    removed_resources=removed,
                )
