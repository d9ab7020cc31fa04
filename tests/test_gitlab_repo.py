"""The policy repository on GitLab: the tree at a commit read through the API, verdicts posted back as statuses.

The fake GitLab serves the same files a local checkout would hold, so "same skipping rules as a policy directory"
is checked the strongest way: the API read and `read_policy_dir` of the same files must be equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.model.errors import PolicyInvalid
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_client import GitLabUnavailable
from controlplane.sources.gitlab_policy import GitLabPolicySource
from controlplane.sources.gitlab_repo import STATUS_NAME, PolicyRepo, PolicyRepoError, truncate_description
from controlplane.sources.policy_dir import READ_CHUNK, ReadLimits, read_policy_dir
from tests.support.fake_gitlab import FakeGitLab

FILES = {
    "issuers.yaml": "kind: Issuer\nname: gitlab\n",
    "backends/deploy.yml": "kind: Backend\nname: deploy\n",
    "bindings/team/a.yaml": "kind: Binding\nname: a\n",
    # skipped, as in a directory: hidden files and directories, editor leftovers, other extensions
    ".gitlab-ci.yml": "validate: {script: [controlplane validate .]}\n",
    ".hidden/secret.yaml": "kind: Role\n",
    "bindings/.old/b.yaml": "kind: Binding\n",
    "bindings/.#a.yaml": "lock\n",
    "bindings/a.yaml~": "backup\n",
    "bindings/a.yaml.swp": "swap\n",
    "README.md": "# policy\n",
}
POLICY = {
    path: text
    for path, text in FILES.items()
    if path in ("issuers.yaml", "backends/deploy.yml", "bindings/team/a.yaml")
}


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as gitlab:
        yield gitlab


@pytest.fixture
def source(fake: FakeGitLab) -> GitLabSource:
    return GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=2)


@pytest.fixture
def repo(fake: FakeGitLab, source: GitLabSource) -> PolicyRepo:
    fake.add_project("platform/policy", files=FILES)
    return PolicyRepo(source, "platform/policy")


def test_head_is_the_default_branch_and_its_commit(fake: FakeGitLab, repo: PolicyRepo) -> None:
    assert repo.head() == ("main", fake.head("platform/policy"))
    sha = fake.commit("platform/policy", {"roles.yaml": "kind: Role\n"})
    assert repo.head() == ("main", sha)


def test_read_tree_reads_what_a_directory_of_the_same_files_reads(repo: PolicyRepo, tmp_path: Path) -> None:
    for path, text in FILES.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    _, sha = repo.head()
    texts = repo.read_tree(sha)
    assert texts == POLICY == read_policy_dir(tmp_path)
    assert list(texts) == sorted(texts)


def test_read_tree_reads_at_the_commit_not_the_head(fake: FakeGitLab, repo: PolicyRepo) -> None:
    _, first = repo.head()
    fake.commit("platform/policy", {"issuers.yaml": "kind: Issuer\nname: changed\n", "bindings/team/a.yaml": None})
    assert repo.read_tree(first) == POLICY
    later = repo.read_tree(repo.head()[1])
    assert later["issuers.yaml"].endswith("changed\n") and "bindings/team/a.yaml" not in later


def test_unchanged_files_are_not_downloaded_again(fake: FakeGitLab, repo: PolicyRepo) -> None:
    repo.read_tree(repo.head()[1])
    raw = "/projects/:id/repository/files/:path/raw"
    assert len(fake.api_calls(raw)) == 3
    sha = fake.commit("platform/policy", {"issuers.yaml": "kind: Issuer\nname: v2\n"})
    fake.clear_api_calls()
    assert repo.read_tree(sha)["issuers.yaml"] == "kind: Issuer\nname: v2\n"
    assert [c.path.rsplit("/", 2)[1] for c in fake.api_calls(raw)] == ["issuers.yaml"]


def test_a_large_tree_is_paged(fake: FakeGitLab, repo: PolicyRepo) -> None:
    fake.max_per_page = 2
    assert repo.read_tree(repo.head()[1]) == POLICY
    assert len(fake.api_calls("/projects/:id/repository/tree")) > 2


def test_files_that_cannot_load_are_policy_errors(fake: FakeGitLab, repo: PolicyRepo) -> None:
    broken = fake.commit("platform/policy", {"roles.yaml": b"kind: Role\nname: \xff\n"})
    with pytest.raises(PolicyInvalid) as caught:
        repo.read_tree(broken)
    assert [(e.file, e.line) for e in caught.value.errors] == [("roles.yaml", 1)]
    assert "not UTF-8" in str(caught.value)

    empty = fake.commit("platform/policy", dict.fromkeys([*POLICY, "roles.yaml"]))
    with pytest.raises(PolicyInvalid, match="no policy files"):
        repo.read_tree(empty)


def test_a_missing_project_is_a_repo_error_and_an_outage_is_unavailable(
    fake: FakeGitLab, source: GitLabSource, repo: PolicyRepo
) -> None:
    with pytest.raises(PolicyRepoError, match="not found"):
        PolicyRepo(source, "platform/nothing").head()
    _, sha = repo.head()
    fake.set_down(True)
    with pytest.raises(GitLabUnavailable):
        repo.read_tree(sha)


def test_statuses_are_posted_on_the_commit_with_our_name(fake: FakeGitLab, repo: PolicyRepo) -> None:
    _, sha = repo.head()
    repo.post_status(sha, "pending", "compiling")
    repo.post_status(sha, "success", "snapshot v1234 served", target_url="https://cp.example.com/status")
    posted = fake.statuses("platform/policy", sha)
    assert [(s["name"], s["status"], s["description"]) for s in posted] == [
        (STATUS_NAME, "pending", "compiling"),
        (STATUS_NAME, "success", "snapshot v1234 served"),
    ]
    assert posted[1]["target_url"] == "https://cp.example.com/status" and posted[1]["ref"] == "main"
    assert len(fake.api_calls("/projects/:id/statuses/:sha", method="POST")) == 2


def test_long_descriptions_are_truncated_with_an_ellipsis(fake: FakeGitLab, repo: PolicyRepo) -> None:
    _, sha = repo.head()
    errors = "\n".join(f"bindings/team/a.yaml:{n}: roles: unknown role 'r{n}'" for n in range(40))
    repo.post_status(sha, "failed", errors)
    description = fake.statuses("platform/policy", sha)[0]["description"]
    assert len(description) == 255 and description.endswith("…")
    assert description.startswith("bindings/team/a.yaml:0: roles")
    assert truncate_description("short") == "short" and truncate_description("x" * 255) == "x" * 255


def test_the_size_bounds_of_a_directory_apply_to_a_gitlab_tree(fake: FakeGitLab, source: GitLabSource) -> None:
    fake.add_project("platform/policy", files={**FILES, "big.yaml": "# " + "x" * 1_000_000 + "\n"})
    repo = PolicyRepo(source, "platform/policy", ReadLimits(max_file_bytes=4096))
    with pytest.raises(PolicyInvalid) as caught:
        repo.read_tree(repo.head()[1])
    (error,) = caught.value.errors
    assert str(error).startswith("big.yaml:1: file is larger than the 4096-byte limit (")
    assert max(len(blob) for blob in repo._blobs.values()) <= 4096 + READ_CHUNK  # the download was cut short
    repo = PolicyRepo(source, "platform/policy", ReadLimits(max_tree_bytes=1_000_010))
    with pytest.raises(PolicyInvalid, match="more than the 1000010-byte limit"):
        repo.read_tree(repo.head()[1])


def test_only_the_leader_posts_the_verdict_and_a_new_leader_posts_it_at_its_next_read(
    fake: FakeGitLab, repo: PolicyRepo
) -> None:
    """Replicas read the same commit and reach the same verdict; one status from the fleet, not one each."""
    leading = [False]
    source = GitLabPolicySource(repo, is_leader=lambda: leading[0])
    files = source.read()
    source.report(files, True, "accepted")
    assert fake.statuses("platform/policy", files.revision or "") == []
    leading[0] = True
    source.report(source.read(), True, "accepted")
    assert [s["status"] for s in fake.statuses("platform/policy", files.revision or "")] == ["success"]
