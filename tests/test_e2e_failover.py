"""Replicas serve identical versions, and a real Envoy fails over between them by itself with nothing re-sent.

Three `controlplane serve` processes read the same policy directory, each with a state directory of its own
(`--store file`: no shared state is needed for this, only identical inputs, so that policy has no token exchange,
whose signing keys would be per replica). One Envoy is bootstrapped with all three xDS addresses (`controlplane
bootstrap --xds-address A,B,C`). The replica it streams from is killed with SIGKILL while a thread sends
requests through the Envoy without pause: no request may fail, the Envoy must appear on another replica, and
nothing may be re-applied (Envoy's own counters) or re-sent (the survivor's push counter). Both protocols: SotW
resumes by the version each type's first request carries, Delta by the per-resource versions of
`initial_resource_versions` (controlplane/xds/protocol.py rule 4, delta.py). The same kill again with
`--store postgres` and exchanged credentials: signing keys and the deny list are then shared, so the
credentials' configuration is identical on every replica too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.bootstrap import render_bootstrap
from tests.support.controlplane import ControlPlaneProcess
from tests.support.envoy import EnvoyProcess
from tests.support.one_backend import one_backend_policy
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.replicas import exchanged_reports, replicated
from tests.support.stack import OutsideWorld, Protocol, outside_world

pytestmark = pytest.mark.e2e

REPLICAS = 3
NODE = "replicated-envoy"
# Envoy's counters that move when it applies a resource again, identical or not (checked on Envoy 1.40).
REAPPLIED = (
    "cluster_manager.cluster_modified",
    "cluster_manager.cluster_added",
    "listener_manager.listener_modified",
    "listener_manager.listener_added",
    "cluster_manager.cds.update_success",
    "listener_manager.lds.update_success",
)


@pytest.fixture(scope="module", params=["sotw", "delta"])
def protocol(request: pytest.FixtureRequest) -> Protocol:
    value: Protocol = request.param
    return value


@dataclass
class Fleet:
    world: OutsideWorld
    replicas: list[ControlPlaneProcess]
    token: str
    stack: ExitStack = field(default_factory=ExitStack)

    def live(self) -> list[ControlPlaneProcess]:
        return [replica for replica in self.replicas if replica.running]

    def holder(self, node: str = NODE) -> ControlPlaneProcess | None:
        """The live replica that lists `node` among its proxies (at most one: an Envoy has one ADS stream)."""
        holding = [r for r in self.live() if any(p["node"] == node for p in r.status()["proxies"])]
        assert len(holding) <= 1, [r.admin_url for r in holding]
        return holding[0] if holding else None

    def envoy(self, protocol: Protocol, replicas: list[ControlPlaneProcess], node: str = NODE) -> EnvoyProcess:
        (host, port), *more = [(LOOPBACK, replica.xds_port) for replica in replicas]
        bootstrap = render_bootstrap(
            group="ci-gateway", node_id=node, xds_host=host, xds_port=port, api=protocol, more_xds_addresses=more
        )
        return self.stack.enter_context(EnvoyProcess(bootstrap, name=node))

    def get(self) -> int:
        return self.world.call("reports.local", self.token, path="/reports/1")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutsideWorld]:
    root = tmp_path_factory.mktemp("replicas")
    with outside_world(root, partial(one_backend_policy, cold_port=free_port()), backends=("reports",)) as built:
        yield built


@pytest.fixture
def fleet(world: OutsideWorld) -> Iterator[Fleet]:
    """Replicas and Envoys of one test (a test kills what it started), stopped when it ends."""
    fleet = Fleet(world, [], world.gitlab.mint(aud="https://reports.local", project_id=42, ttl=3600))
    with fleet.stack:
        yield fleet


def _start_replicas(fleet: Fleet, root: Path) -> list[ControlPlaneProcess]:
    started = [
        fleet.stack.enter_context(
            ControlPlaneProcess(fleet.world.policy, extra_args=("--no-exchange",), log_path=root / f"replica-{i}.log")
        )
        for i in range(REPLICAS)
    ]
    fleet.replicas = started
    return started


def _dynamic(dump: dict[str, Any]) -> dict[str, Any]:
    """What Envoy received over xDS, without the times it applied it (those differ between two Envoys) and
    without its bootstrap's static parts (the xds_cluster names the replica it was pointed at); filter
    configurations sorted by name."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "last_updated"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    kept = [{k: v for k, v in c.items() if not k.startswith("static")} for c in dump["configs"]]
    for config in kept:  # Envoy lists filter configurations (ECDS) in no fixed order: compare them by name
        if "ecds_filters" in config:
            config["ecds_filters"] = sorted(config["ecds_filters"], key=lambda f: f["ecds_filter"]["name"])
    return {"configs": strip([c for c in kept if not c["@type"].endswith("BootstrapConfigDump")])}


def test_replicas_on_the_same_inputs_serve_byte_identical_versions(
    fleet: Fleet, protocol: Protocol, tmp_path: Path
) -> None:
    """Same policy, own state directories, own ports: the same versions in /status, and two Envoys fed by two
    different replicas hold identical resources (their config_dump, apply times aside)."""
    replicas = _start_replicas(fleet, tmp_path)
    versions = [r.status()["policy"]["snapshot_versions"] for r in replicas]
    assert versions[0] and versions.count(versions[0]) == REPLICAS, versions
    first = fleet.envoy(protocol, replicas[:1], node="envoy-on-first")
    last = fleet.envoy(protocol, replicas[-1:], node="envoy-on-last")
    for envoy in (first, last):
        poll_until(lambda e=envoy: e.ready_state() == "LIVE", 20, message="Envoy LIVE")
    assert _dynamic(first.config_dump()) == _dynamic(last.config_dump())
    for envoy in (first, last):
        envoy.stop()


def test_killing_the_replica_an_envoy_streams_from_moves_it_to_another_with_nothing_resent(
    fleet: Fleet, protocol: Protocol, tmp_path: Path
) -> None:
    _start_replicas(fleet, tmp_path)
    _kill_under_traffic(fleet, protocol).stop()


credentials_policy = exchanged_reports  # the token exchange on: keys shared through PostgreSQL


def test_with_shared_state_and_credentials_nothing_is_resent_either(
    protocol: Protocol, tmp_path: Path, pg_dsn: str
) -> None:
    """The same kill with `--store postgres` and the token exchange on: the signing keys and the deny list come
    from PostgreSQL, so the three replicas compile byte-identical credentials configuration (jwt_authn with the
    shared JWKS) and the Envoy, holding a credential exchanged at one replica, moves with nothing re-sent."""
    public = ("--exchange-public-address", f"{LOOPBACK}:{free_port()}")  # one route to the exchange, as a fleet has
    with replicated(tmp_path, credentials_policy, pg_dsn, serve_args=public) as shared:
        statuses = [replica.status() for replica in shared]
        versions = [s["policy"]["snapshot_versions"] for s in statuses]
        kids = [s["credentials"]["published_kids"] for s in statuses]
        assert versions[0] and versions.count(versions[0]) == REPLICAS, versions
        assert kids[0] and kids.count(kids[0]) == REPLICAS, kids
        answer = shared[1].exchange(shared.subject(801))
        assert answer.status == 200, answer.text
        fleet = Fleet(shared.world, [replica.controlplane for replica in shared], str(answer.json()["access_token"]))
        with fleet.stack:
            envoy = _kill_under_traffic(fleet, protocol, "postgres store, credentials")
            survivors = [replica for replica in shared if replica.controlplane.running]
            later = [replica.exchange(shared.subject(810 + replica.index)) for replica in survivors]
            assert [a.status for a in later] == [200] * len(survivors), [a.text for a in later]
            for credential in (str(a.json()["access_token"]) for a in later):  # signed by the survivors, as before
                assert fleet.world.call("reports.local", credential, path="/reports/1") == 200
            envoy.stop()


def _kill_under_traffic(fleet: Fleet, protocol: Protocol, label: str = "file store") -> EnvoyProcess:
    """SIGKILL the replica the Envoy streams from while a thread sends requests through it without pause: none
    fails, the Envoy moves to another replica, and nothing is re-applied or re-sent."""
    replicas = fleet.replicas
    envoy = fleet.envoy(protocol, replicas)
    poll_until(lambda: fleet.get() == 200, 20, message="200 through the Envoy")
    connected = poll_until(fleet.holder, 10, message="the Envoy on one replica")
    before_stats = envoy.stats()
    assert _refused(replicas) == [0, 0, 0]  # its access log goes to the same replica as its ADS stream
    before_dump = envoy.config_dump()
    before_pushes = {r.admin_url: _pushes(r) for r in replicas if r is not connected}

    failures: list[int | str] = []
    sent = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                status = fleet.get()
            except OSError as error:  # a refused or reset connection is a failed request too
                failures.append(repr(error))
            else:
                if status != 200:
                    failures.append(status)
            sent += 1

    sender = threading.Thread(target=traffic, name="steady-traffic")
    sender.start()
    try:
        poll_until(lambda: sent >= 20, 10, message="traffic flowing")
        killed_at = time.monotonic()
        connected.kill()
        survivor = poll_until(fleet.holder, 30, interval=0.005, message="the Envoy on another replica")
        reconnect = time.monotonic() - killed_at
        # Let the resumed stream settle: anything a survivor would (wrongly) send arrives within milliseconds.
        settled_at = sent
        poll_until(lambda: sent >= settled_at + 50, 20, message="traffic after the failover")
    finally:
        stop.set()
        sender.join(10)
    after_stats = envoy.stats()
    print(
        f"\n[{protocol}, {label}] reconnect {reconnect * 1000:.0f} ms after SIGKILL; "
        f"{sent} requests, {len(failures)} failed"
    )
    assert failures == [], failures[:10]
    assert survivor is not connected
    changed = {name: (before_stats.get(name), after_stats.get(name)) for name in REAPPLIED}
    assert all(old == new for old, new in changed.values()), changed
    assert _dynamic(envoy.config_dump()) == _dynamic(before_dump)
    assert envoy.config_dump() == before_dump  # not even re-applied at the same version (last_updated)
    assert _pushes(survivor) == before_pushes[survivor.admin_url] == {}, _pushes(survivor)
    # The access log followed the ADS stream to the survivor; the third replica saw neither. An access-log stream
    # that came back before the ADS stream, its first message holding what Envoy buffered meanwhile, waits for it
    # (audit/als.py MAX_AWAITED_BYTES) instead of being refused with its records.
    third = [replica for replica in fleet.live() if replica is not survivor]
    assert _refused(third) == [0]
    assert _refused([survivor]) == [0]
    proxy = next(p for p in survivor.status()["proxies"] if p["node"] == NODE)
    assert proxy["protocol"] == protocol
    return envoy


def _refused(replicas: list[ControlPlaneProcess]) -> list[float]:
    return [r.metric("controlplane_audit_streams_refused_total", reason="no_xds_stream") for r in replicas]


def _pushes(replica: ControlPlaneProcess) -> dict[str, float]:
    """DiscoveryResponses the replica sent, by type (only those it sent any of)."""
    sent = {}
    for line in replica.metrics().splitlines():
        if line.startswith("controlplane_xds_pushes_total{"):
            series, _, value = line.rpartition(" ")
            if float(value):
                sent[series.split('type="')[1].split('"')[0]] = float(value)
    return sent
