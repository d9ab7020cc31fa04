"""AWS credentials for a backend's role (controlplane/cloud/aws.py): the STS adapter and the refresher (the shared
schedule of cloud/refresh.py on an STS source) with a scripted source, then against the fake AWS (moto over HTTP,
signatures checked)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from controlplane.cloud.aws import (
    AssumeRoleSource,
    AwsCredential,
    Refresher,
    Sts,
    StsError,
    WebIdentity,
    WebIdentitySource,
    web_identity_claims,
)
from controlplane.cloud.refresh import DEFAULT_POLICY, on_success
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from controlplane.telemetry.metrics import REGISTRY
from tests.support.clock import Clock
from tests.support.fake_aws import BUCKET, OBJECT_BODY, OBJECT_KEY, REGION, AccessKey, FakeAws, WebIdentityTrust
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.scripted_sts import Scripted, cred

# The schedule itself (when to refresh, backoff, fail closed) is shared with Google Cloud: tests/test_cloud_refresh.py.


# -- the web identity token


def test_web_identity_claims() -> None:
    identity = WebIdentity("https://cp.example.test", audience="sts.amazonaws.com", subject="cp:team-a")
    assert web_identity_claims(identity, 1000.7, "j1") == {
        "iss": "https://cp.example.test",
        "aud": "sts.amazonaws.com",
        "sub": "cp:team-a",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1300,
        "jti": "j1",
    }


# -- the refresher, with a scripted source


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _refreshes(backend: str, result: str) -> float:
    return _count("controlplane_cloud_credential_refreshes_total", provider="aws", backend=backend, result=result)


def _expired(backend: str) -> float:
    return _count("controlplane_cloud_credentials_expired_total", provider="aws", backend=backend)


def test_the_refresher_refreshes_keeps_the_last_credential_then_fails_closed() -> None:
    clock = Clock(1000.0)
    source = Scripted(clock)
    seen: list[AwsCredential | None] = []
    refresher = Refresher("scripted", source, clock=clock, sample=lambda: 0.0, on_change=seen.append)
    base = {r: _refreshes("scripted", r) for r in ("ok", "refused", "unavailable")}
    expired_before = _expired("scripted")

    assert refresher.current() is None
    assert refresher.poll() == 2770  # fetched; next at half its usable life (60 s of skew)
    first = refresher.current()
    assert first is not None and seen == [first]

    clock.now = 2770
    source.script = [StsError("Throttling", "r", refused=False)] * 200
    wake = refresher.poll()
    assert refresher.current() is first and wake == pytest.approx(2770.5)  # kept; retried soon
    while clock() < 4540:  # every failure until it is past use
        clock.now = min(wake, 4540)
        wake = refresher.poll()
    assert refresher.current() is None and seen[-1] is None
    assert _expired("scripted") == expired_before + 1
    refresher.poll()
    assert _expired("scripted") == expired_before + 1  # once

    source.script = []
    clock.now = wake
    refresher.poll()
    recovered = refresher.current()
    assert recovered is not None and recovered != first and seen[-1] == recovered
    assert _refreshes("scripted", "ok") == base["ok"] + 2
    failures = source.calls - 2
    unavailable = _refreshes("scripted", "unavailable")
    assert unavailable == base["unavailable"] + failures


def test_a_refusal_is_counted_apart_and_an_unexpected_error_does_not_stop_the_refresher() -> None:
    clock = Clock(0.0)
    source = Scripted(clock)
    refresher = Refresher("odd", source, clock=clock, sample=lambda: 0.0)
    refused = _refreshes("odd", "refused")
    source.script = [StsError("AccessDenied", "r", refused=True)]
    refresher.poll()
    assert _refreshes("odd", "refused") == refused + 1

    class Broken:
        def fetch(self) -> AwsCredential:
            raise RuntimeError("bug")

    broken = Refresher("broken", Broken(), clock=clock, sample=lambda: 0.0)
    broken.poll()
    assert broken.state.failures == 1


def test_a_failing_listener_does_not_lose_the_credential(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(0.0)

    def listener(_: AwsCredential | None) -> None:
        raise RuntimeError("push failed")

    refresher = Refresher("listener", Scripted(clock), clock=clock, sample=lambda: 0.0, on_change=listener)
    refresher.poll()
    assert refresher.current() is not None and "listener of backend listener" in caplog.text


# -- secrets stay secret


def test_no_secret_in_a_repr_or_an_error() -> None:
    credential = cred(key="ASIAREPR")
    text = repr(credential) + repr(on_success(credential, DEFAULT_POLICY, 0.0))
    assert "secret-ASIAREPR" not in text and "session-ASIAREPR" not in text and "ASIAREPR" in text
    assert str(StsError("InvalidIdentityToken", "arn:aws:iam::1:role/r", refused=True)) == (
        "STS refused or failed for arn:aws:iam::1:role/r: InvalidIdentityToken"
    )


# -- against the fake AWS

ISSUER = "https://controlplane.example.test/oidc"
SUBJECT = "controlplane:team-a"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    store = FileKeyStore(Path(tmp_path_factory.mktemp("keys")) / "signing-keys.json")
    return SigningKeys(store, rotate_every=86400, max_credential_ttl=3600, publish_lead=600)


@pytest.fixture(scope="module")
def aws(keys: SigningKeys) -> Iterator[FakeAws]:
    fake = FakeAws().start(WebIdentityTrust(ISSUER, "sts.amazonaws.com", SUBJECT, keys.published_jwks))
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(autouse=True)
def _no_ambient_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test hands in: no AWS variable or file of the machine running the tests."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _s3_reads_with(aws: FakeAws, credential: AwsCredential) -> bytes:
    s3 = aws.client("s3", AccessKey(credential.access_key_id, credential.secret_access_key), credential.session_token)
    body: bytes = s3.get_object(Bucket=BUCKET, Key=OBJECT_KEY)["Body"].read()
    return body


def _web_source(aws: FakeAws, keys: SigningKeys, subject: str = SUBJECT) -> WebIdentitySource:
    sts = Sts(region=REGION, endpoint_url=aws.endpoint)
    return WebIdentitySource(sts, keys, WebIdentity(ISSUER, subject=subject), aws.web_role_arn, duration_seconds=900)


def test_web_identity_credentials_from_sts_are_accepted_by_s3(aws: FakeAws, keys: SigningKeys) -> None:
    credential = _web_source(aws, keys).fetch()
    assert credential.role_arn == aws.web_role_arn
    assert 850 < credential.expiration - credential.issued_at <= 900
    assert _s3_reads_with(aws, credential) == OBJECT_BODY
    sent = aws.web_identity_calls[-1]
    header = jwt.get_unverified_header(sent["WebIdentityToken"])
    assert header == {"alg": "ES256", "kid": keys.signing_key().kid, "typ": "JWT"}
    assert sent["RoleSessionName"] == "controlplane" and sent["DurationSeconds"] == "900"


def test_a_subject_the_role_does_not_trust_is_refused(aws: FakeAws, keys: SigningKeys) -> None:
    with pytest.raises(StsError) as refused:
        _web_source(aws, keys, subject="controlplane:team-b").fetch()
    assert refused.value.code == "AccessDenied" and refused.value.refused


def _credentials_file(path: Path, key: AccessKey) -> str:
    path.write_text(
        f"[default]\naws_access_key_id = {key.access_key_id}\naws_secret_access_key = {key.secret_access_key}\n"
    )
    path.chmod(0o600)
    return str(path)


def test_assume_role_from_a_credentials_file(aws: FakeAws, tmp_path: Path) -> None:
    sts = Sts(
        region=REGION, endpoint_url=aws.endpoint, credentials_file=_credentials_file(tmp_path / "c", aws.user_key)
    )
    credential = AssumeRoleSource(sts, aws.assume_role_arn, duration_seconds=900).fetch()
    assert _s3_reads_with(aws, credential) == OBJECT_BODY


def test_assume_role_from_the_environment(aws: FakeAws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws.user_key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws.user_key.secret_access_key)
    credential = AssumeRoleSource(Sts(region=REGION, endpoint_url=aws.endpoint), aws.assume_role_arn).fetch()
    assert _s3_reads_with(aws, credential) == OBJECT_BODY


@pytest.mark.parametrize(("secret", "code"), [("not-the-secret", "SignatureDoesNotMatch"), (None, "NoCredentials")])
def test_assume_role_with_wrong_or_no_credentials_is_refused(
    aws: FakeAws, tmp_path: Path, secret: str | None, code: str
) -> None:
    path = None
    if secret is not None:
        path = _credentials_file(tmp_path / "c", AccessKey(aws.user_key.access_key_id, secret))
    sts = Sts(region=REGION, endpoint_url=aws.endpoint, credentials_file=path)
    with pytest.raises(StsError) as refused:
        AssumeRoleSource(sts, aws.assume_role_arn).fetch()
    assert (refused.value.code, refused.value.refused) == (code, True)


def test_an_unreachable_sts_is_retryable() -> None:
    sts = Sts(region=REGION, endpoint_url=f"http://{LOOPBACK}:{free_port()}", timeout_seconds=2)
    with pytest.raises(StsError) as failed:
        sts.assume_role_with_web_identity("arn:aws:iam::1:role/r", "token", "controlplane", 900)
    assert failed.value.code == "EndpointConnectionError" and not failed.value.refused


def test_the_refresher_replaces_a_credential_before_it_expires(aws: FakeAws, keys: SigningKeys) -> None:
    """At its refresh time a new credential arrives while the old one still works: no gap for requests."""
    clock = Clock(time.time())
    refresher = Refresher("s3", _web_source(aws, keys), clock=clock, sample=lambda: 0.0)
    wake = refresher.poll()
    first = refresher.current()
    assert first is not None and wake == pytest.approx(first.issued_at + 420, abs=1)  # half of 900 - 60 s
    clock.now = wake
    refresher.poll()
    second = refresher.current()
    assert second is not None and second.access_key_id != first.access_key_id
    assert _s3_reads_with(aws, first) == _s3_reads_with(aws, second) == OBJECT_BODY


def test_the_refresher_runs_on_its_thread(aws: FakeAws, keys: SigningKeys) -> None:
    got: list[AwsCredential | None] = []
    refresher = Refresher("thread", _web_source(aws, keys), on_change=got.append)
    refresher.start()
    try:
        credential = poll_until(refresher.current, timeout=20, message="no credential from the thread")
        assert got == [credential]
    finally:
        refresher.stop()


def test_nothing_secret_is_logged_even_at_debug(
    aws: FakeAws, keys: SigningKeys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    web = Refresher("web", _web_source(aws, keys))
    web.poll()
    sts = Sts(
        region=REGION, endpoint_url=aws.endpoint, credentials_file=_credentials_file(tmp_path / "c", aws.user_key)
    )
    assumed = Refresher("assumed", AssumeRoleSource(sts, aws.assume_role_arn))
    assumed.poll()
    denied = Refresher("denied", _web_source(aws, keys, subject="someone-else"))
    denied.poll()
    secrets: list[str] = [aws.user_key.secret_access_key, aws.web_identity_calls[-1]["WebIdentityToken"]]
    for refresher in (web, assumed):
        credential = refresher.current()
        assert credential is not None
        secrets += [credential.secret_access_key, credential.session_token]
    assert "refreshed" in caplog.text and "AccessDenied" in caplog.text  # the log says what happened
    leaked = [s[:8] for s in secrets if s in caplog.text]
    assert not leaked
