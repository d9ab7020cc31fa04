"""The fake Google Cloud (tests/support/fake_gcp.py) checks what Google checks: each field shown refused when wrong.

Plain HTTP requests exactly as documented (form-encoded STS as Google's client libraries send it, JSON for IAM
Credentials): google-auth is not installed in this environment, see docs/gcp-credentials.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.cloud.gcp import GcpSettings, mint_subject_token
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from tests.support.backends import HttpResponse, http_request
from tests.support.clock import Clock
from tests.support.fake_gcp import (
    ACCESS_TOKEN_TYPE,
    CLOUD_PLATFORM,
    TOKEN_EXCHANGE_GRANT,
    FakeGcp,
    FakeGoogleApi,
    Provider,
    every_identity,
    principal,
)

ISSUER = "https://controlplane.example.test"
POOL = "projects/123456789/locations/global/workloadIdentityPools/gitlab-ci"
PROVIDER = POOL + "/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"
START = 1_800_000_000.0


class World:
    def __init__(self, clock: Clock, keys: SigningKeys, gcp: FakeGcp, api: FakeGoogleApi) -> None:
        self.clock, self.keys, self.gcp, self.api = clock, keys, gcp, api
        self.settings = GcpSettings(backend="gcs", workload_identity_provider=PROVIDER, service_account=SA)

    def subject(self, **overrides: Any) -> str:
        """A subject token from the control plane's real signing key, claims overridden (None deletes)."""
        base = jwt.decode(
            mint_subject_token(self.keys, ISSUER, self.settings, self.clock()), options={"verify_signature": False}
        )
        claims = {k: v for k, v in {**base, **overrides}.items() if v is not None}
        key = self.keys.signing_key()
        return jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid})

    def sts_form(self, **overrides: str | None) -> dict[str, str]:
        form: dict[str, str | None] = {
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "audience": "//iam.googleapis.com/" + PROVIDER,
            "scope": CLOUD_PLATFORM,
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "subject_token": self.subject(),
            **overrides,
        }
        return {k: v for k, v in form.items() if v is not None}

    def sts(self, form: dict[str, str]) -> HttpResponse:
        return http_request(
            self.gcp.sts_url,
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            body=urlencode(form).encode(),
        )

    def federated(self) -> str:
        response = self.sts(self.sts_form())
        assert response.status == 200, response.text
        return str(response.json()["access_token"])

    def iam(self, method: str, body: Any, token: str | None, email: str = SA, project: str = "-") -> HttpResponse:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return http_request(
            f"{self.gcp.iam_credentials_url}/projects/{project}/serviceAccounts/{email}:{method}",
            method="POST",
            headers=headers,
            body=json.dumps(body).encode(),
        )

    def api_call(self, token: str) -> HttpResponse:
        return http_request(self.api.base_url + "/storage/v1/b/bucket/o", headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = Clock(START)
    keys = SigningKeys(
        FileKeyStore(tmp_path / "keys.json"), rotate_every=86400, max_credential_ttl=3600, publish_lead=600, clock=clock
    )
    with FakeGcp(clock=clock) as gcp, FakeGoogleApi(gcp, id_token_audience="https://run.example.test") as api:
        gcp.add_provider(
            Provider(PROVIDER, ISSUER, keys.published_jwks, attribute_condition="assertion.sub.startsWith('backend:')")
        )
        gcp.add_service_account(SA, principal(POOL, "backend:gcs"))
        yield World(clock, keys, gcp, api)


def test_the_documented_flow_yields_a_token_the_api_accepts_until_it_expires(world: World) -> None:
    answer = world.sts(world.sts_form())
    assert answer.status == 200, answer.text
    body = answer.json()
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE and body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    federated = body["access_token"]
    assert world.api_call(federated).status == 401, "the federated token itself is no service account token"

    issued = world.iam("generateAccessToken", {"scope": [CLOUD_PLATFORM], "lifetime": "600s"}, federated)
    assert issued.status == 200, issued.text
    token, expire_time = issued.json()["accessToken"], issued.json()["expireTime"]
    assert expire_time.startswith("2027-01-15T08:10:00")  # START + 600 s, RFC 3339 UTC
    accepted = world.api_call(token)
    assert accepted.status == 200 and accepted.json()["service_account"] == SA

    world.clock.now += 600
    refused = world.api_call(token)
    assert refused.status == 401 and refused.json()["error"]["status"] == "UNAUTHENTICATED"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert world.api_call("ya29.made-up").status == 401


def test_sts_accepts_the_json_body_of_the_rest_reference(world: World) -> None:
    form = world.sts_form()
    body = {"grantType": form["grant_type"], "audience": form["audience"], "scope": form["scope"],
            "requestedTokenType": form["requested_token_type"], "subjectTokenType": form["subject_token_type"],
            "subjectToken": form["subject_token"]}  # fmt: skip
    answer = http_request(
        world.gcp.sts_url, method="POST", headers={"Content-Type": "application/json"}, body=json.dumps(body).encode()
    )
    assert answer.status == 200, answer.text


def test_sts_refuses_an_authorization_header_unknown_json_fields_and_bad_options(world: World) -> None:
    """The reference: send no Authorization header; the JSON body's fields are the seven it lists (by JSON or proto
    name); `options` is a serialized JSON object."""
    form = world.sts_form()
    with_header = http_request(
        world.gcp.sts_url,
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": "Bearer fed.x"},
        body=urlencode(form).encode(),
    )
    assert with_header.status == 400 and with_header.json()["error"] == "invalid_request"

    def as_json(body: dict[str, str]) -> HttpResponse:
        data = json.dumps(body).encode()
        return http_request(world.gcp.sts_url, method="POST", headers={"Content-Type": "application/json"}, body=data)

    assert as_json({**form, "options": "{}"}).status == 200  # proto names, and an empty Options object
    unknown = as_json({**form, "subjectTokn": "x"})
    assert unknown.status == 400 and "subjectTokn" in unknown.json()["error_description"]
    for options in ("not json", "[]"):
        refused = world.sts(world.sts_form(options=options))
        assert refused.status == 400 and "options" in refused.json()["error_description"], options


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("grant_type", "client_credentials", "unsupported_grant_type"),
        ("grant_type", None, "invalid_request"),
        ("audience", "//iam.googleapis.com/" + POOL + "/providers/other", "invalid_target"),
        ("audience", "https://iam.googleapis.com/" + PROVIDER, "invalid_target"),
        ("audience", None, "invalid_request"),
        ("requested_token_type", "urn:ietf:params:oauth:token-type:id_token", "invalid_request"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:saml2", "invalid_request"),
        ("subject_token_type", None, "invalid_request"),
        ("scope", None, "invalid_scope"),
        ("subject_token", None, "invalid_request"),
        ("subject_token", "not-a-jwt", "invalid_grant"),
    ],
)
def test_sts_refuses_each_wrong_field(world: World, field: str, value: str | None, error: str) -> None:
    answer = world.sts(world.sts_form(**{field: value}))
    assert answer.status == 400
    assert answer.json()["error"] == error and answer.json()["error_description"]


@pytest.mark.parametrize(
    ("claims", "error", "fragment"),
    [
        ({"iss": "https://elsewhere.example.test"}, "invalid_grant", "issuer"),
        ({"aud": "https://iam.googleapis.com/" + POOL + "/providers/other"}, "invalid_grant", "audience"),
        ({"aud": "iam.googleapis.com/" + PROVIDER}, "invalid_grant", "audience"),
        ({"aud": None}, "invalid_grant", "audience"),
        ({"exp": START - 1}, "invalid_grant", "expired"),
        ({"exp": None}, "invalid_grant", "exp"),
        ({"iat": START + 3600, "exp": START + 7200}, "invalid_grant", "future"),
        ({"iat": START, "exp": START + 86401}, "invalid_grant", "24 hours"),
        ({"sub": "x" * 128}, "invalid_grant", "127"),
        ({"sub": "job:42"}, "unauthorized_client", "attribute condition"),
    ],
)
def test_sts_verifies_the_subject_token(world: World, claims: dict[str, Any], error: str, fragment: str) -> None:
    answer = world.sts(world.sts_form(subject_token=world.subject(**claims)))
    assert answer.status == 400, answer.text
    assert answer.json()["error"] == error
    assert fragment in answer.json()["error_description"]


def test_sts_takes_the_default_audience_with_or_without_the_https_prefix(world: World) -> None:
    """Google's reference (WorkloadIdentityPoolProvider.Oidc.allowedAudiences): with none configured, `aud` must be
    the provider's full canonical resource name, with or without the https prefix."""
    for aud in ("https://iam.googleapis.com/" + PROVIDER, "//iam.googleapis.com/" + PROVIDER):
        assert world.sts(world.sts_form(subject_token=world.subject(aud=aud))).status == 200, aud


def test_sts_verifies_the_signature_against_the_trusted_jwks(world: World) -> None:
    claims = jwt.decode(world.subject(), options={"verify_signature": False})
    kid = world.keys.signing_key().kid
    forged = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": kid})
    unknown = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "x"})
    symmetric = jwt.encode(claims, "secret-long-enough-for-hmac-sha256!", algorithm="HS256", headers={"kid": kid})
    for token, fragment in ((forged, "signature"), (unknown, "kid"), (symmetric, "algorithm")):
        answer = world.sts(world.sts_form(subject_token=token))
        assert answer.status == 400 and answer.json()["error"] == "invalid_grant", answer.text
        assert fragment in answer.json()["error_description"]


def test_iam_credentials_needs_a_live_federated_token_with_cloud_platform(world: World) -> None:
    body = {"scope": [CLOUD_PLATFORM]}
    assert world.iam("generateAccessToken", body, None).json()["error"]["status"] == "UNAUTHENTICATED"
    assert world.iam("generateAccessToken", body, "fed.made-up").status == 401
    narrow = world.sts(world.sts_form(scope="https://www.googleapis.com/auth/devstorage.read_only"))
    refused = world.iam("generateAccessToken", body, narrow.json()["access_token"])
    assert refused.status == 403 and "scopes" in refused.json()["error"]["message"]
    federated = world.federated()
    world.clock.now += 3600
    assert world.iam("generateAccessToken", body, federated).status == 401


def test_iam_credentials_impersonates_only_bound_service_accounts(world: World) -> None:
    federated = world.federated()
    other = "deployer@acme-prod.iam.gserviceaccount.com"
    body = {"scope": [CLOUD_PLATFORM]}
    assert world.iam("generateAccessToken", body, federated, email=other).status == 403  # does not exist
    world.gcp.add_service_account(other, principal(POOL, "backend:other"))
    denied = world.iam("generateAccessToken", body, federated, email=other)
    assert denied.status == 403 and denied.json()["error"]["status"] == "PERMISSION_DENIED"
    world.gcp.service_accounts[other].members.add(every_identity(POOL))
    assert world.iam("generateAccessToken", body, federated, email=other).status == 200
    with_chain = {**body, "delegates": [f"projects/-/serviceAccounts/{SA}"]}
    assert world.iam("generateAccessToken", with_chain, federated).status == 403


@pytest.mark.parametrize(
    ("body", "project"),
    [
        ({"scope": []}, "-"),
        ({}, "-"),
        ({"scope": CLOUD_PLATFORM}, "-"),
        ({"scope": [CLOUD_PLATFORM], "lifetime": "3601s"}, "-"),
        ({"scope": [CLOUD_PLATFORM], "lifetime": "0s"}, "-"),
        ({"scope": [CLOUD_PLATFORM], "lifetime": "1h"}, "-"),
        ({"scope": [CLOUD_PLATFORM], "lifetime": 600}, "-"),
        ({"scope": [CLOUD_PLATFORM], "delegates": "x"}, "-"),
        ({"scope": [CLOUD_PLATFORM], "delegates": [SA]}, "-"),  # not projects/-/serviceAccounts/ID
        ({"scope": [CLOUD_PLATFORM], "delegates": [f"projects/acme-prod/serviceAccounts/{SA}"]}, "-"),
        ({"scope": [CLOUD_PLATFORM], "scopes": [CLOUD_PLATFORM]}, "-"),  # a field the reference does not name
        ({"scope": [CLOUD_PLATFORM]}, "acme-prod"),
    ],
)
def test_generate_access_token_refuses_wrong_fields(world: World, body: dict[str, Any], project: str) -> None:
    answer = world.iam("generateAccessToken", body, world.federated(), project=project)
    assert answer.status == 400, answer.text
    assert answer.json()["error"]["status"] == "INVALID_ARGUMENT" and answer.json()["error"]["code"] == 400


def test_generate_access_token_honours_lifetime_and_scope(world: World) -> None:
    federated = world.federated()
    read_only = "https://www.googleapis.com/auth/devstorage.read_only"
    answer = world.iam("generateAccessToken", {"scope": [read_only], "lifetime": "3600s"}, federated)
    assert answer.json()["expireTime"].startswith("2027-01-15T09:00:00")
    assert world.api_call(answer.json()["accessToken"]).status == 401, "the API requires cloud-platform"
    no_json = http_request(
        f"{world.gcp.iam_credentials_url}/projects/-/serviceAccounts/{SA}:generateAccessToken",
        method="POST",
        headers={"Authorization": f"Bearer {federated}", "Content-Type": "text/plain"},
        body=b"scope=x",
    )
    assert no_json.status == 400


def test_generate_id_token_signs_for_the_audience(world: World) -> None:
    federated = world.federated()
    assert world.iam("generateIdToken", {}, federated).status == 400
    assert world.iam("generateIdToken", {"audience": "x", "includeEmail": "yes"}, federated).status == 400
    assert world.iam("generateIdToken", {"audience": "x", "lifetime": "60s"}, federated).status == 400  # not its field
    answer = world.iam("generateIdToken", {"audience": "https://run.example.test", "includeEmail": True}, federated)
    assert answer.status == 200, answer.text
    token = answer.json()["token"]
    key = jwt.PyJWKSet.from_json(world.gcp.id_token_jwks()).keys[0]
    claims = jwt.decode(
        token, key.key, algorithms=["RS256"], audience="https://run.example.test", options={"verify_iat": False}
    )
    assert claims["email"] == SA and claims["iss"] == "https://accounts.google.com"
    assert claims["exp"] - claims["iat"] == 3600
    assert world.api_call(token).status == 200
    elsewhere = world.iam("generateIdToken", {"audience": "https://other.example.test"}, federated).json()["token"]
    assert world.api_call(elsewhere).status == 401
    world.clock.now += 3600
    assert world.api_call(token).status == 401


def test_an_outage_answers_503(world: World) -> None:
    world.gcp.outage.add("sts")
    assert world.sts(world.sts_form()).status == 503
    world.gcp.outage.clear()
    federated = world.federated()
    world.gcp.outage.add("iam")
    assert world.iam("generateAccessToken", {"scope": [CLOUD_PLATFORM]}, federated).status == 503


def test_an_unsupported_attribute_condition_is_refused_when_configured() -> None:
    with pytest.raises(ValueError, match="CEL subset"):
        Provider(PROVIDER, ISSUER, lambda: "{}", attribute_condition="assertion.sub in ['a']")
