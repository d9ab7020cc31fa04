"""The audit trail without Envoy: the SQLite store, the ALS receiver over a real loopback gRPC server, the CLI.

What Envoy really sends is proven in test_e2e_audit.py; here the entries are built as Envoy 1.40 builds them
(first message carries the identifier, later ones do not; claims under jwt_authn's `jwt_payload`; RBAC's
verdict under `envoy.filters.http.rbac`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from controlplane.admin.metrics import REGISTRY
from controlplane.audit import als
from controlplane.audit.als import METHOD, SERVICE, AccessLogService, backend_of_route, record_from_entry
from controlplane.audit.store import REDACTED, AuditRecord, AuditStore, open_readonly
from controlplane.cli.audit import add_audit_arguments, parse_since, run_audit
from controlplane.compiler.names import JWT_FILTER, PAYLOAD_KEY, RBAC_FILTER
from controlplane.model.credentials import CREDENTIAL_ISSUER
from controlplane.service import compile_dir
from controlplane.snapshots import golden
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import ROUTE
from controlplane.statefile import StateFileError
from controlplane.xds.registry import ProxyRegistry
from controlplane.xds.server import XdsServer
from tests.support.ports import LOOPBACK, poll_until

ROOT = Path(__file__).resolve().parent.parent
GITLAB = "https://gitlab.example.com"
# Shaped like real secrets, so the redaction patterns are what is tested.
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXRoYXQtbXVzdC1uZXZlci1iZS1zdG9yZWQ"
PAT = "glpat-AbCdEfGhIjKlMnOpQrSt"
T = TypeVar("T")


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def record(**overrides: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "time": 1_000_000.0,
        "gateway": "ci-gateway",
        "node": "envoy-1",
        "backend": "reports-api",
        "method": "GET",
        "path": "/reports/1",
        "status": 200,
        "decision": "allowed",
        "policy": "deployer-reads-reports/reports-read",
        "project_id": "42",
        "project_path": "acme/deployer",
        "pipeline_id": "900",
        "job_id": "1",
        "ref": "main",
        "user": "ci-user",
        "issuer": GITLAB,
    }
    return AuditRecord(**{**values, **overrides})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    opened = AuditStore(tmp_path / "state" / "audit.sqlite3", retention=None)
    yield opened
    opened.close(10)


def write(store: AuditStore, *records: AuditRecord) -> None:
    assert all(store.submit(r) for r in records)
    assert store.flush(10)


def on_disk(path: Path) -> bytes:
    """The database and its WAL: a secret must be in neither."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


# --- the store ------------------------------------------------------------------------------------


def test_query_filters_by_job_project_and_time_newest_last(store: AuditStore) -> None:
    write(
        store,
        record(time=100.0, job_id="1", path="/a"),
        record(time=200.0, job_id="2", project_id="43", project_path="acme/other", path="/b"),
        record(time=300.0, job_id="1", path="/c"),
    )
    assert [r["path"] for r in store.query(job="1")] == ["/a", "/c"]
    assert [r["path"] for r in store.query(project="acme/other")] == ["/b"]
    assert [r["path"] for r in store.query(project="42")] == ["/a", "/c"]  # digits: a project id
    assert [r["path"] for r in store.query(since=150.0)] == ["/b", "/c"]
    assert [r["path"] for r in store.query(job="1", since=150.0)] == ["/c"]
    assert [r["path"] for r in store.query(since=0.0, limit=2)] == ["/b", "/c"]  # the most recent two
    assert store.query(job="nope") == []
    first = store.query(job="2")[0]
    assert first["id"] > 0 and first["status"] == 200 and first["credential_jti"] is None


def test_the_store_is_wal_fsyncs_every_commit_and_refuses_updates(store: AuditStore) -> None:
    write(store, record())
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit SET decision = 'allowed'")
    finally:
        conn.close()
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    readonly = open_readonly(store.path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            readonly.execute("DELETE FROM audit")
    finally:
        readonly.close()


def test_paths_lose_their_query_and_no_token_shaped_text_is_stored(store: AuditStore) -> None:
    write(store, record(path=f"/x/{JWT}/y?private_token={PAT}#frag", ref=JWT, user=f"ci {PAT}", job_id="7"))
    (stored,) = store.query(job="7")
    assert stored["path"] == f"/x/{REDACTED}/y"
    assert (stored["ref"], stored["user"]) == (REDACTED, f"ci {REDACTED}")
    data = on_disk(store.path)
    assert JWT.encode() not in data and PAT.encode() not in data and b"private_token" not in data


def test_retention_deletes_old_records_on_demand_and_periodically(tmp_path: Path) -> None:
    now = [10_000.0]
    store = AuditStore(tmp_path / "audit.sqlite3", retention=3600.0, prune_interval=0.05, clock=lambda: now[0])
    try:
        write(store, record(time=5_000.0, job_id="old"), record(time=9_000.0, job_id="new"))
        assert store.prune() == 1
        assert [r["job_id"] for r in store.query(since=0.0)] == ["new"]
        now[0] = 20_000.0  # the writer's own sweep removes the rest
        poll_until(lambda: store.query(since=0.0) == [], 10, message="periodic retention sweep")
    finally:
        store.close(10)


def test_closed_and_reopened_store_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    first = AuditStore(path)
    for i in range(20):
        assert first.submit(record(time=time.time(), job_id=str(i)))
    first.close(10)  # no flush: close() drains the queue
    second = AuditStore(path)
    try:
        assert sorted(int(r["job_id"]) for r in second.query(since=0.0)) == list(range(20))
    finally:
        second.close(10)


def test_the_store_and_its_wal_are_private(tmp_path: Path) -> None:
    """The trail maps every request to projects, jobs and users: no other local user may read it."""
    path = tmp_path / "state" / "audit.sqlite3"
    store = AuditStore(path, retention=None)
    try:
        write(store, record(time=time.time()))
        files = sorted(path.parent.glob(path.name + "*"))
        assert path in files and len(files) >= 2  # the database and its WAL
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        store.close(10)


def test_an_older_readable_store_is_made_private_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    AuditStore(path, retention=None).close(10)
    path.chmod(0o644)
    AuditStore(path, retention=None).close(10)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_corrupt_store_stops_the_start_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    path.write_bytes(b"this is not a database, it was overwritten" * 100)
    with pytest.raises(StateFileError, match=r"audit\.sqlite3"):
        AuditStore(path, retention=None)


def test_a_flushed_record_survives_a_crash_of_the_process(tmp_path: Path) -> None:
    """The writer process dies without close() (os._exit) right after flush() said committed."""
    path = tmp_path / "audit.sqlite3"
    script = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from controlplane.audit.store import AuditRecord, AuditStore
        store = AuditStore(Path(sys.argv[1]))
        for i in range(50):
            store.submit(AuditRecord(time=time.time(), gateway="g", node="n", backend=None, method="GET",
                                     path="/p", status=200, decision="allowed", job_id=str(i)))
        assert store.flush(10)
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=ROOT, timeout=60)
    reopened = AuditStore(path)
    try:
        assert len(reopened.query(since=0.0, limit=1000)) == 50
    finally:
        reopened.close(10)


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite3", queue_size=2)
    dropped, written = (
        sample("controlplane_audit_records_dropped_total"),
        sample("controlplane_audit_records_written_total"),
    )
    try:
        with store._conn_lock:  # the disk is stuck: the writer can take a batch but cannot commit it
            accepted = 0
            started = time.monotonic()
            while store.submit(record(job_id=str(accepted))):
                accepted += 1
                assert accepted < 1000, "the queue never filled"
            assert time.monotonic() - started < 1.0  # a full queue answers at once
        assert accepted >= 2  # at least the queue's worth
        assert store.flush(10)
        assert len(store.query(since=0.0, limit=2000)) == accepted
        assert sample("controlplane_audit_records_dropped_total") == dropped + 1
        assert sample("controlplane_audit_records_written_total") == written + accepted
    finally:
        store.close(10)
    assert not store.submit(record(job_id="late"))
    assert sample("controlplane_audit_records_dropped_total") == dropped + 2


def test_a_failed_write_is_counted_and_the_writer_goes_on(store: AuditStore) -> None:
    dropped = sample("controlplane_audit_records_dropped_total")
    write(store, record(decision="maybe", job_id="bad"))  # refused by the table's CHECK
    assert sample("controlplane_audit_records_dropped_total") == dropped + 1
    write(store, record(job_id="good"))
    assert [r["job_id"] for r in store.query(since=0.0)] == ["good"]


# --- Envoy's entries → records ----------------------------------------------------------------------


def entry(
    *,
    path: str = "/reports/1",
    method: str = "GET",
    status: int = 200,
    route: str = "reports-api-default",
    cluster: str = "backend-reports-api",
    claims: dict[str, Any] | None = None,
    rbac: dict[str, str] | None = None,
    details: str = "via_upstream",
    start: float = 1_700_000_000.25,
) -> accesslog_pb2.HTTPAccessLogEntry:
    built = accesslog_pb2.HTTPAccessLogEntry()
    common = built.common_properties
    common.start_time.seconds, common.start_time.nanos = int(start), int((start % 1) * 1e9)
    common.route_name, common.upstream_cluster = route, cluster
    if claims is not None:
        common.metadata.filter_metadata[JWT_FILTER].update({PAYLOAD_KEY: claims})
    if rbac is not None:
        common.metadata.filter_metadata[RBAC_FILTER].update(rbac)
    built.request.request_method = (
        accesslog_pb2.HTTPRequestProperties.DESCRIPTOR.fields_by_name["request_method"]
        .enum_type.values_by_name[method]
        .number
    )
    built.request.path = path
    built.response.response_code.value = status
    built.response.response_code_details = details
    return built


def gitlab_claims(**overrides: Any) -> dict[str, Any]:
    claims = {
        "iss": GITLAB,
        "project_id": "42",
        "project_path": "acme/deployer",
        "pipeline_id": "900",
        "job_id": "1",
        "ref": "main",
        "user_login": "ci-user",
        "jti": "gitlab-jti",
        "runner_id": 17,
    }
    return {**claims, **overrides}


ALLOWED = {"enforced_engine_result": "allowed", "enforced_effective_policy_id": "b/r"}


def test_an_allowed_request_maps_every_field() -> None:
    got = record_from_entry(entry(claims=gitlab_claims(), rbac=ALLOWED), gateway="gw", node="n1")
    assert got == AuditRecord(
        time=1_700_000_000.25,
        gateway="gw",
        node="n1",
        backend="reports-api",
        method="GET",
        path="/reports/1",
        status=200,
        decision="allowed",
        details="via_upstream",
        policy="b/r",
        project_id="42",
        project_path="acme/deployer",
        pipeline_id="900",
        job_id="1",
        ref="main",
        user="ci-user",
        credential_jti=None,  # a GitLab token's jti is not a credential of ours
        issuer=GITLAB,
    )


def test_credentials_keep_their_jti_and_numeric_claims_read_as_gitlab_writes_them() -> None:
    claims = {"iss": CREDENTIAL_ISSUER, "jti": "cred-1", "job_id": 77.0, "project_id": 42, "ref": True}
    got = record_from_entry(entry(claims=claims, rbac=ALLOWED), gateway="gw", node="n1")
    assert (got.credential_jti, got.job_id, got.project_id, got.ref) == ("cred-1", "77", "42", "true")


@pytest.mark.parametrize(
    ("case", "status", "rbac", "claims", "route", "cluster", "decision", "backend"),
    [
        ("RBAC denied: no upstream", 403, {"enforced_engine_result": "denied"}, True, "reports-api-default", "",
         "denied", "reports-api"),
        ("no token", 401, None, False, "reports-api-default", "", "denied", "reports-api"),
        ("public path", 200, None, False, "reports-api-public/healthz", "backend-reports-api", "allowed",
         "reports-api"),
        ("unknown host", 403, {"enforced_engine_result": "denied"}, True, "", "", "denied", None),
        ("allowed, backend says 403", 403, ALLOWED, True, "reports-api-default", "backend-reports-api", "allowed",
         "reports-api"),
    ],
)  # fmt: skip
def test_decision_and_backend(
    case: str,
    status: int,
    rbac: dict[str, str] | None,
    claims: bool,
    route: str,
    cluster: str,
    decision: str,
    backend: str | None,
) -> None:
    got = record_from_entry(
        entry(status=status, rbac=rbac, claims=gitlab_claims() if claims else None, route=route, cluster=cluster),
        gateway="gw",
        node="n",
    )
    assert (got.decision, got.backend) == (decision, backend), case
    if not claims:
        assert (got.job_id, got.issuer, got.policy) == (None, None, None)


def test_every_compiled_route_name_leads_back_to_its_backend() -> None:
    """backend_of_route reads names the compiler makes: this catches a renaming in compiler/route.py."""
    seen = 0
    for case in ("quickstart", "multi-backend", "gitlab-and-oidc"):
        for snapshot in compile_dir(ROOT / "examples" / case)[1].values():
            for config in golden.resource_dicts(snapshot, ROUTE):
                for vhost in config["virtual_hosts"]:
                    for route in vhost["routes"]:
                        assert backend_of_route(route["name"]) == vhost["name"], route["name"]
                        seen += 1
    assert seen >= 3
    assert backend_of_route("x-public-public/a-public/b") == "x-public"
    assert backend_of_route("a-default-default") == "a-default"
    assert backend_of_route("-default") is None and backend_of_route("") is None


# --- the ALS receiver over a real gRPC server -------------------------------------------------------


async def eventually(check: Callable[[], T], message: str, timeout: float = 10.0) -> T:
    """Poll without blocking the loop the server runs on; the short sleep is the poll interval."""
    deadline = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(check)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {message}; last value {value!r}")
        await asyncio.sleep(0.01)  # the poll interval, bounded by the deadline above
    return value


class Plane:
    def __init__(self, store: AuditStore, service: AccessLogService, channel: grpc.aio.Channel) -> None:
        self.store = store
        self.service = service
        self.channel = channel

    def stream(self) -> Any:
        method = self.channel.stream_unary(
            f"/{SERVICE}/{METHOD}",
            request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )
        return method()


@pytest.fixture
async def plane(store: AuditStore) -> AsyncIterator[Plane]:
    service = AccessLogService(store)
    server = XdsServer(
        SnapshotCache(), ProxyRegistry(), log=logging.getLogger("controlplane.xds"), extra_handlers=[service.handler()]
    )
    port = await server.start(LOOPBACK, 0)
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{port}")
    try:
        yield Plane(store, service, channel)
    finally:
        await service.close()
        await channel.close()
        await server.stop(1.0)


def message(*entries: accesslog_pb2.HTTPAccessLogEntry, node: str | None = None) -> als_pb2.StreamAccessLogsMessage:
    built = als_pb2.StreamAccessLogsMessage()
    if node is not None:  # Envoy identifies itself on a stream's first message only
        built.identifier.node.id, built.identifier.node.cluster = node, "group-from-node"
        built.identifier.log_name = "ci-gateway"
    built.http_logs.log_entry.extend(entries)
    return built


async def test_a_stream_is_answered_once_its_records_are_committed(plane: Plane) -> None:
    call = plane.stream()
    token_claims = gitlab_claims(job_id="11", token=JWT, password=PAT)  # unexpected claims carrying secrets
    await call.write(message(entry(claims=token_claims, rbac=ALLOWED, path="/a?x=1"), node="envoy-7"))
    await call.write(message(entry(claims=gitlab_claims(job_id="11"), path="/b", status=401)))
    await call.done_writing()
    assert isinstance(await asyncio.wait_for(call, 10), als_pb2.StreamAccessLogsResponse)

    got = await asyncio.to_thread(plane.store.query, job="11")  # no wait: answered means committed
    assert [(r["gateway"], r["node"], r["path"], r["decision"]) for r in got] == [
        ("ci-gateway", "envoy-7", "/a", "allowed"),
        ("ci-gateway", "envoy-7", "/b", "denied"),
    ]
    data = on_disk(plane.store.path)
    assert JWT.encode() not in data and PAT.encode() not in data


async def test_close_ends_open_streams_and_refuses_new_ones(plane: Plane, caplog: pytest.LogCaptureFixture) -> None:
    call = plane.stream()
    await call.write(message(entry(claims=gitlab_claims(job_id="12"), rbac=ALLOWED), node="envoy-8"))
    await eventually(lambda: plane.store.query(job="12"), "record of the open stream")

    await asyncio.wait_for(plane.service.close(), 10)
    assert isinstance(await asyncio.wait_for(call, 10), als_pb2.StreamAccessLogsResponse)
    refused = plane.stream()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(refused, 10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in caplog.text


async def test_an_entry_that_cannot_be_read_costs_itself_only(plane: Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    def fragile(built: accesslog_pb2.HTTPAccessLogEntry, *, gateway: str, node: str) -> AuditRecord:
        if built.request.path == "/bad":
            raise ValueError("unreadable")
        return record_from_entry(built, gateway=gateway, node=node)

    monkeypatch.setattr(als, "record_from_entry", fragile)
    dropped = sample("controlplane_audit_records_dropped_total")
    call = plane.stream()
    good = entry(claims=gitlab_claims(job_id="13"), rbac=ALLOWED)
    await call.write(message(entry(path="/bad"), good, node="envoy-9"))
    await call.done_writing()
    await asyncio.wait_for(call, 10)
    assert len(await asyncio.to_thread(plane.store.query, job="13")) == 1
    assert sample("controlplane_audit_records_dropped_total") == dropped + 1


def test_a_method_this_version_does_not_know_is_kept_as_unknown() -> None:
    built = entry()
    built.request.request_method = 99  # a newer Envoy's enum value
    assert record_from_entry(built, gateway="gw", node="n").method == "UNKNOWN"


# --- the CLI --------------------------------------------------------------------------------------


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_audit_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_prints_a_table_or_json(store: AuditStore, capsys: pytest.CaptureFixture[str]) -> None:
    write(store, record(time=1_700_000_000.5, job_id="5", path="/t"), record(time=1_700_000_100.0, job_id="6"))
    assert run_audit(cli("--job", "5", "--db", str(store.path))) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "TIME", "GATEWAY", "METHOD", "PATH", "STATUS", "DECISION", "POLICY", "PROJECT", "PIPELINE", "JOB", "REF", "USER"
    ]  # fmt: skip
    assert row.split() == [
        "2023-11-14T22:13:20.500Z", "ci-gateway", "GET", "/t", "200", "allowed",
        "deployer-reads-reports/reports-read", "acme/deployer", "900", "5", "main", "ci-user",
    ]  # fmt: skip
    assert run_audit(cli("--project", "acme/deployer", "--json", "--db", str(store.path), "--limit", "1")) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["job_id"] == "6"  # the most recent one


def test_cli_reports_usage_and_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_audit(cli("--db", str(tmp_path / "x.sqlite3"))) == 2
    assert run_audit(cli("--since", "yesterday", "--db", str(tmp_path / "x.sqlite3"))) == 2
    assert run_audit(cli("--job", "1", "--db", str(tmp_path / "missing.sqlite3"))) == 1
    assert "missing.sqlite3" in capsys.readouterr().err


def test_cli_default_store_is_in_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONTROLPLANE_STATE_DIR", str(tmp_path / "state"))
    store = AuditStore(tmp_path / "state" / "audit.sqlite3")
    try:
        write(store, record(job_id="99"))
        assert run_audit(cli("--job", "99", "--json")) == 0
        assert json.loads(capsys.readouterr().out)[0]["job_id"] == "99"
    finally:
        store.close(10)


def test_since_takes_durations_and_iso_times() -> None:
    assert parse_since("30m", now=10_000.0) == 8_200.0
    assert parse_since("1h", now=10_000.0) == 6_400.0
    assert parse_since("2d", now=200_000.0) == 27_200.0
    assert parse_since("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_since("2023-11-14T22:13:20") == 1_700_000_000.0  # no offset: UTC, as printed
    assert parse_since("2023-11-14T23:13:20+01:00") == 1_700_000_000.0
    with pytest.raises(ValueError, match="duration"):
        parse_since("5 minutes")


def test_recent_jobs_are_each_job_once_most_recent_first(store: AuditStore) -> None:
    """What the job recovery sweep asks GitLab about: every job seen at a gateway since a time."""
    write(
        store,
        record(time=100.0, job_id="1", project_id="42"),
        record(time=300.0, job_id="1", project_id="42"),
        record(time=200.0, job_id="2", project_id="43", issuer=CREDENTIAL_ISSUER),
        record(time=50.0, job_id="3", project_id="42"),
        record(time=400.0, job_id=None, project_id=None),  # no token: no job
    )
    assert store.recent_jobs(since=90.0) == [("1", "42", GITLAB, 300.0), ("2", "43", CREDENTIAL_ISSUER, 200.0)]
    assert store.recent_jobs(since=0.0, limit=1) == [("1", "42", GITLAB, 300.0)]
