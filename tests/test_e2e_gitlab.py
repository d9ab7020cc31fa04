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
from tests.support.stack import DeployerStack, EnvoySpec, PolicyInputs, serve_stack

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
class GitLabStack(DeployerStack):
    @property
    def policy_text(self) -> str:
        """The policy as first committed to the policy project."""
        return (self.policy / "policy.yaml").read_text()

    def gitlab_status(self) -> dict[str, Any]:
        (watch,) = self.controlplane.status()["gitlab"]
        return dict(watch)


@pytest.fixture(scope="module")
def gitlab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitLabStack]:
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


def test_policy_from_gitlab_is_enforced_and_its_commit_gets_a_success_status(gitlab_stack: GitLabStack) -> None:
    assert gitlab_stack.get() == 200
    assert gitlab_stack.get(ref="feature", ref_protected=False) == 403
    head = gitlab_stack.gitlab.head(gitlab_stack.policy_project)
    statuses = poll_until(lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, head), 10, message="status")
    assert statuses[-1]["status"] == "success" and statuses[-1]["name"] == "controlplane"


def test_broken_policy_commit_fails_with_file_and_line_and_envoy_is_unchanged(gitlab_stack: GitLabStack) -> None:
    broken = gitlab_stack.policy_text.replace("ref_protected: true", "ref_protected: maybe")
    sha = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": broken})
    failed = poll_until(
        lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, sha), 10, message="failed status"
    )
    assert failed[-1]["status"] == "failed"
    assert "policy.yaml:" in failed[-1]["description"] and "ref_protected" in failed[-1]["description"]
    assert gitlab_stack.get() == 200 and gitlab_stack.get(ref_protected=False) == 403
    fixed = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": gitlab_stack.policy_text})
    ok = poll_until(
        lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, fixed), 10, message="success status"
    )
    assert ok[-1]["status"] == "success"


def test_renamed_project_keeps_access(gitlab_stack: GitLabStack) -> None:
    gitlab_stack.gitlab.rename_project(gitlab_stack.deployer, "deployer-renamed")
    try:
        warnings = poll_until(
            lambda: [w for w in gitlab_stack.controlplane.status()["policy"]["warnings"] if "is now" in w],
            10,
            message="rename noticed",
        )
        assert "acme/platform/deployer-renamed" in warnings[0] and "policy.yaml:" in warnings[0]
        assert gitlab_stack.get(project_path="acme/platform/deployer-renamed") == 200
    finally:
        gitlab_stack.gitlab.rename_project(gitlab_stack.deployer, "deployer")
    poll_until(lambda: not gitlab_stack.controlplane.status()["policy"]["warnings"], 10, message="warning cleared")


def test_archived_project_loses_access_within_a_second_of_its_webhook(gitlab_stack: GitLabStack) -> None:
    gitlab_stack.gitlab.archive_project(gitlab_stack.deployer)
    try:
        assert gitlab_stack.wait_get(403, timeout=5) < 1.0
    finally:
        gitlab_stack.gitlab.archive_project(gitlab_stack.deployer, archived=False)
    gitlab_stack.wait_get(200)


def test_unprotected_branch_loses_access_within_one_reconcile(gitlab_stack: GitLabStack) -> None:
    gitlab_stack.gitlab.unprotect_branch(gitlab_stack.deployer, "main")  # GitLab sends no webhook for this
    try:
        took = gitlab_stack.wait_get(403, timeout=RECONCILE + 5)
        assert took < RECONCILE + 2
    finally:
        gitlab_stack.gitlab.protect_branch(gitlab_stack.deployer, "main")
    gitlab_stack.wait_get(200, timeout=RECONCILE + 5)


def test_a_push_every_two_seconds_does_not_hold_back_the_reconcile(gitlab_stack: GitLabStack) -> None:
    """An active GitLab sends webhooks all the time (here: a push every 2 s to another watched project);
    a protection change, which has no webhook, must still be seen within one reconcile."""
    busy = gitlab_stack.gitlab.add_project("acme/busy")
    with_busy = gitlab_stack.policy_text + NEWCOMER.format(path="acme/busy")
    sha = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": with_busy})
    assert (
        poll_until(lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, sha), 10)[-1]["status"]
        == "success"
    )
    stop = threading.Event()

    def push() -> None:
        n = 0
        while not stop.wait(2.0):  # pacing the pushes, not a synchronisation
            n += 1
            gitlab_stack.gitlab.commit(busy, {"busy.txt": str(n)})

    def busy_reads() -> int:
        return sum(c.path.endswith(f"/projects/{busy}") for c in gitlab_stack.gitlab.api_calls("/projects/:id"))

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    try:
        # Past the reconciles the policy change itself causes: two pushes have been read since.
        seen = busy_reads()
        poll_until(lambda: busy_reads() >= seen + 2, 10, message="pushes read")
        gitlab_stack.gitlab.unprotect_branch(gitlab_stack.deployer, "main")
        assert gitlab_stack.wait_get(403, timeout=RECONCILE + 5) < RECONCILE + 2
    finally:
        stop.set()
        pusher.join(5)
        gitlab_stack.gitlab.protect_branch(gitlab_stack.deployer, "main")
        restored = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": gitlab_stack.policy_text})
        poll_until(lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, restored), 10, message="restored")
    gitlab_stack.wait_get(200, timeout=RECONCILE + 5)


def test_environments_off_on_a_project_is_read_once_per_reconcile_and_changes_are_still_seen(
    gitlab_stack: GitLabStack,
) -> None:
    """GitLab answers 403 on /environments when the feature is off: no loop, no blind spot."""
    gitlab_stack.gitlab.set_environments_enabled(gitlab_stack.deployer, False)
    gitlab_stack.gitlab.clear_api_calls()
    gitlab_stack.gitlab.unprotect_branch(gitlab_stack.deployer, "main")
    try:
        gitlab_stack.wait_get(403, timeout=RECONCILE + 5)
        refused = [c for c in gitlab_stack.gitlab.api_calls("/projects/:id/environments") if c.status == 403]
        assert 1 <= len(refused) <= 3  # one per read (reconcile or webhook re-sync), never the rate bound
        assert gitlab_stack.gitlab_status()["last_error"] is None
    finally:
        gitlab_stack.gitlab.protect_branch(gitlab_stack.deployer, "main")
        gitlab_stack.gitlab.set_environments_enabled(gitlab_stack.deployer, True)
    gitlab_stack.wait_get(200, timeout=RECONCILE + 5)


def test_forged_or_replayed_webhooks_change_nothing(gitlab_stack: GitLabStack) -> None:
    payload = project_system_hook("project_update", gitlab_stack.deployer, "acme/platform/deployer")
    calls = len(gitlab_stack.gitlab.api_calls("/projects/:id"))
    forged = deliver(gitlab_stack.hook, "System Hook", payload, token="not-the-secret")
    assert forged.status == 401
    first = deliver(gitlab_stack.hook, "System Hook", payload, idempotency_key="delivery-1")
    replay = deliver(gitlab_stack.hook, "System Hook", payload, idempotency_key="delivery-1")
    assert first.status == 200 and replay.status == 200 and replay.json() == {"duplicate": True}
    poll_until(lambda: len(gitlab_stack.gitlab.api_calls("/projects/:id")) > calls, 5, message="one re-sync")
    assert len(gitlab_stack.gitlab.api_calls("/projects/:id")) == calls + 1
    assert gitlab_stack.get() == 200


def test_gitlab_down_keeps_the_last_good_policy_enforced(gitlab_stack: GitLabStack) -> None:
    gitlab_stack.gitlab.set_down(True)
    try:
        payload = project_system_hook("project_update", gitlab_stack.deployer, "acme/platform/deployer")
        deliver(gitlab_stack.hook, "System Hook", payload)  # forces a re-sync that fails
        poll_until(lambda: gitlab_stack.gitlab_status()["last_error"], 15, message="outage noticed")
        assert gitlab_stack.get() == 200 and gitlab_stack.get(ref="feature", ref_protected=False) == 403
        assert gitlab_stack.controlplane.metric("controlplane_gitlab_inventory_stale", issuer="gitlab") == 0
    finally:
        gitlab_stack.gitlab.set_down(False)
    poll_until(lambda: gitlab_stack.gitlab_status()["last_error"] is None, RECONCILE + 10, message="recovered")
    assert gitlab_stack.get() == 200


def test_deleted_branch_loses_access(gitlab_stack: GitLabStack) -> None:
    gitlab_stack.gitlab.add_branch(gitlab_stack.deployer, "release")
    gitlab_stack.gitlab.protect_branch(gitlab_stack.deployer, "release")
    gitlab_stack.gitlab.commit(gitlab_stack.deployer, {"x.txt": "1"}, branch="release")  # a push webhook: re-sync
    gitlab_stack.wait_get(200, ref="release")
    gitlab_stack.gitlab.delete_branch(gitlab_stack.deployer, "release")
    gitlab_stack.wait_get(403, timeout=5, ref="release")
    assert gitlab_stack.get() == 200


def test_status_and_metrics_show_the_inventory(gitlab_stack: GitLabStack) -> None:
    watch = gitlab_stack.gitlab_status()
    assert watch["issuer"] == "gitlab" and watch["stale"] is False and watch["projects"] >= 1
    metrics = gitlab_stack.controlplane.metrics()
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
    assert gitlab_stack.gitlab.api_token not in (Path(gitlab_stack.controlplane.log_path).read_text())


def test_a_path_taken_over_by_another_project_is_an_error_never_a_rebind(gitlab_stack: GitLabStack) -> None:
    gitlab_stack.gitlab.rename_project(gitlab_stack.deployer, "deployer-old")
    impostor = gitlab_stack.gitlab.add_project("acme/platform/deployer")
    try:
        deliver(
            gitlab_stack.hook, "System Hook", project_system_hook("project_create", impostor, "acme/platform/deployer")
        )
        errors = poll_until(
            lambda: gitlab_stack.controlplane.status()["policy"]["errors"], 10, message="re-use refused"
        )
        assert "now belongs to project" in errors[0] and "policy.yaml:" in errors[0]
        assert gitlab_stack.get(project_id=impostor, project_path="acme/platform/deployer") == 403
        assert gitlab_stack.get(project_path="acme/platform/deployer-old") == 200  # still bound by id
    finally:
        gitlab_stack.gitlab.delete_project(impostor)
        gitlab_stack.gitlab.rename_project(gitlab_stack.deployer, "deployer")
    poll_until(lambda: not gitlab_stack.controlplane.status()["policy"]["errors"], 10, message="errors cleared")
    assert gitlab_stack.get() == 200


def test_a_binding_for_a_project_gitlab_has_but_nobody_watched_is_accepted_without_restart(
    gitlab_stack: GitLabStack,
) -> None:
    """The watched set is what the policy in service names; a new policy naming a project outside it must be
    judged against GitLab (which has it), not against the old watched set."""
    newcomer = gitlab_stack.gitlab.add_project("acme/newcomer")
    added = NEWCOMER.format(path="acme/newcomer")
    sha = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": gitlab_stack.policy_text + added})
    try:
        verdict = poll_until(
            lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, sha), 10, message="verdict"
        )
        assert verdict[-1]["status"] == "success", verdict[-1]["description"]
        gitlab_stack.wait_get(200, project_id=newcomer, project_path="acme/newcomer")
        assert gitlab_stack.get() == 200
    finally:
        restored = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": gitlab_stack.policy_text})
        poll_until(lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, restored), 10, message="restored")
        gitlab_stack.gitlab.delete_project(newcomer)
    gitlab_stack.wait_get(403, project_id=newcomer, project_path="acme/newcomer")


def test_a_policy_push_webhook_is_answered_before_a_slow_reload(gitlab_stack: GitLabStack) -> None:
    """The push webhook awaited the whole reload (reading the tree from GitLab, judging new subjects): a slow
    GitLab made the delivery time out (GitLab then reports the hook failing) instead of a quick acknowledgement."""
    tree = "/projects/:id/repository/tree"
    gitlab_stack.gitlab.hold(tree)
    try:
        started = time.monotonic()
        sha = gitlab_stack.gitlab.commit(
            gitlab_stack.policy_project, {"policy.yaml": gitlab_stack.policy_text + "\n# touched\n"}
        )
        assert time.monotonic() - started < 2.0  # the delivery (inside commit) was answered; the read still waits
        assert not gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, sha)
    finally:
        gitlab_stack.gitlab.release(tree)
    verdict = poll_until(lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, sha), 10, message="verdict")
    assert verdict[-1]["status"] == "success"


def test_a_binding_for_a_project_gitlab_does_not_have_is_still_an_error(gitlab_stack: GitLabStack) -> None:
    added = NEWCOMER.format(path="acme/nobody")
    sha = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": gitlab_stack.policy_text + added})
    try:
        verdict = poll_until(
            lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, sha), 10, message="verdict"
        )
        assert verdict[-1]["status"] == "failed"
        assert "no project with path 'acme/nobody' in GitLab" in verdict[-1]["description"]
        assert gitlab_stack.get() == 200
    finally:
        restored = gitlab_stack.gitlab.commit(gitlab_stack.policy_project, {"policy.yaml": gitlab_stack.policy_text})
        poll_until(lambda: gitlab_stack.gitlab.statuses(gitlab_stack.policy_project, restored), 10, message="restored")
