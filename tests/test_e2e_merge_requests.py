"""Serve's `controlplane` commit status on merge requests' heads, end to end: fake GitLab → controlplane serve
reading its policy from a GitLab project → real Envoy. An MR's head gets its verdict before the merge, woken by
the push webhook of the MR's branch, and is never served: Envoy keeps enforcing the default branch's policy
whatever the MR says."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.runtime.merge_request_statuses import MAX_UNWATCHED
from tests.support.fake_gitlab import FakeGitLab
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import DeployerStack, EnvoySpec, PolicyInputs, serve_stack

pytestmark = pytest.mark.e2e

POLL = 3600  # no round but the first while the module runs: each verdict is woken by a push webhook


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer, extra="api:\n  token_env: GITLAB_TOKEN\n  reconcile: 10s"),
        backend("reports-api", given.ports["reports"]),
        role("reports-read", "reports-api"),
        binding("deployer-reads-reports", ["reports-read"], "{project: acme/platform/deployer, ref_protected: true}"),
        gateway(given.listen_port, ["reports-api"]),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployerStack]:
    with FakeGitLab() as gitlab:
        deployer = gitlab.add_project("acme/platform/deployer", branches=["main", "feature"])
        gitlab.add_project("acme/web/frontend")  # in GitLab, named by no served policy: not watched
        with serve_stack(
            tmp_path_factory.mktemp("mr-e2e"),
            policy,
            kind=DeployerStack,
            envoy=EnvoySpec("mr-1", "mr-e2e-envoy"),
            gitlab=gitlab,
            policy_project="infra/ci-access",
            serve_args=("--policy-poll", str(POLL)),
            webhook=True,
        ) as built:
            built.deployer = deployer
            built.wait_get(200, timeout=20)
            yield built


def _mr_status(stack: DeployerStack, branch: str, text: str) -> tuple[str, dict[str, Any]]:
    assert stack.policy_project is not None
    gitlab = stack.gitlab
    gitlab.add_branch(stack.policy_project, branch)
    gitlab.add_merge_request(stack.policy_project, branch)
    sha = gitlab.commit(stack.policy_project, {"policy.yaml": text}, branch=branch)  # its push hook: a round now
    posted = poll_until(
        lambda: [s for s in gitlab.statuses(stack.policy_project, sha) if s["name"] == "controlplane"],
        15,
        message=f"status on {branch}'s head",
    )
    return sha, posted[-1]


def test_a_valid_merge_request_gets_success_and_is_not_served(stack: DeployerStack) -> None:
    policy_text = (stack.policy / "policy.yaml").read_text()
    widened = policy_text.replace("ref_protected: true", "ref_protected: false")
    assert widened != policy_text
    _, status = _mr_status(stack, "widen", widened)
    assert status["status"] == "success", status["description"]
    assert "merge request !" in status["description"]
    assert stack.get(ref_protected=False) == 403  # the MR's policy would allow it: not served
    assert stack.get() == 200


def test_a_broken_merge_request_fails_with_file_and_line_and_envoy_is_unchanged(stack: DeployerStack) -> None:
    policy_text = (stack.policy / "policy.yaml").read_text()
    broken = policy_text.replace("roles: [reports-read]", "roles: [no-such-role]")
    assert broken != policy_text
    before = stack.controlplane.metric("controlplane_merge_request_statuses_total", result="failed")
    _, status = _mr_status(stack, "broken", broken)
    assert status["status"] == "failed"
    assert status["description"].startswith("policy.yaml:") and "no-such-role" in status["description"]
    counted = poll_until(  # counted just after the status is posted
        lambda: stack.controlplane.metric("controlplane_merge_request_statuses_total", result="failed") > before,
        5,
        message="failed status counted",
    )
    assert counted
    assert stack.get() == 200 and stack.get(ref_protected=False) == 403
    assert stack.controlplane.status()["policy"]["errors"] == []  # the served policy knows nothing of it


def test_a_merge_request_naming_an_unwatched_project_is_judged_against_gitlab_without_widening_the_watch(
    stack: DeployerStack,
) -> None:
    policy_text = (stack.policy / "policy.yaml").read_text()
    (watch,) = stack.controlplane.status()["gitlab"]
    assert watch["projects"] == 1
    newcomer = policy_text + "---\n" + binding("frontend-reads", ["reports-read"], "{project: acme/web/frontend}")
    _, status = _mr_status(stack, "frontend", newcomer)
    assert status["status"] == "success", status["description"]
    missing = policy_text + "---\n" + binding("ghost-reads", ["reports-read"], "{project: acme/web/ghost}")
    _, status = _mr_status(stack, "ghost", missing)
    assert status["status"] == "failed" and "acme/web/ghost" in status["description"]
    (watch,) = stack.controlplane.status()["gitlab"]
    assert watch["projects"] == 1  # read for the MR, never watched: the served policy names one project


def test_opening_a_merge_request_on_a_pushed_branch_gets_its_head_a_verdict(stack: DeployerStack) -> None:
    """A branch pushed (its Push Hook lost) and then proposed: the merge request event alone starts the round."""
    assert stack.policy_project is not None
    gitlab = stack.gitlab
    policy_text = (stack.policy / "policy.yaml").read_text()
    gitlab.add_branch(stack.policy_project, "later")
    text = policy_text + "# a comment\n"
    with gitlab.hooks_lost():
        sha = gitlab.commit(stack.policy_project, {"policy.yaml": text}, branch="later")
    gitlab.add_merge_request(stack.policy_project, "later")  # its Merge Request Hook: a round now
    posted = poll_until(
        lambda: [s for s in gitlab.statuses(stack.policy_project, sha) if s["name"] == "controlplane"],
        15,
        message="status on the opened MR's head",
    )
    assert posted[-1]["status"] == "success"


def test_a_merge_request_naming_many_unwatched_projects_fails_unread(stack: DeployerStack) -> None:
    """Whoever opens an MR chooses what its head names, and serve reads what it names beyond its watches, with
    the budget its watches share: past a bound nothing is read and the head fails, saying why."""
    policy_text = (stack.policy / "policy.yaml").read_text()
    subjects = [f"{{project: acme/probe/p{n:02}}}" for n in range(MAX_UNWATCHED + 1)]
    many = policy_text + "---\n" + binding("probe", ["reports-read"], *subjects)
    _, status = _mr_status(stack, "many", many)
    assert status["status"] == "failed", status["description"]
    assert f"names {MAX_UNWATCHED + 1} projects and groups no served policy watches" in status["description"]
    assert not [c for c in stack.gitlab.api_calls() if "acme%2Fprobe" in c.path]
