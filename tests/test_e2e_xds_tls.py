"""mTLS between the real Envoy and `controlplane serve`: the bootstrap's client certificate is the only way in.

An Envoy bootstrapped with `--tls-ca/--tls-cert/--tls-key` gets its config and serves; one that trusts the CA but
has no client certificate keeps retrying and never gets a listener, and the control plane never lists it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from controlplane.audit.store import open_readonly, query_records
from controlplane.cli.bootstrap import ClientTls, render_bootstrap, replica_order
from tests.support.certs import Pki, make_pki
from tests.support.envoy import EnvoyProcess
from tests.support.one_backend import one_backend_policy
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.stack import Served, serve_stack

pytestmark = pytest.mark.e2e


@dataclass
class TlsStack(Served):
    pki: Pki | None = None

    def bootstrap(self, node_id: str, tls: ClientTls | None) -> dict[str, object]:
        return render_bootstrap(
            group="ci-gateway", node_id=node_id, xds_host=LOOPBACK, xds_port=self.controlplane.xds_port, tls=tls
        )

    def get(self, token: str) -> int:
        return self.call("reports.local", token, path="/reports/1")

    def node_ids(self) -> set[str]:
        return {proxy["node"] for proxy in self.controlplane.status()["proxies"]}


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    root = tmp_path_factory.mktemp("xds-tls")
    pki = make_pki(root / "pki")
    tls_args = ("--xds-tls-cert", str(pki.server.cert), "--xds-tls-key", str(pki.server.key))
    with serve_stack(
        root,
        partial(one_backend_policy, cold_port=free_port()),
        kind=TlsStack,
        envoy=None,  # each test starts its own, with or without a client certificate
        serve_args=(*tls_args, "--xds-client-ca", str(pki.ca)),
    ) as built:
        built.pki = pki
        yield built


def _client_tls(pki: Pki, cert: Path, key: Path) -> ClientTls:
    return ClientTls(str(pki.ca), str(cert), str(key))


def test_an_envoy_with_a_client_certificate_gets_its_config_and_serves(tls_stack: TlsStack) -> None:
    tls = _client_tls(tls_stack.pki, tls_stack.pki.client.cert, tls_stack.pki.client.key)
    with EnvoyProcess(tls_stack.bootstrap("tls-envoy-1", tls), name="tls-envoy"):
        token = tls_stack.gitlab.mint(aud="https://reports.local", project_id=42)
        poll_until(lambda: tls_stack.get(token) == 200, 20, message="200 through the mTLS-configured Envoy")
        assert tls_stack.get(tls_stack.gitlab.mint(aud="https://reports.local", project_id=43)) == 403
        assert "tls-envoy-1" in tls_stack.node_ids()
        # Its access log is attested by the same client certificate as its ADS stream, and says so.
        assert tls_stack.get(tls_stack.gitlab.mint(aud="https://reports.local", project_id=42, job_id="91001")) == 200
        (record,) = poll_until(lambda: _audit(tls_stack, "91001"), 20, message="the audit record of job 91001")
        assert (record["node"], record["peer"], record["identity"]) == ("tls-envoy-1", LOOPBACK, "gateway-client")
    assert "mTLS" in tls_stack.controlplane.log_text()


def _audit(tls_stack: TlsStack, job: str) -> list[dict[str, object]]:
    path = tls_stack.controlplane.state_dir / "audit.sqlite3"
    if not path.exists():
        return []
    conn = open_readonly(path)
    try:
        return query_records(conn, job=job)
    finally:
        conn.close()


@pytest.mark.parametrize("who", ["no client certificate", "a certificate from another CA"])
def test_an_envoy_without_a_trusted_client_certificate_never_gets_config(tls_stack: TlsStack, who: str) -> None:
    node_id = f"tls-intruder-{'none' if who.startswith('no') else 'other-ca'}"
    if who.startswith("no"):
        # Trusts the control plane's CA but presents nothing: the bootstrap as it would be without --tls-cert.
        bootstrap = tls_stack.bootstrap(
            node_id, _client_tls(tls_stack.pki, tls_stack.pki.client.cert, tls_stack.pki.client.key)
        )
        common = bootstrap["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]  # type: ignore[index]
        del common["common_tls_context"]["tls_certificates"]
    else:
        bootstrap = tls_stack.bootstrap(
            node_id, _client_tls(tls_stack.pki, tls_stack.pki.stranger.cert, tls_stack.pki.stranger.key)
        )
    with EnvoyProcess(bootstrap, name="tls-intruder", wait_ready=False) as envoy:
        # Two connections to the control plane: the first ended without config and Envoy is retrying.
        envoy.wait_for_stat("cluster.xds_cluster.upstream_cx_total", at_least=2, timeout=20)
        # Not `control_plane.connected_state == 0`: with TLS 1.3 the client finishes its handshake before the
        # server checks the client certificate, so Envoy may count itself connected for an instant before the
        # refusal. What matters is below: no config ever arrives, and the control plane never saw the node.
        assert envoy.ready_state() != "LIVE"
        assert not envoy.config_dump("dynamic_listeners").get("configs")  # no listener, active or warming
        assert envoy.stats("^cluster_manager.cds.update_success$").get("cluster_manager.cds.update_success") == 0
        assert node_id not in tls_stack.node_ids()


def test_with_several_addresses_an_envoy_skips_a_dead_one_and_checks_the_live_ones_certificate(
    tls_stack: TlsStack,
) -> None:
    """Replicas by IP: each is accepted as an IP SAN, and a replica that refuses connections is skipped, whatever
    place the node's order gives it (both orders are tried: node ids that put the dead one first and last)."""
    live = (LOOPBACK, tls_stack.controlplane.xds_port)
    dead = ("127.0.0.2", free_port())  # nothing listens there: refused at once
    tls = _client_tls(tls_stack.pki, tls_stack.pki.client.cert, tls_stack.pki.client.key)
    firsts = {}
    for i in range(40):
        node = f"tls-replicas-{i}"
        firsts.setdefault(replica_order(node, [dead, live])[0], node)
    assert firsts.keys() == {dead, live}
    for node in firsts.values():
        bootstrap = render_bootstrap(
            group="ci-gateway", node_id=node, xds_host=dead[0], xds_port=dead[1], tls=tls, more_xds_addresses=[live]
        )
        with EnvoyProcess(bootstrap, name="tls-replicas"):
            poll_until(lambda n=node: n in tls_stack.node_ids(), 20, message=f"{node} on the live replica")
