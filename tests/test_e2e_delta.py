"""The SotW end-to-end matrix again, with Envoy speaking Delta xDS (`api_type: DELTA_GRPC`).

The decision and change tests are imported from test_e2e and run here against this module's `stack`, so
both protocols answer to one matrix; only what differs for Delta (the status protocol) is written here.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from controlplane.cli.bootstrap import render_bootstrap
from tests.support.backends import EchoBackend
from tests.support.controlplane import ControlPlaneProcess
from tests.support.envoy import EnvoyProcess
from tests.support.fake_gitlab import FakeGitLab
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.test_e2e import (
    OTHER,
    OTHER_PROJECT_BINDING,
    Stack,
    _envoy_clusters,
    _proxy,
    _write_policy,
    test_a_new_backend_is_added_and_removed_without_a_gap,
    test_allowed_job_reaches_backend_with_its_identity_but_not_its_token,
    test_authentication_failures_are_401,
    test_policy_change_is_enforced_without_restarting_envoy,
    test_restart_envoy_keeps_serving_and_nothing_is_repushed,
)

pytestmark = pytest.mark.e2e

__all__ = [
    "test_a_new_backend_is_added_and_removed_without_a_gap",
    "test_allowed_job_reaches_backend_with_its_identity_but_not_its_token",
    "test_authentication_failures_are_401",
    "test_policy_change_is_enforced_without_restarting_envoy",
    "test_restart_envoy_keeps_serving_and_nothing_is_repushed",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-delta")
    policy = root / "policy"
    policy.mkdir()
    listen_port = free_port()
    access_log = root / "access.log"
    with FakeGitLab() as gitlab, EchoBackend("reports") as reports, EchoBackend("deploy") as deploy:
        _write_policy(
            policy,
            issuer=gitlab.issuer,
            reports_port=reports.port,
            deploy_port=deploy.port,
            listen_port=listen_port,
            access_log=access_log,
        )
        with ControlPlaneProcess(policy, log_path=root / "controlplane.log") as controlplane:
            bootstrap = render_bootstrap(
                group="ci-gateway",
                node_id="e2e-envoy-1",
                xds_host=LOOPBACK,
                xds_port=controlplane.xds_port,
                api="delta",
            )
            with EnvoyProcess(bootstrap, name="e2e-envoy-delta") as envoy:
                built = Stack(gitlab, reports, deploy, policy, listen_port, access_log, controlplane, envoy)
                built.wait_status("reports.local", "/healthz", None, 200, timeout=20)
                yield built


def test_status_shows_the_proxy_speaking_delta_with_acked_versions(stack: Stack) -> None:
    proxy = poll_until(lambda: _proxy(stack), 10, message="proxy in status")
    assert proxy is not None
    assert proxy["protocol"] == "delta"
    assert set(proxy["acked"]) >= {"cds", "eds", "lds", "rds"}


def test_denials_are_403(stack: Stack) -> None:
    """test_e2e's parametrized matrix mutates its parameters, so it cannot run twice in one session."""
    for token, host, method, path in (
        (stack.token(OTHER), "reports.local", "GET", "/r"),
        (stack.token(ref_protected=False), "reports.local", "GET", "/r"),
        (stack.token(), "reports.local", "POST", "/r"),
        (stack.token(aud="https://deploy.local", ref="feature-x"), "deploy.local", "POST", "/deployments/x"),
    ):
        response = stack.request(host, path, token, method=method)
        assert response.status == 403, f"{host}{path}: {response.status} {response.text}"


LDS_REJECTED = "listener_manager.lds.update_rejected"
LDS_ACCEPTED = "listener_manager.lds.update_success"


def _lds_stats(stack: Stack) -> tuple[int, int]:
    stats = stack.envoy.stats(filter="^listener_manager\\.lds\\.update_")
    return stats.get(LDS_REJECTED, 0), stats.get(LDS_ACCEPTED, 0)


def test_a_nacked_listener_is_never_resent_and_a_fixed_one_is_accepted(stack: Stack) -> None:
    """A listener on a port already in use is NACKed; Envoy keeps the old one and the NACK shows in status.

    The rejected version must not come back with a later, unrelated change (Envoy would count a second
    rejection), and a valid listener afterwards is sent and ACKed, which clears the NACK.
    """
    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen()
    gateway = (stack.policy / "gateway.yaml").read_text()
    rejected, accepted = _lds_stats(stack)
    lds_pushes = stack.controlplane.metric("controlplane_xds_pushes_total", type="lds")
    try:
        stack.write("gateway.yaml", gateway.replace(f"port: {stack.listen_port}", f"port: {blocker.getsockname()[1]}"))
        proxy = poll_until(lambda: (p := _proxy(stack)) and p["last_nack"] and p, 10, message="NACK in status")
        assert proxy
        assert proxy["protocol"] == "delta" and proxy["last_nack"]["type"] == "lds"
        assert "listener" in proxy["last_nack"]["error"]
        assert _lds_stats(stack) == (rejected + 1, accepted)
        assert stack.controlplane.metric("controlplane_xds_pushes_total", type="lds") == lds_pushes + 1
        # A later change to the routes only is delivered, and the rejected listener does not travel with it.
        stack.write("other.yaml", OTHER_PROJECT_BINDING)
        stack.wait_status("reports.local", "/r", stack.token(OTHER), 200)
        assert _lds_stats(stack) == (rejected + 1, accepted)
        assert stack.controlplane.metric("controlplane_xds_pushes_total", type="lds") == lds_pushes + 1
        assert stack.request("reports.local", "/r", stack.token()).status == 200  # the old listener serves
        # A valid listener (the original port, logging elsewhere) is sent, accepted, and ends the NACK.
        stack.write("gateway.yaml", gateway.replace("access.log", "access-fixed.log"))
        poll_until(lambda: (p := _proxy(stack)) and p["last_nack"] is None, 10, message="NACK cleared by an ACK")
        assert _lds_stats(stack) == (rejected + 1, accepted + 1)
    finally:
        if (stack.policy / "other.yaml").exists():
            stack.remove("other.yaml")
        stack.write("gateway.yaml", gateway)
        blocker.close()
    poll_until(lambda: _lds_stats(stack) == (rejected + 1, accepted + 2), 10, message="original listener back")
    stack.wait_status("reports.local", "/r", stack.token(OTHER), 403)


class _Traffic:
    """Requests back to back from a thread while the policy changes: every answer is recorded."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.answers: list[tuple[int, str]] = []
        self._stack, self._token = stack, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            response = self._stack.request("reports.local", "/r", self._token)
            backend = response.json().get("backend", "") if response.status == 200 else response.text
            self.answers.append((response.status, backend))

    def __enter__(self) -> _Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def served_by(self, backend: str) -> bool:
        return any(answer == (200, backend) for answer in self.answers[-3:])


REPLACEMENT = """\
kind: Backend
name: reports-v2
hosts: [{host}]
audience: https://reports.local
endpoints: [{{address: 127.0.0.1, port: {port}}}]
public_paths: [/healthz]
"""


def _warm(stack: Stack, cluster: str) -> bool:
    stats = stack.envoy.stats(filter="^cluster_manager\\.warming_clusters$")
    return cluster in _envoy_clusters(stack) and stats.get("cluster_manager.warming_clusters") == 0


def test_a_backend_replaced_by_another_never_fails_a_request(stack: Stack) -> None:
    """Make-before-break in Delta: the route moves to the new cluster before the old one is removed (no 503).

    The replacement is first added under another host, so its cluster is warm (endpoints received) when the
    route moves: the swap itself is then one snapshot removing a cluster that the old routes still use. This
    isolates make-before-break; `test_a_backend_swapped_in_one_change_never_fails_a_request` adds warming.
    """
    backends = (stack.policy / "backends.yaml").read_text()
    gateway = (stack.policy / "gateway.yaml").read_text()
    reports = backends.split("---\n")[0]
    cds_rejected = stack.envoy.stats().get("cluster_manager.cds.update_rejected", 0)
    with EchoBackend("reports-v2") as replacement:
        try:
            stack.write("v2.yaml", REPLACEMENT.format(host="v2.local", port=replacement.port))
            stack.write("gateway.yaml", gateway.replace("backends: [", "backends: [reports-v2, "))
            poll_until(lambda: _warm(stack, "backend-reports-v2"), 10, message="replacement cluster warm")
            with _Traffic(stack, stack.token()) as traffic:
                poll_until(lambda: traffic.served_by("reports"), 10, message="traffic flowing")
                swapped = backends.replace(reports, REPLACEMENT.format(host="reports.local", port=replacement.port))
                stack.write("backends.yaml", swapped.replace("backend: reports-api", "backend: reports-v2"))
                stack.remove("v2.yaml")
                stack.write("gateway.yaml", gateway.replace("reports-api", "reports-v2"))
                poll_until(lambda: traffic.served_by("reports-v2"), 10, message="the replacement answers")
                poll_until(lambda: "backend-reports-api" not in _envoy_clusters(stack), 10, message="old cluster gone")
        finally:
            if (stack.policy / "v2.yaml").exists():
                stack.remove("v2.yaml")
            stack.write("backends.yaml", backends)
            stack.write("gateway.yaml", gateway)
        poll_until(lambda: "backend-reports-v2" not in _envoy_clusters(stack), 10, message="replacement removed")
        stack.wait_status("reports.local", "/r", stack.token(), 200)
    failures = [a for a in traffic.answers if a[0] != 200]
    assert not failures, f"{len(failures)} of {len(traffic.answers)} requests failed: {failures[:5]}"
    assert {b for status, b in traffic.answers if status == 200} == {"reports", "reports-v2"}
    assert stack.envoy.stats().get("cluster_manager.cds.update_rejected", 0) == cds_rejected


def test_a_backend_swapped_in_one_change_never_fails_a_request(stack: Stack) -> None:
    """Warming, then make-before-break, from one policy change: the host's backend is replaced by a new one.

    The snapshot adds a cluster Envoy has never seen, moves the route to it and removes the old cluster. The
    route must wait until the new cluster is warm (CDS and its endpoints ACKed), else it answers 503 while
    the endpoints are in flight; the old cluster must stay until the new route is ACKed. The JWT requirement
    the host names keeps its name (same audience and issuers), so the listener and routes, applied one after
    the other, never disagree on it (a 403 "Wrong requirement_name" in between).
    """
    backends = (stack.policy / "backends.yaml").read_text()
    gateway = (stack.policy / "gateway.yaml").read_text()
    reports = backends.split("---\n")[0]
    cds_rejected = stack.envoy.stats().get("cluster_manager.cds.update_rejected", 0)
    builds = stack.controlplane.metric("controlplane_snapshot_builds_total")
    with EchoBackend("reports-v2") as replacement:
        swapped = backends.replace(reports, REPLACEMENT.format(host="reports.local", port=replacement.port))
        try:
            with _Traffic(stack, stack.token()) as traffic:
                poll_until(lambda: traffic.served_by("reports"), 10, message="traffic flowing")
                assert "backend-reports-v2" not in _envoy_clusters(stack)
                # Either file alone is an invalid policy (a role or the gateway naming a missing backend), so
                # whether the watcher sees one burst or two, the only new snapshot is the whole swap.
                stack.write("backends.yaml", swapped.replace("backend: reports-api", "backend: reports-v2"))
                stack.write("gateway.yaml", gateway.replace("reports-api", "reports-v2"))
                poll_until(lambda: traffic.served_by("reports-v2"), 10, message="the replacement answers")
                poll_until(lambda: "backend-reports-api" not in _envoy_clusters(stack), 10, message="old cluster gone")
            assert stack.controlplane.metric("controlplane_snapshot_builds_total") == builds + 1, "not one change"
        finally:
            stack.write("backends.yaml", backends)
            stack.write("gateway.yaml", gateway)
        poll_until(lambda: "backend-reports-v2" not in _envoy_clusters(stack), 10, message="replacement removed")
        stack.wait_status("reports.local", "/r", stack.token(), 200)
    failures = [a for a in traffic.answers if a[0] != 200]
    assert not failures, f"{len(failures)} of {len(traffic.answers)} requests failed: {failures[:5]}"
    assert {b for status, b in traffic.answers if status == 200} == {"reports", "reports-v2"}
    assert stack.envoy.stats().get("cluster_manager.cds.update_rejected", 0) == cds_rejected
