"""`controlplane explain`: what Envoy will do with one request, step by step as Envoy does it, and why.

Given the policy, its resolution (`ResolvedPolicy`, with GitLab's state applied), what a server knows beside
it (the revoked jobs, the exchanged credentials), a token's claims and a request (method, host, path), this
walks the gateway's filter chain as the compiler built it (docs/explain.md):

1. the gateway (by name, by the listener's port, or the one fronting the host) and its virtual host, picked by
   the Host header (no virtual host: jwt_authn's filter-level rule, then the HCM-level RBAC denies);
2. the route: the token-exchange path, a public path (no token, no RBAC), or the backend's default route;
3. jwt_authn: a token, an accepted issuer, `exp` present, not expired nor not yet valid (with the issuer's clock
   skew), an audience the backend needs (a wrong audience is a 403, every other failure a 401);
4. the deny list of revoked jobs (`job_id`, a string, equal to a listed id: compiler/revocations.py);
5. RBAC: the grants the compiler encodes for the backend, evaluated by the same `Evaluator` the token exchange
   uses (never a copy of its rules): the grant that allows, or for a denial the nearest grants, fewest failing
   conditions first, each failing condition in words.

Pure: no I/O, no clock (the time is an argument), nothing kept between calls. The token's signature is not
checked here: the caller only has claims, and Envoy verifies the signature against the issuer's keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from controlplane.model.errors import PolicyError
from controlplane.model.policy import Backend, Binding, Gateway, Issuer, Mode, Policy
from controlplane.resolved.access import Grant, ResolvedPolicy
from controlplane.resolved.aws_roles import backend_role_choices, chosen_role
from controlplane.resolved.conditions import Condition, ResolvedSubject, is_glob
from controlplane.resolved.diff import path_pattern
from controlplane.resolved.evaluate import Evaluator
from controlplane.resolved.render import condition_text

# The decisions, each named after who answers: what `--format json` reports and the exit status follows.
ALLOWED = "allowed"  # forwarded to the backend
DENIED = "denied"  # 403 from the backend's RBAC: no grant allows it
REVOKED = "revoked"  # 403 from the deny list: the job was revoked
UNAUTHENTICATED = "unauthenticated"  # jwt_authn refused the token: 401, or 403 for a wrong audience
NO_ROUTE = "no_route"  # no virtual host for the Host header: the listener-wide RBAC denies (403)
REJECTED = "rejected"  # the connection manager refuses the path itself (400: an escaped slash)
DECISIONS = (ALLOWED, DENIED, REVOKED, UNAUTHENTICATED, NO_ROUTE, REJECTED)

EXCHANGED_ONLY = "exchanged"  # Backend.credentials: only the control plane's credentials (compiler/compile.py)
NEAREST = 3  # grants shown for a denial
SIGNATURE_NOTE = "the token's signature is not checked here: Envoy checks it against the issuer's keys"
_ESCAPED_SLASH = re.compile(r"%(2f|5c)", re.IGNORECASE)
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# The methods the gateway's HTTP/1.1 codec accepts (observed on the real Envoy: tests/test_e2e_explain.py's
# adversarial matrix; docs/explain.md): case-sensitive, anything else is a 400 before any filter runs.
# fmt: off
HTTP1_METHODS = frozenset((
    "ACL", "BIND", "CHECKOUT", "CONNECT", "COPY", "DELETE", "GET", "HEAD", "LINK", "LOCK", "MERGE", "MKACTIVITY",
    "MKCALENDAR", "MKCOL", "MOVE", "NOTIFY", "OPTIONS", "PATCH", "POST", "PROPFIND", "PROPPATCH", "PURGE", "PUT",
    "QUERY", "REBIND", "REPORT", "SEARCH", "SOURCE", "SUBSCRIBE", "TRACE", "UNBIND", "UNLINK", "UNLOCK",
    "UNSUBSCRIBE",
))
# fmt: on
# What jwt_authn's JWT library verifies with (the header's `alg`); any other is a 401 before the issuer.
# fmt: off
JWT_ALGORITHMS = frozenset((
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "HS256", "HS384", "HS512",
    "EdDSA",
))
# fmt: on
JSON_MAX_DEPTH = 100  # Envoy parses a token's JSON into a protobuf Struct, which refuses deeper nesting
_UINT64_LIMIT = 2.0**64
_AUTHORITY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:%@[]")


class ExplainError(ValueError):
    """The question cannot be answered as asked (an unknown gateway, a malformed path): a usage error."""


class Request(NamedTuple):
    method: str
    host: str  # the Host header, with or without a port
    path: str  # with or without a query
    gateway: str | None = None  # the gateway group the request reaches, when known
    port: int | None = None  # the listener's port, when known (from a URL): picks the gateway


@dataclass(frozen=True)
class Credentials:
    """The control plane's exchanged credentials as the gateways accept them (serve with the exchange on)."""

    issuer: str
    clock_skew_seconds: int
    grants: Mapping[str, tuple[Grant, ...]]  # by backend: one `exchanged/<role>` grant per role


@dataclass(frozen=True)
class ExplainInputs:
    policy: Policy
    resolved: ResolvedPolicy
    revoked: frozenset[str] = frozenset()  # job ids on the deny list
    revocations_known: bool = False  # False offline: the deny list is a running server's
    credentials: Credentials | None = None
    exchange_path: str | None = None  # routed to the control plane on every host, token and RBAC off


class Failure(NamedTuple):
    """One thing a grant needs that the request or token does not have."""

    what: str  # a claim, or `method`, `path`, `withdrawn`
    text: str  # in words
    condition: str | None = None  # condition_text of the failing condition


class Candidate(NamedTuple):
    """A grant of the backend and what stops it from allowing the request (nothing: it allows)."""

    grant: str
    mode: str
    failures: tuple[Failure, ...]


class Step(NamedTuple):
    name: str  # gateway, virtual_host, route, jwt_authn, revocations, rbac
    ok: bool | None  # None: not known here (offline, the deny list)
    text: str


@dataclass(frozen=True)
class Explanation:
    decision: str
    status: int  # what Envoy answers (0: forwarded; the backend answers)
    reason: str
    gateway: str | None
    backend: str | None
    route: str | None  # exchange, public, default
    steps: tuple[Step, ...]
    allowed_by: tuple[str, ...] = ()  # enforced grants allowing it
    shadow: tuple[str, ...] = ()  # shadow grants that would allow it (logged by Envoy, not enforced)
    nearest: tuple[Candidate, ...] = ()  # for an RBAC denial
    notes: tuple[str, ...] = ()
    cloud_identity: str | None = None  # allowed on an aws/gcp backend: the role or service account it is sent as

    @property
    def allowed(self) -> bool:
        return self.decision == ALLOWED


class _Chain(NamedTuple):
    """What the steps found so far."""

    gateway: Gateway
    backend: Backend | None
    steps: list[Step]
    notes: list[str]


def explain(
    inputs: ExplainInputs,
    claims: Mapping[str, Any] | None,
    request: Request,
    now: int,
    token_problem: str | None = None,
) -> Explanation:
    """What Envoy does with `request` carrying a token with `claims` (None: no token) at `now` (Unix seconds).
    `token_problem`: the request carries a token Envoy cannot read (see `read_token`), said in words; then
    `claims` is None."""
    if not request.path.startswith("/"):
        raise ExplainError(f"the path must start with '/', got {request.path!r}")
    request = request._replace(host=request.host.strip(" \t"))  # the codec trims a header value's blanks
    gateway, steps, notes = _gateway(inputs.policy, request)
    backend = _virtual_host(inputs.policy, gateway, request.host)
    chain = _Chain(gateway, backend, steps, notes)
    if backend is None:
        steps.append(Step("virtual_host", False, f"no backend on gateway {gateway.name} serves host {request.host!r}"))
    else:
        steps.append(Step("virtual_host", True, f"host {request.host!r} is backend {backend.name}"))
    refused = _codec_refusal(request.method) or _authority_refusal(request.host) or path_refusal(request.path)
    if refused is not None:
        steps.append(Step("route", False, refused))
        return _done(chain, REJECTED, 400, refused, None)
    path = normalize_path(request.path)
    if path != request.path.partition("?")[0]:
        notes.append(f"the gateway normalizes the path to {path}")
    route = _route(inputs, chain, path)
    if route in ("exchange", "public"):
        return _done(chain, ALLOWED, 0, steps[-1].text, route)
    verified = _jwt_authn(inputs, chain, claims, now, token_problem)
    if isinstance(verified, Explanation):
        return verified
    if _revoked(inputs, chain, verified):
        job = verified.get("job_id") if verified else None
        return _done(
            chain, REVOKED, 403, f"job {job} is on the deny list (revoked): refused whatever its grants", route
        )
    if backend is None:
        steps.append(Step("rbac", False, "no virtual host: the listener-wide RBAC denies everything (403)"))
        reason = f"no backend on gateway {gateway.name} serves host {request.host!r}"
        return _done(chain, NO_ROUTE, 403, reason, route)
    return _rbac(inputs, chain, verified or {}, request.method, path)


def _done(chain: _Chain, decision: str, status: int, reason: str, route: str | None, **more: Any) -> Explanation:
    return Explanation(
        decision=decision,
        status=status,
        reason=reason,
        gateway=chain.gateway.name,
        backend=chain.backend.name if chain.backend else None,
        route=route,
        steps=tuple(chain.steps),
        notes=tuple(chain.notes),
        **more,
    )


# -- gateway, virtual host, route


def _gateway(policy: Policy, request: Request) -> tuple[Gateway, list[Step], list[str]]:
    gateways = sorted(policy.gateways, key=lambda g: g.name)
    if not gateways:
        raise ExplainError("the policy has no gateway")
    notes: list[str] = []
    if request.gateway is not None:
        chosen = next((g for g in gateways if g.name == request.gateway), None)
        if chosen is None:
            raise ExplainError(f"no gateway {request.gateway!r} (known: {', '.join(g.name for g in gateways)})")
        return chosen, [Step("gateway", True, f"gateway {chosen.name} (as asked)")], notes
    by_port = [g for g in gateways if request.port is not None and g.port == request.port]
    if by_port:
        return by_port[0], [Step("gateway", True, f"gateway {by_port[0].name} listens on port {request.port}")], notes
    fronting = [g for g in gateways if _virtual_host(policy, g, request.host) is not None]
    chosen = (fronting or gateways)[0]
    others = [g.name for g in (fronting or gateways)[1:]]
    if others:
        notes.append(f"also on gateway(s) {', '.join(others)}: pass --gateway to ask about one of them")
    why = "fronts that host" if fronting else "the policy's first gateway (none fronts that host)"
    return chosen, [Step("gateway", True, f"gateway {chosen.name}: {why}")], notes


def _virtual_host(policy: Policy, gateway: Gateway, host: str) -> Backend | None:
    """Envoy's domain match, case-insensitive: an exact domain, else the longest `*suffix`, else the longest
    `prefix*` (a wildcard stands for at least one character), else `*`. The compiler gives each backend host
    two domains, `host` and `host:*` (any port)."""
    wanted = host.lower()
    exact: Backend | None = None
    suffix: tuple[int, Backend | None] = (-1, None)  # the longest matching `*suffix` so far, first by name
    prefix: tuple[int, Backend | None] = (-1, None)
    names = frozenset(gateway.backends)  # a set: with a tuple this walk was quadratic in the backends
    for backend in sorted((b for b in policy.backends if b.name in names), key=lambda b: b.name):
        for domain in (d.lower() for h in backend.hosts for d in (h, f"{h}:*")):
            if domain.startswith("*"):
                tail = domain[1:]
                if suffix[0] < len(tail) < len(wanted) and wanted.endswith(tail):
                    suffix = (len(tail), backend)
            elif domain.endswith("*"):
                head = domain[:-1]
                if prefix[0] < len(head) < len(wanted) and wanted.startswith(head):
                    prefix = (len(head), backend)
            elif exact is None and domain == wanted:
                exact = backend
    return exact or suffix[1] or prefix[1]


def _codec_refusal(method: str) -> str | None:
    """The HTTP/1.1 codec's answer to a method (case-sensitive), before any filter; None: it passes."""
    if method == "CONNECT":
        return "CONNECT takes host:port, not a path: the HTTP/1.1 codec refuses it (400)"
    if method == "QUERY":
        return "QUERY with no Content-Type header: the connection manager refuses it (400)"
    if method in HTTP1_METHODS:
        return None
    return (
        f"method {json.dumps(method)} is not one the gateway's HTTP/1.1 codec knows (methods are case-sensitive): "
        "400 (over HTTP/2 it would go on to jwt_authn and RBAC, which allows only the roles' methods)"
    )


def _authority_refusal(host: str) -> str | None:
    """The connection manager refuses a Host header holding characters an authority cannot (400)."""
    bad = sorted({c for c in host if c not in _AUTHORITY_CHARS})
    if not bad:
        return None
    return f"the Host header holds {json.dumps(''.join(bad))}, which an authority cannot: the gateway refuses it (400)"


def path_refusal(path: str) -> str | None:
    """Why the connection manager refuses the path before routing (400), or None: a fragment (`#`, anywhere,
    the query too), an escaped slash or backslash (`%2F`, `%5C`, before the query), an escaped NUL."""
    odd = sorted({c for c in path if not "!" <= c <= "~"})
    if odd:
        return f"the path holds {json.dumps(''.join(odd))} (not printable ASCII): the HTTP/1.1 codec refuses it (400)"
    if "#" in path:
        return "the path holds a fragment (#): the gateway's path normalization refuses it (400)"
    bare = path.partition("?")[0]
    if _ESCAPED_SLASH.search(bare):
        return "the path holds an escaped slash (%2F or %5C): the gateway refuses it before routing (400)"
    if re.search("%00", bare):
        return "the path holds an escaped NUL (%00): the gateway's path normalization refuses it (400)"
    return None


def normalize_path(path: str) -> str:
    """The path as the connection manager routes and authorizes it (`normalize_path`, then `merge_slashes`),
    for a path `path_refusal` lets through: the query dropped; backslashes read as slashes; escaped
    unreserved characters decoded (`%74` is `t`, `%2e` is `.`), other escapes' hex digits in capitals; dot
    segments removed as RFC 3986 section 5.2.4 says (so `/a/%2e%2e/b` is `/b`, `/a/.` is `/a/`); runs of
    slashes merged."""
    bare = path.partition("?")[0].replace("\\", "/")
    decoded = _ESCAPE.sub(_unescape, bare)
    return re.sub("/+", "/", _remove_dot_segments(decoded))


def _unescape(escape: re.Match[str]) -> str:
    char = chr(int(escape.group(1), 16))
    return char if char in _UNRESERVED else escape.group(0).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, for an absolute path."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _route(inputs: ExplainInputs, chain: _Chain, path: str) -> str:
    backend, steps = chain.backend, chain.steps
    if backend is None:
        steps.append(Step("route", False, "no route: jwt_authn's listener-wide rule applies"))
        return "none"
    if inputs.exchange_path == path:
        steps.append(Step("route", True, f"{path} is the token exchange: forwarded to the control plane"))
        return "exchange"
    if path in backend.public_paths:
        steps.append(Step("route", True, f"{path} is a public path of {backend.name}: no token, no RBAC"))
        return "public"
    steps.append(Step("route", True, f"the default route of {backend.name}"))
    return "default"


# -- jwt_authn


class _Provider(NamedTuple):
    name: str  # the issuer's name, or `controlplane credentials`
    url: str
    audiences: tuple[str, ...]
    skew: int


def _providers(inputs: ExplainInputs, gateway: Gateway, backend: Backend | None) -> list[_Provider] | None:
    """The providers the request's requirement accepts, with the audiences each needs; None: no requirement
    (jwt_authn verifies nothing)."""
    policy, resolved = inputs.policy, inputs.resolved
    names = frozenset(gateway.backends)
    fronted = [b for b in policy.backends if b.name in names]
    per_issuer: dict[str, set[str]] = {}
    for b in fronted:
        if b.credentials == EXCHANGED_ONLY:
            continue
        for name in resolved.access(b.name).issuers:
            per_issuer.setdefault(name, set()).add(b.audience)
    credentials = inputs.credentials
    if backend is not None:
        if backend.credentials == EXCHANGED_ONLY:
            accepted: tuple[str, ...] = ()
        else:
            accepted = resolved.access(backend.name).issuers or tuple(sorted(per_issuer))
        providers = [_issuer_provider(policy.issuer(n), (backend.audience,)) for n in accepted]
        if credentials is not None:
            providers.append(_credential_provider(credentials, (backend.audience,)))
        if providers:
            return providers
    # The listener-wide rule: a token from any provider, each with its own audiences.
    providers = [_issuer_provider(policy.issuer(n), tuple(sorted(a))) for n, a in sorted(per_issuer.items())]
    if credentials is not None:
        everyone = tuple(sorted({b.audience for b in fronted}))
        providers.append(_credential_provider(credentials, everyone))
    return providers or None


def _issuer_provider(issuer: Issuer, audiences: tuple[str, ...]) -> _Provider:
    return _Provider(issuer.name, issuer.url, audiences, issuer.clock_skew_seconds)


def _credential_provider(credentials: Credentials, audiences: tuple[str, ...]) -> _Provider:
    return _Provider("controlplane credentials", credentials.issuer, audiences, credentials.clock_skew_seconds)


def _jwt_authn(
    inputs: ExplainInputs, chain: _Chain, claims: Mapping[str, Any] | None, now: int, token_problem: str | None
) -> Mapping[str, Any] | Explanation | None:
    """The verified claims (None: jwt_authn verified nothing), or the refusal."""
    steps = chain.steps
    providers = _providers(inputs, chain.gateway, chain.backend)
    where = f"backend {chain.backend.name}" if chain.backend else f"gateway {chain.gateway.name} (unknown host)"
    if providers is None:
        steps.append(Step("jwt_authn", True, f"no issuer is accepted on {where}: no token is read"))
        return None

    def refuse(status: int, text: str) -> Explanation:
        steps.append(Step("jwt_authn", False, text))
        return _done(chain, UNAUTHENTICATED, status, text, "default" if chain.backend else "none")

    if token_problem is not None:
        return refuse(401, f"the token cannot be read: {token_problem}")
    if claims is None:
        return refuse(401, f"no token (Authorization: Bearer): {where} needs one")
    problem = payload_problem(claims)
    if problem is not None:
        return refuse(401, problem)
    issuer = claims.get("iss")
    provider = next((p for p in providers if isinstance(issuer, str) and p.url == issuer), None)
    if provider is None:
        return refuse(401, _unknown_issuer(inputs, issuer, providers, where, chain.backend))
    # Envoy's order, as the agreement matrix observed it: the times, then the audience, then a missing `exp`.
    # A time is read as its whole seconds, and 0 as no time at all.
    exp, nbf = _seconds(claims.get("exp")), _seconds(claims.get("nbf"))
    if nbf and now + provider.skew < nbf:
        return refuse(401, f"not yet valid: nbf is {nbf - now}s from now, beyond the {provider.skew}s clock skew")
    if exp and now > exp + provider.skew:
        return refuse(401, f"expired: exp was {now - exp}s ago, beyond the {provider.skew}s clock skew")
    audiences = _audiences(claims.get("aud"))
    if not set(audiences) & set(provider.audiences):
        has = ", ".join(audiences) if audiences else "none"
        needs = " or ".join(provider.audiences)
        return refuse(403, f"audience: token has {has}, {where} needs {needs} (a 403 from jwt_authn)")
    if not exp:
        said = "no exp" if "exp" not in claims else "exp 0, which Envoy reads as no exp"
        return refuse(401, f"the token has {said}: every provider requires one")
    text = f"token of issuer {provider.name} ({provider.url}) for audience {' or '.join(provider.audiences)}"
    steps.append(Step("jwt_authn", True, text))
    chain.notes.append(SIGNATURE_NOTE)
    return claims


def _seconds(value: object) -> int:
    """A time claim `payload_problem` let through, as Envoy reads it: its whole seconds (0: none)."""
    return int(value) if isinstance(value, int | float) else 0


def payload_problem(claims: Mapping[str, Any]) -> str | None:
    """Why Envoy's JWT library refuses to read the payload (a 401, before any issuer is looked at), or None.
    It reads `iss`, `sub` and `jti` as strings; `iat`, `nbf` and `exp` as numbers from 0 to 2^64 (a fraction
    is dropped); `aud` as a string or a list of strings; a claim present with another type (null too) is a
    refusal. Observed on the real Envoy: docs/explain.md."""
    for name in ("iss", "sub"):
        if name in claims and not isinstance(claims[name], str):
            return f"{name}: token says {_shown(claims[name])}, Envoy reads it as a string only (401)"
    for name in ("iat", "nbf", "exp"):
        if name in claims:
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{name}: token says {_shown(value)}, Envoy needs a number of seconds (401)"
            if not _in_uint64(value):
                return f"{name}: token says {_shown(value)}, Envoy needs 0 to 2^64 seconds (401)"
    if "jti" in claims and not isinstance(claims["jti"], str):
        return f"jti: token says {_shown(claims['jti'])}, Envoy reads it as a string only (401)"
    aud = claims.get("aud")
    if "aud" in claims and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        return f"aud: token says {_shown(aud)}, Envoy needs a string or a list of strings (401)"
    if json_depth(claims) > JSON_MAX_DEPTH:
        return f"the payload nests deeper than the {JSON_MAX_DEPTH} levels Envoy parses (401)"
    return None


def _in_uint64(value: int | float) -> bool:
    try:
        return 0 <= float(value) < _UINT64_LIMIT
    except OverflowError:
        return False


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def json_depth(value: object) -> int:
    """How deep JSON data nests (a scalar: 0, `{}`: 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def read_token(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """The claims of a compact JWS as Envoy's JWT library reads it (`Bearer ` and whitespace tolerated), or
    None and why Envoy refuses to read it (a 401 wherever a token is checked). The signature is not checked.
    Never echoes the token."""
    token = text.strip().removeprefix("Bearer ").strip()
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None, "not a JWT: Envoy needs header.payload.signature (three non-empty sections, two dots)"
    header, problem = _json_section(parts[0], "header")
    if header is None:
        return None, problem
    alg = header.get("alg")
    if not isinstance(alg, str):
        return None, "the header's alg is missing or not a string"
    if alg not in JWT_ALGORITHMS:
        return None, f"the header's alg {_shown(alg)} is not one Envoy supports ({', '.join(sorted(JWT_ALGORITHMS))})"
    if "kid" in header and not isinstance(header["kid"], str):
        return None, f"the header's kid is {_shown(header['kid'])}, not a string"
    if not _BASE64URL.fullmatch(parts[2]):
        return None, "the signature is not base64url"
    return _json_section(parts[1], "payload")


_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def _json_section(text: str, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JWT section decoded as Envoy does: base64url (padding tolerated), then strict JSON (no key twice, no
    NaN, at most JSON_MAX_DEPTH deep), an object."""
    if not _BASE64URL.fullmatch(text):
        return None, f"the {what} is not base64url"
    try:
        raw = base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)).decode()
    except (binascii.Error, ValueError):
        return None, f"the {what} is not base64url of UTF-8 text"
    return read_json_object(raw, what)


def read_json_object(raw: str, what: str = "payload") -> tuple[dict[str, Any] | None, str | None]:
    """`raw` as Envoy parses a token's JSON: strict (no key twice, no NaN), at most JSON_MAX_DEPTH deep, an
    object; or None and why not."""
    try:
        data = strict_json_loads(raw)
    except (ValueError, RecursionError):
        return None, f"the {what} is not JSON Envoy can parse (a JSON object, no key twice, no NaN)"
    if not isinstance(data, dict):
        return None, f"the {what} is not a JSON object"
    if json_depth(data) > JSON_MAX_DEPTH:
        return None, f"the {what} nests deeper than the {JSON_MAX_DEPTH} levels Envoy parses"
    return data, None


def strict_json_loads(raw: str | bytes) -> Any:
    """JSON as Envoy's parser reads it where Python's is lenient: a key given twice and NaN/Infinity raise
    ValueError (Python keeps the last key and takes the constants); too deep nesting raises RecursionError. The
    one strict reader of the token's payload, `--claims` and `POST /explain`'s body."""
    return json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Envoy's JSON parser refuses a key given twice; Python's would keep the last."""
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a key given twice")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _audiences(aud: object) -> list[str]:
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [a for a in aud if isinstance(a, str)]
    return []


def _unknown_issuer(
    inputs: ExplainInputs, issuer: object, providers: Sequence[_Provider], where: str, backend: Backend | None
) -> str:
    accepted = ", ".join(f"{p.name} ({p.url})" for p in providers)
    known = next((i for i in inputs.policy.issuers if i.url == issuer), None)
    said = json.dumps(issuer) if issuer is not None else "nothing"
    if backend is not None and backend.credentials == EXCHANGED_ONLY:
        why = f"{where} takes only credentials exchanged at the control plane (credentials: exchanged)"
    elif known is not None:
        why = f"issuer {known.name} is not accepted on {where}: no binding of it grants a role there"
    else:
        why = f"no issuer of the policy has that url on {where}"
    return f"issuer: token says {said}; {why}; accepted: {accepted or 'none'}"


# -- the deny list


def _revoked(inputs: ExplainInputs, chain: _Chain, verified: Mapping[str, Any] | None) -> bool:
    """A DENY on the `job_id` claim, a string fully equal to a listed id (run only on verified tokens)."""
    if not inputs.revocations_known:
        chain.steps.append(Step("revocations", None, "not known offline: ask a running server (--server)"))
        return False
    job = verified.get("job_id") if verified is not None else None
    if isinstance(job, str) and job in inputs.revoked:
        chain.steps.append(Step("revocations", False, f"job {job} was revoked (its job ended or was cancelled)"))
        return True
    chain.steps.append(Step("revocations", True, "the job is not on the deny list"))
    return False


# -- RBAC


def _rbac(inputs: ExplainInputs, chain: _Chain, claims: Mapping[str, Any], method: str, path: str) -> Explanation:
    backend = chain.backend
    assert backend is not None
    grants = _grants(inputs, backend)
    evaluator = Evaluator()
    candidates = [_candidate(inputs, evaluator, g, claims, method, path) for g in grants]
    allowed = tuple(c.grant for c in candidates if not c.failures and c.mode == Mode.ENFORCE.value)
    shadow = tuple(c.grant for c in candidates if not c.failures and c.mode == Mode.SHADOW.value)
    if shadow:
        chain.notes.append(f"shadow binding(s) would allow it (logged only, never enforced): {', '.join(shadow)}")
    if allowed:
        chain.steps.append(Step("rbac", True, f"allowed by {', '.join(allowed)}"))
        identity = _cloud_identity(inputs, backend, claims, chain.steps)
        return _done(
            chain,
            ALLOWED,
            0,
            f"allowed by {allowed[0]}",
            "default",
            allowed_by=allowed,
            shadow=shadow,
            cloud_identity=identity,
        )
    nearest = _nearest([c for c in candidates if c.failures])
    if not grants:
        text = f"backend {backend.name} grants nothing to anyone"
    elif nearest:
        text = f"no grant of {backend.name} allows it; nearest: {nearest[0].grant}"
    else:
        text = f"no enforced grant of {backend.name} allows it"
    chain.steps.append(Step("rbac", False, text))
    reason = text + (f" ({nearest[0].failures[0].text})" if nearest else "")
    return _done(chain, DENIED, 403, reason, "default", shadow=shadow, nearest=nearest)


def _cloud_identity(
    inputs: ExplainInputs, backend: Backend, claims: Mapping[str, Any], steps: list[Step]
) -> str | None:
    """Who an allowed request is sent upstream as, with a `cloud` step saying so: a `gcp:` backend's service account,
    an `aws:` backend's role as the compiler's routes choose it (resolved/aws_roles.py: the first binding by name
    with its own role whose subject the token matches, else the backend's role)."""
    if backend.gcp is not None:
        account = backend.gcp.service_account
        steps.append(Step("cloud", True, f"sent with a Google token of service account {account}"))
        return account
    if backend.aws is None:
        return None
    choices = backend_role_choices(_own_grants(inputs, backend), {b.name: b for b in inputs.policy.bindings})
    binding, arn = chosen_role(choices, backend.aws.role_arn, claims)
    whose = f"binding {binding}'s AWS role" if binding is not None else "the backend's AWS role"
    steps.append(Step("cloud", True, f"signed (SigV4) with {whose} {arn} (503 while it has no valid credential)"))
    return arn


def _nearest(refusing: list[Candidate]) -> tuple[Candidate, ...]:
    """Fewest failing conditions first (then by name), at most NEAREST. Grants for another issuer's tokens (the
    `iss` condition fails: the exchanged credentials' grants, for a GitLab token) only when no other is left."""
    same_issuer = [c for c in refusing if not any(f.what == "iss" for f in c.failures)]
    return tuple(sorted(same_issuer or refusing, key=lambda c: (len(c.failures), c.grant))[:NEAREST])


def _grants(inputs: ExplainInputs, backend: Backend) -> tuple[Grant, ...]:
    """What the compiler encodes for the backend's virtual host, shadow grants included."""
    credentials = inputs.credentials
    exchanged = credentials.grants.get(backend.name, ()) if credentials is not None else ()
    return (*_own_grants(inputs, backend), *exchanged)


def _own_grants(inputs: ExplainInputs, backend: Backend) -> tuple[Grant, ...]:
    """The bindings' grants, as raw ID tokens meet them: none on a backend taking exchanged credentials only."""
    return () if backend.credentials == EXCHANGED_ONLY else inputs.resolved.grants(backend.name)


def _candidate(
    inputs: ExplainInputs,
    evaluator: Evaluator,
    grant: Grant,
    claims: Mapping[str, Any],
    method: str,
    path: str,
) -> Candidate:
    failures = list(_rule_failures(grant, method, path))
    if not grant.subjects:
        withdrawn = _withdrawn(inputs, grant.binding) or ("GitLab withdrew every subject of the binding",)
        failures[:0] = [Failure("withdrawn", w) for w in withdrawn]
    else:
        best = min((_subject_failures(evaluator, s, claims) for s in grant.subjects), key=len)
        failures[:0] = best
        if best:  # a subject whose other projects GitLab withdrew may be the one this job is in
            failures.extend(Failure("withdrawn", w) for w in _withdrawn(inputs, grant.binding))
    return Candidate(grant.name, grant.mode.value, tuple(failures))


def _rule_failures(grant: Grant, method: str, path: str) -> tuple[Failure, ...]:
    """None when a rule allows (method, path); else the failures of the closest rule."""
    best: tuple[Failure, ...] | None = None
    for rule in grant.rules:
        failures = []
        if rule.methods and method not in rule.methods:
            allowed = ", ".join(rule.methods)
            failures.append(Failure("method", f"method: request is {method}, role {grant.role} allows {allowed}"))
        if rule.paths and not any(path_pattern(p).fullmatch(path) for p in rule.paths):
            allowed = ", ".join(rule.paths)
            failures.append(Failure("path", f"path: request is {path}, role {grant.role} allows {allowed}"))
        if not failures:
            return ()
        if best is None or len(failures) < len(best):
            best = tuple(failures)
    return best or (Failure("rules", f"role {grant.role} has no rule"),)


def _subject_failures(evaluator: Evaluator, subject: ResolvedSubject, claims: Mapping[str, Any]) -> tuple[Failure, ...]:
    """The subject's failing conditions, with the closest of its alternatives (one a project, live)."""
    failing = [_failure(c, claims) for c in subject.conditions if not evaluator.condition_holds(claims, c)]
    if subject.alternatives:
        options: list[list[Failure]] = [
            [_failure(c, claims) for c in alt if not evaluator.condition_holds(claims, c)]
            for alt in subject.alternatives
        ]
        closest: list[Failure] = min(options, key=len)
        failing += closest
    return tuple(failing)


def _failure(condition: Condition, claims: Mapping[str, Any]) -> Failure:
    """`ref_protected: token says "false", binding needs "true"`."""
    claim = condition.claim
    return Failure(
        claim, f"{claim}: {_token_side(claims, claim)}, {_binding_side(condition)}", condition_text(condition)
    )


def _token_side(claims: Mapping[str, Any], claim: str) -> str:
    if claim not in claims:
        return "the token has no such claim"
    value = claims[claim]
    if isinstance(value, str):
        return f"token says {json.dumps(value)}"
    if isinstance(value, list):
        return f"token has {json.dumps(value)}"
    kind = "a boolean" if isinstance(value, bool) else "a number" if isinstance(value, int | float) else "not a string"
    return f"token says {json.dumps(value)} ({kind}: Envoy matches strings only)"


def _binding_side(condition: Condition) -> str:
    values = condition.values
    if len(values) == 1:
        wanted = json.dumps(values[0])
    else:
        wanted = "one of [" + ", ".join(v if re.fullmatch(r"[\w./:@+~-]+", v) else json.dumps(v) for v in values) + "]"
    if condition.listy:
        wanted = f"{'no' if condition.negated else 'a'} string, or list holding one, equal to {wanted}"
    elif condition.negated:
        wanted = f"anything but {wanted.removeprefix('one of ')}"
    globs = " (* matches within one path segment)" if any(is_glob(v) for v in values) else ""
    return f"binding needs {wanted}{globs}"


def _withdrawn(inputs: ExplainInputs, binding_name: str) -> tuple[str, ...]:
    """The resolution's warnings about the binding's subjects: what GitLab withdrew, in words."""
    if not inputs.resolved.warnings:
        return ()  # the common case, without a walk of every binding for each grant shown
    binding = _binding(inputs.policy, binding_name)
    if binding is None:
        return ()
    places = {(s.source.file, s.source.line) for s in binding.subjects}
    return tuple(_withdrawn_text(w) for w in inputs.resolved.warnings if (w.file, w.line) in places)


def _binding(policy: Policy, name: str) -> Binding | None:
    return next((b for b in policy.bindings if b.name == name), None)


def _withdrawn_text(warning: PolicyError) -> str:
    message = warning.message.removeprefix("access withdrawn: ")
    head = "GitLab withdrew access" if message != warning.message else "GitLab changed"
    return f"{head}: {message} ({warning.file}:{warning.line})"


# -- output


def document(explanation: Explanation) -> dict[str, Any]:
    """The explanation as JSON-ready data: the stable shape `--format json` prints (docs/explain.md)."""
    return {
        "decision": explanation.decision,
        "allowed": explanation.allowed,
        "status": explanation.status,
        "reason": explanation.reason,
        "gateway": explanation.gateway,
        "backend": explanation.backend,
        "route": explanation.route,
        "steps": [{"step": s.name, "ok": s.ok, "text": s.text} for s in explanation.steps],
        "allowed_by": list(explanation.allowed_by),
        "shadow": list(explanation.shadow),
        "nearest": [
            {
                "grant": c.grant,
                "mode": c.mode,
                "failing": len(c.failures),
                "failures": [{"what": f.what, "text": f.text, "condition": f.condition} for f in c.failures],
            }
            for c in explanation.nearest
        ],
        "notes": list(explanation.notes),
        "cloud_identity": explanation.cloud_identity,
    }


def text_lines(doc: Mapping[str, Any]) -> list[str]:
    """For a developer reading a 403, from `document`'s data (also a server's answer): the decision first, then
    each step, then the nearest grants and their failing conditions."""
    status = "forwarded to the backend" if doc["status"] == 0 else f"Envoy answers {doc['status']}"
    lines = [f"{str(doc['decision']).upper()}: {doc['reason']} ({status})"]
    lines += [f"  {_mark(s['ok'])} {s['step']}: {s['text']}" for s in doc["steps"]]
    for candidate in doc["nearest"]:
        shadow = " (shadow: logged only)" if candidate["mode"] == Mode.SHADOW.value else ""
        lines.append(f"  nearest: {candidate['grant']}{shadow}, {candidate['failing']} failing:")
        lines += [f"    - {f['text']}" for f in candidate["failures"]]
    lines += [f"  note: {n}" for n in doc["notes"]]
    return [printable(line) for line in lines]


def printable(text: str) -> str:
    """`text` with control and format characters escaped (`\\u001b`): what a token or a server says must not
    drive the developer's terminal (ESC sequences, BEL, C1 controls, bidirectional overrides)."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in _UNPRINTABLE else c for c in text)


_UNPRINTABLE = frozenset(("Cc", "Cf", "Co", "Cs", "Zl", "Zp"))


def _mark(ok: bool | None) -> str:
    """A step passed, failed, or cannot be known here (offline: the deny list)."""
    return "??  " if ok is None else "ok  " if ok else "FAIL"
