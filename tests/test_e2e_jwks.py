"""The key relay end to end on the real Envoy: the control plane reads GitLab's JWKS and pushes it inline.

Envoy then needs no route to GitLab, a cold Envoy never answers 401 "Jwks remote fetch is failed", and a
key rotation reaches Envoy within seconds (Envoy itself never refetches on an unknown kid;
docs/envoy-filters.md#issuer-keys). The control
plane runs with `--jwks-refresh 1`; every wait polls with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from controlplane.model.loader import parse_policy
from controlplane.model.policy import JwksMode
from controlplane.snapshots.build import compile_model
from tests.support.backends import http_request
from tests.support.envoy import EnvoyProcess
from tests.support.gateway import gateway_envoy
from tests.support.one_backend import one_backend_policy
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.stack import EnvoySpec, Served, outside_world, serve_stack
from tests.support.static_bootstrap import as_static_bootstrap

pytestmark = pytest.mark.e2e

JWT_RELOADS = "extension_config_discovery.http_filter.envoy.filters.http.jwt_authn.config_reload"


def get(port: int, token: str | None) -> int:
    headers = {"Host": "reports.local"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http_request(f"http://{LOOPBACK}:{port}/reports/1", headers=headers).status


@dataclass
class JwksStack(Served):
    cold_port: int = 0

    def token(self, **claims: Any) -> str:
        return self.gitlab.mint(aud="https://reports.local", **{"project_id": 42, **claims})

    def get(self, token: str | None, port: int | None = None) -> int:
        return get(port or self.listen_port, token)

    def wait_status(self, token: str, expected: int, timeout: float = 15.0, port: int | None = None) -> float:
        started = time.monotonic()
        poll_until(lambda: self.get(token, port) == expected, timeout, interval=0.02, message=f"-> {expected}")
        return time.monotonic() - started

    def fetch_errors(self) -> float:
        return self.controlplane.metric("controlplane_jwks_fetches_total", issuer="gitlab", result="error")


@pytest.fixture(scope="module")
def jwks_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwksStack]:
    cold_port = free_port()
    with serve_stack(
        tmp_path_factory.mktemp("jwks"),
        partial(one_backend_policy, cold_port=cold_port),
        kind=JwksStack,
        envoy=EnvoySpec("jwks-envoy-1", "jwks-envoy"),
        serve_args=("--jwks-refresh", "1"),
        ready=lambda built: built.get(None) == 401,
    ) as built:
        built.cold_port = cold_port
        yield built


def _cluster_names(envoy: EnvoyProcess) -> set[str]:
    names = set()
    for section in envoy.config_dump()["configs"]:
        for key in ("static_clusters", "dynamic_active_clusters", "dynamic_warming_clusters"):
            names |= {c["cluster"]["name"] for c in section.get(key, [])}
    return names


def test_a_cold_envoy_accepts_tokens_with_no_route_to_the_issuer(jwks_stack: JwksStack) -> None:
    assert jwks_stack.get(jwks_stack.token()) == 200  # the very first request: no JWKS fetch by Envoy, no 401
    assert jwks_stack.get(jwks_stack.token(key=jwks_stack.gitlab.rogue, kid=jwks_stack.gitlab.signing_key.kid)) == 401
    assert jwks_stack.get(jwks_stack.token(project_id=43)) == 403
    clusters = _cluster_names(jwks_stack.envoy)
    assert "backend-reports-api" in clusters and not any(c.startswith("jwks-") for c in clusters)
    jwks_clients = {r.headers.get("user-agent", "") for r in jwks_stack.gitlab.requests if r.path.endswith("/keys")}
    assert jwks_clients and all(agent.startswith("controlplane/") for agent in jwks_clients)  # never Envoy
    status = jwks_stack.controlplane.status()["jwks"]["gitlab"]
    assert status["kids"] == [jwks_stack.gitlab.signing_key.kid] and status["last_error"] is None
    assert jwks_stack.controlplane.metric("controlplane_jwks_keys", issuer="gitlab") == 1


def test_a_rotation_reaches_envoy_within_seconds_and_a_withdrawal_too(
    jwks_stack: JwksStack, record_property: Callable[[str, object], None]
) -> None:
    old_key = jwks_stack.gitlab.signing_key
    old_token = jwks_stack.token()
    assert jwks_stack.get(old_token) == 200
    before = jwks_stack.envoy.stats()
    new_key = jwks_stack.gitlab.rotate_key(keep_old=True)  # GitLab publishes the new key beside the old one
    new_token = jwks_stack.token()
    accepted = jwks_stack.wait_status(new_token, 200, timeout=10)
    assert jwks_stack.get(old_token) == 200  # both keys are trusted during the overlap
    assert jwks_stack.get(jwks_stack.token(key=old_key)) == 200
    jwks_stack.gitlab.publish([new_key])  # the old key is withdrawn
    withdrawn = jwks_stack.wait_status(jwks_stack.token(key=old_key), 401, timeout=10)
    assert jwks_stack.get(old_token) == 401  # also a token Envoy had verified (and cached) before
    assert jwks_stack.get(new_token) == 200
    assert jwks_stack.controlplane.metric("controlplane_jwks_key_changes_total", issuer="gitlab") >= 2
    # jwt_authn comes by ECDS: the relayed keys changed its configuration twice, never the listener (no drain).
    after = jwks_stack.envoy.stats()
    assert after[JWT_RELOADS] >= before[JWT_RELOADS] + 2
    assert after["listener_manager.listener_modified"] == before["listener_manager.listener_modified"]
    assert after["listener_manager.total_filter_chains_draining"] == 0
    record_property("rotation_to_acceptance_seconds", round(accepted, 3))
    record_property("withdrawal_to_rejection_seconds", round(withdrawn, 3))
    print(f"rotation → accepted in {accepted:.3f}s; withdrawal → rejected in {withdrawn:.3f}s")
    assert accepted < 5 and withdrawn < 5


def test_an_issuer_outage_keeps_the_last_good_keys_even_for_a_cold_envoy(jwks_stack: JwksStack) -> None:
    token = jwks_stack.token()
    assert jwks_stack.get(token) == 200
    errors = jwks_stack.fetch_errors()
    jwks_stack.gitlab.fail_jwks(503)
    try:
        poll_until(lambda: jwks_stack.fetch_errors() >= errors + 2, 20, message="two failed refreshes")
        assert jwks_stack.get(token) == 200
        assert jwks_stack.get(jwks_stack.token()) == 200
        status = jwks_stack.controlplane.status()["jwks"]["gitlab"]
        assert status["last_error"] and "503" in status["last_error"]
        assert status["kids"] == [jwks_stack.gitlab.signing_key.kid]
        xds_port = jwks_stack.controlplane.xds_port
        with gateway_envoy(xds_port, group="cold-gateway", node="jwks-cold-1", name="jwks-cold-envoy"):
            # A fresh Envoy while the issuer is down: never "Jwks remote fetch is failed".
            jwks_stack.wait_status(token, 200, timeout=20, port=jwks_stack.cold_port)
    finally:
        jwks_stack.gitlab.fail_jwks(None)
    poll_until(
        lambda: jwks_stack.controlplane.status()["jwks"]["gitlab"]["last_error"] is None, 10, message="recovered"
    )


def test_remote_mode_still_has_envoy_fetch_the_keys(tmp_path: Path) -> None:
    """`jwks: remote` compiles to Envoy's own fetch through a `jwks-<issuer>` cluster; checked on a static
    bootstrap of the compiled resources, so it runs whatever the loader supports."""
    with outside_world(tmp_path, partial(one_backend_policy, cold_port=free_port()), backends=("reports",)) as world:
        policy = parse_policy({"policy.yaml": (world.policy / "policy.yaml").read_text()})
        remote = replace(policy, issuers=tuple(replace(i, jwks_mode=JwksMode.REMOTE) for i in policy.issuers))
        snapshot = compile_model(remote)["ci-gateway"]
        with EnvoyProcess(as_static_bootstrap(snapshot), name="jwks-remote-envoy") as envoy:
            token = world.gitlab.mint(aud="https://reports.local", project_id=42)
            assert get(world.listen_port, token) == 200
            assert "jwks-gitlab" in _cluster_names(envoy)
            assert any(r.headers.get("user-agent", "").startswith("Go-") for r in world.gitlab.requests)  # Envoy's


def test_remote_mode_through_serve(tmp_path: Path) -> None:
    """The same through `controlplane serve`, from a policy that says `jwks: remote`."""
    with serve_stack(
        tmp_path,
        partial(one_backend_policy, cold_port=free_port(), issuer_extra="jwks: remote"),
        kind=JwksStack,
        envoy=EnvoySpec("jwks-remote-2", "jwks-remote-serve"),
    ) as built:
        text = (built.policy / "policy.yaml").read_text()
        assert parse_policy({"policy.yaml": text}).issuers[0].jwks_mode is JwksMode.REMOTE
        token = built.gitlab.mint(aud="https://reports.local", project_id=42)
        poll_until(lambda: built.get(token) == 200, 20, message="remote JWKS token accepted")
        assert "jwks-gitlab" in _cluster_names(built.envoy)
        assert built.controlplane.status()["jwks"] == {}  # nothing relayed
