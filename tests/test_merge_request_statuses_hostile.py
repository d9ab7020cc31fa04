"""Serve's statuses on merge-request heads against hostile merge requests and a flaky GitLab: anyone who can push
a branch and open an MR into the policy project makes the leader read that head, with the token and the API
budget (rate bound) it shares with the served policy. What an MR costs serve must stay bounded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.model.errors import PolicyInvalid
from controlplane.runtime.merge_request_statuses import HEAD_FLOOR_BYTES, MergeRequestStatuses
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_repo import STATUS_NAME, PolicyRepo
from controlplane.sources.policy_dir import ReadLimits, read_policy_dir
from tests.support.fake_gitlab import FakeGitLab

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart"
POLICY = {p.name: p.read_text() for p in EXAMPLE.glob("*.yaml")}
PROJECT = "platform/policy"
RAW = "/projects/:id/repository/files/:path/raw"


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as server:
        server.add_project(PROJECT, files=POLICY, branches=["huge"])
        yield server


def _checker(fake: FakeGitLab, limits: ReadLimits) -> MergeRequestStatuses:
    source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=0)
    return MergeRequestStatuses(PolicyRepo(source, PROJECT, limits), max_requests=3)


def _states(fake: FakeGitLab, sha: str) -> list[tuple[str, str]]:
    return [(s["status"], s["description"]) for s in fake.statuses(PROJECT, sha) if s["name"] == STATUS_NAME]


def test_a_head_over_the_tree_bound_is_not_downloaded_past_it(fake: FakeGitLab) -> None:
    """Each file is one API request and up to a file's bound of memory: the reading stops where the tree's bound
    is passed, not after every file of the head is held."""
    limits = ReadLimits(max_file_bytes=4096, max_tree_bytes=16 * 1024)
    filler = {f"zz/{n:03}.yaml": f"# {n:03}\n" + "#" * 3000 + "\n" for n in range(60)}
    head = fake.commit(PROJECT, filler, branch="huge")
    fake.add_merge_request(PROJECT, "huge")
    checker = _checker(fake, limits)
    assert checker.check_once() == 1
    ((state, description),) = _states(fake, head)
    assert state == "failed" and "size limit" in description
    assert len(fake.api_calls(RAW)) <= len(POLICY) + 16 * 1024 // 3000 + 1


def test_the_same_blob_many_times_is_downloaded_once(fake: FakeGitLab) -> None:
    copies = {f"copies/{n:04}.yaml": "# nothing\n" for n in range(200)}
    head = fake.commit(PROJECT, copies, branch="huge")
    fake.add_merge_request(PROJECT, "huge")
    checker = _checker(fake, ReadLimits())
    assert checker.check_once() == 1
    assert _states(fake, head)[0][0] == "success"
    assert len(fake.api_calls(RAW)) <= len(POLICY) + 1


def test_a_head_of_more_files_than_a_tree_may_hold_costs_no_file_request(fake: FakeGitLab, tmp_path: Path) -> None:
    """Empty files pass any byte bound, but each is a request: over `max_files` the head fails unread, and
    `mr-check` (the same limits on a directory) gives the same verdict in CI."""
    limits = ReadLimits(max_files=50)
    many = {f"many/{n:03}.yaml": f"# {n}\n" for n in range(60)}
    head = fake.commit(PROJECT, many, branch="huge")
    fake.add_merge_request(PROJECT, "huge")
    assert _checker(fake, limits).check_once() == 1
    ((state, description),) = _states(fake, head)
    assert state == "failed" and "66 policy files, more than the 50" in description
    assert fake.api_calls(RAW) == []

    for name, text in {**POLICY, **many}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(PolicyInvalid) as raised:
        read_policy_dir(tmp_path, limits)
    assert "66 policy files, more than the 50" in str(raised.value.errors[0])


def test_many_merge_requests_opened_at_once_do_not_starve_the_older_ones(fake: FakeGitLab) -> None:
    """Seven MRs, three heads judged per round: every head gets its verdict within three rounds, each once, and
    a round with nothing new posts nothing (no status posted again on a head still open)."""
    shas = []
    for n in range(7):
        fake.add_branch(PROJECT, f"b{n}")
        shas.append(fake.commit(PROJECT, {f"r{n}.yaml": f"# {n}\n"}, branch=f"b{n}"))
        fake.add_merge_request(PROJECT, f"b{n}")
    checker = _checker(fake, ReadLimits())
    assert [checker.check_once() for _ in range(5)] == [3, 3, 1, 0, 0]
    assert [len(_states(fake, sha)) for sha in shas] == [1] * 7
    assert len(fake.api_calls("/projects/:id/merge_requests")) <= 5 * 3  # pages of 3, bounded per round


def test_a_head_weighs_at_most_half_again_the_served_policy_or_the_floor(fake: FakeGitLab) -> None:
    """Parsing and compiling a head costs the leader memory and CPU many times its size, in the process serving
    Envoy: a head far larger than the served policy fails unread past the bound, whatever the tree bound allows."""
    served = sum(len(t) for t in POLICY.values())
    big = {f"big/{n}.yaml": "#" * 200_000 + "\n" for n in range(8)}  # 1.6 MB: over the 1 MiB floor
    head = fake.commit(PROJECT, big, branch="huge")
    fake.add_merge_request(PROJECT, "huge")
    source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=0)
    checker = MergeRequestStatuses(PolicyRepo(source, PROJECT), max_requests=3, served_bytes=lambda: served)
    assert checker.check_once() == 1
    ((state, description),) = _states(fake, head)
    assert state == "failed" and f"more than the {HEAD_FLOOR_BYTES}-byte limit" in description
    assert len(fake.api_calls(RAW)) <= len(POLICY) + 6  # read no further than the bound

    # A served policy that large itself: its MRs may be as large, half again.
    checker = MergeRequestStatuses(PolicyRepo(source, PROJECT), max_requests=3, served_bytes=lambda: 1_200_000)
    fixed = fake.commit(PROJECT, {"big/0.yaml": None}, branch="huge")
    assert checker.check_once() == 1
    assert _states(fake, fixed)[0][0] == "success"


def test_an_mr_whose_head_is_the_branchs_own_head_leaves_its_status_to_the_served_verdict(fake: FakeGitLab) -> None:
    """The default branch's head carries the served policy's verdict (keys, secrets included); an MR pointing at
    that same commit (nothing to merge yet, or its branch fast-forwarded) must not overwrite it with its own."""
    main_head = fake.head(PROJECT)
    fake.add_branch(PROJECT, "same")  # at main's head
    fake.add_merge_request(PROJECT, "same")
    checker = _checker(fake, ReadLimits())
    assert checker.check_once() == 0
    assert _states(fake, main_head) == []


def test_a_leader_demoted_during_a_round_posts_no_more(fake: FakeGitLab) -> None:
    """A round judges up to max_requests heads, seconds each: leadership can move meanwhile, and then two
    replicas would post. The leader asks again before each status."""
    for n in range(3):
        fake.add_branch(PROJECT, f"b{n}")
        fake.commit(PROJECT, {f"r{n}.yaml": f"# {n}\n"}, branch=f"b{n}")
        fake.add_merge_request(PROJECT, f"b{n}")
    leader = iter([True, True, False])
    checker = _checker(fake, ReadLimits())
    checker.is_leader = lambda: next(leader, False)
    assert checker.check_once() == 2
    assert len(fake.api_calls("/projects/:id/statuses/:sha")) == 2


def test_a_restarted_or_new_leader_does_not_judge_and_post_again(fake: FakeGitLab) -> None:
    """The memory of heads judged is the process's: a restart, or the lease passing to another replica, would
    read every open MR's tree again and add a second status to each. GitLab's own statuses say what was done."""
    for n in range(3):
        fake.add_branch(PROJECT, f"b{n}")
        fake.commit(PROJECT, {f"r{n}.yaml": f"# {n}\n"}, branch=f"b{n}")
        fake.add_merge_request(PROJECT, f"b{n}")
    assert _checker(fake, ReadLimits()).check_once() == 3
    reads = len(fake.api_calls("/projects/:id/repository/tree"))
    assert _checker(fake, ReadLimits()).check_once() == 0  # a new process: nothing posted, no tree read
    assert len(fake.api_calls("/projects/:id/statuses/:sha")) == 3
    assert len(fake.api_calls("/projects/:id/repository/tree")) == reads


def test_a_status_someone_else_posted_does_not_stand_for_the_verdict(fake: FakeGitLab) -> None:
    """A developer's token can post a `controlplane` status too: `success` on a broken head must not make serve
    take the head for judged. Only the token's own status counts."""
    head = fake.commit(PROJECT, {"broken.yaml": "kind: Binding\nname: b\nroles: [nope]\nsubjects: []\n"}, branch="huge")
    fake.add_merge_request(PROJECT, "huge")
    fake.add_status(PROJECT, head, "success", name=STATUS_NAME, author="mallory")
    assert _checker(fake, ReadLimits()).check_once() == 1
    assert fake.statuses(PROJECT, head)[-1]["status"] == "failed"
    assert _checker(fake, ReadLimits()).check_once() == 0  # and now it is ours: judged once
