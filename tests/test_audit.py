"""The audit trail without Envoy: the SQLite store, the ALS receiver over a real loopback gRPC server, the CLI.

What Envoy really sends is proven in test_e2e_audit.py; here the entries are built as Envoy 1.40 builds them
(first message carries the identifier, later ones do not; claims under jwt_authn's `jwt_payload`; RBAC's
verdict under `envoy.filters.http.rbac`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from controlplane.audit import als
from controlplane.audit.als import METHOD, SERVICE, AccessLogService, backend_of_route, record_from_entry
from controlplane.audit.store import (
    MAX_SHORT_CHARS,
    REDACTED,
    SCHEMA_VERSION,
    AuditRecord,
    AuditStore,
    open_readonly,
    query_records,
)
from controlplane.cli.audit import add_audit_arguments, parse_since, run_audit
from controlplane.model.credentials import CREDENTIAL_ISSUER
from controlplane.snapshots import golden
from controlplane.snapshots.build import compile_dir
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import CLUSTER, ROUTE, Snapshot
from controlplane.statefile import StateFileError
from controlplane.telemetry.metrics import REGISTRY
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import Sender, XdsServer
from controlplane.xds.tls import ServerTls
from tests.support.ads import FakeEnvoy
from tests.support.als_entries import ALLOWED, entry
from tests.support.certs import CertFiles, make_pki
from tests.support.ports import LOOPBACK, poll_until

ROOT = Path(__file__).resolve().parent.parent
GITLAB = "https://gitlab.example.com"
ROLE_ARN = "arn:aws:iam::123456789012:role/ci-reader"
# Shaped like real secrets, so the redaction patterns are what is tested.
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXRoYXQtbXVzdC1uZXZlci1iZS1zdG9yZWQ"
PAT = "glpat-AbCdEfGhIjKlMnOpQrSt"
GATEWAY = "ci-gateway"
ATTEST_WAIT = 0.5  # how long a claimed node's ADS stream is waited for in these tests
T = TypeVar("T")


def sample(name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    return sum(
        s.value
        for metric in REGISTRY.collect()
        for s in metric.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


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
        "ref_type": "branch",
        "ref_protected": "true",
        "pipeline_source": "push",
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


def test_an_empty_store_is_refused_not_started_afresh(tmp_path: Path) -> None:
    """A 0-byte audit.sqlite3 used to become a new, empty trail: the records it held were silently gone."""
    path = tmp_path / "audit.sqlite3"
    path.write_bytes(b"")
    with pytest.raises(StateFileError, match=r"audit\.sqlite3.*not an audit store"):
        AuditStore(path, retention=None)
    assert path.read_bytes() == b""


def test_a_symlinked_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    path.symlink_to(tmp_path / "gone.sqlite3")
    with pytest.raises(StateFileError, match=r"audit\.sqlite3: is a symbolic link"):
        AuditStore(path, retention=None)
    assert not (tmp_path / "gone.sqlite3").exists()


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
    store = AuditStore(tmp_path / "audit.sqlite3", queue_size=2, sender_queue_size=2)
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


def test_an_allowed_request_maps_every_field() -> None:
    received = 1_700_000_003.5
    got = record_from_entry(
        entry(claims=gitlab_claims(), rbac=ALLOWED), gateway="gw", node="n1", received=received, peer="10.0.0.7"
    )
    assert got == AuditRecord(
        time=received,  # the receiver's clock, not the sender's
        reported_time=1_700_000_000.25,
        peer="10.0.0.7",
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
    def __init__(
        self, store: AuditStore, service: AccessLogService, channel: grpc.aio.Channel, cache: SnapshotCache
    ) -> None:
        self.store = store
        self.service = service
        self.channel = channel
        self.cache = cache
        self.gateways: list[FakeEnvoy] = []
        self.target = ""  # host:port of the server, for a client of its own (another connection)

    async def gateway(self, node: str, group: str = GATEWAY, channel: grpc.aio.Channel | None = None) -> FakeEnvoy:
        """An ADS stream as that node: what vouches for its access-log streams."""
        envoy = FakeEnvoy(channel or self.channel, node, group)
        await envoy.send(CLUSTER)
        await envoy.recv()
        self.gateways.append(envoy)
        return envoy

    def stream(self, channel: grpc.aio.Channel | None = None) -> Any:
        method = (channel or self.channel).stream_unary(
            f"/{SERVICE}/{METHOD}",
            request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )
        return method()


@pytest.fixture
async def plane(store: AuditStore) -> AsyncIterator[Plane]:
    async with serving(store) as built:
        yield built


@contextlib.asynccontextmanager
async def serving(store: AuditStore) -> AsyncIterator[Plane]:
    """An xDS server with the ALS on it, serving group GATEWAY, and a plain-text channel to it."""
    cache = SnapshotCache()
    cache.set(Snapshot.empty(GATEWAY))
    server = XdsServer(cache, ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    service = AccessLogService(store, senders=server)
    server.attest_wait = ATTEST_WAIT
    port = await server.start(LOOPBACK, 0, extra_handlers=[service.handler()])
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{port}")
    built = Plane(store, service, channel, cache)
    built.target = f"{LOOPBACK}:{port}"
    try:
        yield built
    finally:
        for envoy in built.gateways:
            envoy.call.cancel()
        await service.close()
        await channel.close()
        await server.stop(1.0)


def message(
    *entries: accesslog_pb2.HTTPAccessLogEntry, node: str | None = None, cluster: str = GATEWAY
) -> als_pb2.StreamAccessLogsMessage:
    built = als_pb2.StreamAccessLogsMessage()
    if node is not None:  # Envoy identifies itself on a stream's first message only
        built.identifier.node.id, built.identifier.node.cluster = node, cluster
        built.identifier.log_name = "log-name-is-not-trusted"
    built.http_logs.log_entry.extend(entries)
    return built


async def test_a_stream_is_answered_once_its_records_are_committed(plane: Plane) -> None:
    await plane.gateway("envoy-7")
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
    await plane.gateway("envoy-8")
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
    def fragile(built: accesslog_pb2.HTTPAccessLogEntry, **attributes: Any) -> AuditRecord:
        if built.request.path == "/bad":
            raise ValueError("unreadable")
        return record_from_entry(built, **attributes)

    monkeypatch.setattr(als, "record_from_entry", fragile)
    dropped = sample("controlplane_audit_records_dropped_total", gateway=GATEWAY, reason="unreadable")
    await plane.gateway("envoy-9")
    call = plane.stream()
    good = entry(claims=gitlab_claims(job_id="13"), rbac=ALLOWED)
    await call.write(message(entry(path="/bad"), good, node="envoy-9"))
    await call.done_writing()
    await asyncio.wait_for(call, 10)
    assert len(await asyncio.to_thread(plane.store.query, job="13")) == 1
    assert sample("controlplane_audit_records_dropped_total", gateway=GATEWAY, reason="unreadable") == dropped + 1


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
    signed = record(time=1_700_000_000.5, job_id="5", path="/t", cloud_identity=ROLE_ARN)
    write(store, signed, record(time=1_700_000_100.0, job_id="6"))
    assert run_audit(cli("--job", "5", "--db", str(store.path))) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "TIME", "GATEWAY", "METHOD", "PATH", "STATUS", "DECISION", "POLICY", "CLOUD_IDENTITY", "PROJECT", "PIPELINE",
        "JOB", "REF", "PROTECTED", "SOURCE", "ENVIRONMENT", "USER"
    ]  # fmt: skip
    assert row.split() == [
        "2023-11-14T22:13:20.500Z", "ci-gateway", "GET", "/t", "200", "allowed",
        "deployer-reads-reports/reports-read", ROLE_ARN, "acme/deployer", "900", "5", "main", "true", "push", "-",
        "ci-user",
    ]  # fmt: skip
    assert run_audit(cli("--project", "acme/deployer", "--json", "--db", str(store.path), "--limit", "2")) == 0
    first, last = json.loads(capsys.readouterr().out)
    assert (first["cloud_identity"], last["cloud_identity"]) == (ROLE_ARN, None)
    assert last["job_id"] == "6"  # the most recent one, last


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


def test_cli_reads_the_store_of_the_state_dir_serve_was_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = AuditStore(tmp_path / "demo-state" / "audit.sqlite3")
    try:
        write(store, record(job_id="77"))
        assert run_audit(cli("--job", "77", "--json", "--state-dir", str(tmp_path / "demo-state"))) == 0
        assert json.loads(capsys.readouterr().out)[0]["job_id"] == "77"
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


# --- who may write the trail ------------------------------------------------------------------------


async def test_a_peer_without_an_xds_stream_cannot_write_the_trail(plane: Plane) -> None:
    """Anyone reaching the xDS port could stream forged rows for any job, backdated to 1970."""
    refused = sample("controlplane_audit_streams_refused_total")
    call = plane.stream()
    forged = entry(claims=gitlab_claims(job_id="66601", user_login="someone-else"), rbac=ALLOWED, start=1.0)
    await call.write(message(forged, node="forger"))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(call, 10)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await asyncio.to_thread(plane.store.query, job="66601") == []
    assert sample("controlplane_audit_streams_refused_total") == refused + 1


async def test_one_flooding_sender_does_not_crowd_out_another(tmp_path: Path) -> None:
    """A 120k-entry flood dropped 118,970 records, including 9 of 20 real ones from another gateway."""
    small = AuditStore(tmp_path / "audit.sqlite3", retention=None, queue_size=200, batch_size=10)
    try:
        with small._conn_lock:  # the disk is slow: everything waits in the queue
            for i in range(2_000):
                small.submit(record(job_id=f"flood-{i}", node="flooder"), sender="flood/flooder")
            for i in range(20):
                small.submit(record(job_id=f"real-{i}", node="honest"), sender="edge/honest")
            for i in range(2_000):
                small.submit(record(job_id=f"flood-late-{i}", node="flooder"), sender="flood/flooder")
        assert small.flush(10)
        stored = small.query(since=0.0, limit=10_000)
        assert sum(1 for r in stored if r["node"] == "honest") == 20
    finally:
        small.close(10)


async def test_a_forger_claiming_a_gateways_node_cannot_crowd_out_its_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local process with no ADS stream streamed ALS as the real gw-1 (same host: attested); its 120k-entry
    flood kept 1 of gw-1's 20 records, as the queue share was keyed by the node id both claimed."""
    small = AuditStore(tmp_path / "audit.sqlite3", retention=None, queue_size=200, batch_size=10)
    queue_full = {"name": "controlplane_audit_records_dropped_total", "gateway": GATEWAY, "reason": "queue_full"}
    before = sample(**queue_full)

    async def handled(count: int) -> None:
        def done() -> bool:
            return small._accepted + sample(**queue_full) - before >= count

        await eventually(done, f"{count} entries handled")

    def batch(job: str, count: int, node: str | None = None) -> als_pb2.StreamAccessLogsMessage:
        return message(*(entry(claims=gitlab_claims(job_id=job), path=f"/{i}") for i in range(count)), node=node)

    caplog.set_level(logging.WARNING, logger="controlplane.audit")
    try:
        async with serving(small) as plane, grpc.aio.insecure_channel(plane.target) as elsewhere:
            await plane.gateway("gw-1")
            honest, forger = plane.stream(), plane.stream(elsewhere)
            with small._conn_lock:  # the disk is slow: everything waits in the queue
                await honest.write(batch("31", 10, node="gw-1"))
                await handled(10)
                await forger.write(batch("66631", 500, node="gw-1"))
                await forger.write(batch("66631", 500))
                await handled(1010)
                await honest.write(batch("31", 10))
                await handled(1020)
            for call in (honest, forger):
                await call.done_writing()
                await asyncio.wait_for(call, 10)
            assert len(await asyncio.to_thread(small.query, job="31", limit=100)) == 20
    finally:
        small.close(10)
    dropping = [r.getMessage() for r in caplog.records if "audit queue full" in r.getMessage()]
    assert dropping and f"from stream 2 ({LOOPBACK}:" in dropping[0] and "'gw-1'" in dropping[0], dropping


def test_a_share_is_a_certificate_with_mtls_else_one_stream() -> None:
    """What a forger cannot share with the gateway it impersonates: its certificate, or else its own stream."""
    plain = Sender("gw-1", GATEWAY, GATEWAY, LOOPBACK, None)
    assert als.sender_key(plain, f"ipv4:{LOOPBACK}:4242", 1) != als.sender_key(plain, f"ipv4:{LOOPBACK}:4242", 2)
    assert f"({LOOPBACK}:4242, node 'gw-1')" in als.sender_key(plain, f"ipv4:{LOOPBACK}:4242", 1)
    assert len(als.sender_key(replace(plain, node_id="n" * 5_000), "ipv4:10.0.0.1:1", 1)) < 200
    tls = replace(plain, identity="gateway-client")
    assert als.sender_key(tls, f"ipv4:{LOOPBACK}:1", 1) == als.sender_key(tls, f"ipv4:{LOOPBACK}:2", 2)


def test_the_sender_dropping_the_most_is_named_at_a_bounded_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = AuditStore(tmp_path / "audit.sqlite3", retention=None, queue_size=8, sender_queue_size=2)
    caplog.set_level(logging.WARNING, logger="controlplane.audit")
    try:
        with small._conn_lock:
            for i in range(1_000):
                small.submit(record(job_id=f"f{i}"), sender="stream 1 (10.0.0.1:1, node 'a')", label="edge")
                small.submit(record(job_id=f"g{i}"), sender="stream 2 (10.0.0.2:2, node 'b')", label="edge")
                small.submit(record(job_id=f"h{i}"), sender="stream 3 (10.0.0.3:3, node 'c')", label="edge")
    finally:
        small.close(10)
    lines = [r.getMessage() for r in caplog.records if "audit queue full" in r.getMessage()]
    assert len(lines) == 2  # the first drop at once, the rest when the store closes (within 10 s)
    assert "1 record(s) dropped from 1 sender(s)" in lines[0] and "from stream " in lines[0]
    assert "dropped from 3 sender(s)" in lines[1]


async def test_a_gateway_of_a_group_no_policy_defines_cannot_write_the_trail(plane: Plane) -> None:
    """Any client may open an ADS stream in a made-up group; its rows were stored with gateway=no-such-group."""
    await plane.gateway("odd-node", group="no-such-group")
    refused = sample("controlplane_audit_streams_refused_total", reason="unknown_group")
    call = plane.stream()
    await call.write(message(entry(claims=gitlab_claims(job_id="66604")), node="odd-node", cluster="no-such-group"))
    assert (await _refusal(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert await asyncio.to_thread(plane.store.query, job="66604") == []
    assert sample("controlplane_audit_streams_refused_total", reason="unknown_group") == refused + 1


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(call, 10)
    return error.value


async def test_records_name_the_attested_gateway_and_the_receivers_time(plane: Plane) -> None:
    await plane.gateway("envoy-20")
    call = plane.stream()
    backdated = entry(claims=gitlab_claims(job_id="20"), rbac=ALLOWED, start=1.0)  # 1970
    before = time.time()
    await call.write(message(backdated, node="envoy-20"))
    await call.done_writing()
    await asyncio.wait_for(call, 10)
    (got,) = await asyncio.to_thread(plane.store.query, job="20")
    assert (got["gateway"], got["node"], got["peer"], got["identity"]) == (GATEWAY, "envoy-20", LOOPBACK, None)
    assert before <= got["time"] <= time.time()
    assert got["reported_time"] == pytest.approx(got["time"] - als.REPORTED_TIME_PAST)  # clamped, kept apart
    assert await asyncio.to_thread(plane.store.query, since=0.0, limit=10) == [got]


async def test_a_node_claiming_another_cluster_or_nothing_is_refused(plane: Plane) -> None:
    await plane.gateway("envoy-21")
    refused = sample("controlplane_audit_streams_refused_total", reason="no_xds_stream")
    call = plane.stream()
    await call.write(message(entry(claims=gitlab_claims(job_id="21")), node="envoy-21", cluster="other-gateway"))
    assert (await _refusal(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert sample("controlplane_audit_streams_refused_total", reason="no_xds_stream") == refused + 1

    unidentified = plane.stream()
    await unidentified.write(message(entry(claims=gitlab_claims(job_id="21"))))
    assert (await _refusal(unidentified)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert sample("controlplane_audit_streams_refused_total", reason="unidentified") >= 1
    assert await asyncio.to_thread(plane.store.query, job="21") == []
    assert sample("controlplane_audit_records_dropped_total", gateway="unattested", reason="refused") >= 2


async def test_an_access_log_stream_opened_before_its_ads_stream_waits_for_it(plane: Plane) -> None:
    """A restarted control plane: Envoy may reconnect its access log before its ADS stream."""
    call = plane.stream()
    await call.write(message(entry(claims=gitlab_claims(job_id="22"), rbac=ALLOWED), node="envoy-22"))
    await plane.gateway("envoy-22")
    await call.done_writing()
    await asyncio.wait_for(call, 10)
    assert len(await asyncio.to_thread(plane.store.query, job="22")) == 1


async def test_attestation_compares_the_host_and_the_certificate_identity() -> None:
    cache = SnapshotCache()
    server = XdsServer(cache, ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    port = await server.start(LOOPBACK, 0)
    try:
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            envoy = FakeEnvoy(channel, "envoy-23", GATEWAY)
            await envoy.send(CLUSTER)
            await envoy.recv()
            attest = server.attest
            assert await attest("envoy-23", GATEWAY, f"ipv4:{LOOPBACK}:1", None, wait=0) == "unknown_group"
            cache.set(Snapshot.empty(GATEWAY))  # now a policy defines the group
            sender = await attest("envoy-23", GATEWAY, f"ipv4:{LOOPBACK}:1", None, wait=0)
            assert isinstance(sender, Sender) and (sender.node_id, sender.group, sender.label, sender.peer) == (
                "envoy-23",
                GATEWAY,
                GATEWAY,
                LOOPBACK,
            )
            assert await attest("envoy-23", GATEWAY, "ipv4:10.9.9.9:1", None, wait=0) == "peer_mismatch"
            assert await attest("envoy-23", GATEWAY, f"ipv4:{LOOPBACK}:1", "gw", wait=0) == "identity_mismatch"
            assert await attest("envoy-23", "other", f"ipv4:{LOOPBACK}:1", None, wait=0) == "no_xds_stream"
            assert await attest("nobody", GATEWAY, f"ipv4:{LOOPBACK}:1", None, wait=0.05) == "no_xds_stream"
            envoy.call.cancel()
            await eventually(lambda: server._by_node == {}, "the node is forgotten when its stream ends")
            assert await attest("envoy-23", GATEWAY, f"ipv4:{LOOPBACK}:1", None, wait=0) == "no_xds_stream"
    finally:
        await server.stop(1.0)


async def test_with_mtls_only_the_same_certificate_identity_may_write(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    store = AuditStore(tmp_path / "audit.sqlite3", retention=None)
    cache = SnapshotCache()
    cache.set(Snapshot.empty(GATEWAY))
    server = XdsServer(cache, ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    service = AccessLogService(store, senders=server)
    server.attest_wait = ATTEST_WAIT
    port = await server.start(
        LOOPBACK, 0, tls=ServerTls(pki.server.cert, pki.server.key, pki.ca), extra_handlers=[service.handler()]
    )

    def channel(client: CertFiles) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=client.key.read_bytes(),
            certificate_chain=client.cert.read_bytes(),
        )
        return grpc.aio.secure_channel(f"localhost:{port}", credentials)

    try:
        async with channel(pki.client) as gateway_channel, channel(pki.second_client) as other_channel:
            plane = Plane(store, service, gateway_channel, cache)
            envoy = await plane.gateway("tls-gw")
            impostor = Plane(store, service, other_channel, cache).stream()  # same node id, another certificate
            await impostor.write(message(entry(claims=gitlab_claims(job_id="24")), node="tls-gw"))
            assert (await _refusal(impostor)).code() == grpc.StatusCode.PERMISSION_DENIED
            genuine = plane.stream()
            await genuine.write(message(entry(claims=gitlab_claims(job_id="25"), rbac=ALLOWED), node="tls-gw"))
            await genuine.done_writing()
            await asyncio.wait_for(genuine, 10)
            envoy.call.cancel()
        assert await asyncio.to_thread(store.query, job="24") == []
        (got,) = await asyncio.to_thread(store.query, job="25")
        assert got["identity"] == "gateway-client"
    finally:
        await service.close()
        await server.stop(1.0)
        store.close(10)


async def test_drops_are_counted_per_sending_gateway(tmp_path: Path) -> None:
    small = AuditStore(tmp_path / "audit.sqlite3", retention=None, queue_size=8, batch_size=2)
    before = sample("controlplane_audit_records_dropped_total", gateway="flood", reason="queue_full")
    quiet = sample("controlplane_audit_records_dropped_total", gateway="edge")
    try:
        with small._conn_lock:
            for i in range(100):
                small.submit(record(job_id=f"f{i}"), sender="flood/a", label="flood")
            small.submit(record(job_id="q"), sender="edge/b", label="edge")
        assert small.flush(10)
    finally:
        small.close(10)
    assert sample("controlplane_audit_records_dropped_total", gateway="flood", reason="queue_full") >= before + 90
    assert sample("controlplane_audit_records_dropped_total", gateway="edge") == quiet


def test_a_version_1_store_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, gateway TEXT NOT NULL,"
        " node TEXT NOT NULL, backend TEXT, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,"
        " decision TEXT NOT NULL, details TEXT, policy TEXT, project_id TEXT, project_path TEXT, pipeline_id TEXT,"
        " job_id TEXT, ref TEXT, user TEXT, credential_jti TEXT, issuer TEXT);"
        "INSERT INTO audit (time, gateway, node, method, path, status, decision, job_id)"
        " VALUES (5.0, 'g', 'n', 'GET', '/', 200, 'allowed', 'old');"
        "PRAGMA user_version=1;"
    )
    old.close()
    store = AuditStore(path, retention=None)
    try:
        write(store, record(job_id="new", peer="10.0.0.1", identity="gw", reported_time=4.0))
        (kept,) = store.query(job="old")
        assert kept["peer"] is None and kept["reported_time"] is None
        (new,) = store.query(job="new")
        assert (new["peer"], new["identity"], new["reported_time"]) == ("10.0.0.1", "gw", 4.0)
    finally:
        store.close(10)


async def test_a_large_first_message_waits_for_its_ads_stream_too(plane: Plane) -> None:
    """What an Envoy buffered while its replica was gone arrives as one big first message, before its ADS stream
    is back (docs/shared-state.md): it waits like a small one, so those records are not lost at a failover."""
    call = plane.stream()
    backlog = [entry(claims=gitlab_claims(job_id="27"), rbac=ALLOWED, path="/" + "p" * 2_000) for _ in range(100)]
    first = message(*backlog, node="envoy-27")
    assert first.ByteSize() > 200_000
    await call.write(first)
    await plane.gateway("envoy-27")
    await call.done_writing()
    await asyncio.wait_for(call, 10)
    assert len(await asyncio.to_thread(plane.store.query, job="27", limit=1_000)) == 100


async def test_first_messages_past_the_awaiting_budget_are_judged_at_once_not_held(plane: Plane) -> None:
    """Claims awaiting their ADS stream are held in memory: together they stay within a budget, and a node id
    no ADS stream could have is not waited for at all."""
    plane.service.senders.attest_wait = 60.0  # type: ignore[union-attr]
    plane.service.awaited_bytes_limit = 64 * 1024
    waiting = plane.stream()
    await waiting.write(message(entry(path="/" + "w" * 40_000), node="not-yet-connected-1"))  # held: in budget
    started = time.monotonic()
    over = message(entry(claims=gitlab_claims(job_id="26"), path="/" + "p" * 30_000), node="not-yet-connected-2")
    for first in (over, message(entry(), node="n" * 100_000)):
        call = plane.stream()
        await call.write(first)
        assert (await _refusal(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert time.monotonic() - started < 10.0
    waiting.cancel()


def test_cli_into_a_closed_pipe_exits_quietly(store: AuditStore) -> None:
    """`controlplane audit ... | head`: once `head` has its lines, no BrokenPipeError traceback."""
    write(store, *(record(time=1_000_000.0 + i, job_id=str(i)) for i in range(2_000)))
    command = [sys.executable, "-m", "controlplane", "audit", "--since", "1970-01-01", "--limit", "2000"]
    head = subprocess.Popen(
        [*command, "--db", str(store.path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    assert head.stdout is not None and head.stderr is not None
    assert head.stdout.readline().startswith(b"TIME")
    head.stdout.close()  # what `head -1` does once it has its line
    stderr = head.stderr.read().decode()
    code = head.wait(60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert code == 141  # 128 + SIGPIPE, as a Unix tool killed by it reports


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


async def test_allowed_requests_of_raw_id_tokens_are_reported_with_their_times(plane: Plane) -> None:
    """What lets the credentials service find a job whose Job Hook was missed at its first request (issue 10,
    point 13): the receiver reports job, project, issuer, iat and exp of allowed raw ID tokens, nothing else."""
    seen: list[dict[str, Any]] = []
    plane.service.on_job = lambda **job: seen.append(job)
    await plane.gateway("envoy-10")
    call = plane.stream()
    timed = {"iat": 1_700_000_000, "exp": 1_700_003_600}
    await call.write(
        message(
            entry(claims=gitlab_claims(job_id="21", **timed), rbac=ALLOWED),
            entry(claims=gitlab_claims(job_id="22", **timed), status=403, rbac={"enforced_engine_result": "denied"}),
            entry(claims=gitlab_claims(job_id="23", iss=CREDENTIAL_ISSUER, **timed), rbac=ALLOWED),
            entry(claims=gitlab_claims(job_id="24"), rbac=ALLOWED),  # no iat nor nbf: nothing to compare
            entry(claims=gitlab_claims(job_id="25", nbf=1_700_000_001), rbac=ALLOWED),
            node="envoy-10",
        )
    )
    await call.done_writing()
    await asyncio.wait_for(call, 10)
    job = {"project_id": "42", "issuer": GITLAB}
    assert seen == [
        {"job_id": "21", **job, "issued_at": 1_700_000_000.0, "expires_at": 1_700_003_600.0},
        {"job_id": "25", **job, "issued_at": 1_700_000_001.0, "expires_at": None},
    ]
    assert len(await asyncio.to_thread(plane.store.query, job="21")) == 1  # the trail is kept as before


# --- schema version 3: the claims `controlplane suggest` pins subjects on ------------------------------------

JWT_SHAPED = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def test_the_ref_and_pipeline_claims_are_recorded_as_gitlab_writes_them() -> None:
    claims = gitlab_claims(ref_type="tag", ref_protected="false", pipeline_source="schedule", environment="prod/eu")
    got = record_from_entry(entry(claims=claims, rbac=ALLOWED), gateway="gw", node="n1")
    assert (got.ref_type, got.ref_protected, got.pipeline_source, got.environment) == (
        "tag",
        "false",
        "schedule",
        "prod/eu",
    )
    # a JSON boolean reads as GitLab's text; a job without an environment has none; a list is no claim at all
    odd = record_from_entry(
        entry(claims=gitlab_claims(ref_protected=True, pipeline_source=["push"]), rbac=ALLOWED), gateway="g", node="n"
    )
    assert (odd.ref_protected, odd.pipeline_source, odd.environment) == ("true", None, None)


def test_the_new_claims_are_bounded_and_token_shaped_text_is_redacted(store: AuditStore) -> None:
    write(
        store,
        record(job_id="b", ref_type="x" * 500, pipeline_source="p" * 500, environment="e" * 500),
        record(job_id="t", ref_protected=JWT_SHAPED, environment=f"review/{JWT_SHAPED}"),
    )
    (bounded,) = store.query(job="b")
    assert (len(bounded["ref_type"]), len(bounded["pipeline_source"])) == (MAX_SHORT_CHARS, MAX_SHORT_CHARS)
    assert len(bounded["environment"]) == 256  # environments may be long (GitLab allows 255), not unbounded
    (tokened,) = store.query(job="t")
    assert (tokened["ref_protected"], tokened["environment"]) == (REDACTED, f"review/{REDACTED}")


_VERSION_2_TABLE = (
    "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, gateway TEXT NOT NULL,"
    " node TEXT NOT NULL, backend TEXT, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,"
    " decision TEXT NOT NULL CHECK (decision IN ('allowed', 'denied')), details TEXT, policy TEXT, project_id TEXT,"
    " project_path TEXT, pipeline_id TEXT, job_id TEXT, ref TEXT, user TEXT, credential_jti TEXT, issuer TEXT,"
    " peer TEXT, identity TEXT, reported_time REAL);"
    "CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit"
    " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;"
)


def test_a_version_2_store_with_rows_is_read_then_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        _VERSION_2_TABLE + "INSERT INTO audit (time, gateway, node, method, path, status, decision, job_id, ref, peer)"
        " VALUES (5.0, 'g', 'n', 'GET', '/a', 200, 'allowed', 'old', 'main', '10.0.0.9'),"
        " (6.0, 'g', 'n', 'GET', '/b', 200, 'allowed', 'old', 'main', '10.0.0.9');"
        "PRAGMA user_version=2;"
    )
    old.close()
    # A newer reader (the CLI, suggest) on a file an older serve still writes: the claims read as not recorded.
    reader = open_readonly(path)
    try:
        before = query_records(reader, job="old")
    finally:
        reader.close()
    assert [(r["path"], r["peer"], r["ref_protected"], r["environment"]) for r in before] == [
        ("/a", "10.0.0.9", None, None),
        ("/b", "10.0.0.9", None, None),
    ]
    store = AuditStore(path, retention=None)
    try:
        write(store, record(job_id="new", ref_type="branch", ref_protected="true", environment="production"))
        kept = store.query(job="old")
        assert [(r["id"], r["path"], r["ref_protected"], r["pipeline_source"]) for r in kept] == [
            (1, "/a", None, None),
            (2, "/b", None, None),
        ]
        (new,) = store.query(job="new")
        assert (new["id"], new["ref_type"], new["ref_protected"], new["pipeline_source"], new["environment"]) == (
            3,
            "branch",
            "true",
            "push",
            "production",
        )
    finally:
        store.close(10)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit SET ref_protected = 'true'")
    finally:
        db.close()


def test_a_version_3_store_with_rows_is_read_then_upgraded_in_place(tmp_path: Path) -> None:
    """Schema 4 adds `cloud_identity`: a reader sees it as not recorded on an older file, the writer adds it in
    place, the rows before keep NULL and new rows carry it."""
    path = tmp_path / "audit.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        _VERSION_2_TABLE.replace(
            "reported_time REAL)",
            "reported_time REAL, ref_type TEXT, ref_protected TEXT, pipeline_source TEXT, environment TEXT)",
        )
        + "INSERT INTO audit (time, gateway, node, backend, method, path, status, decision, job_id, ref_protected)"
        " VALUES (5.0, 'g', 'n', 's3', 'GET', '/a', 200, 'allowed', 'old', 'true');"
        "PRAGMA user_version=3;"
    )
    old.close()
    reader = open_readonly(path)
    try:
        (before,) = query_records(reader, job="old")
    finally:
        reader.close()
    assert (before["backend"], before["ref_protected"], before["cloud_identity"]) == ("s3", "true", None)
    store = AuditStore(path, retention=None)
    try:
        write(store, record(job_id="new", backend="s3", cloud_identity=ROLE_ARN))
        (kept,) = store.query(job="old")
        assert (kept["id"], kept["ref_protected"], kept["cloud_identity"]) == (1, "true", None)
        (new,) = store.query(job="new")
        assert (new["id"], new["cloud_identity"]) == (2, ROLE_ARN)
    finally:
        store.close(10)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit SET cloud_identity = 'x'")
    finally:
        db.close()
