"""The GitLab inventory source, driven through python-gitlab against the fake GitLab's real HTTP API.

Everything here goes over loopback HTTP exactly as production does (pagination headers, 429s, 503s, refused
connections), so what is proven is the behaviour against GitLab's wire format, not against a mocked client.
Waits are measured (from the fake's request log, on the monotonic clock), never slept.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.model.inventory import Environment, Group, Ref
from controlplane.sources.gitlab import GitLabSource, tag_is_protected
from controlplane.sources.gitlab_client import (
    GitLabRefused,
    GitLabTokenError,
    GitLabUnavailable,
    endpoint_template,
    token_from,
)
from controlplane.sources.rate_limit import TokenBucket
from controlplane.telemetry.metrics import REGISTRY
from tests.support.backends import http_request
from tests.support.fake_gitlab import FakeGitLab
from tests.support.ports import poll_until

FAST = 1000.0  # requests per second: no rate bound in tests that are not about it


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as gitlab:
        yield gitlab


def make_source(fake: FakeGitLab, *, token: str | None = None, rate: float = FAST, retries: int = 3) -> GitLabSource:
    return GitLabSource(
        fake.api_url, token or fake.api_token, requests_per_second=rate, max_retries=retries, timeout=5.0
    )


@pytest.fixture
def source(fake: FakeGitLab) -> GitLabSource:
    return make_source(fake)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def acme(fake: FakeGitLab) -> dict[str, int]:
    """acme/{platform/{infra}, web}: projects at every depth, one archived, one outside acme."""
    ids = {
        "deployer": fake.add_project(
            "acme/platform/deployer",
            branches=["main", "dev", "release/1.2"],
            protected=["main", "release/*"],
            tags=["v1.0", "v1.1", "nightly"],
            protected_tags=["v*"],
            environments={"production": "production", "review/feature-x": "development"},
            protected_environments=["production"],
        ),
        "infra": fake.add_project("acme/platform/infra/terraform"),
        "site": fake.add_project("acme/web/site", archived=True, default_branch="trunk"),
        "top": fake.add_project("acme/handbook"),
        "tool": fake.add_project("other/tool"),
    }
    return ids


# --- inventory


def test_full_inventory_has_every_subgroup_and_project_with_refs_and_environments(
    fake: FakeGitLab, source: GitLabSource
) -> None:
    ids = acme(fake)
    before = time.time()
    inventory = source.fetch_inventory(groups=["acme", "missing-group"], projects=["other/tool", ids["top"], 999])

    groups = {g.path: g for g in inventory.groups}
    assert set(groups) == {"acme", "acme/platform", "acme/platform/infra", "acme/web"}
    assert groups["acme"].parent_id is None
    assert groups["acme/platform/infra"].parent_id == groups["acme/platform"].id
    assert [p.id for p in inventory.projects] == sorted(ids.values())
    assert [g.id for g in inventory.groups] == sorted(g.id for g in inventory.groups)

    deployer = inventory.project_by_id(ids["deployer"])
    assert deployer is not None
    assert deployer.path == "acme/platform/deployer" and deployer.namespace_id == groups["acme/platform"].id
    assert deployer.default_branch == "main" and not deployer.archived
    assert deployer.refs == (
        Ref("dev", "branch", False),
        Ref("main", "branch", True),
        Ref("release/1.2", "branch", True),
        Ref("nightly", "tag", False),
        Ref("v1.0", "tag", True),
        Ref("v1.1", "tag", True),
    )
    assert deployer.environments == (
        Environment("production", "production", True),
        Environment("review/feature-x", "development", False),
    )
    site = inventory.project_by_path("acme/web/site")
    assert site is not None and site.archived and site.default_branch == "trunk"
    assert inventory.project_by_path("other/tool") is not None  # named explicitly, outside every group
    assert inventory.fetched_at is not None and before <= inventory.fetched_at <= time.time()
    assert inventory.live and not inventory.stale


def test_a_project_named_again_is_read_once(fake: FakeGitLab, source: GitLabSource) -> None:
    ids = acme(fake)
    source.fetch_inventory(groups=["acme", "acme/platform"], projects=[ids["deployer"], "acme/handbook"])
    assert len(fake.api_calls("/groups/:id")) == 1  # acme/platform came with acme
    assert len(fake.api_calls("/projects/:id")) == 0  # both came with the group listing


def test_missing_groups_and_projects_are_absent_not_errors(fake: FakeGitLab, source: GitLabSource) -> None:
    assert source.fetch_project("nobody/nothing") is None
    assert source.fetch_project(424242) is None
    assert source.fetch_group_tree("nobody") == ([], [])
    inventory = source.fetch_inventory(groups=["nobody"], projects=["nobody/nothing"])
    assert inventory.projects == () and inventory.groups == () and inventory.live


def test_fetch_group_tree_and_project(fake: FakeGitLab, source: GitLabSource) -> None:
    ids = acme(fake)
    groups, projects = source.fetch_group_tree("acme/platform")
    assert [g.path for g in groups] == ["acme/platform", "acme/platform/infra"]
    assert isinstance(groups[0], Group) and groups[1].parent_id == groups[0].id
    assert sorted(p.id for p in projects) == sorted([ids["deployer"], ids["infra"]])
    project = source.fetch_project("acme/platform/deployer")
    assert project is not None and project.id == ids["deployer"]


def test_renamed_project_keeps_answering_at_its_old_path_until_the_path_is_reused(
    fake: FakeGitLab, source: GitLabSource
) -> None:
    old = fake.add_project("acme/app")
    fake.rename_project(old, "app-renamed")
    moved = source.fetch_project("acme/app")
    assert moved is not None and (moved.id, moved.path) == (old, "acme/app-renamed")

    fake.transfer_project(old, "acme/platform")
    moved = source.fetch_project("acme/app")
    assert moved is not None and moved.path == "acme/platform/app-renamed"
    assert moved.namespace_id == source.fetch_group_tree("acme/platform")[0][0].id

    squatter = fake.add_project("acme/app")
    reused = source.fetch_project("acme/app")
    assert reused is not None and reused.id == squatter != old


def test_archived_deleted_and_unprotected_show_on_the_next_read(fake: FakeGitLab, source: GitLabSource) -> None:
    pid = fake.add_project("acme/app", branches=["main", "hotfix"], protected=["main", "hotfix"])
    fake.archive_project(pid)
    fake.unprotect_branch(pid, "hotfix")
    fake.delete_branch(pid, "main")
    project = source.fetch_project(pid)
    assert project is not None and project.archived
    assert project.refs == (Ref("hotfix", "branch", False),)
    fake.delete_project(pid)
    assert source.fetch_project(pid) is None


def test_protected_environments_unavailable_means_unprotected_and_is_logged_once(
    fake: FakeGitLab, source: GitLabSource, caplog: pytest.LogCaptureFixture
) -> None:
    pid = fake.add_project("acme/app", environments=["production"], protected_environments=["production"])
    fake.premium = False
    with caplog.at_level(logging.INFO, logger="controlplane.gitlab"):
        first = source.fetch_project(pid)
        second = source.fetch_project(pid)
    assert first == second
    assert first is not None and first.environments == (Environment("production", "production", False),)
    notices = [r for r in caplog.records if "protected environments" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.INFO
    assert "403" in notices[0].getMessage() and "unprotected" in notices[0].getMessage()


def test_the_fake_answers_403_on_environments_when_the_feature_is_off(fake: FakeGitLab) -> None:
    pid = fake.add_project("acme/app", environments=["production"])
    headers = {"PRIVATE-TOKEN": fake.api_token}

    def get(path: str) -> tuple[int, Any]:
        answer = http_request(f"{fake.api_url}/api/v4/projects/{pid}{path}", headers=headers)
        return answer.status, json.loads(answer.body)

    assert get("/environments")[0] == 200 and get("")[1]["environments_access_level"] == "enabled"
    fake.set_environments_enabled(pid, False)
    assert get("/environments") == (403, {"message": "403 Forbidden"})
    assert get("")[1]["environments_access_level"] == "disabled"


def test_a_project_with_environments_off_has_none_and_the_rest_is_still_read(
    fake: FakeGitLab, source: GitLabSource, caplog: pytest.LogCaptureFixture
) -> None:
    """GitLab answers 403 on /environments when a project turned the feature off: that project has no
    environment (nothing environment-scoped is granted on it), and it must not fail the whole read."""
    quiet = fake.add_project("acme/quiet", environments=["production"])
    busy = fake.add_project("acme/busy", branches=["main", "hotfix"], protected=["main", "hotfix"])
    fake.set_environments_enabled(quiet, False)
    with caplog.at_level(logging.INFO, logger="controlplane.gitlab"):
        first = source.fetch_inventory(groups=["acme"], projects=[])
        fake.unprotect_branch(busy, "hotfix")
        second = source.fetch_inventory(groups=["acme"], projects=[])
    assert [p.environments for p in first.projects if p.id == quiet] == [()]
    hotfix = [r for p in second.projects if p.id == busy for r in p.refs or () if r.name == "hotfix"]
    assert hotfix == [Ref("hotfix", "branch", False)]
    assert len(fake.api_calls("/projects/:id/environments")) == 4  # once per project per read, never a loop
    notices = [r for r in caplog.records if "environments" in r.getMessage() and "acme/quiet" in r.getMessage()]
    assert len(notices) == 1 and "403" in notices[0].getMessage()  # once, not on every read


def test_protected_ref_wildcards_are_gitlabs() -> None:
    """GitLab's `*` matches any run of characters, `/` included; everything else is literal."""
    assert tag_is_protected("v1.2.3", ["v*"])
    assert tag_is_protected("release/2026/01", ["release/*"])
    assert tag_is_protected("exact", ["other", "exact"])
    assert not tag_is_protected("v1.2.3", ["v1.2"])
    assert not tag_is_protected("v1x2", ["v1.2"])  # `.` is literal
    assert not tag_is_protected("anything", [])


# --- paging


def test_every_list_is_read_page_by_page(fake: FakeGitLab, source: GitLabSource) -> None:
    branches = [f"b{i}" for i in range(5)]
    for i in range(5):
        fake.add_project(f"big/p{i}", branches=branches, tags=["v1", "v2", "x"], protected_tags=["v*"])
    fake.add_group("big/sub1")
    fake.add_group("big/sub2")
    fake.add_group("big/sub3")
    fake.max_per_page = 2

    inventory = source.fetch_inventory(groups=["big"], projects=[])

    assert len(inventory.projects) == 5 and len(inventory.groups) == 4
    for project in inventory.projects:
        assert project.refs is not None
        assert {r.name for r in project.refs if r.type == "branch"} == {*branches, "main"}
        assert {r.name for r in project.refs if r.protected} == {"main", "v1", "v2"}
    assert len(fake.api_calls("/groups/:id/projects")) == 3
    assert len(fake.api_calls("/groups/:id/descendant_groups")) == 2
    assert len(fake.api_calls("/projects/:id/repository/branches")) == 5 * 3
    pages = [c.query.get("page", ["1"])[0] for c in fake.api_calls("/groups/:id/projects")]
    assert pages == ["1", "2", "3"]


# --- failures, retries, rate limits


def test_429_retry_after_is_obeyed(fake: FakeGitLab, source: GitLabSource) -> None:
    pid = fake.add_project("acme/app")
    waits = metric("controlplane_gitlab_rate_limit_waits_total")
    seconds = metric("controlplane_gitlab_rate_limit_wait_seconds_total")
    fake.rate_limit_next(1, retry_after=1)

    started = time.monotonic()
    assert source.fetch_project(pid) is not None
    assert time.monotonic() - started < 10  # the deadline: it did not hang

    limited, retried = fake.api_calls("/projects/:id")[:2]
    assert (limited.status, retried.status) == (429, 200)
    assert retried.at - limited.at >= 1.0  # measured on the fake's side: the client waited as asked
    assert metric("controlplane_gitlab_rate_limit_waits_total") == waits + 1
    assert metric("controlplane_gitlab_rate_limit_wait_seconds_total") == pytest.approx(seconds + 1.0)


def test_rate_limited_past_every_retry_is_unavailable(fake: FakeGitLab) -> None:
    pid = fake.add_project("acme/app")
    fake.rate_limit_next(10, retry_after=0)
    with pytest.raises(GitLabUnavailable, match="429"):
        make_source(fake, retries=2).fetch_project(pid)
    assert [c.status for c in fake.api_calls("/projects/:id")] == [429, 429, 429]


def test_transient_errors_are_retried_then_succeed(fake: FakeGitLab, source: GitLabSource) -> None:
    pid = fake.add_project("acme/app")
    failed = metric("controlplane_gitlab_requests_total", endpoint="/projects/:id", status="503")
    fake.fail_next(2, status=503)
    assert source.fetch_project(pid) is not None
    assert [c.status for c in fake.api_calls("/projects/:id")] == [503, 503, 200]
    assert metric("controlplane_gitlab_requests_total", endpoint="/projects/:id", status="503") == failed + 2


def test_gitlab_down_is_unavailable_after_the_retries(fake: FakeGitLab) -> None:
    fake.add_project("acme/app")
    fake.set_down(True)
    with pytest.raises(GitLabUnavailable, match="503 after 3 attempts"):
        make_source(fake, retries=2).fetch_inventory(groups=["acme"], projects=[])
    assert len(fake.api_calls()) == 3


def test_connection_refused_is_unavailable_then_recovers(fake: FakeGitLab, source: GitLabSource) -> None:
    pid = fake.add_project("acme/app")
    errors = metric("controlplane_gitlab_requests_total", endpoint="/projects/:id", status="error")
    fake.set_down(True, refuse=True)
    with pytest.raises(GitLabUnavailable, match="ConnectionError after 4 attempts"):
        source.fetch_project(pid)
    assert metric("controlplane_gitlab_requests_total", endpoint="/projects/:id", status="error") == errors + 4
    fake.set_down(False)
    assert source.fetch_project(pid) is not None  # same port, same client


def test_a_refused_token_is_reported_as_such(fake: FakeGitLab) -> None:
    with pytest.raises(GitLabRefused, match="refused the API token"):
        make_source(fake, token="glpat-wrong").fetch_project(1)


def test_request_rate_is_bounded(fake: FakeGitLab) -> None:
    pid = fake.add_project("acme/app")
    source = make_source(fake, rate=20.0)
    started = time.monotonic()
    for _ in range(10):
        source.fetch_project(pid)
    elapsed = time.monotonic() - started
    n = len(fake.api_calls())
    assert n >= 40
    assert elapsed >= (n - source.bucket.burst) / source.bucket.rate
    assert elapsed < 30  # the deadline


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(2.0, 3, clock=lambda: now[0], sleep=sleep)
    waits = [bucket.acquire() for _ in range(5)]
    assert waits == [0.0, 0.0, 0.0, 0.5, 0.5] and slept == [0.5, 0.5]
    now[0] += 10  # idle: refills to the burst, no more
    assert [bucket.acquire() for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


# --- secrets and metrics


def test_the_token_never_reaches_logs_errors_or_reprs(fake: FakeGitLab, caplog: pytest.LogCaptureFixture) -> None:
    pid = fake.add_project("acme/app", environments=["production"])
    fake.premium = False
    wrong = "glpat-wrong-" + fake.api_token[::-1]
    failures: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        good = make_source(fake, retries=1)
        good.fetch_project(pid)
        fake.fail_next(1)
        good.fetch_project(pid)
        for source in (make_source(fake, token=wrong, retries=1), good):
            if source is good:
                fake.set_down(True)
            with pytest.raises(GitLabUnavailable) as caught:
                source.fetch_project(pid)
            failures.append(caught.value)
    fake.set_down(False)
    texts = [caplog.text, repr(good)] + ["".join(traceback.format_exception(exc)) for exc in failures]
    for text in texts:
        assert fake.api_token not in text and wrong not in text
    assert "retry" in caplog.text  # the logs were captured: the assertion above is not vacuous


def test_endpoint_labels_are_templates_never_ids_or_paths(fake: FakeGitLab, source: GitLabSource) -> None:
    acme(fake)
    source.fetch_inventory(groups=["acme"], projects=["other/tool"])
    labels = {
        sample.labels["endpoint"]
        for family in REGISTRY.collect()
        if family.name == "controlplane_gitlab_requests"
        for sample in family.samples
    }
    assert "/projects/:id/repository/branches" in labels and "/groups/:id/descendant_groups" in labels
    for label in labels:
        assert "acme" not in label and "tool" not in label and not any(ch.isdigit() for ch in label), label
    assert metric("controlplane_gitlab_request_duration_seconds_count", endpoint="/projects/:id/environments") > 0


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/api/v4/projects/acme%2Fapp", "/projects/:id"),
        ("/api/v4/projects/42/repository/branches", "/projects/:id/repository/branches"),
        ("/api/v4/projects/42/repository/branches/tags", "/projects/:id/repository/branches/:name"),
        ("/api/v4/projects/42/repository/files/a%2Fb.yaml/raw", "/projects/:id/repository/files/:path/raw"),
        ("/api/v4/projects/42/statuses/abc123", "/projects/:id/statuses/:sha"),
        ("/api/v4/groups/acme%2Fplatform/descendant_groups", "/groups/:id/descendant_groups"),
        ("/api/v4/projects/42/secret-thing/acme", "/projects/:id/:param/:param"),
        ("/elsewhere/acme", "other"),
    ],
)
def test_endpoint_template(path: str, template: str) -> None:
    assert endpoint_template(path) == template


# --- the token's source


def test_token_from_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "token"
    file.write_text("glpat-from-file\n")
    monkeypatch.setenv("CP_GITLAB_TOKEN", " glpat-from-env ")
    assert token_from("CP_GITLAB_TOKEN", str(file)) == "glpat-from-env"
    monkeypatch.delenv("CP_GITLAB_TOKEN")
    assert token_from("CP_GITLAB_TOKEN", str(file)) == "glpat-from-file"
    assert token_from(None, str(file)) == "glpat-from-file"


def test_token_from_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CP_GITLAB_TOKEN", raising=False)
    with pytest.raises(GitLabTokenError, match="environment variable CP_GITLAB_TOKEN is not set"):
        token_from("CP_GITLAB_TOKEN", None)
    monkeypatch.setenv("CP_GITLAB_TOKEN", "  ")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(GitLabTokenError, match=f"CP_GITLAB_TOKEN is empty; token file {empty} is empty"):
        token_from("CP_GITLAB_TOKEN", str(empty))
    with pytest.raises(GitLabTokenError, match="cannot be read"):
        token_from(None, str(tmp_path / "absent"))
    with pytest.raises(GitLabTokenError, match="token_env or token_file"):
        token_from(None, None)


# --- jobs (the recovery of missed Job Hooks)


def test_the_fake_serves_a_job_in_gitlabs_documented_shape(fake: FakeGitLab) -> None:
    """GET /projects/:id/jobs/:job_id as doc/api/jobs.md documents it ("Get a single job")."""
    project = fake.add_project("acme/app")
    other = fake.add_project("acme/other")
    job = fake.add_job(project, status="running", name="deploy", ref="main")
    url = f"{fake.api_url}/api/v4/projects/{project}/jobs/{job}"
    answer = http_request(url, headers={"PRIVATE-TOKEN": fake.api_token})
    assert answer.status == 200 and answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert {"id", "name", "stage", "status", "ref", "tag", "created_at", "started_at", "finished_at", "duration",
            "pipeline", "commit", "web_url", "user", "runner", "artifacts", "allow_failure"} <= set(body)  # fmt: skip
    assert (body["id"], body["status"], body["name"], body["ref"]) == (job, "running", "deploy", "main")
    assert body["finished_at"] is None and isinstance(body["started_at"], str)
    assert body["pipeline"]["project_id"] == project and body["web_url"].endswith(f"/acme/app/-/jobs/{job}")
    fake.set_job_status(job, "failed")
    body = http_request(url, headers={"PRIVATE-TOKEN": fake.api_token}).json()
    assert body["status"] == "failed" and isinstance(body["finished_at"], str) and body["failure_reason"]
    path_url = f"{fake.api_url}/api/v4/projects/acme%2Fapp/jobs/{job}"
    assert http_request(path_url, headers={"PRIVATE-TOKEN": fake.api_token}).json()["id"] == job
    wrong_project = f"{fake.api_url}/api/v4/projects/{other}/jobs/{job}"
    missing = http_request(wrong_project, headers={"PRIVATE-TOKEN": fake.api_token})
    assert missing.status == 404 and missing.json() == {"message": "404 Not found"}
    assert http_request(url).status == 401
    with pytest.raises(ValueError, match="unknown job status"):
        fake.set_job_status(job, "finished")


def test_a_jobs_status_is_read_through_python_gitlab(fake: FakeGitLab, source: GitLabSource) -> None:
    project = fake.add_project("acme/app")
    job = fake.add_job(project, status="pending")
    assert source.fetch_job_status(project, job) == "pending"
    fake.set_job_status(job, "canceled")
    assert source.fetch_job_status(str(project), str(job)) == "canceled"
    assert source.fetch_job_status(project, job + 1) is None  # unknown to GitLab
    assert [c.endpoint for c in fake.api_calls()][-1] == "/projects/:id/jobs/:job_id"
    assert metric("controlplane_gitlab_requests_total", endpoint="/projects/:id/jobs/:id", status="200") >= 2


def test_a_jobs_status_through_an_outage_is_unavailable_after_bounded_retries(fake: FakeGitLab) -> None:
    project = fake.add_project("acme/app")
    job = fake.add_job(project)
    fake.set_down()
    with pytest.raises(GitLabUnavailable):
        make_source(fake, retries=1).fetch_job_status(project, job)
    fake.set_down(False)
    with pytest.raises(GitLabRefused):
        make_source(fake, token="glpat-wrong").fetch_job_status(project, job)


def test_the_fake_holds_an_endpoint_until_released(fake: FakeGitLab, source: GitLabSource) -> None:
    """The fake's slow-GitLab control: a held endpoint answers only once released, others meanwhile at once."""
    import threading

    pid = fake.add_project("acme/app")
    fake.hold("/projects/:id")
    answered = threading.Event()
    reader = threading.Thread(target=lambda: (source.fetch_project(pid), answered.set()))
    reader.start()
    assert fake.api_calls("/projects/:id") == [] and not answered.is_set()
    assert source.fetch_job_status(str(pid), "1") is None  # another endpoint is not held (404: no such job)
    fake.release("/projects/:id")
    reader.join(10)
    assert answered.is_set() and [c.status for c in fake.api_calls("/projects/:id")] == [200]


def test_job_status_checks_never_delay_inventory_reads(fake: FakeGitLab) -> None:
    """Jobs seen at a gateway after a restart are asked about at GitLab; sharing one rate bound with the inventory,
    a burst of them delayed the re-read a webhook asked for (an archived project kept access past a second)."""
    import threading

    pid = fake.add_project("acme/app")
    source = make_source(fake, rate=4.0)
    checks = [threading.Thread(target=source.fetch_job_status, args=(str(pid), str(j))) for j in range(12)]
    for check in checks:
        check.start()
    poll_until(lambda: len(fake.api_calls("/projects/:id/jobs/:job_id")) >= 1, 5, message="checks under way")
    started = time.monotonic()
    assert source.fetch_project(pid) is not None
    assert time.monotonic() - started < 0.5
    for check in checks:
        check.join(10)
    assert source.job_bucket.rate + source.bucket.rate == pytest.approx(4.0)  # the bound on GitLab is unchanged
