"""serve's Google Cloud tokens (runtime/gcp_backends.py): refreshers follow the policy, tokens only in memory,
none without --issuer-url, nothing injected when no token is usable."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from controlplane.credentials.keys import FileKeyStore, SigningKeys
from controlplane.credentials.oidc import OidcIssuer, RelyingPartyTokens
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Policy
from controlplane.runtime.gcp_backends import (
    IAM_CREDENTIALS_URL_ENV,
    STS_URL_ENV,
    GcpBackends,
    refusal,
    settings_for,
)
from tests.support.fake_gcp import FakeGcp, Provider, principal

POOL = "projects/123/locations/global/workloadIdentityPools/gitlab-ci"
PROVIDER = POOL + "/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"
OTHER_SA = "gcs-writer@acme-prod.iam.gserviceaccount.com"
ISSUER = "https://cp.example.test"


def _policy(*accounts: str, plain: bool = False) -> Policy:
    docs = [
        f"kind: Backend\nname: b{i}\nhosts: [b{i}.local]\nendpoints: [{{address: 127.0.0.1, port: 9}}]\n"
        f"gcp: {{workload_identity_provider: {PROVIDER}, service_account: {account}}}\n"
        for i, account in enumerate(accounts)
    ]
    if plain:
        docs.append("kind: Backend\nname: plain\nhosts: [plain.local]\nendpoints: [{address: 127.0.0.1, port: 9}]\n")
    return parse_policy({"p.yaml": "---\n".join(docs)})


def test_a_gcp_backend_without_an_issuer_url_is_refused_with_the_flag_to_add() -> None:
    message = refusal(_policy(SA), is_issuer=False)
    assert message is not None and "b0" in message and "--issuer-url" in message
    assert refusal(_policy(SA), is_issuer=True) is None
    assert refusal(_policy(plain=True), is_issuer=False) is None


def test_settings_take_google_endpoints_unless_an_emulator_is_named() -> None:
    (backend,) = _policy(SA).backends
    assert settings_for(backend, {}).sts_url == "https://sts.googleapis.com/v1/token"
    emulated = settings_for(
        backend, {STS_URL_ENV: "http://127.0.0.1:1/v1/token", IAM_CREDENTIALS_URL_ENV: "http://x/v1"}
    )
    assert (emulated.sts_url, emulated.iam_credentials_url) == ("http://127.0.0.1:1/v1/token", "http://x/v1")
    assert emulated.subject == "backend:b0" and emulated.service_account == SA


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys(
        FileKeyStore(tmp_path / "keys.json"), rotate_every=86400, max_credential_ttl=3600, publish_lead=600
    )


def test_refreshers_follow_the_policy_and_tokens_are_only_handed_over_in_memory(keys: SigningKeys) -> None:
    with FakeGcp() as gcp:
        gcp.add_provider(Provider(PROVIDER, ISSUER, keys.published_jwks))
        gcp.add_service_account(SA, principal(POOL, "backend:b0"))
        gcp.add_service_account(OTHER_SA, principal(POOL, "backend:b0"))
        environ = {STS_URL_ENV: gcp.sts_url, IAM_CREDENTIALS_URL_ENV: gcp.iam_credentials_url}
        asyncio.run(_follow(gcp, keys, environ))


async def _follow(gcp: FakeGcp, keys: SigningKeys, environ: dict[str, str]) -> None:
    changes = asyncio.Queue[None]()

    async def changed() -> None:
        changes.put_nowait(None)

    backends = GcpBackends(lambda: RelyingPartyTokens(OidcIssuer(ISSUER), keys), changed, environ=environ)
    await backends.start()
    try:
        assert backends.for_policy(_policy(SA, plain=True)) == {}  # none yet: the Secret is empty, Envoy refuses
        await asyncio.sleep(0.1)
        assert backends.status() == {}  # compiling a candidate starts nothing: only the policy in service does
        backends.follow(_policy(SA, plain=True))
        await asyncio.wait_for(changes.get(), 10)
        tokens = backends.for_policy(_policy(SA, plain=True))
        assert set(tokens) == {"b0"} and gcp.access_tokens[tokens["b0"]].service_account == SA
        status = backends.status()["b0"]
        assert isinstance(status, dict) and status["service_account"] == SA and status["last_error"] is None
        assert 3530 <= status["valid_seconds"] <= 3540  # an hour, less the 60 s it is withdrawn before expiry

        # a changed block: the old token is no longer handed out, a new refresher gets one for the new account
        assert backends.for_policy(_policy(OTHER_SA)) == {}
        backends.follow(_policy(OTHER_SA))
        await asyncio.wait_for(changes.get(), 10)
        tokens = backends.for_policy(_policy(OTHER_SA))
        assert gcp.access_tokens[tokens["b0"]].service_account == OTHER_SA

        # gone from the policy: its refresher stops
        assert backends.for_policy(_policy(plain=True)) == {}
        backends.follow(_policy(plain=True))
        await _until(lambda: backends.status() == {})
    finally:
        await backends.stop()


def test_a_refused_exchange_leaves_nothing_to_inject(keys: SigningKeys) -> None:
    """The service account does not trust this backend's subject: no token, the loop survives, status says why."""
    with FakeGcp() as gcp:
        gcp.add_provider(Provider(PROVIDER, ISSUER, keys.published_jwks))
        gcp.add_service_account(SA, principal(POOL, "backend:someone-else"))
        environ = {STS_URL_ENV: gcp.sts_url, IAM_CREDENTIALS_URL_ENV: gcp.iam_credentials_url}

        async def refused() -> None:
            backends = GcpBackends(lambda: RelyingPartyTokens(OidcIssuer(ISSUER), keys), _noop, environ=environ)
            await backends.start()
            try:
                backends.follow(_policy(SA))
                await _until(lambda: _last_error(backends) is not None)
                assert backends.for_policy(_policy(SA)) == {}
                assert backends.status()["b0"] == {
                    "service_account": SA,
                    "valid_seconds": 0,
                    "last_error": _last_error(backends),
                }
            finally:
                await backends.stop()

        asyncio.run(refused())


async def _noop() -> None:
    return None


def _last_error(backends: GcpBackends) -> object:
    status = backends.status().get("b0")
    return status.get("last_error") if isinstance(status, dict) else None


async def _until(check: object, timeout: float = 10) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
