"""A Backend's `gcp:` block: read into the model, injected as Authorization: Bearer, errors with file/line/field."""

from __future__ import annotations

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane.compiler import inject
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import GcpCredentials, Injection

PROVIDER = "projects/123/locations/global/workloadIdentityPools/gitlab-ci/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"


def _files(gcp: str, extra: str = "") -> dict[str, str]:
    block = "\n".join("  " + line for line in gcp.strip().splitlines())
    return {
        "p.yaml": "kind: Backend\nname: storage\nhosts: [storage.local]\n"
        f"endpoints: [{{address: 127.0.0.1, port: 9}}]\n{extra}gcp:\n{block}\n"
    }


def test_an_access_token_block_defaults_to_cloud_platform_for_an_hour_injected_as_bearer() -> None:
    (backend,) = parse_policy(_files(f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}")).backends
    assert backend.gcp == GcpCredentials(PROVIDER, SA, ("https://www.googleapis.com/auth/cloud-platform",), None, 3600)
    assert backend.inject == Injection(header="Authorization", prefix="Bearer ")


def test_an_id_token_block_has_an_audience_and_no_scopes() -> None:
    gcp = f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}\nid_token_audience: https://run.test\n"
    (backend,) = parse_policy(_files(gcp + "lifetime: 10m")).backends
    assert backend.gcp == GcpCredentials(PROVIDER, SA, (), "https://run.test", 600)


@pytest.mark.parametrize(
    ("gcp", "extra", "where", "message"),
    [
        (f"service_account: {SA}", "", "p.yaml:6: gcp.workload_identity_provider", "missing required key"),
        (
            f"workload_identity_provider: projects/x/pools/y\nservice_account: {SA}",
            "",
            "p.yaml:6: gcp.workload_identity_provider",
            "expected projects/NUMBER",
        ),
        (f"workload_identity_provider: {PROVIDER}\nservice_account: bob", "", "p.yaml:7: gcp.service_account", "email"),
        (
            f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}\nscopes: [storage]",
            "",
            "p.yaml:8: gcp.scopes[0]",
            "expected an OAuth scope",
        ),
        (
            f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}\nscopes: []\nid_token_audience: https://a",
            "",
            "p.yaml:9: gcp.id_token_audience",
            "not scopes",
        ),
        (
            f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}\nlifetime: 13h",
            "",
            "p.yaml:8: gcp.lifetime",
            "between 1s and 12h",
        ),
        (
            f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}\ntoken: x",
            "",
            "p.yaml:8: gcp.token",
            "no secret",
        ),
        (
            f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}",
            "inject: {secret_env: TOKEN}\n",
            "p.yaml:6: gcp",
            "drop inject",
        ),
    ],
)
def test_errors_name_file_line_and_field(gcp: str, extra: str, where: str, message: str) -> None:
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(_files(gcp, extra))
    text = str(raised.value)
    assert where in text and message in text, text


def test_without_a_token_the_secret_is_empty_so_envoy_fails_closed() -> None:
    """`compile` and a serve that holds no Google token yet deliver nothing (never a stale or placeholder)."""
    (backend,) = parse_policy(_files(f"workload_identity_provider: {PROVIDER}\nservice_account: {SA}")).backends
    ((_, empty),) = inject.secrets([backend], {})
    ((_, held),) = inject.secrets([backend], {"storage": "ya29.token"})
    assert secret_value(empty) == "" and secret_value(held) == "Bearer ya29.token"


def secret_value(data: bytes) -> str:
    return str(secret_pb2.Secret.FromString(data).generic_secret.secret.inline_string)
