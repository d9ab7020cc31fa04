"""Issue 16 attacked from outside: a policy author, a hostile STS or Google answer (tests/test_e2e_cloud_attacks.py
has those needing a real Envoy). Each test failed before its fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.cloud.aws import StsError
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import AwsSigning
from controlplane.runtime.aws_signing import source_factory
from tests.support.fake_aws import REGION, FakeAws, WebIdentityTrust

ISSUER = "https://controlplane.example.test/oidc"
TEAM_A_ROLE_SUBJECT = "backend:team-a-s3"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    store = FileKeyStore(Path(tmp_path_factory.mktemp("keys")) / "signing-keys.json")
    return SigningKeys(store, rotate_every=86400, max_credential_ttl=3600, publish_lead=600)


@pytest.fixture(scope="module")
def aws(keys: SigningKeys) -> Iterator[FakeAws]:
    """Team A's role trusts the control plane's issuer for team A's backend only, as docs/aws-credentials.md says."""
    fake = FakeAws().start(WebIdentityTrust(ISSUER, "sts.amazonaws.com", TEAM_A_ROLE_SUBJECT, keys.published_jwks))
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(autouse=True)
def _sts_at_the_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, aws: FakeAws) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", aws.endpoint)


def test_a_policy_author_cannot_borrow_another_teams_web_identity_role(aws: FakeAws, keys: SigningKeys) -> None:
    """Before: every web-identity token said `sub: controlplane`, so a role trusting the issuer trusted every
    backend of every policy: team B names team A's role ARN on its own backend and its jobs' requests are signed
    as team A. Now the subject is the backend, which team A's role trusts alone."""
    how = AwsSigning(service="s3", region=REGION, role_arn=aws.web_role_arn)
    factory = source_factory(ISSUER, keys)
    with pytest.raises(StsError, match="AccessDenied"):
        factory("team-b-s3", how).fetch()
    assert factory("team-a-s3", how).fetch().role_arn == aws.web_role_arn
    tokens = [call["WebIdentityToken"] for call in aws.web_identity_calls[-2:]]
    import jwt

    assert [jwt.decode(t, options={"verify_signature": False})["sub"] for t in tokens] == [
        "backend:team-b-s3",
        TEAM_A_ROLE_SUBJECT,
    ]


BASE = (
    "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n---\n"
    "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [team-a-s3, team-b-s3]\n"
)


def _backend(name: str, arn: str) -> str:
    return (
        f"kind: Backend\nname: {name}\nhosts: [{name}.local]\nendpoints: [{{address: 127.0.0.1, port: 1}}]\n"
        f"aws: {{service: s3, region: eu-west-1, role_arn: '{arn}'}}\n"
    )


def test_two_backends_on_one_role_are_refused_as_the_second_would_ride_on_the_first() -> None:
    """Before: accepted, and one credential (obtained for the first backend by name) signed both backends."""
    arn = "arn:aws:iam::123456789012:role/team-a-deploy"
    files = {
        "a.yaml": BASE + "---\n" + _backend("team-a-s3", arn),
        "b.yaml": _backend("team-b-s3", arn),
    }
    with pytest.raises(PolicyInvalid) as refused:
        parse_policy(files)
    text = str(refused.value)
    assert "b.yaml" in text and "already signs for backend team-a-s3" in text
    files["b.yaml"] = _backend("team-b-s3", "arn:aws:iam::123456789012:role/team-b-deploy")
    assert len(parse_policy(files).backends) == 2
