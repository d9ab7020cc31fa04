"""Three `serve --store postgres` replicas on one database, end to end (docs/shared-state.md): the bounds that
PostgreSQL makes fleet-wide hold whichever replica a job talks to."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.replicas import exchanged_reports, replicated

pytestmark = pytest.mark.e2e


policy = exchanged_reports


def test_the_replay_bound_holds_across_replicas(tmp_path: Path, pg_dsn: str) -> None:
    """Exchanges of one subject token spread over three replicas, in turn and then all at once: three in all."""
    with replicated(tmp_path, policy, pg_dsn) as fleet:
        in_turn = fleet.subject(701)
        statuses = [fleet[n % 3].exchange(in_turn).status for n in range(6)]
        assert statuses == [200, 200, 200, 400, 400, 400]

        at_once = fleet.subject(702)
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(lambda n: fleet[n % 3].exchange(at_once).status, range(12)))
        assert sorted(answers) == [200] * 3 + [400] * 9, answers
        with psycopg.connect(pg_dsn) as db:
            uses = sorted(row[0] for row in db.execute("SELECT uses FROM replay").fetchall())
        assert uses[-2:] == [3, 3] and set(uses[:-2]) <= {1}, uses  # the readiness probes' tokens once each


def test_a_job_finished_through_one_replica_gets_nothing_from_another(tmp_path: Path, pg_dsn: str) -> None:
    with replicated(tmp_path, policy, pg_dsn) as fleet:
        subject = fleet.subject(703)
        assert fleet[2].exchange(subject).status == 200
        fleet[0].job_finished(703)
        refused = fleet[2].exchange(fleet.subject(703))
        assert refused.status == 400 and "job has finished" in refused.json()["error_description"], refused.text
    logs = "".join((tmp_path / f"replica-{n}.log").read_text() for n in range(3))
    assert "eyJ" not in logs, "a token was logged"


def test_a_policy_push_heard_by_one_replica_reloads_every_replica(tmp_path: Path, pg_dsn: str) -> None:
    """The policy on a GitLab project, GitLab's push webhook delivered to one replica only, nobody polling: every
    replica reads the new commit (the change feed tells them), and only the leader posts its commit status."""
    public = ("--exchange-public-address", f"{LOOPBACK}:{free_port()}")  # one address, so identical resources
    with replicated(
        tmp_path,
        policy,
        pg_dsn,
        policy_project="infra/ci-access",
        hooked=[2],
        serve_args=("--policy-poll", "3600", *public),
    ) as fleet:
        assert fleet.policy_project is not None
        gitlab = fleet.world.gitlab
        first = {r.status()["policy"]["revision"] for r in fleet}
        wider = (fleet.world.policy / "policy.yaml").read_text().replace("{project: 42,", "{project: 43,", 1)
        assert wider != (fleet.world.policy / "policy.yaml").read_text()
        sha = gitlab.commit(fleet.policy_project, {"policy.yaml": wider})  # its push hook reaches replica 2 only
        poll_until(lambda: all(r.status()["policy"]["revision"] == sha for r in fleet), 20, message="every replica")
        versions = [r.status()["policy"]["snapshot_versions"] for r in fleet]
        assert versions[0] == versions[1] == versions[2], versions
        assert first != {sha}
        statuses = poll_until(lambda: gitlab.statuses(fleet.policy_project, sha), 10, message="commit status")
        assert [s["name"] for s in statuses] == ["controlplane"] * len(statuses)
        assert len({s["status"] for s in statuses if s["status"] != "pending"}) <= 1
