"""The smallest policy a real Envoy serves: one GitLab issuer, one backend, one binding, two gateways.

The key relay suite starts a second, cold Envoy on the second gateway; the xDS TLS suite serves the first.
"""

from __future__ import annotations

from .backends import EchoBackend
from .fake_gitlab import FakeGitLab

ONE_BACKEND_POLICY = """\
kind: Issuer
name: gitlab
type: gitlab
url: {issuer}
{issuer_extra}
---
kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
endpoints: [{{address: 127.0.0.1, port: {backend_port}}}]
---
kind: Role
name: reports-read
backend: reports-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: deployer-reads-reports
roles: [reports-read]
subjects: [{{project: 42}}]
---
kind: Gateway
name: ci-gateway
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [reports-api]
access_log: /dev/null
---
kind: Gateway
name: cold-gateway
listen: {{address: 127.0.0.1, port: {cold_port}}}
backends: [reports-api]
access_log: /dev/null
"""


def one_backend_policy(
    gitlab: FakeGitLab, backend: EchoBackend, listen_port: int, cold_port: int, extra: str = ""
) -> str:
    """One issuer, one backend behind two gateways: `listen_port` serves, `cold_port` is an Envoy started later."""
    return ONE_BACKEND_POLICY.format(
        issuer=gitlab.issuer,
        issuer_extra=extra,
        backend_port=backend.port,
        listen_port=listen_port,
        cold_port=cold_port,
    )
