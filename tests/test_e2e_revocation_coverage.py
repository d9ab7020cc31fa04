"""Only what can matter is on the deny list, end to end (`controlplane serve`, the fake GitLab's Job Hooks, a real
Envoy and its access log): with an exchanged backend and a raw-token backend that opted out of covering unseen
jobs (`revoke: seen-jobs`),

- a job that never touched a gateway and never exchanged is not listed when it finishes;
- a job whose raw ID token a gateway let through is listed, and its token denied;
- a job first seen after its Job Hook (the token used after the job ended) is listed as soon as the access log
  reaches the control plane (~1 s), its first request having passed;
- across two replicas on PostgreSQL (hook at A, gateway at B): the same three, through the shared audit trail and
  ledger;
- a policy change that makes the raw-token backend cover unseen jobs (`revoke: finished-jobs`) lists a job that
  finished unlisted before it, though the control plane was restarted in between (the ledger keeps the job's
  project and end), or the change reached a replica that never received the job's Job Hook.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.fake_gitlab import FakeGitLab
from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.replicas import stacks_on_one_store
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_exchange_stack

pytestmark = pytest.mark.e2e

NO_SWEEP = ("--job-sweep-interval", "3600")  # no test may be rescued by the periodic sweep


def policy(given: PolicyInputs, raw_revoke: str = "seen-jobs") -> str:
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api"),
        binding("deployer-reads-reports", ["reports-read"], "{project: 42}", extra=TTL_10M),
        backend("raw-api", given.ports["reports"], extra=f"revoke: {raw_revoke}"),
        role("raw-read", "raw-api"),
        binding("deployer-reads-raw", ["raw-read"], "{project: 42}"),
        gateway(given.listen_port, ["reports-api", "raw-api"]),
    )


class CoverageStack(Served):
    def raw(self, job: int) -> str:
        return self.subject(job, "https://raw.local")

    def get_raw(self, token: str) -> int:
        return self.call("raw.local", token)

    def audited(self, job: int) -> bool:
        """Whether the control plane's audit trail (its state directory's SQLite file) holds a request of `job`."""
        path = self.controlplane.state_dir / "audit.sqlite3"
        if not path.exists():
            return False
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT 1 FROM audit WHERE job_id = ?", (str(job),)).fetchone() is not None

    def revoked_jobs(self) -> int:
        return int(self.controlplane.status()["credentials"]["revoked_jobs"])

    def widen_coverage(self) -> None:
        """Commit the policy whose raw-token backend covers every finished job it could admit (the default)."""
        inputs = PolicyInputs(
            self.gitlab.issuer,
            self.listen_port,
            {name: server.port for name, server in self.servers.items()},
            self.access_log,
            self.root,
        )
        self.write("policy.yaml", policy(inputs, raw_revoke="finished-jobs"))

    def until_denied(self, token: str, timeout: float, message: str) -> tuple[list[int], float]:
        """Request with `token` every 20 ms until the gateway answers 403: every status, and the seconds taken."""
        statuses: list[int] = []

        def denied() -> bool:
            statuses.append(self.get_raw(token))
            return statuses[-1] == 403

        first = time.monotonic()
        poll_until(denied, timeout, interval=0.02, message=message)
        return statuses, time.monotonic() - first

    def listed_by_the_policy_change(self, token: str, before: int, changed_at: float) -> None:
        """The job is listed without any request of it (so no sighting can be what lists it), then denied;
        `changed_at`: when the policy was written (time.monotonic())."""
        poll_until(lambda: self.revoked_jobs() == before + 1, 15, interval=0.05, message="listed by the new policy")
        listed = time.monotonic() - changed_at
        statuses, _ = self.until_denied(token, 5, "the newly covered job's raw token denied")
        print(f"\npolicy written -> listed {listed:.2f}s, -> 403 {time.monotonic() - changed_at:.2f}s {statuses}")
        assert set(statuses) <= {200, 403}, statuses  # a 200: the push still on its way, the job already listed


@contextmanager
def coverage_stack(root: Path, name: str, **more: Any) -> Iterator[CoverageStack]:
    """The control plane, its Envoy (access logs flushed at once) and the fake GitLab, once the gateway answers."""
    envoy = EnvoySpec(f"coverage-{name}", f"coverage-{name}-envoy", flush_logs=True)
    with serve_exchange_stack(root, policy, kind=CoverageStack, envoy=envoy, serve_args=NO_SWEEP, **more) as built:
        poll_until(lambda: built.get_raw(built.raw(1)) == 200, 30, interval=0.1, message="gateway up")
        yield built


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoverageStack]:
    with FakeGitLab() as gitlab, coverage_stack(tmp_path_factory.mktemp("coverage-e2e"), "1", gitlab=gitlab) as built:
        yield built


def test_a_job_that_never_touched_a_gateway_is_not_listed(stack: CoverageStack) -> None:
    before = stack.revoked_jobs()
    stack.job_finished(7101)  # answered once handled
    assert stack.revoked_jobs() == before
    # and the exchange still refuses it (the ledger recorded the end)
    assert stack.exchange(stack.subject(7101)).status == 400


def test_a_job_seen_at_a_gateway_is_listed_when_it_finishes(stack: CoverageStack) -> None:
    token = stack.raw(7102)
    assert stack.get_raw(token) == 200
    seen_before = time.monotonic()
    # the access log entry must have reached the control plane before the hook for this test to be about (b)
    poll_until(lambda: stack.audited(7102), 5, interval=0.02, message="the request in the audit trail")
    before = stack.revoked_jobs()
    stack.job_finished(7102)
    assert stack.revoked_jobs() == before + 1
    poll_until(lambda: stack.get_raw(token) == 403, 2, interval=0.02, message="the seen job's raw token denied")
    print(f"seen job denied {time.monotonic() - seen_before:.2f}s after its request was logged")


def test_a_token_first_used_after_its_job_finished_is_denied_once_the_access_log_arrives(
    stack: CoverageStack,
) -> None:
    token = stack.raw(7103)  # minted while the job ran, never used
    before = stack.revoked_jobs()
    stack.job_finished(7103)
    assert stack.revoked_jobs() == before  # nothing of it was known: not listed
    statuses, elapsed = stack.until_denied(token, 3.0, "the late sighting lists the job")
    assert statuses[0] == 200 and set(statuses) <= {200, 403}, statuses  # the window the opt-out accepts
    assert elapsed < 1.5, elapsed
    assert stack.revoked_jobs() == before + 1
    print(f"first use after the hook -> 403 in {elapsed:.2f}s ({statuses.count(200)} of {len(statuses)} passed)")


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[CoverageStack]:
    """A stack of its own: this test restarts the control plane and changes the policy."""
    with FakeGitLab() as gitlab, coverage_stack(tmp_path, "restart", gitlab=gitlab) as built:
        yield built


def test_a_policy_change_after_a_restart_lists_a_job_that_finished_unlisted_before_it(
    restartable: CoverageStack,
) -> None:
    """Before, the jobs to re-judge were this process's memory: after a restart the job's token (valid for an hour)
    passed the now covering backend until a sighting listed it."""
    stack = restartable
    token = stack.raw(7301)  # minted while the job ran, never used: nothing but the ledger knows the job
    before = stack.revoked_jobs()
    stack.job_finished(7301)
    assert stack.revoked_jobs() == before  # `revoke: seen-jobs`: not covered, not listed
    stack.controlplane.restart()
    stack.wait_connected()
    assert stack.revoked_jobs() == before
    changed_at = time.monotonic()
    stack.widen_coverage()
    stack.listed_by_the_policy_change(token, before, changed_at)


def coverage_envoy(name: str) -> EnvoySpec:
    return EnvoySpec(f"coverage-{name}-envoy", f"envoy-{name}", flush_logs=True)


@pytest.fixture
def replicas(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[CoverageStack, CoverageStack, str]]:
    """Replica A (Job Hooks) and replica B (the gateway traffic) on one database, an Envoy each."""
    with stacks_on_one_store(
        tmp_path, policy, pg_dsn, kind=CoverageStack, envoy=coverage_envoy, serve_args=NO_SWEEP
    ) as built:
        a, b = built
        poll_until(lambda: all(r.controlplane.status()["change_feed"]["connected"] for r in built), 10, message="feeds")
        poll_until(lambda: b.get_raw(b.raw(1)) == 200, 30, interval=0.1, message="gateway B up")
        yield a, b, pg_dsn


def test_across_replicas_only_seen_jobs_are_listed_and_a_late_sighting_lists_at_once(
    replicas: tuple[CoverageStack, CoverageStack, str],
) -> None:
    a, b, dsn = replicas
    before = a.revoked_jobs()
    # never seen, never exchanged: not listed anywhere
    a.job_finished(7201)
    assert a.revoked_jobs() == before

    # seen at B's gateway (B's audit trail row in PostgreSQL), then its hook at A: A finds the row and lists it
    seen = b.raw(7202)
    assert b.get_raw(seen) == 200
    poll_until(lambda: _audited(dsn, 7202), 5, interval=0.02, message="B's audit row written")
    a.job_finished(7202)
    assert a.revoked_jobs() == before + 1
    poll_until(lambda: b.get_raw(seen) == 403, 2, interval=0.02, message="denied at B")

    # hook at A first (unlisted), then the token's first use at B: B asks the shared ledger and lists it
    late = b.raw(7203)
    a.job_finished(7203)
    assert a.revoked_jobs() == before + 1
    statuses, elapsed = b.until_denied(late, 3.0, "the late sighting at B lists the job")
    assert statuses[0] == 200 and elapsed < 1.5, (statuses, elapsed)
    poll_until(lambda: a.revoked_jobs() == before + 2, 2, interval=0.02, message="listed at A too")
    print(f"\nlate sighting at replica B (hook at A) -> 403 in {elapsed:.2f}s ({statuses.count(200)} passed)")


def _audited(dsn: str, job: int) -> bool:
    """The shared audit trail (PostgreSQL) holds a request of `job`."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT 1 FROM audit WHERE job_id = %s", (str(job),)).fetchone() is not None


def test_a_policy_change_at_another_replica_lists_a_job_whose_hook_it_never_received(
    replicas: tuple[CoverageStack, CoverageStack, str],
) -> None:
    """The Job Hook at A, the policy change at B (each replica reads its own policy directory here): B re-judges
    the shared ledger's finished jobs and lists the job for the fleet, its token denied at B's gateway and A's
    deny list holding it too."""
    a, b, _ = replicas
    token = b.raw(7311)
    before = a.revoked_jobs()
    a.job_finished(7311)
    assert a.revoked_jobs() == before and b.revoked_jobs() == before
    changed_at = time.monotonic()
    b.widen_coverage()
    b.listed_by_the_policy_change(token, before, changed_at)
    poll_until(lambda: a.revoked_jobs() == before + 1, 5, interval=0.05, message="listed at A too")
