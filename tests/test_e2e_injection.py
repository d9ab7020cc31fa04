"""Upstream credential injection on the real Envoy: the backend gets its own secret (over SDS), never the
job's token; a rewritten secret file reaches Envoy without a restart or a listener change; the job never sees
the secret."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.backends import HttpResponse, LoopbackHTTPServer, Response, http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.envoy import EnvoyProcess
from tests.support.fake_gitlab import FakeGitLab
from tests.support.gateway import gateway_envoy
from tests.support.ports import LOOPBACK, free_port, poll_until

pytestmark = pytest.mark.e2e

POLICY = """\
kind: Issuer
name: gitlab
type: gitlab
url: {issuer}
inventory: inventory.yaml
---
kind: Backend
name: vault-api
hosts: [vault.local]
audience: https://vault.local
endpoints: [{{address: 127.0.0.1, port: {port}}}]
public_paths: [/healthz]
inject:
  value_prefix: "Bearer "
  secret_file: {secret_file}
---
kind: Backend
name: keyed-api
hosts: [keyed.local]
audience: https://keyed.local
endpoints: [{{address: 127.0.0.1, port: {port}}}]
public_paths: [/healthz]
inject:
  header: x-api-key
  secret_file: {secret_file}
---
kind: Role
name: read
backend: vault-api
rules: [{{methods: [GET]}}]
---
kind: Role
name: keyed-read
backend: keyed-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: deployer-reads
roles: [read, keyed-read]
subjects: [{{project: 42}}]
---
kind: Gateway
name: ci-gateway
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [vault-api, keyed-api]
access_log: {access_log}
"""
INVENTORY = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"


@dataclass
class Stack:
    gitlab: FakeGitLab
    backend: LoopbackHTTPServer
    secret_file: Path
    listen_port: int
    envoy: EnvoyProcess

    def request(self, token: str, host: str = "vault.local", path: str = "/v1/data") -> HttpResponse:
        headers = {"Host": host, "Authorization": f"Bearer {token}"}
        return http_request(f"http://{LOOPBACK}:{self.listen_port}{path}", headers=headers)

    def token(self) -> str:
        return self.gitlab.mint(aud="https://vault.local", project_id=42, project_path="acme/deployer", namespace_id=11)

    def write_secret(self, value: str) -> None:
        """Atomic rename, as a secret manager's sidecar or a Kubernetes volume replaces it."""
        staged = self.secret_file.with_suffix(".new")
        staged.write_text(value + "\n")
        staged.replace(self.secret_file)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("inject")
    policy = root / "policy"
    policy.mkdir()
    secret_file = root / "vault-token"
    listen_port = free_port()
    backend = LoopbackHTTPServer(name="vault")
    # A backend that echoes nothing: what it received is read from its request log, not from the response.
    backend.router.add("*", "{path:path}", lambda request: Response(200, b"ok"))
    with FakeGitLab() as gitlab, backend:
        built = Stack(gitlab, backend, secret_file, listen_port, envoy=None)  # type: ignore[arg-type]
        built.write_secret("first-backend-secret")
        (policy / "inventory.yaml").write_text(INVENTORY)
        (policy / "policy.yaml").write_text(
            POLICY.format(
                issuer=gitlab.issuer,
                port=backend.port,
                secret_file=secret_file,
                listen_port=listen_port,
                access_log=root / "access.log",
            )
        )
        # Loopback only: plain-text xDS is allowed explicitly (mTLS is the default when secrets are served).
        with (
            ControlPlaneProcess(
                policy, log_path=root / "controlplane.log", extra_args=("--xds-insecure",)
            ) as controlplane,
            gateway_envoy(controlplane.xds_port, node="inject-envoy", name="inject-envoy") as envoy,
        ):
            built.envoy = envoy
            token = built.token()
            poll_until(lambda: built.request(token).status == 200, 20, message="vault.local -> 200")
            yield built
            assert "first-backend-secret" not in controlplane.log_text()
            assert "second-backend-secret" not in controlplane.log_text()


def _last_authorization(stack: Stack) -> str:
    return stack.backend.requests[-1].headers.get("authorization", "")


def test_backend_gets_its_secret_and_never_the_jobs_token(stack: Stack) -> None:
    token = stack.token()
    response = stack.request(token)
    assert response.status == 200
    received = stack.backend.requests[-1].headers
    assert received["authorization"] == "Bearer first-backend-secret"
    assert all(token not in value for value in received.values())
    assert "first-backend-secret" not in response.text
    assert all("first-backend-secret" not in value for value in response.headers.values())


def test_public_path_injects_the_backends_credential_in_place_of_the_jobs_token(stack: Stack) -> None:
    """jwt_authn is off on a public path, so it strips nothing there: the injector's overwrite replaces the
    job's Authorization with the backend's own credential."""
    token = stack.token()
    assert stack.request(token, path="/healthz").status == 200
    received = stack.backend.requests[-1].headers
    assert received["authorization"] == "Bearer first-backend-secret"
    assert all(token not in value for value in received.values())


def test_public_path_of_a_backend_injecting_another_header_drops_the_jobs_token(stack: Stack) -> None:
    token = stack.token()
    assert stack.request(token, host="keyed.local", path="/healthz").status == 200
    received = stack.backend.requests[-1].headers
    assert received["x-api-key"] == "first-backend-secret"
    assert "authorization" not in received
    assert all(token not in value for value in received.values())


def test_a_rewritten_secret_reaches_envoy_without_restart_or_listener_change(stack: Stack) -> None:
    pid = stack.envoy.pid
    listeners_before = stack.envoy.stats("listener_manager.lds.update_success")
    stack.write_secret("second-backend-secret")
    token = stack.token()
    started = time.monotonic()

    def rotated() -> bool:
        return stack.request(token).status == 200 and _last_authorization(stack) == "Bearer second-backend-secret"

    poll_until(rotated, 10, message="backend sees the new secret")
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert stack.envoy.pid == pid and stack.envoy.running
    assert stack.envoy.stats("listener_manager.lds.update_success") == listeners_before
    response = stack.request(token)
    assert "second-backend-secret" not in response.text


def test_an_emptied_secret_fails_closed_and_recovers(stack: Stack) -> None:
    """No credential to inject: Envoy refuses the request rather than forward it without one."""
    token = stack.token()
    stack.write_secret("")
    poll_until(lambda: stack.request(token).status == 401, 10, message="refused without a credential")
    served = len(stack.backend.requests)
    assert stack.request(token).status == 401 and len(stack.backend.requests) == served
    stack.write_secret("second-backend-secret")
    poll_until(lambda: stack.request(token).status == 200, 10, message="served again")
    assert _last_authorization(stack) == "Bearer second-backend-secret"
