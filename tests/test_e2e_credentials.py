"""Job-scoped credentials end to end on the real Envoy, through `controlplane serve`:
token exchange through the gateway, scoping, expiry, replay limit, revocation when the job ends, signing-key
rotation under continuous traffic, and the audit trail by job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import EchoBackend, HttpResponse, http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.exchange import post_exchange
from tests.support.fake_gitlab import FakeGitLab
from tests.support.gateway import Webhook, gateway_envoy
from tests.support.gitlab_hooks import HookTarget, deliver
from tests.support.ports import LOOPBACK, free_port, poll_until

pytestmark = pytest.mark.e2e

KEY_ROTATION = 3  # seconds: several rotations happen while the rotation test runs

POLICY = """\
kind: Issuer
name: gitlab
type: gitlab
url: {issuer}
---
kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
credentials: exchanged
endpoints: [{{address: 127.0.0.1, port: {reports_port}}}]
---
kind: Backend
name: deploy-api
hosts: [deploy.local]
audience: https://deploy.local
endpoints: [{{address: 127.0.0.1, port: {deploy_port}}}]
---
kind: Role
name: reports-read
backend: reports-api
rules: [{{methods: [GET]}}]
---
kind: Role
name: deploy-trigger
backend: deploy-api
rules: [{{methods: [POST]}}]
---
kind: Binding
name: deployer-reads-reports
roles: [reports-read]
credential_ttl: 10m
subjects:
  - project: 42
    ref_protected: true
---
kind: Gateway
name: ci-gateway
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [reports-api, deploy-api]
access_log: /dev/null
"""


@dataclass
class Stack:
    gitlab: FakeGitLab
    listen_port: int
    hook: HookTarget
    controlplane: ControlPlaneProcess
    state: Path

    def subject(self, job_id: int, **claims: Any) -> str:
        merged: dict[str, Any] = {"aud": "https://reports.local", "project_id": 42, "ttl": 3600, **claims}
        return self.gitlab.mint(job_id=job_id, **merged)

    def exchange(self, subject: str, **form: str) -> HttpResponse:
        fields = {"audience": "reports-api", **form}
        audience = fields.pop("audience")
        return post_exchange(self.listen_port, subject, audience, host="reports.local", **fields)

    def credential(self, job_id: int, **form: str) -> str:
        response = self.exchange(self.subject(job_id), **form)
        assert response.status == 200, response.text
        return str(response.json()["access_token"])

    def call(self, host: str, token: str | None, method: str = "GET", path: str = "/r") -> int:
        headers = {"Host": host}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return http_request(f"http://{LOOPBACK}:{self.listen_port}{path}", method=method, headers=headers).status


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("credentials")
    policy = root / "policy"
    policy.mkdir()
    with FakeGitLab() as gitlab, EchoBackend("reports") as reports, EchoBackend("deploy") as deploy:
        listen_port = free_port()
        (policy / "policy.yaml").write_text(
            POLICY.format(
                issuer=gitlab.issuer, reports_port=reports.port, deploy_port=deploy.port, listen_port=listen_port
            )
        )
        webhook = Webhook()
        args = (
            "--state-dir", str(root / "state"), "--jwks-refresh", "1",
            "--exchange-address", f"{LOOPBACK}:{free_port()}", "--key-rotation", str(KEY_ROTATION),
            *webhook.args,
        )  # fmt: skip
        with ControlPlaneProcess(policy, extra_args=args, env=webhook.env, log_path=root / "cp.log") as cp:
            hook = webhook.register(gitlab)
            with gateway_envoy(cp.xds_port, node="cred-1", name="credentials-envoy", flush_logs=True):
                built = Stack(gitlab, listen_port, hook, cp, root / "state")
                poll_until(lambda: built.exchange(built.subject(1)).status == 200, 20, message="exchange up")
                yield built


def test_exchanged_credential_opens_its_backend_only(stack: Stack) -> None:
    credential = stack.credential(101)
    assert stack.call("reports.local", credential) == 200
    assert stack.call("reports.local", credential, method="POST") == 403  # role is read-only
    assert stack.call("deploy.local", credential, method="POST") == 403  # audience/role of another backend
    assert stack.call("reports.local", stack.subject(101)) in (401, 403)  # raw ID tokens refused: exchanged only


def test_exchange_refusals_follow_rfc_8693(stack: Stack) -> None:
    assert stack.exchange(stack.subject(102, project_id=43)).json()["error"] == "invalid_scope"
    assert stack.exchange(stack.subject(102), audience="nope").json()["error"] == "invalid_target"
    assert stack.exchange(stack.subject(102, key=stack.gitlab.rogue)).json()["error"] == "invalid_grant"
    refused = stack.exchange("not-a-token")
    assert refused.status == 400 and "not-a-token" not in refused.text


def test_a_subject_token_is_exchanged_a_bounded_number_of_times(stack: Stack) -> None:
    subject = stack.subject(103)
    results = [stack.exchange(subject).status for _ in range(5)]
    assert results[0] == 200 and results[-1] == 400 and results.count(200) <= 3


def test_an_expired_credential_is_401(stack: Stack) -> None:
    credential = stack.credential(104, requested_token_lifetime="1")
    assert stack.call("reports.local", credential) == 200
    poll_until(lambda: stack.call("reports.local", credential) == 401, 40, interval=0.2, message="expired → 401")


def test_job_finished_webhook_denies_within_a_second(stack: Stack) -> None:
    credential = stack.credential(105)
    assert stack.call("reports.local", credential) == 200
    payload = {
        "object_kind": "build",
        "build_id": 105,
        "build_status": "success",
        "pipeline_id": 9,
        "project_id": 42,
        "ref": "main",
        "project_name": "acme / deployer",
    }
    started = time.monotonic()
    assert deliver(stack.hook, "Job Hook", payload).status == 200
    poll_until(lambda: stack.call("reports.local", credential) == 403, 5, interval=0.01, message="revoked")
    assert time.monotonic() - started < 1.0
    assert stack.call("reports.local", stack.credential(106)) == 200  # other jobs unaffected


def test_rotation_under_continuous_traffic_rejects_nothing(stack: Stack) -> None:
    failures: list[int] = []
    stop = threading.Event()
    credentials = [stack.credential(200)]

    def traffic() -> None:
        while not stop.is_set():
            status = stack.call("reports.local", credentials[-1])
            if status != 200:
                failures.append(status)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        deadline = time.monotonic() + KEY_ROTATION * 3
        while time.monotonic() < deadline:  # new credentials signed by each new key, old ones still in use
            credentials.append(stack.credential(200 + len(credentials)))
            stop.wait(0.5)
    finally:
        stop.set()
        worker.join()
    kids = {json.loads(_b64(c.split(".")[0]))["kid"] for c in credentials}
    assert len(kids) >= 2, "no rotation happened during the test"
    assert failures == []
    assert all(stack.call("reports.local", c) == 200 for c in credentials)


def test_audit_returns_exactly_the_requests_a_job_made(stack: Stack) -> None:
    mine, other = stack.credential(301), stack.credential(302)
    for path in ("/a?secret=x", "/b"):
        assert stack.call("reports.local", mine, path=path) == 200
    assert stack.call("reports.local", other, path="/c") == 200
    assert stack.call("reports.local", mine, method="POST", path="/d") == 403

    def rows() -> list[dict[str, Any]]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "controlplane",
                "audit",
                "--job",
                "301",
                "--json",
                "--db",
                str(stack.state / "audit.sqlite3"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return list(json.loads(out.stdout))

    found = poll_until(lambda: len(rows()) >= 3 and rows(), 10, message="audit rows for job 301")
    assert sorted((r["method"], r["path"], r["status"]) for r in found) == [
        ("GET", "/a", 200),
        ("GET", "/b", 200),
        ("POST", "/d", 403),
    ]
    assert all(r["project_id"] == "42" for r in found)


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
