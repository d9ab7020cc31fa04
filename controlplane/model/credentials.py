"""What the compiler needs to know about the control plane's own credentials (issue 4).

These are inputs like the relayed JWKS: produced at run time by the credentials service, passed to the
pure compiler, which turns them into a jwt_authn provider, role-based RBAC, a revocation deny list and a
route to the token-exchange endpoint on every gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

CREDENTIAL_ISSUER = "urn:controlplane:credentials"
EXCHANGE_PATH = "/.controlplane/token"  # reachable on every gateway listener, and on the control plane directly


@dataclass(frozen=True)
class CredentialInputs:
    issuer: str = CREDENTIAL_ISSUER
    # The public keys Envoy must accept (canonical JWKS JSON): the signing key, the next one, and every
    # retired key whose credentials may still be alive. None: exchange not enabled, no provider emitted.
    jwks: str | None = None
    # Where gateways send EXCHANGE_PATH (the control plane's exchange listener); None: no route emitted.
    exchange_address: tuple[str, int] | None = None
    # Job ids denied fleet-wide (their credentials and, optionally, their raw ID tokens). The service drops
    # an entry once every credential of that job has expired; the compiler only lists them.
    revoked_jobs: tuple[str, ...] = ()
