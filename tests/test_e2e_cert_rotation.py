"""Every certificate rotates under continuous traffic, with no restart and not one failed request.

The real Envoy and `controlplane serve`, each certificate in a Secret-volume layout (tests/support/rotation.py)
rotated by swapping `..data`, as the kubelet does: while a thread exchanges ID tokens through the gateway (over
TLS to the exchange) and calls the backend with the credential, the test
1. adds a successor CA to the xDS server's client CA bundle,
2. rotates the gateway's client certificate to one signed by the successor (Envoy re-reads it: file-based SDS),
3. rotates the xDS server certificate and removes the old client CA from the bundle,
4. rotates the exchange's certificate, then adds a successor CA to the exchange's CA bundle (pushed over ADS),
and after 2 and 3 cuts the gateway's xDS connections (a relay in front of the xDS port), so Envoy opens new TLS
connections: they succeed only with the new certificates on both ends (the old client certificate's CA is no
longer trusted after 3). Then: zero failed requests, new connections served the new serials, Envoy's /certs
shows its new client certificate, and the exchange connections moved to the new certificate.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.bootstrap import ClientTls, render_bootstrap, write_sds_files
from tests.support.certs import CertFiles, Pki, make_pki
from tests.support.envoy import EnvoyProcess
from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import LOOPBACK, poll_until
from tests.support.rotation import TcpRelay, issue, peer_serial, secret_volume, serial
from tests.support.stack import PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

NODE = "rotation-envoy"


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api", ["GET"]),
        binding("deployer-reads-reports", ["reports-read"], "{project: 42, ref_protected: true}", extra=TTL_10M),
        gateway(given.listen_port, ["reports-api"]),
    )


@dataclass
class Traffic:
    """Token exchanges and backend calls through the gateway, one after the other, until stopped."""

    stack: Served
    results: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        job = 0
        while not self.stop.is_set():
            job += 1
            exchanged = self.stack.exchange(self.stack.subject(job))
            self._count("exchange", exchanged.status, exchanged.text)
            if exchanged.status == 200:
                credential = exchanged.json()["access_token"]
                self._count("backend", self.stack.call("reports.local", credential), "")

    def _count(self, kind: str, status: int, detail: str) -> None:
        self.results[f"{kind} {status}"] += 1
        if status != 200:
            self.failures.append(f"{kind} {status} {detail[:200]}")

    def total(self) -> int:
        return sum(self.results.values())

    def more(self, count: int) -> None:
        """Until `count` more requests went through (the traffic keeps flowing across a step)."""
        target = self.total() + count
        poll_until(lambda: self.total() >= target, 30, message=f"{count} more requests")


@dataclass
class Files:
    root: Path
    pki: Pki
    successor_ca: CertFiles  # the next client CA (a subject of its own)
    generation: int = 0

    def publish(self, volume: str, files: dict[str, Path | bytes]) -> None:
        self.generation += 1
        secret_volume(self.root / volume, files, self.generation)


def _ca_files(cert: Path) -> CertFiles:
    return CertFiles(cert, cert.with_suffix(".key"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("rotation")
    pki = make_pki(root / "pki")
    made = Files(root, pki, _ca_files(pki.other_ca))
    exchange = issue(_ca_files(pki.ca), root / "issued", "exchange-0", server=True)
    made.publish("xds-tls", {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.ca})
    made.publish("gateway-tls", {"tls.crt": pki.client.cert, "tls.key": pki.client.key, "ca.crt": pki.ca})
    made.publish("exchange-tls", {"tls.crt": exchange.cert, "tls.key": exchange.key, "ca.crt": pki.ca})
    return made


def _gateway_connected(envoy: EnvoyProcess, stack: Served, accepted: int, relay: TcpRelay) -> bool:
    connected = envoy.stats("^control_plane.connected_state$").get("control_plane.connected_state") == 1
    nodes = {p["node"] for p in stack.controlplane.status()["proxies"]}
    return relay.accepted > accepted and connected and NODE in nodes


def _envoy_client_serial(envoy: EnvoyProcess) -> set[int]:
    """The serials of the certificates Envoy presents (admin /certs, in hex)."""
    certs = json.loads(envoy.admin_get("/certs")[1])["certificates"]
    return {int(chain["serial_number"], 16) for context in certs for chain in context.get("cert_chain", [])}


def _reconnect(envoy: EnvoyProcess, stack: Served, relay: TcpRelay) -> int:
    accepted = relay.accepted
    cut = relay.reset()
    poll_until(lambda: _gateway_connected(envoy, stack, accepted, relay), 30, message="Envoy reconnected over TLS")
    return cut


def test_every_certificate_rotates_under_traffic_with_no_failed_request(files: Files) -> None:
    root = files.root
    xds, gw, ex = root / "xds-tls", root / "gateway-tls", root / "exchange-tls"
    serve_args = (
        *("--xds-tls-cert", str(xds / "tls.crt"), "--xds-tls-key", str(xds / "tls.key")),
        *("--xds-client-ca", str(xds / "ca.crt")),
        *("--exchange-tls-cert", str(ex / "tls.crt"), "--exchange-tls-key", str(ex / "tls.key")),
        *("--exchange-tls-ca", str(ex / "ca.crt")),
        *("--jwks-refresh", "1"),
    )
    with (
        serve_stack(_mkdir(root / "stack"), policy, kind=Served, envoy=None, serve_args=serve_args) as stack,
        TcpRelay(stack.controlplane.xds_port) as relay,
    ):
        tls = ClientTls(str(gw / "ca.crt"), str(gw / "tls.crt"), str(gw / "tls.key"), sds_dir=str(root / "sds"))
        write_sds_files(tls)
        bootstrap = render_bootstrap(group="ci-gateway", node_id=NODE, xds_host=LOOPBACK, xds_port=relay.port, tls=tls)
        with EnvoyProcess(bootstrap, name="rotation-envoy") as envoy:
            stack.envoy_process = envoy
            poll_until(lambda: stack.exchange(stack.subject(1)).status == 200, 30, message="exchange through TLS")
            traffic = Traffic(stack)
            runner = threading.Thread(target=traffic.run, name="traffic", daemon=True)
            runner.start()
            try:
                steps = _rotate_everything(files, stack, envoy, relay, traffic)
            finally:
                traffic.stop.set()
                runner.join(30)
    print(f"\ncertificate rotation under traffic: {dict(traffic.results)}; steps: {steps}")
    assert not traffic.failures, traffic.failures[:5]
    assert traffic.results["exchange 200"] >= 50 and traffic.results["backend 200"] >= 50


def _rotate_everything(
    files: Files, stack: Served, envoy: EnvoyProcess, relay: TcpRelay, traffic: Traffic
) -> dict[str, Any]:
    root, pki = files.root, files.pki
    steps: dict[str, Any] = {}
    traffic.more(20)
    assert _envoy_client_serial(envoy) == {serial(pki.client.cert)}

    # 1. The successor CA joins the client CA bundle (the old one stays: gateways not yet rotated keep working).
    both = pki.ca.read_bytes() + files.successor_ca.cert.read_bytes()
    files.publish("xds-tls", {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": both})
    traffic.more(10)

    # 2. The gateway's client certificate, now from the successor CA: Envoy re-reads it from the SDS files.
    client = issue(files.successor_ca, root / "issued", "gateway-client", server=False)
    files.publish("gateway-tls", {"tls.crt": client.cert, "tls.key": client.key, "ca.crt": pki.ca})
    poll_until(
        lambda: _envoy_client_serial(envoy) == {serial(client.cert)}, 20, message="Envoy's /certs: new client cert"
    )
    steps["xds connections cut after the client rotation"] = _reconnect(envoy, stack, relay)
    traffic.more(10)

    # 3. The xDS server certificate, and the old client CA leaves the bundle: the gateway's next connection must
    # present the new client certificate and verify the new server certificate.
    server = issue(_ca_files(pki.ca), root / "issued", "xds-server-1", server=True)
    files.publish("xds-tls", {"tls.crt": server.cert, "tls.key": server.key, "ca.crt": files.successor_ca.cert})
    steps["xds connections cut after the server rotation"] = _reconnect(envoy, stack, relay)
    assert peer_serial(LOOPBACK, stack.controlplane.xds_port, ca=pki.ca, client=client) == serial(server.cert)
    traffic.more(10)

    # 4. The exchange's certificate. Its pooled connections (busy, never idle) close after their next response.
    exchange_cx = _exchange_connections(envoy)
    rotated = issue(_ca_files(pki.ca), root / "issued", "exchange-1", server=True)
    files.publish("exchange-tls", {"tls.crt": rotated.cert, "tls.key": rotated.key, "ca.crt": pki.ca})
    poll_until(
        lambda: (
            peer_serial(LOOPBACK, stack.controlplane.exchange_port, ca=pki.ca, client=None, server_name=LOOPBACK)
            == serial(rotated.cert)
        ),
        10,
        message="the exchange serves its new certificate",
    )
    poll_until(lambda: _exchange_connections(envoy) > exchange_cx, 20, message="Envoy on a new exchange connection")
    traffic.more(20)
    steps["exchange connections opened by Envoy after rotation"] = _exchange_connections(envoy) - exchange_cx

    # 5. The exchange's CA bundle grows (a successor CA announced ahead): pushed to Envoy as its SDS secret.
    pushed = _ca_secret_updates(envoy)
    bundle = pki.ca.read_bytes() + files.successor_ca.cert.read_bytes()
    files.publish("exchange-tls", {"tls.crt": rotated.cert, "tls.key": rotated.key, "ca.crt": bundle})
    poll_until(lambda: _ca_secret_updates(envoy) > pushed, 20, message="the new CA bundle pushed to Envoy")
    traffic.more(20)
    steps["reloads"] = {
        listener: stack.controlplane.metric(
            "controlplane_tls_certificate_reloads_total", listener=listener, result="reloaded"
        )
        for listener in ("xds", "exchange")
    }
    steps["envoy sds updates"] = envoy.stats("^sds\\..*update_success$")
    return steps


def _ca_secret_updates(envoy: EnvoyProcess) -> int:
    name = "sds.controlplane-exchange-ca.update_success"
    return envoy.stats(f"^{name.replace('.', '[.]')}$").get(name, 0)


def _exchange_connections(envoy: EnvoyProcess) -> int:
    name = "cluster.controlplane-exchange.upstream_cx_total"
    return envoy.stats(f"^{name}$").get(name, 0)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
