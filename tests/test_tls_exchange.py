"""TLS on the gateway -> exchange hop, and the bootstrap that lets Envoy re-read its client certificate.

Compiler: with `CredentialInputs.exchange_tls` the exchange cluster verifies the exchange's certificate (name
and CA), the CA bundle travels as an SDS secret over ADS, and without it the output is exactly as before. The
exchange listener: HTTPS whose certificate rotates, and a connection set up with the replaced certificate is
closed after its next response. The bootstrap with `--tls-sds-dir`: file-based SDS secrets the real Envoy
accepts. That the real Envoy accepts the exchange cluster with TLS and its secret over ADS, and uses them, is
tests/test_e2e_cert_rotation.py (`envoy --mode validate` crashes on a static bootstrap naming an ADS secret).
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2

from controlplane.cli.bootstrap import CLIENT_CERT_SECRET, TRUSTED_CA_SECRET, ClientTls, render_bootstrap
from controlplane.cli.main import main
from controlplane.compiler.compile import compile_policy
from controlplane.credentials.http import ExchangeEndpoint, ExchangeListenerTls
from controlplane.model.credentials import CredentialInputs, ExchangeTls
from controlplane.model.loader import parse_policy
from controlplane.snapshots.snapshot import CLUSTER, SECRET
from tests.support.certs import CertFiles, Pki, make_pki
from tests.support.envoy import validate_config
from tests.support.ports import LOOPBACK
from tests.support.rotation import issue, peer_serial, secret_volume, serial

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def compiled(credentials: CredentialInputs) -> dict[str, dict[str, bytes]]:
    policy = parse_policy({p.name: p.read_text() for p in QUICKSTART.glob("*.yaml")})
    ((_, group),) = compile_policy(policy, credentials=credentials).items()
    return {kind: dict(resources) for kind, resources in group.resources.items()}


def test_with_exchange_tls_the_cluster_verifies_name_and_ca_pushed_as_a_secret() -> None:
    tls = ExchangeTls(server_name="exchange.cp.internal", ca_pem=CA_PEM)
    out = compiled(CredentialInputs(exchange_address=("10.0.0.7", 9904), exchange_tls=tls))
    from envoy.config.cluster.v3 import cluster_pb2

    cluster = cluster_pb2.Cluster.FromString(out[CLUSTER]["controlplane-exchange"])
    context = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(context)
    assert context.sni == "exchange.cp.internal"
    combined = context.common_tls_context.combined_validation_context
    (san,) = combined.default_validation_context.match_typed_subject_alt_names
    assert san.matcher.exact == "exchange.cp.internal"
    assert combined.validation_context_sds_secret_config.name == "controlplane-exchange-ca"
    assert combined.validation_context_sds_secret_config.sds_config.HasField("ads")
    secret = secret_pb2.Secret.FromString(out[SECRET]["controlplane-exchange-ca"])
    assert secret.validation_context.trusted_ca.inline_string == CA_PEM


def test_a_new_ca_bundle_changes_the_secret_only_and_no_tls_changes_nothing() -> None:
    address = ("10.0.0.7", 9904)
    first = compiled(CredentialInputs(exchange_address=address, exchange_tls=ExchangeTls("10.0.0.7", CA_PEM)))
    second = compiled(CredentialInputs(exchange_address=address, exchange_tls=ExchangeTls("10.0.0.7", CA_PEM * 2)))
    assert first[CLUSTER] == second[CLUSTER]  # the cluster names the secret: no cluster rebuild on a new bundle
    assert first[SECRET] != second[SECRET]
    plain = compiled(CredentialInputs(exchange_address=address))
    assert "controlplane-exchange-ca" not in plain.get(SECRET, {})
    from envoy.config.cluster.v3 import cluster_pb2

    assert not cluster_pb2.Cluster.FromString(plain[CLUSTER]["controlplane-exchange"]).HasField("transport_socket")


# -------------------------------------------------------------------------------------------- the listener


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def https_exchange(tmp_path: Path, pki: Pki) -> AsyncIterator[tuple[int, Path]]:
    volume = tmp_path / "exchange-tls"
    secret_volume(volume, {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.ca}, 0)
    tls = ExchangeListenerTls(volume / "tls.crt", volume / "tls.key", volume / "ca.crt", LOOPBACK)
    endpoint = ExchangeEndpoint(None, tls=tls)  # type: ignore[arg-type]  # no exchange: only bad forms are sent
    port = await endpoint.start(LOOPBACK, 0)
    try:
        yield port, volume
    finally:
        await endpoint.stop()


def _bad_form(connection: http.client.HTTPSConnection) -> tuple[int, str | None]:
    connection.request("POST", "/.controlplane/token?x=1", body=b"", headers={"Content-Type": "text/plain"})
    response = connection.getresponse()
    response.read()
    return response.status, response.getheader("Connection")


async def test_the_exchange_certificate_rotates_and_old_connections_close_after_one_response(
    https_exchange: tuple[int, Path], pki: Pki, tmp_path: Path
) -> None:
    port, volume = https_exchange
    import asyncio

    context = ssl.create_default_context(cafile=str(pki.ca))
    connection = http.client.HTTPSConnection(LOOPBACK, port, context=context, timeout=5)
    assert await asyncio.to_thread(_bad_form, connection) == (400, None)  # kept alive
    new = issue(CertFiles(pki.ca, pki.ca.with_suffix(".key")), tmp_path / "new", "exchange", server=True)
    secret_volume(volume, {"tls.crt": new.cert, "tls.key": new.key, "ca.crt": pki.ca}, 1)
    fresh = await asyncio.to_thread(peer_serial, LOOPBACK, port, ca=pki.ca, client=None, server_name=LOOPBACK)
    assert fresh == serial(new.cert)
    # The connection opened before the rotation: answered, then closed.
    assert await asyncio.to_thread(_bad_form, connection) == (400, "close")
    connection.close()


# -------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_with_an_sds_dir_writes_the_secrets_and_the_real_envoy_accepts_it(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    sds = tmp_path / "sds"
    flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(["bootstrap", "--group", "g", "--xds-address", "127.0.0.1:18000", *flags, "--tls-sds-dir", str(sds)])
            == 0
        )
    bootstrap = yaml.safe_load(out.getvalue())
    common = bootstrap["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert "tls_certificates" not in common and "validation_context" not in common  # nothing inline
    (certificate,) = common["tls_certificate_sds_secret_configs"]
    assert certificate["sds_config"]["path_config_source"]["path"] == str(sds / f"{CLIENT_CERT_SECRET}.json")
    combined = common["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "127.0.0.1"
    }
    written = json.loads((sds / f"{CLIENT_CERT_SECRET}.json").read_text())["resources"][0]
    assert written["tls_certificate"]["watched_directory"] == {"path": str(pki.client.cert.parent)}
    ca = json.loads((sds / f"{TRUSTED_CA_SECRET}.json").read_text())["resources"][0]
    assert ca["validation_context"]["trusted_ca"] == {"filename": str(pki.ca)}
    ok, output = validate_config(bootstrap)
    assert ok, output[-3000:]
    assert "PRIVATE KEY" not in out.getvalue()


def test_without_an_sds_dir_the_bootstrap_is_as_before() -> None:
    tls = ClientTls("/etc/cp/ca.crt", "/etc/cp/gw.crt", "/etc/cp/gw.key")
    bootstrap = render_bootstrap(group="g", node_id="n", xds_host="127.0.0.1", xds_port=18000, tls=tls)
    common = bootstrap["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert "tls_certificate_sds_secret_configs" not in common and "tls_certificates" in common
