"""Issue 16 attacked from outside through a REAL Envoy 1.40 and moto with SigV4 verified (tests/support/fake_aws.py):
a CI job allowed on one S3 path tries to reach another. Each test failed before its fix (tests/test_cloud_attacks.py
has the attacks needing no Envoy)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from moto.sts.models import sts_backends

from controlplane.cloud.aws import AssumeRoleSource, Sts
from controlplane.compiler.aws import COPY_REFUSED_BODY, SigningCredential
from controlplane.compiler.compile import compile_policy
from controlplane.model.loader import parse_policy
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import build_snapshots
from tests.support.ecds_envoy import compiled_envoy
from tests.support.envoy import EnvoyProcess
from tests.support.fake_aws import ACCOUNT, BUCKET, REGION, FakeAws
from tests.support.job_tokens import Jobs
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import LOOPBACK, free_port
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

GROUP = "ci-gateway"
ISSUER = "https://ci.example"
HOST = f"s3.{REGION}.amazonaws.com"
AUDIENCE = f"https://{HOST}"
SECRETS = "team-secrets"
SECRET_BODY = b"the other team's production key\n"
# AWS authorises a copy as s3:GetObject on the source and s3:PutObject on the target; moto asks for an action of
# its own, "s3:CopyObject", on the target (observed), so the role is given it too: what AWS would allow.
WRITE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:CopyObject"],
            "Resource": "*",
        }
    ],
}


def _policy(listen: int, aws_port: int, role_arn: str) -> dict[str, str]:
    """A job may read and write /ci-artifacts/** only; the role (as roles are) can do more."""
    text = "---\n".join(
        [
            f"kind: Issuer\nname: ci\ntype: oidc\nurl: {ISSUER}\njwks_uri: {ISSUER}/jwks\n",
            f"kind: Backend\nname: s3\nhosts: [{HOST}]\naudience: {AUDIENCE}\n"
            f"endpoints: [{{address: {LOOPBACK}, port: {aws_port}}}]\n"
            f"aws: {{service: s3, region: {REGION}, role_arn: '{role_arn}', source: assume_role}}\n",
            f"kind: Role\nname: rw\nbackend: s3\nrules: [{{methods: [GET, PUT], paths: ['/{BUCKET}/**']}}]\n",
            "kind: Binding\nname: writer\nissuer: ci\nroles: [rw]\nsubjects: [{claims: {sub: job-allowed}}]\n",
            f"kind: Gateway\nname: {GROUP}\nlisten: {{address: {LOOPBACK}, port: {listen}}}\nbackends: [s3]\n"
            "access_log: /dev/null\n",
        ]
    )
    return {"p.yaml": text}


def _jobs() -> Jobs:
    return Jobs(ISSUER, AUDIENCE)


@pytest.fixture
def aws(tmp_path: Path) -> Iterator[tuple[FakeAws, AssumeRoleSource]]:
    fake = FakeAws().start()
    with fake.unauthenticated():
        s3 = fake.seed_client("s3")
        s3.create_bucket(Bucket=SECRETS, CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_object(Bucket=SECRETS, Key="prod.key", Body=SECRET_BODY)
        fake.seed_client("iam").put_role_policy(
            RoleName=fake.assume_role_arn.rsplit("/", 1)[1], PolicyName="rw", PolicyDocument=json.dumps(WRITE_POLICY)
        )
    shared = tmp_path / "credentials"
    key = fake.user_key
    shared.write_text(
        f"[default]\naws_access_key_id = {key.access_key_id}\naws_secret_access_key = {key.secret_access_key}\n"
    )
    sts = Sts(region=REGION, endpoint_url=fake.endpoint, credentials_file=str(shared))
    yield fake, AssumeRoleSource(sts, fake.assume_role_arn, session_name="attack-e2e")
    fake.stop()


def envoy_on(cache: SnapshotCache) -> AbstractAsyncContextManager[EnvoyProcess]:
    return compiled_envoy(cache, group=GROUP, node_id="attack-e2e")


def _send(port: int, method: str, path: str, token: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request(method, path, body=b"" if method == "PUT" else None,
                     headers={"Host": HOST, "Authorization": f"Bearer {token}", **(headers or {})})  # fmt: skip
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def _until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


COPY_SOURCES = (
    f"/{SECRETS}/prod.key",
    f"{SECRETS}/prod.key",  # S3 takes it with or without the leading slash
    f"/{SECRETS}/prod.key?versionId=null",
    f"%2F{SECRETS}%2Fprod.key",  # URL-encoded, as S3 decodes it
)


async def test_a_copy_source_header_cannot_reach_a_path_rbac_never_allowed(
    aws: tuple[FakeAws, AssumeRoleSource],
) -> None:
    """RBAC checks the request's path; S3's CopyObject reads a second object named in `x-amz-copy-source`, which
    RBAC never sees and Envoy signs as sent (docs/envoy-aws-signing.md fact 1). Before: a job allowed to write
    /ci-artifacts/** copied another bucket's object into it and read it back. Now an S3 backend refuses a request
    naming a copy source (403 from Envoy, S3 never reached)."""
    fake, source = aws
    jobs, cache, listen = _jobs(), SnapshotCache(), free_port()
    policy = parse_policy(_policy(listen, fake.port, fake.assume_role_arn))
    credential = source.fetch()
    signing = {credential.role_arn: SigningCredential(credential.access_key_id, credential.secret_access_key,
                                                      credential.session_token)}  # fmt: skip
    compiled = compile_policy(policy, keys={"ci": jobs.jwks}, aws_credentials=signing)
    cache.set(build_snapshots({n: g.resources for n, g in compiled.items()}, {})[GROUP])
    token = jobs.token("job-allowed")
    async with envoy_on(cache):
        await asyncio.to_thread(_until, lambda: _send(listen, "PUT", f"/{BUCKET}/mine", token)[0] == 200)
        status, _ = await asyncio.to_thread(_send, listen, "GET", f"/{SECRETS}/prod.key", token)
        assert status == 403  # the direct way: RBAC
        for n, copy_source in enumerate(COPY_SOURCES):
            header = {"x-amz-copy-source": copy_source} if n % 2 else {"X-Amz-Copy-Source": copy_source}
            status, body = await asyncio.to_thread(_send, listen, "PUT", f"/{BUCKET}/stolen-{n}", token, header)
            assert (status, body) == (403, COPY_REFUSED_BODY.encode()), (copy_source, status, body)
            status, body = await asyncio.to_thread(_send, listen, "GET", f"/{BUCKET}/stolen-{n}", token)
            assert SECRET_BODY not in body and status == 404, (copy_source, status, body)
        # an ordinary write and read on the allowed path still pass
        assert (await asyncio.to_thread(_send, listen, "GET", f"/{BUCKET}/mine", token))[0] == 200


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """One request as written (http.client would refuse or fix some of these), its status and body."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_path_host_and_signing_header_tricks_never_reach_another_bucket(
    aws: tuple[FakeAws, AssumeRoleSource],
) -> None:
    """What held when tried (no fix needed): the path RBAC matches is the path sent and signed (normalised, encoded
    slashes refused), the virtual host is chosen by the Host the job sends (a bucket-named host is no host of
    the backend: Envoy's listener-wide RBAC denies it), and the signing headers a job sends are replaced
    (docs/envoy-aws-signing.md fact 1)."""
    fake, source = aws
    jobs, cache, listen = _jobs(), SnapshotCache(), free_port()
    policy = parse_policy(_policy(listen, fake.port, fake.assume_role_arn))
    credential = source.fetch()
    signing = {credential.role_arn: SigningCredential(credential.access_key_id, credential.secret_access_key,
                                                      credential.session_token)}  # fmt: skip
    compiled = compile_policy(policy, keys={"ci": jobs.jwks}, aws_credentials=signing)
    cache.set(build_snapshots({n: g.resources for n, g in compiled.items()}, {})[GROUP])
    token = jobs.token("job-allowed")
    auth = f"Authorization: Bearer {token}\r\n".encode()
    async with envoy_on(cache):
        await asyncio.to_thread(_until, lambda: _send(listen, "GET", f"/{BUCKET}/hello.txt", token)[0] == 200)
        tricks = {
            "dot segments": f"/{BUCKET}/../{SECRETS}/prod.key",
            "encoded dots": f"/{BUCKET}/%2e%2e/{SECRETS}/prod.key",
            "encoded slash": f"/{BUCKET}%2F..%2F{SECRETS}/prod.key",
            "double slash": f"//{SECRETS}/prod.key",
            "backslash": f"/{BUCKET}\\..\\{SECRETS}/prod.key",
        }
        for name, path in tricks.items():
            request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n".encode() + auth + b"\r\n"
            status, body = await asyncio.to_thread(_raw, listen, request)
            assert SECRET_BODY not in body and status != 200, (name, status, body)
        hosts = {
            "virtual-hosted bucket": f"{SECRETS}.{HOST}",
            "absolute URI": None,
        }
        for name, host in hosts.items():
            target = "/prod.key" if host else f"http://{SECRETS}.{HOST}/prod.key"
            request = (
                f"GET {target} HTTP/1.1\r\nHost: {host or HOST}\r\nConnection: close\r\n".encode() + auth + b"\r\n"
            )
            status, body = await asyncio.to_thread(_raw, listen, request)
            # no virtual host of the backend: the listener's deny-all RBAC answers (no route would be 404)
            assert SECRET_BODY not in body and status in (403, 404), (name, status, body)
        # signing headers of the job's own: replaced, the request signed as the role's and accepted
        forged = {
            "X-Amz-Security-Token": "job-forged-token",
            "X-Amz-Date": "20000101T000000Z",
            "X-Amz-Content-Sha256": "0" * 64,
        }
        status, body = await asyncio.to_thread(_send, listen, "GET", f"/{BUCKET}/hello.txt", token, forged)
        assert status == 200, body
        # a second Authorization (an AWS signature of the job's) never reaches S3 beside or instead of the role's
        request = (
            f"GET /{BUCKET}/hello.txt HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n".encode()
            + auth
            + b"Authorization: AWS4-HMAC-SHA256 Credential=AKIAJOB/20000101/eu-west-1/s3/aws4_request, "
            b"SignedHeaders=host, Signature=00\r\n\r\n"
        )
        status, body = await asyncio.to_thread(_raw, listen, request)
        assert status in (200, 401), (status, body)


# -- through serve: the role's secrets in no output a reader of the control plane or the gateway can see


@dataclass
class _AwsStack(Served):
    def token(self) -> str:
        return self.gitlab.mint(aud=AUDIENCE, project_id=42, project_path="acme/deployer", namespace_id=11)


def _serve_policy(fake: FakeAws) -> Callable[[PolicyInputs], dict[str, str]]:
    inventory = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"
    aws = f"aws: {{service: s3, region: {REGION}, role_arn: '{fake.assume_role_arn}', source: assume_role}}"

    def policy(given: PolicyInputs) -> dict[str, str]:
        return {
            "inventory.yaml": inventory,
            "policy.yaml": documents(
                issuer(given.issuer, extra="inventory: inventory.yaml"),
                backend("s3", fake.port, host=HOST, extra=aws),
                role("read", "s3", paths=[f"/{BUCKET}/**"]),
                binding("deployer-reads", ["read"], "{project: 42}"),
                gateway(given.listen_port, ["s3"], access_log=given.access_log),
            ),
        }

    return policy


def test_no_secret_of_the_role_in_logs_metrics_status_audit_access_log_or_config_dump(
    aws: tuple[FakeAws, AssumeRoleSource], tmp_path: Path
) -> None:
    """serve obtains the role's credential (AssumeRole with the credentials file's key), a job's request is signed
    with it; then every output is searched for the key's secret and each issued session's secret and token."""
    fake, _ = aws
    env = {
        "AWS_ENDPOINT_URL_STS": fake.endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    (tmp_path / "stack").mkdir()
    with serve_stack(
        tmp_path / "stack",
        _serve_policy(fake),
        kind=_AwsStack,
        envoy=EnvoySpec("attack-envoy", "attack-envoy", flush_logs=True),
        backends=(),
        serve_args=("--xds-insecure",),
        env=env,
        ready=lambda built: built.request(HOST, f"/{BUCKET}/hello.txt", built.token()).status == 200,
    ) as built:
        for _ in range(3):
            assert built.request(HOST, f"/{BUCKET}/hello.txt", built.token()).status == 200
        sessions = sts_backends[ACCOUNT]["aws"].assumed_roles
        assert sessions
        secrets = [fake.user_key.secret_access_key]
        secrets += [s for role in sessions for s in (role.secret_access_key, role.session_token)]
        outputs = {
            "serve log": built.controlplane.log_text(),
            "metrics": built.controlplane.metrics(),
            "status": json.dumps(built.controlplane.status()),
            "envoy config dump": built.envoy.admin_get("/config_dump")[1],
            "envoy stats": built.envoy.admin_get("/stats")[1],
            "envoy log": built.envoy.log_text(redact=False),
        }
        _until(lambda: built.access_log.exists() and HOST in built.access_log.read_text())
        outputs["access log"] = built.access_log.read_text()
        state = built.controlplane.state_dir
        audit = subprocess.run(
            [sys.executable, "-m", "controlplane", "audit", "--since", "1h", "--format", "json", "--state-dir",
             str(state)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()},
        )  # fmt: skip
        outputs["audit"] = audit.stdout + audit.stderr
        assert fake.assume_role_arn in outputs["audit"]  # the role used is recorded, its secrets are not
        # the search can find: the key id is in clear where the secret is redacted (docs/envoy-aws-signing.md fact 7)
        assert any(role.access_key_id in outputs["envoy config dump"] for role in sessions)
        for where, text in outputs.items():
            for secret in secrets:
                assert secret not in text, f"a secret of the role in the {where}"
