"""Upstream credential injection on the real Envoy: the backend gets its own secret (over SDS), never the
job's token; a rewritten secret file reaches Envoy without a restart or a listener change; the job never sees
the secret."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.backends import HttpResponse, LoopbackHTTPServer, Response
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

INVENTORY = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"
SECRET = "vault-token"  # the file, in the stack's root, that the secret manager keeps current


def policy(given: PolicyInputs) -> dict[str, str]:
    """Two backends on one server, each injecting the same secret its own way (a bearer, an API key header)."""
    secret_file = given.root / SECRET
    port = given.ports["vault"]
    public, secret = "public_paths: [/healthz]\n", f"  secret_file: {secret_file}"
    return {
        "inventory.yaml": INVENTORY,
        "policy.yaml": documents(
            issuer(given.issuer, extra="inventory: inventory.yaml"),
            backend(
                "vault-api", port, extra=f'{public}inject:\n  value_prefix: "Bearer "\n  secret_file: {secret_file}'
            ),
            backend("keyed-api", port, extra=f"{public}inject:\n  header: x-api-key\n{secret}"),
            role("read", "vault-api"),
            role("keyed-read", "keyed-api"),
            binding("deployer-reads", ["read", "keyed-read"], "{project: 42}"),
            gateway(given.listen_port, ["vault-api", "keyed-api"], access_log=given.access_log),
        ),
    }


@dataclass
class InjectStack(Served):
    @property
    def backend(self) -> LoopbackHTTPServer:
        return self.servers["vault"]

    def fetch(self, token: str, host: str = "vault.local", path: str = "/v1/data") -> HttpResponse:
        return self.request(host, path, token)

    def token(self) -> str:
        return self.gitlab.mint(aud="https://vault.local", project_id=42, project_path="acme/deployer", namespace_id=11)

    def write_secret(self, value: str) -> None:
        write_secret(self.root / SECRET, value)


def write_secret(path: Path, value: str) -> None:
    """Atomic rename, as a secret manager's sidecar or a Kubernetes volume replaces it."""
    staged = path.with_suffix(".new")
    staged.write_text(value + "\n")
    staged.replace(path)


@pytest.fixture(scope="module")
def inject_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InjectStack]:
    root = tmp_path_factory.mktemp("inject")
    write_secret(root / SECRET, "first-backend-secret")
    vault = LoopbackHTTPServer(name="vault")
    # A backend that echoes nothing: what it received is read from its request log, not from the response.
    vault.router.add("*", "{path:path}", lambda request: Response(200, b"ok"))
    with serve_stack(
        root,
        policy,
        kind=InjectStack,
        envoy=EnvoySpec("inject-envoy", "inject-envoy"),
        backends=(),
        servers={"vault": vault},
        # Loopback only: plain-text xDS is allowed explicitly (mTLS is the default when secrets are served).
        serve_args=("--xds-insecure",),
        ready=lambda built: built.fetch(built.token()).status == 200,
    ) as built:
        yield built
        assert "first-backend-secret" not in built.controlplane.log_text()
        assert "second-backend-secret" not in built.controlplane.log_text()


def _last_authorization(inject_stack: InjectStack) -> str:
    return inject_stack.backend.requests[-1].headers.get("authorization", "")


def test_backend_gets_its_secret_and_never_the_jobs_token(inject_stack: InjectStack) -> None:
    token = inject_stack.token()
    response = inject_stack.fetch(token)
    assert response.status == 200
    received = inject_stack.backend.requests[-1].headers
    assert received["authorization"] == "Bearer first-backend-secret"
    assert all(token not in value for value in received.values())
    assert "first-backend-secret" not in response.text
    assert all("first-backend-secret" not in value for value in response.headers.values())


def test_public_path_injects_the_backends_credential_in_place_of_the_jobs_token(inject_stack: InjectStack) -> None:
    """jwt_authn is off on a public path, so it strips nothing there: the injector's overwrite replaces the
    job's Authorization with the backend's own credential."""
    token = inject_stack.token()
    assert inject_stack.fetch(token, path="/healthz").status == 200
    received = inject_stack.backend.requests[-1].headers
    assert received["authorization"] == "Bearer first-backend-secret"
    assert all(token not in value for value in received.values())


def test_public_path_of_a_backend_injecting_another_header_drops_the_jobs_token(inject_stack: InjectStack) -> None:
    token = inject_stack.token()
    assert inject_stack.fetch(token, host="keyed.local", path="/healthz").status == 200
    received = inject_stack.backend.requests[-1].headers
    assert received["x-api-key"] == "first-backend-secret"
    assert "authorization" not in received
    assert all(token not in value for value in received.values())


def test_a_rewritten_secret_reaches_envoy_without_restart_or_listener_change(inject_stack: InjectStack) -> None:
    pid = inject_stack.envoy.pid
    listeners_before = inject_stack.envoy.stats("listener_manager.lds.update_success")
    inject_stack.write_secret("second-backend-secret")
    token = inject_stack.token()
    started = time.monotonic()

    def rotated() -> bool:
        return (
            inject_stack.fetch(token).status == 200
            and _last_authorization(inject_stack) == "Bearer second-backend-secret"
        )

    poll_until(rotated, 10, message="backend sees the new secret")
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert inject_stack.envoy.pid == pid and inject_stack.envoy.running
    assert inject_stack.envoy.stats("listener_manager.lds.update_success") == listeners_before
    response = inject_stack.fetch(token)
    assert "second-backend-secret" not in response.text


def test_an_emptied_secret_fails_closed_and_recovers(inject_stack: InjectStack) -> None:
    """No credential to inject: Envoy refuses the request rather than forward it without one."""
    token = inject_stack.token()
    inject_stack.write_secret("")
    poll_until(lambda: inject_stack.fetch(token).status == 401, 10, message="refused without a credential")
    served = len(inject_stack.backend.requests)
    assert inject_stack.fetch(token).status == 401 and len(inject_stack.backend.requests) == served
    inject_stack.write_secret("second-backend-secret")
    poll_until(lambda: inject_stack.fetch(token).status == 200, 10, message="served again")
    assert _last_authorization(inject_stack) == "Bearer second-backend-secret"
