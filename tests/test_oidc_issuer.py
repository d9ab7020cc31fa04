"""The control plane as an OpenID Provider (issue 16, point 1): the issuer URL's checks, discovery and JWKS fetched
over HTTP from the exchange listener and used by a real client library (PyJWT's PyJWKClient), tokens it signs
verified against them with iss/aud checks, across a key rotation, and the same answer from replicas sharing
their keys in PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from controlplane.credentials.exchange_store import MemoryExchangeStore
from controlplane.credentials.key_cipher import parse_keks
from controlplane.credentials.keys_pg import PostgresKeyStore, SharedKeys
from controlplane.credentials.oidc import (
    MAX_CACHE_SECONDS,
    IssuerUrlError,
    OidcEndpoint,
    OidcIssuer,
    RelyingPartyTokens,
    cache_seconds,
    parse_issuer_url,
)
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.serving import AppServer
from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import migrate
from controlplane.store.pool import StorePool
from tests.support.ports import LOOPBACK, free_port

AUDIENCE = "sts.amazonaws.com"
ROTATE, TTL, LEAD = 100.0, 30.0, 10.0
KEK = base64.b64encode(b"k" * 32).decode()


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_pool(dsn: str) -> StorePool:
    pool = StorePool(StoreDsn(dsn, "test"))
    await pool.open()
    async with pool.connection() as conn:
        await migrate(conn)
    return pool


async def open_keys(pool: StorePool, clock: Clock) -> SharedKeys:
    store = PostgresKeyStore(pool, parse_keks(KEK, "test KEK"))
    return await SharedKeys.open(store, rotate_every=ROTATE, max_credential_ttl=TTL, publish_lead=LEAD, clock=clock)


@pytest.mark.parametrize(
    "url",
    [
        "https://cp.example.com",
        "https://cp.example.com/ci/oidc",
        "https://cp.example.com/v1.2/~team_a",
        "https://cp.example.com:8443",
        "http://127.0.0.1:9",
        "http://[::1]:9/x",
    ],
)
def test_usable_issuer_urls_are_kept_as_typed(url: str) -> None:
    assert parse_issuer_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://cp.example.com", "https"),
        ("cp.example.com", "absolute"),
        ("https://", "absolute"),
        ("https://cp.example.com/", "end with '/'"),
        ("https://cp.example.com/ci?x=1", "query"),
        ("https://cp.example.com/ci?", "query"),
        ("https://cp.example.com#top", "fragment"),
        ("https://user:pw@cp.example.com", "user information"),
        ("https://cp.example.com:99999", "malformed"),
        (" https://cp.example.com", "whitespace"),
        ("https://cp.example.com/" + "a" * 255, "255"),
        ("ftp://cp.example.com", "absolute"),
        ("https://cp.example.com/a//b", "path"),
        ("https://cp.example.com/a/../b", "path"),
        ("https://cp.example.com/a/./b", "path"),
        ("https://cp.example.com/{name}", "path"),
        ("https://cp.example.com/a%2Fb", "path"),
    ],
)
def test_unusable_issuer_urls_are_refused_saying_why(url: str, why: str) -> None:
    with pytest.raises(IssuerUrlError, match=why):
        parse_issuer_url(url)


def test_the_discovery_document_holds_what_relying_parties_read() -> None:
    issuer = OidcIssuer("https://cp.example.com/ci")
    document = issuer.discovery()
    assert document["issuer"] == "https://cp.example.com/ci"
    assert document["jwks_uri"] == "https://cp.example.com/ci/.well-known/jwks.json"
    assert document["id_token_signing_alg_values_supported"] == ["ES256"]
    assert document["response_types_supported"] == ["id_token"]
    assert document["subject_types_supported"] == ["public"]
    assert {"iss", "sub", "aud", "exp", "iat"} <= set(document["claims_supported"])
    assert issuer.discovery_path == "/ci/.well-known/openid-configuration"


def test_relying_parties_cache_for_half_the_publish_lead_bounded() -> None:
    assert cache_seconds(1.0) == 0
    assert cache_seconds(120.0) == 60
    assert cache_seconds(86_400.0) == MAX_CACHE_SECONDS


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, url, headers)


def verify(token: str, jwks_uri: str, issuer: str, audience: str = AUDIENCE) -> dict[str, Any]:
    """As a relying party does it: the key by kid from the fetched JWKS (no cache), then signature, iss, aud; with
    AWS's five minutes of clock skew (the tests move the control plane's clock up to ROTATE + TTL ahead)."""
    client = jwt.PyJWKClient(jwks_uri, cache_jwk_set=False, cache_keys=False)
    key = client.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=audience,
        issuer=issuer,
        leeway=300,
        options={"require": ["iss", "sub", "aud", "exp", "iat"]},
    )
    return claims


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[CredentialService, Clock, str]]:
    """A credential service with an issuer URL, its exchange listener on a loopback port named in the URL."""
    clock = Clock(time.time())  # PyJWT checks exp against the real clock
    port = free_port()
    issuer = f"http://{LOOPBACK}:{port}/ci"
    options = CredentialOptions(
        listen=(LOOPBACK, port),
        public=(LOOPBACK, port),
        state_dir=tmp_path,
        rotate_every=ROTATE,
        max_credential_ttl=TTL,
        publish_lead=LEAD,
        issuer_url=issuer,
    )

    async def pushed() -> None:
        pass

    service = CredentialService(
        options,
        issuer_keys=lambda _: None,
        policy=lambda: None,
        on_change=pushed,
        store=MemoryExchangeStore(),
        clock=clock,
    )
    await service.endpoint.start(LOOPBACK, port)
    try:
        yield service, clock, issuer
    finally:
        await service.endpoint.stop()


async def test_discovery_and_jwks_are_served_and_a_signed_token_verifies(
    served: tuple[CredentialService, Clock, str],
) -> None:
    service, _, issuer = served
    status, headers, body = await fetch(issuer + "/.well-known/openid-configuration")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == f"public, max-age={cache_seconds(LEAD)}"
    document = json.loads(body)
    assert document["issuer"] == issuer and document["jwks_uri"] == issuer + "/.well-known/jwks.json"
    status, headers, body = await fetch(document["jwks_uri"])
    assert status == 200 and json.loads(body) == json.loads(service.keys.published_jwks())
    assert all(set(k) == {"kty", "crv", "x", "y", "kid", "alg", "use"} for k in json.loads(body)["keys"])  # no "d"
    again, _, empty = await fetch(document["jwks_uri"], {"If-None-Match": headers["ETag"]})
    assert again == 304 and empty == b""

    token = service.relying_party_tokens().sign(subject="project_path:g/p:ref:main", audience=AUDIENCE)
    claims = await asyncio.to_thread(verify, token, document["jwks_uri"], issuer)
    assert claims["iss"] == issuer and claims["sub"] == "project_path:g/p:ref:main"
    with pytest.raises(jwt.InvalidAudienceError):
        await asyncio.to_thread(verify, token, document["jwks_uri"], issuer, "another-audience")
    with pytest.raises(jwt.InvalidIssuerError):
        await asyncio.to_thread(verify, token, document["jwks_uri"], "https://someone.else")
    assert service.status()["oidc_issuer"] == issuer


async def test_a_rotation_publishes_before_use_and_keeps_after(served: tuple[CredentialService, Clock, str]) -> None:
    service, clock, issuer = served
    jwks_uri = issuer + "/.well-known/jwks.json"
    tokens = service.relying_party_tokens()

    async def kids() -> list[str]:
        return [k["kid"] for k in json.loads((await fetch(jwks_uri))[2])["keys"]]

    old_token = tokens.sign(subject="s", audience=AUDIENCE, lifetime=int(TTL))
    old = service.keys.signing_key().kid
    assert await kids() == [old]
    clock.now += ROTATE - LEAD  # the successor is due: published, not signing yet
    assert service.keys.rotate_if_due()
    new = service.keys.keys[-1].kid
    assert sorted(await kids()) == sorted([old, new]) and service.keys.signing_key().kid == old
    clock.now += LEAD  # the successor signs; the old key stays for the old key's last token
    fresh = tokens.sign(subject="s", audience=AUDIENCE, lifetime=int(TTL))
    assert jwt.get_unverified_header(fresh)["kid"] == new
    for token in (old_token, fresh):
        await asyncio.to_thread(verify, token, jwks_uri, issuer)  # PyJWT checks exp on its own clock: still valid
    clock.now += TTL  # the last token the old key could have signed has expired: it is dropped
    assert service.keys.rotate_if_due()
    assert await kids() == [new]
    with pytest.raises(jwt.PyJWKClientError):
        await asyncio.to_thread(verify, old_token, jwks_uri, issuer)


async def test_replicas_sharing_keys_in_postgresql_answer_the_same(pg_dsn: str) -> None:
    clock = Clock()
    pools = [await open_pool(pg_dsn), await open_pool(pg_dsn)]
    servers = [AppServer("oidc a"), AppServer("oidc b")]
    try:
        shared = [await open_keys(pool, clock) for pool in pools]
        issuer = OidcIssuer("https://cp.example.com/ci")  # what both replicas are known by, whatever their address
        bound = []
        for server, keys in zip(servers, shared, strict=True):
            endpoint = OidcEndpoint(issuer, keys.keys.published_jwks, max_age=cache_seconds(LEAD))
            bound.append((await server.start(endpoint.routes(), LOOPBACK, 0))[0][1])

        async def answers(path: str) -> list[tuple[bytes, str]]:
            got = [await fetch(f"http://{LOOPBACK}:{port}{path}") for port in bound]
            assert all(status == 200 for status, _, _ in got)
            return [(body, headers["ETag"]) for _, headers, body in got]

        for path in (issuer.discovery_path, issuer.jwks_path):
            first, second = await answers(path)
            assert first == second
        clock.now += ROTATE - LEAD
        assert await shared[0].step(is_leader=True)
        clock.now += shared[1].retry_interval
        assert await shared[1].step(is_leader=False)
        first, second = await answers(issuer.jwks_path)
        assert first == second and len(json.loads(first[0])["keys"]) == 2
        token = RelyingPartyTokens(issuer, shared[0].keys, clock=clock).sign(subject="s", audience=AUDIENCE)
        key = jwt.PyJWKSet.from_json(second[0].decode())[jwt.get_unverified_header(token)["kid"]]
        claims = jwt.decode(
            token, key, algorithms=["ES256"], audience=AUDIENCE, issuer=issuer.url, options={"verify_exp": False}
        )
        assert claims["iss"] == issuer.url
    finally:
        for server in servers:
            await server.stop()
        for pool in pools:
            await pool.close()


def test_tokens_for_relying_parties_refuse_bad_requests_and_keep_registered_claims(tmp_path: Path) -> None:
    from controlplane.credentials.keys import FileKeyStore, SigningKeys

    clock = Clock()
    keys = SigningKeys(
        FileKeyStore(tmp_path / "k.json"), rotate_every=ROTATE, max_credential_ttl=TTL, publish_lead=LEAD, clock=clock
    )
    tokens = RelyingPartyTokens(OidcIssuer("https://cp.example.com"), keys, clock=clock)
    with pytest.raises(ValueError, match="lifetime"):
        tokens.sign(subject="s", audience=AUDIENCE, lifetime=7200)
    with pytest.raises(ValueError, match="audience"):
        tokens.sign(subject="s", audience="")
    token = tokens.sign(subject="s", audience=AUDIENCE, extra={"iss": "https://evil", "job_id": "7"})
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "https://cp.example.com" and claims["job_id"] == "7"
    assert claims["exp"] - claims["iat"] == 300


def test_serve_takes_the_issuer_url_from_the_flag_or_the_environment_and_refuses_a_bad_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controlplane.cli.main import _parser, serve_options

    def credentials(*flags: str) -> CredentialOptions | None:
        parsed = serve_options(_parser().parse_args(["serve", "--policy", "p", *flags]))
        assert not isinstance(parsed, str), parsed
        return parsed.credentials

    monkeypatch.delenv("CONTROLPLANE_ISSUER_URL", raising=False)
    default = credentials()
    assert default is not None and default.issuer_url is None
    flagged = credentials("--issuer-url", "https://cp.example.com/ci")
    assert flagged is not None and flagged.issuer_url == "https://cp.example.com/ci"
    monkeypatch.setenv("CONTROLPLANE_ISSUER_URL", "https://env.example.com")
    from_env = credentials()
    assert from_env is not None and from_env.issuer_url == "https://env.example.com"
    refused_combination = serve_options(_parser().parse_args(["serve", "--policy", "p", "--no-exchange"]))
    assert isinstance(refused_combination, str) and "--issuer-url needs the token exchange" in refused_combination
    with pytest.raises(SystemExit) as refused:
        _parser().parse_args(["serve", "--issuer-url", "http://cp.example.com"])
    assert refused.value.code == 2 and "must use https" in capsys.readouterr().err


def test_serve_publishes_discovery_and_its_keys_at_the_issuer_url(tmp_path: Path) -> None:
    """`python -m controlplane serve` as users run it, the issuer URL from the environment: its exchange listener
    answers discovery and JWKS, the keys those status reports as published."""
    from tests.support.controlplane import ControlPlaneProcess

    root = Path(__file__).resolve().parent.parent
    server = ControlPlaneProcess(root / "examples" / "quickstart", log_path=tmp_path / "cp.log")
    issuer = f"http://{LOOPBACK}:{server.exchange_port}/ci"
    server.env["CONTROLPLANE_ISSUER_URL"] = issuer
    with server:
        document = json.loads(_get(issuer + "/.well-known/openid-configuration")[2])
        status, headers, body = _get(document["jwks_uri"])
        credentials = server.status()["credentials"]
    assert document["issuer"] == issuer and status == 200 and headers["Cache-Control"].startswith("public")
    assert sorted(k["kid"] for k in json.loads(body)["keys"]) == sorted(credentials["published_kids"])
    assert credentials["oidc_issuer"] == issuer
