"""The control plane as an OpenID Provider for relying parties outside the fleet (issue 16, point 1).

A cloud relying party (AWS IAM's OIDC identity provider, Google Cloud workload identity federation, any other)
trusts tokens the control plane signs once it can fetch, over public HTTPS:

- `<issuer>/.well-known/openid-configuration`: the discovery document (OpenID Connect Discovery 1.0 §4), whose
  `issuer` is exactly the `iss` of every token signed for it and whose `jwks_uri` says where the keys are;
- `<issuer>/.well-known/jwks.json`: the public half of the signing keys (credentials/keys.py): a new key is
  published before it signs and a retired key stays published until the last token it signed has expired, so a
  relying party that refetches no later than the key's publish lead never meets an unknown `kid`.

Both are served by the exchange listener next to EXCHANGE_PATH (credentials/http.py), at the issuer URL's path;
the operator exposes that listener (or a reverse proxy in front of it) at the issuer URL. Both answers are
public: no secret, no per-request state, the same bytes from every replica sharing the keys (keys_pg.py).

Tokens for relying parties (`RelyingPartyTokens.sign`) carry `iss` = the issuer URL; the credentials the token
exchange hands to jobs keep `iss` = CREDENTIAL_ISSUER, so neither kind is accepted where the other is meant.
docs/oidc-issuer.md has the facts relied on.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
from aiohttp import web

from controlplane.credentials.keys import ALGORITHM, SigningKeys

ISSUER_URL_ENV = "CONTROLPLANE_ISSUER_URL"
DISCOVERY_SUFFIX = "/.well-known/openid-configuration"
JWKS_SUFFIX = "/.well-known/jwks.json"
MAX_ISSUER_URL_LENGTH = 255  # AWS IAM's limit on an OIDC provider URL; a longer one could not be registered
# Relying parties may cache the answers this long at most; shorter when the key publish lead is short, so a key
# published for `publish_lead` seconds is seen by a relying party that honours the header before it signs.
MAX_CACHE_SECONDS = 300
MAX_TOKEN_LIFETIME = 3_600  # a token for a relying party is exchanged at once; an hour covers any clock skew
# The claims tokens for relying parties carry (discovery `claims_supported`).
CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti")
_LOOPBACK_NAMES = frozenset({"localhost"})
# Segments of unreserved characters (RFC 3986), none of them "." or "..": the path is compared byte for byte by
# relying parties and becomes a route of the exchange listener, so nothing that could be encoded two ways.
_PATH = re.compile(r"(/(?!\.{1,2}(?:/|$))[A-Za-z0-9._~-]+)*")


class IssuerUrlError(ValueError):
    """The issuer URL is unusable; the message says why (it holds no secret: the URL is public)."""


def parse_issuer_url(text: str) -> str:
    """The issuer URL, checked as relying parties will compare it: https (plain http only on loopback, for
    tests), a host, no user info, query or fragment, no trailing slash (`iss` is compared byte for byte, and
    `<issuer>/.well-known/...` must not become `//.well-known`). Returned unchanged: never normalised, since
    what the operator registers at the cloud provider is what they typed."""
    if len(text) > MAX_ISSUER_URL_LENGTH:
        raise IssuerUrlError(f"the issuer URL is over {MAX_ISSUER_URL_LENGTH} characters")
    if text != text.strip() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise IssuerUrlError("the issuer URL holds whitespace or control characters")
    try:
        parts = urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as error:
        raise IssuerUrlError(f"the issuer URL is malformed: {error}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise IssuerUrlError("the issuer URL must be an absolute https:// URL")
    if parts.scheme == "http" and not _loopback(host):
        raise IssuerUrlError("the issuer URL must use https (plain http only on a loopback address)")
    if parts.username is not None or parts.password is not None:
        raise IssuerUrlError("the issuer URL must not hold user information")
    if parts.query or "?" in text:
        raise IssuerUrlError("the issuer URL must not have a query")
    if parts.fragment or "#" in text:
        raise IssuerUrlError("the issuer URL must not have a fragment")
    if text.endswith("/"):
        raise IssuerUrlError("the issuer URL must not end with '/' (tokens' iss must equal it exactly)")
    if not _PATH.fullmatch(parts.path):
        raise IssuerUrlError("the issuer URL's path may hold only segments of letters, digits and - . _ ~")
    return text


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OidcIssuer:
    """The issuer URL (checked by `parse_issuer_url`) and what follows from it."""

    url: str

    def __post_init__(self) -> None:
        parse_issuer_url(self.url)

    @property
    def path(self) -> str:
        """The URL's path ('' for a bare host): the served paths hang below it."""
        return urlsplit(self.url).path

    @property
    def discovery_path(self) -> str:
        return self.path + DISCOVERY_SUFFIX

    @property
    def jwks_path(self) -> str:
        return self.path + JWKS_SUFFIX

    @property
    def jwks_uri(self) -> str:
        return self.url + JWKS_SUFFIX

    def discovery(self) -> dict[str, Any]:
        """The discovery document. The REQUIRED members of Discovery §3 that mean something for an issuer with no
        end-user login (issuer, jwks_uri, response_types_supported, subject_types_supported,
        id_token_signing_alg_values_supported) and the claims its tokens carry; no authorization or token
        endpoint, as workload issuers (Kubernetes service accounts, CI systems) publish none."""
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "claims_supported": list(CLAIMS),
            "scopes_supported": ["openid"],
        }


def cache_seconds(publish_lead: float) -> int:
    """How long relying parties may cache discovery and JWKS: half the publish lead (a new key reaches one that
    honours the header before it signs), at most MAX_CACHE_SECONDS (a retired key's removal and an emergency
    change propagate), at least 0 (`max-age=0`: revalidate, cheap with the ETag)."""
    return max(0, min(MAX_CACHE_SECONDS, int(publish_lead / 2)))


class OidcEndpoint:
    """GET discovery and JWKS. `jwks()` is the published JWKS, canonical JSON (SigningKeys.published_jwks):
    read at every request (a dictionary lookup and a serialisation), so a rotation shows at once."""

    def __init__(self, issuer: OidcIssuer, jwks: Callable[[], str], *, max_age: int) -> None:
        self.issuer = issuer
        self._jwks = jwks
        self._discovery = _canonical(issuer.discovery())
        self.max_age = max_age

    def routes(self) -> list[web.RouteDef]:
        return [web.get(self.issuer.discovery_path, self.discovery), web.get(self.issuer.jwks_path, self.jwks)]

    async def discovery(self, request: web.Request) -> web.Response:
        return self._answer(request, self._discovery)

    async def jwks(self, request: web.Request) -> web.Response:
        return self._answer(request, self._jwks().encode())

    def _answer(self, request: web.Request, body: bytes) -> web.Response:
        """The body with a strong ETag (its SHA-256, identical on every replica) and public caching headers;
        304 when the client already holds it. A query string is ignored (nothing here reads one)."""
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {
            "Cache-Control": f"public, max-age={self.max_age}",
            "ETag": etag,
            "X-Content-Type-Options": "nosniff",
            "Access-Control-Allow-Origin": "*",  # public metadata; browsers-based tools may read it
        }
        if etag in _etags(request.headers.get("If-None-Match", "")):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",")[:16]}


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class RelyingPartyTokens:
    """Tokens the control plane signs as the issuer, for a relying party to exchange (an STS): signed by the
    current signing key, `iss` the issuer URL, one audience, short-lived."""

    def __init__(self, issuer: OidcIssuer, keys: SigningKeys, *, clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self._keys = keys
        self._clock = clock

    def sign(self, *, subject: str, audience: str, lifetime: int = 300, extra: Mapping[str, Any] | None = None) -> str:
        """A token for `audience` about `subject`. `extra` claims never override the registered ones."""
        if not subject or not audience:
            raise ValueError("a token for a relying party needs a subject and an audience")
        if not 0 < lifetime <= MAX_TOKEN_LIFETIME:
            raise ValueError(f"lifetime must be between 1 and {MAX_TOKEN_LIFETIME} seconds")
        key = self._keys.signing_key()
        now = int(self._clock())
        registered = {
            "iss": self.issuer.url,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": str(uuid.uuid4()),
        }
        payload = {**(extra or {}), **registered}
        return jwt.encode(payload, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"})
