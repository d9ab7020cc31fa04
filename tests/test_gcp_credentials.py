"""controlplane.cloud.gcp: the pure refresh logic exhaustively, the aiohttp adapter against the fake Google Cloud,
the refresher's fail-closed behaviour, metrics, and that no token ever reaches a log line or a repr."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
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
    RefreshPolicy,
    RefreshState,
    after_failure,
    after_success,
    due,
    fetch_credential,
    http_fetcher,
    mint_subject_token,
    refresh_at,
    usable,
    valid_seconds,
    wake_at,
)
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


# -- the pure logic


def test_refresh_at_is_a_quarter_of_the_life_before_it_becomes_unusable() -> None:
    assert refresh_at(cred(0, 3600), POLICY) == 3600 - 10 - 900
    assert refresh_at(cred(0, 600), POLICY) == 300  # 600 - 10 - 300 would be in the first half of its life
    assert refresh_at(cred(0, 400), POLICY) == 200
    assert refresh_at(cred(0, 43200), POLICY) == 43200 - 10 - 10800


def test_refresh_invariants_hold_exhaustively() -> None:
    """Over a grid of policies and lives: refresh in the second half of a credential's life, before it stops
    being usable whenever the life allows it, and usable exactly until expiry minus the skew."""
    fractions, margins, skews = (0.1, 0.25, 0.5, 0.9), (0.0, 60.0, 300.0), (0.0, 10.0, 30.0)
    lives = (1.0, 20.0, 61.0, 600.0, 3600.0, 43200.0)
    for fraction, margin, skew, life in itertools.product(fractions, margins, skews, lives):
        policy = RefreshPolicy(refresh_fraction=fraction, min_margin=margin, expiry_skew=skew)
        credential = cred(1000.0, life)
        at = refresh_at(credential, policy)
        assert 1000.0 + life / 2 <= at <= credential.expires_at
        if life / 2 > skew:
            assert at < credential.expires_at - skew, (fraction, margin, skew, life)
        state = after_success(RefreshState(), credential, policy)
        assert not due(state, at - 0.001) and due(state, at)
        assert usable(state, credential.expires_at - skew - 0.001, policy) is credential
        assert usable(state, credential.expires_at - skew, policy) is None
        assert valid_seconds(state, credential.expires_at - skew, policy) == 0.0


def test_failures_back_off_exponentially_to_the_cap_and_keep_the_credential() -> None:
    credential = cred(0, 3600)
    state = after_success(RefreshState(), credential, POLICY)
    now, delays = 2700.0, []
    for _ in range(10):
        state = after_failure(state, now, "STS answered 503", POLICY)
        delays.append(state.next_attempt - now)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert state.failures == 10 and state.last_error == "STS answered 503"
    assert usable(state, 3589.9, POLICY) is credential, "the last credential is kept until it expires"
    assert usable(state, 3590.0, POLICY) is None, "then the refresher fails closed"
    recovered = after_success(state, cred(3600, 3600), POLICY)
    assert recovered.failures == 0 and recovered.last_error is None


def test_the_very_first_attempt_is_due_at_once_and_a_failure_holds_nothing() -> None:
    state: RefreshState[CloudCredential] = RefreshState()
    assert due(state, 0.0) and usable(state, 0.0, POLICY) is None
    state = after_failure(state, 5.0, "unreachable", POLICY)
    assert state.credential is None and state.next_attempt == 6.0 and valid_seconds(state, 5.0, POLICY) == 0.0
    many: RefreshState[CloudCredential] = RefreshState(failures=10_000)
    assert after_failure(many, 0.0, "x", POLICY).next_attempt == POLICY.retry_cap  # no overflow


@pytest.mark.parametrize(
    "fields",
    [{"refresh_fraction": 0.0}, {"refresh_fraction": 1.0}, {"retry_base": 0.0}, {"retry_cap": -1.0},
     {"min_margin": -1.0}, {"expiry_skew": -1.0}],
)  # fmt: skip
def test_a_nonsense_policy_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RefreshPolicy(**fields)


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
    refresher = GcpCredentialRefresher(cloud.settings(), http_fetcher(session, cloud.keys, ISSUER), clock=cloud.clock)
    ok, failed = refreshes("ok"), refreshes("unavailable")
    assert refresher.current() is None
    assert await refresher.refresh_once()
    first = refresher.current()
    assert first is not None and cloud.api_accepts(first.token)
    assert refresher.next_attempt() == START + 2690
    assert valid_for("gcs") == 3590

    cloud.gcp.outage.add("sts")
    cloud.clock.now = START + 2690
    assert not await refresher.refresh_once()
    assert refresher.current() is first and refresher.next_attempt() == START + 2691
    assert refreshes("unavailable") == failed + 1
    cloud.clock.now = START + 3590
    assert refresher.current() is None, "fails closed once the last token is about to expire"
    assert valid_for("gcs") == 0

    cloud.gcp.outage.clear()
    assert await refresher.refresh_once()
    second = refresher.current()
    assert second is not None and second.token != first.token and cloud.api_accepts(second.token)
    assert refreshes("ok") == ok + 2


async def test_run_refreshes_whenever_due(cloud: Cloud, session: aiohttp.ClientSession) -> None:
    refresher = GcpCredentialRefresher(cloud.settings(), http_fetcher(session, cloud.keys, ISSUER), clock=cloud.clock)
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
    assert slept == [2690.0, 2690.0, 2690.0]
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


def test_wake_at_is_the_next_refresh_or_the_withdrawal_whichever_first() -> None:
    credential = cred(0, 3600)
    state = after_success(RefreshState(), credential, POLICY)
    assert wake_at(state, 0.0, POLICY) == 2690  # the refresh comes first
    failing = replace(state, next_attempt=5000.0)
    assert wake_at(failing, 3000.0, POLICY) == 3590  # the withdrawal comes first
    assert wake_at(failing, 3590.0, POLICY) == 5000  # already withdrawn: only the retry is left
    assert wake_at(RefreshState(next_attempt=7.0), 0.0, POLICY) == 7.0


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
        on_change=lambda: seen.append(refresher.current()),
    )
    slept: list[float] = []

    class Stop(Exception):
        pass

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 4:
            raise Stop
        cloud.gcp.outage.add("sts")
        cloud.clock.now += seconds

    with pytest.raises(Stop):
        await refresher.run(sleep)
    assert slept == [2690.0, 900.0, 100.0, 2000.0]  # refresh due; withdrawal; retry; retry backed off
    assert len(seen) == 2 and seen[0] is not None and seen[1] is None
    assert refresher.current() is None
