"""Transport security of the xDS port (ADS and the audit ALS share it): mTLS, and when plain text is allowed.

Once the control plane pushes secrets (SDS credentials that Envoy injects upstream), anyone who can open a
plain-text ADS stream with a guessed `node.cluster` would receive them, and anyone on the path could read them.
So the port can require TLS with a client certificate signed by a CA we trust, and `serve` refuses to push
secrets over plain text unless told explicitly (`--xds-insecure`): fail closed, never by accident.

Certificates rotate without a restart: grpc asks `ServerTls.credentials()`'s fetcher before every handshake,
which stats the three files and, when they changed, re-reads them and hands grpc the new certificate, key and
client CA bundle (controlplane/certfiles.py: a half-rotated pair keeps the previous one). Established streams
keep their TLS session; new connections get the new certificate (docs/certificate-rotation.md). A bad file at
start stops `serve`. The private key is never logged: errors name the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from controlplane.certfiles import CertificateFileError, CertificateFiles, CertificateSet
from controlplane.serving import is_loopback

if TYPE_CHECKING:
    from controlplane.model.policy import Policy

log = logging.getLogger("controlplane")

TLS_FLAGS = ("--xds-tls-cert", "--xds-tls-key", "--xds-client-ca")


class XdsTransportError(Exception):
    """The xDS port cannot be served as configured; `serve` exits with this message."""


class InsecureTransport(XdsTransportError):
    """The policy pushes secrets but the xDS port would serve them in plain text."""


@dataclass(frozen=True)
class ServerTls:
    """The xDS server's certificate chain and key (PEM), and the CA that signs the proxies' client certs."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path
    require_client_cert: bool = True

    def credentials(self) -> grpc.ServerCredentials:
        """grpc server credentials that follow the files: read now (an unusable file raises
        `XdsTransportError` naming it, never its content), then re-read on the first handshake after they
        change."""
        try:
            files = CertificateFiles("xds", self.cert_file, self.key_file, self.client_ca_file, _configuration)
        except CertificateFileError as error:
            raise XdsTransportError(f"xDS TLS: {error}") from None
        log.info("xDS TLS certificate serial %x; its files are watched for rotation", files.serial)
        return grpc.dynamic_ssl_server_credentials(
            files.initial, files.current, require_client_authentication=self.require_client_cert
        )


def _configuration(loaded: CertificateSet) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(loaded.key, loaded.chain)], root_certificates=loaded.ca)


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The client certificate's identity on an mTLS call (its subject alternative names, else its common
    name), or None in plain text. What the audit trail records, and how an access-log stream is matched to
    the ADS stream of the same gateway."""
    auth = context.auth_context()
    names = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name")
    if not names:
        return None
    return ",".join(sorted(name.decode("utf-8", errors="replace") for name in names))


def server_tls_from_flags(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
    """The three `serve` flags go together: a server cert without a client CA would be TLS without mTLS,
    which authenticates the control plane but not the proxies that receive secrets."""
    given = (cert, key, client_ca)
    if all(value is None for value in given):
        return None
    if cert is None or key is None or client_ca is None:
        missing = [flag for flag, value in zip(TLS_FLAGS, given, strict=True) if value is None]
        raise ValueError(f"xDS mTLS needs {' '.join(TLS_FLAGS)} together; missing {', '.join(missing)}")
    return ServerTls(cert, key, client_ca)


def pushes_secrets(backends: Iterable[object]) -> bool:
    """Whether any backend's credential reaches the proxies: an `inject:` or `gcp:` backend's SDS secret (a
    `gcp:` backend's token is injected as `Authorization: Bearer`, so it has `inject` set too), or an `aws:`
    backend's signing keys inline in ECDS filter configurations and, for a binding's own role, in routes.

    `getattr`: callers and tests pass any objects with these attributes, not only model Backends.
    """
    return any(
        getattr(backend, "inject", None) is not None
        or getattr(backend, "aws", None) is not None
        or getattr(backend, "gcp", None) is not None
        for backend in backends
    )


def check_transport(*, tls: ServerTls | None, insecure: bool, secrets: bool) -> None:
    """Refuse (raise `InsecureTransport`) to serve secrets over plain text that was not explicitly allowed."""
    if secrets and tls is None and not insecure:
        raise InsecureTransport(
            "the policy injects upstream credentials (backends with `inject:`, `aws:` or `gcp:`), which would be "
            "pushed to proxies over plain-text xDS; configure mTLS with "
            f"{' '.join(f'{flag} FILE' for flag in TLS_FLAGS)}, or pass --xds-insecure to allow plain text"
        )


class TransportPolicy:
    """What the xDS port, as configured, may carry: the policy service's `accept` hook, and `serve`'s checks.

    Remembers the last refusal so that a start-up whose only policy was refused for this reason can say why
    it stops (`check_start`), rather than opening a port that serves nothing."""

    def __init__(self, *, host: str, tls: ServerTls | None, insecure: bool) -> None:
        self.host = host
        self.tls = tls
        self.insecure = insecure
        self.refusal: str | None = None

    def accept(self, policy: Policy) -> str | None:
        """A policy that would push secrets over plain text is rejected like an invalid one (the last good
        policy stays in service), before anything is compiled or published."""
        try:
            check_transport(tls=self.tls, insecure=self.insecure, secrets=pushes_secrets(policy.backends))
        except XdsTransportError as refused:
            self.refusal = str(refused)
            return self.refusal
        return None

    def check_start(self, *, serving: bool) -> None:
        """Secrets never go over plain text by accident: when no policy is `serving` at start-up because the
        one read was refused for that reason, raise `InsecureTransport` (`serve` exits 2 before the xDS port
        opens). Plain text anywhere but loopback deserves a warning even without secrets."""
        if not serving and self.refusal is not None:
            raise InsecureTransport(self.refusal)
        if self.tls is not None:
            log.info("xDS requires mTLS: client certificates signed by %s", self.tls.client_ca_file)
        elif not is_loopback(self.host):
            log.warning(
                "xDS on %s is plain text: anyone who can reach it can read the proxies' configuration "
                "(see --xds-tls-cert)",
                self.host,
            )
