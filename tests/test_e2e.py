"""End to end on the real Envoy: fake GitLab issuer → controlplane serve → Envoy → echo backends.

One stack per module (Envoy and the control plane take ~1 s to start); tests that change the policy
restore it before they finish. Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.bootstrap import render_bootstrap
from tests.support.backends import EchoBackend, HttpResponse, http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.envoy import EnvoyProcess
from tests.support.fake_gitlab import FakeGitLab
from tests.support.ports import LOOPBACK, free_port, poll_until

pytestmark = pytest.mark.e2e

DEPLOYER = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
OTHER = {"project_id": 43, "project_path": "acme/platform/other", "namespace_id": 11}

ISSUER = """\
kind: Issuer
name: gitlab
type: gitlab
url: {issuer}
inventory: inventory.yaml
"""
INVENTORY = """\
groups:
  - {{id: 10, path: acme}}
  - {{id: 11, path: acme/platform, parent_id: 10}}
projects:
  - {{id: 42, path: acme/platform/deployer, namespace_id: 11}}
  - {{id: 43, path: acme/platform/other, namespace_id: 11}}
"""
BACKENDS = """\
kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
endpoints: [{{address: 127.0.0.1, port: {reports_port}}}]
public_paths: [/healthz]
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
rules: [{{methods: [GET, HEAD], paths: ["/**"]}}]
---
kind: Role
name: deploy-trigger
backend: deploy-api
rules: [{{methods: [POST], paths: ["/deployments/**"]}}]
"""
BINDINGS = """\
kind: Binding
name: deployer-reads-reports
roles: [reports-read]
subjects:
  - project: acme/platform/deployer
    ref_protected: true
---
kind: Binding
name: deployer-deploys
roles: [deploy-trigger]
subjects:
  - project: acme/platform/deployer
    ref: main
    ref_type: branch
    ref_protected: true
    pipeline_source: push
"""
GATEWAY = """\
kind: Gateway
name: ci-gateway
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [reports-api, deploy-api]
access_log: {access_log}
"""
OTHER_PROJECT_BINDING = """\
kind: Binding
name: other-reads-reports
roles: [reports-read]
subjects:
  - project: 43
"""


@dataclass
class Stack:
    gitlab: FakeGitLab
    reports: EchoBackend
    deploy: EchoBackend
    policy: Path
    listen_port: int
    access_log: Path
    controlplane: ControlPlaneProcess
    envoy: EnvoyProcess

    def request(
        self,
        host: str,
        path: str,
        token: str | None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> HttpResponse:
        sent = {"Host": host, **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return http_request(f"http://{LOOPBACK}:{self.listen_port}{path}", method=method, headers=sent)

    def token(self, project: dict[str, Any] = DEPLOYER, aud: str = "https://reports.local", **claims: Any) -> str:
        return self.gitlab.mint(aud=aud, **{**project, **claims})

    def write(self, name: str, text: str) -> None:
        """Atomic, like an editor or a git checkout: the watcher never sees half a file."""
        tmp = self.policy / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.policy / name)

    def remove(self, name: str) -> None:
        (self.policy / name).unlink()

    def wait_status(self, host: str, path: str, token: str | None, expected: int, timeout: float = 10.0) -> float:
        started = time.monotonic()
        poll_until(
            lambda: self.request(host, path, token).status == expected,
            timeout,
            message=f"{host}{path} -> {expected}",
        )
        return time.monotonic() - started


def _write_policy(root: Path, **values: Any) -> None:
    for name, template in (
        ("issuer.yaml", ISSUER),
        ("inventory.yaml", INVENTORY),
        ("backends.yaml", BACKENDS),
        ("bindings.yaml", BINDINGS),
        ("gateway.yaml", GATEWAY),
    ):
        (root / name).write_text(template.format(**values))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    policy = root / "policy"
    policy.mkdir()
    listen_port = free_port()
    access_log = root / "access.log"
    with FakeGitLab() as gitlab, EchoBackend("reports") as reports, EchoBackend("deploy") as deploy:
        _write_policy(
            policy,
            issuer=gitlab.issuer,
            reports_port=reports.port,
            deploy_port=deploy.port,
            listen_port=listen_port,
            access_log=access_log,
        )
        with ControlPlaneProcess(policy, log_path=root / "controlplane.log") as controlplane:
            bootstrap = render_bootstrap(
                group="ci-gateway", node_id="e2e-envoy-1", xds_host=LOOPBACK, xds_port=controlplane.xds_port
            )
            # Envoy flushes file access logs every 10 s by default; the audit test reads them at once.
            with EnvoyProcess(bootstrap, name="e2e-envoy", extra_args=("--file-flush-interval-msec", "20")) as envoy:
                built = Stack(gitlab, reports, deploy, policy, listen_port, access_log, controlplane, envoy)
                built.wait_status("reports.local", "/healthz", None, 200, timeout=20)
                yield built


# --- the decision matrix -------------------------------------------------------------------------


def test_allowed_job_reaches_backend_with_its_identity_but_not_its_token(stack: Stack) -> None:
    response = stack.request("reports.local", "/reports/7", stack.token(job_id=555), headers={"x-ci-project-id": "999"})
    assert response.status == 200, response.text
    seen = response.json()["headers"]
    assert "authorization" not in seen
    assert seen["x-ci-project-id"] == "42"  # the forged header was replaced, not appended
    assert seen["x-ci-project-path"] == "acme/platform/deployer"
    assert seen["x-ci-job-id"] == "555"
    assert seen["x-ci-ref"] == "main"


def test_deploy_from_protected_main_on_push_is_allowed(stack: Stack) -> None:
    token = stack.token(aud="https://deploy.local")
    assert stack.request("deploy.local", "/deployments/prod", token, method="POST").status == 200


@pytest.mark.parametrize(
    ("case", "host", "method", "path", "claims"),
    [
        ("wrong project", "reports.local", "GET", "/r", {"project": OTHER}),
        ("wrong branch", "deploy.local", "POST", "/deployments/x", {"ref": "feature-x"}),
        ("tag, not branch", "deploy.local", "POST", "/deployments/x", {"ref_type": "tag"}),
        ("unprotected ref", "reports.local", "GET", "/r", {"ref_protected": False}),
        ("read-only role doing POST", "reports.local", "POST", "/r", {}),
        ("path outside the role", "deploy.local", "POST", "/admin", {}),
        ("merge-request pipeline", "reports.local", "GET", "/r", {"pipeline_source": "merge_request_event"}),
        (
            "merge-request pipeline on deploy",
            "deploy.local",
            "POST",
            "/deployments/x",
            {"pipeline_source": "merge_request_event"},
        ),
        ("web pipeline on deploy", "deploy.local", "POST", "/deployments/x", {"pipeline_source": "web"}),
        ("project id as a number", "reports.local", "GET", "/r", {"raw": {"project_id": 42}}),
    ],
)
def test_policy_denials_are_403(
    stack: Stack, case: str, host: str, method: str, path: str, claims: dict[str, Any]
) -> None:
    aud = f"https://{host}"
    claims = dict(claims)  # parametrize shares this dict across runs (and modules that import this test)
    project = claims.pop("project", DEPLOYER)
    token = stack.token(project, aud=aud, **claims)
    response = stack.request(host, path, token, method=method)
    assert response.status == 403, f"{case}: {response.status} {response.text}"
    assert response.text == "RBAC: access denied"


def test_authentication_failures_are_401(stack: Stack) -> None:
    now = int(time.time())
    expired = stack.token(iat=now - 900, exp=now - 300)
    forged = stack.token(key=stack.gitlab.rogue, kid=stack.gitlab.signing_key.kid)
    for name, token in (
        ("expired", expired),
        ("bad signature", forged),
        ("missing", None),
        ("garbage", "not.a.jwt"),
    ):
        response = stack.request("reports.local", "/r", token)
        assert response.status == 401, f"{name}: {response.status} {response.text}"
    assert stack.request("reports.local", "/r", "x", headers={"Authorization": "bearer " + stack.token()}).status == 401


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


def test_policy_change_is_enforced_without_restarting_envoy(stack: Stack) -> None:
    token = stack.token(OTHER)
    assert stack.request("reports.local", "/r", token).status == 403
    pid = stack.envoy.pid
    stack.write("other.yaml", OTHER_PROJECT_BINDING)
    try:
        stack.wait_status("reports.local", "/r", token, 200)
    finally:
        stack.remove("other.yaml")
    stack.wait_status("reports.local", "/r", token, 403)
    assert stack.envoy.pid == pid


EXTRA_BACKEND = """\
kind: Backend
name: extra-api
hosts: [extra.local]
endpoints: [{{address: 127.0.0.1, port: {port}}}]
---
kind: Role
name: extra-read
backend: extra-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: deployer-reads-extra
roles: [extra-read]
subjects:
  - project: 42
"""


def _envoy_clusters(stack: Stack) -> set[str]:
    status, text = stack.envoy.admin_get("/clusters?format=json")
    assert status == 200
    return {c["name"] for c in json.loads(text)["cluster_statuses"]}


def test_a_new_backend_is_added_and_removed_without_a_gap(stack: Stack) -> None:
    """CDS + EDS + LDS + RDS change together; removal keeps the cluster until the route is gone."""
    gateway = (stack.policy / "gateway.yaml").read_text()
    token = stack.token(aud="https://extra.local")
    with EchoBackend("extra") as extra:
        stack.write("extra.yaml", EXTRA_BACKEND.format(port=extra.port))
        stack.write(
            "gateway.yaml",
            gateway.replace("backends: [reports-api, deploy-api]", "backends: [reports-api, deploy-api, extra-api]"),
        )
        try:
            stack.wait_status("extra.local", "/x", token, 200)
            assert "backend-extra-api" in _envoy_clusters(stack)
            assert stack.request("extra.local", "/x", token).json()["backend"] == "extra"
        finally:
            stack.write("gateway.yaml", gateway)
            stack.remove("extra.yaml")
        stack.wait_status("extra.local", "/x", token, 403)
        poll_until(lambda: "backend-extra-api" not in _envoy_clusters(stack), 10, message="cluster removed")
    assert stack.request("reports.local", "/r", stack.token()).status == 200


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


def _proxy(stack: Stack) -> dict[str, Any] | None:
    proxies = stack.controlplane.status()["proxies"]
    return next((p for p in proxies if p["node"] == "e2e-envoy-1"), None)


def test_status_lists_the_proxy_with_acked_versions(stack: Stack) -> None:
    proxy = poll_until(lambda: _proxy(stack), 10, message="proxy in status")
    versions = stack.controlplane.status()["policy"]["snapshot_versions"]
    assert proxy["group"] == "ci-gateway" and "ci-gateway" in versions
    assert set(proxy["acked"]) >= {"cds", "eds", "lds", "rds"}
    assert stack.controlplane.metric("controlplane_xds_connected_proxies", group="ci-gateway") == 1


def test_restart_envoy_keeps_serving_and_nothing_is_repushed(stack: Stack) -> None:
    updates = ("cluster_manager.cds.update_success", "listener_manager.lds.update_success")
    before = {k: stack.envoy.stats().get(k) for k in updates}
    stack.controlplane.stop()
    try:
        assert stack.request("reports.local", "/r", stack.token()).status == 200  # data plane unaffected
        assert stack.request("reports.local", "/r", stack.token(OTHER)).status == 403
    finally:
        stack.controlplane.start()
    poll_until(lambda: _proxy(stack), 15, message="Envoy reconnected")
    poll_until(lambda: stack.envoy.stats().get("control_plane.connected_state") == 1, 15, message="connected")
    assert stack.controlplane.metric("controlplane_xds_pushes_total", type="cds") == 0
    assert stack.controlplane.metric("controlplane_xds_pushes_total", type="lds") == 0
    assert {k: stack.envoy.stats().get(k) for k in updates} == before
    assert stack.request("reports.local", "/r", stack.token()).status == 200


def test_a_nacked_version_is_not_resent(stack: Stack) -> None:
    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen()
    gateway = (stack.policy / "gateway.yaml").read_text()
    lds_pushes = stack.controlplane.metric("controlplane_xds_pushes_total", type="lds")
    try:
        stack.write("gateway.yaml", gateway.replace(f"port: {stack.listen_port}", f"port: {blocker.getsockname()[1]}"))
        proxy = poll_until(lambda: (p := _proxy(stack)) and p["last_nack"] and p, 10, message="NACK recorded")
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
    poll_until(lambda: (p := _proxy(stack)) and p["acked"].get("lds") == _lds_version(stack), 10, message="LDS ACKed")
    stack.wait_status("reports.local", "/r", stack.token(OTHER), 403)


def _lds_version(stack: Stack) -> str | None:
    proxy = _proxy(stack)
    return None if proxy is None else proxy["acked"].get("lds")
