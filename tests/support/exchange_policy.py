"""The token exchange's policy over the fake GitLab: two backends, four bindings with their credential TTLs.

Shared by the exchange's unit tests and its job-state tests, which must agree on who may get what.
"""

from __future__ import annotations

from dataclasses import replace

from controlplane.credentials.exchange import ExchangePolicy
from controlplane.resolved.index import Resolution
from tests.compiled import policy_of

from .fake_gitlab import FakeGitLab

INVENTORY = """
groups:
  - {id: 10, path: acme}
  - {id: 11, path: acme/platform, parent_id: 10}
projects:
  - {id: 42, path: acme/platform/deployer, namespace_id: 11}
  - {id: 43, path: acme/platform/other, namespace_id: 11}
"""
BACKENDS = """
kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
endpoints: [{address: 127.0.0.1, port: 8081}]
---
kind: Backend
name: deploy-api
hosts: [deploy.local]
audience: https://deploy.local
endpoints: [{address: 127.0.0.1, port: 8082}]
---
kind: Role
name: reports-read
backend: reports-api
rules: [{methods: [GET]}]
---
kind: Role
name: reports-write
backend: reports-api
rules: [{methods: [POST]}]
---
kind: Role
name: deploy-trigger
backend: deploy-api
rules: [{methods: [POST]}]
"""
BINDINGS = """
kind: Binding
name: readers
roles: [reports-read]
subjects:
  - {project: acme/platform/deployer, ref_protected: true}
---
kind: Binding
name: group-readers
roles: [reports-read]
subjects:
  - {group: acme/platform, ref: main}
---
kind: Binding
name: writers
roles: [reports-write]
subjects:
  - {project: acme/platform/deployer, ref: "release/*"}
---
kind: Binding
name: deployers-shadow
mode: shadow
roles: [deploy-trigger]
subjects:
  - {project: acme/platform/deployer}
"""
TTLS = {"readers": 600, "group-readers": 1200, "writers": 300, "deployers-shadow": 900}


def exchange_policy(fake: FakeGitLab) -> ExchangePolicy:
    issuer = f"kind: Issuer\nname: gitlab\ntype: gitlab\nurl: {fake.issuer}\ninventory: inventory.yaml\n"
    policy = policy_of(issuer=issuer, inventory=INVENTORY, backends=BACKENDS, bindings=BINDINGS)
    bindings = tuple(replace(b, credential_ttl_seconds=TTLS[b.name]) for b in policy.bindings)
    policy = replace(policy, bindings=bindings)
    return ExchangePolicy.build(policy, Resolution().update(policy))
