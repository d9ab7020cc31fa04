"""The fake GitLab's merge requests and their notes, used through python-gitlab as the control plane uses them.

The shapes checked here are those GitLab documents (merge requests API, notes API): filters by state and target
branch, pagination headers, 201 on create, 400 without a body, 403 when changing someone else's note, 404s.
"""

from __future__ import annotations

from collections.abc import Iterator

import gitlab
import pytest
from gitlab.exceptions import GitlabCreateError, GitlabGetError, GitlabUpdateError

from tests.support.fake_gitlab import BOT_USER, FakeGitLab


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as server:
        server.add_project("platform/policy", files={"a.yaml": "kind: Role\n"}, branches=["feature", "other"])
        yield server


@pytest.fixture
def gl(fake: FakeGitLab) -> gitlab.Gitlab:
    return gitlab.Gitlab(fake.api_url, private_token=fake.api_token)


def test_merge_requests_are_listed_by_state_and_target_branch_with_pagination(
    fake: FakeGitLab, gl: gitlab.Gitlab
) -> None:
    first = fake.add_merge_request("platform/policy", "feature")
    second = fake.add_merge_request("platform/policy", "other")
    elsewhere = fake.add_merge_request("platform/policy", "feature", target_branch="other")
    closed = fake.add_merge_request("platform/policy", "other")
    fake.set_merge_request_state("platform/policy", closed, "closed")
    fake.max_per_page = 1
    project = gl.projects.get("platform/policy", lazy=True)

    listed = project.mergerequests.list(state="opened", target_branch="main", iterator=True)
    assert sorted(mr.iid for mr in listed) == [first, second]
    assert len(fake.api_calls("/projects/:id/merge_requests")) == 2  # one page each
    assert {mr.iid for mr in project.mergerequests.list(state="all", get_all=True)} == {
        first,
        second,
        elsewhere,
        closed,
    }
    assert [mr.iid for mr in project.mergerequests.list(state="closed", get_all=True)] == [closed]
    call = fake.api_calls("/projects/:id/merge_requests")[-1]
    assert call.status == 200


def test_a_merge_request_carries_its_source_branch_head(fake: FakeGitLab, gl: gitlab.Gitlab) -> None:
    iid = fake.add_merge_request("platform/policy", "feature", title="Grant deploy")
    sha = fake.commit("platform/policy", {"b.yaml": "kind: Role\n"}, branch="feature")
    mr = gl.projects.get("platform/policy", lazy=True).mergerequests.get(iid)
    assert (mr.sha, mr.state, mr.target_branch, mr.source_branch, mr.title) == (
        sha,
        "opened",
        "main",
        "feature",
        "Grant deploy",
    )
    assert mr.diff_refs["base_sha"] == fake.head("platform/policy")
    with pytest.raises(GitlabGetError) as missing:
        gl.projects.get("platform/policy", lazy=True).mergerequests.get(99)
    assert missing.value.response_code == 404


def test_notes_are_created_listed_and_updated_by_their_author_only(fake: FakeGitLab, gl: gitlab.Gitlab) -> None:
    iid = fake.add_merge_request("platform/policy", "feature")
    theirs = fake.add_note("platform/policy", iid, "looks good")
    mr = gl.projects.get("platform/policy", lazy=True).mergerequests.get(iid, lazy=True)

    note = mr.notes.create({"body": "first"})
    assert fake.api_calls("/projects/:id/merge_requests/:iid/notes", method="POST")[-1].status == 201
    assert (note.body, note.author["username"], note.noteable_type, note.system) == (
        "first",
        BOT_USER,
        "MergeRequest",
        False,
    )
    listed = mr.notes.list(sort="asc", get_all=True)
    assert [n.id for n in listed] == [theirs, note.id]
    assert [n.id for n in mr.notes.list(get_all=True)] == [note.id, theirs]  # GitLab's default: newest first

    note.body = "second"
    note.save()
    assert [n["body"] for n in fake.notes("platform/policy", iid)] == ["looks good", "second"]
    assert mr.notes.get(note.id).body == "second"

    other = mr.notes.get(theirs)
    other.body = "rewritten"
    with pytest.raises(GitlabUpdateError) as forbidden:
        other.save()
    assert forbidden.value.response_code == 403
    with pytest.raises(GitlabCreateError) as empty:
        mr.notes.create({"body": ""})
    assert empty.value.response_code == 400
    with pytest.raises(GitlabGetError) as gone:
        mr.notes.get(123456)
    assert gone.value.response_code == 404


def test_notes_past_gitlabs_length_limit_are_refused(fake: FakeGitLab, gl: gitlab.Gitlab) -> None:
    iid = fake.add_merge_request("platform/policy", "feature")
    mr = gl.projects.get("platform/policy", lazy=True).mergerequests.get(iid, lazy=True)
    with pytest.raises(GitlabCreateError) as too_long:
        mr.notes.create({"body": "x" * 1_000_001})
    assert too_long.value.response_code == 400
    assert fake.notes("platform/policy", iid) == []


def test_notes_are_paginated_as_gitlab_pages(fake: FakeGitLab, gl: gitlab.Gitlab) -> None:
    iid = fake.add_merge_request("platform/policy", "feature")
    ids = [fake.add_note("platform/policy", iid, f"note {n}") for n in range(3)]
    fake.max_per_page = 2
    mr = gl.projects.get("platform/policy", lazy=True).mergerequests.get(iid, lazy=True)
    assert [n.id for n in mr.notes.list(sort="asc", iterator=True)] == ids
    pages = fake.api_calls("/projects/:id/merge_requests/:iid/notes")
    assert len(pages) == 2 and pages[-1].query["page"] == ["2"]
