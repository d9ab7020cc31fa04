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

from tests.support.backends import http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.fake_gitlab import FakeGitLab
from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_exchange_stack

pytestmark = pytest.mark.e2e

API = "api:\n  token_env: GITLAB_TOKEN\n  reconcile: 10s"
DEPLOYER = "{project: acme/deployer}"
NO_SWEEP = ("--job-sweep-interval", "3600")  # no test may be rescued by the periodic sweep


def policy(given: PolicyInputs) -> str:
    """An exchanged backend and a raw-token one, both on the same echo server, for one GitLab project."""
    return documents(
        issuer(given.issuer, extra=API),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api"),
        binding("deployer-reads-reports", ["reports-read"], DEPLOYER, extra=TTL_10M),
        backend("raw-api", given.ports["reports"]),
        role("raw-read", "raw-api"),
        binding("deployer-reads-raw", ["raw-read"], DEPLOYER),
        gateway(given.listen_port, ["reports-api", "raw-api"]),
    )


@dataclass
class StateStack(Served):
    project: int = 0

    @property
    def state(self) -> Path:
        return self.controlplane.state_dir

    def subject(self, job_id: int, aud: str = "https://reports.local", **claims: Any) -> str:
        """The job's ID token, as GitLab mints it while the job runs (for the reports backend by default)."""
        return super().subject(job_id, aud, project_id=self.project, project_path="acme/deployer", **claims)

    def get(self, token: str, host: str = "reports.local") -> int:
        return self.call(host, token)

    def raw_token(self, job_id: int) -> str:
        """The job's ID token for the raw-token backend (no exchange: Envoy checks GitLab's signature)."""
        return self.subject(job_id, "https://raw.local")

    def restart(self) -> None:
        """Restart the control plane and wait for the Envoy to be back on it, so what a test does next reaches
        the gateway."""
        self.controlplane.restart()
        self.wait_connected()

    def revoked_jobs(self) -> int:
        credentials = self.controlplane.status()["credentials"]
        return int(credentials["revoked_jobs"])


@pytest.fixture(scope="module")
def state_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateStack]:
    root = tmp_path_factory.mktemp("state-e2e")
    with FakeGitLab() as gitlab:
        project = gitlab.add_project("acme/deployer")
        with serve_exchange_stack(
            root,
            policy,
            kind=StateStack,
            envoy=EnvoySpec("state-1", "state-envoy", flush_logs=True),
            gitlab=gitlab,
            gitlab_token=True,
            ready=None,  # the gateway, once the project is known
            state_dir=root / "state",
            serve_args=NO_SWEEP,
        ) as built:
            built.project = project
            job = gitlab.add_job(project)
            poll_until(lambda: built.get(built.credential(job)) == 200, 30, interval=0.1, message="gateway up")
            yield built


def test_a_job_that_ended_while_the_control_plane_was_down_is_revoked_on_start(state_stack: StateStack) -> None:
    job, unused = state_stack.gitlab.add_job(state_stack.project), state_stack.gitlab.add_job(state_stack.project)
    credential, never_used = state_stack.credential(job), state_stack.credential(unused)
    assert state_stack.get(credential) == 200  # seen at the gateway; `never_used` is known to the exchange only
    state_stack.controlplane.stop()
    for finished in (job, unused):
        state_stack.gitlab.set_job_status(finished, "success")  # GitLab's Job Hook is sent to nobody: it is lost
    started = time.monotonic()
    state_stack.controlplane.start()
    # Both are revoked by the start sweep, one after the other: each its own push, so poll for both.
    poll_until(
        lambda: state_stack.get(credential) == 403 and state_stack.get(never_used) == 403,
        20,
        interval=0.05,
        message="finished jobs revoked after restart",
    )
    elapsed = time.monotonic() - started
    # Counted once `revoke_finished` returned, after the deny list's write that follows the push.
    poll_until(
        lambda: state_stack.controlplane.metric("controlplane_job_recovery_revocations_total") == 2,
        5,
        message="both revocations counted",
    )
    print(f"restart -> job revoked at the gateway in {elapsed:.2f}s")
    running = state_stack.gitlab.add_job(state_stack.project, status="running")
    assert state_stack.get(state_stack.credential(running)) == 200  # a running job is asked about and left alone


def test_a_job_that_ended_while_the_control_plane_was_down_and_never_exchanged_gets_no_credential(
    state_stack: StateStack,
) -> None:
    """No sweep knows this job (no credential, never seen at a gateway), and the periodic sweep is minutes away:
    its token predates the restart, so the exchange asks GitLab before granting."""
    job = state_stack.gitlab.add_job(state_stack.project)
    subject = state_stack.subject(job)  # minted while the job ran
    state_stack.controlplane.stop()
    state_stack.gitlab.set_job_status(job, "success")  # the Job Hook is sent to nobody
    state_stack.restart()
    refused = state_stack.exchange(subject)
    assert refused.status == 400, f"exchange answered {refused.status}"
    assert refused.json()["error"] == "invalid_grant"
    assert "finished" in refused.json()["error_description"]
    assert "access_token" not in refused.json()
    assert state_stack.get(subject) != 200
    assert state_stack.controlplane.metric("controlplane_exchange_job_checks_total", result="finished") == 1
    running = state_stack.gitlab.add_job(state_stack.project)
    assert state_stack.get(state_stack.credential(running)) == 200


def test_a_raw_id_token_of_a_job_that_ended_while_the_control_plane_was_down_is_denied_within_seconds(
    state_stack: StateStack,
) -> None:
    """A raw-token backend: Envoy checks GitLab's signature and cannot ask GitLab. The job finished while the
    control plane was down and was never seen nor exchanged, so the start sweep did not know it and the periodic
    one is an hour away. Its first request reaches the control plane through the access log; its token predates
    the restart, so GitLab is asked at once and the job revoked fleet-wide. The first request may pass (Envoy
    decided before anyone could know)."""
    job = state_stack.gitlab.add_job(state_stack.project)
    token = state_stack.raw_token(job)  # minted while the job ran
    state_stack.controlplane.stop()
    state_stack.gitlab.set_job_status(job, "success")  # the Job Hook is sent to nobody
    state_stack.restart()
    statuses: list[int] = []

    def denied() -> bool:
        statuses.append(state_stack.get(token, "raw.local"))
        return statuses[-1] == 403

    first = time.monotonic()
    poll_until(denied, 2.0, interval=0.02, message="raw ID token of a finished job denied")
    elapsed = time.monotonic() - first
    assert set(statuses) <= {200, 403}, statuses
    # Counted once the check returns, after the deny list's write that follows the push: Envoy may deny first.
    poll_until(
        lambda: state_stack.controlplane.metric("controlplane_gateway_job_checks_total", result="finished") == 1,
        5,
        message="the gateway check counted as finished",
    )
    print(f"first raw request -> 403 in {elapsed:.2f}s ({statuses.count(200)} of {len(statuses)} passed)")
    running = state_stack.gitlab.add_job(state_stack.project)  # minted after the restart: never asked about
    assert state_stack.get(state_stack.raw_token(running), "raw.local") == 200


def test_a_job_hook_after_a_restart_revokes_credentials_even_when_id_tokens_are_not_denied(
    state_stack: StateStack,
) -> None:
    """With `--deny-id-tokens-for 0` a revocation lasts as long as the job's credentials: after a restart the
    exchange's in-memory index is empty, so their expiry must come from the state directory."""
    cp = state_stack.controlplane
    default_args = cp.extra_args
    cp.extra_args = (*default_args, "--deny-id-tokens-for", "0")
    try:
        state_stack.restart()
        job = state_stack.gitlab.add_job(state_stack.project)
        credential = state_stack.credential(job)
        assert state_stack.get(credential) == 200
        state_stack.restart()
        state_stack.job_finished(job, state_stack.project)
        poll_until(lambda: state_stack.get(credential) == 403, 5, interval=0.02, message="revoked after the restart")
    finally:
        cp.extra_args = default_args
        state_stack.restart()


def test_state_files_are_private(state_stack: StateStack) -> None:
    job = state_stack.gitlab.add_job(state_stack.project)
    state_stack.credential(job)
    state_stack.job_finished(job, state_stack.project)
    poll_until(lambda: (state_stack.state / "revoked-jobs.json").exists(), 10, message="deny list written")
    assert stat.S_IMODE(state_stack.state.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_stack.state.iterdir()}
    assert {"signing-keys.json", "revoked-jobs.json", "audit.sqlite3"} <= set(files)
    assert files == dict.fromkeys(files, 0o600)


def test_a_second_serve_on_the_same_state_dir_refuses_to_start(state_stack: StateStack) -> None:
    """Two serves on one state directory used to overwrite each other's revoked-jobs.json, losing revocations.
    Replicas share state through a database (issue 12), never one directory."""
    job = state_stack.gitlab.add_job(state_stack.project)
    state_stack.credential(job)
    state_stack.job_finished(job, state_stack.project)
    poll_until(lambda: job_in_deny_list(state_stack, job), 10, message="revocation written")
    second = ControlPlaneProcess(
        state_stack.state.parent / "policy",
        extra_args=("--state-dir", str(state_stack.state)),
        env={"GITLAB_TOKEN": state_stack.gitlab.api_token},
        log_path=state_stack.state.parent / "second.log",
    )
    try:
        second.start(wait_ready=False)
        poll_until(lambda: not second.running, 20, message="the second serve refuses to start")
    finally:
        code = second.stop()
    assert code == 3
    log, holder = second.log_text(), (state_stack.state / "lock").read_text().strip()
    assert f"state dir {state_stack.state} is in use by another controlplane serve (pid {holder})" in log, log[-2000:]
    assert job_in_deny_list(state_stack, job)  # the first serve's record is intact, and it still serves
    assert http_request(f"{state_stack.controlplane.admin_url}/readyz").status == 200


def job_in_deny_list(state_stack: StateStack, job: int) -> bool:
    path = state_stack.state / "revoked-jobs.json"
    return path.exists() and str(job) in json.loads(path.read_text())["revoked"]


def test_a_truncated_deny_list_stops_the_start_naming_the_file(state_stack: StateStack) -> None:
    """Run last in the module: it leaves the control plane stopped."""
    job = state_stack.gitlab.add_job(state_stack.project)
    credential = state_stack.credential(job)
    before = state_stack.revoked_jobs()
    state_stack.job_finished(job, state_stack.project)
    poll_until(lambda: state_stack.revoked_jobs() > before, 10, message="revoked")
    assert state_stack.get(credential) == 403 or poll_until(
        lambda: state_stack.get(credential) == 403, 5, message="denied"
    )
    state_stack.controlplane.stop()
    deny_list = state_stack.state / "revoked-jobs.json"
    deny_list.write_bytes(deny_list.read_bytes()[:10])  # what a crash of a non-atomic writer leaves
    log_size = len(state_stack.controlplane.log_text())
    state_stack.controlplane.start(wait_ready=False)
    poll_until(lambda: not state_stack.controlplane.running, 20, message="the control plane refuses to start")
    assert state_stack.controlplane.stop() == 3
    log = state_stack.controlplane.log_text()[log_size:]
    assert "refusing to start" in log and str(deny_list) in log and "not valid JSON" in log
    with pytest.raises(OSError):  # nothing serves: no admin port, no xDS
        http_request(f"{state_stack.controlplane.admin_url}/readyz", timeout=1.0)


def test_a_null_deny_list_stops_the_start_naming_the_file(state_stack: StateStack) -> None:
    """`null` used to read as "no deny list yet": the server became ready with every revocation forgotten."""
    state_stack.controlplane.stop()
    deny_list = state_stack.state / "revoked-jobs.json"
    deny_list.write_bytes(b"null")
    log_size = len(state_stack.controlplane.log_text())
    state_stack.controlplane.start(wait_ready=False)
    poll_until(lambda: not state_stack.controlplane.running, 20, message="the control plane refuses to start")
    assert state_stack.controlplane.stop() == 3
    log = state_stack.controlplane.log_text()[log_size:]
    assert f"refusing to start: {deny_list}: malformed: expected a JSON object, found null" in log, log[-2000:]
    assert deny_list.read_bytes() == b"null"
