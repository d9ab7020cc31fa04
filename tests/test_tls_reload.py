"""Certificates re-read when their files change (controlplane/certfiles.py), and the xDS port following them.

The reload rules: a changed set is read once and then kept; a half-rotated pair (the key of one certificate
beside another) keeps the previous set, is logged once naming the file and counted; a Secret volume's `..data`
swap is seen through the links; nothing is read while nothing changed. Then on a real grpc server: a new
connection is served the new certificate while a stream opened before the rotation keeps working, and the
client CA bundle rotates the way it must (new CA added, then the old removed).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controlplane import certfiles
from controlplane.certfiles import CertificateFiles, CertificateSet
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import CLUSTER, LISTENER
from controlplane.telemetry.metrics import REGISTRY
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import XdsServer
from controlplane.xds.tls import ServerTls
from tests.support.ads import ads_method, first_request, within
from tests.support.certs import CertFiles, Pki, make_pki
from tests.support.rotation import issue, peer_serial, replace, secret_volume, serial

LOOPBACK = "127.0.0.1"


def rejected(listener: str = "test") -> float:
    return (
        REGISTRY.get_sample_value(
            "controlplane_tls_certificate_reloads_total", {"listener": listener, "result": "rejected"}
        )
        or 0.0
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def plain_files(tmp_path: Path, pki: Pki) -> tuple[Path, Path, Path]:
    directory = tmp_path / "tls"
    directory.mkdir()
    for name, source in (("tls.crt", pki.server.cert), ("tls.key", pki.server.key), ("ca.crt", pki.ca)):
        replace(directory / name, source)
    return directory / "tls.crt", directory / "tls.key", directory / "ca.crt"


def watch(cert: Path, key: Path, ca: Path | None) -> CertificateFiles[CertificateSet]:
    return CertificateFiles("test", cert, key, ca, lambda loaded: loaded)


def test_a_changed_pair_is_read_once_and_then_kept(tmp_path: Path, pki: Pki) -> None:
    cert, key, ca = plain_files(tmp_path, pki)
    files = watch(cert, key, ca)
    assert files.initial.serial == serial(pki.server.cert) and files.current() is None
    new = issue(CertFiles(pki.ca, pki.ca.with_suffix(".key")), tmp_path / "new", "xds-server", server=True)
    replace(key, new.key)
    replace(cert, new.cert)
    loaded = files.current()
    assert loaded is not None and loaded.serial == serial(new.cert) == files.serial
    assert files.current() is None  # in use now: not read again


def test_a_half_rotated_pair_keeps_the_previous_one_logged_once_and_counted(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, ca = plain_files(tmp_path, pki)
    files = watch(cert, key, ca)
    new = issue(CertFiles(pki.ca, pki.ca.with_suffix(".key")), tmp_path / "new", "xds-server", server=True)
    before = rejected()
    with caplog.at_level(logging.WARNING, logger="controlplane"):
        replace(cert, new.cert)  # the certificate first, as a one-by-one writer does: the old key beside it
        assert files.current() is None
        assert files.current() is None
    assert rejected() == before + 1
    (line,) = [r.getMessage() for r in caplog.records if "keeping the previous certificate" in r.getMessage()]
    assert str(key) in line and "does not match" in line
    assert "PRIVATE KEY" not in caplog.text
    replace(key, new.key)  # the pair is whole again
    loaded = files.current()
    assert loaded is not None and loaded.serial == serial(new.cert)


def test_a_secret_volume_swap_is_seen_through_the_links(tmp_path: Path, pki: Pki) -> None:
    volume = tmp_path / "volume"
    secret_volume(volume, {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.ca}, 0)
    files = watch(volume / "tls.crt", volume / "tls.key", volume / "ca.crt")
    other = make_pki(tmp_path / "other")  # a whole new PKI: certificate, key and CA all change in one swap
    secret_volume(volume, {"tls.crt": other.server.cert, "tls.key": other.server.key, "ca.crt": other.ca}, 1)
    loaded = files.current()
    assert loaded is not None and loaded.serial == serial(other.server.cert)
    assert loaded.ca == other.ca.read_bytes()


def test_a_missing_or_garbled_file_keeps_the_previous_one(tmp_path: Path, pki: Pki) -> None:
    cert, key, ca = plain_files(tmp_path, pki)
    files = watch(cert, key, ca)
    before = rejected()
    ca.unlink()
    assert files.current() is None and files.current() is None
    replace(ca, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert files.current() is None
    assert rejected() == before + 2  # once for the missing file, once for the garbled one
    replace(ca, pki.ca)
    assert files.current() is not None


def test_nothing_is_read_while_nothing_changed(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Called before every handshake: a stat per file, never a read or a parse."""
    files = watch(*plain_files(tmp_path, pki))
    reads: list[object] = []
    monkeypatch.setattr(certfiles, "load_certificate_set", lambda *args: reads.append(args))
    for _ in range(1000):
        assert files.current() is None
    assert reads == []


def test_a_mismatched_pair_at_start_stops_start_up(tmp_path: Path, pki: Pki) -> None:
    from controlplane.xds.tls import XdsTransportError

    with pytest.raises(XdsTransportError, match=r"does not match"):
        ServerTls(pki.server.cert, pki.client.key, pki.ca).credentials()


# -------------------------------------------------------------------------------------------- on grpc


@pytest.fixture
async def rotating_server(tmp_path: Path, pki: Pki) -> AsyncIterator[tuple[int, Path]]:
    volume = tmp_path / "xds-tls"
    secret_volume(volume, {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.ca}, 0)
    server = XdsServer(SnapshotCache(), ProxyRegistry(), log=logging.getLogger("test.tls.reload"))
    port = await server.start(LOOPBACK, 0, tls=ServerTls(volume / "tls.crt", volume / "tls.key", volume / "ca.crt"))
    try:
        yield port, volume
    finally:
        await server.stop(1.0)


def _credentials(ca: Path, client: CertFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.read_bytes(), client.key.read_bytes(), client.cert.read_bytes())


async def _handshake_ok(port: int, ca: Path, client: CertFiles) -> bool:
    async with grpc.aio.secure_channel(f"localhost:{port}", _credentials(ca, client)) as channel:
        call = ads_method(channel)()
        try:
            await call.write(first_request(LISTENER, "reload-probe"))
            await within(call.read())
        except grpc.aio.AioRpcError:
            return False
        finally:
            call.cancel()
        return True


async def test_new_connections_get_the_new_certificate_and_an_open_stream_keeps_running(
    rotating_server: tuple[int, Path], pki: Pki, tmp_path: Path
) -> None:
    port, volume = rotating_server
    ca_files = CertFiles(pki.ca, pki.ca.with_suffix(".key"))
    async with grpc.aio.secure_channel(f"localhost:{port}", _credentials(pki.ca, pki.client)) as channel:
        stream = ads_method(channel)()
        await stream.write(first_request(LISTENER, "long-lived"))
        assert (await within(stream.read())).type_url == LISTENER
        old = peer_serial(LOOPBACK, port, ca=pki.ca, client=pki.client)
        assert old == serial(pki.server.cert)

        new = issue(ca_files, tmp_path / "gen1", "xds-server", server=True)
        secret_volume(volume, {"tls.crt": new.cert, "tls.key": new.key, "ca.crt": pki.ca}, 1)
        assert peer_serial(LOOPBACK, port, ca=pki.ca, client=pki.client) == serial(new.cert)

        # The stream opened before the rotation still answers on its old TLS session.
        await stream.write(first_request(CLUSTER, "long-lived"))
        assert (await within(stream.read())).type_url == CLUSTER
        stream.cancel()


async def test_the_client_ca_bundle_rotates_new_added_first_then_old_removed(
    rotating_server: tuple[int, Path], pki: Pki
) -> None:
    port, volume = rotating_server
    # The next CA and a gateway client of its own: `other_ca` and its client. A successor CA needs a subject of
    # its own: with two CAs of one name in the bundle, the handshake (BoringSSL) checks against the first only.
    successor_ca, successor_client = pki.other_ca, pki.stranger
    files = {"tls.crt": pki.server.cert, "tls.key": pki.server.key}
    assert await _handshake_ok(port, pki.ca, pki.client)
    assert not await _handshake_ok(port, pki.ca, successor_client)

    both = pki.ca.read_bytes() + successor_ca.read_bytes()
    secret_volume(volume, {**files, "ca.crt": both}, 1)
    assert await _handshake_ok(port, pki.ca, pki.client)
    assert await _handshake_ok(port, pki.ca, successor_client)

    secret_volume(volume, {**files, "ca.crt": successor_ca}, 2)
    assert not await _handshake_ok(port, pki.ca, pki.client)
    assert await _handshake_ok(port, pki.ca, successor_client)
