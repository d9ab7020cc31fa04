"""The cloud identity an audit record names (audit/als.py): the AWS role ARN or Google service account of the
backend in the policy in service, only for an allowed request the router sent to that backend's cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from controlplane.audit.als import AccessLogService, cloud_identities, record_from_entry, with_cloud_identity
from controlplane.audit.store import AuditTrail
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Policy
from tests.support.als_entries import ALLOWED, entry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DENIED = {"enforced_engine_result": "denied", "enforced_effective_policy_id": "b/r"}
AWS_ROLE = "arn:aws:iam::123456789012:role/ci-artifacts-read"
GCS_SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"
RUN_SA = "run-invoker@acme-prod.iam.gserviceaccount.com"


def example(name: str) -> Policy:
    folder = EXAMPLES / name
    return parse_policy({p.name: p.read_text() for p in sorted(folder.glob("*.yaml"))})


def test_each_cloud_backend_names_its_role_or_service_account_and_no_other_backend_does() -> None:
    aws = cloud_identities(example("aws-s3"))
    gcp = cloud_identities(example("gcp-storage"))
    deploy = "arn:aws:iam::123456789012:role/ci-artifacts-deploy"  # main-writes-artifacts' own role, by its routes
    assert aws == {"artifacts-s3": AWS_ROLE, "artifacts-s3-role/main-writes-artifacts": deploy}
    assert sorted(gcp.values()) == [GCS_SA, RUN_SA]
    assert cloud_identities(example("quickstart")) == {}
    assert cloud_identities(None) == {}


def identity(**given: Any) -> str | None:
    built = entry(**given)
    record = record_from_entry(built, gateway="g", node="n")
    return with_cloud_identity(record, built, {"reports-api": AWS_ROLE}).cloud_identity


def test_only_an_allowed_request_routed_to_the_backend_names_the_identity() -> None:
    assert identity(rbac=ALLOWED) == AWS_ROLE
    assert identity(rbac=DENIED, status=403, cluster="") is None  # RBAC said no: never sent
    assert identity(rbac=ALLOWED, status=503, cluster="", details="direct_response") is None  # no valid credential
    assert identity(rbac=ALLOWED, cluster="backend-other") is None  # not this backend's cluster
    assert identity(rbac=ALLOWED, route="other-default", cluster="backend-other") is None  # not a cloud backend


def test_the_receiver_follows_the_policy_in_service() -> None:
    """Read as each entry arrives: a policy change (here aws-s3 → gcp-storage → none) changes what is recorded."""
    in_service: list[Policy | None] = [example("aws-s3")]
    service = AccessLogService(cast(AuditTrail, None), policy=lambda: in_service[0])
    first = service._cloud_identities()
    assert first["artifacts-s3"] == AWS_ROLE
    assert service._cloud_identities() is first  # computed once per policy
    in_service[0] = example("gcp-storage")
    assert sorted(service._cloud_identities().values()) == [GCS_SA, RUN_SA]
    in_service[0] = None
    assert service._cloud_identities() == {}
