"""A real Envoy fed by `TinyAds`: a listener whose HTTP filters come by ECDS, and the builders of those filters'
configurations (RBAC deny lists of job ids), for tests/test_envoy_ecds_facts.py and benchmarks/ that observe
Envoy's own behaviour (docs/envoy-ecds.md). Routes are inline direct responses: no upstream is involved.
`served_envoy` puts the same Envoy on the control plane's own `XdsServer` instead (tests/test_e2e_ecds_server.py).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, json_format

from controlplane.cli.bootstrap import render_bootstrap
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import LISTENER, Snapshot
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import XdsServer
from tests.support.envoy import EnvoyProcess
from tests.support.ports import LOOPBACK, free_port
from tests.support.tiny_ads import TinyAds

ECDS = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
RBAC_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
JWT_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_PROTOS = (rbac_pb2, jwt_pb2, router_pb2, hcm_pb2)  # their descriptors resolve the `@type`s below
LISTENER_STATS = ("listener_manager.listener_modified", "listener_manager.total_filter_chains_draining")


def rbac(action: str, denied_jobs: list[str] | None = None, stat_prefix: str = "") -> rbac_pb2.RBAC:
    """ALLOW everything, or DENY requests whose `x-job` header is one of `denied_jobs` (an RE2 alternation)."""
    principal: dict[str, Any] = {"any": True}
    if denied_jobs is not None:
        regex = "|".join(denied_jobs)
        principal = {"header": {"name": "x-job", "string_match": {"safe_regex": {"regex": regex}}}}
    policy = {"permissions": [{"any": True}], "principals": [principal]}
    config = {"rules": {"action": action, "policies": {"p": policy}}, "rules_stat_prefix": stat_prefix}
    return json_format.ParseDict(config, rbac_pb2.RBAC())


def typed(name: str, message: Any) -> extension_pb2.TypedExtensionConfig:
    config = extension_pb2.TypedExtensionConfig(name=name)
    config.typed_config.Pack(message)
    return config


def ecds_filter(name: str, type_url: str, **options: Any) -> dict[str, Any]:
    discovery = {"config_source": {"ads": {}, "resource_api_version": "V3"}, "type_urls": [type_url], **options}
    return {"name": name, "config_discovery": discovery}


def listener(port: int, filters: list[dict[str, Any]], routes: list[dict[str, Any]] | None = None) -> Any:
    ok = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "ecds",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [*(routes or []), ok]}]},
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return json_format.ParseDict(
        {
            "name": "ecds-listener",
            "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
            ],
        },
        listener_pb2.Listener(),
    )


@contextmanager
def envoy_on_ads(api: str = "sotw", runtime: dict[str, Any] | None = None) -> Iterator[tuple[TinyAds, EnvoyProcess]]:
    """Envoy bootstrapped on a `TinyAds` (LDS over ADS, no CDS), `runtime` in its static runtime layer.

    Envoy is started from a worker thread: there `EnvoyProcess` sets no `preexec_fn`, so Python spawns with
    vfork, which runs no fork handlers. Forked from the main thread (a plain fork) while this process's gRPC
    server had threads, the child now and then aborted before exec (SIGABRT, an epoll error in its stdio log,
    from gRPC's fork handlers): in 2 of 13 runs of this file."""
    ads = TinyAds()
    envoy = ads_envoy(ads.port, api, runtime)
    try:
        with ThreadPoolExecutor(1) as spawner:
            spawner.submit(envoy.start).result()
        with ads:
            yield ads, envoy
    finally:
        envoy.stop()


def ads_envoy(port: int, api: str = "sotw", runtime: dict[str, Any] | None = None, group: str = "ecds") -> EnvoyProcess:
    """An Envoy (not started) whose node is in `group`, on the ADS server at `port`: LDS over ADS, no CDS.

    Start it from a worker thread (see `envoy_on_ads`)."""
    boot = render_bootstrap(group=group, node_id=f"ecds-{api}", xds_host=LOOPBACK, xds_port=port, api=api,
                            admin_port=0)  # fmt: skip
    del boot["dynamic_resources"]["cds_config"]
    boot["layered_runtime"]["layers"][0]["static_layer"] = runtime or {}
    return EnvoyProcess(boot, name=f"ecds-{api}", wait_ready=False)


@dataclass
class ServedEnvoy:
    """The control plane's own `XdsServer` on the test's event loop and a real Envoy on it (`served_envoy`)."""

    cache: SnapshotCache
    registry: ProxyRegistry
    server: XdsServer
    envoy: EnvoyProcess
    ads_port: int

    async def restart_server(self) -> None:
        """Stop the server and start a new one (an empty registry, the same cache) on the same port, as a restarted
        control plane: Envoy reconnects by itself."""
        await self.server.stop(1.0)
        self.registry = ProxyRegistry()
        self.server = _xds_server(self.cache, self.registry)
        assert await self.server.start(LOOPBACK, self.ads_port) == self.ads_port


def _xds_server(cache: SnapshotCache, registry: ProxyRegistry) -> XdsServer:
    return XdsServer(cache, registry, log=logging.getLogger("controlplane.xds"))


@asynccontextmanager
async def served_envoy(
    first: Snapshot, api: str, *, group: str, runtime: dict[str, Any] | None = None
) -> AsyncIterator[ServedEnvoy]:
    """`XdsServer` serving `first` and an Envoy of `group` on it over `api`, yielded once Envoy's first listener is
    LIVE (it waits for its filters' configurations: LIVE means ECDS was answered); both stopped on leaving. Envoy
    is started from a worker thread (see `envoy_on_ads`)."""
    cache, registry = SnapshotCache(), ProxyRegistry()
    cache.set(first)
    server = _xds_server(cache, registry)
    ads_port = await server.start(LOOPBACK, 0)
    served = ServedEnvoy(cache, registry, server, ads_envoy(ads_port, api, runtime=runtime, group=group), ads_port)
    try:
        with ThreadPoolExecutor(1) as spawner:
            await asyncio.wrap_future(spawner.submit(served.envoy.start))
        await asyncio.to_thread(served.envoy.wait_ready, 10)
        yield served
    finally:
        await asyncio.to_thread(served.envoy.stop)
        await served.server.stop(1.0)


@asynccontextmanager
async def compiled_envoy(cache: SnapshotCache, *, group: str, node_id: str) -> AsyncIterator[EnvoyProcess]:
    """An Envoy of `group` fed by an `XdsServer` over SotW from `cache` (the compiler's snapshots, set and changed by
    the caller), yielded once ready; both stopped on leaving. Started from a worker thread (see `envoy_on_ads`)."""
    server = _xds_server(cache, ProxyRegistry())
    port = await server.start(LOOPBACK, 0)
    boot = render_bootstrap(group=group, node_id=node_id, xds_host=LOOPBACK, xds_port=port, api="sotw", admin_port=0)
    envoy = EnvoyProcess(boot, name=node_id, wait_ready=False)
    try:
        with ThreadPoolExecutor(1) as spawner:
            await asyncio.wrap_future(spawner.submit(envoy.start))
        await asyncio.to_thread(envoy.wait_ready, 15)
        yield envoy
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(1.0)


class Client:
    """One keep-alive HTTP/1.1 connection that must stay the same connection: a close by Envoy fails the test."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
        self.conn.connect()
        self.local = self.conn.sock.getsockname()

    def get(self, path: str = "/", **headers: str) -> tuple[int, str]:
        self.conn.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = self.conn.getresponse()
        body = response.read().decode()
        assert response.getheader("connection") != "close", "Envoy is closing this connection"
        assert self.conn.sock is not None and self.conn.sock.getsockname() == self.local, "a new connection"
        return response.status, body

    def status(self, path: str = "/", **headers: str) -> int:
        return self.get(path, **headers)[0]

    def close(self) -> None:
        self.conn.close()


def once(port: int, path: str = "/", **headers: str) -> int | str:
    """A request on a fresh connection, or the name of the error when the port does not accept one."""
    try:
        client = Client(port)
    except OSError as error:
        return type(error).__name__
    try:
        return client.status(path, **headers)
    finally:
        client.close()


def listener_stats(envoy: EnvoyProcess) -> dict[str, int]:
    stats = envoy.stats("^listener_manager\\.")
    return {k: stats.get(k, 0) for k in LISTENER_STATS}


def ecds_stat(envoy: EnvoyProcess, name: str, stat: str) -> int:
    key = f"extension_config_discovery.http_filter.{name}.{stat}"
    return envoy.stats(f"^{key}$").get(key, 0)


def live_listener(ads: TinyAds, envoy: EnvoyProcess, port: int, filters: list[dict[str, Any]], **kw: Any) -> None:
    """A first listener without ECDS makes the server LIVE; then `filters`' listener is added as an update."""
    plain = listener(free_port(), [])
    plain.name = "plain"
    ads.put(LISTENER, "plain", plain)
    envoy.wait_ready()
    ads.put(LISTENER, "ecds-listener", listener(port, filters, **kw))


def any_of(message: Any) -> dict[str, Any]:
    packed = any_pb2.Any()
    packed.Pack(message)
    as_dict: dict[str, Any] = json_format.MessageToDict(packed)
    return as_dict


def job_ids(count: int) -> list[str]:
    """Eight-digit and longer ids, spread apart (a step of 7,919) so RE2 shares few prefixes between them."""
    return [str(10_000_000 + i * 7919) for i in range(count)]
