"""A finished job and the cloud, through serve, a real Envoy 1.40 and the fake Google (docs/cloud-attacks3.md).

The deny list must act before the credential is injected: once GitLab's Job Hook says the job is over, neither
its raw ID token nor the credential it got from the token exchange may carry the service account's token to
Google. The test counts what the fake Google API received, not only the status the job saw."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

import pytest

from controlplane.runtime.gcp_backends import IAM_CREDENTIALS_URL_ENV, STS_URL_ENV
from tests.support.backends import http_request
from tests.support.fake_gcp import FakeGcp, FakeGoogleApi, Provider, principal
from tests.support.job_tokens import served_jwks
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import free_port, poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_exchange_stack

pytestmark = pytest.mark.e2e

INVENTORY = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"
POOL = "projects/123456789/locations/global/workloadIdentityPools/gitlab-ci"
PROVIDER = POOL + "/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"
HOST = "storage.local"


def policy(given: PolicyInputs) -> dict[str, str]:
    gcp = f"gcp:\n  workload_identity_provider: {PROVIDER}\n  service_account: {SA}"
    return {
        "inventory.yaml": INVENTORY,
        "policy.yaml": documents(
            issuer(given.issuer, extra="inventory: inventory.yaml"),
            backend("storage-api", given.ports["google"], extra=gcp),
            role("read", "storage-api"),
            binding("deployer-reads", ["read"], "{project: 42}"),
            gateway(given.listen_port, ["storage-api"], access_log=given.access_log),
        ),
    }


@dataclass
class GcpExchangeStack(Served):
    exchange_host = HOST  # the exchange through the gateway, as a job calls it


@dataclass
class World:
    gcp: FakeGcp
    api: FakeGoogleApi
    stack: GcpExchangeStack

    def get(self, token: str) -> int:
        return self.stack.request(HOST, "/storage/v1/b/bucket/o", token).status


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("gcp-revoked")
    exchange_port = free_port()
    issuer_url = f"http://127.0.0.1:{exchange_port}"

    def published_jwks() -> str:
        return served_jwks(issuer_url)

    with FakeGcp() as gcp:
        gcp.add_provider(Provider(PROVIDER, issuer_url, published_jwks))
        gcp.add_service_account(SA, principal(POOL, "backend:storage-api"))
        api = FakeGoogleApi(gcp)
        with serve_exchange_stack(
            root,
            policy,
            kind=GcpExchangeStack,
            envoy=EnvoySpec("gcp-revoked-envoy", "gcp-revoked-envoy", flush_logs=True),
            backends=(),
            servers={"google": api.server},
            serve_args=(
                "--xds-insecure",
                "--exchange-address",
                f"127.0.0.1:{exchange_port}",
                "--issuer-url",
                issuer_url,
            ),
            env={STS_URL_ENV: gcp.sts_url, IAM_CREDENTIALS_URL_ENV: gcp.iam_credentials_url},
            ready=lambda s: (
                s.request(HOST, "/storage/v1/b/bucket/o", s.subject(1, aud=f"https://{HOST}")).status == 200
            ),
            ready_timeout=30,
        ) as stack:
            yield World(gcp, api, stack)


def test_a_finished_jobs_tokens_carry_no_google_token_to_google(world: World) -> None:
    stack = world.stack
    raw = stack.subject(8101, aud=f"https://{HOST}")
    answer = stack.exchange(raw, audience="storage-api")
    assert answer.status == 200, answer.text
    exchanged = str(answer.json()["access_token"])
    assert world.get(raw) == 200 and world.get(exchanged) == 200
    stack.job_finished(8101)
    poll_until(lambda: world.get(raw) == 403 and world.get(exchanged) == 403, 5, message="the finished job denied")
    reached = len(world.api.requests)
    assert [world.get(raw), world.get(exchanged)] * 10 == [403, 403] * 10
    assert len(world.api.requests) == reached  # nothing more reached Google, token or not
    assert stack.exchange(stack.subject(8101, aud=f"https://{HOST}"), audience="storage-api").status == 400
    assert world.get(stack.subject(8102, aud=f"https://{HOST}")) == 200  # another job of the same project still is


def test_no_token_of_one_kind_passes_for_the_other(world: World) -> None:
    """The relying-party token serve signs for Google (iss = the issuer URL, sub backend:storage-api) and the
    credential the exchange hands a job (iss = urn:controlplane:credentials) are signed by the same keys, published
    at the same JWKS. Taken from where each kind goes (Google's STS; the job), neither passes for the other."""
    stack = world.stack
    sent = next(r for r in reversed(world.gcp.requests) if r.path == "/v1/token")
    form = {name: values[0] for name, values in parse_qs(sent.body.decode()).items()}
    relying_party = form["subject_token"]
    assert world.get(relying_party) == 401  # at the gateway: no provider takes its issuer
    assert stack.exchange(relying_party, audience="storage-api").status == 400  # nor the exchange
    job = stack.exchange(stack.subject(8201, aud=f"https://{HOST}"), audience="storage-api")
    assert job.status == 200, job.text
    replayed = urlencode(form | {"subject_token": str(job.json()["access_token"])})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = http_request(world.gcp.base_url + sent.path, method="POST", headers=headers, body=replayed.encode())
    assert answer.status == 400 and "issuer" in answer.text, answer.text  # Google's STS: not its provider's issuer
    assert http_request(world.gcp.base_url + sent.path, method="POST", headers=headers, body=sent.body).status == 200
