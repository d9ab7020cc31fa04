"""The SotW end-to-end matrix again, with Envoy speaking Delta xDS (`api_type: DELTA_GRPC`).

The decision and change tests are imported from test_e2e and run here against this module's `stack`, so
both protocols answer to one matrix; only what differs for Delta (the status protocol) is written here.
"""

from __future__ import annotations

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
    Stack,
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
