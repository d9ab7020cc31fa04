"""The key relay: JWKS normalization, the fetcher (HTTP caching, retries, last good kept), the compiler's inline
keys and placeholder, `KeyRelay` following the policy, and `PolicyService.set_keys`.

The fetcher is tested against a real aiohttp server on loopback; waits are bounded by deadlines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from controlplane.compiler.compile import CompiledGroup, compile_policy
from controlplane.compiler.jwt import PLACEHOLDER_JWKS, PLACEHOLDER_KID
from controlplane.model.policy import JwksMode, Policy
from controlplane.runtime.keyrelay import KeyRelay
from controlplane.runtime.policy_service import PolicyService
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import CLUSTER, EXTENSION_CONFIG, LISTENER, ROUTE
from controlplane.sources.jwks import JwksDocument, JwksError, JwksFetcher, normalize_jwks
from controlplane.telemetry.metrics import REGISTRY
from tests.compiled import clusters, jwt_authentication, policy_of
from tests.support.fake_oidc import SigningKey

ROOT = Path(__file__).resolve().parent.parent

# --- keys -----------------------------------------------------------------------------------------------------

KEY_A = SigningKey.generate()
KEY_B = SigningKey.generate()


def rsa_jwk(key: SigningKey, **extra: Any) -> dict[str, Any]:
    return {**key.public_jwk, **extra}


def ec_jwk(curve: ec.EllipticCurve | None = None, kid: str = "ec-1", **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(
        ec.generate_private_key(curve or ec.SECP256R1()).public_key(), as_dict=True
    )
    return {**jwk, "kid": kid, **extra}


def weak_rsa_jwk() -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(), as_dict=True
    )
    return {**jwk, "kid": "weak"}


def jwks(*keys: object) -> str:
    return json.dumps({"keys": list(keys)})


# --- normalization --------------------------------------------------------------------------------------------


def test_same_keys_give_the_same_bytes_whatever_the_order_and_extra_members() -> None:
    one, _ = normalize_jwks(jwks(rsa_jwk(KEY_A), rsa_jwk(KEY_B)))
    two, _ = normalize_jwks(jwks(rsa_jwk(KEY_B, x5c=["MIIB..."], x5t="abc"), rsa_jwk(KEY_A)))
    assert one == two
    assert list(one.kids) == sorted([KEY_A.kid, KEY_B.kid])
    assert json.loads(one.canonical)["keys"][0] == {
        k: v
        for k, v in rsa_jwk(min(KEY_A, KEY_B, key=lambda k: k.kid)).items()
        if k in {"kid", "kty", "n", "e", "alg", "use"}
    }


def test_private_members_are_never_relayed() -> None:
    private: dict[str, Any] = RSAAlgorithm.to_jwk(KEY_A.private_key, as_dict=True)
    document, _ = normalize_jwks(jwks({**private, "kid": "k"}))
    (key,) = json.loads(document.canonical)["keys"]
    assert set(key) == {"kid", "kty", "n", "e"}


def test_keys_envoy_cannot_use_are_dropped_and_the_rest_kept() -> None:
    good_ec = ec_jwk(ec.SECP384R1(), kid="ec-384", alg="ES384")
    off_curve = {**ec_jwk(kid="off-curve"), "y": ec_jwk()["x"]}
    document, dropped = normalize_jwks(
        jwks(
            rsa_jwk(KEY_A),
            good_ec,
            rsa_jwk(KEY_B, use="enc"),
            rsa_jwk(KEY_B, kid=""),
            rsa_jwk(KEY_B, kid="wrong-alg", alg="ES256"),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {**rsa_jwk(KEY_B), "kid": "bad-n", "n": "not*base64"},
            off_curve,
            ec_jwk(kid="ec-wrong-alg", alg="ES512"),
            weak_rsa_jwk(),
            "not a key",
        )
    )
    assert set(document.kids) == {KEY_A.kid, "ec-384"}
    assert {d.kid for d in dropped} == {
        KEY_B.kid, "#3", "wrong-alg", "hmac", "ed", "bad-n", "off-curve", "ec-wrong-alg", "weak", "#11",
    }  # fmt: skip
    assert all(d.reason for d in dropped)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("<html>", "not JSON"),
        ('{"kys": []}', "not a JWKS"),
        ("[]", "not a JWKS"),
        ('{"keys": []}', "no usable key"),
        (jwks(rsa_jwk(KEY_A, use="enc")), "no usable key"),
    ],
)
def test_documents_without_a_usable_key_are_errors(payload: str, message: str) -> None:
    with pytest.raises(JwksError, match=message):
        normalize_jwks(payload)


def test_the_placeholder_is_a_canonical_usable_jwks() -> None:
    """Envoy rejects a JWKS without a valid key; the placeholder must survive the relay's own checks."""
    document, dropped = normalize_jwks(PLACEHOLDER_JWKS)
    assert document.canonical == PLACEHOLDER_JWKS and document.kids == (PLACEHOLDER_KID,) and not dropped


# --- a JWKS server ---------------------------------------------------------------------------------------------


class JwksServer:
    """Serves `keys` with an ETag (or a Last-Modified) and answers conditional requests; `failures` are statuses
    answered first, one per request."""

    def __init__(self, validator: str = "etag") -> None:
        self.keys: list[dict[str, Any]] = [rsa_jwk(KEY_A)]
        self.validator = validator
        self.failures: list[int] = []
        self.body: str | None = None
        self.requests: list[Mapping[str, str]] = []
        self.discovery_requests = 0
        self.issuer_override: str | None = None
        app = web.Application()
        app.router.add_get("/oauth/discovery/keys", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def issuer(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/oauth/discovery/keys"

    async def _discovery(self, _request: web.Request) -> web.Response:
        self.discovery_requests += 1
        return web.json_response({"issuer": self.issuer_override or self.issuer, "jwks_uri": self.jwks_uri})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.headers))
        if self.failures:
            return web.json_response({"error": "unavailable"}, status=self.failures.pop(0))
        body = self.body if self.body is not None else jwks(*self.keys)
        tag = hashlib.sha256(body.encode()).hexdigest()[:16]
        if self.validator == "etag":
            headers = {"ETag": f'"{tag}"'}
            fresh = request.headers.get("If-None-Match") == headers["ETag"]
        else:
            headers = {"Last-Modified": f"Wed, 25 Nov 2026 00:00:{int(tag, 16) % 60:02d} GMT"}
            fresh = request.headers.get("If-Modified-Since") == headers["Last-Modified"]
        headers["Cache-Control"] = "max-age=86400, public, must-revalidate"
        if fresh:
            return web.Response(status=304, headers=headers)
        return web.Response(text=body, content_type="application/json", headers=headers)


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    built = JwksServer()
    await built.server.start_server()
    yield built
    await built.server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetcher_for(server: JwksServer, name: str, **options: Any) -> JwksFetcher:
    options = {"jwks_uri": server.jwks_uri, "min_interval": 0.0, "max_retries": 2, "timeout": 2.0, **options}
    return JwksFetcher(server.issuer, name=name, **options)


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# --- the fetcher ------------------------------------------------------------------------------------------------


async def test_first_fetch_returns_the_document_and_exports_metrics(server: JwksServer) -> None:
    fetcher = fetcher_for(server, "t-first")
    try:
        document = await fetcher.refresh()
        assert document is not None and document.kids == (KEY_A.kid,)
        assert fetcher.document == document
        assert metric("controlplane_jwks_fetches_total", issuer="t-first", result="changed") == 1
        assert metric("controlplane_jwks_keys", issuer="t-first") == 1
        assert (metric("controlplane_jwks_last_success_timestamp_seconds", issuer="t-first") or 0) > 0
        assert not metric("controlplane_jwks_key_changes_total", issuer="t-first")  # a first load is no rotation
        assert server.requests[0]["Cache-Control"] == "no-cache"  # caches in between must revalidate
    finally:
        await fetcher.close()
    assert metric("controlplane_jwks_keys", issuer="t-first") is None  # no longer relayed: series withdrawn


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
async def test_a_304_keeps_the_cached_document(server: JwksServer, validator: str) -> None:
    server.validator = validator
    fetcher = fetcher_for(server, f"t-304-{validator}")
    try:
        first = await fetcher.refresh()
        assert await fetcher.refresh() is None
        sent = server.requests[-1]
        assert ("If-None-Match" in sent) == (validator == "etag")
        assert ("If-Modified-Since" in sent) == (validator == "last-modified")
        assert fetcher.document == first
        assert metric("controlplane_jwks_fetches_total", issuer=fetcher.name, result="not_modified") == 1
    finally:
        await fetcher.close()


async def test_a_forced_refresh_sends_no_validators(server: JwksServer) -> None:
    fetcher = fetcher_for(server, "t-force")
    try:
        await fetcher.refresh()
        assert await fetcher.refresh(force=True) is None  # a full 200, but the same keys
        assert "If-None-Match" not in server.requests[-1]
        assert metric("controlplane_jwks_fetches_total", issuer="t-force", result="unchanged") == 1
    finally:
        await fetcher.close()


async def test_a_rotation_is_returned_and_counted(server: JwksServer) -> None:
    fetcher = fetcher_for(server, "t-rotate")
    try:
        await fetcher.refresh()
        server.keys = [rsa_jwk(KEY_B), rsa_jwk(KEY_A)]
        rotated = await fetcher.refresh()
        assert rotated is not None and set(rotated.kids) == {KEY_A.kid, KEY_B.kid}
        server.keys = [rsa_jwk(KEY_B)]
        withdrawn = await fetcher.refresh()
        assert withdrawn is not None and withdrawn.kids == (KEY_B.kid,)
        assert metric("controlplane_jwks_key_changes_total", issuer="t-rotate") == 2
    finally:
        await fetcher.close()


async def test_errors_keep_the_last_good_document(server: JwksServer) -> None:
    fetcher = fetcher_for(server, "t-errors", max_retries=2)
    try:
        good = await fetcher.refresh()
        server.failures = [503, 503, 503]
        before = len(server.requests)
        assert await fetcher.refresh() is None
        assert len(server.requests) - before == 3  # the first try and two retries
        assert fetcher.document == good and fetcher.last_error and "HTTP 503" in fetcher.last_error
        for broken in ('{"keys": []}', "<html>oops</html>"):
            server.body = broken
            assert await fetcher.refresh() is None
            assert fetcher.document == good
        server.body = None
        server.failures = [404]
        before = len(server.requests)
        assert await fetcher.refresh() is None
        assert len(server.requests) - before == 1  # a 404 is not retried
        assert fetcher.document == good
        assert metric("controlplane_jwks_fetches_total", issuer="t-errors", result="error") == 4
        assert metric("controlplane_jwks_keys", issuer="t-errors") == 1
        assert await fetcher.refresh() is None  # recovered: same keys as the good one
        assert fetcher.last_error is None
    finally:
        await fetcher.close()


async def test_transient_failures_are_retried_within_one_refresh(server: JwksServer) -> None:
    fetcher = fetcher_for(server, "t-retry", max_retries=3)
    server.failures = [502, 429]
    try:
        assert await fetcher.refresh() is not None
        assert len(server.requests) == 3
    finally:
        await fetcher.close()


async def test_a_rejected_document_never_gets_pinned_by_a_304(server: JwksServer) -> None:
    fetcher = fetcher_for(server, "t-pin")
    try:
        good = await fetcher.refresh()
        server.body = '{"keys": []}'
        assert await fetcher.refresh() is None
        server.body = None  # the good body again: its ETag is the one we still hold
        assert await fetcher.refresh() is None
        assert server.requests[-1].get("If-None-Match") is not None
        assert fetcher.document == good
    finally:
        await fetcher.close()


async def test_never_fetches_more_often_than_min_interval(server: JwksServer) -> None:
    clock = Clock()
    fetcher = fetcher_for(server, "t-min", min_interval=1.0, clock=clock)
    try:
        await fetcher.refresh()
        clock.now += 0.5
        assert await fetcher.refresh(force=True) is None
        assert await fetcher.on_unknown_kid("nope") is False
        assert len(server.requests) == 1
        clock.now += 0.6
        await fetcher.refresh()
        assert len(server.requests) == 2
    finally:
        await fetcher.close()


async def test_an_unknown_kid_forces_one_refetch_and_reports_the_change(server: JwksServer) -> None:
    clock = Clock()
    fetcher = fetcher_for(server, "t-kid", min_interval=1.0, refresh_interval=3600, clock=clock)
    seen: list[JwksDocument] = []
    stop = asyncio.Event()

    async def on_change(document: JwksDocument) -> None:
        seen.append(document)

    runner = asyncio.create_task(fetcher.run(stop, on_change))
    try:
        await asyncio.wait_for(fetcher.settled.wait(), 5)
        assert await fetcher.on_unknown_kid(KEY_A.kid) is True  # known: no fetch
        assert len(server.requests) == 1
        server.keys = [rsa_jwk(KEY_A), rsa_jwk(KEY_B)]
        clock.now += 1.0
        assert await fetcher.on_unknown_kid(KEY_B.kid) is True
        assert "If-None-Match" not in server.requests[-1]
        assert [set(d.kids) for d in seen] == [{KEY_A.kid}, {KEY_A.kid, KEY_B.kid}]
        assert await fetcher.on_unknown_kid("never-published") is False  # within min_interval: no fetch
        assert len(server.requests) == 2
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)
        await fetcher.close()


async def test_discovery_finds_the_jwks_uri_and_checks_the_issuer(server: JwksServer) -> None:
    fetcher = fetcher_for(server, "t-discovery", jwks_uri=None)
    try:
        document = await fetcher.refresh()
        assert document is not None and server.discovery_requests == 1
        await fetcher.refresh()
        assert server.discovery_requests == 1  # remembered
    finally:
        await fetcher.close()
    server.issuer_override = "https://evil.example.com"
    impostor = fetcher_for(server, "t-discovery-2", jwks_uri=None)
    try:
        assert await impostor.refresh() is None
        assert impostor.last_error and "another issuer" in impostor.last_error
    finally:
        await impostor.close()


async def test_proxy_environment_is_ignored(server: JwksServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # the discard port: a proxied request would fail
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    fetcher = fetcher_for(server, "t-proxy", max_retries=0)
    try:
        assert await fetcher.refresh() is not None
    finally:
        await fetcher.close()


async def test_an_oversized_body_is_refused(server: JwksServer) -> None:
    server.body = jwks(rsa_jwk(KEY_A, padding="x" * (2 << 20)))
    fetcher = fetcher_for(server, "t-big")
    try:
        assert await fetcher.refresh() is None
        assert fetcher.last_error and "over" in fetcher.last_error
    finally:
        await fetcher.close()


async def test_run_refreshes_periodically_and_retries_failures_sooner(server: JwksServer) -> None:
    server.failures = [503]
    fetcher = fetcher_for(server, "t-run", max_retries=0, min_interval=0.01, refresh_interval=0.05)
    changes: asyncio.Queue[JwksDocument] = asyncio.Queue()
    stop = asyncio.Event()
    runner = asyncio.create_task(fetcher.run(stop, changes.put))
    try:
        assert (await asyncio.wait_for(changes.get(), 5)).kids == (KEY_A.kid,)  # after one failure
        server.keys = [rsa_jwk(KEY_B)]
        assert (await asyncio.wait_for(changes.get(), 5)).kids == (KEY_B.kid,)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)
        await fetcher.close()


# --- the compiler ------------------------------------------------------------------------------------------------

POLICY = {
    "issuer": """
kind: Issuer
name: gitlab
type: gitlab
url: https://gitlab.example.com
""",
    "rest": """
kind: Backend
name: billing
hosts: [billing.local]
endpoints: [{address: 127.0.0.1, port: 8081}]
---
kind: Role
name: billing-read
backend: billing
rules: [{methods: [GET]}]
---
kind: Binding
name: jobs
roles: [billing-read]
subjects: [{project: 42}]
---
kind: Gateway
name: gw
listen: {port: 10000}
backends: [billing]
""",
}


def relayed_policy(mode: JwksMode = JwksMode.RELAY) -> Policy:
    policy = policy_of(**POLICY)
    return replace(policy, issuers=tuple(replace(i, jwks_mode=mode) for i in policy.issuers))


def test_a_relayed_issuer_gets_its_keys_inline_and_no_cluster() -> None:
    keys, _ = normalize_jwks(jwks(rsa_jwk(KEY_A)))
    group = compile_policy(relayed_policy(), keys={"gitlab": keys.canonical})["gw"]
    provider = jwt_authentication(group).providers["gitlab"]
    assert provider.WhichOneof("jwks_source_specifier") == "local_jwks"
    assert provider.local_jwks.inline_string == keys.canonical
    assert set(clusters(group)) == {"backend-billing"}


def test_without_keys_a_relayed_issuer_gets_the_placeholder() -> None:
    group = compile_policy(relayed_policy())["gw"]
    assert jwt_authentication(group).providers["gitlab"].local_jwks.inline_string == PLACEHOLDER_JWKS
    assert compile_policy(relayed_policy(), keys={"another": "{}"})["gw"].resources == group.resources


def test_a_remote_issuer_keeps_remote_jwks_and_its_cluster() -> None:
    group = compile_policy(relayed_policy(JwksMode.REMOTE), keys={"gitlab": PLACEHOLDER_JWKS})["gw"]
    provider = jwt_authentication(group).providers["gitlab"]
    assert provider.WhichOneof("jwks_source_specifier") == "remote_jwks"
    assert provider.remote_jwks.http_uri.cluster == "jwks-gitlab"
    assert provider.remote_jwks.cache_duration.seconds == 300
    assert "jwks-gitlab" in clusters(group)


def test_new_keys_change_jwt_authns_filter_configuration_only() -> None:
    """jwt_authn comes by ECDS: new keys change its configuration, never the listener (no drain in Envoy)."""
    one, _ = normalize_jwks(jwks(rsa_jwk(KEY_A)))
    two, _ = normalize_jwks(jwks(rsa_jwk(KEY_A), rsa_jwk(KEY_B)))
    first = compile_policy(relayed_policy(), keys={"gitlab": one.canonical})["gw"].resources
    again = compile_policy(relayed_policy(), keys={"gitlab": one.canonical})["gw"].resources
    second = compile_policy(relayed_policy(), keys={"gitlab": two.canonical})["gw"].resources
    assert first == again
    assert first[LISTENER] == second[LISTENER]
    assert first[CLUSTER] == second[CLUSTER] and first[ROUTE] == second[ROUTE]
    before, after = dict(first[EXTENSION_CONFIG]), dict(second[EXTENSION_CONFIG])
    assert [name for name in before if before[name] != after[name]] == ["envoy.filters.http.jwt_authn"]


# --- the relay and the service --------------------------------------------------------------------------------


async def test_key_relay_follows_the_policys_relayed_issuers(server: JwksServer) -> None:
    seen: list[dict[str, str]] = []

    async def on_change(keys: Mapping[str, str]) -> None:
        seen.append(dict(keys))

    relay = KeyRelay(on_change, spawn=asyncio.create_task, refresh_interval=3600, min_interval=0.0)
    issuer = replace(policy_of(**POLICY).issuers[0], url=server.issuer, jwks_uri=server.jwks_uri)
    try:
        await relay.update([issuer, replace(issuer, name="remote-one", jwks_mode=JwksMode.REMOTE)], wait=5)
        expected, _ = normalize_jwks(jwks(rsa_jwk(KEY_A)))
        assert relay.keys == {"gitlab": expected.canonical} and seen[-1] == relay.keys
        assert set(relay.status()) == {"gitlab"}  # a remote issuer is fetched by Envoy, not relayed
        await relay.update([issuer])
        assert len(server.requests) == 1  # unchanged issuer: the same fetcher keeps going
        moved = replace(issuer, jwks_uri=server.jwks_uri + "?v=2")
        await relay.update([moved], wait=5)  # another address: the old keys go at once, then the new ones come
        assert seen[-2] == {}
        assert seen[-1] == {"gitlab": expected.canonical}
        await relay.update([])
        assert relay.keys == {} and seen[-1] == {}
    finally:
        await relay.stop()


def _service(tmp_path: Path) -> PolicyService:
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "policy")
    return PolicyService(tmp_path / "policy", SnapshotCache(), clock=lambda: 1000.0)


def _provider_keys(service: PolicyService) -> list[str]:
    """The inline JWKS of every provider in the jwt_authn configuration the cache serves (listener and ECDS)."""
    types = service.cache.get("ci-gateway").types
    group = CompiledGroup(
        "ci-gateway",
        {t: [(e.name, e.payload) for e in types[t].resources.values()] for t in (LISTENER, EXTENSION_CONFIG)},
    )
    return [p.local_jwks.inline_string for _, p in sorted(jwt_authentication(group).providers.items())]


async def test_set_keys_recompiles_the_policy_in_service_without_rereading_it(tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert await service.set_keys({"gitlab": "{}"}) is False  # nothing in service yet; kept for the first load
    assert await service.reload_off_loop()
    assert _provider_keys(service) == ["{}"]
    good_version = service.state.versions["ci-gateway"]
    (tmp_path / "policy" / "bindings.yaml").write_text("kind: Binding\nname: broken\n")
    assert not await service.reload_off_loop()
    errors = list(service.state.errors)
    keys, _ = normalize_jwks(jwks(rsa_jwk(KEY_A)))
    assert await service.set_keys({"gitlab": keys.canonical})
    assert _provider_keys(service) == [keys.canonical]
    assert service.state.versions["ci-gateway"] != good_version
    assert service.state.errors == errors  # the broken policy on disk is still reported
    assert service.state.last_good_load == 1000.0
