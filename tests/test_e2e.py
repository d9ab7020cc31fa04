"""End to end on the real Envoy: fake GitLab issuer → controlplane serve → Envoy → echo backends.

One stack per module (the `stack` fixture of tests/conftest.py; Envoy speaks SotW here), as Envoy and the
control plane take ~1 s to start; tests that change the policy restore it before they finish. Every wait
polls with a deadline. What must hold on both xDS protocols is in test_e2e_protocols.py.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.support.ports import LOOPBACK, poll_until
from tests.support.stack import OTHER, OTHER_PROJECT_BINDING, Stack

pytestmark = pytest.mark.e2e


# --- the decision matrix -------------------------------------------------------------------------


def test_deploy_from_protected_main_on_push_is_allowed(stack: Stack) -> None:
    token = stack.token(aud="https://deploy.local")
    assert stack.request("deploy.local", "/deployments/prod", token, method="POST").status == 200


def test_wrong_audience_is_rejected(stack: Stack) -> None:
    response = stack.request("reports.local", "/r", stack.token(aud="https://deploy.local"))
    assert response.status == 403
    assert "Audiences in Jwt are not allowed" in response.text


def test_public_path_needs_no_token_and_unknown_hosts_are_denied(stack: Stack) -> None:
    assert stack.request("reports.local", "/healthz", None).status == 200
    assert stack.request("unknown.local", "/", None).status == 401
    assert stack.request("unknown.local", "/", stack.token()).status == 403


def test_public_path_never_forwards_the_jobs_token(stack: Stack) -> None:
    """jwt_authn is off on a public path, so its `forward: false` does not apply there: the route removes it."""
    token = stack.token()
    response = stack.request("reports.local", "/healthz", token, headers={"x-ci-job-id": "1"})
    assert response.status == 200, response.text
    seen = response.json()["headers"]
    assert "authorization" not in seen
    assert "x-ci-job-id" not in seen  # no verified token there: a forged identity is removed, none added
    assert all(token not in value for value in seen.values())


def test_access_log_maps_the_request_to_its_job_and_policy(stack: Stack) -> None:
    token = stack.token(job_id=987654, pipeline_id=4321)
    assert stack.request("reports.local", "/audit-me", token).status == 200

    def line() -> dict[str, Any] | None:
        for raw in stack.access_log.read_text().splitlines() if stack.access_log.exists() else []:
            entry = json.loads(raw)
            if entry.get("job_id") == "987654":
                return dict(entry)
        return None

    entry = poll_until(line, 10, message=f"access log line for job 987654 in {stack.access_log}")
    expected = {"project_id": "42", "pipeline_id": "4321", "ref": "main", "path": "/audit-me", "rbac_result": "allowed"}
    assert {k: entry.get(k) for k in expected} == expected, entry
    assert entry["rbac_policy"] == "deployer-reads-reports/reports-read", entry
    assert "issuer is not configured" not in json.dumps(entry), entry  # accepted: no failure to report
    assert token not in stack.access_log.read_text()


def test_access_log_reports_a_token_failure_only_when_the_token_failed(stack: Stack) -> None:
    """jwt_authn tries every provider of a requirement (requires_any: each issuer, the control plane's
    credentials); those whose issuer is not the token's report "Jwt issuer is not configured" even when
    another accepts it. The reason a token was refused is in `details`, as Envoy answered."""
    now = int(time.time())
    expired = stack.token(job_id=987655, iat=now - 900, exp=now - 300)
    assert stack.request("reports.local", "/expired-one", expired).status == 401
    assert stack.request("reports.local", "/accepted-one", stack.token(job_id=987656)).status == 200

    def lines() -> dict[str, str] | None:
        found = {}
        for raw in stack.access_log.read_text().splitlines() if stack.access_log.exists() else []:
            path = json.loads(raw).get("path")
            if path in ("/expired-one", "/accepted-one"):
                found[path] = raw
        return found if len(found) == 2 else None

    found = poll_until(lines, 10, message="both access log lines")
    assert json.loads(found["/expired-one"])["details"] == "jwt_authn_access_denied{Jwt_is_expired}", found
    assert json.loads(found["/accepted-one"])["details"] == "via_upstream", found
    assert not any("issuer is not configured" in line for line in found.values()), found


def test_validate_prints_the_versions_serve_serves(stack: Stack) -> None:
    """Same policy dir, same state dir and exchange flags: validate's versions are the ones served."""
    cp = stack.controlplane
    result = subprocess.run(
        [
            sys.executable, "-m", "controlplane", "validate", str(stack.policy),
            "--state-dir", str(cp.state_dir), "--exchange-address", f"{LOOPBACK}:{cp.exchange_port}",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = dict(re.findall(r"^  gateway (\S+): version (\S+)$", result.stdout, re.MULTILINE))
    assert printed == cp.status()["policy"]["snapshot_versions"], result.stdout
    assert "note:" not in result.stdout, result.stdout


# --- living with change --------------------------------------------------------------------------


def test_invalid_policy_change_keeps_the_previous_policy(stack: Stack) -> None:
    before = stack.controlplane.status()["policy"]["snapshot_versions"]
    good = (stack.policy / "bindings.yaml").read_text()
    broken = good.replace("ref_protected: true", "ref_protected: maybe", 1)
    stack.write("bindings.yaml", broken)
    try:
        status = poll_until(lambda: (s := stack.controlplane.status())["policy"]["errors"] and s, 10, message="errors")
        assert any("bindings.yaml:" in e and "ref_protected" in e for e in status["policy"]["errors"])
        assert status["policy"]["snapshot_versions"] == before
        assert stack.controlplane.metric("controlplane_policy_errors") >= 1
        assert stack.request("reports.local", "/r", stack.token()).status == 200
        assert stack.request("reports.local", "/r", stack.token(ref_protected=False)).status == 403
    finally:
        stack.write("bindings.yaml", good)
    poll_until(lambda: not stack.controlplane.status()["policy"]["errors"], 10, message="errors cleared")
    assert stack.controlplane.metric("controlplane_policy_errors") == 0


def test_status_lists_the_proxy_with_acked_versions(stack: Stack) -> None:
    proxy = poll_until(stack.proxy, 10, message="proxy in status")
    versions = stack.controlplane.status()["policy"]["snapshot_versions"]
    assert proxy["group"] == "ci-gateway" and "ci-gateway" in versions
    assert set(proxy["acked"]) >= {"cds", "eds", "lds", "rds"}
    assert stack.controlplane.metric("controlplane_xds_connected_proxies", group="ci-gateway") == 1


def test_a_nacked_version_is_not_resent(stack: Stack) -> None:
    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen()
    gateway = (stack.policy / "gateway.yaml").read_text()
    lds_pushes = stack.controlplane.metric("controlplane_xds_pushes_total", type="lds")
    try:
        stack.write("gateway.yaml", gateway.replace(f"port: {stack.listen_port}", f"port: {blocker.getsockname()[1]}"))
        proxy = poll_until(lambda: (p := stack.proxy()) and p["last_nack"] and p, 10, message="NACK recorded")
        assert proxy["last_nack"]["type"] == "lds"
        assert stack.controlplane.metric("controlplane_xds_nacks_total", type="lds") >= 1
        nacked_pushes = stack.controlplane.metric("controlplane_xds_pushes_total", type="lds")
        assert nacked_pushes == lds_pushes + 1
        # A later change to routes only is pushed; the rejected listener is not sent again with it.
        stack.write("other.yaml", OTHER_PROJECT_BINDING)
        stack.wait_status("reports.local", "/r", stack.token(OTHER), 200)
        assert stack.controlplane.metric("controlplane_xds_pushes_total", type="lds") == nacked_pushes
        assert stack.request("reports.local", "/r", stack.token()).status == 200  # old listener still serves
    finally:
        stack.remove("other.yaml") if (stack.policy / "other.yaml").exists() else None
        stack.write("gateway.yaml", gateway)
        blocker.close()
    poll_until(lambda: (p := stack.proxy()) and p["acked"].get("lds") == _lds_version(stack), 10, message="LDS ACKed")
    stack.wait_status("reports.local", "/r", stack.token(OTHER), 403)


def _lds_version(stack: Stack) -> str | None:
    proxy = stack.proxy()
    return None if proxy is None else proxy["acked"].get("lds")
