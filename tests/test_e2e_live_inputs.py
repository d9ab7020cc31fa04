"""Live inputs keep flowing while the policy cannot compile, end to end: fake GitLab (REST API, webhooks, JWKS) →
controlplane serve reading its policy from a GitLab project → real Envoy.

"The server keeps the last good config" means the last good *policy*: a broken policy commit, or GitLab making
the policy in service invalid (a path taken over by another project), must not hold back a relayed issuer's
withdrawn key. The control plane re-reads GitLab's JWKS every second; every wait polls with a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.fake_gitlab import FakeGitLab
from tests.support.gitlab_hooks import deliver, project_system_hook
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import DeployerStack, EnvoySpec, PolicyInputs, serve_stack

pytestmark = pytest.mark.e2e

DEPLOYER = "acme/platform/deployer"


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer, extra="api:\n  token_env: GITLAB_TOKEN\n  reconcile: 10s"),
        backend("reports-api", given.ports["reports"]),
        role("reports-read", "reports-api"),
        binding("deployer-reads-reports", ["reports-read"], f"{{project: {DEPLOYER}}}"),
        gateway(given.listen_port, ["reports-api"]),
    )


@dataclass
class LiveStack(DeployerStack):
    def policy_errors(self) -> list[str]:
        return list(self.controlplane.status()["policy"]["errors"])


@pytest.fixture
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    with FakeGitLab() as gitlab:
        deployer = gitlab.add_project(DEPLOYER, branches=["main"])
        with serve_stack(
            tmp_path_factory.mktemp("live-inputs"),
            policy,
            kind=LiveStack,
            envoy=EnvoySpec("live-1", "live-inputs-envoy"),
            gitlab=gitlab,
            policy_project="infra/ci-access",
            serve_args=("--policy-poll", "3600", "--jwks-refresh", "1"),
            webhook=True,
        ) as built:
            built.deployer = deployer
            built.wait_get(200, timeout=20)
            yield built


def test_a_key_withdrawn_while_the_policy_cannot_compile_is_refused_within_seconds(live_stack: LiveStack) -> None:
    gitlab = live_stack.gitlab
    old_key = gitlab.signing_key
    new_key = gitlab.rotate_key(keep_old=True)  # GitLab publishes the new key beside the old one
    live_stack.wait_get(200)  # signed with the new key: relayed
    assert live_stack.get(key=old_key) == 200

    # A broken policy commit: rejected, the last good policy stays in service.
    text = (live_stack.policy / "policy.yaml").read_text()
    project = live_stack.policy_project
    assert project is not None
    sha = gitlab.commit(project, {"policy.yaml": text.replace("[reports-read]", "[nope]")})
    verdict = poll_until(lambda: gitlab.statuses(project, sha), 10, message="the broken commit's verdict")
    assert verdict[-1]["status"] == "failed"

    # And GitLab now makes the policy in service invalid too: its path is taken over by another project.
    gitlab.rename_project(live_stack.deployer, "deployer-old")
    impostor = gitlab.add_project(DEPLOYER)
    deliver(live_stack.hook, "System Hook", project_system_hook("project_create", impostor, DEPLOYER))
    poll_until(
        lambda: any("now belongs to project" in e for e in live_stack.policy_errors()), 10, message="re-use refused"
    )

    gitlab.publish([new_key])  # GitLab withdraws the old key
    withdrawn = live_stack.wait_get(401, timeout=10, key=old_key)
    print(f"key withdrawn while the policy cannot compile → refused in {withdrawn:.3f}s")
    assert withdrawn < 5

    # The last good policy is still what Envoy enforces, and both errors are still reported.
    assert live_stack.get(project_path=f"{DEPLOYER}-old") == 200  # bound by the last good resolution (id)
    assert live_stack.get(project_id=impostor, project_path=DEPLOYER) == 403  # never rebound
    errors = live_stack.policy_errors()
    assert any("now belongs to project" in e for e in errors), errors
    assert any("nope" in e for e in errors), errors
