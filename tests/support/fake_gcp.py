"""A fake Google Cloud over real HTTP: Security Token Service, IAM Credentials, and a Google API that checks tokens.

Why a fake that checks everything: the control plane's Google Cloud credentials are only as right as the requests
it sends, and a permissive fake would pass a request Google refuses. Each field is checked as Google documents it
(docs/gcp-credentials.md restates what we rely on), and every refusal uses Google's error shape:

- STS `POST /v1/token` (RFC 8693): `grant_type` must be the token-exchange grant; `audience` the full resource
  name `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X` of a configured
  provider; `requested_token_type` the access-token URN; `subject_token_type` the JWT or ID-token URN; `scope`
  present. The subject token is VERIFIED against the JWKS the provider trusts (signature, kid, `iss`, `aud` in the
  allowed audiences, `exp` in the future, `iat` not in the future, life at most 24 h), mapped
  (`google.subject = assertion.sub`) and passed through the provider's attribute condition (a CEL subset:
  `assertion.CLAIM == 'v'` and `assertion.CLAIM.startsWith('p')` joined by `&&`). Refusals are OAuth errors
  `{"error", "error_description"}`. Form-encoded (what Google's client libraries send) or JSON bodies; a JSON
  body with a field the REST reference does not name is refused (as Google's JSON parsing does), an `options`
  that is not a serialized JSON object too, and so is a request carrying an `Authorization` header (the reference:
  do not send one, it can make the call fail).
- IAM Credentials `POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken` (`scope` list, `lifetime`
  "Ns" up to `max_lifetime`, `delegates`) and `:generateIdToken` (`audience`, `includeEmail`), no other body
  field, each delegate as `projects/-/serviceAccounts/ID`: only a live
  federated token whose principal is a member of the service account's workload identity binding, and whose
  scopes include cloud-platform or iam (google-auth asks STS for iam when it impersonates). Refusals are
  `{"error": {"code", "message", "status"}}`; `expireTime` has whole seconds, as google-auth parses it.
- `FakeGoogleApi` accepts only live access tokens IAM Credentials issued (with the scope it requires) or, when
  configured with an audience, ID tokens the fake signed for it; 401 UNAUTHENTICATED otherwise.

Time comes from an injected clock, so expiry is tested without waiting. Servers run in threads (LoopbackHTTPServer,
like the fake GitLab), so the same fake serves sync tests, an asyncio client and Envoy alike.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qs

import jwt

from .backends import LoopbackHTTPServer, Request, Response, ServedOverLoopback, json_response
from .fake_oidc import SigningKey

TOKEN_EXCHANGE_GRANT: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES: Final = ("urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token")
CLOUD_PLATFORM: Final = "https://www.googleapis.com/auth/cloud-platform"
IAM_CREDENTIALS_SCOPES: Final = frozenset({CLOUD_PLATFORM, "https://www.googleapis.com/auth/iam"})  # either will do
GOOGLE_ISSUER: Final = "https://accounts.google.com"
MAX_SUBJECT_LIFE: Final = 86400

_PROVIDER = re.compile(
    r"^(projects/[0-9]+/locations/global/workloadIdentityPools/[a-z0-9-]{4,32})/providers/[a-z0-9-]+$"
)
_CLAUSE = re.compile(r"""^assertion\.(\w+)\s*(?:==\s*'([^']*)'|\.startsWith\('([^']*)'\))$""")
_LIFETIME = re.compile(r"^([0-9]+)(?:\.[0-9]{1,9})?s$")
_FORM_FIELDS: Final[dict[str, str]] = {
    "grantType": "grant_type",
    "requestedTokenType": "requested_token_type",
    "subjectToken": "subject_token",
    "subjectTokenType": "subject_token_type",
}
# The fields of the STS REST reference's JSON body (each also by its proto name, as Google's JSON parsing accepts).
_STS_JSON_FIELDS: Final = frozenset({*_FORM_FIELDS, *_FORM_FIELDS.values(), "audience", "scope", "options"})
# The request bodies of IAM Credentials' two methods, as its REST reference lists them.
_IAM_FIELDS: Final[dict[str, frozenset[str]]] = {
    "generateAccessToken": frozenset({"delegates", "scope", "lifetime"}),
    "generateIdToken": frozenset({"delegates", "audience", "includeEmail"}),
}
_DELEGATE = re.compile(r"^projects/-/serviceAccounts/[^/]+$")


@dataclass(frozen=True)
class Provider:
    """A workload identity pool OIDC provider: whom it trusts and on what condition."""

    resource: str  # projects/N/locations/global/workloadIdentityPools/P/providers/X
    issuer: str
    jwks: Callable[[], str]  # the JWKS the provider trusts (uploaded, or what the issuer publishes now)
    # empty: Google's default, the provider's full resource name with or without the https prefix
    allowed_audiences: tuple[str, ...] = ()
    attribute_condition: str | None = None

    def __post_init__(self) -> None:
        if not _PROVIDER.match(self.resource):
            raise ValueError(f"not a provider resource name: {self.resource!r}")
        if self.attribute_condition is not None:
            _clauses(self.attribute_condition)  # refused when created, as Google validates it

    @property
    def pool(self) -> str:
        match = _PROVIDER.match(self.resource)
        assert match is not None
        return match.group(1)

    @property
    def audiences(self) -> tuple[str, ...]:
        name = "//iam.googleapis.com/" + self.resource
        return self.allowed_audiences or ("https:" + name, name)


def principal(pool: str, subject: str) -> str:
    """The IAM member naming one federated identity."""
    return f"principal://iam.googleapis.com/{pool}/subject/{subject}"


def every_identity(pool: str) -> str:
    """The IAM member naming every identity of a pool."""
    return f"principalSet://iam.googleapis.com/{pool}/*"


@dataclass
class ServiceAccount:
    email: str
    members: set[str]  # granted roles/iam.workloadIdentityUser on it
    unique_id: str = field(default_factory=lambda: str(secrets.randbelow(10**21)).rjust(21, "1"))


@dataclass(frozen=True)
class Federated:
    pool: str
    subject: str
    scopes: tuple[str, ...]
    expires_at: float


@dataclass(frozen=True)
class Issued:
    service_account: str
    scopes: tuple[str, ...]
    expires_at: float


def _clauses(condition: str) -> list[tuple[str, str | None, str | None]]:
    out = []
    for clause in condition.split("&&"):
        match = _CLAUSE.match(clause.strip())
        if match is None:
            raise ValueError(f"attribute condition outside the supported CEL subset: {clause.strip()!r}")
        out.append((match.group(1), match.group(2), match.group(3)))
    return out


def condition_holds(condition: str, claims: Mapping[str, Any]) -> bool:
    for claim, equals, prefix in _clauses(condition):
        value = claims.get(claim)
        if not isinstance(value, str):
            return False
        if equals is not None and value != equals:
            return False
        if prefix is not None and not value.startswith(prefix):
            return False
    return True


def oauth_error(error: str, description: str, status: int = 400) -> Response:
    return json_response({"error": error, "error_description": description}, status=status)


def google_error(code: int, status: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message, "status": status}}, status=code)


def rfc3339(when: float) -> str:
    """Whole seconds, as Google answers (google-auth parses exactly `%Y-%m-%dT%H:%M:%SZ`)."""
    return datetime.fromtimestamp(int(when), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class FakeGcp(ServedOverLoopback):
    """STS and IAM Credentials on one loopback server (paths differ: `/v1/token`, `/v1/projects/...`)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_lifetime: int = 3600, federated_ttl: int = 3600
    ) -> None:
        self.clock = clock
        self.max_lifetime = max_lifetime
        self.federated_ttl = federated_ttl
        self.providers: dict[str, Provider] = {}  # by STS audience
        self.service_accounts: dict[str, ServiceAccount] = {}
        self.federated: dict[str, Federated] = {}
        self.access_tokens: dict[str, Issued] = {}
        self.id_key = SigningKey.generate()
        self.outage: set[str] = set()  # "sts" / "iam": answer 503 while listed
        self._lock = threading.Lock()
        self._server = LoopbackHTTPServer(name="fake-gcp")
        self._server.router.add("POST", "/v1/token", self._sts)
        self._server.router.add("POST", "/v1/projects/{project}/serviceAccounts/{call}", self._iam)

    # -- configuration

    def add_provider(self, provider: Provider) -> Provider:
        self.providers["//iam.googleapis.com/" + provider.resource] = provider
        return provider

    def add_service_account(self, email: str, *members: str) -> ServiceAccount:
        account = ServiceAccount(email, set(members))
        self.service_accounts[email] = account
        return account

    @property
    def sts_url(self) -> str:
        return self.base_url + "/v1/token"

    @property
    def iam_credentials_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def requests(self) -> list[Request]:
        return self._server.requests

    def id_token_jwks(self) -> str:
        return json.dumps({"keys": [dict(self.id_key.public_jwk)]})

    # -- STS

    def _sts(self, request: Request) -> Response:
        if "sts" in self.outage:
            return google_error(503, "UNAVAILABLE", "The service is currently unavailable.")
        try:
            if "authorization" in request.headers:
                raise _Refused(oauth_error("invalid_request", "STS takes no Authorization header: send none."))
            fields = _sts_fields(request)
            provider = self._check_sts_fields(fields)
            claims = self._verify_subject(provider, fields["subject_token"])
        except _Refused as refused:
            return refused.response
        token = "fed." + secrets.token_urlsafe(32)
        with self._lock:
            self.federated[token] = Federated(
                provider.pool, claims["sub"], tuple(fields["scope"].split()), self.clock() + self.federated_ttl
            )
        return json_response(
            {
                "access_token": token,
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "Bearer",
                "expires_in": self.federated_ttl,
            }
        )

    def _check_sts_fields(self, fields: Mapping[str, str]) -> Provider:
        for name in ("grant_type", "subject_token", "subject_token_type", "requested_token_type", "audience"):
            if not fields.get(name):
                raise _Refused(oauth_error("invalid_request", f"The request is missing a required parameter: {name}"))
        if fields["grant_type"] != TOKEN_EXCHANGE_GRANT:
            raise _Refused(oauth_error("unsupported_grant_type", "The grant type is not supported."))
        if fields["requested_token_type"] != ACCESS_TOKEN_TYPE:
            raise _Refused(oauth_error("invalid_request", "Invalid value for requested_token_type."))
        if fields["subject_token_type"] not in SUBJECT_TOKEN_TYPES:
            raise _Refused(oauth_error("invalid_request", "Invalid value for subject_token_type."))
        if not fields.get("scope"):
            raise _Refused(oauth_error("invalid_scope", "The request is missing a scope."))
        if "options" in fields and not _json_object(fields["options"]):
            raise _Refused(oauth_error("invalid_request", "options must be a serialized JSON object."))
        provider = self.providers.get(fields["audience"])
        if provider is None:
            raise _Refused(oauth_error("invalid_target", "The target service indicated by the audience is invalid."))
        return provider

    def _verify_subject(self, provider: Provider, token: str) -> dict[str, Any]:
        def refuse(description: str) -> _Refused:
            return _Refused(oauth_error("invalid_grant", description))

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise refuse("The subject token is not a valid JWT.") from None
        if header.get("alg") not in ("RS256", "ES256"):
            raise refuse("The subject token's algorithm is not supported.")
        keys = [k for k in jwt.PyJWKSet.from_json(provider.jwks()).keys if k.key_id == header.get("kid")]
        if not keys:
            raise refuse("The subject token's kid is not in the provider's JWKS.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                keys[0].key,
                algorithms=[header["alg"]],
                options={
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError:
            raise refuse("The subject token's signature is invalid.") from None
        self._check_claims(provider, claims, refuse)
        return claims

    def _check_claims(self, provider: Provider, claims: dict[str, Any], refuse: Callable[[str], _Refused]) -> None:
        now = self.clock()
        if claims.get("iss") != provider.issuer:
            raise refuse("The issuer in the subject token does not match the provider's issuer.")
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences
        if not isinstance(audiences, list) or not set(audiences) & set(provider.audiences):
            raise refuse("The audience in the subject token does not match the expected audience.")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise refuse("The subject token must carry numeric exp and iat.")
        if exp <= now:
            raise refuse("The subject token has expired.")
        if iat > now + 60:
            raise refuse("The subject token was issued in the future.")
        if exp - iat > MAX_SUBJECT_LIFE:
            raise refuse("The subject token's lifetime exceeds 24 hours.")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject.encode()) > 127:
            raise refuse("The mapped google.subject is missing or longer than 127 bytes.")
        if provider.attribute_condition is not None and not condition_holds(provider.attribute_condition, claims):
            raise _Refused(
                oauth_error("unauthorized_client", "The given credential is rejected by the attribute condition.")
            )

    # -- IAM Credentials

    def _iam(self, request: Request) -> Response:
        if "iam" in self.outage:
            return google_error(503, "UNAVAILABLE", "The service is currently unavailable.")
        email, _, method = request.params["call"].rpartition(":")
        if method not in ("generateAccessToken", "generateIdToken"):
            return google_error(404, "NOT_FOUND", f"Method not found: {method}")
        try:
            caller = self._caller(request)
            if request.params["project"] != "-":
                raise _Refused(google_error(400, "INVALID_ARGUMENT", "The project must be the - wildcard."))
            body = _json_body(request)
            unknown = sorted(set(body) - _IAM_FIELDS[method])
            if unknown:
                raise _Refused(
                    google_error(
                        400, "INVALID_ARGUMENT", f'Invalid JSON payload received. Unknown name "{unknown[0]}".'
                    )
                )
            account = self._impersonable(caller, email, body)
            if method == "generateAccessToken":
                return self._access_token(account, body)
            return self._id_token(account, body)
        except _Refused as refused:
            return refused.response

    def _caller(self, request: Request) -> Federated:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            federated = self.federated.get(token) if scheme == "Bearer" else None
        if federated is None or federated.expires_at <= self.clock():
            raise _Refused(google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."))
        if not set(federated.scopes) & IAM_CREDENTIALS_SCOPES:
            raise _Refused(google_error(403, "PERMISSION_DENIED", "Request had insufficient authentication scopes."))
        return federated

    def _impersonable(self, caller: Federated, email: str, body: Mapping[str, Any]) -> ServiceAccount:
        account = self.service_accounts.get(email)
        denied = google_error(
            403,
            "PERMISSION_DENIED",
            "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
        )
        if account is None:
            raise _Refused(denied)
        delegates = body.get("delegates") or []  # google-auth sends null
        if not isinstance(delegates, list) or any(not isinstance(d, str) or not _DELEGATE.match(d) for d in delegates):
            raise _Refused(
                google_error(400, "INVALID_ARGUMENT", "delegates must be a list of projects/-/serviceAccounts/ID.")
            )
        if delegates:  # a chain needs tokenCreator grants this fake does not model
            raise _Refused(denied)
        if not account.members & {principal(caller.pool, caller.subject), every_identity(caller.pool)}:
            raise _Refused(denied)
        return account

    def _access_token(self, account: ServiceAccount, body: Mapping[str, Any]) -> Response:
        scopes = body.get("scope")
        if not isinstance(scopes, list) or not scopes or any(not isinstance(s, str) or not s for s in scopes):
            raise _Refused(google_error(400, "INVALID_ARGUMENT", "scope must be a non-empty list of scopes."))
        lifetime = _lifetime(body.get("lifetime", "3600s"), self.max_lifetime)
        token = "ya29." + secrets.token_urlsafe(48)
        expires = self.clock() + lifetime
        with self._lock:
            self.access_tokens[token] = Issued(account.email, tuple(scopes), expires)
        return json_response({"accessToken": token, "expireTime": rfc3339(expires)})

    def _id_token(self, account: ServiceAccount, body: Mapping[str, Any]) -> Response:
        audience, include_email = body.get("audience"), body.get("includeEmail", False)
        if not isinstance(audience, str) or not audience:
            raise _Refused(google_error(400, "INVALID_ARGUMENT", "audience is required."))
        if not isinstance(include_email, bool):
            raise _Refused(google_error(400, "INVALID_ARGUMENT", "includeEmail must be a boolean."))
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": GOOGLE_ISSUER,
            "aud": audience,
            "azp": account.unique_id,
            "sub": account.unique_id,
            "iat": now,
            "exp": now + 3600,
        }
        if include_email:
            claims.update(email=account.email, email_verified=True)
        token = jwt.encode(claims, self.id_key.private_key, algorithm="RS256", headers={"kid": self.id_key.kid})
        return json_response({"token": token})

    # -- what the fake API accepts

    def access_token_holder(self, token: str, scope: str) -> str | None:
        """The service account of a live access token carrying `scope`, else None."""
        with self._lock:
            issued = self.access_tokens.get(token)
        if issued is None or issued.expires_at <= self.clock() or scope not in issued.scopes:
            return None
        return issued.service_account

    def id_token_holder(self, token: str, audience: str) -> str | None:
        """The email of a valid ID token this fake signed for `audience`, else None."""
        try:
            claims = jwt.decode(
                token,
                self.id_key.private_key.public_key(),
                algorithms=["RS256"],
                audience=audience,
                issuer=GOOGLE_ISSUER,
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            return None
        if claims["exp"] <= self.clock():
            return None
        email = claims.get("email")
        return email if isinstance(email, str) else str(claims["sub"])


def _sts_fields(request: Request) -> dict[str, str]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type == "application/x-www-form-urlencoded":
        parsed = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
        return {name: values[0] for name, values in parsed.items()}
    if content_type == "application/json":
        try:
            body = json.loads(request.body)
        except ValueError:
            raise _Refused(oauth_error("invalid_request", "The request body is not valid JSON.")) from None
        if not isinstance(body, dict):
            raise _Refused(oauth_error("invalid_request", "The request body is not a JSON object."))
        unknown = sorted(str(k) for k in body if k not in _STS_JSON_FIELDS)
        if unknown:
            raise _Refused(
                oauth_error("invalid_request", f'Invalid JSON payload received. Unknown name "{unknown[0]}".')
            )
        return {_FORM_FIELDS.get(str(k), str(k)): v for k, v in body.items() if isinstance(v, str)}
    raise _Refused(oauth_error("invalid_request", "Unsupported content type."))


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _json_body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise _Refused(google_error(400, "INVALID_ARGUMENT", "The request body must be JSON."))
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise _Refused(google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")) from None
    if not isinstance(body, dict):
        raise _Refused(google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
    return body


def _lifetime(value: object, maximum: int) -> int:
    match = _LIFETIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise _Refused(google_error(400, "INVALID_ARGUMENT", "lifetime must be a duration such as 3600s."))
    seconds = int(match.group(1))
    if not 0 < seconds <= maximum:
        raise _Refused(google_error(400, "INVALID_ARGUMENT", f"The lifetime must be between 1 and {maximum} seconds."))
    return seconds


class FakeGoogleApi(ServedOverLoopback):
    """A Google API backend: any path answers 200 with the caller's service account when the bearer token is one
    the fake issued and still live; 401 UNAUTHENTICATED (Google's shape and WWW-Authenticate) otherwise."""

    def __init__(self, gcp: FakeGcp, *, scope: str = CLOUD_PLATFORM, id_token_audience: str | None = None) -> None:
        self.gcp = gcp
        self.scope = scope
        self.id_token_audience = id_token_audience
        self._server = LoopbackHTTPServer(name="fake-google-api")
        self._server.router.add("*", "/{rest:path}", self._serve)

    def _serve(self, request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        holder = None
        if scheme == "Bearer" and token:
            holder = self.gcp.access_token_holder(token, self.scope)
            if holder is None and self.id_token_audience is not None:
                holder = self.gcp.id_token_holder(token, self.id_token_audience)
        if holder is None:
            response = google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="https://accounts.google.com/"'
            return response
        return json_response({"service_account": holder, "path": request.path})
