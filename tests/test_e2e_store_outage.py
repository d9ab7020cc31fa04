"""PostgreSQL stopped and started again under traffic, with three replicas and an Envoy on each (issue 12, item 6):
serving goes on, what must fail closed does, a revocation made during the outage is enforced at once by the
replica that heard it and by the others once PostgreSQL is back, and no audit record is lost.

The server is one of this test's own (stopping the session's would break other tests), stopped the way an
operator or a failover stops it (fast shutdown) and started again on its port with its data.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest

from tests.support.backends import http_request
from tests.support.gateway import gateway_envoy
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.postgres import running_server
from tests.support.replicas import Replica, gateway_per_replica, replicated

pytestmark = pytest.mark.e2e

REPLICAS = 3
UNREADY_AFTER = 1.0


def ports() -> list[int]:
    return [free_port() for _ in range(REPLICAS)]


def call(port: int, credential: str, path: str = "/r") -> int:
    headers = {"Host": "reports.local", "Authorization": f"Bearer {credential}"}
    return http_request(f"http://{LOOPBACK}:{port}{path}", headers=headers).status


def readyz(replica: Replica) -> int:
    return http_request(f"{replica.controlplane.admin_url}/readyz").status


class Traffic:
    """Requests of one job through every gateway in turn, until stopped; every status counted."""

    def __init__(self, gateway_ports: list[int], credential: str) -> None:
        self.ports, self.credential = gateway_ports, credential
        self.statuses: Counter[int] = Counter()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            port = self.ports[self.sent % len(self.ports)]
            self.statuses[call(port, self.credential, f"/steady/{self.sent}")] += 1
            self.sent += 1
            self._stop.wait(0.01)


def audited(dsn: str, job: str) -> int:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT count(*) FROM audit WHERE job_id = %s", (job,)).fetchone()
    return int(row[0]) if row else 0


def revocation_row(dsn: str, job: str) -> bool:
    with psycopg.connect(dsn) as db:
        return db.execute("SELECT 1 FROM revocations WHERE job_id = %s", (job,)).fetchone() is not None


def test_postgresql_restarted_under_traffic_loses_nothing(tmp_path: Path) -> None:
    gateway_ports = ports()
    with ExitStack() as up:
        server = up.enter_context(running_server())
        dsn = up.enter_context(server.database())
        fleet = up.enter_context(
            replicated(
                tmp_path,
                gateway_per_replica(gateway_ports),
                dsn,
                count=REPLICAS,
                serve_args=("--store-unready-after", str(UNREADY_AFTER), "--store-timeout", "1"),
            )
        )
        for n, replica in enumerate(fleet):
            up.enter_context(
                gateway_envoy(
                    replica.controlplane.xds_port,
                    node=f"outage-{n}",
                    name=f"outage-{n}",
                    group=f"gw-{n}",
                    flush_logs=True,
                )
            )
        steady = str(fleet[1].exchange(fleet.subject(801)).json()["access_token"])  # the keys are shared: any replica
        doomed = str(fleet[2].exchange(fleet.subject(802)).json()["access_token"])
        for port in gateway_ports:
            poll_until(lambda p=port: call(p, steady) == 200 and call(p, doomed) == 200, 20, message="allowed first")

        with Traffic(gateway_ports, steady) as traffic:
            poll_until(lambda: traffic.sent >= 30, 20, message="traffic flowing")
            server.shut_down()
            down_at = time.monotonic()

            # Fail closed where it must: no credential that could not be recorded as spent.
            assert fleet[1].exchange(fleet.subject(803)).status == 503
            # Not ready for new Envoys once the store has been away a while; the connected ones keep serving.
            poll_until(lambda: all(readyz(r) == 503 for r in fleet), 20, message="every replica says not ready")
            reason = http_request(f"{fleet[0].controlplane.admin_url}/readyz").text
            assert "shared store unreachable" in reason, reason
            # A job finished now: the replica that hears it denies it at once, from memory.
            fleet[0].job_finished(802)
            local = poll_until(lambda: call(gateway_ports[0], doomed) == 403, 5, interval=0.01, message="denied")
            assert local
            status = fleet[0].status()["credentials"]["revocations_store"]
            assert status["pending"] == 1 and status["healthy"] is False, status
            sent_while_down = traffic.sent

            server.start_again()
            back_at = time.monotonic()
            for port in gateway_ports[1:]:  # the others learn of it once the outbox is written
                poll_until(lambda p=port: call(p, doomed) == 403, 30, interval=0.02, message="denied everywhere")
            everywhere = time.monotonic() - back_at
            poll_until(lambda: all(readyz(r) == 200 for r in fleet), 30, message="ready again")
            poll_until(lambda: traffic.sent >= sent_while_down + 30, 20, message="traffic after the restart")
            print(
                f"\nPostgreSQL down {back_at - down_at:.1f}s; revocation made meanwhile enforced on every replica "
                f"{everywhere * 1000:.0f} ms after it came back; {traffic.sent} requests, {dict(traffic.statuses)}"
            )
        assert set(traffic.statuses) == {200}, traffic.statuses  # serving never stopped
        assert revocation_row(dsn, "802")
        poll_until(lambda: audited(dsn, "801") >= traffic.sent, 60, interval=0.5, message="every record written")
        assert audited(dsn, "801") >= traffic.sent  # a batch whose commit reply was lost may be written twice
        for replica in fleet:
            assert replica.status()["audit"]["dropped"] == 0
