"""Access follows GitLab as it is now, end to end: fake GitLab (REST API, webhooks, OIDC) → controlplane
serve reading its policy from a GitLab project → real Envoy.

One stack for the module; each test restores what it changes. Every wait polls with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_gitlab import FakeGitLab
from tests.support.gitlab_hooks import deliver, project_system_hook
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

RECONCILE = 10  # the shortest the policy language allows


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer, extra=f"api:\n  token_env: GITLAB_TOKEN\n  reconcile: {RECONCILE}s"),
        backend("reports-api", given.ports["reports"]),
        role("reports-read", "reports-api"),
        binding("deployer-reads-reports", ["reports-read"], "{project: acme/platform/deployer, ref_protected: true}"),
        gateway(given.listen_port, ["reports-api"]),
    )


NEWCOMER = """\
---
kind: Binding
name: newcomer-reads-reports
roles: [reports-read]
subjects:
  - project: {path}
"""


@dataclass
class GitLabStack(Served):
    deployer: int = 0

    @property
    def policy_text(self) -> str:
        """The policy as first committed to the policy project."""
        return (self.policy / "policy.yaml").read_text()

    def get(self, **claims: Any) -> int:
        token = self.gitlab.mint(aud="https://reports.local", **{"project_id": self.deployer, **claims})
        return self.call("reports.local", token)

    def wait_get(self, expected: int, timeout: float = 10.0, **claims: Any) -> float:
        started = time.monotonic()
        poll_until(lambda: self.get(**claims) == expected, timeout, interval=0.02, message=f"GET -> {expected}")
        return time.monotonic() - started

    def gitlab_status(self) -> dict[str, Any]:
        (watch,) = self.controlplane.status()["gitlab"]
        return dict(watch)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitLabStack]:
    with FakeGitLab() as gitlab:
        deployer = gitlab.add_project("acme/platform/deployer", branches=["main", "feature"])
        with serve_stack(
            tmp_path_factory.mktemp("gitlab-e2e"),
            policy,
            kind=GitLabStack,
            envoy=EnvoySpec("gl-1", "gitlab-e2e-envoy"),
            gitlab=gitlab,
            policy_project="infra/ci-access",
            serve_args=("--policy-poll", "3600"),  # no periodic re-read while the module runs
            webhook=True,
        ) as built:
            built.deployer = deployer
            built.wait_get(200, timeout=20)
            yield built


def test_policy_from_gitlab_is_enforced_and_its_commit_gets_a_success_status(stack: GitLabStack) -> None:
    assert stack.get() == 200
    assert stack.get(ref="feature", ref_protected=False) == 403
    head = stack.gitlab.head(stack.policy_project)
    statuses = poll_until(lambda: stack.gitlab.statuses(stack.policy_project, head), 10, message="status")
    assert statuses[-1]["status"] == "success" and statuses[-1]["name"] == "controlplane"


def test_broken_policy_commit_fails_with_file_and_line_and_envoy_is_unchanged(stack: GitLabStack) -> None:
    broken = stack.policy_text.replace("ref_protected: true", "ref_protected: maybe")
    sha = stack.gitlab.commit(stack.policy_project, {"policy.yaml": broken})
    failed = poll_until(lambda: stack.gitlab.statuses(stack.policy_project, sha), 10, message="failed status")
    assert failed[-1]["status"] == "failed"
    assert "policy.yaml:" in failed[-1]["description"] and "ref_protected" in failed[-1]["description"]
    assert stack.get() == 200 and stack.get(ref_protected=False) == 403
    fixed = stack.gitlab.commit(stack.policy_project, {"policy.yaml": stack.policy_text})
    ok = poll_until(lambda: stack.gitlab.statuses(stack.policy_project, fixed), 10, message="success status")
    assert ok[-1]["status"] == "success"


def test_renamed_project_keeps_access(stack: GitLabStack) -> None:
    stack.gitlab.rename_project(stack.deployer, "deployer-renamed")
    try:
        warnings = poll_until(
            lambda: [w for w in stack.controlplane.status()["policy"]["warnings"] if "is now" in w],
            10,
            message="rename noticed",
        )
        assert "acme/platform/deployer-renamed" in warnings[0] and "policy.yaml:" in warnings[0]
        assert stack.get(project_path="acme/platform/deployer-renamed") == 200
    finally:
        stack.gitlab.rename_project(stack.deployer, "deployer")
    poll_until(lambda: not stack.controlplane.status()["policy"]["warnings"], 10, message="warning cleared")


def test_archived_project_loses_access_within_a_second_of_its_webhook(stack: GitLabStack) -> None:
    stack.gitlab.archive_project(stack.deployer)
    try:
        assert stack.wait_get(403, timeout=5) < 1.0
    finally:
        stack.gitlab.archive_project(stack.deployer, archived=False)
    stack.wait_get(200)


def test_unprotected_branch_loses_access_within_one_reconcile(stack: GitLabStack) -> None:
    stack.gitlab.unprotect_branch(stack.deployer, "main")  # GitLab sends no webhook for this
    try:
        took = stack.wait_get(403, timeout=RECONCILE + 5)
        assert took < RECONCILE + 2
    finally:
        stack.gitlab.protect_branch(stack.deployer, "main")
    stack.wait_get(200, timeout=RECONCILE + 5)


def test_a_push_every_two_seconds_does_not_hold_back_the_reconcile(stack: GitLabStack) -> None:
    """An active GitLab sends webhooks all the time (here: a push every 2 s to another watched project);
    a protection change, which has no webhook, must still be seen within one reconcile."""
    busy = stack.gitlab.add_project("acme/busy")
    with_busy = stack.policy_text + NEWCOMER.format(path="acme/busy")
    sha = stack.gitlab.commit(stack.policy_project, {"policy.yaml": with_busy})
    assert poll_until(lambda: stack.gitlab.statuses(stack.policy_project, sha), 10)[-1]["status"] == "success"
    stop = threading.Event()

    def push() -> None:
        n = 0
        while not stop.wait(2.0):  # pacing the pushes, not a synchronisation
            n += 1
            stack.gitlab.commit(busy, {"busy.txt": str(n)})

    def busy_reads() -> int:
        return sum(c.path.endswith(f"/projects/{busy}") for c in stack.gitlab.api_calls("/projects/:id"))

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    try:
        # Past the reconciles the policy change itself causes: two pushes have been read since.
        seen = busy_reads()
        poll_until(lambda: busy_reads() >= seen + 2, 10, message="pushes read")
        stack.gitlab.unprotect_branch(stack.deployer, "main")
        assert stack.wait_get(403, timeout=RECONCILE + 5) < RECONCILE + 2
    finally:
        stop.set()
        pusher.join(5)
        stack.gitlab.protect_branch(stack.deployer, "main")
        restored = stack.gitlab.commit(stack.policy_project, {"policy.yaml": stack.policy_text})
        poll_until(lambda: stack.gitlab.statuses(stack.policy_project, restored), 10, message="restored")
    stack.wait_get(200, timeout=RECONCILE + 5)


def test_environments_off_on_a_project_is_read_once_per_reconcile_and_changes_are_still_seen(
    stack: GitLabStack,
) -> None:
    """GitLab answers 403 on /environments when the feature is off: no loop, no blind spot."""
    stack.gitlab.set_environments_enabled(stack.deployer, False)
    stack.gitlab.clear_api_calls()
    stack.gitlab.unprotect_branch(stack.deployer, "main")
    try:
        stack.wait_get(403, timeout=RECONCILE + 5)
        refused = [c for c in stack.gitlab.api_calls("/projects/:id/environments") if c.status == 403]
        assert 1 <= len(refused) <= 3  # one per read (reconcile or webhook re-sync), never the rate bound
        assert stack.gitlab_status()["last_error"] is None
    finally:
        stack.gitlab.protect_branch(stack.deployer, "main")
        stack.gitlab.set_environments_enabled(stack.deployer, True)
    stack.wait_get(200, timeout=RECONCILE + 5)


def test_forged_or_replayed_webhooks_change_nothing(stack: GitLabStack) -> None:
    payload = project_system_hook("project_update", stack.deployer, "acme/platform/deployer")
    calls = len(stack.gitlab.api_calls("/projects/:id"))
    forged = deliver(stack.hook, "System Hook", payload, token="not-the-secret")
    assert forged.status == 401
    first = deliver(stack.hook, "System Hook", payload, idempotency_key="delivery-1")
    replay = deliver(stack.hook, "System Hook", payload, idempotency_key="delivery-1")
    assert first.status == 200 and replay.status == 200 and replay.json() == {"duplicate": True}
    poll_until(lambda: len(stack.gitlab.api_calls("/projects/:id")) > calls, 5, message="one re-sync")
    assert len(stack.gitlab.api_calls("/projects/:id")) == calls + 1
    assert stack.get() == 200


def test_gitlab_down_keeps_the_last_good_policy_enforced(stack: GitLabStack) -> None:
    stack.gitlab.set_down(True)
    try:
        payload = project_system_hook("project_update", stack.deployer, "acme/platform/deployer")
        deliver(stack.hook, "System Hook", payload)  # forces a re-sync that fails
        poll_until(lambda: stack.gitlab_status()["last_error"], 15, message="outage noticed")
        assert stack.get() == 200 and stack.get(ref="feature", ref_protected=False) == 403
        assert stack.controlplane.metric("controlplane_gitlab_inventory_stale", issuer="gitlab") == 0
    finally:
        stack.gitlab.set_down(False)
    poll_until(lambda: stack.gitlab_status()["last_error"] is None, RECONCILE + 10, message="recovered")
    assert stack.get() == 200


def test_deleted_branch_loses_access(stack: GitLabStack) -> None:
    stack.gitlab.add_branch(stack.deployer, "release")
    stack.gitlab.protect_branch(stack.deployer, "release")
    stack.gitlab.commit(stack.deployer, {"x.txt": "1"}, branch="release")  # a push webhook: re-sync
    stack.wait_get(200, ref="release")
    stack.gitlab.delete_branch(stack.deployer, "release")
    stack.wait_get(403, timeout=5, ref="release")
    assert stack.get() == 200


def test_status_and_metrics_show_the_inventory(stack: GitLabStack) -> None:
    watch = stack.gitlab_status()
    assert watch["issuer"] == "gitlab" and watch["stale"] is False and watch["projects"] >= 1
    metrics = stack.controlplane.metrics()
    for name in (
        "controlplane_gitlab_requests_total",
        "controlplane_gitlab_inventory_age_seconds",
        "controlplane_gitlab_inventory_stale",
        "controlplane_gitlab_consecutive_failures",
        "controlplane_gitlab_reconcile_duration_seconds",
        "controlplane_webhook_events_total",
        "controlplane_jwks_fetches_total",
    ):
        assert name in metrics, name
    assert stack.gitlab.api_token not in (Path(stack.controlplane.log_path).read_text())


def test_a_path_taken_over_by_another_project_is_an_error_never_a_rebind(stack: GitLabStack) -> None:
    stack.gitlab.rename_project(stack.deployer, "deployer-old")
    impostor = stack.gitlab.add_project("acme/platform/deployer")
    try:
        deliver(stack.hook, "System Hook", project_system_hook("project_create", impostor, "acme/platform/deployer"))
        errors = poll_until(lambda: stack.controlplane.status()["policy"]["errors"], 10, message="re-use refused")
        assert "now belongs to project" in errors[0] and "policy.yaml:" in errors[0]
        assert stack.get(project_id=impostor, project_path="acme/platform/deployer") == 403
        assert stack.get(project_path="acme/platform/deployer-old") == 200  # still bound by id
    finally:
        stack.gitlab.delete_project(impostor)
        stack.gitlab.rename_project(stack.deployer, "deployer")
    poll_until(lambda: not stack.controlplane.status()["policy"]["errors"], 10, message="errors cleared")
    assert stack.get() == 200


def test_a_binding_for_a_project_gitlab_has_but_nobody_watched_is_accepted_without_restart(stack: GitLabStack) -> None:
    """The watched set is what the policy in service names; a new policy naming a project outside it must be
    judged against GitLab (which has it), not against the old watched set."""
    newcomer = stack.gitlab.add_project("acme/newcomer")
    added = NEWCOMER.format(path="acme/newcomer")
    sha = stack.gitlab.commit(stack.policy_project, {"policy.yaml": stack.policy_text + added})
    try:
        verdict = poll_until(lambda: stack.gitlab.statuses(stack.policy_project, sha), 10, message="verdict")
        assert verdict[-1]["status"] == "success", verdict[-1]["description"]
        stack.wait_get(200, project_id=newcomer, project_path="acme/newcomer")
        assert stack.get() == 200
    finally:
        restored = stack.gitlab.commit(stack.policy_project, {"policy.yaml": stack.policy_text})
        poll_until(lambda: stack.gitlab.statuses(stack.policy_project, restored), 10, message="restored")
        stack.gitlab.delete_project(newcomer)
    stack.wait_get(403, project_id=newcomer, project_path="acme/newcomer")


def test_a_policy_push_webhook_is_answered_before_a_slow_reload(stack: GitLabStack) -> None:
    """The push webhook awaited the whole reload (reading the tree from GitLab, judging new subjects): a slow
    GitLab made the delivery time out (GitLab then reports the hook failing) instead of a quick acknowledgement."""
    tree = "/projects/:id/repository/tree"
    stack.gitlab.hold(tree)
    try:
        started = time.monotonic()
        sha = stack.gitlab.commit(stack.policy_project, {"policy.yaml": stack.policy_text + "\n# touched\n"})
        assert time.monotonic() - started < 2.0  # the delivery (inside commit) was answered; the read still waits
        assert not stack.gitlab.statuses(stack.policy_project, sha)
    finally:
        stack.gitlab.release(tree)
    verdict = poll_until(lambda: stack.gitlab.statuses(stack.policy_project, sha), 10, message="verdict")
    assert verdict[-1]["status"] == "success"


def test_a_binding_for_a_project_gitlab_does_not_have_is_still_an_error(stack: GitLabStack) -> None:
    added = NEWCOMER.format(path="acme/nobody")
    sha = stack.gitlab.commit(stack.policy_project, {"policy.yaml": stack.policy_text + added})
    try:
        verdict = poll_until(lambda: stack.gitlab.statuses(stack.policy_project, sha), 10, message="verdict")
        assert verdict[-1]["status"] == "failed"
        assert "no project with path 'acme/nobody' in GitLab" in verdict[-1]["description"]
        assert stack.get() == 200
    finally:
        restored = stack.gitlab.commit(stack.policy_project, {"policy.yaml": stack.policy_text})
        poll_until(lambda: stack.gitlab.statuses(stack.policy_project, restored), 10, message="restored")
