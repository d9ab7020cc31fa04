"""The token exchange's policy over the fake GitLab: two backends, four bindings with their credential TTLs.

Shared by the exchange's unit tests and its job-state tests, which must agree on who may get what.
"""

from __future__ import annotations

from dataclasses import replace

from controlplane.credentials.exchange import ExchangePolicy
from controlplane.resolved.index import Resolution
from tests.compiled import policy_of

from .fake_gitlab import FakeGitLab
from .policy_parts import ACME_INVENTORY, backend, binding, documents, issuer, role

BACKENDS = documents(
    backend("reports-api", 8081),
    backend("deploy-api", 8082),
    role("reports-read", "reports-api", ["GET"]),
    role("reports-write", "reports-api", ["POST"]),
    role("deploy-trigger", "deploy-api", ["POST"]),
)
BINDINGS = documents(
    binding("readers", ["reports-read"], "{project: acme/platform/deployer, ref_protected: true}"),
    binding("group-readers", ["reports-read"], "{group: acme/platform, ref: main}"),
    binding("writers", ["reports-write"], '{project: acme/platform/deployer, ref: "release/*"}'),
    binding("deployers-shadow", ["deploy-trigger"], "{project: acme/platform/deployer}", extra="mode: shadow"),
)
TTLS = {"readers": 600, "group-readers": 1200, "writers": 300, "deployers-shadow": 900}


def exchange_policy(fake: FakeGitLab) -> ExchangePolicy:
    issuer_yaml = issuer(fake.issuer, extra="inventory: inventory.yaml")
    policy = policy_of(issuer=issuer_yaml, inventory=ACME_INVENTORY, backends=BACKENDS, bindings=BINDINGS)
    bindings = tuple(replace(b, credential_ttl_seconds=TTLS[b.name]) for b in policy.bindings)
    policy = replace(policy, bindings=bindings)
    return ExchangePolicy.build(policy, Resolution().update(policy))
