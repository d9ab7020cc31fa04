"""controlplane.cloud.gcp: the settings, the aiohttp adapter against the fake Google Cloud,
the refresher's fail-closed behaviour, metrics, and that no token ever reaches a log line or a repr."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from controlplane.cloud.gcp import (
    CLOUD_PLATFORM,
    CloudCredential,
    GcpCredentialRefresher,
    GcpExchangeError,
    GcpSettings,
    fetch_credential,
    http_fetcher,
    mint_subject_token,
)
from controlplane.cloud.refresh import RefreshPolicy
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from controlplane.telemetry.metrics import REGISTRY
from tests.support.backends import http_request, json_response
from tests.support.clock import Clock
from tests.support.fake_gcp import FakeGcp, FakeGoogleApi, Provider, principal
from tests.support.ports import free_port

ISSUER = "https://controlplane.example.test"
POOL = "projects/123456789/locations/global/workloadIdentityPools/gitlab-ci"
PROVIDER = POOL + "/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"
START = 1_800_000_000.0
POLICY = RefreshPolicy()


def cred(issued: float, life: float) -> CloudCredential:
    return CloudCredential("secret-token", expires_at=issued + life, issued_at=issued)


# -- settings


def test_settings_derive_the_audiences_google_expects() -> None:
    settings = GcpSettings(backend="gcs", workload_identity_provider=PROVIDER, service_account=SA)
    assert settings.sts_audience == "//iam.googleapis.com/" + PROVIDER
    assert settings.subject_audience == "https://iam.googleapis.com/" + PROVIDER
    assert settings.subject == "backend:gcs" and settings.scopes == (CLOUD_PLATFORM,)


@pytest.mark.parametrize(
    "overrides",
    [
        {"workload_identity_provider": "projects/acme/locations/global/workloadIdentityPools/p-ool/providers/x-yz"},
        {"workload_identity_provider": POOL},
        {"service_account": "not-an-email"},
        {"scopes": ()},
        {"id_token_audience": ""},
        {"lifetime": 0},
        {"lifetime": 43201},
    ],
)
def test_settings_refuse_what_google_would(overrides: dict[str, object]) -> None:
    fields: dict[str, object] = {"backend": "gcs", "workload_identity_provider": PROVIDER, "service_account": SA}
    with pytest.raises(ValueError):
        GcpSettings(**{**fields, **overrides})  # type: ignore[arg-type]


def test_an_id_token_needs_no_scope() -> None:
    settings = GcpSettings("run", PROVIDER, SA, scopes=(), id_token_audience="https://run.example.test")
    assert settings.id_token_audience == "https://run.example.test"


# The schedule itself (when to refresh, backoff, fail closed) is shared with AWS: tests/test_cloud_refresh.py.


# -- against the fake Google Cloud


class Cloud:
    def __init__(self, clock: Clock, keys: SigningKeys, gcp: FakeGcp, api: FakeGoogleApi) -> None:
        self.clock, self.keys, self.gcp, self.api = clock, keys, gcp, api

    def settings(self, **overrides: object) -> GcpSettings:
        fields: dict[str, object] = {
            "backend": "gcs",
            "workload_identity_provider": PROVIDER,
            "service_account": SA,
            "sts_url": self.gcp.sts_url,
            "iam_credentials_url": self.gcp.iam_credentials_url,
            **overrides,
        }
        return GcpSettings(**fields)  # type: ignore[arg-type]

    def api_accepts(self, token: str) -> bool:
        response = http_request(self.api.base_url + "/v1/thing", headers={"Authorization": f"Bearer {token}"})
        return response.status == 200


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    clock = Clock(START)
    keys = SigningKeys(
        FileKeyStore(tmp_path / "keys.json"), rotate_every=86400, max_credential_ttl=3600, publish_lead=600, clock=clock
    )
    with FakeGcp(clock=clock) as gcp, FakeGoogleApi(gcp, id_token_audience="https://run.example.test") as api:
        gcp.add_provider(
            Provider(PROVIDER, ISSUER, keys.published_jwks, attribute_condition="assertion.sub == 'backend:gcs'")
        )
        gcp.add_service_account(SA, principal(POOL, "backend:gcs"))
        yield Cloud(clock, keys, gcp, api)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


def test_the_subject_token_carries_what_the_provider_checks(cloud: Cloud) -> None:
    settings = cloud.settings()
    token = mint_subject_token(cloud.keys, ISSUER, settings, START)
    key = jwt.PyJWKSet.from_json(cloud.keys.published_jwks()).keys[0]
    claims = jwt.decode(
        token, key.key, algorithms=["ES256"], audience=settings.subject_audience, options={"verify_iat": False,
        "verify_nbf": False, "verify_exp": False}
    )  # fmt: skip
    assert claims["iss"] == ISSUER and claims["sub"] == "backend:gcs"
    assert claims["exp"] - claims["iat"] == 300 and claims["jti"]
    assert jwt.get_unverified_header(token)["kid"] == cloud.keys.signing_key().kid


async def test_an_access_token_the_google_api_accepts(cloud: Cloud, session: aiohttp.ClientSession) -> None:
    settings = cloud.settings(lifetime=900)
    credential = await http_fetcher(session, cloud.keys, ISSUER)(settings, START)
    assert credential.expires_at == START + 900 and credential.issued_at == START
    assert cloud.api_accepts(credential.token)
    sts, iam = (r for r in cloud.gcp.requests)
    assert sts.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert iam.path == f"/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"
    assert iam.json() == {"scope": [CLOUD_PLATFORM], "lifetime": "900s"}


async def test_an_id_token_for_a_cloud_run_audience(cloud: Cloud, session: aiohttp.ClientSession) -> None:
    settings = cloud.settings(id_token_audience="https://run.example.test")
    credential = await http_fetcher(session, cloud.keys, ISSUER)(settings, START)
    assert credential.expires_at == int(START) + 3600
    assert cloud.api_accepts(credential.token)
    assert cloud.gcp.requests[-1].json() == {"audience": "https://run.example.test", "includeEmail": True}


async def test_refusals_are_classified(cloud: Cloud, session: aiohttp.ClientSession) -> None:
    fetch = http_fetcher(session, cloud.keys, ISSUER)
    wrong_subject = cloud.settings(backend="other")  # the attribute condition names backend:gcs only
    with pytest.raises(GcpExchangeError) as refused:
        await fetch(wrong_subject, START)
    assert refused.value.result == "sts_refused" and "unauthorized_client" in str(refused.value)
    unbound = cloud.settings(service_account="deployer@acme-prod.iam.gserviceaccount.com")
    with pytest.raises(GcpExchangeError) as denied:
        await fetch(unbound, START)
    assert denied.value.result == "iam_refused" and "PERMISSION_DENIED" in str(denied.value)
    with pytest.raises(GcpExchangeError) as too_long:
        await fetch(cloud.settings(lifetime=7200), START)
    assert too_long.value.result == "iam_refused" and "INVALID_ARGUMENT" in str(too_long.value)
    cloud.gcp.outage.add("iam")
    with pytest.raises(GcpExchangeError) as outage:
        await fetch(cloud.settings(), START)
    assert outage.value.result == "unreachable"
    closed = cloud.settings(sts_url=f"http://127.0.0.1:{free_port()}/v1/token")
    with pytest.raises(GcpExchangeError) as unreachable:
        await fetch(closed, START)
    assert unreachable.value.result == "unreachable"
    garbage = cloud.settings(sts_url=cloud.api.base_url + "/v1/token")  # answers 401 JSON of another shape
    with pytest.raises(GcpExchangeError) as other:
        await fetch(garbage, START)
    assert other.value.result == "sts_refused"


async def test_a_malformed_answer_is_refused(session: aiohttp.ClientSession) -> None:
    with FakeGcp() as odd:
        odd.router.add("POST", "/odd/token", lambda _request: json_response({"token_type": "Bearer"}))
        settings = GcpSettings("gcs", PROVIDER, SA, sts_url=odd.base_url + "/odd/token")
        with pytest.raises(GcpExchangeError) as malformed:
            await fetch_credential(session, settings, "subject", START)
    assert malformed.value.result == "malformed"


def refreshes(result: str, backend: str = "gcs") -> float:
    value = REGISTRY.get_sample_value(
        "controlplane_cloud_credential_refreshes_total", {"provider": "gcp", "backend": backend, "result": result}
    )
    return value or 0.0


def valid_for(backend: str) -> float | None:
    labels = {"provider": "gcp", "backend": backend}
    return REGISTRY.get_sample_value("controlplane_cloud_credential_valid_seconds", labels)


async def test_the_refresher_keeps_the_last_token_then_fails_closed(
    cloud: Cloud, session: aiohttp.ClientSession
) -> None:
    refresher = GcpCredentialRefresher(
        cloud.settings(), http_fetcher(session, cloud.keys, ISSUER), clock=cloud.clock, sample=lambda: 0.0
    )
    ok, failed = refreshes("ok"), refreshes("unavailable")
    assert refresher.current() is None
    assert await refresher.refresh_once()
    first = refresher.current()
    assert first is not None and cloud.api_accepts(first.token)
    assert refresher.state.next_attempt_at == START + 1770  # half of 3600 - 60 s of skew
    assert valid_for("gcs") == 3540

    cloud.gcp.outage.add("sts")
    cloud.clock.now = START + 1770
    assert not await refresher.refresh_once()
    assert refresher.current() is first and refresher.state.next_attempt_at == START + 1770.5
    assert refreshes("unavailable") == failed + 1
    cloud.clock.now = START + 3540
    assert refresher.current() is None, "fails closed once the last token is about to expire"
    assert valid_for("gcs") == 0

    cloud.gcp.outage.clear()
    assert await refresher.refresh_once()
    second = refresher.current()
    assert second is not None and second.token != first.token and cloud.api_accepts(second.token)
    assert refreshes("ok") == ok + 2


async def test_run_refreshes_whenever_due(cloud: Cloud, session: aiohttp.ClientSession) -> None:
    refresher = GcpCredentialRefresher(
        cloud.settings(), http_fetcher(session, cloud.keys, ISSUER), clock=cloud.clock, sample=lambda: 0.0
    )
    slept: list[float] = []

    class Stop(Exception):
        pass

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise Stop
        cloud.clock.now += seconds

    with pytest.raises(Stop):
        await refresher.run(sleep)
    assert slept == [1770.0, 1770.0, 1770.0]
    tokens = [r for r in cloud.gcp.requests if r.path.endswith(":generateAccessToken")]
    assert len(tokens) == 3


async def test_no_token_reaches_a_log_line_or_a_repr(
    cloud: Cloud, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    minted: list[str] = []
    inner = http_fetcher(session, cloud.keys, ISSUER)

    async def fetch(settings: GcpSettings, now: float) -> CloudCredential:
        credential = await inner(settings, now)
        minted.append(credential.token)
        return credential

    refresher = GcpCredentialRefresher(cloud.settings(), fetch, clock=cloud.clock)
    await refresher.refresh_once()
    cloud.gcp.outage.add("iam")
    await refresher.refresh_once()
    cloud.gcp.outage.clear()
    cloud.gcp.add_service_account("x-other@acme-prod.iam.gserviceaccount.com")
    denied = GcpCredentialRefresher(
        cloud.settings(service_account="x-other@acme-prod.iam.gserviceaccount.com"), fetch, clock=cloud.clock
    )
    await denied.refresh_once()
    secrets = (
        minted
        + list(cloud.gcp.federated)
        + list(cloud.gcp.access_tokens)
        + [r.body.decode().split("subject_token=")[1] for r in cloud.gcp.requests if r.path == "/v1/token"]
    )
    assert len(secrets) >= 5
    shown = caplog.text + repr(refresher.state) + repr(denied.state) + str(denied.state.last_error)
    assert "refreshed" in caplog.text and "failed" in caplog.text and "PERMISSION_DENIED" in caplog.text
    for secret in secrets:
        assert secret not in shown


async def test_a_bug_or_an_unsigned_start_is_a_counted_failure_not_a_dead_loop(
    cloud: Cloud, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(settings: GcpSettings, now: float) -> CloudCredential:
        raise KeyError("ya29.would-be-secret")

    refresher = GcpCredentialRefresher(cloud.settings(backend="broken"), broken, clock=cloud.clock)
    before = refreshes("error", "broken")
    assert not await refresher.refresh_once()
    assert refreshes("error", "broken") == before + 1 and refresher.state.failures == 1
    assert "ya29.would-be-secret" not in caplog.text + str(refresher.state.last_error)

    class NotYet:
        def signing_key(self) -> object:
            raise RuntimeError("no signing key may sign yet")

    unsigned = http_fetcher(session, NotYet(), ISSUER)  # type: ignore[arg-type]
    with pytest.raises(GcpExchangeError) as refused:
        await unsigned(cloud.settings(), START)
    assert refused.value.result == "unsigned" and cloud.gcp.requests == []


async def test_run_withdraws_an_unrefreshed_credential_on_time_and_says_so(
    cloud: Cloud, session: aiohttp.ClientSession
) -> None:
    seen: list[CloudCredential | None] = []
    policy = RefreshPolicy(retry_base=1000, retry_cap=10000)
    refresher: GcpCredentialRefresher = GcpCredentialRefresher(
        cloud.settings(),
        http_fetcher(session, cloud.keys, ISSUER),
        clock=cloud.clock,
        policy=policy,
        sample=lambda: 0.0,
        on_change=lambda: seen.append(refresher.current()),
    )
    slept: list[float] = []

    class Stop(Exception):
        pass

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 5:
            raise Stop
        cloud.gcp.outage.add("sts")
        cloud.clock.now += seconds

    with pytest.raises(Stop):
        await refresher.run(sleep)
    # refresh due; retries backed off (500, 1000 s), the next one no later than the withdrawal at 3540 s; then
    # withdrawn, and only the retry is left (4000 s)
    assert slept == [1770.0, 500.0, 1000.0, 270.0, 4000.0]
    assert len(seen) == 2 and seen[0] is not None and seen[1] is None
    assert refresher.current() is None
