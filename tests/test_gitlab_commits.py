"""The fake GitLab's commit list (`GET /projects/:id/repository/commits`), through python-gitlab as the report
reads it: newest first along the branch, `since`/`until` on the commit date (inclusive), `path` limiting to
commits that change a file under it, pagination; and `commit(author=..., at=...)` shaping what it lists."""

from __future__ import annotations

from collections.abc import Iterator

import gitlab
import pytest
from gitlab.exceptions import GitlabListError

from tests.support.fake_gitlab import FakeGitLab

DAY = 86_400.0
T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as server:
        yield server


def _project(fake: FakeGitLab) -> tuple[object, list[str]]:
    fake.add_project("platform/policy", files={"policy/a.yaml": "kind: Role\n"})
    shas = [
        fake.commit("platform/policy", {"policy/a.yaml": "kind: Role\n# 1\n"}, author="Bob Builder", at=T0 - 3 * DAY),
        fake.commit("platform/policy", {"README.md": "hi\n"}, message="readme\n\nbody", at=T0 - 2 * DAY),
        fake.commit("platform/policy", {"policy/a.yaml": None}, author="Dave", at=T0 - DAY),
    ]
    client = gitlab.Gitlab(fake.api_url, private_token=fake.api_token)
    return client.projects.get("platform/policy"), shas


def test_commits_are_listed_newest_first_with_their_author_and_date(fake: FakeGitLab) -> None:
    project, (first, second, third) = _project(fake)
    listed = project.commits.list(ref_name="main", get_all=True)  # type: ignore[attr-defined]
    assert [c.id for c in listed][:3] == [third, second, first] and len(listed) == 4  # and the initial commit
    assert (listed[0].author_name, listed[0].author_email, listed[0].committer_name) == (
        "Dave",
        "dave@example.com",
        "Dave",
    )
    assert listed[1].title == "readme" and listed[1].message == "readme\n\nbody"
    assert listed[2].committed_date == "2026-09-18T14:13:20.000Z" and listed[2].author_name == "Bob Builder"
    assert listed[0].parent_ids == [second]


def test_since_until_and_path_filter_and_pages_hold_everything(fake: FakeGitLab) -> None:
    project, (first, second, third) = _project(fake)
    commits = project.commits  # type: ignore[attr-defined]
    window = commits.list(since="2026-09-18T14:13:20Z", until="2026-09-20T14:13:19+00:00", get_all=True)
    assert [c.id for c in window] == [second, first]  # since inclusive (first is at it), third a second late
    # `path` as a query parameter (python-gitlab's own `path=` keyword is the URL path)
    under = commits.list(query_parameters={"path": "policy", "until": "2026-09-21T00:00:00Z"}, get_all=True)
    assert [c.id for c in under] == [third, first]  # the README commit changed nothing under policy/
    paged = list(commits.list(per_page=1, iterator=True, first_parent=True))
    assert [c.id for c in paged][:3] == [third, second, first] and len(paged) == 4
    with pytest.raises(GitlabListError) as refused:
        commits.list(since="yesterday", get_all=True)
    assert refused.value.response_code == 400
