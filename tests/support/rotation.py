"""Rotating certificate files the way a deployment does, and asking a server which certificate it serves.

`secret_volume` lays files out as the kubelet does for a Secret volume (`tls.crt -> ..data/tls.crt`,
`..data -> ..<generation>`) and rotates them by swapping `..data` in one rename; `replace` writes one file by
rename (as cert-manager's own writer or an operator's `mv` would), so a pair can be caught half-way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import threading
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .certs import CertFiles, _leaf
from .ports import LOOPBACK


def issue(ca: CertFiles, directory: Path, stem: str, *, server: bool) -> CertFiles:
    """A new leaf certificate signed by the CA whose files are `ca` (the CA's key is on disk in tests)."""
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    directory.mkdir(parents=True, exist_ok=True)
    return _leaf(directory, stem, (cert, key), server=server)


def serial(cert_file: Path) -> int:
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number


def replace(target: Path, source: Path | bytes) -> None:
    """Write `target` by rename, so a reader sees the old bytes or the new, never a part."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    os.replace(tmp, target)


def secret_volume(directory: Path, files: Mapping[str, Path | bytes], generation: int) -> None:
    """Publish `files` (name -> source) as generation `generation` of a Secret volume in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{generation}"
    version.mkdir()
    for name, source in files.items():
        (version / name).write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    link = directory / "..data_tmp"
    os.symlink(version.name, link)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.replace(link, directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if old is not None:
        shutil.rmtree(directory / old)  # the kubelet removes the old generation after the swap


def peer_serial(host: str, port: int, *, ca: Path, client: CertFiles | None, server_name: str = "localhost") -> int:
    """The serial of the certificate a NEW TLS connection to `host:port` is served (ALPN h2 for grpc)."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class TcpRelay:
    """A loopback TCP relay in front of a server, whose `reset()` cuts every connection through it: how a test
    makes a client (Envoy) open new TLS connections, as a network blip or a server's restart would, without
    restarting the server that holds the rotated certificate."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-relay", daemon=True)

    def __enter__(self) -> TcpRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        self.reset()
        self._thread.join(5)

    def reset(self) -> int:
        """Close every relayed connection (both ends); returns how many there were."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        return len(sockets) // 2

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection((LOOPBACK, self.upstream_port), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
                self.accepted += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {source, sink}
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
