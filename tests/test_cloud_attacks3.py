"""A third outside attack on issue 16 (docs/cloud-attacks3.md): what the first two (docs/cloud-attacks.md,
docs/aws-role-attacks.md) did not try. Each test of a break failed before its fix."""

from __future__ import annotations

import pytest

from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy

ISSUER = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
GATEWAY = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [reports]\n"
GCP = (
    "gcp:\n  workload_identity_provider: projects/123456789/locations/global/workloadIdentityPools/pool-1/"
    "providers/cp-1\n  service_account: run-invoker@acme-prod.iam.gserviceaccount.com\n"
)


def _backend(hosts: str, extra: str = "") -> str:
    return (
        f"kind: Backend\nname: reports\nhosts: {hosts}\naudience: https://reports\n"
        f"endpoints: [{{address: 127.0.0.1, port: 1}}]\n{extra}{GCP}"
    )


def _parse(backend: str) -> None:
    parse_policy({"p.yaml": "---\n".join([ISSUER, GATEWAY, backend])})


@pytest.mark.parametrize("tls", ["", "tls: {sni: reports-abc123-ew.a.run.app}\n"])
@pytest.mark.parametrize("audience", ["", "  id_token_audience: https://reports-abc123-ew.a.run.app\n"])
def test_a_gcp_backend_may_not_have_a_wildcard_host(tls: str, audience: str) -> None:
    """Before: accepted. Envoy forwards the Host the job sent (a wildcard virtual host matches any name under it;
    the injector adds the Bearer token whatever the name, and the upstream TLS name, pinned or not, does not
    change the Host). Google's shared front ends (`*.run.app`, `*.appspot.com`, `*.cloudfunctions.net`) choose
    the service by that Host: a job sending `Host: mine.a.run.app` hands the service account's access token (or
    the ID token meant for the policy's service) to a service of its own, a bearer token usable anywhere until it
    expires. Unlike AWS, `tls.sni` is no way out: nothing rewrites the Host of an injected request."""
    backend = _backend("['*.a.run.app']", tls)
    if audience:
        backend = backend.replace("service_account:", audience.strip() + "\n  service_account:")
    with pytest.raises(PolicyInvalid, match="wildcard host on a gcp: backend"):
        _parse(backend)


def test_a_gcp_backend_listing_its_names_is_accepted() -> None:
    _parse(_backend("[reports-abc123-ew.a.run.app, reports.local]"))
