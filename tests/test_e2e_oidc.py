"""A generic OIDC issuer (Okta-shaped) beside GitLab, on the real Envoy, plus shadow (dry-run) bindings."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from tests.support.fake_oidc import FakeOidc
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e


def policy(given: PolicyInputs, okta: FakeOidc) -> str:
    """One backend for CI jobs (GitLab) and for people in a group (Okta), plus a shadow binding."""
    return documents(
        issuer(given.issuer),
        issuer(okta.issuer, name="okta", kind="oidc", extra=f"jwks_uri: {okta.jwks_uri}"),
        backend("flags", given.ports["flags"], audience="api://flags"),
        role("flags-read", "flags"),
        binding("ci-reads-flags", ["flags-read"], "{project: 42, ref_protected: true}", extra="issuer: gitlab"),
        binding(
            "admins-read-flags",
            ["flags-read"],
            '{claims: {groups: platform-admins, email: "*@example.com"}}',
            extra="issuer: okta",
        ),
        binding(
            "any-protected-ref-dry-run",
            ["flags-read"],
            "{group: 7, ref_protected: true}",
            extra="issuer: gitlab\nmode: shadow",
        ),
        gateway(given.listen_port, ["flags"], name="internal", access_log=given.access_log),
    )


@dataclass
class OidcStack(Served):
    okta: FakeOidc | None = None

    def get(self, token: str | None) -> int:
        return self.call("flags.local", token, path="/flags/x")

    def log_entry(self, **match: str) -> dict[str, Any] | None:
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        for line in lines:
            entry = json.loads(line)
            if all(entry.get(k) == v for k, v in match.items()):
                return dict(entry)
        return None


@pytest.fixture(scope="module")
def oidc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcStack]:
    with (
        FakeOidc() as okta,
        serve_stack(
            tmp_path_factory.mktemp("oidc"),
            partial(policy, okta=okta),
            kind=OidcStack,
            envoy=EnvoySpec("oidc-1", "oidc-envoy", group="internal", flush_logs=True),
            backends=("flags",),
            ready=lambda built: built.get(None) == 401,
        ) as built,
    ):
        built.okta = okta
        yield built


def test_okta_group_member_is_allowed_and_others_are_not(oidc_stack: OidcStack) -> None:
    assert oidc_stack.get(oidc_stack.okta.mint(aud="api://flags", groups=["eng", "platform-admins"])) == 200
    as_string = oidc_stack.okta.mint(aud="api://flags", raw={"groups": "platform-admins"})  # a string, not a list
    assert oidc_stack.get(as_string) == 200
    assert oidc_stack.get(oidc_stack.okta.mint(aud="api://flags", groups=["eng"])) == 403
    assert (
        oidc_stack.get(oidc_stack.okta.mint(aud="api://flags", groups=["platform-admins"], email="x@evil.com")) == 403
    )
    assert oidc_stack.get(oidc_stack.okta.mint(aud="api://other", groups=["platform-admins"])) == 403


def test_gitlab_jobs_work_beside_the_idp(oidc_stack: OidcStack) -> None:
    assert oidc_stack.get(oidc_stack.gitlab.mint(aud="api://flags", project_id=42)) == 200
    assert oidc_stack.get(oidc_stack.gitlab.mint(aud="api://flags", project_id=43)) == 403


def test_claims_from_one_issuer_never_satisfy_another_issuers_binding(oidc_stack: OidcStack) -> None:
    """An IdP token dressed up with GitLab claims, and a GitLab token carrying the IdP's group claim."""
    forged_job = oidc_stack.okta.mint(aud="api://flags", project_id="42", ref_protected="true", pipeline_source="push")
    assert oidc_stack.get(forged_job) == 403
    forged_admin = oidc_stack.gitlab.mint(
        aud="api://flags", project_id=99, groups=["platform-admins"], email="a@example.com"
    )
    assert oidc_stack.get(forged_admin) == 403


def test_shadow_binding_is_logged_not_enforced(oidc_stack: OidcStack) -> None:
    token = oidc_stack.gitlab.mint(aud="api://flags", project_id=77, namespace_id=7, job_id=424242)
    assert oidc_stack.get(token) == 403  # shadow grants nothing
    entry = poll_until(lambda: oidc_stack.log_entry(job_id="424242"), 5, message="access log line")
    assert entry["rbac"]["flags_shadow_effective_policy_id"] == "any-protected-ref-dry-run/flags-read"
    assert entry["rbac"]["flags_shadow_engine_result"] == "allowed"
    assert entry["rbac_result"] == "denied"


def test_a_refused_token_is_logged_with_its_own_reason_beside_other_issuers(oidc_stack: OidcStack) -> None:
    """Three providers (controlplane, gitlab, okta): an expired GitLab token is logged as expired, not
    as the "issuer is not configured" of the providers after it."""
    now = int(time.time())
    expired = oidc_stack.gitlab.mint(aud="api://flags", project_id=42, job_id=424242, iat=now - 900, exp=now - 300)
    assert oidc_stack.get(expired) == 401

    def line() -> str | None:
        lines = oidc_stack.access_log.read_text().splitlines() if oidc_stack.access_log.exists() else []
        refused = [raw for raw in lines if json.loads(raw)["details"] == "jwt_authn_access_denied{Jwt_is_expired}"]
        return refused[-1] if refused else None

    raw = poll_until(line, 10, message="the expired token's access log line")
    assert "issuer is not configured" not in raw, raw
