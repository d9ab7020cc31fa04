"""Serve's `controlplane` commit status on the heads of open merge requests into the watched policy branch,
against the fake GitLab: judged read-only, each head once, bounded, GitLab errors backed off and counted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.retry import Backoff
from controlplane.runtime.gitlab_link import GitLabLink, PolicyProject
from controlplane.runtime.merge_request_statuses import MergeRequestStatuses
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_client import GitLabUnavailable
from controlplane.sources.gitlab_events import MergeRequestEvent, PushEvent
from controlplane.sources.gitlab_repo import STATUS_NAME, PolicyRepo
from controlplane.telemetry.metrics import REGISTRY
from tests.support.fake_gitlab import FakeGitLab

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart"
POLICY = {p.name: p.read_text() for p in EXAMPLE.glob("*.yaml")}
BROKEN = (
    "kind: Binding\nname: broken\nissuer: gitlab\nroles: [no-such-role]\nsubjects:\n  - project: acme/web/frontend\n"
)
PROJECT = "platform/policy"
ROLE = "kind: Role\nname: r\nbackend: reports-api\nrules:\n  - methods: [GET]\n    paths: [/x]\n"


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as server:
        server.add_project(PROJECT, files=POLICY, branches=["good", "bad", "other-target"])
        yield server


@pytest.fixture
def checker(fake: FakeGitLab) -> MergeRequestStatuses:
    source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=0)
    return MergeRequestStatuses(PolicyRepo(source, PROJECT), max_requests=3)


def _states(fake: FakeGitLab, sha: str) -> list[tuple[str, str]]:
    return [(s["status"], s["description"]) for s in fake.statuses(PROJECT, sha) if s["name"] == STATUS_NAME]


def _errors() -> float:
    return REGISTRY.get_sample_value("controlplane_merge_request_statuses_total", {"result": "error"}) or 0.0


def test_open_merge_requests_into_the_branch_get_a_verdict_on_their_head_once(
    fake: FakeGitLab, checker: MergeRequestStatuses
) -> None:
    good = fake.commit(PROJECT, {"extra.yaml": ROLE}, branch="good")
    bad = fake.commit(PROJECT, {"broken.yaml": BROKEN}, branch="bad")
    fake.add_merge_request(PROJECT, "good")
    fake.add_merge_request(PROJECT, "bad")
    elsewhere = fake.add_merge_request(PROJECT, "bad", target_branch="other-target")
    closed = fake.add_merge_request(PROJECT, "good")
    fake.set_merge_request_state(PROJECT, closed, "closed")
    main_head = fake.head(PROJECT)

    assert checker.check_once() == 2  # two heads: the MR into another branch and the closed one are not judged
    assert _states(fake, good) == [("success", "policy valid (merge request !1; served once merged)")]
    assert _states(fake, bad) == [("failed", "broken.yaml:4: roles[0]: no Role named 'no-such-role'")]
    assert _states(fake, main_head) == []  # the served branch is not this checker's
    assert elsewhere == 3

    assert checker.check_once() == 0  # each head once: nothing posted again
    assert len(fake.api_calls("/projects/:id/statuses/:sha")) == 2
    fixed = fake.commit(PROJECT, {"broken.yaml": None}, branch="bad")  # a push to the MR: its new head is judged
    assert checker.check_once() == 1
    assert _states(fake, fixed)[0][0] == "success"


def test_at_most_max_requests_per_round_and_a_bounded_memory(fake: FakeGitLab, checker: MergeRequestStatuses) -> None:
    shas = []
    for n in range(5):
        fake.add_branch(PROJECT, f"b{n}")
        shas.append(fake.commit(PROJECT, {f"r{n}.yaml": "# nothing\n"}, branch=f"b{n}"))
        fake.add_merge_request(PROJECT, f"b{n}")
    assert checker.check_once() == 3
    assert len(fake.api_calls("/projects/:id/merge_requests")) == 1  # one page of max_requests
    assert fake.api_calls("/projects/:id/merge_requests")[0].query["per_page"] == ["3"]
    assert sum(bool(_states(fake, sha)) for sha in shas) == 3
    assert len(checker._judged) <= 4 * checker.max_requests


def test_forks_are_left_out(fake: FakeGitLab, checker: MergeRequestStatuses) -> None:
    fake.add_merge_request(PROJECT, "good")
    # The fake has no forks; a merge request whose source project differs is what GitLab sends for one.
    original = fake._mr_json

    def forked(project, mr):  # type: ignore[no-untyped-def]
        return {**original(project, mr), "source_project_id": 9999}

    fake._mr_json = forked  # type: ignore[method-assign]
    assert checker.check_once() == 0
    assert fake.api_calls("/projects/:id/statuses/:sha") == []


def test_a_gitlab_outage_is_backed_off_counted_and_never_ends_the_loop(
    fake: FakeGitLab, checker: MergeRequestStatuses
) -> None:
    bad = fake.commit(PROJECT, {"broken.yaml": BROKEN}, branch="bad")
    fake.add_merge_request(PROJECT, "bad")
    fake.set_down()
    with pytest.raises(GitLabUnavailable):
        checker.check_once()
    before = _errors()
    checker.backoff = Backoff(base_seconds=0.01, cap_seconds=0.01, jitter=False)

    async def scenario() -> None:
        stopping = asyncio.Event()
        loop = asyncio.ensure_future(checker.run(0.01, stopping))
        deadline = asyncio.get_running_loop().time() + 10
        while _errors() < before + 2:  # two rounds failed: the loop goes on
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        fake.set_down(False)
        while not _states(fake, bad):
            assert asyncio.get_running_loop().time() < deadline
            checker.wake()
            await asyncio.sleep(0.01)
        stopping.set()
        await asyncio.wait_for(loop, 5)

    asyncio.run(scenario())
    assert _states(fake, bad)[0][0] == "failed"


def test_followers_post_nothing(fake: FakeGitLab, checker: MergeRequestStatuses) -> None:
    fake.add_merge_request(PROJECT, "good")
    asked = []
    checker.is_leader = lambda: bool(asked.append(True))  # always False: a follower, counting its rounds

    async def scenario() -> None:
        stopping = asyncio.Event()
        loop = asyncio.ensure_future(checker.run(0.01, stopping))
        deadline = asyncio.get_running_loop().time() + 10
        while len(asked) < 3:  # three rounds went by
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        stopping.set()
        await asyncio.wait_for(loop, 5)

    asyncio.run(scenario())
    assert fake.api_calls() == []


async def test_the_policy_projects_pushes_and_merge_request_events_start_a_round() -> None:
    async def nothing() -> None:
        return None

    pushed: list[str] = []
    link = GitLabLink(
        on_inventory_change=nothing,
        spawn=lambda coro, name: asyncio.ensure_future(coro),
        on_policy_push=nothing,
        policy_project=PolicyProject("infra/policy", "main"),
    )
    link.on_merge_request = lambda: pushed.append("round")

    def push(path: str, ref: str, *, tag: bool = False) -> PushEvent:
        return PushEvent(
            idempotency_key=None, project_id=7, project_path=path, ref=ref, before="0" * 40, after="a" * 40, is_tag=tag
        )

    await link.on_event(push("infra/policy", "refs/heads/change"))
    await link.on_event(push("infra/policy", "refs/heads/main"))
    await link.on_event(push("acme/other", "refs/heads/change"))
    assert pushed == ["round", "round"]
    mr = MergeRequestEvent(idempotency_key=None, project_id=7, target_project_id=7, source_project_id=7, action="open")
    await link.on_event(mr)
    assert pushed == ["round", "round"]  # no path in it, and 7 is not the project's path: not the policy project
    await link.on_event(replace(mr, project_path="infra/policy"))
    assert pushed == ["round", "round", "round"]
    link.policy_project = PolicyProject(7, "main")
    await link.on_event(mr)
    assert pushed == ["round", "round", "round", "round"]
