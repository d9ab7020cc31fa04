"""The smallest policy a real Envoy serves: one GitLab issuer, one backend, one binding, two gateways.

The key relay suite starts a second, cold Envoy on the second gateway; the xDS TLS suite serves the first.
"""

from __future__ import annotations

from .policy_parts import backend, binding, documents, gateway, issuer, role
from .stack import PolicyInputs


def one_backend_policy(given: PolicyInputs, *, cold_port: int, issuer_extra: str = "") -> str:
    """One issuer, one backend behind two gateways: the stack's listener serves, `cold_port` is an Envoy started
    later. A `serve_stack` policy once `cold_port` is bound (functools.partial)."""
    return documents(
        issuer(given.issuer, extra=issuer_extra),
        backend("reports-api", given.ports["reports"]),
        role("reports-read", "reports-api"),
        binding("deployer-reads-reports", ["reports-read"], "{project: 42}"),
        gateway(given.listen_port, ["reports-api"]),
        gateway(cold_port, ["reports-api"], name="cold-gateway"),
    )
