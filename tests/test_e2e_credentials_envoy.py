"""Exchanged credentials and revocations on the real Envoy, without the exchange service or the control plane.

The compiler's output alone decides these answers, so this harness is static: the test generates its own keys
(an ES256 key for the control plane's credentials, an RS256 key relayed for the GitLab issuer), signs tokens
itself with pyjwt, compiles, and starts two static Envoys: one with no revoked job, one with job 1001 revoked
(a revocation is only a recompile, so two bootstraps stand for the update xDS would push). The exchange route
points at a closed port: it must reach the upstream (503) instead of stopping at jwt_authn or RBAC.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from controlplane.model.credentials import CREDENTIAL_ISSUER, EXCHANGE_PATH, CredentialInputs, revocation_buckets
from controlplane.model.loader import parse_policy
from controlplane.snapshots.build import compile_model
from tests.support.backends import EchoBackend, HttpResponse, http_request
from tests.support.envoy import EnvoyProcess
from tests.support.ports import LOOPBACK, free_port
from tests.support.static_bootstrap import as_static_bootstrap

pytestmark = pytest.mark.e2e

GITLAB = "https://gitlab.example.com"
REVOKED_JOB = "1001"
BACKENDS = """\
kind: Backend
name: reports
hosts: [reports.local]
endpoints: [{{address: 127.0.0.1, port: {reports}}}]
public_paths: [/healthz]
---
kind: Backend
name: deploy
hosts: [deploy.local]
endpoints: [{{address: 127.0.0.1, port: {deploy}}}]
---
kind: Backend
name: vault
hosts: [vault.local]
endpoints: [{{address: 127.0.0.1, port: {vault}}}]
credentials: exchanged
---
kind: Role
name: reports-read
backend: reports
rules: [{{methods: [GET]}}]
---
kind: Role
name: deploy-trigger
backend: deploy
rules: [{{methods: [GET, POST]}}]
---
kind: Role
name: vault-read
backend: vault
rules: [{{methods: [GET]}}]
"""
POLICY = {
    "issuer.yaml": f"kind: Issuer\nname: gitlab\ntype: gitlab\nurl: {GITLAB}\ninventory: inventory.yaml\n",
    "inventory.yaml": "groups: [{id: 10, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 10}]\n",
    "bindings.yaml": """\
kind: Binding
name: deployer
roles: [reports-read, vault-read]
subjects: [{project: acme/deployer, ref_protected: true}]
""",
    "gateway.yaml": "kind: Gateway\nname: gw\nlisten: {port: 10000}\nbackends: [reports, deploy, vault]\n",
}


@dataclass
class Keys:
    credentials: ec.EllipticCurvePrivateKey
    gitlab: rsa.RSAPrivateKey

    def credential(self, aud: str, roles: list[str], job_id: str = "2002", ttl: int = 300) -> str:
        """Shaped like the exchange's output: job identity, roles, audience, jti and the actor."""
        now = int(time.time())
        claims = {
            "iss": CREDENTIAL_ISSUER,
            "sub": "project_path:acme/deployer:ref_type:branch:ref:main",
            "aud": aud,
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
            "job_id": job_id,
            "pipeline_id": "900",
            "project_id": "42",
            "ref": "main",
            "roles": roles,
            "act": {"sub": "project_path:acme/deployer:ref_type:branch:ref:main"},
        }
        return jwt.encode(claims, self.credentials, algorithm="ES256", headers={"kid": "cp-1"})

    def id_token(self, aud: str, job_id: str = "2002") -> str:
        """A raw GitLab CI ID token (claims as strings, as GitLab sends them)."""
        now = int(time.time())
        claims = {
            "iss": GITLAB,
            "aud": aud,
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + 300,
            "sub": "project_path:acme/deployer:ref_type:branch:ref:main",
            "project_id": "42",
            "project_path": "acme/deployer",
            "namespace_id": "10",
            "namespace_path": "acme",
            "job_id": job_id,
            "pipeline_id": "900",
            "pipeline_source": "push",
            "ref": "main",
            "ref_type": "branch",
            "ref_protected": "true",
        }
        return jwt.encode(claims, self.gitlab, algorithm="RS256", headers={"kid": "gl-1"})


@dataclass
class Gateway:
    envoy: EnvoyProcess
    port: int

    def get(self, host: str, token: str | None, path: str = "/x", method: str = "GET") -> HttpResponse:
        headers = {"Host": host, **({"Authorization": f"Bearer {token}"} if token else {})}
        return http_request(f"http://{LOOPBACK}:{self.port}{path}", method=method, headers=headers)


def _jwks(public: dict[str, Any], kid: str, alg: str) -> str:
    return json.dumps({"keys": [{**public, "kid": kid, "alg": alg, "use": "sig"}]}, sort_keys=True)


def _static_envoy(files: dict[str, str], keys: Keys, revoked: tuple[str, ...], name: str) -> Gateway:
    credentials = CredentialInputs(
        jwks=_jwks(ECAlgorithm.to_jwk(keys.credentials.public_key(), as_dict=True), "cp-1", "ES256"),
        exchange_address=(LOOPBACK, free_port()),  # nothing listens there
        revoked=revocation_buckets(revoked),
    )
    relayed = {"gitlab": _jwks(RSAAlgorithm.to_jwk(keys.gitlab.public_key(), as_dict=True), "gl-1", "RS256")}
    snapshot = compile_model(parse_policy(files), keys=relayed, credentials=credentials)["gw"]
    bootstrap = as_static_bootstrap(snapshot)
    port = free_port()
    for listener in bootstrap["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address=LOOPBACK, port_value=port)
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        # Only the file log: the gRPC access log rides the xDS cluster, which a static bootstrap does not have.
        manager["access_log"] = [log for log in manager.get("access_log", []) if "path" in log["typed_config"]]
    return Gateway(EnvoyProcess(bootstrap, name=name), port)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Keys, Gateway, Gateway]]:
    keys = Keys(ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with EchoBackend("reports") as reports, EchoBackend("deploy") as deploy, EchoBackend("vault") as vault:
        files = {**POLICY, "backends.yaml": BACKENDS.format(reports=reports.port, deploy=deploy.port, vault=vault.port)}
        live = _static_envoy(files, keys, (), "credentials-envoy")
        revoked = _static_envoy(files, keys, (REVOKED_JOB,), "revocations-envoy")
        with live.envoy, revoked.envoy:
            yield keys, live, revoked


def test_credential_with_the_role_and_audience_reaches_the_backend(gateways: tuple[Keys, Gateway, Gateway]) -> None:
    keys, live, _ = gateways
    response = live.get("reports.local", keys.credential("https://reports.local", ["reports-read"]))
    assert response.status == 200, response.text
    seen = response.json()["headers"]
    assert "authorization" not in seen and seen["x-ci-job-id"] == "2002" and seen["x-ci-project-id"] == "42"


def test_credential_without_a_role_for_the_backend_is_denied(gateways: tuple[Keys, Gateway, Gateway]) -> None:
    keys, live, _ = gateways
    response = live.get("deploy.local", keys.credential("https://deploy.local", ["reports-read"]))
    assert (response.status, response.text) == (403, "RBAC: access denied")


def test_credential_for_another_audience_is_denied(gateways: tuple[Keys, Gateway, Gateway]) -> None:
    keys, live, _ = gateways
    response = live.get("deploy.local", keys.credential("https://reports.local", ["deploy-trigger"]))
    assert (response.status, response.text) == (403, "Audiences in Jwt are not allowed")


def test_expired_credential_is_refused(gateways: tuple[Keys, Gateway, Gateway]) -> None:
    keys, live, _ = gateways
    response = live.get("reports.local", keys.credential("https://reports.local", ["reports-read"], ttl=-120))
    assert (response.status, response.text) == (401, "Jwt is expired")


def test_exchanged_only_backend_refuses_raw_id_tokens(gateways: tuple[Keys, Gateway, Gateway]) -> None:
    keys, live, _ = gateways
    assert live.get("reports.local", keys.id_token("https://reports.local")).status == 200  # the token is good
    raw = live.get("vault.local", keys.id_token("https://vault.local"))  # the binding grants vault-read, too
    assert (raw.status, raw.text) == (401, "Jwt issuer is not configured")  # not among this host's providers
    exchanged = live.get("vault.local", keys.credential("https://vault.local", ["vault-read"]))
    assert exchanged.status == 200, exchanged.text


def test_revoked_job_is_denied_with_its_credential_and_its_id_token(gateways: tuple[Keys, Gateway, Gateway]) -> None:
    keys, live, revoked = gateways
    credential = keys.credential("https://reports.local", ["reports-read"], job_id=REVOKED_JOB)
    id_token = keys.id_token("https://reports.local", job_id=REVOKED_JOB)
    assert live.get("reports.local", credential).status == 200
    assert live.get("reports.local", id_token).status == 200
    for token in (credential, id_token):
        response = revoked.get("reports.local", token)
        assert (response.status, response.text) == (403, "RBAC: access denied")
    other_job = keys.credential("https://reports.local", ["reports-read"], job_id="2003")
    assert revoked.get("reports.local", other_job).status == 200


def test_public_paths_and_the_exchange_route_need_no_token(gateways: tuple[Keys, Gateway, Gateway]) -> None:
    keys, live, revoked = gateways
    for gateway in (live, revoked):
        assert gateway.get("reports.local", None, path="/healthz").status == 200
        revoked_token = keys.id_token("https://reports.local", job_id=REVOKED_JOB)
        assert gateway.get("reports.local", revoked_token, path="/healthz").status == 200
        for host in ("reports.local", "vault.local"):
            # Past jwt_authn and both RBAC filters, to an upstream that is not listening.
            exchange = gateway.get(host, None, path=EXCHANGE_PATH, method="POST")
            assert exchange.status == 503, exchange.text
