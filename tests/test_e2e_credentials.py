"""Job-scoped credentials end to end on the real Envoy, through `controlplane serve`:
token exchange through the gateway, scoping, expiry, replay limit, revocation when the job ends, signing-key
rotation under continuous traffic, and the audit trail by job.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import LOOPBACK, poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_exchange_stack

pytestmark = pytest.mark.e2e

KEY_ROTATION = 3  # seconds: several rotations happen while the rotation test runs


def policy(given: PolicyInputs) -> str:
    """Exchanged credentials for reports (a 10-minute TTL), raw ID tokens for deploy."""
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        backend("deploy-api", given.ports["deploy"]),
        role("reports-read", "reports-api", ["GET"]),
        role("deploy-trigger", "deploy-api", ["POST"]),
        binding(
            "deployer-reads-reports",
            ["reports-read"],
            "{project: 42, ref_protected: true}",
            extra=TTL_10M,
        ),
        gateway(given.listen_port, ["reports-api", "deploy-api"]),
    )


@pytest.fixture(scope="module")
def credentials_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("credentials")
    with serve_exchange_stack(
        root,
        policy,
        kind=Served,
        envoy=EnvoySpec("cred-1", "credentials-envoy", flush_logs=True),
        backends=("reports", "deploy"),
        state_dir=root / "state",
        serve_args=("--key-rotation", str(KEY_ROTATION)),
    ) as built:
        yield built


def test_exchanged_credential_opens_its_backend_only(credentials_stack: Served) -> None:
    credential = credentials_stack.credential(101)
    assert credentials_stack.call("reports.local", credential) == 200
    assert credentials_stack.call("reports.local", credential, method="POST") == 403  # role is read-only
    assert credentials_stack.call("deploy.local", credential, method="POST") == 403  # audience/role of another backend
    assert credentials_stack.call("reports.local", credentials_stack.subject(101)) in (
        401,
        403,
    )  # raw ID tokens refused: exchanged only


def test_exchange_refusals_follow_rfc_8693(credentials_stack: Served) -> None:
    assert credentials_stack.exchange(credentials_stack.subject(102, project_id=43)).json()["error"] == "invalid_scope"
    assert (
        credentials_stack.exchange(credentials_stack.subject(102), audience="nope").json()["error"] == "invalid_target"
    )
    assert (
        credentials_stack.exchange(credentials_stack.subject(102, key=credentials_stack.gitlab.rogue)).json()["error"]
        == "invalid_grant"
    )
    refused = credentials_stack.exchange("not-a-token")
    assert refused.status == 400 and "not-a-token" not in refused.text


def test_a_subject_token_is_exchanged_a_bounded_number_of_times(credentials_stack: Served) -> None:
    subject = credentials_stack.subject(103)
    results = [credentials_stack.exchange(subject).status for _ in range(5)]
    assert results[0] == 200 and results[-1] == 400 and results.count(200) <= 3


def test_an_expired_credential_is_401(credentials_stack: Served) -> None:
    credential = credentials_stack.credential(104, requested_token_lifetime="1")
    assert credentials_stack.call("reports.local", credential) == 200
    poll_until(
        lambda: credentials_stack.call("reports.local", credential) == 401, 40, interval=0.2, message="expired → 401"
    )


def test_job_finished_webhook_denies_within_a_second(credentials_stack: Served) -> None:
    credential = credentials_stack.credential(105)
    assert credentials_stack.call("reports.local", credential) == 200
    started = time.monotonic()
    credentials_stack.job_finished(105)
    poll_until(lambda: credentials_stack.call("reports.local", credential) == 403, 5, interval=0.01, message="revoked")
    assert time.monotonic() - started < 1.0
    assert credentials_stack.call("reports.local", credentials_stack.credential(106)) == 200  # other jobs unaffected


def test_rotation_under_continuous_traffic_rejects_nothing(credentials_stack: Served) -> None:
    failures: list[int] = []
    stop = threading.Event()
    credentials = [credentials_stack.credential(200)]

    def traffic() -> None:
        while not stop.is_set():
            status = credentials_stack.call("reports.local", credentials[-1])
            if status != 200:
                failures.append(status)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        deadline = time.monotonic() + KEY_ROTATION * 3
        while time.monotonic() < deadline:  # new credentials signed by each new key, old ones still in use
            credentials.append(credentials_stack.credential(200 + len(credentials)))
            stop.wait(0.5)
    finally:
        stop.set()
        worker.join()
    kids = {json.loads(_b64(c.split(".")[0]))["kid"] for c in credentials}
    assert len(kids) >= 2, "no rotation happened during the test"
    assert failures == []
    assert all(credentials_stack.call("reports.local", c) == 200 for c in credentials)


JWT_RELOADS = "extension_config_discovery.http_filter.envoy.filters.http.jwt_authn.config_reload"
LISTENER_STATS = ("listener_manager.listener_modified", "listener_manager.total_filter_chains_draining")


def test_rotation_changes_no_listener_and_drains_no_connection(credentials_stack: Served) -> None:
    """jwt_authn comes by ECDS: each rotation re-sends its configuration, never the listener, so Envoy drains
    nothing and a keep-alive connection opened before the rotations carries requests after them."""
    envoy, credential = credentials_stack.envoy, credentials_stack.credential(300)
    before = envoy.stats()
    connection = http.client.HTTPConnection(LOOPBACK, credentials_stack.listen_port, timeout=5)
    headers = {"Host": "reports.local", "Authorization": f"Bearer {credential}"}

    def status() -> int:
        connection.request("GET", "/r", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status

    try:
        assert status() == 200
        local = connection.sock.getsockname()
        statuses: list[int] = []

        def reloaded_twice() -> bool:
            statuses.append(status())
            return envoy.stats(JWT_RELOADS).get(JWT_RELOADS, 0) >= before[JWT_RELOADS] + 2

        poll_until(reloaded_twice, KEY_ROTATION * 5, interval=0.05, message="two key rotations reached Envoy")
        assert set(statuses) == {200}
        assert connection.sock.getsockname() == local  # the same connection throughout
    finally:
        connection.close()
    after = envoy.stats()
    assert {s: after[s] for s in LISTENER_STATS} == {s: before[s] for s in LISTENER_STATS}
    assert after["listener_manager.total_filter_chains_draining"] == 0
    assert after["extension_config_discovery.http_filter.envoy.filters.http.jwt_authn.update_rejected"] == 0


def test_audit_returns_exactly_the_requests_a_job_made(credentials_stack: Served) -> None:
    mine, other = credentials_stack.credential(301), credentials_stack.credential(302)
    for path in ("/a?secret=x", "/b"):
        assert credentials_stack.call("reports.local", mine, path=path) == 200
    assert credentials_stack.call("reports.local", other, path="/c") == 200
    assert credentials_stack.call("reports.local", mine, method="POST", path="/d") == 403

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
                str(credentials_stack.controlplane.state_dir / "audit.sqlite3"),
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
