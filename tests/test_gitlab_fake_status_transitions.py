"""The fake GitLab's commit statuses answer a repeated or backward state as GitLab does: a 400 naming the
state-machine event (`enqueue` for pending, `run` for running) and the live status's state, as GitLab's own
message reads (`Cannot transition status via :enqueue from :pending`)."""

from __future__ import annotations

import gitlab
import pytest
from gitlab.exceptions import GitlabCreateError

from tests.support.fake_gitlab import FakeGitLab


@pytest.mark.parametrize(
    ("first", "then", "answer"),
    [
        ("pending", "pending", "Cannot transition status via :enqueue from :pending"),
        ("running", "running", "Cannot transition status via :run from :running"),
        ("running", "pending", "Cannot transition status via :enqueue from :running"),
        ("pending", "running", None),
        ("running", "success", None),
        ("success", "success", None),  # a finished status is not moved: a new one is made
        ("failed", "pending", None),
    ],
)
def test_a_status_posted_again(first: str, then: str, answer: str | None) -> None:
    with FakeGitLab() as fake:
        fake.add_project("platform/policy", files={"a.yaml": "kind: Issuer\n"})
        sha = fake.head("platform/policy")
        gl = gitlab.Gitlab(fake.base_url, private_token=fake.api_token)
        statuses = gl.projects.get("platform/policy", lazy=True).commits.get(sha, lazy=True).statuses
        statuses.create({"state": first, "name": "controlplane"})
        if answer is None:
            statuses.create({"state": then, "name": "controlplane"})
            assert fake.statuses("platform/policy", sha)[-1]["status"] == then
        else:
            with pytest.raises(GitlabCreateError) as raised:
                statuses.create({"state": then, "name": "controlplane"})
            assert raised.value.response_code == 400 and answer in str(raised.value.error_message)
            assert [s["status"] for s in fake.statuses("platform/policy", sha)] == [first]


def test_a_commits_statuses_are_listed_latest_per_name_unless_all() -> None:
    """`GET /projects/:id/repository/commits/:sha/statuses`: newest first, the latest of each name by default,
    every one with `all=true`, filtered by `name`."""
    with FakeGitLab() as fake:
        fake.add_project("platform/policy", files={"a.yaml": "kind: Issuer\n"})
        sha = fake.head("platform/policy")
        gl = gitlab.Gitlab(fake.base_url, private_token=fake.api_token)
        statuses = gl.projects.get("platform/policy", lazy=True).commits.get(sha, lazy=True).statuses
        statuses.create({"state": "failed", "name": "controlplane"})
        statuses.create({"state": "success", "name": "controlplane"})
        statuses.create({"state": "success", "name": "other"})
        latest = statuses.list(get_all=True)
        assert [(s.name, s.status) for s in latest] == [("other", "success"), ("controlplane", "success")]
        every = statuses.list(query_parameters={"all": "true"}, get_all=True)  # python-gitlab takes `all=` itself
        assert [s.status for s in every if s.name == "controlplane"] == ["success", "failed"]
        assert [s.name for s in statuses.list(name="controlplane", get_all=True)] == ["controlplane"]
        assert statuses.list(name="nobody", get_all=True) == []


def test_the_current_user_is_the_tokens_and_other_authors_statuses_are_theirs() -> None:
    with FakeGitLab() as fake:
        fake.add_project("platform/policy", files={"a.yaml": "kind: Issuer\n"})
        sha = fake.head("platform/policy")
        gl = gitlab.Gitlab(fake.base_url, private_token=fake.api_token)
        gl.auth()
        assert gl.user is not None and gl.user.username == "controlplane-bot"
        fake.add_status("platform/policy", sha, "success", name="controlplane", author="mallory")
        statuses = gl.projects.get("platform/policy", lazy=True).commits.get(sha, lazy=True).statuses
        (status,) = statuses.list(name="controlplane", get_all=True)
        assert status.author["username"] == "mallory" and status.author["id"] != gl.user.id
