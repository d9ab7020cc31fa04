"""The resolved view shows the cloud: each AWS or Google Cloud backend's identity (its `aws:`/`gcp:` block) and
the grants whose binding signs as a role of its own; backends without a cloud block show nothing new."""

from __future__ import annotations

from pathlib import Path

import yaml

from controlplane.model.loader import parse_policy
from controlplane.resolved import render
from controlplane.resolved.access import ResolvedPolicy
from controlplane.resolved.cloud import AWS, GCP, CloudIdentity, identities
from controlplane.resolved.index import Resolution
from controlplane.sources.policy_dir import read_policy_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _resolved(case: str) -> ResolvedPolicy:
    return Resolution().update(parse_policy(read_policy_dir(EXAMPLES / case)))


def test_an_aws_backend_shows_its_role_and_each_bindings_own_role() -> None:
    shown = yaml.safe_load(render.render(_resolved("aws-s3")))["backends"]["artifacts-s3"]
    assert shown["cloud"] == {
        "provider": AWS,
        "service": "s3",
        "region": "eu-west-1",
        "role_arn": "arn:aws:iam::123456789012:role/ci-artifacts-read",
        "source": "web_identity",
        "session_name": "controlplane-artifacts",
    }
    roles = {g["name"]: g.get("aws_role_arn") for g in shown["grants"]}
    deploy = "arn:aws:iam::123456789012:role/ci-artifacts-deploy"
    assert roles == {
        "main-writes-artifacts/artifacts-read": deploy,
        "main-writes-artifacts/artifacts-write": deploy,
        "mr-pipelines-read-artifacts/artifacts-read": None,  # signed with the backend's role_arn
    }


def test_a_gcp_backend_shows_its_service_account_scopes_or_audience() -> None:
    backends = yaml.safe_load(render.render(_resolved("gcp-storage")))["backends"]
    gcs, run = backends["gcs"]["cloud"], backends["reports-run"]["cloud"]
    assert (gcs["provider"], gcs["service_account"]) == (GCP, "gcs-reader@acme-prod.iam.gserviceaccount.com")
    assert gcs["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_only"] and gcs["lifetime"] == "3600s"
    assert "id_token_audience" not in gcs
    assert run["id_token_audience"] == "https://reports-abc123-ew.a.run.app" and "scopes" not in run
    assert all("aws_role_arn" not in g for b in backends.values() for g in b["grants"])


def test_backends_without_a_cloud_block_show_none() -> None:
    resolved = _resolved("quickstart")
    assert resolved.cloud == {}
    assert all("cloud" not in b for b in render.document(resolved)["backends"].values())  # type: ignore[union-attr]


def test_a_bindings_role_is_listed_only_on_the_aws_backends_it_grants_on() -> None:
    policy = parse_policy(read_policy_dir(EXAMPLES / "aws-s3"))
    [(name, identity)] = identities(policy).items()
    assert name == "artifacts-s3" and isinstance(identity, CloudIdentity)
    assert identity.roles == (("main-writes-artifacts", "arn:aws:iam::123456789012:role/ci-artifacts-deploy"),)
