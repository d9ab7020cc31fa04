"""Attacks on certificate rotation and the TLS listeners: what must not be installed, and what must hold.

The exchange listener: a certificate the gateways would refuse (not for the name they check, not from the CA
bundle they are pushed) is refused at start and kept out on a rotation, so token exchanges never all fail
closed because of one bad file. Both listeners: an expired certificate is never swapped in for a valid one,
and one not valid yet waits for its time. The exchange's TLS handshakes, off the accept loop, still hold the
connection bound: a client that never sends (or half sends) its ClientHello is dropped at the header timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import http.client
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.certfiles import CertificateFileError, CertificateFiles, CertificateSet
from controlplane.cli.bootstrap import CLIENT_CERT_SECRET
from controlplane.credentials.http import ExchangeEndpoint, ExchangeListenerTls
from controlplane.serving import HttpLimits
from tests.support.certs import CertFiles, Pki, make_pki
from tests.support.envoy import EnvoyProcess
from tests.support.ports import LOOPBACK, poll_until
from tests.support.rotation import issue, peer_serial, replace, secret_volume, serial

DAY = datetime.timedelta(days=1)
QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def ca_files(pki: Pki, *, other: bool = False) -> CertFiles:
    cert = pki.other_ca if other else pki.ca
    return CertFiles(cert, cert.with_suffix(".key"))


def leaf(
    ca: CertFiles,
    directory: Path,
    stem: str,
    *,
    names: list[x509.GeneralName] | None = None,
    valid_from: datetime.timedelta = -DAY,
    valid_to: datetime.timedelta = DAY,
) -> CertFiles:
    """A server certificate with the names given (default: 127.0.0.1 and localhost) and a validity relative to
    now, signed by `ca`."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if names is None:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_to)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    files.cert.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def make_ca(directory: Path, stem: str, *, valid_to: datetime.timedelta = DAY) -> CertFiles:
    """A self-signed CA whose validity ends `valid_to` from now (began two days ago)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - 2 * DAY)
        .not_valid_after(now + valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def replace_ca(loaded: CertificateSet, bundle: str) -> CertificateSet:
    return dataclasses.replace(loaded, ca=bundle.encode())


def publish(volume: Path, cert: CertFiles, ca: Path | bytes, generation: int) -> None:
    secret_volume(volume, {"tls.crt": cert.cert, "tls.key": cert.key, "ca.crt": ca}, generation)


def listener_tls(volume: Path, server_name: str = LOOPBACK) -> ExchangeListenerTls:
    return ExchangeListenerTls(volume / "tls.crt", volume / "tls.key", volume / "ca.crt", server_name)


@pytest.fixture
async def exchange(tmp_path: Path, pki: Pki) -> AsyncIterator[tuple[int, Path]]:
    """An HTTPS exchange listener (no exchange behind it) serving the PKI's server certificate, for 127.0.0.1."""
    volume = tmp_path / "exchange-tls"
    publish(volume, pki.server, pki.ca, 0)
    endpoint = ExchangeEndpoint(None, tls=listener_tls(volume))  # type: ignore[arg-type]
    port = await endpoint.start(LOOPBACK, 0)
    try:
        yield port, volume
    finally:
        await endpoint.stop()


async def served_serial(port: int, ca: Path) -> int:
    return await asyncio.to_thread(peer_serial, LOOPBACK, port, ca=ca, client=None, server_name=LOOPBACK)


# ------------------------------------------------------------------- the exchange: what gateways would refuse


@pytest.mark.parametrize(
    ("server_name", "names"),
    [
        ("exchange.cp.internal", [x509.DNSName("other.cp.internal")]),
        ("exchange.cp.internal", []),  # the name in the common name only: Envoy's SAN matcher does not look there
        (LOOPBACK, [x509.DNSName(LOOPBACK)]),  # an address must be an IP SAN
    ],
)
async def test_an_exchange_certificate_without_the_name_gateways_check_stops_start_up(
    tmp_path: Path, pki: Pki, server_name: str, names: list[x509.GeneralName]
) -> None:
    volume = tmp_path / "tls"
    publish(volume, leaf(ca_files(pki), tmp_path / "c", server_name, names=names), pki.ca, 0)
    endpoint = ExchangeEndpoint(None, tls=listener_tls(volume, server_name))  # type: ignore[arg-type]
    with pytest.raises(CertificateFileError, match=f"does not hold the name '{server_name}'"):
        await endpoint.start(LOOPBACK, 0)
    await endpoint.stop()


async def test_an_exchange_certificate_not_from_the_pushed_ca_bundle_stops_start_up(tmp_path: Path, pki: Pki) -> None:
    volume = tmp_path / "tls"
    publish(volume, leaf(ca_files(pki, other=True), tmp_path / "c", "exchange"), pki.ca, 0)
    endpoint = ExchangeEndpoint(None, tls=listener_tls(volume))  # type: ignore[arg-type]
    with pytest.raises(CertificateFileError, match="not signed by a CA in"):
        await endpoint.start(LOOPBACK, 0)
    await endpoint.stop()


def test_names_match_as_envoy_matches_them(tmp_path: Path, pki: Pki) -> None:
    from controlplane.certfiles import holds_name  # new with the check

    wildcard = leaf(ca_files(pki), tmp_path, "w", names=[x509.DNSName("*.cp.internal")])
    cert = x509.load_pem_x509_certificate(wildcard.cert.read_bytes())
    assert holds_name(cert, "exchange.cp.internal")
    assert holds_name(cert, "EXCHANGE.cp.internal.")
    assert not holds_name(cert, "cp.internal")
    assert not holds_name(cert, "a.b.cp.internal")
    ip = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    assert holds_name(ip, "127.0.0.1") and holds_name(ip, "localhost") and not holds_name(ip, "127.0.0.2")


async def test_a_rotation_to_a_certificate_gateways_would_refuse_keeps_the_previous_one(
    exchange: tuple[int, Path], pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port, volume = exchange
    before = serial(pki.server.cert)
    publish(volume, leaf(ca_files(pki), tmp_path / "n", "noname", names=[x509.DNSName("elsewhere")]), pki.ca, 1)
    with caplog.at_level(logging.WARNING, logger="controlplane"):
        assert await served_serial(port, pki.ca) == before
    assert "does not hold the name '127.0.0.1'" in caplog.text
    publish(volume, leaf(ca_files(pki, other=True), tmp_path / "o", "foreign"), pki.ca, 2)
    assert await served_serial(port, pki.ca) == before


async def test_a_certificate_refused_for_its_ca_is_taken_once_the_bundle_vouches_for_it(
    exchange: tuple[int, Path], pki: Pki, tmp_path: Path
) -> None:
    """A CA rotation done in the wrong order (the certificate first) and then put right (the bundle)."""
    port, volume = exchange
    foreign = leaf(ca_files(pki, other=True), tmp_path / "o", "foreign")
    publish(volume, foreign, pki.ca, 1)
    assert await served_serial(port, pki.ca) == serial(pki.server.cert)
    publish(volume, foreign, pki.ca.read_bytes() + pki.other_ca.read_bytes(), 2)
    assert await served_serial(port, pki.other_ca) == serial(foreign.cert)


async def test_a_ca_bundle_that_no_longer_vouches_for_the_exchange_is_pushed_but_said_loudly(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The CA rotation done in the wrong order (the old CA removed before the certificate moved): gateways fail
    closed, and the control plane says why as it pushes the bundle."""
    from controlplane.credentials.exchange_store import MemoryExchangeStore
    from controlplane.credentials.service import CredentialOptions, CredentialService

    volume = tmp_path / "tls"
    publish(volume, pki.server, pki.ca, 0)
    options = CredentialOptions(
        listen=(LOOPBACK, 0), public=(LOOPBACK, 0), state_dir=tmp_path / "state", tls=listener_tls(volume)
    )

    async def pushed() -> None:
        pass

    service = CredentialService(
        options, issuer_keys=lambda _: None, policy=lambda: None, on_change=pushed, store=MemoryExchangeStore()
    )
    await service.start()
    try:
        assert not service._exchange_ca_changed()
        publish(volume, pki.server, pki.ca.read_bytes() + pki.other_ca.read_bytes(), 1)  # a successor announced
        with caplog.at_level(logging.WARNING, logger="controlplane"):
            assert service._exchange_ca_changed()
            assert "does not vouch" not in caplog.text
            publish(volume, pki.server, pki.other_ca, 2)  # the old CA removed too early
            assert service._exchange_ca_changed()
        pushed_tls = service.inputs().exchange_tls
        assert pushed_tls is not None and pushed_tls.ca_pem == pki.other_ca.read_text()  # pushed all the same
        assert "does not vouch for the exchange: the certificate in" in caplog.text
    finally:
        await service.stop()


# ------------------------------------------------------------------- both listeners: dates


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_an_expired_certificate_is_never_swapped_in_and_one_not_valid_yet_waits_for_its_time(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    volume = tmp_path / "tls"
    publish(volume, pki.server, pki.ca, 0)
    clock = Clock()
    files = CertificateFiles(
        "xds", volume / "tls.crt", volume / "tls.key", volume / "ca.crt", lambda s: s.serial, clock
    )
    expired = leaf(ca_files(pki), tmp_path / "e", "expired", valid_from=-2 * DAY, valid_to=-datetime.timedelta(hours=1))
    publish(volume, expired, pki.ca, 1)
    with caplog.at_level(logging.WARNING, logger="controlplane"):
        assert files.current() is None
        assert files.current() is None  # said once
    assert caplog.text.count("expired at") == 1
    clock.now += 3600.0
    assert files.current() is None  # never tried again: it will not get younger
    early = leaf(ca_files(pki), tmp_path / "f", "early", valid_from=datetime.timedelta(minutes=10))
    publish(volume, early, pki.ca, 2)
    clock.now = time.time()
    assert files.current() is None and files.serial == serial(pki.server.cert)
    assert "is not valid before" in caplog.text
    clock.now += 9 * 60.0
    assert files.current() is None  # still early: no read, no second warning
    assert caplog.text.count("is not valid before") == 1
    clock.now += 2 * 60.0
    assert files.current() == serial(early.cert)  # its time came: installed at the next handshake


async def test_the_exchange_keeps_serving_a_valid_certificate_when_an_expired_one_is_rotated_in(
    exchange: tuple[int, Path], pki: Pki, tmp_path: Path
) -> None:
    port, volume = exchange
    expired = leaf(ca_files(pki), tmp_path / "e", "expired", valid_from=-2 * DAY, valid_to=-datetime.timedelta(hours=1))
    publish(volume, expired, pki.ca, 1)
    assert await served_serial(port, pki.ca) == serial(pki.server.cert)


# ------------------------------------------------------------------- validate with serve's exchange TLS flags


async def test_validate_with_serves_exchange_tls_flags_compiles_what_serve_compiles(tmp_path: Path, pki: Pki) -> None:
    """validate's promise (cli/validate.py): same flags, serve's versions. With TLS on the exchange hop serve
    compiles the name check and pushes the CA bundle, so validate must take the flags and read the bundle."""
    from controlplane.cli.main import _parser
    from controlplane.cli.validate import served_inputs
    from controlplane.credentials.exchange_store import MemoryExchangeStore
    from controlplane.credentials.service import CredentialOptions, CredentialService
    from controlplane.model.loader import parse_policy

    volume, state = tmp_path / "tls", tmp_path / "state"
    publish(volume, pki.server, pki.ca, 0)
    flags = ["--state-dir", str(state), "--exchange-address", f"{LOOPBACK}:9904"]
    flags += ["--exchange-tls-cert", str(volume / "tls.crt"), "--exchange-tls-key", str(volume / "tls.key")]
    flags += ["--exchange-tls-ca", str(volume / "ca.crt")]
    serve_args = _parser().parse_args(["serve", *flags])
    from controlplane.cli.main import serve_options

    serving = serve_options(serve_args)
    assert not isinstance(serving, str) and serving.credentials is not None
    options = CredentialOptions(**{**vars(serving.credentials), "listen": (LOOPBACK, 0)})

    async def pushed() -> None:
        pass

    service = CredentialService(
        options, issuer_keys=lambda _: None, policy=lambda: None, on_change=pushed, store=MemoryExchangeStore()
    )
    await service.start()
    try:
        policy = parse_policy({p.name: p.read_text() for p in QUICKSTART.glob("*.yaml")})
        validate_args = _parser().parse_args(["validate", str(QUICKSTART), *flags])
        validated = await asyncio.to_thread(served_inputs, policy, validate_args)
        assert validated.credentials == service.inputs()
        assert validated.credentials is not None and validated.credentials.exchange_tls is not None
    finally:
        await service.stop()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--exchange-tls-cert", "c", "--exchange-tls-ca", "a"], "go together"),
        (["--exchange-tls-name", "x"], "go together"),
        (["--exchange-tls-name", "exchange.cp.internal", "*"], "does not hold the name 'exchange.cp.internal'"),
    ],
)
def test_validate_checks_the_exchange_tls_flags_and_files_as_serve_does(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], given: list[str], expected: str
) -> None:
    from controlplane.cli.main import main

    if given[-1] == "*":
        given = [*given[:-1], "--exchange-tls-cert", str(pki.server.cert), "--exchange-tls-key", str(pki.server.key)]
        given += ["--exchange-tls-ca", str(pki.ca)]
    assert main(["validate", str(QUICKSTART), "--state-dir", str(tmp_path / "s"), *given]) == 2
    assert expected in capsys.readouterr().err


# ------------------------------------------------------------------- the exchange's handshakes and its bounds


def client_hello() -> bytes:
    """The first flight of a real TLS client (its ClientHello record), made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def served_at_once(port: int, ca: Path) -> int:
    """A real HTTPS request's status (a bad form: answered without an exchange behind the listener)."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(LOOPBACK, port, context=context, timeout=10)
    try:
        connection.request("POST", "/.controlplane/token?x=1", body=b"", headers={"Content-Type": "text/plain"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello"])
async def test_clients_stuck_in_the_handshake_are_dropped_at_the_header_timeout_and_free_their_slots(
    tmp_path: Path, pki: Pki, sent: str
) -> None:
    """Handshakes run off the accept loop, but each still holds one of the listener's slots: the bound of
    docs/http-listeners.md holds, and a client that never finishes its ClientHello is closed at the header
    timeout, its slot back to real clients."""
    volume = tmp_path / "tls"
    publish(volume, pki.server, pki.ca, 0)
    limits = HttpLimits(max_connections=4, header_timeout=1.0, peer_share=1.0)
    endpoint = ExchangeEndpoint(None, tls=listener_tls(volume), limits=limits)  # type: ignore[arg-type]
    port = await endpoint.start(LOOPBACK, 0)
    hello = client_hello()
    stuck = [socket.create_connection((LOOPBACK, port)) for _ in range(limits.max_connections)]
    try:
        for sock in stuck:
            if sent != "nothing":
                sock.sendall(hello[: len(hello) // 2])
        started = time.monotonic()
        assert await asyncio.to_thread(served_at_once, port, pki.ca) == 400  # waited in the backlog, then served
        waited = time.monotonic() - started
        assert limits.header_timeout * 0.8 < waited < limits.header_timeout + 2.0, waited
        for sock in stuck:  # every stuck client was closed by the listener
            sock.settimeout(5)
            assert await asyncio.to_thread(sock.recv, 1024) == b""
        deadline = time.monotonic() + 5
        while endpoint._server.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the last connection's close is being processed: poll, bounded
        assert endpoint._server.open_connections == 0
    finally:
        for sock in stuck:
            sock.close()
        await endpoint.stop()


# ------------------------------------------------------------------- files caught half-written


def envoy_trusts(pem: str) -> bool:
    """Whether the real Envoy takes `pem` as a cluster's trusted CA bundle (as the pushed exchange CA is)."""
    from tests.support.envoy import validate_config

    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": pem}}},
    }
    address = {"socket_address": {"address": LOOPBACK, "port_value": 1}}
    cluster = {
        "name": "c",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
    }
    accepted, _ = validate_config({"static_resources": {"clusters": [cluster]}})
    return accepted


def test_a_ca_bundle_caught_half_written_is_kept_out_as_envoy_would_refuse_it(tmp_path: Path, pki: Pki) -> None:
    """Written in place, a bundle can be read with its last block cut. `cryptography` parses the complete
    blocks and says nothing; the real Envoy refuses the whole bundle, so pushing it would be NACKed."""
    from controlplane.certfiles import WatchedBundle

    both = pki.ca.read_text() + pki.other_ca.read_text()
    cut = both[: len(pki.ca.read_text()) + len(pki.other_ca.read_text()) // 2]
    assert envoy_trusts(both) and not envoy_trusts(cut)
    path = tmp_path / "ca.crt"
    path.write_text(pki.ca.read_text())
    bundle = WatchedBundle(path)
    path.write_text(cut)
    assert not bundle.changed() and bundle.pem == pki.ca.read_text()
    path.write_text(both)  # the writer finishes
    assert bundle.changed() and bundle.pem == both


def test_a_client_ca_or_chain_caught_half_written_keeps_the_previous_set(tmp_path: Path, pki: Pki) -> None:
    volume = tmp_path / "tls"
    publish(volume, pki.server, pki.ca, 0)
    files = CertificateFiles("xds", volume / "tls.crt", volume / "tls.key", volume / "ca.crt", lambda s: s.ca)
    both = pki.ca.read_bytes() + pki.other_ca.read_bytes()
    publish(volume, pki.server, both[: -len(pki.other_ca.read_bytes()) // 2], 1)
    assert files.current() is None
    publish(volume, pki.server, both, 2)
    assert files.current() == both
    chain = pki.server.cert.read_bytes() + pki.ca.read_bytes()
    secret_volume(volume, {"tls.crt": chain[:-40], "tls.key": pki.server.key, "ca.crt": both}, 3)
    assert files.current() is None


# ------------------------------------------------------------------- no key material in logs


def key_lines(key: Path) -> list[str]:
    return [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]


@pytest.mark.parametrize("swap", ["key as certificate", "key as CA", "key cut short", "key with the other certificate"])
async def test_a_wrong_file_never_puts_the_private_key_in_a_message_or_log(
    tmp_path: Path, pki: Pki, swap: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = pki.server.key.read_bytes()
    layouts: dict[str, dict[str, Path | bytes]] = {
        "key as certificate": {"tls.crt": key, "tls.key": key, "ca.crt": pki.ca},
        "key as CA": {"tls.crt": pki.server.cert, "tls.key": key, "ca.crt": key},
        "key cut short": {"tls.crt": pki.server.cert, "tls.key": key[:-30], "ca.crt": pki.ca},
        "key with the other certificate": {"tls.crt": pki.client.cert, "tls.key": key, "ca.crt": pki.ca},
    }
    bad = layouts[swap]
    messages = []
    start = tmp_path / "start"
    secret_volume(start, bad, 0)
    with pytest.raises(CertificateFileError) as refused:
        CertificateFiles("xds", start / "tls.crt", start / "tls.key", start / "ca.crt", lambda s: s)
    messages.append(str(refused.value))
    rotated = tmp_path / "rotated"
    publish(rotated, pki.server, pki.ca, 0)
    files = CertificateFiles("xds", rotated / "tls.crt", rotated / "tls.key", rotated / "ca.crt", lambda s: s)
    secret_volume(rotated, bad, 1)
    with caplog.at_level(logging.DEBUG):
        assert files.current() is None
    messages.append(caplog.text)
    assert "keeping the previous certificate" in caplog.text
    for line in key_lines(pki.server.key):
        assert not any(line in message for message in messages)


# ------------------------------------------------------------------- the gateway's client certificate by SDS files


def envoy_serials(envoy: EnvoyProcess) -> set[int]:
    certificates = json.loads(envoy.admin_get("/certs")[1])["certificates"]
    return {int(chain["serial_number"], 16) for context in certificates for chain in context.get("cert_chain", [])}


def test_envoy_misses_a_key_renamed_outside_the_watched_directory_so_bootstrap_refuses_that_layout(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real Envoy, SDS files naming a certificate in one directory and its key in another (the watched
    directory is the certificate's): the certificate renamed first is refused (key_rotation_failed, as with
    one directory), and the key renamed next is not seen, where in one directory it is used within about 1 ms
    (docs/certificate-rotation.md); any later rename into the certificate's directory picks it up. So the
    gateway keeps its old certificate until something else moves there, or it expires: `bootstrap
    --tls-sds-dir` refuses the split layout."""
    from controlplane.cli.bootstrap import ClientTls, render_bootstrap, write_sds_files
    from controlplane.cli.main import main

    certs, keys, sds = tmp_path / "certs", tmp_path / "keys", str(tmp_path / "sds")
    certs.mkdir()
    keys.mkdir()
    replace(certs / "tls.crt", pki.client.cert)
    replace(keys / "tls.key", pki.client.key)
    write_sds_files(ClientTls(str(pki.ca), str(certs / "tls.crt"), str(keys / "tls.key"), None, sds))
    # The bootstrap names the SDS files only; rendered for one directory, as the check now requires.
    same = ClientTls(str(pki.ca), str(certs / "tls.crt"), str(certs / "tls.key"), None, sds)
    envoy = EnvoyProcess(render_bootstrap(group="g", node_id="n", xds_host=LOOPBACK, xds_port=1, tls=same))
    envoy.wait_ready_on_start = False  # no control plane: only the SDS files and /certs matter
    envoy.start()
    try:
        poll_until(lambda: envoy_serials(envoy) == {serial(pki.client.cert)}, 10, message="first certificate")
        new = issue(ca_files(pki), tmp_path / "new", "gateway-2", server=False)
        replace(certs / "tls.crt", new.cert)  # cert-manager's order: the certificate, then the key
        failed = f"sds.{CLIENT_CERT_SECRET}.key_rotation_failed"
        poll_until(lambda: envoy.stats("sds.").get(failed, 0) >= 1, 10, message="the lone certificate refused")
        replace(keys / "tls.key", new.key)
        deadline = time.monotonic() + 2.0  # a window to see a negative in: Envoy takes ~1 ms when it sees it
        while time.monotonic() < deadline and envoy_serials(envoy) == {serial(pki.client.cert)}:
            time.sleep(0.05)
        assert envoy_serials(envoy) == {serial(pki.client.cert)}, "the key's rename was seen after all"
        replace(certs / "unrelated", b"")  # any rename into the watched directory: both files re-read
        poll_until(lambda: envoy_serials(envoy) == {serial(new.cert)}, 10, message="picked up by a later rename")
    finally:
        envoy.stop()
    flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(certs / "tls.crt"), "--tls-key", str(keys / "tls.key")]
    code = main(["bootstrap", "--group", "g", "--xds-address", "127.0.0.1:18000", *flags, "--tls-sds-dir", sds])
    assert code == 2
    assert "--tls-cert and --tls-key in one directory" in capsys.readouterr().err


async def test_a_rotation_landing_between_the_check_and_the_build_is_not_installed_unchecked(
    exchange: tuple[int, Path], pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exchange's SSLContext is loaded from the files after `certfiles` checked them: should another
    rotation land in between (here: one to a certificate without the name gateways check), the context holds
    the unchecked files. It must not be installed; the next handshake checks what is there now."""
    from controlplane.credentials import http as exchange_http

    port, volume = exchange
    good = leaf(ca_files(pki), tmp_path / "g", "good")
    noname = leaf(ca_files(pki), tmp_path / "n", "noname", names=[x509.DNSName("elsewhere")])
    from controlplane.certfiles import check_served_to_gateways as checked

    landed: list[bool] = []

    def check_then_rotate(*args: object, **kwargs: object) -> None:
        checked(*args, **kwargs)  # type: ignore[arg-type]
        if not landed:
            landed.append(True)
            publish(volume, noname, pki.ca, 2)  # lands after the check, before the load

    monkeypatch.setattr(exchange_http, "check_served_to_gateways", check_then_rotate)
    publish(volume, good, pki.ca, 1)
    served = {await served_serial(port, pki.ca) for _ in range(3)}
    assert served == {serial(pki.server.cert)}  # neither the unchecked one, nor (now gone) the good one


# ------------------------------------------------------------------- links to what is not a certificate file


def current_or_unblock(files: CertificateFiles[int], fifo: Path) -> int | None:
    """`files.current()` in a thread; should it block on the named pipe, a writer opens and closes the pipe so
    the thread ends (and the test fails) instead of hanging the run."""
    import threading

    result: list[int | None] = []
    thread = threading.Thread(target=lambda: result.append(files.current()), daemon=True)
    thread.start()
    thread.join(3.0)
    if thread.is_alive():
        with open(fifo, "wb"):
            pass
        thread.join(5.0)
        pytest.fail("reading the certificate files blocked on a named pipe")
    return result[0]


@pytest.mark.parametrize("target", ["named pipe", "/dev/zero", "oversized"])
def test_a_link_to_a_pipe_a_device_or_a_huge_file_is_refused_without_blocking(
    tmp_path: Path, pki: Pki, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handshake reads the files (on the event loop for the exchange, holding grpc's handshake thread and the
    lock for xDS): a link to a named pipe blocked it for good, `/dev/zero` filled memory."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    volume = tmp_path / "tls"
    publish(volume, pki.server, pki.ca, 0)
    files = CertificateFiles("xds", volume / "tls.crt", volume / "tls.key", volume / "ca.crt", lambda s: s.serial)
    huge = tmp_path / "huge.crt"
    if target == "oversized":
        huge.write_bytes(pki.server.cert.read_bytes() + b"#" * (5 << 20))
    odd = {"named pipe": fifo, "/dev/zero": Path("/dev/zero"), "oversized": huge}[target]
    generation = volume / "..odd"
    generation.mkdir()
    for name in ("tls.key", "ca.crt"):
        (generation / name).write_bytes((volume / name).read_bytes())
    (generation / "tls.crt").symlink_to(odd)
    (volume / "..data_tmp").symlink_to(generation.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    with caplog.at_level(logging.WARNING, logger="controlplane"):
        assert current_or_unblock(files, fifo) is None  # refused: the previous certificate stays
    assert "keeping the previous certificate" in caplog.text
    with pytest.raises(CertificateFileError):  # and at start, a message instead of a hang
        CertificateFiles("xds", generation / "tls.crt", volume / "tls.key", volume / "ca.crt", lambda s: s)


# ------------------------------------------------------------------- the check mirrors the real Envoy's


class TlsBackend:
    """A loopback HTTPS server answering 200 with one certificate: what a gateway's exchange cluster dials."""

    def __init__(self, files: CertFiles) -> None:
        import http.server
        import threading

        class Ok(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files.cert, files.key)
        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Ok)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def exchange_cluster(name: str, port: int, server_name: str, ca_pem: str) -> dict[str, Any]:
    """The compiled exchange cluster (compiler/cluster.py), its CA inline instead of the ADS secret: the same
    name check and trust, in a static bootstrap (`envoy` crashed validating one that names an ADS secret)."""
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
    from google.protobuf import json_format

    from controlplane.compiler.cluster import exchange_cluster_config

    compiled = exchange_cluster_config(LOOPBACK, port, server_name)
    context = tls_pb2.UpstreamTlsContext()
    compiled.transport_socket.typed_config.Unpack(context)
    san = context.common_tls_context.combined_validation_context.default_validation_context
    validation = json_format.MessageToDict(san, preserving_proto_field_name=True)
    validation["trusted_ca"] = {"inline_string": ca_pem}
    tls = json_format.MessageToDict(context, preserving_proto_field_name=True)
    tls["common_tls_context"] = {"validation_context": validation}
    tls["@type"] = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    cluster: dict[str, Any] = json_format.MessageToDict(compiled, preserving_proto_field_name=True)
    cluster["name"] = name
    cluster["load_assignment"]["cluster_name"] = name
    cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def test_what_the_control_plane_refuses_is_what_the_real_envoy_refuses(tmp_path: Path, pki: Pki) -> None:
    """Each case: a certificate served to the real Envoy through the compiled exchange cluster's checks, and
    `check_served_to_gateways` on the same files. Envoy reaches the server exactly when the check passes: a
    wildcard SAN counts, the common name does not, an address must be an IP SAN, and a CA that expired is no
    CA (the check passed that one before)."""
    from google.protobuf import json_format

    from controlplane.certfiles import check_served_to_gateways, load_certificate_set
    from tests.support.ecds_envoy import listener
    from tests.support.ports import free_port

    name = "exchange.cp.internal"
    ours = ca_files(pki)
    expired_ca = make_ca(tmp_path, "expired-ca", valid_to=-datetime.timedelta(hours=1))
    bundle = pki.ca.read_text() + expired_ca.cert.read_text()
    cases = {
        "the name as a DNS SAN": (leaf(ours, tmp_path, "a", names=[x509.DNSName(name)]), name),
        "a wildcard SAN": (leaf(ours, tmp_path, "b", names=[x509.DNSName("*.cp.internal")]), name),
        "another name": (leaf(ours, tmp_path, "c", names=[x509.DNSName("other.cp.internal")]), name),
        "the name in the common name only": (leaf(ours, tmp_path, name, names=[]), name),
        "an address as a DNS SAN": (leaf(ours, tmp_path, "d", names=[x509.DNSName(LOOPBACK)]), LOOPBACK),
        "the address as an IP SAN": (leaf(ours, tmp_path, "e"), LOOPBACK),
        "another CA": (leaf(ca_files(pki, other=True), tmp_path, "f", names=[x509.DNSName(name)]), name),
        "an expired CA": (leaf(expired_ca, tmp_path, "g", names=[x509.DNSName(name)]), name),
    }
    backends = {case: TlsBackend(files) for case, (files, _) in cases.items()}
    try:
        clusters = [
            exchange_cluster(f"c{i}", backends[case].port, server_name, bundle)
            for i, (case, (_, server_name)) in enumerate(cases.items())
        ]
        routes = [{"match": {"prefix": f"/c{i}/"}, "route": {"cluster": f"c{i}"}} for i in range(len(cases))]
        port = free_port()
        gateway = json_format.MessageToDict(listener(port, [], routes))
        envoy = EnvoyProcess({"static_resources": {"listeners": [gateway], "clusters": clusters}}).start()
        try:
            for i, (case, (files, server_name)) in enumerate(cases.items()):
                connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
                connection.request("GET", f"/c{i}/")
                reached = connection.getresponse().status == 200
                connection.close()
                loaded = replace_ca(load_certificate_set(files.cert, files.key, pki.ca), bundle)
                try:
                    check_served_to_gateways(loaded, server_name, files.cert, pki.ca)
                    passed = True
                except CertificateFileError:
                    passed = False
                assert (case, reached) == (case, passed)
        finally:
            envoy.stop()
    finally:
        for backend in backends.values():
            backend.close()
