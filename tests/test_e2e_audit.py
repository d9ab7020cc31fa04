"""The audit trail end to end on the REAL Envoy: requests → Envoy → gRPC ALS → SQLite or PostgreSQL → query
and CLI (the module runs once per store).

The control plane runs in process (SnapshotCache + PolicyService + XdsServer with the ALS handler on the
same grpc server, as `serve` wires it) on an event loop in a background thread, so the test itself can make
blocking HTTP requests and poll the store with deadlines. Two jobs make requests; the store must hold
exactly the requests each one made, with the policy that decided them, and no token anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from controlplane.audit.als import AccessLogService
from controlplane.audit.store import AuditStore, AuditTrail
from controlplane.audit.store_pg import PostgresAuditStore
from controlplane.cli.audit import run_audit
from controlplane.runtime.policy_service import PolicyService
from controlplane.snapshots.cache import SnapshotCache
from controlplane.store.dsn import StoreDsn
from controlplane.store.pool import StorePool
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import XdsServer
from tests.support.envoy import EnvoyProcess
from tests.support.gateway import gateway_envoy
from tests.support.policy_parts import issuer
from tests.support.ports import LOOPBACK, poll_until
from tests.support.postgres import PostgresServer
from tests.support.stack import (
    DEPLOYER,
    INVENTORY_FILE,
    OTHER,
    OutsideWorld,
    PolicyInputs,
    outside_world,
    reference_policy,
)

pytestmark = pytest.mark.e2e

T = TypeVar("T")
GATEWAY = "ci-gateway"
NODE = "audit-envoy-1"
JOB_A, PIPELINE_A = "70001", "80001"
JOB_B, PIPELINE_B = "70002", "80002"
DSN_ENV = "CONTROLPLANE_E2E_AUDIT_DSN"


class InProcessControlPlane:
    """The serve wiring that matters here, on its own event loop thread: policy → snapshots → ADS, and ALS → store."""

    def __init__(self, policy: Path, db: Path, dsn: str | None = None) -> None:
        self.cache = SnapshotCache()
        self.policy = PolicyService(policy, self.cache)
        self.pool = None if dsn is None else StorePool(StoreDsn(dsn, "test"))
        self.store: AuditTrail = AuditStore(db) if self.pool is None else PostgresAuditStore(self.pool)
        self.xds = XdsServer(self.cache, ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
        self.als = AccessLogService(self.store, senders=self.xds)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="controlplane-loop", daemon=True)
        self.port = 0

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        if isinstance(self.store, PostgresAuditStore):
            self.run(self.store.open())
        assert self.run(self.policy.reload_off_loop()), self.policy.state.errors
        self.port = self.run(self.xds.start(LOOPBACK, 0, extra_handlers=[self.als.handler()]))

    def stop(self) -> None:
        """As serve should: end ALS streams (their records committed), stop gRPC, then drain and close the store."""
        try:
            self.run(self.als.close())
            self.run(self.xds.stop(1.0))
            if isinstance(self.store, PostgresAuditStore) and self.pool is not None:
                self.run(self.store.close())
                self.run(self.pool.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            if isinstance(self.store, AuditStore):
                self.store.close(10)


def policy(given: PolicyInputs) -> dict[str, str]:
    """The reference policy, with Envoy fetching GitLab's keys itself: no key relay in this wiring."""
    return reference_policy(given) | {"issuer.yaml": issuer(given.issuer, extra=f"{INVENTORY_FILE}\njwks: remote")}


@dataclass
class AuditStack(OutsideWorld):
    """The reference outside world served by the in-process control plane above, which writes `db`."""

    db: Path
    dsn: str | None  # the PostgreSQL database the trail is in; None: the SQLite file `db`
    controlplane: InProcessControlPlane
    envoy: EnvoyProcess

    def token(self, project: dict[str, Any], aud: str, **claims: Any) -> str:
        return self.gitlab.mint(aud=aud, **{**project, **claims})


@pytest.fixture(scope="module", params=["file", "postgres"])
def audit_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditStack]:
    with contextlib.ExitStack() as scope:
        dsn = None
        if request.param == "postgres":
            server: PostgresServer = request.getfixturevalue("postgres")
            dsn = scope.enter_context(server.database())
        yield scope.enter_context(_audit_stack(tmp_path_factory.mktemp(f"e2e-audit-{request.param}"), dsn))


@contextlib.contextmanager
def _audit_stack(root: Path, dsn: str | None) -> Iterator[AuditStack]:
    with outside_world(root, policy) as world:
        controlplane = InProcessControlPlane(world.policy, root / "audit.sqlite3", dsn)
        controlplane.start()
        try:
            with gateway_envoy(controlplane.port, group=GATEWAY, node=NODE, name="audit-envoy") as envoy:
                built = AuditStack(
                    **vars(world), db=root / "audit.sqlite3", dsn=dsn, controlplane=controlplane, envoy=envoy
                )
                poll_until(lambda: built.call("reports.local", None, path="/healthz") == 200, 20, message="listener up")
                yield built
        finally:
            controlplane.stop()


def _job_a_requests(audit_stack: AuditStack) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Job A: allowed read (with a query that must not be stored), denied write, allowed deploy."""
    reports = audit_stack.token(DEPLOYER, "https://reports.local", job_id=JOB_A, pipeline_id=PIPELINE_A)
    deploy = audit_stack.token(DEPLOYER, "https://deploy.local", job_id=JOB_A, pipeline_id=PIPELINE_A)
    made = [
        ("reports.local", "GET", "/reports/2026?private_token=secret-value", reports, 200),
        ("reports.local", "POST", "/reports/2026", reports, 403),
        ("deploy.local", "POST", "/deployments/prod", deploy, 200),
    ]
    for host, method, path, token, expected in made:
        response = audit_stack.request(host, path, token, method=method)
        assert response.status == expected, (method, path, response.status, response.text)
    return [(m, p, s) for _, m, p, _, s in made], [reports, deploy]


def test_audit_query_returns_exactly_the_requests_a_job_made(audit_stack: AuditStack) -> None:
    made, tokens = _job_a_requests(audit_stack)
    other = audit_stack.token(OTHER, "https://reports.local", job_id=JOB_B, pipeline_id=PIPELINE_B)
    assert audit_stack.request("reports.local", "/reports/2026", other).status == 403
    assert audit_stack.request("reports.local", "/reports/2026", None).status == 401
    tokens.append(other)

    store = audit_stack.controlplane.store
    records: list[dict[str, Any]] = poll_until(
        lambda: r if len(r := store.query(job=JOB_A)) >= len(made) else [], 10, message="job A's records"
    )
    poll_until(lambda: store.query(job=JOB_B), 10, message="job B's record")
    assert len(store.query(job=JOB_A)) == len(made)
    common = {
        "gateway": GATEWAY,
        "node": NODE,
        "project_id": "42",
        "project_path": "acme/platform/deployer",
        "pipeline_id": PIPELINE_A,
        "job_id": JOB_A,
        "ref": "main",
        "user": "ci-user",
        "issuer": audit_stack.gitlab.issuer,
        "credential_jti": None,  # a GitLab ID token is not a control-plane credential
    }
    expected = [
        {"method": "GET", "path": "/reports/2026", "status": 200, "decision": "allowed",
         "policy": "deployer-reads-reports/reports-read", "backend": "reports-api", **common},
        {"method": "POST", "path": "/reports/2026", "status": 403, "decision": "denied",
         "policy": None, "backend": "reports-api", **common},
        {"method": "POST", "path": "/deployments/prod", "status": 200, "decision": "allowed",
         "policy": "deployer-deploys/deploy-trigger", "backend": "deploy-api", **common},
    ]  # fmt: skip
    got = [{key: record[key] for key in expected[0]} for record in records]
    assert got == expected
    assert [r["details"] for r in records] == [
        "via_upstream",
        "rbac_access_denied_matched_policy[none]",
        "via_upstream",
    ]
    assert all(record["time"] > 0 for record in records)
    # Attested: the real Envoy's access-log stream comes from the host of its ADS stream (on connections of its
    # own); the time is the control plane's, Envoy's start time is kept beside it.
    assert all(r["peer"] == LOOPBACK and r["identity"] is None for r in records)
    assert all(0 <= r["time"] - r["reported_time"] < 10 for r in records)

    (job_b,) = store.query(job=JOB_B)
    assert (job_b["project_path"], job_b["decision"], job_b["status"], job_b["policy"]) == (
        "acme/platform/other",
        "denied",
        403,
        None,
    )
    assert [r["job_id"] for r in store.query(project="acme/platform/other")] == [JOB_B]
    unauthenticated = poll_until(
        lambda: [r for r in store.query(since=records[0]["time"]) if r["status"] == 401], 10, message="the 401"
    )
    assert [(r["job_id"], r["decision"], r["details"]) for r in unauthenticated] == [
        (None, "denied", "jwt_authn_access_denied{Jwt_is_missing}")
    ]

    # Nothing secret on disk: no token, and no query string (the database and its WAL; or PostgreSQL's rows).
    audit_stack.controlplane.store.flush(10)
    for path, data in _stored(audit_stack):
        assert b"secret-value" not in data, path
        for token in tokens:
            assert token.encode() not in data, path
            assert token.split(".")[2].encode() not in data, path


def _stored(stack: AuditStack) -> Iterator[tuple[str, bytes]]:
    if stack.dsn is None:
        yield from ((str(path), path.read_bytes()) for path in stack.db.parent.glob("audit.sqlite3*"))
        return
    with psycopg.connect(stack.dsn) as db:
        rows = db.execute("SELECT audit::text FROM audit").fetchall()
    yield "the audit table", "\n".join(str(row[0]) for row in rows).encode()


def test_cli_reads_the_live_store(
    audit_stack: AuditStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if audit_stack.dsn is not None:
        monkeypatch.setenv(DSN_ENV, audit_stack.dsn)  # the CLI reads its DSN from the environment, never argv
    token = audit_stack.token(DEPLOYER, "https://reports.local", job_id="70003", pipeline_id="80003")
    assert audit_stack.request("reports.local", "/cli/check", token).status == 200
    poll_until(lambda: audit_stack.controlplane.store.query(job="70003"), 10, message="record of job 70003")
    capsys.readouterr()

    assert run_audit(_args(job="70003", as_json=True, stack=audit_stack)) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert (record["path"], record["decision"], record["policy"]) == (
        "/cli/check",
        "allowed",
        "deployer-reads-reports/reports-read",
    )
    assert (record["ref_type"], record["ref_protected"], record["pipeline_source"]) == ("branch", "true", "push")

    assert run_audit(_args(job="70003", as_json=False, stack=audit_stack)) == 0
    table = capsys.readouterr().out
    for shown in ("/cli/check", "deployer-reads-reports/reports-read", "acme/platform/deployer", "70003"):
        assert shown in table, table


def test_the_ref_and_pipeline_claims_arrive_from_real_tokens(audit_stack: AuditStack) -> None:
    """The claims `suggest` pins subjects on, from GitLab-shaped tokens through Envoy's jwt_authn payload and ALS:
    allowed and denied alike (jwt_authn writes the payload before RBAC decides), as text GitLab writes them."""
    job, pipeline = "70010", "80010"
    tag = audit_stack.token(DEPLOYER, "https://reports.local", job_id=job, pipeline_id=pipeline, ref="v1.2.0",
                            ref_type="tag", pipeline_source="web", environment="production")  # fmt: skip
    branch = audit_stack.token(DEPLOYER, "https://reports.local", job_id=job, pipeline_id=pipeline, ref="feature-x",
                               ref_protected=False, pipeline_source="schedule")  # fmt: skip
    assert audit_stack.request("reports.local", "/claims/tag", tag).status == 200
    assert audit_stack.request("reports.local", "/claims/branch", branch).status == 403  # ref_protected: true
    store = audit_stack.controlplane.store
    records = poll_until(lambda: r if len(r := store.query(job=job)) >= 2 else [], 10, message="job 70010's records")
    assert [
        (r["path"], r["decision"], r["ref"], r["ref_type"], r["ref_protected"], r["pipeline_source"], r["environment"])
        for r in records
    ] == [
        ("/claims/tag", "allowed", "v1.2.0", "tag", "true", "web", "production"),
        ("/claims/branch", "denied", "feature-x", "branch", "false", "schedule", None),
    ]


def _args(*, job: str, as_json: bool, stack: AuditStack) -> Any:
    import argparse

    from controlplane.cli.audit import add_audit_arguments

    parser = argparse.ArgumentParser()
    add_audit_arguments(parser)
    store = ["--db", str(stack.db)] if stack.dsn is None else ["--store", "postgres", "--store-dsn-env", DSN_ENV]
    argv = ["--job", job, *store, *(["--json"] if as_json else [])]
    return parser.parse_args(argv)
