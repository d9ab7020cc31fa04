"""A third outside attack on issue 16 (docs/cloud-attacks3.md): what the first two (docs/cloud-attacks.md,
docs/aws-role-attacks.md) did not try. Each test of a break failed before its fix."""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from controlplane.audit.als import _identity_key, _role_route_key
from controlplane.compiler.aws import role_route_name, signing_filter
from controlplane.compiler.compile import compile_policy
from controlplane.compiler.names import RBAC_FILTER, inject_filter
from controlplane.compiler.revocations import bucket_names
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.snapshots.snapshot import LISTENER

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


def test_the_deny_list_and_rbac_run_before_every_signing_and_injection_filter() -> None:
    """A finished job must reach no cloud: Envoy runs the HCM's filters in order, so the deny list's filters (and
    the RBAC) must all come before AWS signing and Google token injection (observed end to end for Google:
    tests/test_e2e_cloud_attacks3.py). Fails if a cloud filter is ever placed ahead of them."""
    arn = "arn:aws:iam::123456789012:role/r"
    s3 = (
        "kind: Backend\nname: s3\nhosts: [s3.local]\nendpoints: [{address: 127.0.0.1, port: 1}]\n"
        f"aws: {{service: s3, region: eu-west-1, role_arn: '{arn}'}}\n"
    )
    gcs = _backend("[reports.local]").replace("audience: https://reports\n", "")
    gateway = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [s3, reports]\n"
    policy = parse_policy({"p.yaml": "---\n".join([ISSUER, gateway, s3, gcs])})
    compiled = compile_policy(policy, keys={"gitlab": '{"keys": []}'})
    ((_, raw),) = compiled["gw"].resources[LISTENER]
    (chain,) = listener_pb2.Listener.FromString(raw).filter_chains
    manager = hcm.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(manager)
    names = [f.name for f in manager.http_filters]
    guards = [i for i, n in enumerate(names) if n in bucket_names() or n == RBAC_FILTER]
    cloud = [i for i, n in enumerate(names) if n in (signing_filter("s3"), inject_filter("reports"))]
    assert len(guards) == len(bucket_names()) + 1 and len(cloud) == 2, names
    assert max(guards) < min(cloud), names


@pytest.mark.parametrize(
    ("backend", "binding"), [("x", "b"), ("x-role", "b"), ("x", "b-role"), ("x-role", "b-role-role"), ("role", "role")]
)
def test_a_role_route_name_is_read_back_as_its_own_backend_and_binding(backend: str, binding: str) -> None:
    """The audit's `cloud_identity` is looked up by the route name Envoy reports (audit/als.py): names holding
    `-role` must not make one backend's role route read as another backend's, or another binding's."""
    route = role_route_name(backend, binding, 3)
    assert _identity_key(route, backend) == _role_route_key(backend, binding)
    others = {"x", "x-role", "role", "x-role-role"} - {backend}
    assert all(_identity_key(route, other) == other for other in others)  # another backend: its own key only
