"""A certificate, its private key and (optionally) a CA bundle read from files, re-read when the files change.

Why: cert-manager and Kubernetes Secret volumes rotate certificates in place. A Secret volume swaps its `..data`
symbolic link in one rename, so every file changes at once; a writer that replaces the files one by one (or
cert-manager's own files outside a Secret volume) leaves an instant where the new certificate sits beside the
old key. A server that restarts to pick up a rotation drops its streams, and one that loads a half-rotated pair
fails every handshake. So `CertificateFiles.current()` is called before each TLS handshake and costs one
`stat` per file while nothing changed; on a change it reads all the files, and installs them only when the key
matches the certificate and the CA bundle parses. A half-rotated set keeps the last good one in service, is
logged once (naming the file, never its content) and counted; the next change is tried again. So does a
certificate every client would refuse for its dates: an expired one (a renewal job that copied an old file) is
never swapped in for one still valid, and one not valid yet (issued by a clock ahead of ours) is installed when
its time comes, not before.

The stamp of a file is taken through its links (`os.stat`), so swapping `..data` to a new directory is seen
even though `tls.crt` itself is the same link. Files are stamped before and after the read and the build: a set
that changed meanwhile is not installed (what was checked may not be what was built), and the next handshake
reads it again.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter, Gauge

from controlplane.regularfile import FileTooLarge, NotRegularFile, read_regular
from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane")

RELOADS: Final = Counter(
    "controlplane_tls_certificate_reloads_total",
    "Certificate files that changed on disk, by listener (xds, exchange) and result: reloaded (in use for new "
    "connections), rejected (key and certificate do not match, a file is unreadable, not PEM or cut short, the "
    "certificate is expired or not valid yet, or, on the exchange, gateways would refuse it: the previous "
    "certificate stays in use until the files change again, or a certificate not valid yet becomes valid)",
    ["listener", "result"],
    registry=REGISTRY,
)
EXPIRY: Final = Gauge(
    "controlplane_tls_certificate_expiry_timestamp_seconds",
    "When the certificate a listener serves expires (Unix time): alert well before, in case rotation stalls",
    ["listener"],
    registry=REGISTRY,
)

MAX_PEM_BYTES: Final = 4 << 20  # a bundle of every public root CA is about 220 kB
T = TypeVar("T")
_Stamp = tuple[tuple[int, int, int, int], ...]
_MISSING: _Stamp = ()  # the rejected "stamp" of a set with a file that cannot be stat'ed (reported once)


class CertificateFileError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file, never its content."""


@dataclass(frozen=True)
class CertificateSet:
    """PEM bytes that belong together, checked: the key matches the chain's first certificate."""

    chain: bytes
    key: bytes
    ca: bytes | None
    serial: int
    not_after: float  # Unix time
    not_before: float = 0.0  # Unix time


def load_certificate_set(cert_file: Path, key_file: Path, ca_file: Path | None) -> CertificateSet:
    """Read and check the files now; raise `CertificateFileError` naming the file that is wrong."""
    chain, key = _read(cert_file), _read(key_file)
    ca = _read(ca_file) if ca_file is not None else None
    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError:
        raise CertificateFileError(f"certificate file {cert_file} holds no valid PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise CertificateFileError(f"key file {key_file} holds no unencrypted PEM private key") from None
    if _public(private.public_key()) != _public(leaf.public_key()):
        raise CertificateFileError(
            f"key file {key_file} does not match the certificate in {cert_file} (half-way through a rotation?)"
        )
    if ca is not None and ca_file is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise CertificateFileError(f"CA file {ca_file} holds no valid PEM certificate") from None
    return CertificateSet(
        chain,
        key,
        ca,
        leaf.serial_number,
        leaf.not_valid_after_utc.timestamp(),
        leaf.not_valid_before_utc.timestamp(),
    )


def check_served_to_gateways(
    loaded: CertificateSet, server_name: str, cert_file: Path, ca_file: Path, now: float | None = None
) -> None:
    """Raise `CertificateFileError` when a gateway would refuse this server certificate: what the compiled
    exchange cluster checks (compiler/cluster.py): a subject alternative name equal to `server_name` (an IP SAN
    when it is an address; the common name does not count), and a chain to a CA in the bundle pushed to them,
    every certificate on the way within its dates (the real Envoy refuses one whose only CA expired).

    Why here: a certificate that fails either check is refused by every gateway, so every token exchange fails
    closed; the control plane holds the certificate, the bundle and the name, so it can say so at start (and
    refuse) and keep the previous certificate on a rotation. Lenient where it cannot tell (a key type
    `cryptography` cannot verify): this is a guard against mistakes, not a second TLS stack."""
    chain = x509.load_pem_x509_certificates(loaded.chain)
    if not holds_name(chain[0], server_name):
        raise CertificateFileError(
            f"the certificate in {cert_file} does not hold the name {server_name!r} that gateways check "
            "(as a subject alternative name; see --exchange-tls-name): they would refuse it"
        )
    at = time.time() if now is None else now
    anchors = [ca for ca in x509.load_pem_x509_certificates(loaded.ca or b"") if _in_dates(ca, at)]
    if not _chains_to(chain[0], [cert for cert in chain[1:] if _in_dates(cert, at)], anchors):
        raise CertificateFileError(
            f"the certificate in {cert_file} is not signed by a CA in {ca_file} that is within its dates, the "
            "bundle gateways verify it with: they would refuse it"
        )


def _in_dates(cert: x509.Certificate, now: float) -> bool:
    return cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp()


def holds_name(cert: x509.Certificate, name: str) -> bool:
    """Whether `cert` has `name` as a subject alternative name: an IP SAN for an address, else a DNS SAN,
    exactly or by a wildcard in its left-most label (as Envoy's DNS SAN matcher accepts)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        wanted = name.lower().rstrip(".")
        return any(
            _dns_match(pattern.lower().rstrip("."), wanted) for pattern in names.get_values_for_type(x509.DNSName)
        )
    return address in names.get_values_for_type(x509.IPAddress)


def _dns_match(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    first, dot, rest = name.partition(".")
    return pattern.startswith("*.") and bool(first) and bool(dot) and pattern[2:] == rest


def _chains_to(cert: x509.Certificate, intermediates: list[x509.Certificate], anchors: list[x509.Certificate]) -> bool:
    for _ in range(len(intermediates) + 1):
        if cert in anchors or any(_issued_by(cert, anchor) for anchor in anchors):
            return True
        parent = next((candidate for candidate in intermediates if _issued_by(cert, candidate)), None)
        if parent is None:
            return False
        cert = parent
    return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, InvalidSignature):
        return False
    except (TypeError, UnsupportedAlgorithm):  # a signature we cannot check: the names alone decide
        return cert.issuer == issuer.subject
    return True


def _public(key: object) -> bytes:
    public_bytes: Callable[..., bytes] = key.public_bytes  # type: ignore[attr-defined]
    return public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: Path) -> bytes:
    """The file's bytes, from a regular file (links followed: a Secret volume's are) of at most MAX_PEM_BYTES.

    Why: the read happens before a handshake, on the event loop (exchange) or holding grpc's handshake thread
    (xDS). A flag or link pointing at a named pipe would block it for good, and `/dev/zero` or a huge file would
    fill memory: neither may take the listener down (controlplane/regularfile.py).
    """
    try:
        data = read_regular(path, MAX_PEM_BYTES)
    except NotRegularFile:
        raise CertificateFileError(f"{path} is not a regular file") from None
    except FileTooLarge:
        raise CertificateFileError(
            f"{path} is larger than {MAX_PEM_BYTES} bytes: not a certificate, key or bundle"
        ) from None
    except OSError as error:
        raise CertificateFileError(f"cannot read {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise CertificateFileError(f"{path} holds no PEM block")
    if data.count(b"-----BEGIN ") != data.count(b"-----END "):
        # `cryptography` reads the complete blocks and ignores a cut one; OpenSSL, BoringSSL and so Envoy
        # refuse the whole file (a bundle pushed so would be NACKed): a file caught half-written is not used.
        raise CertificateFileError(f"{path} holds an incomplete PEM block (caught while being written?)")
    return data


class CertificateFiles(Generic[T]):
    """The files of one listener and what was built from them (`build`: grpc's configuration, an SSLContext).

    `current()` is safe from any thread (grpc calls it from its own) and returns the built value once per
    change: None while nothing changed, so the caller keeps what it has.
    """

    def __init__(
        self,
        listener: str,
        cert_file: Path,
        key_file: Path,
        ca_file: Path | None,
        build: Callable[[CertificateSet], T],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.listener = listener
        self.files = tuple(path for path in (cert_file, key_file, ca_file) if path is not None)
        self._paths = (cert_file, key_file, ca_file)
        self._build = build
        self._clock = clock
        self._retry_at: float | None = None  # a rejected set that becomes valid then (not valid before)
        self._lock = threading.Lock()
        before = self._stamp_or_none()
        loaded = load_certificate_set(*self._paths)  # at start, a bad file stops the server: raise
        self.initial: T = build(loaded)
        self.serial = loaded.serial
        self._loaded: _Stamp | None = before if before == self._stamp_or_none() else None
        self._rejected: _Stamp | None = None
        EXPIRY.labels(listener).set(loaded.not_after)
        for result in ("reloaded", "rejected"):
            RELOADS.labels(listener, result)
        if (dates := _out_of_date(loaded, cert_file, clock())) is not None:
            log.error("%s TLS: %s", listener, dates)  # at start there is no other: served, and said

    def _stamp(self) -> _Stamp:
        return tuple(_stamp_of(path) for path in self.files)  # through the links: a new `..data` is a new inode

    def _stamp_or_none(self) -> _Stamp | None:
        try:
            return self._stamp()
        except OSError:
            return None

    def current(self) -> T | None:
        """The newly built value when the files changed to a good set since the last call, else None."""
        try:
            stamp = self._stamp()
        except OSError as error:
            self._reject(None, f"cannot stat {error.filename}: {error.strerror}")
            return None
        if self._rejected == _MISSING:
            self._rejected = None  # the missing file is back: a later loss is reported again
        if stamp == self._loaded or (stamp == self._rejected and not self._retry_due()):
            return None
        with self._lock:
            if stamp == self._loaded or (stamp == self._rejected and not self._retry_due()):
                return None  # another thread's handshake got here first
            return self._reload(stamp)

    def _retry_due(self) -> bool:
        return self._retry_at is not None and self._clock() >= self._retry_at

    def _reload(self, stamp: _Stamp) -> T | None:
        self._retry_at = None
        try:
            loaded = load_certificate_set(*self._paths)
            if (dates := _out_of_date(loaded, self._paths[0], self._clock())) is not None:
                self._retry_at = loaded.not_before if loaded.not_after > loaded.not_before > self._clock() else None
                raise CertificateFileError(dates if self._retry_at is None else f"{dates}; installed then")
            built = self._build(loaded)
        except CertificateFileError as error:
            self._reject(stamp, str(error))
            return None
        except Exception as error:  # the library refused what we checked: same treatment, never a crash
            self._reject(stamp, f"{self.files[0]}: {type(error).__name__}")
            return None
        if self._stamp_or_none() != stamp:
            # Changed while read or built: what was checked may not be what was built (the exchange's SSLContext
            # reads the files again), so nothing is installed; the next handshake reads the files again.
            return None
        self._loaded, self._rejected = stamp, None
        self.serial = loaded.serial
        RELOADS.labels(self.listener, "reloaded").inc()
        EXPIRY.labels(self.listener).set(loaded.not_after)
        log.info(
            "%s TLS: certificate files changed; new connections get certificate serial %x",
            self.listener,
            loaded.serial,
        )
        return built

    def _reject(self, stamp: _Stamp | None, reason: str) -> None:
        if stamp is not None and stamp == self._rejected:
            return  # said already (a certificate not valid yet, tried again at its time and still early)
        if stamp is None and self._rejected == _MISSING:
            return  # a missing file, already reported until something changes
        self._rejected = stamp if stamp is not None else _MISSING
        RELOADS.labels(self.listener, "rejected").inc()
        log.warning("%s TLS: keeping the previous certificate: %s", self.listener, reason)


class WatchedBundle:
    """A CA bundle file that others are told about when it changes (the exchange's, pushed to gateways).

    `pem` is the last good bundle: one that does not parse (half-written, emptied) is logged once and kept out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pem = _bundle(path)  # at start, a bad file stops the server: raise
        self._stamp = _stamp_of(path)

    def changed(self) -> bool:
        """Re-read the file if it changed; True when `pem` is now a different good bundle."""
        try:
            stamp = _stamp_of(path := self.path)
        except OSError:
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            pem = _bundle(path)
        except CertificateFileError as error:
            log.warning("keeping the previous CA bundle: %s", error)
            return False
        changed, self.pem = pem != self.pem, pem
        return changed


def _out_of_date(loaded: CertificateSet, cert_file: Path, now: float) -> str | None:
    """Why every client would refuse the certificate for its dates (TLS libraries allow no skew), or None."""
    if loaded.not_after <= now:
        return f"the certificate in {cert_file} expired at {_when(loaded.not_after)}: clients refuse it"
    if loaded.not_before > now:
        return f"the certificate in {cert_file} is not valid before {_when(loaded.not_before)}: clients refuse it"
    return None


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp_of(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _bundle(path: Path) -> str:
    data = _read(path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateFileError(f"CA file {path} holds no valid PEM certificate") from None
    return pem_text(data)


def pem_text(data: bytes) -> str:
    """A CA bundle's bytes as the text pushed to gateways (an SDS secret's inline string): what serve pushes and
    what validate compiles must be the same text, byte for byte, or their versions differ."""
    return data.decode("ascii", errors="replace")
