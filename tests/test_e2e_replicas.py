"""Three `serve --store postgres` replicas on one database, end to end (docs/shared-state.md): the bounds that
PostgreSQL makes fleet-wide hold whichever replica a job talks to."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.replicas import replicated
from tests.support.stack import PolicyInputs

pytestmark = pytest.mark.e2e


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api"),
        binding("deployer", ["reports-read"], "{project: 42, ref_protected: true}", extra=TTL_10M),
        gateway(given.listen_port, ["reports-api"]),
    )


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
