"""Google's own client library (google-auth `identity_pool` credentials with a token file) against the fake.

Why: the fake's request checks are our reading of Google's documentation; Google's library is what real
clients send, so it passing here (and being refused where Google would refuse it) shows the fake accepts the
real wire format. google-auth is in the test extra (pyproject), so `make test` always runs this.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.auth import exceptions, identity_pool  # type: ignore[import-not-found,import-untyped,unused-ignore]
from google.auth.transport.requests import Request  # type: ignore[import-not-found,import-untyped,unused-ignore]

from controlplane.cloud.gcp import CLOUD_PLATFORM, GcpSettings, mint_subject_token
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from tests.support.backends import http_request
from tests.support.fake_gcp import FakeGcp, FakeGoogleApi, Provider, principal

ISSUER = "https://controlplane.example.test"
POOL = "projects/123456789/locations/global/workloadIdentityPools/gitlab-ci"
PROVIDER = POOL + "/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FakeGcp, FakeGoogleApi, SigningKeys]]:
    keys = SigningKeys(
        FileKeyStore(tmp_path / "keys.json"), rotate_every=86400, max_credential_ttl=3600, publish_lead=600
    )
    with FakeGcp() as gcp, FakeGoogleApi(gcp) as api:
        gcp.add_provider(
            Provider(PROVIDER, ISSUER, keys.published_jwks, attribute_condition="assertion.sub == 'backend:gcs'")
        )
        gcp.add_service_account(SA, principal(POOL, "backend:gcs"))
        yield gcp, api, keys


def credentials(gcp: FakeGcp, token_file: Path) -> Any:
    info = {
        "type": "external_account",
        "audience": "//iam.googleapis.com/" + PROVIDER,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": gcp.sts_url,
        "service_account_impersonation_url": (
            f"{gcp.iam_credentials_url}/projects/-/serviceAccounts/{SA}:generateAccessToken"
        ),
        "credential_source": {"file": str(token_file)},
    }
    return identity_pool.Credentials.from_info(info, scopes=[CLOUD_PLATFORM])


def test_google_auth_obtains_a_token_the_api_accepts(
    setup: tuple[FakeGcp, FakeGoogleApi, SigningKeys], tmp_path: Path
) -> None:
    gcp, api, keys = setup
    token_file = tmp_path / "subject.jwt"
    token_file.write_text(mint_subject_token(keys, ISSUER, GcpSettings("gcs", PROVIDER, SA), time.time()))
    creds = credentials(gcp, token_file)
    creds.refresh(Request())
    assert creds.token.startswith("ya29.")
    answer = http_request(api.base_url + "/v1/thing", headers={"Authorization": f"Bearer {creds.token}"})
    assert answer.status == 200 and answer.json()["service_account"] == SA
    sts = next(r for r in gcp.requests if r.path == "/v1/token")
    assert "scope=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fiam" in sts.body.decode()  # what google-auth asks
    iam = next(r for r in gcp.requests if r.path.endswith(":generateAccessToken"))
    assert json.loads(iam.body)["delegates"] is None


def test_google_auth_is_refused_what_google_refuses(
    setup: tuple[FakeGcp, FakeGoogleApi, SigningKeys], tmp_path: Path
) -> None:
    gcp, _api, keys = setup
    token_file = tmp_path / "subject.jwt"
    token_file.write_text(mint_subject_token(keys, ISSUER, GcpSettings("other", PROVIDER, SA), time.time()))
    with pytest.raises(exceptions.GoogleAuthError, match="attribute condition"):
        credentials(gcp, token_file).refresh(Request())
