"""Google Cloud credentials for a backend: workload identity federation, then service account impersonation.

The flow (docs/gcp-credentials.md has the Google side a team configures):

1. The control plane signs a short JWT with its own signing key (controlplane/credentials/keys.py): `iss` its
   issuer URL, `sub` = `backend:<name>`, `aud` = the provider's default allowed audience
   `https://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X`.
2. Security Token Service `POST /v1/token` (RFC 8693 token exchange, form-encoded as Google's client libraries
   send it) trades it for a federated access token (audience `//iam.googleapis.com/projects/N/...`).
3. IAM Credentials `POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken` (scopes, lifetime) or
   `:generateIdToken` (audience, includeEmail), authorised by the federated token, returns the credential Envoy
   will send as `Authorization: Bearer`.

Two parts here, the schedule and the loop being shared with AWS (cloud/refresh.py, docs/cloud-refresh.md):
- `fetch_credential` is the aiohttp adapter: one STS + IAM Credentials round trip.
- `GcpCredentialRefresher` runs it on the shared schedule. A failed refresh keeps the last credential until it
  expires, then `current()` is None: the caller fails closed (injects nothing).

No token ever reaches a log line, an exception message or a repr: errors carry Google's error code and a
truncated description only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import aiohttp
import jwt

from controlplane.cloud import refresh
from controlplane.cloud.refresh import Failure, RefreshPolicy
from controlplane.credentials.keys import ALGORITHM, SigningKeys

log = logging.getLogger("controlplane.cloud.gcp")

STS_URL: Final = "https://sts.googleapis.com/v1/token"
IAM_CREDENTIALS_URL: Final = "https://iamcredentials.googleapis.com/v1"
TOKEN_EXCHANGE_GRANT: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"
CLOUD_PLATFORM: Final = "https://www.googleapis.com/auth/cloud-platform"
MAX_LIFETIME: Final = 43200  # 12 h: Google's ceiling with the lifetime-extension organisation policy (else 3600)
ID_TOKEN_LIFETIME: Final = 3600  # Google's ID tokens live an hour
SUBJECT_TOKEN_TTL: Final = 300  # the JWT we sign is used once, at once

_PROVIDER = re.compile(
    r"^projects/(?P<project>[0-9]+)/locations/global/workloadIdentityPools/(?P<pool>[a-z0-9-]{4,32})"
    r"/providers/(?P<provider>[a-z0-9-]{4,32})$"
)
_SERVICE_ACCOUNT = re.compile(r"^[a-z0-9-]{6,30}@[a-z0-9.-]+$")
_DESCRIPTION_LIMIT = 200
# Google's answers are a few kB (an ID token ~1 kB); past this an answer is refused unread, not held in memory.
MAX_ANSWER_BYTES: Final = 64 * 1024

# -- metrics: the shared cloud family (cloud/metrics.py); the exchange's own reasons map onto its vocabulary

REFRESH_RESULTS: Final = ("ok", "sts_refused", "iam_refused", "unreachable", "malformed", "unsigned", "error")
METRIC_RESULT: Final = {
    "ok": "ok",
    "sts_refused": "refused",
    "iam_refused": "refused",
    "unreachable": "unavailable",
    "malformed": "malformed",
    "unsigned": "unsigned",
    "error": "error",
}


# -- settings


@dataclass(frozen=True)
class GcpSettings:
    """A backend's `gcp:` block. An `id_token_audience` asks for an ID token (Cloud Run style) instead of an
    OAuth access token for `scopes`."""

    backend: str
    workload_identity_provider: str  # projects/N/locations/global/workloadIdentityPools/P/providers/X
    service_account: str
    scopes: tuple[str, ...] = (CLOUD_PLATFORM,)
    id_token_audience: str | None = None
    lifetime: int = 3600
    sts_url: str = STS_URL
    iam_credentials_url: str = IAM_CREDENTIALS_URL

    def __post_init__(self) -> None:
        if not _PROVIDER.match(self.workload_identity_provider):
            raise ValueError(
                "workload_identity_provider must be projects/NUMBER/locations/global/workloadIdentityPools/POOL"
                f"/providers/PROVIDER, got {self.workload_identity_provider!r}"
            )
        if not _SERVICE_ACCOUNT.match(self.service_account):
            raise ValueError(f"service_account must be a service account email, got {self.service_account!r}")
        if self.id_token_audience is None and not self.scopes:
            raise ValueError("an access token needs at least one scope")
        if self.id_token_audience == "":
            raise ValueError("id_token_audience must not be empty")
        if not 1 <= self.lifetime <= MAX_LIFETIME:
            raise ValueError(f"lifetime must be between 1 and {MAX_LIFETIME} seconds")

    @property
    def sts_audience(self) -> str:
        """The STS `audience` parameter: the provider's full resource name."""
        return "//iam.googleapis.com/" + self.workload_identity_provider

    @property
    def subject_audience(self) -> str:
        """The `aud` of the JWT we sign: the provider's default allowed audience."""
        return "https://iam.googleapis.com/" + self.workload_identity_provider

    @property
    def subject(self) -> str:
        """The `sub` Google maps to `google.subject`; a team's attribute condition names it."""
        return f"backend:{self.backend}"


@dataclass(frozen=True)
class CloudCredential:
    """A secret Envoy sends, and when it stops working. The secret never appears in a repr."""

    token: str = field(repr=False)
    expires_at: float
    issued_at: float


# -- the subject token we sign


def mint_subject_token(keys: SigningKeys, issuer: str, settings: GcpSettings, now: float) -> str:
    """The JWT STS verifies against our published JWKS. Short-lived: it is exchanged at once."""
    key = keys.signing_key()
    issued = int(now)
    claims = {
        "iss": issuer,
        "sub": settings.subject,
        "aud": settings.subject_audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + SUBJECT_TOKEN_TTL,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"})


# -- the aiohttp adapter


class GcpExchangeError(Exception):
    """A refused or failed step. `result` is a REFRESH_RESULTS label; the message holds no token."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


async def fetch_credential(
    session: aiohttp.ClientSession, settings: GcpSettings, subject_token: str, now: float
) -> CloudCredential:
    """Exchange `subject_token` at STS, then impersonate the service account. `now` dates the credential."""
    federated = await _exchange(session, settings, subject_token)
    name = f"projects/-/serviceAccounts/{settings.service_account}"
    headers = {"Authorization": f"Bearer {federated}"}
    if settings.id_token_audience is not None:
        body: dict[str, Any] = {"audience": settings.id_token_audience, "includeEmail": True}
        answer = await _post_json(session, f"{settings.iam_credentials_url}/{name}:generateIdToken", body, headers)
        token = _string(answer, "token")
        return CloudCredential(token, expires_at=_believed(_jwt_expiry(token), settings, now), issued_at=now)
    body = {"scope": list(settings.scopes), "lifetime": f"{settings.lifetime}s"}
    answer = await _post_json(session, f"{settings.iam_credentials_url}/{name}:generateAccessToken", body, headers)
    token = _string(answer, "accessToken")
    expires_at = _believed(_rfc3339(_string(answer, "expireTime")), settings, now)
    return CloudCredential(token, expires_at=expires_at, issued_at=now)


def _believed(expires_at: float, settings: GcpSettings, now: float) -> float:
    """An expiry believed only up to the lifetime asked (an ID token: Google's hour, or the lifetime if longer):
    a later one (year 9999 from a broken or hostile endpoint) would never be refreshed while Google ends the
    token on time."""
    return min(expires_at, now + max(settings.lifetime, ID_TOKEN_LIFETIME))


async def _exchange(session: aiohttp.ClientSession, settings: GcpSettings, subject_token: str) -> str:
    form = {
        "grant_type": TOKEN_EXCHANGE_GRANT,
        "audience": settings.sts_audience,
        "scope": CLOUD_PLATFORM,  # what the federated token needs to call IAM Credentials
        "requested_token_type": ACCESS_TOKEN_TYPE,
        "subject_token_type": JWT_TOKEN_TYPE,
        "subject_token": subject_token,
    }
    try:
        async with session.post(settings.sts_url, data=form) as response:
            status, text = response.status, await _bounded_text(response)
    except (TimeoutError, aiohttp.ClientError) as error:
        raise GcpExchangeError("unreachable", f"STS unreachable: {type(error).__name__}") from None
    answer = _json(text)
    if status != 200:
        kind = "unreachable" if status >= 500 else "sts_refused"
        code, description = answer.get("error"), answer.get("error_description")
        raise GcpExchangeError(kind, f"STS answered {status} {_short(code)}: {_short(description)}")
    if answer.get("token_type", "Bearer") != "Bearer":
        raise GcpExchangeError("malformed", "STS issued a token that is not a bearer token")
    return _string(answer, "access_token", step="STS")


async def _post_json(
    session: aiohttp.ClientSession, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
) -> dict[str, Any]:
    try:
        async with session.post(url, json=body, headers=headers) as response:
            status, text = response.status, await _bounded_text(response)
    except (TimeoutError, aiohttp.ClientError) as error:
        raise GcpExchangeError("unreachable", f"IAM Credentials unreachable: {type(error).__name__}") from None
    answer = _json(text)
    if status != 200:
        kind = "unreachable" if status >= 500 else "iam_refused"
        detail = answer.get("error")
        status_name = detail.get("status") if isinstance(detail, dict) else None
        message = detail.get("message") if isinstance(detail, dict) else None
        raise GcpExchangeError(kind, f"IAM Credentials answered {status} {_short(status_name)}: {_short(message)}")
    return answer


async def _bounded_text(response: aiohttp.ClientResponse) -> str:
    """The answer's text, refused past MAX_ANSWER_BYTES (a huge body would otherwise be held whole in memory)."""
    too_large = GcpExchangeError("malformed", f"an answer over {MAX_ANSWER_BYTES} bytes")
    if response.content_length is not None and response.content_length > MAX_ANSWER_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):  # `read(n)` returns what has arrived, not n
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise too_large
    return body.decode("utf-8", "replace")


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _string(answer: Mapping[str, Any], name: str, step: str = "IAM Credentials") -> str:
    value = answer.get(name)
    if not isinstance(value, str) or not value:
        raise GcpExchangeError("malformed", f"{step} answer lacks {name}")
    return value


def _short(value: object) -> str:
    text = value if isinstance(value, str) else "-"
    return text[:_DESCRIPTION_LIMIT]


def _rfc3339(value: str) -> float:
    """Google's Timestamp JSON: `2026-12-06T22:00:00.123456789Z`, nanoseconds allowed (Python takes micro)."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z$", value)
    if match is None:
        raise GcpExchangeError("malformed", "IAM Credentials expireTime is not an RFC 3339 UTC time")
    whole = datetime.fromisoformat(match.group(1) + "+00:00").timestamp()
    return whole + float("0" + (match.group(2) or ".0"))


def _jwt_expiry(token: str) -> float:
    """An ID token's `exp`, read without verifying: we only schedule with it, the backend verifies it."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims["exp"]
    except (IndexError, ValueError, KeyError, TypeError):
        raise GcpExchangeError("malformed", "IAM Credentials returned an ID token without a readable exp") from None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise GcpExchangeError("malformed", "IAM Credentials returned an ID token whose exp is not a number")
    return float(exp)


# -- the refresher: the shared schedule and loop (cloud/refresh.py) on the exchange


Fetch = Callable[[GcpSettings, float], Awaitable[CloudCredential]]


def _failure(caught: Exception) -> Failure | None:
    """The exchange's own reasons on the shared metric's vocabulary; anything else is a bug (None: `error`)."""
    if isinstance(caught, GcpExchangeError):
        return Failure(METRIC_RESULT.get(caught.result, "error"), str(caught))
    return None


class GcpCredentialRefresher(refresh.Refresher[CloudCredential]):
    """Keeps one backend's credential fresh. `current()` is what the SDS injection reads; `on_change` hears every
    change of it (a new token, or none once the last one is past use)."""

    def __init__(
        self,
        settings: GcpSettings,
        fetch: Fetch,
        *,
        clock: Callable[[], float] = time.time,
        policy: RefreshPolicy | None = None,
        sample: Callable[[], float] = random.random,
        on_change: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(
            "gcp",
            settings.backend,
            classify=_failure,
            describe=lambda _credential: f"service account {settings.service_account}",
            policy=policy,
            clock=clock,
            sample=sample,
            on_change=None if on_change is None else (lambda _current: on_change()),
            logger=log,
        )
        self.settings = settings
        self._fetch = fetch

    async def refresh_once(self) -> bool:
        """One attempt, due or not; True when a new credential is held. Never raises (except cancellation): a
        refused or failed exchange, or a bug, is counted, logged and retried with backoff."""
        try:
            credential = await self._fetch(self.settings, self._clock())
        except Exception as caught:
            self.failed(caught)
            return False
        held = self.succeeded(credential)
        self.settle()
        return held

    async def run(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Refresh whenever due and withdraw the credential when it expires unrefreshed, until cancelled."""
        await self.run_async(lambda: self._fetch(self.settings, self._clock()), sleep)


def http_fetcher(session: aiohttp.ClientSession, keys: SigningKeys, issuer: str) -> Fetch:
    """A `fetch` signing the subject token with `keys` directly (`mint_subject_token`), then exchanging it. Not the
    one serve uses: runtime/gcp_backends.py signs through the OIDC issuer's `RelyingPartyTokens`, then calls
    `fetch_credential` the same way."""

    async def fetch(settings: GcpSettings, now: float) -> CloudCredential:
        try:
            subject_token = mint_subject_token(keys, issuer, settings, now)
        except RuntimeError:  # keys.signing_key(): no key may sign yet
            raise GcpExchangeError("unsigned", "no signing key may sign yet") from None
        return await fetch_credential(session, settings, subject_token, now)

    return fetch
