"""Revocation across replicas, end to end (issue 12): two `controlplane serve --store postgres` on one database,
each with its own real Envoy. A Job Hook delivered to replica A denies the job at replica B's Envoy within a
second: A writes the deny list's row and notifies in one transaction, B's change feed reads the new rows and
recompiles, B pushes to its Envoy (docs/shared-state.md, "Revocations across replicas").

Credentials are exchanged at replica B (its own signing keys are what its Envoy trusts: keys are not shared yet),
and the job's end is reported to replica A only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.replicas import stacks_on_one_store
from tests.support.stack import EnvoySpec, PolicyInputs, Served

pytestmark = pytest.mark.e2e

SAMPLES = 5


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api", ["GET"]),
        binding("deployer-reads-reports", ["reports-read"], "{project: 42, ref_protected: true}", extra=TTL_10M),
        gateway(given.listen_port, ["reports-api"]),
    )


def replica_envoy(name: str) -> EnvoySpec:
    return EnvoySpec(f"replica-{name}-envoy", f"envoy-{name}")


@pytest.fixture
def replicas(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[Served, Served]]:
    """Replica A and replica B: one fake GitLab, one database, a policy directory, state directory, backend and
    Envoy each (two Envoys cannot share a listener port)."""
    with stacks_on_one_store(tmp_path, policy, pg_dsn, kind=Served, envoy=replica_envoy) as (a, b):
        yield a, b


def _denied_after_hook(hooked: Served, enforcing: Served, job: int) -> float:
    """Seconds from the Job Hook sent to `hooked` until `enforcing`'s Envoy refuses the job's credential."""
    credential = enforcing.credential(job)
    assert enforcing.call("reports.local", credential) == 200
    started = time.monotonic()
    hooked.job_finished(job)
    poll_until(lambda: enforcing.call("reports.local", credential) == 403, 5, interval=0.01, message="denied")
    return time.monotonic() - started


def test_a_job_revoked_through_one_replica_is_denied_by_the_other_replicas_envoy(
    replicas: tuple[Served, Served],
) -> None:
    a, b = replicas
    feeds = [r.controlplane.status()["change_feed"] for r in (a, b)]
    poll_until(lambda: all(r.controlplane.status()["change_feed"]["connected"] for r in (a, b)), 10, message="feeds up")
    latencies = [_denied_after_hook(a, b, 700 + n) for n in range(SAMPLES)]
    back = _denied_after_hook(b, a, 790)  # and the other way round
    print(
        f"\nrevocation through replica A -> denied at replica B's Envoy: median {statistics.median(latencies):.3f}s, "
        f"max {max(latencies):.3f}s over {SAMPLES}; B -> A {back:.3f}s"
    )
    assert max(latencies) < 1.0 and back < 1.0, (latencies, back, feeds)
    assert b.call("reports.local", b.credential(799)) == 200  # other jobs unaffected
    for replica in (a, b):
        revocations = replica.controlplane.status()["credentials"]["revocations_store"]
        assert revocations["kind"] == "postgres" and revocations["pending"] == 0 and revocations["healthy"]
        assert replica.controlplane.metric("controlplane_revocations_pending") == 0
