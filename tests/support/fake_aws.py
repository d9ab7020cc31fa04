"""A real AWS API emulator over HTTP for tests: moto in server mode, with its IAM authentication turned on.

Why moto in server mode: the control plane (and later Envoy's aws_request_signing filter) must reach AWS over
HTTP and sign with SigV4; an in-process mock would never see a signature. moto recomputes the SigV4 signature of
every request from the access key it stored and refuses a mismatch once `INITIAL_NO_AUTH_ACTION_COUNT` requests
have passed, so a wrongly signed request fails here as it would on AWS (tests/test_fake_aws.py shows it).

What moto does NOT check, and what this fake adds in a small WSGI layer in front of it (docs/aws-credentials.md):
- `AssumeRoleWithWebIdentity` is unsigned on AWS (the web identity token is the proof). moto, with authentication
  on, wants an Authorization header on it and never verifies the token. The layer answers it itself: the token's
  signature against the issuer's JWKS (handed to the fake: nothing here fetches discovery), `iss` against the
  role's trusted OIDC provider, `aud`/`sub` against the trust policy's `StringEquals` conditions, `exp`; then
  moto's STS backend mints the credentials, so S3 accepts them with moto's own signature check.
- The body of a request against its `x-amz-content-sha256` header: moto's signature check takes the header's
  hash on trust, so an S3 body swapped after signing passed. The layer refuses it (`XAmzContentSHA256Mismatch`).
- Temporary credentials past their expiration: moto accepts them forever. The layer refuses a request signed
  with an expired session (`ExpiredToken`, HTTP 400 as STS and S3 answer), so refresh tests can fail.
- An STS outage on demand (`sts_down`: every STS action answered 503 `ServiceUnavailable`), and who signed each
  request (`signed_by`, `unsigned`), so a test can show that nothing unsigned ever reached AWS.

moto's state is process-global (its backends and its authentication counter), so one FakeAws runs per process
at a time; `start` resets moto and `stop` turns authentication back off.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import boto3
import jwt
import requests
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import DomainDispatcherApplication, create_backend_app
from moto.sts.models import sts_backends
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from .ports import LOOPBACK, free_port

ACCOUNT = DEFAULT_ACCOUNT_ID
REGION = "eu-west-1"
BUCKET = "ci-artifacts"
OBJECT_KEY = "hello.txt"
OBJECT_BODY = b"hello from the fake S3\n"
USER = "controlplane"
ASSUME_ROLE_NAME = "ci-deploy"  # trusts the IAM user (AssumeRole)
WEB_ROLE_NAME = "ci-read"  # trusts the control plane's OIDC issuer (AssumeRoleWithWebIdentity)
S3_READ_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class AccessKey:
    access_key_id: str
    secret_access_key: str = field(repr=False)


@dataclass
class WebIdentityTrust:
    """What the web-identity role trusts: an OIDC issuer (its URL, the JWKS it publishes) and the token's
    audience and subject (the trust policy's conditions)."""

    issuer_url: str
    audience: str
    subject: str
    jwks: Callable[[], str]  # the issuer's JWKS document, read at every AssumeRoleWithWebIdentity


_STS_ACTIONS = frozenset(
    {"AssumeRole", "AssumeRoleWithWebIdentity", "AssumeRoleWithSAML", "GetCallerIdentity", "GetSessionToken"}
)


def _sts_error(code: str, message: str, status: str = "400 Bad Request") -> tuple[str, bytes]:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
        f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        "<RequestId>fake-aws</RequestId></ErrorResponse>"
    )
    return status, body.encode()


class _Layer:
    """The WSGI layer in front of moto: web identity verified, expired sessions refused, the rest passed on."""

    def __init__(self, app: WSGIApp, fake: FakeAws) -> None:
        self._app = app
        self._fake = fake

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self._fake.sts_down and self._sts_action(environ) is not None:
            self._fake.sts_refused_outage += 1
            status, body = _sts_error("ServiceUnavailable", "Service is unavailable", "503 Service Unavailable")
            return self._answer(start_response, status, body)
        if not environ.get("PATH_INFO", "").startswith("/moto-api"):
            self._count_signing(environ)
        token = environ.get("HTTP_X_AMZ_SECURITY_TOKEN")
        if token is not None and self._expired(token):
            self._fake.refused_expired += 1
            status, body = _sts_error("ExpiredToken", "The security token included in the request is expired")
            return self._answer(start_response, status, body)
        declared = environ.get("HTTP_X_AMZ_CONTENT_SHA256", "")
        if re.fullmatch(r"[0-9a-f]{64}", declared):
            raw = self._body(environ)
            if hashlib.sha256(raw).hexdigest() != declared:
                self._fake.refused_payload += 1
                body = (
                    b"<Error><Code>XAmzContentSHA256Mismatch</Code><Message>The provided 'x-amz-content-sha256' "
                    b"header does not match what was computed.</Message></Error>"
                )
                return self._answer(start_response, "400 Bad Request", body)
        if environ.get("REQUEST_METHOD") == "POST" and "HTTP_AUTHORIZATION" not in environ:
            raw = self._body(environ)
            form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode("utf-8", "replace")).items()}
            if form.get("Action") == "AssumeRoleWithWebIdentity":
                status, body = self._fake.assume_role_with_web_identity(form)
                return self._answer(start_response, status, body)
        return self._app(environ, start_response)

    def _sts_action(self, environ: dict[str, Any]) -> str | None:
        """The STS action of a request (a form POST whose `Action` is one of STS's), else None."""
        if environ.get("REQUEST_METHOD") != "POST":
            return None
        form = urllib.parse.parse_qs(self._body(environ).decode("utf-8", "replace"))
        action = form.get("Action", [""])[0]
        return action if action in _STS_ACTIONS else None

    def _count_signing(self, environ: dict[str, Any]) -> None:
        """Who signed each request reaching AWS: the access key id of its SigV4 header, or nothing (unsigned;
        AssumeRoleWithWebIdentity is the one call AWS takes unsigned)."""
        found = re.search(r"Credential=([^/,\s]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        action = self._sts_action(environ)
        if found is not None:
            if action is None:  # a signed STS call is the control plane's own (AssumeRole), at any moment
                self._fake.signed_by.append(found.group(1))
        elif action != "AssumeRoleWithWebIdentity":
            self._fake.unsigned += 1

    @staticmethod
    def _body(environ: dict[str, Any]) -> bytes:
        """Read the body once (kept for the layer's next look) and leave a replay of it for moto."""
        if "fake_aws.body" not in environ:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            environ["fake_aws.body"] = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = _Replay(environ["fake_aws.body"])
        raw: bytes = environ["fake_aws.body"]
        return raw

    @staticmethod
    def _answer(start_response: Callable[..., Any], status: str, body: bytes) -> list[bytes]:
        start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def _expired(self, session_token: str) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        for role in sts_backends[ACCOUNT]["aws"].assumed_roles:
            if role.session_token == session_token:
                expiration: datetime.datetime = role.expiration
                if expiration.tzinfo is None:
                    expiration = expiration.replace(tzinfo=datetime.UTC)
                return expiration <= now
        return False


class _QuietHandler(WSGIRequestHandler):
    """No line per request on the test's log (werkzeug's default): the tests read what the control plane logs."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


class _Replay:
    """A request body already read by the layer, handed on to moto."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else self._at + size
        chunk = self._data[self._at : end]
        self._at += len(chunk)
        return chunk


class FakeAws:
    """moto on a loopback port, seeded: an IAM user with an access key, two roles, a bucket with one object."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.trust: WebIdentityTrust | None = None
        self.web_identity_calls: list[dict[str, str]] = []  # the form fields of each AssumeRoleWithWebIdentity
        self.refused_expired = 0
        self.refused_payload = 0
        # An STS outage on demand: while true every STS action is answered 503 ServiceUnavailable (counted).
        self.sts_down = False
        self.sts_refused_outage = 0
        self.signed_by: list[str] = []  # the access key id signing each request, STS calls and moto's admin API aside
        self.unsigned = 0  # requests that reached AWS with no signature (AssumeRoleWithWebIdentity aside)
        # Web-identity sessions last this long whatever was asked (None: as asked). A test knob: AWS never grants
        # less than asked (900 s at least), but serve asks for an hour and plans on the session it gets
        # (cloud/refresh.py), so a session of a few seconds makes serve's own refresher replace it within seconds.
        self.web_session_seconds: int | None = None
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.user_key = AccessKey("", "")
        self.assume_role_arn = f"arn:aws:iam::{ACCOUNT}:role/{ASSUME_ROLE_NAME}"
        self.web_role_arn = f"arn:aws:iam::{ACCOUNT}:role/{WEB_ROLE_NAME}"

    # -- life cycle

    def start(self, trust: WebIdentityTrust | None = None) -> FakeAws:
        self.trust = trust
        app = _Layer(DomainDispatcherApplication(create_backend_app), self)
        self._server = make_server(LOOPBACK, self.port, app, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-aws", daemon=True)
        self._thread.start()
        self._post("/moto-api/reset", b"")
        self._post("/moto-api/reset-auth", b"inf")  # seeding runs unauthenticated
        self._seed()
        self._post("/moto-api/reset-auth", b"0")  # from now on every request is authenticated
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._post("/moto-api/reset-auth", b"inf")
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FakeAws:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _post(self, path: str, data: bytes) -> None:
        requests.post(self.endpoint + path, data=data, timeout=10).raise_for_status()

    @contextmanager
    def unauthenticated(self) -> Iterator[None]:
        """Authentication off for the block (a test seeding its own buckets, objects and policies with
        `seed_client`), on again after it: every later request is checked again."""
        self._post("/moto-api/reset-auth", b"inf")
        try:
            yield
        finally:
            self._post("/moto-api/reset-auth", b"0")

    def seed_client(self, service: str) -> Any:
        """A client for `unauthenticated` blocks (moto then takes any key)."""
        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="seed", aws_secret_access_key="x"
        )

    # -- clients

    def client(self, service: str, key: AccessKey | None = None, session_token: str | None = None) -> Any:
        """A boto3 client signing with `key` (the seeded user's by default)."""
        key = key or self.user_key
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=key.secret_access_key,
            aws_session_token=session_token,
        )

    def session_key_ids(self) -> list[str]:
        """The access key id of every temporary credential STS issued, oldest first."""
        return [role.access_key_id for role in sts_backends[ACCOUNT]["aws"].assumed_roles]

    def expire(self, access_key_id: str) -> None:
        """End a temporary credential now (moto keeps no clock of its own worth waiting for)."""
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
        for role in sts_backends[ACCOUNT]["aws"].assumed_roles:
            if role.access_key_id == access_key_id:
                role.expiration = past.replace(tzinfo=None)
                return
        raise KeyError(access_key_id)

    def role_of_key(self, access_key_id: str) -> str | None:
        """The role ARN whose temporary credential `access_key_id` is (None: not one STS issued)."""
        for role in sts_backends[ACCOUNT]["aws"].assumed_roles:
            if role.access_key_id == access_key_id:
                return str(role.role_arn)
        return None

    def add_role(self, name: str, policy: Mapping[str, Any], assumable: bool = True) -> str:
        """A role with `policy`, which the seeded user may assume (AssumeRole) only when `assumable`; its ARN."""
        self._post("/moto-api/reset-auth", b"inf")  # seeding runs unauthenticated
        try:
            iam = boto3.client(
                "iam",
                endpoint_url=self.endpoint,
                region_name=REGION,
                aws_access_key_id="seed",
                aws_secret_access_key="x",
            )
            user_arn = f"arn:aws:iam::{ACCOUNT}:user/{USER}"
            trust = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"AWS": user_arn}, "Action": "sts:AssumeRole"}],
            }
            arn = str(iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"])
            iam.put_role_policy(RoleName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
            if assumable:
                allow = {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": arn}
                document = {"Version": "2012-10-17", "Statement": [allow]}
                iam.put_user_policy(UserName=USER, PolicyName=f"assume-{name}", PolicyDocument=json.dumps(document))
        finally:
            self._post("/moto-api/reset-auth", b"0")
        return arn

    # -- seed

    def _seed(self) -> None:
        iam = boto3.client(
            "iam", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="seed", aws_secret_access_key="x"
        )
        iam.create_user(UserName=USER)
        iam.put_user_policy(
            UserName=USER,
            PolicyName="assume",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": self.assume_role_arn}],
                }
            ),
        )
        created = iam.create_access_key(UserName=USER)["AccessKey"]
        self.user_key = AccessKey(created["AccessKeyId"], created["SecretAccessKey"])
        user_arn = f"arn:aws:iam::{ACCOUNT}:user/{USER}"
        trust_user = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": user_arn}, "Action": "sts:AssumeRole"}],
        }
        iam.create_role(RoleName=ASSUME_ROLE_NAME, AssumeRolePolicyDocument=json.dumps(trust_user))
        iam.put_role_policy(RoleName=ASSUME_ROLE_NAME, PolicyName="s3", PolicyDocument=json.dumps(S3_READ_POLICY))
        iam.create_role(RoleName=WEB_ROLE_NAME, AssumeRolePolicyDocument=json.dumps(self.web_trust_policy()))
        iam.put_role_policy(RoleName=WEB_ROLE_NAME, PolicyName="s3", PolicyDocument=json.dumps(S3_READ_POLICY))
        if self.trust is not None:
            iam.create_open_id_connect_provider(
                Url=self.trust.issuer_url, ClientIDList=[self.trust.audience], ThumbprintList=["0" * 40]
            )
        s3 = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="seed", aws_secret_access_key="x"
        )
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_object(Bucket=BUCKET, Key=OBJECT_KEY, Body=OBJECT_BODY)

    def web_trust_policy(self) -> dict[str, Any]:
        """The trust policy docs/aws-credentials.md tells a team to write, for the configured issuer."""
        trust = self.trust or WebIdentityTrust("https://issuer.invalid", "sts.amazonaws.com", "none", lambda: "")
        host = _provider_host(trust.issuer_url)
        return {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{host}"},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                    "Condition": {"StringEquals": {f"{host}:aud": trust.audience, f"{host}:sub": trust.subject}},
                }
            ],
        }

    # -- AssumeRoleWithWebIdentity, checked as AWS documents it

    def assume_role_with_web_identity(self, form: Mapping[str, str]) -> tuple[str, bytes]:
        self.web_identity_calls.append(dict(form))
        role_arn = form.get("RoleArn", "")
        if role_arn != self.web_role_arn or self.trust is None:
            return _sts_error(
                "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", "403 Forbidden"
            )
        problem = self._token_problem(form.get("WebIdentityToken", ""))
        if problem is not None:
            return _sts_error(*problem)
        duration = int(form.get("DurationSeconds", "3600"))
        if not 900 <= duration <= 43200:
            return _sts_error("ValidationError", "DurationSeconds must be between 900 and 43200")
        role = sts_backends[ACCOUNT]["aws"].assume_role_with_web_identity(
            region_name=REGION,
            role_session_name=form.get("RoleSessionName", ""),
            role_arn=role_arn,
            policy=None,
            duration=self.web_session_seconds or duration,
            external_id=None,
        )
        expiration = role.expiration.replace(tzinfo=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult>"
            f"<SubjectFromWebIdentityToken>{escape(self.trust.subject)}</SubjectFromWebIdentityToken>"
            f"<Audience>{escape(self.trust.audience)}</Audience>"
            f"<AssumedRoleUser><Arn>{escape(role.arn)}</Arn>"
            f"<AssumedRoleId>AROAFAKE:{escape(role.session_name)}</AssumedRoleId></AssumedRoleUser>"
            f"<Credentials><SessionToken>{escape(role.session_token)}</SessionToken>"
            f"<SecretAccessKey>{escape(role.secret_access_key)}</SecretAccessKey>"
            f"<Expiration>{expiration}</Expiration>"
            f"<AccessKeyId>{escape(role.access_key_id)}</AccessKeyId></Credentials>"
            f"<Provider>{escape(_provider_host(self.trust.issuer_url))}</Provider>"
            "</AssumeRoleWithWebIdentityResult>"
            "<ResponseMetadata><RequestId>fake-aws</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>"
        )
        return "200 OK", body.encode()

    def _token_problem(self, token: str) -> tuple[str, str, str] | None:
        """None when the token is what the role trusts; else (code, message, status) as STS answers."""
        assert self.trust is not None
        try:
            header = jwt.get_unverified_header(token)
            keys = {k.get("kid"): k for k in json.loads(self.trust.jwks()).get("keys", [])}
            jwk = keys.get(header.get("kid"))
            if jwk is None:
                return ("InvalidIdentityToken", "No matching key in the issuer's JWKS", "400 Bad Request")
            key = jwt.PyJWK(jwk).key
            claims = jwt.decode(
                token,
                key,
                algorithms=["ES256", "RS256"],
                audience=self.trust.audience,
                issuer=self.trust.issuer_url,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            return ("ExpiredTokenException", "Token expired", "400 Bad Request")
        except (jwt.PyJWTError, ValueError) as error:
            return ("InvalidIdentityToken", f"Token refused: {type(error).__name__}", "400 Bad Request")
        if claims.get("sub") != self.trust.subject:
            return ("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", "403 Forbidden")
        return None


def _provider_host(issuer_url: str) -> str:
    """IAM names an OIDC provider by its issuer URL without the scheme."""
    return issuer_url.removeprefix("https://").rstrip("/")
