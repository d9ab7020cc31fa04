"""State across restarts, end to end through `controlplane serve`, the fake GitLab and a real Envoy:

- a damaged state file stops the start (exit 3, the file named) instead of starting with an empty deny list;
- every state file is private;
- a job that ended while the control plane was down (its Job Hook never delivered) is revoked on start.
"""

from __future__ import annotations

import json
import stat
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

POLICY = """\
kind: Issuer
name: gitlab
type: gitlab
url: {issuer}
api:
  token_env: GITLAB_TOKEN
  reconcile: 10s
---
kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
credentials: exchanged
endpoints: [{{address: 127.0.0.1, port: {reports_port}}}]
---
kind: Role
name: reports-read
backend: reports-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: deployer-reads-reports
roles: [reports-read]
credential_ttl: 10m
subjects:
  - project: acme/deployer
---
kind: Backend
name: raw-api
hosts: [raw.local]
audience: https://raw.local
endpoints: [{{address: 127.0.0.1, port: {reports_port}}}]
---
kind: Role
name: raw-read
backend: raw-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: deployer-reads-raw
roles: [raw-read]
subjects:
  - project: acme/deployer
---
kind: Gateway
name: ci-gateway
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [reports-api, raw-api]
access_log: /dev/null
"""


@dataclass
class Stack:
    gitlab: FakeGitLab
    project: int
    listen_port: int
    hook: HookTarget
    controlplane: ControlPlaneProcess
    state: Path

    def credential(self, job_id: int) -> str:
        response = self.exchange(self.subject(job_id))
        assert response.status == 200, response.text
        return str(response.json()["access_token"])

    def subject(self, job_id: int) -> str:
        """The job's ID token for the reports backend, as GitLab mints it while the job runs."""
        return self.gitlab.mint(
            job_id=job_id, project_id=self.project, project_path="acme/deployer", aud="https://reports.local", ttl=3600
        )

    def exchange(self, subject: str) -> HttpResponse:
        """Through the gateway, as a job does."""
        return post_exchange(self.listen_port, subject, "reports-api", host="reports.local")

    def call(self, token: str, host: str = "reports.local") -> int:
        headers = {"Host": host, "Authorization": f"Bearer {token}"}
        return http_request(f"http://{LOOPBACK}:{self.listen_port}/r", headers=headers).status

    def raw_token(self, job_id: int) -> str:
        """The job's ID token for the raw-token backend (no exchange: Envoy checks GitLab's signature)."""
        return self.gitlab.mint(
            job_id=job_id, project_id=self.project, project_path="acme/deployer", aud="https://raw.local", ttl=3600
        )

    def job_finished_hook(self, job_id: int) -> None:
        payload: dict[str, Any] = {
            "object_kind": "build",
            "build_id": job_id,
            "build_status": "success",
            "pipeline_id": 9,
            "project_id": self.project,
            "ref": "main",
            "project_name": "acme / deployer",
        }
        assert deliver(self.hook, "Job Hook", payload).status == 200

    def restart(self) -> None:
        """Restart the control plane and wait for the Envoy to be back on it (its reconnect backoff grows with
        every restart), so what a test does next reaches the gateway."""
        self.controlplane.restart()
        poll_until(
            lambda: self.controlplane.status("?summary=1")["summary"]["connected"] >= 1, 30, message="Envoy back"
        )

    def revoked_jobs(self) -> int:
        credentials = self.controlplane.status()["credentials"]
        return int(credentials["revoked_jobs"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("state-e2e")
    policy = root / "policy"
    policy.mkdir()
    with FakeGitLab() as gitlab, EchoBackend("reports") as reports:
        project = gitlab.add_project("acme/deployer")
        listen_port = free_port()
        (policy / "policy.yaml").write_text(
            POLICY.format(issuer=gitlab.issuer, reports_port=reports.port, listen_port=listen_port)
        )
        webhook = Webhook()
        args = (
            "--state-dir", str(root / "state"), "--jwks-refresh", "1",
            "--exchange-address", f"{LOOPBACK}:{free_port()}", *webhook.args,
            "--job-sweep-interval", "3600",  # no test may be rescued by the periodic sweep
        )  # fmt: skip
        env = {**webhook.env, "GITLAB_TOKEN": gitlab.api_token}
        with ControlPlaneProcess(policy, extra_args=args, env=env, log_path=root / "cp.log") as cp:
            hook = webhook.register(gitlab)
            with gateway_envoy(cp.xds_port, node="state-1", name="state-envoy", flush_logs=True):
                built = Stack(gitlab, project, listen_port, hook, cp, root / "state")
                job = gitlab.add_job(project)
                poll_until(lambda: built.call(built.credential(job)) == 200, 30, interval=0.1, message="gateway up")
                yield built


def test_a_job_that_ended_while_the_control_plane_was_down_is_revoked_on_start(stack: Stack) -> None:
    job, unused = stack.gitlab.add_job(stack.project), stack.gitlab.add_job(stack.project)
    credential, never_used = stack.credential(job), stack.credential(unused)
    assert stack.call(credential) == 200  # seen at the gateway; `never_used` is known to the exchange only
    stack.controlplane.stop()
    for finished in (job, unused):
        stack.gitlab.set_job_status(finished, "success")  # GitLab's Job Hook is sent to nobody: it is lost
    started = time.monotonic()
    stack.controlplane.start()
    # Both are revoked by the start sweep, one after the other: each its own push, so poll for both.
    poll_until(
        lambda: stack.call(credential) == 403 and stack.call(never_used) == 403,
        20,
        interval=0.05,
        message="finished jobs revoked after restart",
    )
    elapsed = time.monotonic() - started
    assert stack.controlplane.metric("controlplane_job_recovery_revocations_total") == 2
    print(f"restart -> job revoked at the gateway in {elapsed:.2f}s")
    running = stack.gitlab.add_job(stack.project, status="running")
    assert stack.call(stack.credential(running)) == 200  # a running job is asked about and left alone


def test_a_job_that_ended_while_the_control_plane_was_down_and_never_exchanged_gets_no_credential(
    stack: Stack,
) -> None:
    """No sweep knows this job (no credential, never seen at a gateway), and the periodic sweep is minutes away:
    its token predates the restart, so the exchange asks GitLab before granting."""
    job = stack.gitlab.add_job(stack.project)
    subject = stack.subject(job)  # minted while the job ran
    stack.controlplane.stop()
    stack.gitlab.set_job_status(job, "success")  # the Job Hook is sent to nobody
    stack.restart()
    refused = stack.exchange(subject)
    assert refused.status == 400, f"exchange answered {refused.status}"
    assert refused.json()["error"] == "invalid_grant"
    assert "finished" in refused.json()["error_description"]
    assert "access_token" not in refused.json()
    assert stack.call(subject) != 200
    assert stack.controlplane.metric("controlplane_exchange_job_checks_total", result="finished") == 1
    running = stack.gitlab.add_job(stack.project)
    assert stack.call(stack.credential(running)) == 200


def test_a_raw_id_token_of_a_job_that_ended_while_the_control_plane_was_down_is_denied_within_seconds(
    stack: Stack,
) -> None:
    """A raw-token backend: Envoy checks GitLab's signature and cannot ask GitLab. The job finished while the
    control plane was down and was never seen nor exchanged, so the start sweep did not know it and the periodic
    one is an hour away. Its first request reaches the control plane through the access log; its token predates
    the restart, so GitLab is asked at once and the job revoked fleet-wide. The first request may pass (Envoy
    decided before anyone could know)."""
    job = stack.gitlab.add_job(stack.project)
    token = stack.raw_token(job)  # minted while the job ran
    stack.controlplane.stop()
    stack.gitlab.set_job_status(job, "success")  # the Job Hook is sent to nobody
    stack.restart()
    statuses: list[int] = []

    def denied() -> bool:
        statuses.append(stack.call(token, "raw.local"))
        return statuses[-1] == 403

    first = time.monotonic()
    poll_until(denied, 2.0, interval=0.02, message="raw ID token of a finished job denied")
    elapsed = time.monotonic() - first
    assert set(statuses) <= {200, 403}, statuses
    assert stack.controlplane.metric("controlplane_gateway_job_checks_total", result="finished") == 1
    print(f"first raw request -> 403 in {elapsed:.2f}s ({statuses.count(200)} of {len(statuses)} passed)")
    running = stack.gitlab.add_job(stack.project)  # minted after the restart: never asked about
    assert stack.call(stack.raw_token(running), "raw.local") == 200


def test_a_job_hook_after_a_restart_revokes_credentials_even_when_id_tokens_are_not_denied(stack: Stack) -> None:
    """With `--deny-id-tokens-for 0` a revocation lasts as long as the job's credentials: after a restart the
    exchange's in-memory index is empty, so their expiry must come from the state directory."""
    cp = stack.controlplane
    default_args = cp.extra_args
    cp.extra_args = (*default_args, "--deny-id-tokens-for", "0")
    try:
        stack.restart()
        job = stack.gitlab.add_job(stack.project)
        credential = stack.credential(job)
        assert stack.call(credential) == 200
        stack.restart()
        stack.job_finished_hook(job)
        poll_until(lambda: stack.call(credential) == 403, 5, interval=0.02, message="revoked after the restart")
    finally:
        cp.extra_args = default_args
        stack.restart()


def test_state_files_are_private(stack: Stack) -> None:
    job = stack.gitlab.add_job(stack.project)
    stack.credential(job)
    stack.job_finished_hook(job)
    poll_until(lambda: (stack.state / "revoked-jobs.json").exists(), 10, message="deny list written")
    assert stat.S_IMODE(stack.state.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in stack.state.iterdir()}
    assert {"signing-keys.json", "revoked-jobs.json", "audit.sqlite3"} <= set(files)
    assert files == dict.fromkeys(files, 0o600)


def test_a_second_serve_on_the_same_state_dir_refuses_to_start(stack: Stack) -> None:
    """Two serves on one state directory used to overwrite each other's revoked-jobs.json, losing revocations.
    Replicas share state through a database (issue 12), never one directory."""
    job = stack.gitlab.add_job(stack.project)
    stack.credential(job)
    stack.job_finished_hook(job)
    poll_until(lambda: job_in_deny_list(stack, job), 10, message="revocation written")
    second = ControlPlaneProcess(
        stack.state.parent / "policy",
        extra_args=("--state-dir", str(stack.state)),
        env={"GITLAB_TOKEN": stack.gitlab.api_token},
        log_path=stack.state.parent / "second.log",
    )
    try:
        second.start(wait_ready=False)
        poll_until(lambda: not second.running, 20, message="the second serve refuses to start")
    finally:
        code = second.stop()
    assert code == 3
    log, holder = second.log_text(), (stack.state / "lock").read_text().strip()
    assert f"state dir {stack.state} is in use by another controlplane serve (pid {holder})" in log, log[-2000:]
    assert job_in_deny_list(stack, job)  # the first serve's record is intact, and it still serves
    assert http_request(f"{stack.controlplane.admin_url}/readyz").status == 200


def job_in_deny_list(stack: Stack, job: int) -> bool:
    path = stack.state / "revoked-jobs.json"
    return path.exists() and str(job) in json.loads(path.read_text())["revoked"]


def test_a_truncated_deny_list_stops_the_start_naming_the_file(stack: Stack) -> None:
    """Run last in the module: it leaves the control plane stopped."""
    job = stack.gitlab.add_job(stack.project)
    credential = stack.credential(job)
    before = stack.revoked_jobs()
    stack.job_finished_hook(job)
    poll_until(lambda: stack.revoked_jobs() > before, 10, message="revoked")
    assert stack.call(credential) == 403 or poll_until(lambda: stack.call(credential) == 403, 5, message="denied")
    stack.controlplane.stop()
    deny_list = stack.state / "revoked-jobs.json"
    deny_list.write_bytes(deny_list.read_bytes()[:10])  # what a crash of a non-atomic writer leaves
    log_size = len(stack.controlplane.log_text())
    stack.controlplane.start(wait_ready=False)
    poll_until(lambda: not stack.controlplane.running, 20, message="the control plane refuses to start")
    assert stack.controlplane.stop() == 3
    log = stack.controlplane.log_text()[log_size:]
    assert "refusing to start" in log and str(deny_list) in log and "not valid JSON" in log
    with pytest.raises(OSError):  # nothing serves: no admin port, no xDS
        http_request(f"{stack.controlplane.admin_url}/readyz", timeout=1.0)


def test_a_null_deny_list_stops_the_start_naming_the_file(stack: Stack) -> None:
    """`null` used to read as "no deny list yet": the server became ready with every revocation forgotten."""
    stack.controlplane.stop()
    deny_list = stack.state / "revoked-jobs.json"
    deny_list.write_bytes(b"null")
    log_size = len(stack.controlplane.log_text())
    stack.controlplane.start(wait_ready=False)
    poll_until(lambda: not stack.controlplane.running, 20, message="the control plane refuses to start")
    assert stack.controlplane.stop() == 3
    log = stack.controlplane.log_text()[log_size:]
    assert f"refusing to start: {deny_list}: malformed: expected a JSON object, found null" in log, log[-2000:]
    assert deny_list.read_bytes() == b"null"
