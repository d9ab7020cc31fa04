"""A throwaway PKI for TLS tests: one CA, a server certificate for loopback, client certificates.

Generated per test session with `cryptography` (EC P-256, one-day validity) and written as PEM files, because
both grpc and Envoy take file contents/paths. Nothing here is a secret worth protecting; it never leaves tmp.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: CertFiles
    client: CertFiles
    other_ca: Path  # an unrelated CA: its client certificates must be refused
    stranger: CertFiles  # a client certificate signed by other_ca
    second_client: CertFiles  # another client of the CA: a different identity (another gateway)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertFiles:
    files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _ca(directory: Path, stem: str) -> tuple[CertFiles, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(stem), _name(stem), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(key, hashes.SHA256())
    )
    return _write(directory, stem, cert, key), cert, key


def _leaf(
    directory: Path,
    stem: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> CertFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(_name(stem), ca[0].subject, key).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
        critical=False,
    )
    if server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(stem)]), critical=False)
    return _write(directory, stem, builder.sign(ca[1], hashes.SHA256()), key)


def make_pki(directory: Path) -> Pki:
    """CA → server (SAN localhost, 127.0.0.1) and client; plus an unrelated CA with its own client."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_files, ca_cert, ca_key = _ca(directory, "xds-ca")
    other_files, other_cert, other_key = _ca(directory, "other-ca")
    return Pki(
        ca=ca_files.cert,
        server=_leaf(directory, "xds-server", (ca_cert, ca_key), server=True),
        client=_leaf(directory, "gateway-client", (ca_cert, ca_key), server=False),
        other_ca=other_files.cert,
        stranger=_leaf(directory, "stranger-client", (other_cert, other_key), server=False),
        second_client=_leaf(directory, "second-gateway-client", (ca_cert, ca_key), server=False),
    )
