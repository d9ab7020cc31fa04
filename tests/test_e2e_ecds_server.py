"""The control plane's own `XdsServer` serves a filter configuration by ECDS to a REAL Envoy 1.40, over SotW and
Delta: a listener whose RBAC filter names its configuration (`config_discovery`) comes by LDS, the configuration
by ECDS from the same snapshot; a snapshot that changes only that configuration changes enforcement on an open
connection (200 → 403) without modifying the listener (docs/envoy-ecds.md §1 observed it with a test server).

The server runs on this test's event loop; everything that blocks (Envoy, HTTP requests) runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from controlplane.compiler.names import REVOKED_RECENTLY_FILTER, revocation_bucket_filter
from controlplane.snapshots.snapshot import EXTENSION_CONFIG, LISTENER, Snapshot
from controlplane.telemetry import metrics
from controlplane.xds.fleet_status import ProxyRegistry
from tests.support.ecds_envoy import (
    LISTENER_STATS,
    RBAC_URL,
    Client,
    ecds_filter,
    ecds_stat,
    job_ids,
    listener,
    listener_stats,
    once,
    rbac,
    served_envoy,
    typed,
)
from tests.support.ports import free_port

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
    port = free_port()
    first = gateway(port, ["1001"])
    async with served_envoy(first, api, group=GROUP) as served:
        cache, registry, envoy = served.cache, served.registry, served.envoy
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


def _acked_ecds(registry: ProxyRegistry) -> str | None:
    """The ECDS version the proxy ACKed (None before it connected: a restarted server's registry starts empty)."""
    proxies = registry.status()
    if not proxies:
        return None
    (proxy,) = proxies
    acked: str | None = proxy["acked"].get("ecds")
    return acked


def buckets(port: int, a: list[str], b: list[str], unused: list[str] | None = None) -> Snapshot:
    """One listener with two RBAC filters by ECDS, "bucket-a" then "bucket-b", each denying its own jobs; with
    `unused`, a third configuration that no filter names (so Envoy never asks for it)."""
    configs = {"bucket-a": rbac("DENY", a, stat_prefix="a_"), "bucket-b": rbac("DENY", b, stat_prefix="b_")}
    filters = [ecds_filter(name, RBAC_URL) for name in configs]
    if unused is not None:
        configs["unused"] = rbac("DENY", unused)
    return Snapshot.build(
        GROUP,
        {
            LISTENER: [("ecds-listener", listener(port, filters))],
            EXTENSION_CONFIG: [(name, typed(name, config)) for name, config in configs.items()],
        },
    )


def pushed_ecds() -> tuple[float, float, float]:
    """ECDS responses, resources and bytes the server has written so far (this process's metrics)."""
    return tuple(  # type: ignore[return-value]
        metrics.REGISTRY.get_sample_value(f"controlplane_xds_{name}_total", {"type": "ecds"}) or 0.0
        for name in ("pushes", "pushed_resources", "pushed_bytes")
    )


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_a_change_to_one_of_two_filter_configs_sends_only_that_one(api: str) -> None:
    """SotW too sends only the changed filter configuration once the last one is ACKed (docs/envoy-ecds.md §7):
    Envoy keeps the one left out in force (its `config_reload` does not move) and enforces both, no NACK."""
    port = free_port()
    first = buckets(port, ["1001"], ["2001"])
    async with served_envoy(first, api, group=GROUP) as served:
        cache, registry, envoy = served.cache, served.registry, served.envoy
        await asyncio.to_thread(envoy.wait_for, lambda: once(port, x_job="3001") == 200, 5, "listener up")
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == first.version(EXTENSION_CONFIG), 5)
        client = await asyncio.to_thread(Client, port)

        def statuses(*jobs: str) -> list[int]:
            return [client.status(x_job=job) for job in jobs]

        assert await asyncio.to_thread(statuses, "1001", "2001", "2002", "3001") == [403, 403, 200, 200]
        full = len(first.types[EXTENSION_CONFIG].all_entries)  # both configurations' bytes
        for changed, (a, b), denied, enforced in (
            ("bucket-b", (["1001"], ["2001", "2002"]), "2002", [403, 200, 403, 403, 200]),
            ("bucket-a", (["1001", "1002"], ["2001", "2002"]), "1002", [403, 403, 403, 403, 200]),
        ):
            unchanged = "bucket-a" if changed == "bucket-b" else "bucket-b"
            reloads = {n: await asyncio.to_thread(ecds_stat, envoy, n, "config_reload") for n in (changed, unchanged)}
            before = pushed_ecds()
            snapshot = buckets(port, a, b)
            assert snapshot.version(LISTENER) == first.version(LISTENER)
            version = snapshot.version(EXTENSION_CONFIG)
            cache.set(snapshot)
            await asyncio.to_thread(envoy.wait_for, lambda job=denied: client.status(x_job=job) == 403, 5, changed)
            await asyncio.to_thread(envoy.wait_for, lambda v=version: _acked_ecds(registry) == v, 5, "ACKed")
            responses, resources, sent = (now - was for now, was in zip(pushed_ecds(), before, strict=True))
            assert (responses, resources) == (1, 1), (changed, responses, resources)
            assert sent < full, (sent, full)  # one configuration's bytes, not both
            assert await asyncio.to_thread(ecds_stat, envoy, unchanged, "config_reload") == reloads[unchanged]
            assert await asyncio.to_thread(ecds_stat, envoy, changed, "config_reload") == reloads[changed] + 1
            assert await asyncio.to_thread(statuses, "1001", "1002", "2001", "2002", "3001") == enforced  # both apply
        # A change to a configuration no filter names: over SotW an empty response at the new version, ACKed,
        # and nothing moves in Envoy; over Delta nothing at all (it subscribes by name).
        reloads = {n: await asyncio.to_thread(ecds_stat, envoy, n, "config_reload") for n in ("bucket-a", "bucket-b")}
        before = pushed_ecds()
        elsewhere = buckets(port, ["1001", "1002"], ["2001", "2002"], unused=["9"])
        cache.set(elsewhere)
        if api == "sotw":
            version = elsewhere.version(EXTENSION_CONFIG)
            await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == version, 5, "empty ACKed")
            responses, resources, _ = (now - was for now, was in zip(pushed_ecds(), before, strict=True))
            assert (responses, resources) == (1, 0)
        for name, count in reloads.items():
            assert await asyncio.to_thread(ecds_stat, envoy, name, "config_reload") == count
        assert await asyncio.to_thread(statuses, "1001", "1002", "2001", "2002", "3001") == [403, 403, 403, 403, 200]
        assert await asyncio.to_thread(listener_stats, envoy) == dict.fromkeys(LISTENER_STATS, 0)
        (proxy,) = registry.status()
        assert proxy["protocol"] == api and proxy["last_nack"] is None
        client.close()


FILTERS = [f"bucket-{i:02}" for i in range(17)]  # issue 13's listener: jwt_authn and 16 deny-list buckets
IDS_PER_FILTER = 1000  # a 9 KB RE2 alternation: about 10 KB a configuration


def seventeen(port: int, denied: dict[str, list[str]] | None = None) -> tuple[Snapshot, dict[str, list[str]]]:
    """One listener with 17 RBAC filters by ECDS, each denying its own jobs (`denied`, by default 1,000 each); and
    those jobs per filter."""
    if denied is None:
        ids = job_ids(len(FILTERS) * IDS_PER_FILTER)
        denied = {name: ids[i * IDS_PER_FILTER : (i + 1) * IDS_PER_FILTER] for i, name in enumerate(FILTERS)}
    configs = [(name, typed(name, rbac("DENY", jobs, stat_prefix=f"{name}."))) for name, jobs in denied.items()]
    snapshot = Snapshot.build(
        GROUP,
        {
            LISTENER: [("ecds-listener", listener(port, [ecds_filter(name, RBAC_URL) for name in FILTERS]))],
            EXTENSION_CONFIG: configs,
        },
    )
    return snapshot, denied


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_a_listener_of_17_filter_configs_costs_one_copy_of_each_at_connect(api: str) -> None:
    """Envoy asks for a listener's filter configurations one request per filter before it ACKs any (SotW: every
    name so far each time, docs/envoy-ecds.md §8). Each configuration is sent once all the same: the bytes written
    at connect are about one copy of each (not 17 + 16 + ... + 1 over SotW), every filter enforces its own deny
    list, and nothing is NACKed."""
    port = free_port()
    snapshot, denied = seventeen(port)
    one_copy = len(snapshot.types[EXTENSION_CONFIG].all_entries)  # the 17 configurations' framed bytes
    before = pushed_ecds()
    runtime = {"re2.max_program_size.error_level": 1_000_000}  # a 1,000-id alternation (docs/envoy-ecds.md §5)
    async with served_envoy(snapshot, api, runtime=runtime, group=GROUP) as served:
        registry, envoy = served.registry, served.envoy
        version = snapshot.version(EXTENSION_CONFIG)
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == version, 5, "ECDS ACKed")
        responses, resources, sent = (now - was for now, was in zip(pushed_ecds(), before, strict=True))
        logging.getLogger(__name__).warning(
            "%s connect: %d ECDS responses, %d configurations, %d bytes (one copy: %d)",
            api, responses, resources, sent, one_copy,
        )  # fmt: skip
        assert resources == len(FILTERS), (responses, resources, sent)  # each configuration once
        assert one_copy <= sent < one_copy * 1.05, (responses, sent, one_copy)  # plus framing (versions, nonces)
        client = await asyncio.to_thread(Client, port)

        def statuses() -> list[int]:
            return [client.status(x_job=jobs[len(jobs) // 2]) for jobs in denied.values()] + [client.status(x_job="7")]

        assert await asyncio.to_thread(statuses) == [403] * len(FILTERS) + [200]  # every filter has its own list
        for name in FILTERS:
            assert await asyncio.to_thread(ecds_stat, envoy, name, "update_rejected") == 0, name
            assert await asyncio.to_thread(ecds_stat, envoy, name, "config_reload") == 1, name
        (proxy,) = registry.status()
        assert proxy["protocol"] == api and proxy["last_nack"] is None
        client.close()


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_a_reconnect_to_17_filter_configs_is_sent_none_again(api: str) -> None:
    """Envoy reconnects (a control plane restart) naming all 17 configurations at the version it holds: nothing is
    sent again. Over SotW the server cannot tell which names that version covers (docs/envoy-ecds.md §7), so the
    next change is answered whole once, the ones after it with only what changed; Delta knows each name's version."""
    port = free_port()
    snapshot, denied = seventeen(port)
    version = snapshot.version(EXTENSION_CONFIG)
    runtime = {"re2.max_program_size.error_level": 1_000_000}
    async with served_envoy(snapshot, api, runtime=runtime, group=GROUP) as served:
        cache, registry, envoy = served.cache, served.registry, served.envoy
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == version, 5, "ECDS ACKed")
        before = pushed_ecds()
        await served.restart_server()  # as a restarted control plane: a new registry, the same snapshots
        registry = served.registry
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == version, 15, "Envoy resumed")
        assert pushed_ecds() == before  # nothing of it sent again

        client = await asyncio.to_thread(Client, port)
        whole = len(FILTERS) if api == "sotw" else 1
        for round_, (bucket, expected) in enumerate((("bucket-03", whole), ("bucket-11", 1)), start=1):
            denied[bucket] = [*denied[bucket], f"9{round_}"]
            changed, _ = seventeen(port, denied)
            assert changed.version(LISTENER) == snapshot.version(LISTENER)
            before = pushed_ecds()
            cache.set(changed)
            await asyncio.to_thread(envoy.wait_for, lambda job=f"9{round_}": client.status(x_job=job) == 403, 5)
            new = changed.version(EXTENSION_CONFIG)
            await asyncio.to_thread(envoy.wait_for, lambda v=new: _acked_ecds(registry) == v, 5, "ACKed")
            responses, resources, _ = (now - was for now, was in zip(pushed_ecds(), before, strict=True))
            assert (responses, resources) == (1, expected), (bucket, responses, resources)
        statuses = [client.status(x_job=jobs[0]) for jobs in denied.values()] + [client.status(x_job="7")]
        assert statuses == [403] * len(FILTERS) + [200]
        (proxy,) = registry.status()
        assert proxy["last_nack"] is None
        client.close()


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_a_configuration_refused_in_the_connect_burst_fails_closed(api: str) -> None:
    """The first of 17 configurations is one Envoy refuses (an RE2 program over the default size limit, §5). Envoy
    NACKs the response that carried it only after it sent its 17 requests and the server answered them all, so that
    NACK answers an older response than the last sent; the listener goes active all the same and that filter answers
    500 (no configuration, and no default here, §2), the 16 others are configured once each. The server sees the
    NACK (status, `controlplane_xds_nacks_total`, `controlplane_xds_proxies_rejecting`) and keeps it through Envoy's
    ACK of the last response and of a later change that leaves the refused bytes as they are; it ends when the
    refused configuration is sent with other bytes and Envoy applies it (docs/envoy-ecds.md §8)."""
    port = free_port()
    denied = {name: [f"{i}"] for i, name in enumerate(FILTERS)}
    denied[FILTERS[0]] = job_ids(100)  # program size 493 > 100 (no runtime key here)
    snapshot, _ = seventeen(port, denied)
    nacks, rejecting = _nack_counts()
    async with served_envoy(snapshot, api, group=GROUP) as served:
        cache, registry, envoy = served.cache, served.registry, served.envoy
        assert await asyncio.to_thread(envoy.wait_for, lambda: once(port, x_job="5") == 500, 5, "fail closed")
        assert await asyncio.to_thread(ecds_stat, envoy, FILTERS[0], "update_rejected") == 1
        assert await asyncio.to_thread(ecds_stat, envoy, FILTERS[0], "config_fail") == 1
        for name in FILTERS[1:]:
            assert await asyncio.to_thread(ecds_stat, envoy, name, "update_success") >= 1, name
            assert await asyncio.to_thread(ecds_stat, envoy, name, "config_reload") == 1, name
        # Envoy ACKs the last response, and the server still records the NACK of the first.
        version = snapshot.version(EXTENSION_CONFIG)
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == version, 5, "ECDS ACKed")
        await asyncio.to_thread(envoy.wait_for, lambda: _nack_counts() == (nacks + 1, rejecting + 1), 5, "NACK seen")
        (proxy,) = registry.status()
        assert proxy["last_nack"]["type"] == "ecds" and proxy["last_nack"]["version"] == version, proxy
        assert proxy["last_nack"]["error"], proxy

        # Another configuration changes, the refused one does not: ACKed, and still rejecting (the filter 500s).
        denied[FILTERS[3]] = [*denied[FILTERS[3]], "93"]
        other, _ = seventeen(port, denied)
        cache.set(other)
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == other.version(EXTENSION_CONFIG), 5)
        (proxy,) = registry.status()
        assert proxy["last_nack"] is not None and _nack_counts() == (nacks + 1, rejecting + 1), proxy
        assert await asyncio.to_thread(once, port, x_job="5") == 500

        # The refused configuration is sent with other bytes, Envoy applies it: the NACK ends.
        denied[FILTERS[0]] = ["0"]
        fixed, _ = seventeen(port, denied)
        cache.set(fixed)
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == fixed.version(EXTENSION_CONFIG), 5)
        await asyncio.to_thread(envoy.wait_for, lambda: _nack_counts() == (nacks + 1, rejecting), 5, "NACK ended")
        (proxy,) = registry.status()
        assert proxy["last_nack"] is None, proxy
        assert await asyncio.to_thread(once, port, x_job="99") == 200  # no filter without configuration: no 500
        assert await asyncio.to_thread(once, port, x_job="0") == 403  # the configuration it refused before


def _nack_counts() -> tuple[float, float]:
    """`controlplane_xds_nacks_total` and `controlplane_xds_proxies_rejecting` for ECDS (this process's metrics)."""
    return tuple(  # type: ignore[return-value]
        metrics.REGISTRY.get_sample_value(name, {"type": "ecds"}) or 0.0
        for name in ("controlplane_xds_nacks_total", "controlplane_xds_proxies_rejecting")
    )


def tiers(port: int, bucket: list[str], recent: list[str]) -> Snapshot:
    """The deny list's two tiers as the compiler names them: one bucket, then the recent list (`SENT_LAST`)."""
    configs = {
        revocation_bucket_filter(0): rbac("DENY", bucket, stat_prefix="bucket_"),
        REVOKED_RECENTLY_FILTER: rbac("DENY", recent, stat_prefix="recent_"),
    }
    return Snapshot.build(
        GROUP,
        {
            LISTENER: [("ecds-listener", listener(port, [ecds_filter(name, RBAC_URL) for name in configs]))],
            EXTENSION_CONFIG: [(name, typed(name, config)) for name, config in configs.items()],
        },
    )


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_a_seal_and_its_settle_in_one_snapshot_reach_envoy_as_the_bucket_then_the_recent_list(api: str) -> None:
    """A stream that skipped the seal's snapshot (a slow fan-out pass) is due the bucket gaining job 1006 and the
    recent list losing it at once: the server sends the bucket first (SotW: at the type's version + `+held`), the
    recent list once Envoy ACKed it (docs/envoy-ecds.md §10). Envoy accepts both, and 1006 is denied throughout."""
    port = free_port()
    unsealed = tiers(port, ["9999"], ["1006"])
    async with served_envoy(unsealed, api, group=GROUP) as served:
        cache, registry, envoy = served.cache, served.registry, served.envoy
        version = unsealed.version(EXTENSION_CONFIG)
        await asyncio.to_thread(envoy.wait_for, lambda: once(port, x_job="1007") == 200, 5, "listener up")
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == version, 5, "ECDS ACKed")
        client = await asyncio.to_thread(Client, port)
        assert await asyncio.to_thread(lambda: (client.status(x_job="1006"), client.status(x_job="1007"))) == (403, 200)
        stop = False

        def hammer() -> list[int]:
            seen = []
            while not stop:
                seen.append(client.status(x_job="1006"))
            return seen

        requests = asyncio.create_task(asyncio.to_thread(hammer))
        before = pushed_ecds()
        sealed = tiers(port, ["9999", "1006"], ["2001"])
        cache.set(sealed)
        new = sealed.version(EXTENSION_CONFIG)
        await asyncio.to_thread(envoy.wait_for, lambda: _acked_ecds(registry) == new, 5, "both ACKed")
        stop = True
        statuses = await requests
        assert statuses and set(statuses) == {403}, statuses
        responses, resources, _ = (now - was for now, was in zip(pushed_ecds(), before, strict=True))
        assert (responses, resources) == (2, 2)  # the bucket, then the recent list
        assert await asyncio.to_thread(client.status, x_job="2001") == 403
        for name in (revocation_bucket_filter(0), REVOKED_RECENTLY_FILTER):
            assert await asyncio.to_thread(ecds_stat, envoy, name, "update_rejected") == 0, name
        (proxy,) = registry.status()
        assert proxy["protocol"] == api and proxy["last_nack"] is None
        client.close()
