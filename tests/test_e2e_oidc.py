"""A generic OIDC issuer (Okta-shaped) beside GitLab, on the real Envoy, plus shadow (dry-run) bindings."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import EchoBackend, http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.fake_gitlab import FakeGitLab
from tests.support.fake_oidc import FakeOidc
from tests.support.gateway import gateway_envoy
from tests.support.ports import LOOPBACK, free_port, poll_until

pytestmark = pytest.mark.e2e

POLICY = """\
kind: Issuer
name: gitlab
type: gitlab
url: {gitlab}
---
kind: Issuer
name: okta
type: oidc
url: {okta}
jwks_uri: {okta_jwks}
---
kind: Backend
name: flags
hosts: [flags.local]
audience: api://flags
endpoints: [{{address: 127.0.0.1, port: {backend_port}}}]
---
kind: Role
name: flags-read
backend: flags
rules: [{{methods: [GET]}}]
---
kind: Binding
name: ci-reads-flags
issuer: gitlab
roles: [flags-read]
subjects:
  - project: 42
    ref_protected: true
---
kind: Binding
name: admins-read-flags
issuer: okta
roles: [flags-read]
subjects:
  - claims:
      groups: platform-admins
      email: "*@example.com"
---
kind: Binding
name: any-protected-ref-dry-run
issuer: gitlab
mode: shadow
roles: [flags-read]
subjects:
  - group: 7
    ref_protected: true
---
kind: Gateway
name: internal
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [flags]
access_log: {access_log}
"""


class Stack:
    def __init__(self, gitlab: FakeGitLab, okta: FakeOidc, listen_port: int, access_log: Path) -> None:
        self.gitlab, self.okta, self.listen_port, self.access_log = gitlab, okta, listen_port, access_log

    def get(self, token: str | None) -> int:
        headers = {"Host": "flags.local"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return http_request(f"http://{LOOPBACK}:{self.listen_port}/flags/x", headers=headers).status

    def log_entry(self, **match: str) -> dict[str, Any] | None:
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        for line in lines:
            entry = json.loads(line)
            if all(entry.get(k) == v for k, v in match.items()):
                return dict(entry)
        return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("oidc")
    policy = root / "policy"
    policy.mkdir()
    with FakeGitLab() as gitlab, FakeOidc() as okta, EchoBackend("flags") as backend:
        listen_port = free_port()
        (policy / "policy.yaml").write_text(
            POLICY.format(
                gitlab=gitlab.issuer,
                okta=okta.issuer,
                okta_jwks=okta.jwks_uri,
                backend_port=backend.port,
                listen_port=listen_port,
                access_log=root / "access.log",
            )
        )
        with (
            ControlPlaneProcess(policy, log_path=root / "controlplane.log") as cp,
            gateway_envoy(cp.xds_port, group="internal", node="oidc-1", name="oidc-envoy", flush_logs=True),
        ):
            built = Stack(gitlab, okta, listen_port, root / "access.log")
            poll_until(lambda: built.get(None) == 401, 20, message="listener up")
            yield built


def test_okta_group_member_is_allowed_and_others_are_not(stack: Stack) -> None:
    assert stack.get(stack.okta.mint(aud="api://flags", groups=["eng", "platform-admins"])) == 200
    as_string = stack.okta.mint(aud="api://flags", raw={"groups": "platform-admins"})  # a string, not a list
    assert stack.get(as_string) == 200
    assert stack.get(stack.okta.mint(aud="api://flags", groups=["eng"])) == 403
    assert stack.get(stack.okta.mint(aud="api://flags", groups=["platform-admins"], email="x@evil.com")) == 403
    assert stack.get(stack.okta.mint(aud="api://other", groups=["platform-admins"])) == 403


def test_gitlab_jobs_work_beside_the_idp(stack: Stack) -> None:
    assert stack.get(stack.gitlab.mint(aud="api://flags", project_id=42)) == 200
    assert stack.get(stack.gitlab.mint(aud="api://flags", project_id=43)) == 403


def test_claims_from_one_issuer_never_satisfy_another_issuers_binding(stack: Stack) -> None:
    """An IdP token dressed up with GitLab claims, and a GitLab token carrying the IdP's group claim."""
    forged_job = stack.okta.mint(aud="api://flags", project_id="42", ref_protected="true", pipeline_source="push")
    assert stack.get(forged_job) == 403
    forged_admin = stack.gitlab.mint(
        aud="api://flags", project_id=99, groups=["platform-admins"], email="a@example.com"
    )
    assert stack.get(forged_admin) == 403


def test_shadow_binding_is_logged_not_enforced(stack: Stack) -> None:
    token = stack.gitlab.mint(aud="api://flags", project_id=77, namespace_id=7, job_id=424242)
    assert stack.get(token) == 403  # shadow grants nothing
    entry = poll_until(lambda: stack.log_entry(job_id="424242"), 5, message="access log line")
    assert entry["rbac"]["flags_shadow_effective_policy_id"] == "any-protected-ref-dry-run/flags-read"
    assert entry["rbac"]["flags_shadow_engine_result"] == "allowed"
    assert entry["rbac_result"] == "denied"


def test_a_refused_token_is_logged_with_its_own_reason_beside_other_issuers(stack: Stack) -> None:
    """Three providers (controlplane, gitlab, okta): an expired GitLab token is logged as expired, not
    as the "issuer is not configured" of the providers after it."""
    now = int(time.time())
    expired = stack.gitlab.mint(aud="api://flags", project_id=42, job_id=424242, iat=now - 900, exp=now - 300)
    assert stack.get(expired) == 401

    def line() -> str | None:
        lines = stack.access_log.read_text().splitlines() if stack.access_log.exists() else []
        refused = [raw for raw in lines if json.loads(raw)["details"] == "jwt_authn_access_denied{Jwt_is_expired}"]
        return refused[-1] if refused else None

    raw = poll_until(line, 10, message="the expired token's access log line")
    assert "issuer is not configured" not in raw, raw
