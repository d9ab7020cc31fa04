"""mTLS on the xDS port: the flags, the fail-closed rule for secrets, and the handshake over a real channel.

The PKI is generated per module (tests/support/certs.py). The Envoy side is in test_e2e_xds_tls.py.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import yaml
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.cli.main import main
from controlplane.cli.options import ServeOptions
from controlplane.cli.serve import serve
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import LISTENER
from controlplane.xds import tls as tls_module
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import SERVICE, XdsServer
from controlplane.xds.tls import (
    InsecureTransport,
    ServerTls,
    XdsTransportError,
    check_transport,
    pushes_secrets,
    server_tls_from_flags,
)
from tests.support.ads import ads_method, first_request
from tests.support.certs import CertFiles, Pki, make_pki

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: Pki) -> ServerTls:
    return ServerTls(pki.server.cert, pki.server.key, pki.ca)


# -------------------------------------------------------------------------------------------- the rules


def test_the_three_tls_flags_go_together(tmp_path: Path) -> None:
    assert server_tls_from_flags(None, None, None) is None
    cert, key, ca = tmp_path / "c", tmp_path / "k", tmp_path / "ca"
    assert server_tls_from_flags(cert, key, ca) == ServerTls(cert, key, ca, require_client_cert=True)
    with pytest.raises(ValueError, match=r"missing --xds-client-ca$"):
        server_tls_from_flags(cert, key, None)
    with pytest.raises(ValueError, match="missing --xds-tls-key, --xds-client-ca"):
        server_tls_from_flags(cert, None, None)


def test_serve_rejects_incomplete_or_contradictory_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--policy", str(tmp_path), "--xds-tls-cert", "c.pem"]) == 2
    assert "missing --xds-tls-key, --xds-client-ca" in capsys.readouterr().err
    flags = ["--xds-tls-cert", "c", "--xds-tls-key", "k", "--xds-client-ca", "ca", "--xds-insecure"]
    assert main(["serve", "--policy", str(tmp_path), *flags]) == 2
    assert "--xds-insecure contradicts" in capsys.readouterr().err


def test_secrets_are_never_served_over_plain_text_unless_explicitly_allowed(pki: Pki) -> None:
    plain = [SimpleNamespace(name="a"), SimpleNamespace(name="b", inject=None)]
    injecting = [*plain, SimpleNamespace(name="c", inject=object())]
    assert not pushes_secrets(plain) and pushes_secrets(injecting)
    with pytest.raises(InsecureTransport, match=r"--xds-tls-cert FILE .* or pass --xds-insecure"):
        check_transport(tls=None, insecure=False, secrets=True)
    check_transport(tls=None, insecure=True, secrets=True)
    check_transport(tls=server_tls(pki), insecure=False, secrets=True)
    check_transport(tls=None, insecure=False, secrets=False)


def _options(tmp_path: Path, **overrides: object) -> ServeOptions:
    base = ServeOptions(
        policy=ROOT / "examples" / "quickstart",
        xds_host=LOOPBACK,
        xds_port=0,
        admin_host=LOOPBACK,
        admin_port=0,
        jwks_startup_wait=0.0,
        gitlab_startup_wait=0.0,
        state_dir=tmp_path,
    )
    return ServeOptions(**{**base.__dict__, **overrides})


async def test_serve_refuses_to_start_when_secrets_would_go_over_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The policy's detection is `pushes_secrets` (tested above); here: serve consults it before binding."""
    monkeypatch.setattr(tls_module, "pushes_secrets", lambda backends: True)
    started: list[object] = []
    monkeypatch.setattr(XdsServer, "start", lambda *args, **kwargs: started.append(args))
    with caplog.at_level(logging.CRITICAL, logger="controlplane"):
        assert await serve(_options(tmp_path)) == 2
    assert not started  # the xDS port was never opened
    assert "refusing to start" in caplog.text and "--xds-insecure" in caplog.text


@pytest.mark.parametrize("case", ["aws-s3", "aws-binding-roles", "gcp-storage"])
async def test_serve_refuses_cloud_credentials_over_plain_text(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16: AWS signing keys (ECDS and routes) and Google tokens (SDS) go over mTLS xDS only; the real
    detection on the shipped examples, unpatched."""
    started: list[object] = []
    monkeypatch.setattr(XdsServer, "start", lambda *args, **kwargs: started.append(args))
    options = _options(tmp_path, policy=ROOT / "examples" / case)
    with caplog.at_level(logging.CRITICAL, logger="controlplane"):
        assert await serve(options) == 2
    assert not started
    assert "refusing to start" in caplog.text and "`aws:` or `gcp:`" in caplog.text


def test_unreadable_or_non_pem_files_are_named_and_never_echoed(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(XdsTransportError, match=r"xDS TLS: cannot read .*missing\.key"):
        ServerTls(pki.server.cert, tmp_path / "missing.key", pki.ca).credentials()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not-a-pem-but-private-material")
    with pytest.raises(XdsTransportError, match=r"garbage\.key holds no PEM block") as raised:
        ServerTls(pki.server.cert, garbage, pki.ca).credentials()
    assert "private-material" not in str(raised.value)


# -------------------------------------------------------------------------------------------- handshakes


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[int]:
    server = XdsServer(SnapshotCache(), ProxyRegistry(), log=logging.getLogger("test.xds.tls"))
    port = await server.start(LOOPBACK, 0, tls=server_tls(pki))
    try:
        yield port
    finally:
        await server.stop(1.0)


async def _first_response(
    port: int, pki: Pki, client: CertFiles | None, *, ca: Path | None = None
) -> discovery_pb2.DiscoveryResponse:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        call = ads_method(channel)()
        await call.write(first_request(LISTENER, "tls-test"))
        response: discovery_pb2.DiscoveryResponse = await call.read()
        call.cancel()
        return response


async def test_a_client_with_a_certificate_from_the_ca_gets_config(tls_server: int, pki: Pki) -> None:
    response = await _first_response(tls_server, pki, pki.client)
    assert response.type_url == LISTENER


@pytest.mark.parametrize("who", ["no client certificate", "a certificate from another CA"])
async def test_a_client_without_a_trusted_certificate_is_refused(tls_server: int, pki: Pki, who: str) -> None:
    client = None if who == "no client certificate" else pki.stranger
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _first_response(tls_server, pki, client)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plain_text_client_is_refused(tls_server: int) -> None:
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{tls_server}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/StreamAggregatedResources")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"", timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# -------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_with_tls_flags_speaks_mtls_and_verifies_the_server_name(capsys: pytest.CaptureFixture[str]) -> None:
    files = ["--tls-ca", "/etc/cp/ca.crt", "--tls-cert", "/etc/cp/gw.crt", "--tls-key", "/etc/cp/gw.key"]
    assert main(["bootstrap", "--group", "g", "--xds-address", "cp.internal:18000", *files]) == 0
    cluster = yaml.safe_load(capsys.readouterr().out)["static_resources"]["clusters"][0]
    context = cluster["transport_socket"]["typed_config"]
    assert cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    assert context["sni"] == "cp.internal"
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    assert common["tls_certificates"] == [
        {"certificate_chain": {"filename": "/etc/cp/gw.crt"}, "private_key": {"filename": "/etc/cp/gw.key"}}
    ]
    validation = common["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/cp/ca.crt"}
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "cp.internal"}}]


def test_bootstrap_tls_flags_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bootstrap", "--group", "g", "--tls-ca", "ca.crt"]) == 2
    assert main(["bootstrap", "--group", "g", "--tls-sni", "cp"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["bootstrap", "--group", "g"]) == 0
    assert "transport_socket" not in capsys.readouterr().out


def test_a_reload_that_would_push_secrets_over_plain_text_is_rejected_and_the_old_policy_stays(
    tmp_path: Path,
) -> None:
    """Not published even once: the vetting hook refuses it before anything is compiled."""
    from controlplane.runtime.policy_service import PolicyService
    from controlplane.xds.tls import TransportPolicy

    policy_dir = tmp_path / "policy"
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "quickstart", policy_dir)
    plain_text = TransportPolicy(host=LOOPBACK, tls=None, insecure=False)
    service = PolicyService(policy_dir, SnapshotCache(), clock=lambda: 1.0, accept=plain_text.accept)
    assert service.reload()
    good = dict(service.state.versions)
    backends = policy_dir / "backends.yaml"
    backends.write_text(
        backends.read_text().replace("public_paths:", "inject: {secret_env: SOME_SECRET}\npublic_paths:")
    )
    assert not service.reload()
    assert service.state.versions == good and any("inject" in e for e in service.state.errors)
