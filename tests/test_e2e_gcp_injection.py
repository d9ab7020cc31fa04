"""A Google Cloud credential through a real Envoy to the fake Google API, carried today by the existing file-based
secret injection: the refresher writes each new token (or nothing, failing closed) where `inject.secret_file`
points, and the control plane delivers it over SDS.

Why this bridge: the `gcp:` backend block is the next session's work; this shows now that the refresher's tokens,
its rotation and its withdrawal behave end to end (a job allowed by policy reaches the API as the service account,
a denied one never reaches it, a refresh fails no request, an expired credential fails closed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest

from controlplane.cloud.gcp import CloudCredential, GcpCredentialRefresher, GcpSettings, http_fetcher
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from tests.support.backends import HttpResponse
from tests.support.clock import Clock
from tests.support.fake_gcp import FakeGcp, FakeGoogleApi, Provider, principal
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

INVENTORY = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"
SECRET = "gcp-token"
ID_SECRET = "gcp-id-token"
RUN_AUDIENCE = "https://run.example.test"
RUN_SA = "run-invoker@acme-prod.iam.gserviceaccount.com"
ISSUER = "https://controlplane.example.test"
POOL = "projects/123456789/locations/global/workloadIdentityPools/gitlab-ci"
PROVIDER = POOL + "/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"


def policy(given: PolicyInputs) -> dict[str, str]:
    def inject(secret: str) -> str:
        return f'inject:\n  value_prefix: "Bearer "\n  secret_file: {given.root / secret}'

    return {
        "inventory.yaml": INVENTORY,
        "policy.yaml": documents(
            issuer(given.issuer, extra="inventory: inventory.yaml"),
            backend("storage-api", given.ports["google"], extra=inject(SECRET)),
            backend("run-api", given.ports["cloud-run"], extra=inject(ID_SECRET)),
            role("read", "storage-api"),
            role("invoke", "run-api"),
            binding("deployer-reads", ["read", "invoke"], "{project: 42}"),
            gateway(given.listen_port, ["storage-api", "run-api"], access_log=given.access_log),
        ),
    }


def write_secret(path: Path, value: str) -> None:
    """Atomic rename, as the control plane's secret file watcher expects a writer to replace it."""
    staged = path.with_suffix(".new")
    staged.write_text(value + "\n")
    staged.replace(path)


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
    clock: Clock
    gcp: FakeGcp
    api: FakeGoogleApi
    refresher: GcpCredentialRefresher
    run_api: FakeGoogleApi
    run_refresher: GcpCredentialRefresher
    stack: GcpStack | None = None

    def refresh(self, refresher: GcpCredentialRefresher | None = None) -> bool:
        return asyncio.run((refresher or self.refresher).refresh_once())

    @property
    def served(self) -> GcpStack:
        assert self.stack is not None
        return self.stack


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("gcp-inject")
    clock = Clock(time.time())
    keys = SigningKeys(
        FileKeyStore(root / "keys.json"), rotate_every=86400, max_credential_ttl=3600, publish_lead=600, clock=clock
    )
    with FakeGcp(clock=clock) as gcp:
        gcp.add_provider(Provider(PROVIDER, ISSUER, keys.published_jwks))
        gcp.add_service_account(SA, principal(POOL, "backend:storage-api"))
        gcp.add_service_account(RUN_SA, principal(POOL, "backend:run-api"))
        api = FakeGoogleApi(gcp)
        # accepts no access token (a scope nobody asks for): only an ID token for its audience
        run_api = FakeGoogleApi(gcp, scope="https://www.googleapis.com/auth/none", id_token_audience=RUN_AUDIENCE)
        settings = GcpSettings(
            "storage-api", PROVIDER, SA, sts_url=gcp.sts_url, iam_credentials_url=gcp.iam_credentials_url
        )
        run_settings = replace(
            settings, backend="run-api", service_account=RUN_SA, scopes=(), id_token_audience=RUN_AUDIENCE
        )

        def publisher(secret: str, held: Callable[[], GcpCredentialRefresher]) -> Callable[[], None]:
            def publish() -> None:
                current = held().current()
                write_secret(root / secret, current.token if current is not None else "")

            return publish

        async def fetch(settings: GcpSettings, now: float) -> CloudCredential:
            """A session per attempt: each attempt runs in its own asyncio.run from these sync tests."""
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                return await http_fetcher(session, keys, ISSUER)(settings, now)

        refresher = GcpCredentialRefresher(settings, fetch, clock=clock, on_change=publisher(SECRET, lambda: refresher))
        run_refresher = GcpCredentialRefresher(
            run_settings, fetch, clock=clock, on_change=publisher(ID_SECRET, lambda: run_refresher)
        )
        built = World(clock, gcp, api, refresher, run_api, run_refresher)
        assert built.refresh() and built.refresh(run_refresher)
        with serve_stack(
            root,
            policy,
            kind=GcpStack,
            envoy=EnvoySpec("gcp-envoy", "gcp-envoy"),
            backends=(),
            servers={"google": api.server, "cloud-run": run_api.server},
            serve_args=("--xds-insecure",),
            ready=lambda stack: stack.fetch(stack.token()).status == 200,
        ) as stack:
            built.stack = stack
            yield built
            for token in list(gcp.access_tokens) + list(gcp.federated):
                assert token not in stack.controlplane.log_text()


def test_an_allowed_job_reaches_the_google_api_as_the_service_account(world: World) -> None:
    job = world.served.token()
    response = world.served.fetch(job)
    assert response.status == 200, response.text
    assert response.json()["service_account"] == SA
    received = world.api.requests[-1].headers
    current = world.refresher.current()
    assert current is not None and received["authorization"] == f"Bearer {current.token}"
    assert all(job not in value for value in received.values())


def test_a_denied_job_never_reaches_the_api(world: World) -> None:
    served = len(world.api.requests)
    assert world.served.fetch(world.served.token(project_id=43)).status == 403
    assert len(world.api.requests) == served


def test_an_id_token_reaches_a_cloud_run_style_service(world: World) -> None:
    job = world.served.token(host="run.local")
    response = world.served.fetch(job, host="run.local")
    assert response.status == 200, response.text
    assert response.json()["service_account"] == RUN_SA
    current = world.run_refresher.current()
    assert current is not None and current.token.count(".") == 2  # a JWT, not an opaque access token
    assert world.run_api.requests[-1].headers["authorization"] == f"Bearer {current.token}"


def test_a_refresh_fails_no_request(world: World) -> None:
    """From here on the fake clock moves past the run-api token's life too: the ID token test comes first."""
    job = world.served.token()
    old = world.refresher.current()
    assert old is not None
    world.clock.now = world.refresher.next_attempt()
    assert world.refresh()
    new = world.refresher.current()
    assert new is not None and new.token != old.token
    statuses: list[int] = []

    def switched() -> bool:
        statuses.append(world.served.fetch(job).status)
        return world.api.requests[-1].headers.get("authorization") == f"Bearer {new.token}"

    poll_until(switched, 10, message="Envoy sends the refreshed token")
    assert set(statuses) == {200}, statuses


def test_an_expired_unrefreshed_credential_fails_closed_and_recovers(world: World) -> None:
    job = world.served.token()
    held = world.refresher.current()
    assert held is not None
    world.gcp.outage.add("sts")
    world.clock.now = held.expires_at - world.refresher.policy.expiry_skew
    assert not world.refresh()
    world.refresher.announce()
    poll_until(lambda: world.served.fetch(job).status == 401, 10, message="refused without a credential")
    served = len(world.api.requests)
    assert world.served.fetch(job).status == 401 and len(world.api.requests) == served
    world.gcp.outage.clear()
    assert world.refresh()
    poll_until(lambda: world.served.fetch(job).status == 200, 10, message="served again")
