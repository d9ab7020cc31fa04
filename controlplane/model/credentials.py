"""What the compiler needs to know about the control plane's own credentials (issue 4).

These are inputs like the relayed JWKS: produced at run time by the credentials service, passed to the
pure compiler, which turns them into a jwt_authn provider, role-based RBAC, the revocation deny list (16 sealed
buckets and one of recent revocations, each its own ECDS filter configuration) and a route to the token-exchange
endpoint on every gateway.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

CREDENTIAL_ISSUER = "urn:controlplane:credentials"
EXCHANGE_PATH = "/.controlplane/token"  # reachable on every gateway listener, and on the control plane directly

# The sealed deny list is split into this many buckets, each an RBAC filter configuration of its own (ECDS), so
# that a seal re-sends only the buckets its ids join. Changing it changes every gateway listener: only on upgrade.
REVOCATION_BUCKETS = 16
# Consecutive decimal ids that share a bucket: a seal moves the ids of the last minutes into their buckets, and
# GitLab numbers jobs in the order they are created, so those ids are a narrow range: one or two buckets change,
# not every bucket a thousand-block at a time would touch. Sixteen such runs make a full turn (256,000 ids).
BUCKET_SPAN = 16_000

Buckets = tuple[tuple[str, ...], ...]
NO_REVOCATIONS: Buckets = ((),) * REVOCATION_BUCKETS


def revocation_bucket(job_id: str) -> int:
    """The bucket a job id is denied in, the same on every replica. GitLab's decimal ids go by runs of
    BUCKET_SPAN: jobs that finish around the same time share a bucket (and their thousand-blocks a regex
    prefix). Anything else by CRC-32."""
    if job_id.isascii() and job_id.isdigit():
        return (int(job_id) // BUCKET_SPAN) % REVOCATION_BUCKETS
    return zlib.crc32(job_id.encode()) % REVOCATION_BUCKETS


def revocation_buckets(job_ids: Iterable[str]) -> Buckets:
    """A plain list of job ids as the compiler's input: REVOCATION_BUCKETS sorted, de-duplicated tuples."""
    buckets: list[set[str]] = [set() for _ in range(REVOCATION_BUCKETS)]
    for job in job_ids:
        buckets[revocation_bucket(job)].add(job)
    return tuple(tuple(sorted(bucket)) for bucket in buckets)


@dataclass(frozen=True)
class ExchangeTls:
    """TLS on the gateway -> exchange hop: the name the exchange listener's certificate holds (a DNS name, or an
    IP address checked as an IP SAN) and the CA bundle (PEM) gateways verify it with. The bundle reaches the
    gateways as an SDS secret over ADS, so a new bundle is pushed like any change, with no file on the proxy."""

    server_name: str
    ca_pem: str


@dataclass(frozen=True)
class CredentialInputs:
    issuer: str = CREDENTIAL_ISSUER
    # The public keys Envoy must accept (canonical JWKS JSON): the signing key, the next one, and every
    # retired key whose credentials may still be alive. None: exchange not enabled, no provider emitted.
    jwks: str | None = None
    # Where gateways send EXCHANGE_PATH (the control plane's exchange listener); None: no route emitted.
    exchange_address: tuple[str, int] | None = None
    # With it the gateways call the exchange over TLS and verify its certificate; None: plain text.
    exchange_tls: ExchangeTls | None = None
    # Job ids denied fleet-wide (their credentials and, optionally, their raw ID tokens), by bucket
    # (`revocation_bucket`): REVOCATION_BUCKETS sorted tuples. The service hands an unchanged bucket as the same
    # tuple, so the compiler re-encodes only the one that changed. See `revocation_buckets` for a plain list.
    revoked: Buckets = NO_REVOCATIONS
    # Job ids denied since the buckets were last sealed (sorted), in a configuration of their own: a revocation
    # re-sends this short list, not the bucket it will join (credentials/revocations.py says when they merge).
    revoked_recently: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.revoked) != REVOCATION_BUCKETS:
            raise ValueError(f"revoked must hold {REVOCATION_BUCKETS} buckets, got {len(self.revoked)}")

    @property
    def revoked_jobs(self) -> tuple[str, ...]:
        """Every denied job id, sorted (for status, tests and tools; the compiler reads the buckets)."""
        return tuple(sorted({*self.revoked_recently, *(job for bucket in self.revoked for job in bucket)}))
