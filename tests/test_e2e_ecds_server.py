"""The control plane's own `XdsServer` serves a filter configuration by ECDS to a REAL Envoy 1.40, over SotW and
Delta: a listener whose RBAC filter names its configuration (`config_discovery`) comes by LDS, the configuration
by ECDS from the same snapshot; a snapshot that changes only that configuration changes enforcement on an open
connection (200 → 403) without modifying the listener (docs/envoy-ecds.md §1 observed it with a test server).

The server runs on this test's event loop; everything that blocks (Envoy, HTTP requests) runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import EXTENSION_CONFIG, LISTENER, Snapshot
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import XdsServer
from tests.support.ecds_envoy import (
    LISTENER_STATS,
    RBAC_URL,
    Client,
    ads_envoy,
    ecds_filter,
    ecds_stat,
    listener,
    listener_stats,
    once,
    rbac,
    typed,
)
from tests.support.ports import LOOPBACK, free_port

pytestmark = pytest.mark.e2e

GROUP = "ecds"


def gateway(port: int, denied: list[str]) -> Snapshot:
    """One listener with an RBAC filter by ECDS ("deny-list"), and that filter's configuration denying `denied`."""
    deny_list = typed("deny-list", rbac("DENY", denied))
    return Snapshot.build(
        GROUP,
        {
            LISTENER: [("ecds-listener", listener(port, [ecds_filter("deny-list", RBAC_URL)]))],
            EXTENSION_CONFIG: [("deny-list", deny_list)],
        },
    )


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_a_filter_config_changed_alone_changes_enforcement_not_the_listener(api: str) -> None:
    cache, registry = SnapshotCache(), ProxyRegistry()
    server = XdsServer(cache, registry, log=logging.getLogger("controlplane.xds"))
    port = free_port()
    first = gateway(port, ["1001"])
    cache.set(first)
    envoy = ads_envoy(await server.start(LOOPBACK, 0), api, group=GROUP)
    try:
        with ThreadPoolExecutor(1) as spawner:  # not forked from the main thread: see `envoy_on_ads`
            await asyncio.wrap_future(spawner.submit(envoy.start))
        # The listener is Envoy's first and waits for its filter's configuration: LIVE means ECDS was answered.
        await asyncio.to_thread(envoy.wait_ready, 10)
        await asyncio.to_thread(envoy.wait_for, lambda: once(port, x_job="1002") == 200, 5, "listener up")
        client = await asyncio.to_thread(Client, port)
        assert await asyncio.to_thread(lambda: (client.status(x_job="1001"), client.status(x_job="1002"))) == (403, 200)
        reloads = await asyncio.to_thread(ecds_stat, envoy, "deny-list", "config_reload")
        (proxy,) = registry.status()
        assert proxy["acked"]["ecds"] == first.version(EXTENSION_CONFIG)

        second = gateway(port, ["1001", "1002"])
        assert second.version(LISTENER) == first.version(LISTENER)  # only the filter's configuration changed
        cache.set(second)
        await asyncio.to_thread(
            envoy.wait_for, lambda: client.status(x_job="1002") == 403, 5, "the new deny list", interval=0.001
        )

        assert await asyncio.to_thread(client.status, x_job="1003") == 200  # the same connection (Client checks)
        assert await asyncio.to_thread(listener_stats, envoy) == dict.fromkeys(LISTENER_STATS, 0)
        assert await asyncio.to_thread(ecds_stat, envoy, "deny-list", "config_reload") == reloads + 1
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == second.version(EXTENSION_CONFIG), 5)
        (proxy,) = registry.status()
        assert proxy["protocol"] == api and proxy["last_nack"] is None
        client.close()
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(1.0)


def _acked_ecds(registry: ProxyRegistry) -> str | None:
    (proxy,) = registry.status()
    acked: str | None = proxy["acked"].get("ecds")
    return acked
