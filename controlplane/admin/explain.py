"""`POST /explain` on the admin port: a running server's answer to "why was I denied?".

Offline, `controlplane explain` knows the policy files; a running serve knows more: GitLab's live state (the
resolution it compiled), the revoked jobs and its exchanged credentials. The body is JSON: the token's claims
(never the token: the CLI decodes it and sends the claims) and the request. Strict: unknown fields, wrong types
and bodies over MAX_BODY_BYTES are 400s that say what is wrong. The claims are never logged.

`explain_inputs` is also what the CLI builds offline, so both ask the pure `controlplane.resolved.explain` the
same question the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from controlplane.compiler.jwt import CREDENTIAL_CLOCK_SKEW_SECONDS
from controlplane.compiler.rbac import exchanged_grants
from controlplane.model.credentials import EXCHANGE_PATH, CredentialInputs
from controlplane.model.policy import Policy, Role
from controlplane.resolved.access import Grant, ResolvedPolicy
from controlplane.resolved.explain import Credentials, ExplainInputs, Request, strict_json_loads

MAX_BODY_BYTES = 64 * 1024  # a token's claims are a few KiB
MAX_TEXT = 8192  # method, host, path, gateway
FIELDS = {"claims": dict, "method": str, "host": str, "path": str, "gateway": str, "port": int, "token_problem": str}
REQUIRED = ("method", "host", "path")


class BadExplainRequest(ValueError):
    """A body the endpoint refuses (400), with the reason in words."""


def parse_body(raw: bytes) -> tuple[dict[str, Any] | None, Request, str | None]:
    """The claims (None: the request carries no token), the request, and why the token cannot be read (the
    CLI says so when Envoy could not read it: then no claims), from `POST /explain`'s JSON body."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadExplainRequest(f"body over {MAX_BODY_BYTES} bytes")
    try:
        body = strict_json_loads(raw)
    except RecursionError:
        raise BadExplainRequest("body is not JSON this endpoint reads: it nests too deep") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise BadExplainRequest(f"body is not JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise BadExplainRequest("body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadExplainRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    missing = [name for name in REQUIRED if name not in body]
    if missing:
        raise BadExplainRequest(f"missing field(s): {', '.join(missing)}")
    for name, value in body.items():
        kind = FIELDS[name]
        if value is None and name in ("claims", "gateway", "port", "token_problem"):
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadExplainRequest(f"{name} must be a JSON {_kind_name(kind)}")
        if isinstance(value, str) and (len(value) > MAX_TEXT or (name != "gateway" and not value)):
            raise BadExplainRequest(f"{name} must be 1 to {MAX_TEXT} characters")
    if not body["path"].startswith("/"):
        raise BadExplainRequest("path must start with '/'")
    port = body.get("port")
    if port is not None and not 0 < port < 65536:
        raise BadExplainRequest("port must be 1 to 65535")
    problem = body.get("token_problem")
    if problem is not None and body.get("claims") is not None:
        raise BadExplainRequest("a token Envoy cannot read has no claims: give claims or token_problem, not both")
    request = Request(body["method"], body["host"], body["path"], body.get("gateway"), port)
    return body.get("claims"), request, problem


def _kind_name(kind: type) -> str:
    return {dict: "object", str: "string", int: "integer"}[kind]


class _ExchangedGrants(Mapping[str, tuple[Grant, ...]]):
    """The `exchanged/<role>` grants by backend, built for the backend asked about only: building them for
    every role on each `POST /explain` took tens of milliseconds of the event loop on a large policy."""

    def __init__(self, issuer: str, roles: Mapping[str, list[Role]]) -> None:
        self._issuer = issuer
        self._roles = roles

    def __getitem__(self, backend: str) -> tuple[Grant, ...]:
        return exchanged_grants(self._issuer, self._roles[backend])

    def __iter__(self) -> Iterator[str]:
        return iter(self._roles)

    def __len__(self) -> int:
        return len(self._roles)


def serve_default_credentials(exchange: bool) -> CredentialInputs | None:
    """Offline, what serve's flags would give: by default the exchange is on (the credential provider and the
    exchange route on every host, whatever the keys), `--no-exchange` neither. Only their presence is read."""
    if not exchange:
        return None
    return CredentialInputs(jwks="(keys of a running serve)", exchange_address=("0.0.0.0", 0))


def explain_inputs(
    policy: Policy, resolved: ResolvedPolicy, credentials: CredentialInputs | None, *, revocations_known: bool
) -> ExplainInputs:
    """What the gateways were compiled from, as `explain` reads it: the revoked jobs, and (with the exchange
    on) the control plane's credential provider and `exchanged/<role>` grants, built by the compiler's own
    `exchanged_grants`."""
    if credentials is None:
        return ExplainInputs(policy, resolved, revocations_known=revocations_known)
    provider = None
    if credentials.jwks:
        by_backend: dict[str, list[Role]] = defaultdict(list)
        for role in sorted(policy.roles, key=lambda r: r.name):
            by_backend[role.backend].append(role)
        grants = _ExchangedGrants(credentials.issuer, by_backend)
        provider = Credentials(credentials.issuer, CREDENTIAL_CLOCK_SKEW_SECONDS, grants)
    return ExplainInputs(
        policy,
        resolved,
        revoked=frozenset(credentials.revoked_jobs),
        revocations_known=revocations_known,
        credentials=provider,
        exchange_path=EXCHANGE_PATH if credentials.exchange_address is not None else None,
    )
