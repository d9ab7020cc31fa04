"""What Envoy must see the same whichever xDS protocol it speaks: each test runs once on State-of-the-World
(`api_type: GRPC`) and once on Delta (`DELTA_GRPC`), each protocol on a stack of its own (the `stack` fixture
of tests/conftest.py, started per value of `protocol`), so both answer to one matrix.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support.backend_swap import REPLACEMENT, Traffic
from tests.support.backends import EchoBackend
from tests.support.ports import poll_until
from tests.support.stack import DEPLOYER, OTHER, OTHER_PROJECT_BINDING, Protocol, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sotw", "delta"])
def protocol(request: pytest.FixtureRequest) -> Protocol:
    value: Protocol = request.param
    return value


def test_the_proxy_speaks_the_protocol_under_test(stack: Stack, protocol: Protocol) -> None:
    proxy = poll_until(stack.proxy, 10, message="proxy in status")
    assert proxy is not None and proxy["protocol"] == protocol


# --- the decision matrix -------------------------------------------------------------------------


def test_allowed_job_reaches_backend_with_its_identity_but_not_its_token(stack: Stack) -> None:
    response = stack.request("reports.local", "/reports/7", stack.token(job_id=555), headers={"x-ci-project-id": "999"})
    assert response.status == 200, response.text
    seen = response.json()["headers"]
    assert "authorization" not in seen
    assert seen["x-ci-project-id"] == "42"  # the forged header was replaced, not appended
    assert seen["x-ci-project-path"] == "acme/platform/deployer"
    assert seen["x-ci-job-id"] == "555"
    assert seen["x-ci-ref"] == "main"


@pytest.mark.parametrize(
    ("case", "host", "method", "path", "claims"),
    [
        ("wrong project", "reports.local", "GET", "/r", {"project": OTHER}),
        ("wrong branch", "deploy.local", "POST", "/deployments/x", {"ref": "feature-x"}),
        ("tag, not branch", "deploy.local", "POST", "/deployments/x", {"ref_type": "tag"}),
        ("unprotected ref", "reports.local", "GET", "/r", {"ref_protected": False}),
        ("read-only role doing POST", "reports.local", "POST", "/r", {}),
        ("path outside the role", "deploy.local", "POST", "/admin", {}),
        ("merge-request pipeline", "reports.local", "GET", "/r", {"pipeline_source": "merge_request_event"}),
        (
            "merge-request pipeline on deploy",
            "deploy.local",
            "POST",
            "/deployments/x",
            {"pipeline_source": "merge_request_event"},
        ),
        ("web pipeline on deploy", "deploy.local", "POST", "/deployments/x", {"pipeline_source": "web"}),
        ("project id as a number", "reports.local", "GET", "/r", {"raw": {"project_id": 42}}),
    ],
)
def test_policy_denials_are_403(
    stack: Stack, case: str, host: str, method: str, path: str, claims: dict[str, Any]
) -> None:
    aud = f"https://{host}"
    claims = dict(claims)  # parametrize shares this dict between the runs on each protocol
    project = claims.pop("project", DEPLOYER)
    token = stack.token(project, aud=aud, **claims)
    response = stack.request(host, path, token, method=method)
    assert response.status == 403, f"{case}: {response.status} {response.text}"
    assert response.text == "RBAC: access denied"


def test_authentication_failures_are_401(stack: Stack) -> None:
    now = int(time.time())
    expired = stack.token(iat=now - 900, exp=now - 300)
    forged = stack.token(key=stack.gitlab.rogue, kid=stack.gitlab.signing_key.kid)
    for name, token in (
        ("expired", expired),
        ("bad signature", forged),
        ("missing", None),
        ("garbage", "not.a.jwt"),
    ):
        response = stack.request("reports.local", "/r", token)
        assert response.status == 401, f"{name}: {response.status} {response.text}"
    assert stack.request("reports.local", "/r", "x", headers={"Authorization": "bearer " + stack.token()}).status == 401


# --- living with change --------------------------------------------------------------------------


def test_policy_change_is_enforced_without_restarting_envoy(stack: Stack) -> None:
    token = stack.token(OTHER)
    assert stack.request("reports.local", "/r", token).status == 403
    pid = stack.envoy.pid
    stack.write("other.yaml", OTHER_PROJECT_BINDING)
    try:
        stack.wait_status("reports.local", "/r", token, 200)
    finally:
        stack.remove("other.yaml")
    stack.wait_status("reports.local", "/r", token, 403)
    assert stack.envoy.pid == pid


EXTRA_BACKEND = """\
kind: Backend
name: extra-api
hosts: [extra.local]
endpoints: [{{address: 127.0.0.1, port: {port}}}]
---
kind: Role
name: extra-read
backend: extra-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: deployer-reads-extra
roles: [extra-read]
subjects:
  - project: 42
"""


def test_a_new_backend_is_added_and_removed_without_a_gap(stack: Stack) -> None:
    """CDS + EDS + LDS + RDS change together; removal keeps the cluster until the route is gone."""
    gateway = (stack.policy / "gateway.yaml").read_text()
    token = stack.token(aud="https://extra.local")
    with EchoBackend("extra") as extra:
        stack.write("extra.yaml", EXTRA_BACKEND.format(port=extra.port))
        stack.write(
            "gateway.yaml",
            gateway.replace("backends: [reports-api, deploy-api]", "backends: [reports-api, deploy-api, extra-api]"),
        )
        try:
            stack.wait_status("extra.local", "/x", token, 200)
            assert "backend-extra-api" in stack.envoy_clusters()
            assert stack.request("extra.local", "/x", token).json()["backend"] == "extra"
        finally:
            stack.write("gateway.yaml", gateway)
            stack.remove("extra.yaml")
        stack.wait_status("extra.local", "/x", token, 403)
        poll_until(lambda: "backend-extra-api" not in stack.envoy_clusters(), 10, message="cluster removed")
    assert stack.request("reports.local", "/r", stack.token()).status == 200


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
            with Traffic(stack, stack.token()) as traffic:
                poll_until(lambda: traffic.served_by("reports"), 10, message="traffic flowing")
                assert "backend-reports-v2" not in stack.envoy_clusters()
                # Either file alone is an invalid policy (a role or the gateway naming a missing backend), so
                # whether the watcher sees one burst or two, the only new snapshot is the whole swap.
                stack.write("backends.yaml", swapped.replace("backend: reports-api", "backend: reports-v2"))
                stack.write("gateway.yaml", gateway.replace("reports-api", "reports-v2"))
                traffic.wait_for_the_replacement()
            assert stack.controlplane.metric("controlplane_snapshot_builds_total") == builds + 1, "not one change"
        finally:
            stack.write("backends.yaml", backends)
            stack.write("gateway.yaml", gateway)
        traffic.wait_for_the_original()
    traffic.assert_none_failed(cds_rejected)


def test_restart_envoy_keeps_serving_and_nothing_is_repushed(stack: Stack) -> None:
    updates = ("cluster_manager.cds.update_success", "listener_manager.lds.update_success")
    before = {k: stack.envoy.stats().get(k) for k in updates}
    stack.controlplane.stop()
    try:
        assert stack.request("reports.local", "/r", stack.token()).status == 200  # data plane unaffected
        assert stack.request("reports.local", "/r", stack.token(OTHER)).status == 403
    finally:
        stack.controlplane.start()
    poll_until(stack.proxy, 15, message="Envoy reconnected")
    poll_until(lambda: stack.envoy.stats().get("control_plane.connected_state") == 1, 15, message="connected")
    assert stack.controlplane.metric("controlplane_xds_pushes_total", type="cds") == 0
    assert stack.controlplane.metric("controlplane_xds_pushes_total", type="lds") == 0
    assert {k: stack.envoy.stats().get(k) for k in updates} == before
    assert stack.request("reports.local", "/r", stack.token()).status == 200
