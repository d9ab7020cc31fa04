"""Fuzzing the RFC 8693 token exchange: form fields and subject tokens (malformed JWTs, alg confusion, huge
headers, bad base64, nested JSON), directly and through the HTTP endpoint.

The property that matters: a credential is issued only when the request is valid, which the harness decides on
its own (the form rules of RFC 8693 and docs/token-exchange.md, and a signature check of the subject token with the
issuer's real key by PyJWT); and it is then exactly the credential the policy allows. Any other request gets an
RFC 6749 error that never echoes the token. Nothing raises, nothing answers 500.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from controlplane.credentials.exchange import (
    GRANT_TYPE,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT,
)
from controlplane.credentials.http import FORM_CONTENT_TYPE, MAX_BODY_BYTES, ExchangeEndpoint
from controlplane.model.credentials import CREDENTIAL_ISSUER, EXCHANGE_PATH
from tests.fuzz.exchange_harness import (
    AUDIENCE,
    ISS,
    KID,
    NOW,
    RSA_KEY,
    TTL,
    Exchange,
    Token,
    make_exchange,
    pristine_claims,
)
from tests.fuzz.figures import count
from tests.fuzz.http_harness import LoopThread, request, serve
from tests.fuzz.known import AVOID_KNOWN, avoid_known


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Exchange:
    return make_exchange(Path(tmp_path_factory.mktemp("fuzz-keys")))


ODD_VALUES = [None, True, 0, -1, 1.5, 10**30, "", "x" * 5000, [], {}, [ISS], ["RS256"], {"a": {"b": [1]}}, "é", "\x00"]
odd = st.sampled_from(ODD_VALUES) | st.text(max_size=10) | st.integers()


@st.composite
def tokens(draw: st.DrawFn) -> Token:
    token = Token({"alg": "RS256", "kid": KID, "typ": "JWT"}, pristine_claims(str(draw(st.uuids()))))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(
            st.sampled_from(
                [
                    "alg",
                    "kid",
                    "header-field",
                    "huge-header",
                    "claim",
                    "drop-claim",
                    "times",
                    "signer",
                    "encoding",
                    "raw-json",
                ]
            )
        )
        if action == "alg":
            token.header["alg"] = draw(
                st.sampled_from(["none", "None", "HS256", "ES256", "RS512", "PS256", "EdDSA", ""]) | odd
            )
        elif action == "kid":
            if draw(st.booleans()):
                token.header.pop("kid", None)
            else:
                token.header["kid"] = draw(st.sampled_from(["ec-key", "other", "../../etc/passwd"]) | odd)
        elif action == "header-field":
            name = draw(
                st.sampled_from(["crit", "jku", "x5u", "jwk", "b64", "zip", "cty", "typ"]) | st.text(max_size=5)
            )
            token.header[name] = draw(odd)
        elif action == "huge-header":
            token.header["x"] = "h" * draw(st.integers(1000, 100_000))
        elif action == "claim":
            name = draw(st.sampled_from(sorted(pristine_claims("j"))) | st.text(max_size=5))
            token.claims[name] = draw(odd)
        elif action == "drop-claim":
            token.claims.pop(draw(st.sampled_from(sorted(pristine_claims("j")))), None)
        elif action == "times":
            name = draw(st.sampled_from(["exp", "nbf", "iat"]))
            token.claims[name] = draw(
                st.sampled_from([NOW - 400, NOW + 100, NOW + 10**12, -1, 0, 1e308, 2**64, math.inf])
            )
        elif action == "signer":
            token.signer = draw(st.sampled_from(["es256", "rogue", "hs256-public-pem", "none", "garbage", "empty"]))
        elif action == "encoding":
            token.encoding.append(
                draw(
                    st.sampled_from(
                        [
                            "pad",
                            "std-alphabet",
                            "space",
                            "newline",
                            "extra-segment",
                            "two-segments",
                            "one-segment",
                            "empty-segments",
                            "non-ascii",
                            "truncated",
                            "bearer",
                            "nul",
                        ]
                    )
                )
            )
        else:
            text = draw(
                st.sampled_from(
                    [
                        "[]",
                        "null",
                        "1",
                        '"x"',
                        "{",
                        "{}",
                        '{"exp": Infinity}',
                        '{"exp": NaN}',
                        '{"a": 1, "a": 2}',
                        "[" * 5000 + "]" * 5000,
                        '{"a":' * 3000 + "1" + "}" * 3000,
                        "\ufeff{}",
                        '{"iss": "\\ud800"}',
                    ]
                )
            )
            if draw(st.booleans()):
                token.header_json = text
            else:
                token.claims_json = text
    return token


# --- forms -----------------------------------------------------------------------------------------------------


@st.composite
def forms(draw: st.DrawFn) -> tuple[dict[str, str], Token]:
    token = draw(tokens())
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": token.text(),
        "subject_token_type": draw(st.sampled_from([TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN])),
        "audience": draw(st.sampled_from(["reports-api", AUDIENCE])),
    }
    for _ in range(draw(st.integers(0, 3))):
        name = draw(
            st.sampled_from(
                [
                    "grant_type",
                    "subject_token_type",
                    "requested_token_type",
                    "audience",
                    "resource",
                    "scope",
                    "requested_token_lifetime",
                    "expires_in",
                    "actor_token",
                    "actor_token_type",
                    "subject_token",
                ]
            )
            | st.text(max_size=8)
        )
        value = draw(
            st.sampled_from(
                [
                    "",
                    GRANT_TYPE,
                    TOKEN_TYPE_JWT,
                    TOKEN_TYPE_ACCESS_TOKEN,
                    "urn:x",
                    "reports-api",
                    "other-api",
                    AUDIENCE,
                    "https://other.local",
                    "nope",
                    "reports-read",
                    "reports-write",
                    "reports-read reports-read",
                    "other-read",
                    "1",
                    "60",
                    "0",
                    "-5",
                    "999999999",
                    "1000000000",
                    "5\n",
                    " 60",
                    "1e3",
                    "\u0663",
                    "60.0",
                ]
            )
            | st.text(max_size=20)
        )
        if draw(st.integers(0, 5)) == 0:
            form.pop(name, None)
        else:
            form[name] = value
    return form, token


AUDIENCES = {"reports-api": AUDIENCE, "other-api": "https://other.local"}
MAX_SUBJECT_AGE = 7 * 86_400  # older subject tokens are refused: the finished-job memory (docs/token-exchange.md)
GRANTED = {"reports-api": ["reports-read"], "other-api": ["other-read"]}


def target_backend(form: dict[str, str]) -> str | None:
    """The one backend `audience` and `resource` name (by name or audience), or None."""
    named = set()
    for target in (form[n] for n in ("audience", "resource") if form.get(n)):
        found = [b for b, aud in AUDIENCES.items() if target in (b, aud)]
        if not found:
            return None
        named.update(found)
    return named.pop() if len(named) == 1 else None


def independently_valid(form: dict[str, str]) -> str | None:
    """Why this request must be refused (None: it may be granted), from RFC 8693 and docs/token-exchange.md alone."""
    if form.get("grant_type") != GRANT_TYPE:
        return "grant_type"
    if form.get("subject_token_type") not in (TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN):
        return "subject_token_type"
    if form.get("requested_token_type", TOKEN_TYPE_JWT) not in (TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN):
        return "requested_token_type"
    if "actor_token" in form or "actor_token_type" in form:
        return "delegation"
    backend = target_backend(form)
    if backend is None:
        return "target"
    if any(r not in GRANTED[backend] for r in form.get("scope", "").split(" ") if r):
        return "scope"
    for name in ("requested_token_lifetime", "expires_in"):
        value = form.get(name)
        if value is not None and not (value.isascii() and value.isdigit() and 0 < int(value) < 10**9):
            return name
    try:
        claims = jwt.decode(
            form.get("subject_token", ""),
            RSA_KEY.public_key(),
            algorithms=["RS256"],
            audience=AUDIENCES[backend],  # the target backend's, as Envoy requires (docs/token-exchange.md; F9)
            issuer=ISS,
            leeway=30,
            # exp and nbf are checked below against the service's fixed clock
            options={
                "require": ["iss", "aud", "exp", "sub", "jti"],
                "verify_iat": False,
                "verify_nbf": False,
                "verify_exp": False,
            },
        )
        kid = jwt.get_unverified_header(form["subject_token"]).get("kid", KID)
    except jwt.PyJWTError as error:
        return f"subject token: {type(error).__name__}"
    if kid != KID:
        return "the header names another key"
    exp = claims["exp"]
    if type(exp) not in (int, float) or not math.isfinite(exp) or exp + 30 < NOW or int(exp - NOW) < 1:
        return "exp"  # against the service's fixed clock; a credential needs at least a second of life
    if "nbf" in claims and (type(claims["nbf"]) not in (int, float) or claims["nbf"] > NOW + 30):
        return "nbf"  # a null nbf is not a number (was F10: read as absent)
    issued = claims.get("iat", claims.get("nbf"))
    if type(issued) not in (int, float) or not math.isfinite(issued) or NOW - issued > MAX_SUBJECT_AGE:
        return "iat"  # its age must be known, and under the finished-job memory (docs/token-exchange.md)
    if not isinstance(claims["jti"], str) or not claims["jti"]:
        return "jti"
    if claims.get("project_id") != "42" or claims.get("ref_protected") != "true":
        return "not granted by policy"
    return None


def check_exchange(service: Exchange, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    try:
        result = asyncio.run(service.exchange.exchange(form))  # must never raise
    except Exception as error:
        avoid_known(error)
        raise
    why_not = independently_valid(form)
    if result.granted:
        assert why_not is None, f"issued a credential for an invalid request ({why_not})"
        check_credential(service, form, result.body)
    else:
        assert result.status in (400, 503), result.status
        assert result.body["error"] in (
            "invalid_request",
            "invalid_grant",
            "invalid_target",
            "invalid_scope",
            "unsupported_grant_type",
        ), result.body
        token = form.get("subject_token", "")
        for part in {token, *token.split(".")}:  # neither the token nor any of its segments
            if len(part) >= 20 and part not in (GRANT_TYPE, TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN):
                assert part not in result.body["error_description"], "a refusal echoed the token"
    if why_not is None:
        assert result.granted, f"refused a valid request: {result.body}"
    return result.status, result.body


def check_credential(service: Exchange, form: dict[str, str], body: dict[str, Any]) -> None:
    header = jwt.get_unverified_header(body["access_token"])
    key = jwt.PyJWKSet.from_json(service.keys.published_jwks())[header["kid"]]
    backend = target_backend(form)
    assert backend is not None
    audience = AUDIENCES[backend]
    claims = jwt.decode(
        body["access_token"],
        key,
        algorithms=["ES256"],
        audience=audience,
        issuer=CREDENTIAL_ISSUER,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )  # the service's clock
    assert claims["iat"] == int(NOW)
    subject = jwt.decode(form["subject_token"], options={"verify_signature": False})
    lifetimes = [int(form[n]) for n in ("requested_token_lifetime", "expires_in") if n in form]
    assert claims["exp"] - claims["iat"] == body["expires_in"] <= min([TTL, int(subject["exp"] - NOW), *lifetimes])
    assert claims["roles"] == GRANTED[backend]
    assert claims.get("job_id") == (subject["job_id"] if isinstance(subject.get("job_id"), str) else None)
    assert claims["act"] == {"sub": subject["sub"], "iss": ISS}


@given(case=forms())
@example(
    case=(
        {
            "grant_type": GRANT_TYPE,
            "subject_token_type": TOKEN_TYPE_JWT,
            "audience": "reports-api",
            "subject_token": Token({"alg": "RS256", "kid": KID}, pristine_claims("e1")).text(),
        },
        None,
    )
)
def test_a_credential_is_issued_only_for_a_valid_request(service: Exchange, case: tuple[dict[str, str], Any]) -> None:
    count("exchange: form + JWT")
    check_exchange(service, case[0])


# --- over HTTP -------------------------------------------------------------------------------------------------


class Endpoint:
    def __init__(self, service: Exchange) -> None:
        self.loop = LoopThread()
        self.service = service
        self.endpoint = ExchangeEndpoint(service.exchange)
        self.port = serve(self.loop, lambda: self.endpoint.start())

    def close(self) -> None:
        self.loop.run(self.endpoint.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def endpoint(service: Exchange) -> Iterator[Endpoint]:
    running = Endpoint(service)
    yield running
    running.close()


@st.composite
def http_requests(draw: st.DrawFn) -> dict[str, Any]:
    form, _ = draw(forms())
    encoding = draw(st.sampled_from(["form", "form", "form", "repeat", "many", "bytes", "huge", "latin1"]))
    body = {
        "form": lambda: urlencode(form).encode(),
        "repeat": lambda: urlencode(form).encode() + b"&" + urlencode(form).encode().split(b"&")[0],
        "many": lambda: urlencode(form).encode() + b"".join(b"&f%d=1" % i for i in range(40)),
        "bytes": lambda: draw(st.binary(max_size=300)),
        "huge": lambda: urlencode({**form, "pad": "p" * MAX_BODY_BYTES}).encode(),
        "latin1": lambda: urlencode(form).encode() + b"&x=\xe9",
    }[encoding]()
    return {
        "form": form,
        "encoding": encoding,
        "body": body,
        "content_type": draw(
            st.sampled_from(
                [
                    FORM_CONTENT_TYPE,
                    FORM_CONTENT_TYPE,
                    FORM_CONTENT_TYPE + "; charset=utf-8",
                    "application/json",
                    "multipart/form-data",
                    None,
                ]
            )
        ),
        "query": draw(st.sampled_from([b"", b"", b"?subject_token=x", b"?"])),
        "chunked": draw(st.booleans()),
    }


@given(case=http_requests())
def test_exchange_endpoint_never_fails_and_never_issues_for_a_bad_request(
    endpoint: Endpoint, case: dict[str, Any]
) -> None:
    count("exchange: HTTP endpoint")
    headers = [(b"Content-Type", case["content_type"].encode())] if case["content_type"] else []
    answer = request(
        endpoint.port, "POST", EXCHANGE_PATH.encode() + case["query"], headers, case["body"], chunked=case["chunked"]
    )
    if answer.status == 500 and AVOID_KNOWN:
        check_exchange(endpoint.service, case["form"])  # discards the case if the exchange hits a known crash
    assert answer.status != 500, answer.body[:300]
    if answer.head.startswith(b"HTTP/1.0 400"):
        return
    assert b"cache-control: no-store" in answer.head.lower()
    body = json.loads(answer.body)
    if answer.status == 200:
        assert case["encoding"] == "form" and case["content_type"] in (
            FORM_CONTENT_TYPE,
            FORM_CONTENT_TYPE + "; charset=utf-8",
        )
        assert case["query"] in (b"", b"?"), "a token request with a query string was served"
        assert independently_valid(case["form"]) is None
    else:
        assert "access_token" not in body
    if case["encoding"] in ("repeat", "many", "huge") and answer.status != 503:
        assert answer.status in (400, 413), answer.status


def test_the_pristine_request_is_granted(service: Exchange) -> None:
    """The harness's own sanity: without mutations, the generators build a request that succeeds."""
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token_type": TOKEN_TYPE_JWT,
        "audience": "reports-api",
        "subject_token": Token({"alg": "RS256", "kid": KID}, pristine_claims(str(uuid.uuid4()))).text(),
    }
    status, body = check_exchange(service, form)
    assert status == 200, body
