"""The fake AWS itself (tests/support/fake_aws.py): moto over HTTP must refuse what AWS refuses, or every test
built on it passes for the wrong reason. Each refusal below is the one AWS documents for the case."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.credentials.keys import FileKeyStore, SigningKeys
from tests.support.fake_aws import BUCKET, OBJECT_BODY, OBJECT_KEY, AccessKey, FakeAws, WebIdentityTrust

ISSUER = "https://controlplane.example.test/oidc"
AUDIENCE = "sts.amazonaws.com"
SUBJECT = "controlplane:team-a"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    store = FileKeyStore(Path(tmp_path_factory.mktemp("keys")) / "signing-keys.json")
    return SigningKeys(store, rotate_every=86400, max_credential_ttl=3600, publish_lead=600)


@pytest.fixture(scope="module")
def aws(keys: SigningKeys) -> Iterator[FakeAws]:
    fake = FakeAws().start(WebIdentityTrust(ISSUER, AUDIENCE, SUBJECT, keys.published_jwks))
    try:
        yield fake
    finally:
        fake.stop()


def _code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def _token(keys: SigningKeys, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    claims.update(overrides)
    active = keys.signing_key()
    return jwt.encode(claims, active.private_key, algorithm="ES256", headers={"kid": active.kid})


def _tamper(client: Any, change: Any) -> None:
    """Change the request after botocore signed it, as a man in the middle would."""

    def before_send(request: Any, **_: Any) -> None:
        change(request)

    client.meta.events.register("before-send.*.*", before_send)


# -- signatures


def test_a_correctly_signed_request_is_accepted(aws: FakeAws) -> None:
    assert aws.client("sts").get_caller_identity()["Arn"].endswith(":user/controlplane")


def test_a_wrong_secret_is_refused(aws: FakeAws) -> None:
    client = aws.client("sts", AccessKey(aws.user_key.access_key_id, "not-the-secret"))
    with pytest.raises(ClientError) as refused:
        client.get_caller_identity()
    assert _code(refused) == "SignatureDoesNotMatch"


def test_an_unknown_access_key_is_refused(aws: FakeAws) -> None:
    with pytest.raises(ClientError) as refused:
        aws.client("sts", AccessKey("AKIAUNKNOWN000000000", "x")).get_caller_identity()
    assert _code(refused) == "InvalidClientTokenId"


def test_a_signed_header_altered_after_signing_is_refused(aws: FakeAws) -> None:
    client = aws.client("sts")

    def change(request: Any) -> None:
        request.headers["X-Amz-Date"] = "20200101T000000Z"

    _tamper(client, change)
    with pytest.raises(ClientError) as refused:
        client.get_caller_identity()
    assert _code(refused) == "SignatureDoesNotMatch"


def test_a_payload_altered_after_signing_is_refused(aws: FakeAws) -> None:
    client = aws.client("sts")

    def change(request: Any) -> None:
        body = request.body if isinstance(request.body, str) else request.body.decode()
        assert "DurationSeconds=900" in body
        request.body = body.replace("DurationSeconds=900", "DurationSeconds=901")  # the same length

    _tamper(client, change)
    with pytest.raises(ClientError) as refused:
        client.assume_role(RoleArn=aws.assume_role_arn, RoleSessionName="tampered", DurationSeconds=900)
    assert _code(refused) == "SignatureDoesNotMatch"


def test_an_s3_body_altered_after_signing_is_refused(aws: FakeAws) -> None:
    """moto alone passes this one (it trusts the signed x-amz-content-sha256 header); the fake's layer refuses it
    as S3 does. Without the layer the answer would be AccessDenied: the signature matched."""
    client = aws.client("s3")
    tampered = []

    def change(request: Any) -> None:
        if request.method == "PUT":
            request.body = b"Y" * len(b"payload")
            tampered.append(True)

    _tamper(client, change)
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=BUCKET, Key="tampered", Body=b"payload")
    assert tampered
    assert _code(refused) == "XAmzContentSHA256Mismatch"


def test_s3_checks_the_signature_too(aws: FakeAws) -> None:
    with pytest.raises(ClientError) as refused:
        aws.client("s3", AccessKey(aws.user_key.access_key_id, "not-the-secret")).list_objects_v2(Bucket=BUCKET)
    assert _code(refused) == "SignatureDoesNotMatch"


def test_a_signed_request_outside_the_policy_is_denied(aws: FakeAws) -> None:
    """The user may only assume one role: reading S3 directly is AccessDenied (permissions are enforced)."""
    with pytest.raises(ClientError) as refused:
        aws.client("s3").get_object(Bucket=BUCKET, Key=OBJECT_KEY)
    assert _code(refused) == "AccessDenied"


# -- AssumeRole


def _assume(aws: FakeAws) -> dict[str, Any]:
    answer = aws.client("sts").assume_role(RoleArn=aws.assume_role_arn, RoleSessionName="ci-test", DurationSeconds=900)
    credentials: dict[str, Any] = answer["Credentials"]
    return credentials


def _s3(aws: FakeAws, credentials: dict[str, Any], secret: str | None = None) -> Any:
    key = AccessKey(credentials["AccessKeyId"], secret or credentials["SecretAccessKey"])
    return aws.client("s3", key, credentials["SessionToken"])


def test_assume_role_answers_temporary_credentials_that_s3_accepts(aws: FakeAws) -> None:
    credentials = _assume(aws)
    assert credentials["AccessKeyId"].startswith("ASIA")
    remaining = credentials["Expiration"].timestamp() - time.time()
    assert 850 < remaining <= 900
    assert _s3(aws, credentials).get_object(Bucket=BUCKET, Key=OBJECT_KEY)["Body"].read() == OBJECT_BODY


def test_temporary_credentials_are_checked_too(aws: FakeAws) -> None:
    credentials = _assume(aws)
    with pytest.raises(ClientError) as wrong_secret:
        _s3(aws, credentials, secret="not-the-secret").get_object(Bucket=BUCKET, Key=OBJECT_KEY)
    assert _code(wrong_secret) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as outside_policy:
        _s3(aws, credentials).put_object(Bucket=BUCKET, Key="new", Body=b"x")
    assert _code(outside_policy) == "AccessDenied"


def test_expired_temporary_credentials_are_refused(aws: FakeAws) -> None:
    """moto itself accepts them forever; the fake's layer refuses them as STS and S3 do."""
    credentials = _assume(aws)
    s3 = _s3(aws, credentials)
    s3.get_object(Bucket=BUCKET, Key=OBJECT_KEY)
    aws.expire(credentials["AccessKeyId"])
    with pytest.raises(ClientError) as refused:
        s3.get_object(Bucket=BUCKET, Key=OBJECT_KEY)
    assert _code(refused) == "ExpiredToken"


def test_a_role_that_does_not_trust_the_caller_cannot_be_assumed(aws: FakeAws) -> None:
    with pytest.raises(ClientError) as refused:
        aws.client("sts").assume_role(RoleArn=aws.web_role_arn, RoleSessionName="ci-test")
    assert _code(refused) == "AccessDenied"


# -- AssumeRoleWithWebIdentity


def _web(aws: FakeAws, token: str, role_arn: str | None = None) -> dict[str, Any]:
    answer = aws.client("sts", AccessKey("unused", "unused")).assume_role_with_web_identity(
        RoleArn=role_arn or aws.web_role_arn, RoleSessionName="ci-test", WebIdentityToken=token, DurationSeconds=900
    )
    credentials: dict[str, Any] = answer["Credentials"]
    return credentials


def test_web_identity_answers_credentials_that_s3_accepts(aws: FakeAws, keys: SigningKeys) -> None:
    credentials = _web(aws, _token(keys))
    assert _s3(aws, credentials).get_object(Bucket=BUCKET, Key=OBJECT_KEY)["Body"].read() == OBJECT_BODY
    assert "Authorization" not in str(aws.web_identity_calls[-1])  # unsigned, as botocore sends it to AWS


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"aud": "another-audience"}, "InvalidIdentityToken"),
        ({"iss": "https://another.example.test"}, "InvalidIdentityToken"),
        ({"sub": "controlplane:team-b"}, "AccessDenied"),
        ({"exp": int(time.time()) - 10, "iat": int(time.time()) - 400}, "ExpiredTokenException"),
    ],
)
def test_web_identity_refuses_a_token_the_role_does_not_trust(
    aws: FakeAws, keys: SigningKeys, claims: dict[str, Any], code: str
) -> None:
    with pytest.raises(ClientError) as refused:
        _web(aws, _token(keys, **claims))
    assert _code(refused) == code


def test_web_identity_refuses_a_token_signed_by_another_key(aws: FakeAws, keys: SigningKeys) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "iat": now, "exp": now + 300}
    forged = jwt.encode(
        claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": keys.signing_key().kid}
    )
    with pytest.raises(ClientError) as refused:
        _web(aws, forged)
    assert _code(refused) == "InvalidIdentityToken"


def test_web_identity_refuses_a_role_that_does_not_trust_the_issuer(aws: FakeAws, keys: SigningKeys) -> None:
    with pytest.raises(ClientError) as refused:
        _web(aws, _token(keys), role_arn=aws.assume_role_arn)
    assert _code(refused) == "AccessDenied"


def test_web_identity_sessions_can_be_made_shorter_than_asked(aws: FakeAws, keys: SigningKeys) -> None:
    """The knob test_e2e_aws uses to make serve's refresher refresh within seconds."""
    aws.web_session_seconds = 310
    try:
        credentials = _web(aws, _token(keys))
    finally:
        aws.web_session_seconds = None
    left = credentials["Expiration"].timestamp() - time.time()
    assert 300 < left <= 311
    assert _s3(aws, credentials).get_object(Bucket=BUCKET, Key=OBJECT_KEY)["Body"].read() == OBJECT_BODY
    assert _web(aws, _token(keys))["Expiration"].timestamp() - time.time() > 800  # as asked again (900)


def test_an_unauthenticated_block_seeds_and_authentication_is_back_after_it(aws: FakeAws) -> None:
    with aws.unauthenticated():
        aws.seed_client("s3").create_bucket(
            Bucket="seeded", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
    with pytest.raises(ClientError) as refused:
        aws.client("s3", AccessKey("AKIANOBODY", "nothing")).list_objects_v2(Bucket="seeded")
    assert _code(refused) == "InvalidAccessKeyId"


def test_an_added_role_is_assumable_as_told_its_policy_holds_and_each_signed_key_names_its_role(aws: FakeAws) -> None:
    """`add_role`, `role_of_key` (with `signed_by`): what tests/test_e2e_aws_binding_roles.py reads to say which role
    a request reached AWS as."""
    suffix = uuid.uuid4().hex[:8]
    writes = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": "*"}]}
    writer = aws.add_role(f"writer-{suffix}", writes)
    closed = aws.add_role(f"closed-{suffix}", writes, assumable=False)
    sts = aws.client("sts")
    with pytest.raises(ClientError) as refused:
        sts.assume_role(RoleArn=closed, RoleSessionName="test")
    assert _code(refused) == "AccessDenied"
    credentials = sts.assume_role(RoleArn=writer, RoleSessionName="test")["Credentials"]
    assert aws.role_of_key(credentials["AccessKeyId"]) == writer and aws.role_of_key("AKIANOTISSUED") is None
    s3 = _s3(aws, credentials)
    s3.put_object(Bucket=BUCKET, Key=f"w-{suffix}", Body=b"x")
    assert aws.signed_by[-1] == credentials["AccessKeyId"]
    with pytest.raises(ClientError) as denied:  # its policy grants no read
        s3.get_object(Bucket=BUCKET, Key=OBJECT_KEY)
    assert _code(denied) == "AccessDenied"


def test_an_sts_outage_answers_503_to_sts_only_until_it_ends(aws: FakeAws, keys: SigningKeys) -> None:
    """The knob test_e2e_aws uses for an STS outage: every STS action (signed or not) is ServiceUnavailable, S3
    still answers; the outage ends when the test says."""
    credentials = _assume(aws)
    aws.sts_down = True
    try:
        with pytest.raises(ClientError) as signed:
            _assume(aws)
        with pytest.raises(ClientError) as unsigned:
            _web(aws, _token(keys))
        body = _s3(aws, credentials).get_object(Bucket=BUCKET, Key=OBJECT_KEY)["Body"].read()
    finally:
        aws.sts_down = False
    assert _code(signed) == _code(unsigned) == "ServiceUnavailable"
    assert signed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert body == OBJECT_BODY
    assert aws.sts_refused_outage >= 2  # boto3 retries a 503 itself: each attempt counted
    assert _assume(aws)["AccessKeyId"].startswith("ASIA")  # back


def test_who_signed_each_request_and_any_unsigned_one_are_recorded(aws: FakeAws, keys: SigningKeys) -> None:
    credentials = _assume(aws)
    signed, unsigned = len(aws.signed_by), aws.unsigned
    _s3(aws, credentials).get_object(Bucket=BUCKET, Key=OBJECT_KEY)
    _assume(aws)  # a signed STS call (the control plane's AssumeRole, at any moment): not a request's signer
    assert aws.signed_by[signed:] == [credentials["AccessKeyId"]]
    _web(aws, _token(keys))  # AssumeRoleWithWebIdentity: unsigned on AWS too, not counted
    assert aws.unsigned == unsigned
    response = requests.get(f"{aws.endpoint}/{BUCKET}/{OBJECT_KEY}", timeout=10)
    assert response.status_code == 403  # moto refuses it (authentication is on)
    assert aws.unsigned == unsigned + 1
