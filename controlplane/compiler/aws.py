"""AWS backends (`aws:` in policy): fail closed until their signing credentials are delivered.

Envoy's `aws_request_signing` filter forwards a request unsigned, with the caller's own `Authorization`, when it
has no credentials (docs/envoy-aws-signing.md, fact 8). So an AWS backend's routes never reach its cluster while
the compiler has no valid credential to sign with: they answer 503 themselves, the job's token never leaves the
gateway and AWS never sees an unsigned request. Signing with the role's credentials (an ECDS filter per role with
`inline_credential`, supplied at snapshot time from runtime state) replaces this route action once built; this
module is where that decision stays in one place.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc

from controlplane.model.policy import Backend

UNAVAILABLE_STATUS = 503
UNAVAILABLE_BODY = "no valid AWS credential for this backend's role: refused rather than sent unsigned\n"


def fail_closed(backend: Backend, route: rc.Route) -> rc.Route:
    """`route` unchanged for any other backend; for an AWS backend, the same match answering 503 directly."""
    if backend.aws is None:
        return route
    closed = rc.Route()
    closed.CopyFrom(route)
    closed.ClearField("route")
    closed.direct_response.CopyFrom(
        rc.DirectResponseAction(status=UNAVAILABLE_STATUS, body={"inline_string": UNAVAILABLE_BODY})
    )
    return closed
