"""A Backend's `gcp:` block end to end: policy → serve (signs as its OIDC issuer, exchanges at the fake STS,
impersonates at the fake IAM Credentials, refreshes in memory) → SDS → a real Envoy → the fake Google API.

The fake STS trusts the JWKS serve publishes at `--issuer-url` (fetched over HTTP, as Google does). Tokens live
for 10 s here, so serve's schedule (cloud/refresh.py, docs/cloud-refresh.md) stops using one 1 s before it
expires (a tenth of its life) and refreshes it after a quarter of the 9 s left: the refresh and the fail-closed
paths run on the real clock, within seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from controlplane.runtime.gcp_backends import IAM_CREDENTIALS_URL_ENV, STS_URL_ENV
from tests.support.backends import HttpResponse
from tests.support.fake_gcp import FakeGcp, FakeGoogleApi, Provider, principal
from tests.support.job_tokens import served_jwks
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import free_port, poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

INVENTORY = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"
RUN_AUDIENCE = "https://run.example.test"
RUN_SA = "run-invoker@acme-prod.iam.gserviceaccount.com"
POOL = "projects/123456789/locations/global/workloadIdentityPools/gitlab-ci"
PROVIDER = POOL + "/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"
LIFETIME = 10  # refreshed after 2.25 s, withdrawn at 9 s
BEARER = "Bearer "


def policy(given: PolicyInputs) -> dict[str, str]:
    storage = f"gcp:\n  workload_identity_provider: {PROVIDER}\n  service_account: {SA}\n  lifetime: {LIFETIME}s"
    run = f"gcp:\n  workload_identity_provider: {PROVIDER}\n  service_account: {RUN_SA}\n"
    run += f"  id_token_audience: {RUN_AUDIENCE}"
    return {
        "inventory.yaml": INVENTORY,
        "policy.yaml": documents(
            issuer(given.issuer, extra="inventory: inventory.yaml"),
            backend("storage-api", given.ports["google"], extra=storage),
            backend("run-api", given.ports["cloud-run"], extra=run),
            role("read", "storage-api"),
            role("invoke", "run-api"),
            binding("deployer-reads", ["read", "invoke"], "{project: 42}"),
            gateway(given.listen_port, ["storage-api", "run-api"], access_log=given.access_log),
        ),
    }


@dataclass
class GcpStack(Served):
    def fetch(self, token: str, host: str = "storage.local") -> HttpResponse:
        return self.request(host, "/storage/v1/b/bucket/o", token)

    def token(self, project_id: int = 42, host: str = "storage.local") -> str:
        return self.gitlab.mint(
            aud=f"https://{host}", project_id=project_id, project_path="acme/deployer", namespace_id=11
        )


@dataclass
class World:
    gcp: FakeGcp
    api: FakeGoogleApi
    run_api: FakeGoogleApi
    stack: GcpStack

    def sent(self, api: FakeGoogleApi | None = None) -> str:
        """The token the API last received (without the Bearer prefix)."""
        value = (api or self.api).requests[-1].headers["authorization"]
        assert value.startswith(BEARER)
        return value.removeprefix(BEARER)

    def sts_calls(self) -> int:
        return sum(1 for r in self.gcp.requests if r.path == "/v1/token")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("gcp-inject")
    exchange_port = free_port()
    issuer_url = f"http://127.0.0.1:{exchange_port}"

    def published_jwks() -> str:
        return served_jwks(issuer_url)

    with FakeGcp() as gcp:
        gcp.add_provider(Provider(PROVIDER, issuer_url, published_jwks))
        gcp.add_service_account(SA, principal(POOL, "backend:storage-api"))
        gcp.add_service_account(RUN_SA, principal(POOL, "backend:run-api"))
        api = FakeGoogleApi(gcp)
        # accepts no access token (a scope nobody asks for): only an ID token for its audience
        run_api = FakeGoogleApi(gcp, scope="https://www.googleapis.com/auth/none", id_token_audience=RUN_AUDIENCE)
        with serve_stack(
            root,
            policy,
            kind=GcpStack,
            envoy=EnvoySpec("gcp-envoy", "gcp-envoy", flush_logs=True),
            backends=(),
            servers={"google": api.server, "cloud-run": run_api.server},
            serve_args=(
                "--xds-insecure",
                "--exchange-address",
                f"127.0.0.1:{exchange_port}",
                "--issuer-url",
                issuer_url,
            ),
            env={STS_URL_ENV: gcp.sts_url, IAM_CREDENTIALS_URL_ENV: gcp.iam_credentials_url},
            ready=lambda stack: stack.fetch(stack.token()).status == 200,
            ready_timeout=30,
        ) as stack:
            yield World(gcp, api, run_api, stack)
            log = stack.controlplane.log_text()
            for token in list(gcp.access_tokens) + list(gcp.federated):
                assert token not in log


def test_an_allowed_job_reaches_the_google_api_as_the_service_account(world: World) -> None:
    job = world.stack.token()
    response = world.stack.fetch(job)
    assert response.status == 200, response.text
    assert response.json()["service_account"] == SA
    received = world.api.requests[-1].headers
    issued = world.gcp.access_tokens[world.sent()]  # a token the fake IAM Credentials issued, to the SA
    assert issued.service_account == SA and issued.scopes == ("https://www.googleapis.com/auth/cloud-platform",)
    assert all(job not in value for value in received.values())


def test_a_denied_job_never_reaches_the_api(world: World) -> None:
    served = len(world.api.requests)
    assert world.stack.fetch(world.stack.token(project_id=43)).status == 403
    assert len(world.api.requests) == served


def test_the_audit_trail_records_the_service_account_a_request_was_sent_as(world: World) -> None:
    """`controlplane audit` on serve's trail: the allowed request names the service account Envoy injected a token
    of; a denied one (never sent upstream) names none."""
    stack = world.stack
    claims: dict[str, Any] = {"aud": "https://storage.local", "project_path": "acme/deployer", "namespace_id": 11}
    assert stack.fetch(stack.gitlab.mint(project_id=42, job_id=7101, **claims)).status == 200
    assert stack.fetch(stack.gitlab.mint(project_id=43, job_id=7102, **claims)).status == 403
    database = str(stack.controlplane.state_dir / "audit.sqlite3")

    def rows(job: str) -> list[dict[str, Any]]:
        command = [sys.executable, "-m", "controlplane", "audit", "--job", job, "--json", "--db", database]
        return list(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))

    (allowed,) = poll_until(lambda: rows("7101"), 10, message="the allowed request in the trail")
    (denied,) = poll_until(lambda: rows("7102"), 10, message="the denied request in the trail")
    assert (allowed["backend"], allowed["decision"], allowed["cloud_identity"]) == ("storage-api", "allowed", SA)
    assert (denied["decision"], denied["cloud_identity"]) == ("denied", None)


def test_an_id_token_reaches_a_cloud_run_style_service(world: World) -> None:
    job = world.stack.token(host="run.local")
    poll_until(lambda: world.stack.fetch(job, host="run.local").status == 200, 10, message="ID token served")
    response = world.stack.fetch(job, host="run.local")
    assert response.json()["service_account"] == RUN_SA
    assert world.sent(world.run_api).count(".") == 2  # a JWT, not an opaque access token


def test_a_refresh_fails_no_request(world: World) -> None:
    job = world.stack.token()
    assert world.stack.fetch(job).status == 200
    sent = [world.sent()]
    statuses: list[int] = []

    def refreshed_twice() -> bool:
        """Requests back to back through two switches of token (SDS pushes while the old one is still valid)."""
        statuses.append(world.stack.fetch(job).status)
        if world.sent() != sent[-1]:
            sent.append(world.sent())
        return len(sent) == 3

    poll_until(refreshed_twice, 2 * LIFETIME, interval=0.02, message="Envoy sends two refreshed tokens in turn")
    assert set(statuses) == {200}, statuses
    assert world.gcp.access_tokens[world.sent()].service_account == SA


def test_sts_down_keeps_the_last_token_until_expiry_then_fails_closed_and_recovers(world: World) -> None:
    job = world.stack.token()
    assert world.stack.fetch(job).status == 200
    held = world.sent()
    expires = world.gcp.access_tokens[held].expires_at
    world.gcp.outage.add("sts")
    try:
        sts_before = world.sts_calls()
        served_after_a_failed_refresh = False
        statuses: list[int] = []

        def refused() -> bool:
            nonlocal served_after_a_failed_refresh
            status = world.stack.fetch(job).status
            statuses.append(status)
            if status == 200:
                assert world.sent() == held  # the last token, nothing else
                served_after_a_failed_refresh |= world.sts_calls() > sts_before
            return status == 401

        poll_until(refused, LIFETIME, interval=0.2, message="refused once the last token is about to expire")
        assert served_after_a_failed_refresh, "the last token was used after the refresh failed"
        assert time.time() < expires, "withdrawn before it expired, so none dies in flight"
        assert set(statuses) <= {200, 401}, statuses
        forwarded = len(world.api.requests)
        assert world.stack.fetch(job).status == 401
        assert len(world.api.requests) == forwarded  # failed closed: never forwarded without a credential
    finally:
        world.gcp.outage.clear()
    # retries back off (1, 2, 4 … 60 s, drawn between half and all): the next one after the outage brings a new
    # token; a 9 s outage leaves at most five failures behind, so it comes within 16 s
    poll_until(lambda: world.stack.fetch(job).status == 200, 40, interval=0.2, message="served again")
    assert world.sent() != held
