"""What is particular to Envoy speaking Delta xDS (`api_type: DELTA_GRPC`): its status, its NACKs and
make-before-break when a backend is replaced.

The stack is the `stack` fixture of tests/conftest.py with `protocol` set to Delta for this module; what must
hold on both protocols alike is in test_e2e_protocols.py.
"""

from __future__ import annotations

import socket

import pytest

from tests.support.backend_swap import REPLACEMENT, Traffic
from tests.support.backends import EchoBackend
from tests.support.ports import LOOPBACK, poll_until
from tests.support.stack import OTHER, OTHER_PROJECT_BINDING, Protocol, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def protocol() -> Protocol:
    return "delta"


def test_status_shows_the_proxy_speaking_delta_with_acked_versions(stack: Stack) -> None:
    proxy = poll_until(stack.proxy, 10, message="proxy in status")
    assert proxy is not None
    assert proxy["protocol"] == "delta"
    assert set(proxy["acked"]) >= {"cds", "eds", "lds", "rds"}


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
        proxy = poll_until(lambda: (p := stack.proxy()) and p["last_nack"] and p, 10, message="NACK in status")
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
        poll_until(lambda: (p := stack.proxy()) and p["last_nack"] is None, 10, message="NACK cleared by an ACK")
        assert _lds_stats(stack) == (rejected + 1, accepted + 1)
    finally:
        if (stack.policy / "other.yaml").exists():
            stack.remove("other.yaml")
        stack.write("gateway.yaml", gateway)
        blocker.close()
    poll_until(lambda: _lds_stats(stack) == (rejected + 1, accepted + 2), 10, message="original listener back")
    stack.wait_status("reports.local", "/r", stack.token(OTHER), 403)


def _warm(stack: Stack, cluster: str) -> bool:
    stats = stack.envoy.stats(filter="^cluster_manager\\.warming_clusters$")
    return cluster in stack.envoy_clusters() and stats.get("cluster_manager.warming_clusters") == 0


def test_a_backend_replaced_by_another_never_fails_a_request(stack: Stack) -> None:
    """Make-before-break in Delta: the route moves to the new cluster before the old one is removed (no 503).

    The replacement is first added under another host, so its cluster is warm (endpoints received) when the
    route moves: the swap itself is then one snapshot removing a cluster that the old routes still use. This
    isolates make-before-break; test_e2e_protocols' `test_a_backend_swapped_in_one_change_never_fails_a_request`
    adds warming.
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
            with Traffic(stack, stack.token()) as traffic:
                poll_until(lambda: traffic.served_by("reports"), 10, message="traffic flowing")
                swapped = backends.replace(reports, REPLACEMENT.format(host="reports.local", port=replacement.port))
                stack.write("backends.yaml", swapped.replace("backend: reports-api", "backend: reports-v2"))
                stack.remove("v2.yaml")
                stack.write("gateway.yaml", gateway.replace("reports-api", "reports-v2"))
                traffic.wait_for_the_replacement()
        finally:
            if (stack.policy / "v2.yaml").exists():
                stack.remove("v2.yaml")
            stack.write("backends.yaml", backends)
            stack.write("gateway.yaml", gateway)
        traffic.wait_for_the_original()
    traffic.assert_none_failed(cds_rejected)
