"""An AWS backend end to end through the compiler: policy -> compile_policy(aws_credentials=) -> the control
plane's XdsServer -> a REAL Envoy 1.40 -> moto in server mode with IAM authentication on (tests/support/
fake_aws.py), which recomputes every SigV4 signature and refuses expired session credentials.

The credentials are the control plane's own: `Sts` + `AssumeRoleSource` (controlplane/cloud/aws.py) against the
fake's STS. What `serve` will do with a Refresher's `on_change` (a new snapshot) is done here by hand: compile
again and set the snapshot. The server runs on this test's event loop; everything blocking runs in a thread.
The last tests run the real `serve`: AssumeRole, and web identity with `--issuer-url` (its JWKS fetched over HTTP).
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from controlplane.cloud.aws import AssumeRoleSource, AwsCredential, Refresher, Sts, StsError
from controlplane.compiler.aws import SigningCredential
from controlplane.compiler.compile import compile_policy
from controlplane.model.loader import parse_policy
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import Snapshot, build_snapshots
from tests.support.ecds_envoy import compiled_envoy
from tests.support.envoy import EnvoyProcess
from tests.support.fake_aws import BUCKET, OBJECT_BODY, OBJECT_KEY, REGION, FakeAws, WebIdentityTrust
from tests.support.job_tokens import Jobs
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

GROUP = "ci-gateway"
ISSUER = "https://ci.example"
# The S3 regional host, as jobs would name it: moto (like S3) reads a bucket from any other host name's first label.
HOST = f"s3.{REGION}.amazonaws.com"
AUDIENCE = f"https://{HOST}"
PATH = f"/{BUCKET}/{OBJECT_KEY}"


def _policy(listen: int, aws_port: int, role_arn: str) -> str:
    return "---\n".join(
        [
            f"kind: Issuer\nname: ci\ntype: oidc\nurl: {ISSUER}\njwks_uri: {ISSUER}/jwks\n",
            f"kind: Backend\nname: s3\nhosts: [{HOST}]\naudience: {AUDIENCE}\n"
            f"endpoints: [{{address: {LOOPBACK}, port: {aws_port}}}]\n"
            f"aws: {{service: s3, region: {REGION}, role_arn: '{role_arn}', source: assume_role}}\n",
            f"kind: Role\nname: read\nbackend: s3\nrules: [{{methods: [GET], paths: ['/{BUCKET}/**']}}]\n",
            "kind: Binding\nname: reader\nissuer: ci\nroles: [read]\nsubjects: [{claims: {sub: job-allowed}}]\n",
            f"kind: Gateway\nname: {GROUP}\nlisten: {{address: {LOOPBACK}, port: {listen}}}\nbackends: [s3]\n"
            "access_log: /dev/null\n",
        ]
    )


def _jobs() -> Jobs:
    return Jobs(ISSUER, AUDIENCE)


def _signing(credential: AwsCredential | None) -> dict[str, SigningCredential]:
    if credential is None:
        return {}
    values = SigningCredential(credential.access_key_id, credential.secret_access_key, credential.session_token)
    return {credential.role_arn: values}


class Gateway:
    """Compiles the policy with the credentials of the moment and publishes the snapshot, as serve will."""

    def __init__(self, files: dict[str, str], jobs: Jobs, cache: SnapshotCache) -> None:
        self._policy = parse_policy(files)
        self._jobs = jobs
        self._cache = cache
        self._last: dict[str, Snapshot] = {}

    def publish(self, credential: AwsCredential | None) -> None:
        compiled = compile_policy(self._policy, keys={"ci": self._jobs.jwks}, aws_credentials=_signing(credential))
        self._last = build_snapshots({n: g.resources for n, g in compiled.items()}, self._last)
        self._cache.set(self._last[GROUP])


def envoy_on(cache: SnapshotCache) -> AbstractAsyncContextManager[EnvoyProcess]:
    return compiled_envoy(cache, group=GROUP, node_id="aws-e2e")


def _get(port: int, token: str | None, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    headers = {"Host": HOST} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def aws(tmp_path: Path) -> Iterator[tuple[FakeAws, AssumeRoleSource]]:
    fake = FakeAws().start()
    shared = tmp_path / "credentials"
    key = fake.user_key
    shared.write_text(
        f"[default]\naws_access_key_id = {key.access_key_id}\naws_secret_access_key = {key.secret_access_key}\n"
    )
    sts = Sts(region=REGION, endpoint_url=fake.endpoint, credentials_file=str(shared))
    yield fake, AssumeRoleSource(sts, fake.assume_role_arn, session_name="controlplane-e2e")
    fake.stop()


async def test_a_job_request_is_signed_for_the_role_and_accepted_by_s3(aws: tuple[FakeAws, AssumeRoleSource]) -> None:
    fake, source = aws
    jobs, cache, listen = _jobs(), SnapshotCache(), free_port()
    gateway = Gateway({"p.yaml": _policy(listen, fake.port, fake.assume_role_arn)}, jobs, cache)
    gateway.publish(None)  # no credential yet: fail closed
    async with envoy_on(cache):
        await asyncio.to_thread(_until, lambda: _status(listen, jobs.token("job-allowed")) == 503)
        refused_before = fake.refused_expired
        credential = await asyncio.to_thread(source.fetch)
        gateway.publish(credential)
        await asyncio.to_thread(_until, lambda: _status(listen, jobs.token("job-allowed")) == 200)
        status, body = await asyncio.to_thread(_get, listen, jobs.token("job-allowed"))
        assert (status, body) == (200, OBJECT_BODY)
        # a job no binding allows is refused by Envoy and never reaches AWS (no request signed for it)
        reached = (len(fake.signed_by), fake.unsigned)
        status, body = await asyncio.to_thread(_get, listen, jobs.token("job-other"))
        assert (status, body) == (403, b"RBAC: access denied")  # Envoy's own answer: the request went nowhere
        status, _ = await asyncio.to_thread(_get, listen, None)
        assert status == 401
        assert (len(fake.signed_by), fake.unsigned) == reached  # AWS saw neither request
        assert fake.refused_expired == refused_before


def _status(port: int, token: str) -> int:
    try:
        return _get(port, token)[0]
    except OSError:
        return 0


async def test_a_refreshed_credential_replaces_the_expiring_one_with_no_failed_request(
    aws: tuple[FakeAws, AssumeRoleSource],
) -> None:
    """Under continuous load on one kept-alive connection: the new credential arrives by ECDS, then the old one
    expires at AWS; every request succeeds. Then no valid credential (the run time withdraws an expired one):
    503, and S3 never sees an unsigned request."""
    fake, source = aws
    jobs, cache, listen = _jobs(), SnapshotCache(), free_port()
    gateway = Gateway({"p.yaml": _policy(listen, fake.port, fake.assume_role_arn)}, jobs, cache)
    first = source.fetch()
    gateway.publish(first)
    token = jobs.token("job-allowed")
    async with envoy_on(cache) as envoy:
        await asyncio.to_thread(_until, lambda: _status(listen, token) == 200)
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            conn = http.client.HTTPConnection(LOOPBACK, listen, timeout=5)
            while not stop.is_set():
                statuses.append(_get(listen, token, conn)[0])
            conn.close()

        loader = threading.Thread(target=load)
        loader.start()
        try:
            second = await asyncio.to_thread(source.fetch)
            assert second.access_key_id != first.access_key_id
            gateway.publish(second)
            # Envoy's config dump shows the key id in clear, never the secret (docs/envoy-aws-signing.md fact 7)
            await asyncio.to_thread(_until, lambda: second.access_key_id in envoy.admin_get("/config_dump")[1])
            assert second.secret_access_key not in envoy.admin_get("/config_dump")[1]
            fake.expire(first.access_key_id)  # the old credential is now refused by AWS
            seen = len(statuses)
            await asyncio.to_thread(_until, lambda: len(statuses) > seen + 20)
        finally:
            stop.set()
            await asyncio.to_thread(loader.join, 10)
        assert len(statuses) > 20 and set(statuses) == {200}, statuses
        assert fake.refused_expired == 0
        gateway.publish(None)
        await asyncio.to_thread(_until, lambda: _status(listen, token) == 503)


# -- through serve: the refresher, the recompile on a new credential, the policy service


@dataclass
class AwsStack(Served):
    def token(self) -> str:
        return self.gitlab.mint(aud=AUDIENCE, project_id=42, project_path="acme/deployer", namespace_id=11)


def _aws_policy(fake: FakeAws, role_arn: str, source: str) -> Callable[[PolicyInputs], dict[str, str]]:
    inventory = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"

    def policy(given: PolicyInputs) -> dict[str, str]:
        return {
            "inventory.yaml": inventory,
            "policy.yaml": documents(
                issuer(given.issuer, extra="inventory: inventory.yaml"),
                backend(
                    "s3",
                    fake.port,
                    host=HOST,
                    extra=f"aws: {{service: s3, region: {REGION}, role_arn: '{role_arn}', source: {source}}}",
                ),
                role("read", "s3", paths=[f"/{BUCKET}/**"]),
                binding("deployer-reads", ["read"], "{project: 42}"),
                gateway(given.listen_port, ["s3"], access_log=given.access_log),
            ),
        }

    return policy


def test_serve_refreshes_the_role_credential_and_envoy_signs_with_it(
    aws: tuple[FakeAws, AssumeRoleSource], tmp_path: Path
) -> None:
    """serve's own refresher (AssumeRole with the keys of the shared credentials file, STS at the fake through
    AWS_ENDPOINT_URL_STS) obtains the role's credential, the policy service recompiles with it, and a job's GET
    through Envoy passes moto's SigV4 check. Neither the control plane's own key nor the role's secret is logged."""
    fake, _ = aws
    policy = _aws_policy(fake, fake.assume_role_arn, "assume_role")

    env = {
        "AWS_ENDPOINT_URL_STS": fake.endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    (tmp_path / "stack").mkdir()
    with serve_stack(
        tmp_path / "stack",
        policy,
        kind=AwsStack,
        envoy=EnvoySpec("aws-envoy", "aws-envoy"),
        backends=(),
        serve_args=("--xds-insecure",),
        env=env,
        ready=lambda built: built.request(HOST, PATH, built.token()).status == 200,
    ) as built:
        response = built.request(HOST, PATH, built.token())
        assert (response.status, response.text.encode()) == (200, OBJECT_BODY)
        log = built.controlplane.log_text()
        assert f"AWS credentials for backend {fake.assume_role_arn} refreshed" in log
        assert fake.user_key.secret_access_key not in log and "SecretAccessKey" not in log
        shown = built.controlplane.status()["aws"][fake.assume_role_arn]  # the key id, never the secret
        assert shown["source"] == "assume_role" and shown["access_key_id"] in fake.session_key_ids()
        assert shown["valid_seconds"] > 0 and set(shown) == {"source", "access_key_id", "valid_seconds", "last_error"}


def _key_ids(envoy: EnvoyProcess, fake: FakeAws) -> set[str]:
    """The issued access key ids in Envoy's config dump (shown in clear, never the secret: docs/envoy-aws-signing.md
    fact 7)."""
    dump = envoy.admin_get("/config_dump")[1]
    return {key for key in fake.session_key_ids() if key in dump}


SESSION_SECONDS = 10  # the fake's web-identity sessions: refreshed after ~2 s, used until 1 s before expiry


@contextmanager
def _web_identity_serve(tmp_path: Path) -> Iterator[tuple[FakeAws, AwsStack, Callable[[], str]]]:
    """The real `serve --issuer-url` with an AWS backend on `source: web_identity`: serve signs a token as its
    own OIDC issuer, the fake's STS verifies it against the JWKS it fetches from serve's exchange listener over
    HTTP at every call (as AWS fetches the provider's JWKS), and answers the web-identity role's credential.
    Sessions last SESSION_SECONDS, so serve's own refresher (cloud/refresh.py: a quarter of a short session's
    usable life) replaces the credential every two seconds or so."""
    exchange_port = free_port()
    issuer_url = f"http://{LOOPBACK}:{exchange_port}"

    def served_jwks() -> str:
        with urllib.request.urlopen(issuer_url + "/.well-known/jwks.json", timeout=5) as answer:
            return str(answer.read().decode())

    trust = WebIdentityTrust(issuer_url, "sts.amazonaws.com", "backend:s3", served_jwks)
    fake = FakeAws().start(trust)
    fake.web_session_seconds = SESSION_SECONDS
    env = {
        "AWS_ENDPOINT_URL_STS": fake.endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),  # web identity needs no AWS key at all
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    (tmp_path / "stack").mkdir()
    try:
        with serve_stack(
            tmp_path / "stack",
            _aws_policy(fake, fake.web_role_arn, "web_identity"),
            kind=AwsStack,
            envoy=EnvoySpec("aws-envoy", "aws-envoy"),
            backends=(),
            serve_args=(
                "--xds-insecure",
                "--exchange-address",
                f"{LOOPBACK}:{exchange_port}",
                "--issuer-url",
                issuer_url,
            ),
            env=env,
            ready=lambda built: built.request(HOST, PATH, built.token()).status == 200,
            ready_timeout=30,
        ) as built:
            yield fake, built, served_jwks
    finally:
        fake.stop()


def test_serve_signs_as_the_web_identity_role_and_refreshes_it_with_no_failed_request(tmp_path: Path) -> None:
    """`source: web_identity` through the real `serve --issuer-url`: a job's GET through Envoy is signed with the
    role's credential and passes moto's SigV4 check. Serve's refresher replaces the credential within seconds:
    under load on one kept-alive connection, the new key reaches Envoy by ECDS, the old one is then ended at AWS,
    and no request fails."""
    with _web_identity_serve(tmp_path) as (fake, built, served_jwks):
        response = built.request(HOST, PATH, built.token())
        assert (response.status, response.text.encode()) == (200, OBJECT_BODY)
        call = fake.web_identity_calls[-1]
        assert call["RoleArn"] == fake.web_role_arn and call["Action"] == "AssumeRoleWithWebIdentity"
        assert jwt.get_unverified_header(call["WebIdentityToken"])["kid"] in served_jwks()
        first = _key_ids(built.envoy, fake)
        assert len(first) == 1
        token = built.token()
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            conn = http.client.HTTPConnection(LOOPBACK, built.listen_port, timeout=5)
            while not stop.is_set():
                statuses.append(_get(built.listen_port, token, conn)[0])
            conn.close()

        loader = threading.Thread(target=load)
        loader.start()
        try:
            # serve's own refresher, not the test, obtains the next credential
            _until(lambda: bool(_key_ids(built.envoy, fake) - first), timeout=SESSION_SECONDS)
            for old in first:
                fake.expire(old)  # the old credential's life ends at AWS
            seen = len(statuses)
            _until(lambda: len(statuses) > seen + 20)
        finally:
            stop.set()
            loader.join(10)
        assert len(statuses) > 20 and set(statuses) == {200}, statuses
        assert fake.refused_expired == 0 and fake.unsigned == 0
        log = built.controlplane.log_text()
        assert f"AWS credentials for backend {fake.web_role_arn} refreshed" in log
        assert all(c["WebIdentityToken"] not in log for c in fake.web_identity_calls)
        assert "SecretAccessKey" not in log


def test_serve_through_an_sts_outage_signs_with_the_last_credential_then_503_then_recovers(tmp_path: Path) -> None:
    """STS stops answering: serve's refresh attempts fail, requests are still signed with the last credential and
    accepted by S3; once it is past use the backend answers 503 (Envoy's own answer: nothing reaches AWS, never
    an unsigned request); the metrics say so. STS answers again: the next retry brings a new credential and
    requests succeed, with nothing restarted."""
    with _web_identity_serve(tmp_path) as (fake, built, _):
        labels = {"provider": "aws", "backend": fake.web_role_arn}
        token = built.token()
        issued_before = set(fake.session_key_ids())
        signed_before = len(fake.signed_by)
        fake.sts_down = True
        statuses: list[int] = []
        served_after_a_failed_refresh = False

        def failed_closed() -> bool:
            nonlocal served_after_a_failed_refresh
            status = built.request(HOST, PATH, token).status
            statuses.append(status)
            served_after_a_failed_refresh |= status == 200 and fake.sts_refused_outage > 0
            return status == 503

        try:
            poll_until(failed_closed, 3 * SESSION_SECONDS, interval=0.1, message="503 once the last one is past use")
            assert served_after_a_failed_refresh, "the last credential was used after a refresh failed"
            assert set(statuses) <= {200, 503}, statuses
            assert set(fake.signed_by[signed_before:]) <= issued_before  # signed with what was held, nothing else
            reached = len(fake.signed_by)
            assert built.request(HOST, PATH, token).status == 503
            assert len(fake.signed_by) == reached, "failed closed: the request never reached AWS"
            metric = built.controlplane.metric
            assert metric("controlplane_cloud_credential_refreshes_total", **labels, result="unavailable") >= 1
            assert metric("controlplane_cloud_credential_valid_seconds", **labels) == 0
            assert metric("controlplane_cloud_credentials_expired_total", **labels) >= 1
        finally:
            fake.sts_down = False
        # the refresher's next retry (backoff 1, 2, 4 … s) brings a new credential: nothing is restarted
        poll_until(lambda: built.request(HOST, PATH, token).status == 200, 40, interval=0.2, message="served again")
        assert fake.signed_by[-1] not in issued_before
        assert fake.unsigned == 0 and fake.refused_expired == 0
        assert built.controlplane.metric("controlplane_cloud_credential_valid_seconds", **labels) > 0


@dataclass
class Outage:
    """The fake's STS through the control plane's own source, made unavailable on demand (an STS outage)."""

    source: AssumeRoleSource
    down: bool = False

    def fetch(self) -> AwsCredential:
        if self.down:
            raise StsError("ServiceUnavailable", self.source.role_arn, refused=False)
        return self.source.fetch()


async def test_sts_down_keeps_signing_with_the_last_credential_until_it_expires_then_503(
    aws: tuple[FakeAws, AssumeRoleSource],
) -> None:
    """The control plane's Refresher on a clock of the test's: a failed refresh keeps the last credential (requests
    still signed and accepted); once it is past use, the recompile without it answers 503, never unsigned."""
    fake, source = aws
    jobs, cache, listen = _jobs(), SnapshotCache(), free_port()
    gateway = Gateway({"p.yaml": _policy(listen, fake.port, fake.assume_role_arn)}, jobs, cache)
    clock = [time.time()]
    sts = Outage(source)
    refresher = Refresher("s3", sts, clock=lambda: clock[0], sample=lambda: 0.0, on_change=gateway.publish)
    token = jobs.token("job-allowed")
    await asyncio.to_thread(refresher.poll)  # the first credential: published
    async with envoy_on(cache):
        await asyncio.to_thread(_until, lambda: _status(listen, token) == 200)
        sts.down = True
        clock[0] += 2400  # past the refresh point (half its usable hour, no jitter): the attempt fails
        await asyncio.to_thread(refresher.poll)
        assert refresher.state.failures == 1
        assert _status(listen, token) == 200
        clock[0] += 1200  # past its expiry: withdrawn, the backend fails closed
        await asyncio.to_thread(refresher.poll)
        await asyncio.to_thread(_until, lambda: _status(listen, token) == 503)
