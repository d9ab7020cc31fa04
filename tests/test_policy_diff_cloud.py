"""`controlplane diff` and the cloud: who a backend's requests reach AWS or Google Cloud as is an access change.

Each case edits a copy of an example (examples/aws-s3, examples/gcp-storage) and checks the text lines, the JSON
(`backends[].cloud`: binding, setting, old, new) and the exit status; an unchanged (or merely reordered) cloud
policy reports nothing. The comparison itself is checked directly too (resolved.diff.cloud_changes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.main import main
from controlplane.resolved.cloud import AWS, GCP, CloudIdentity
from controlplane.resolved.diff import CloudChange, cloud_changes
from tests.support.policy_parts import Edit
from tests.support.policy_parts import replace_in as _replace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
AWS_EXAMPLE, GCP_EXAMPLE = EXAMPLES / "aws-s3", EXAMPLES / "gcp-storage"
READ_ROLE = "arn:aws:iam::123456789012:role/ci-artifacts-read"
DEPLOY_ROLE = "arn:aws:iam::123456789012:role/ci-artifacts-deploy"
OTHER_ROLE = "arn:aws:iam::123456789012:role/ci-other"
READER = "gcs-reader@acme-prod.iam.gserviceaccount.com"
RUN_AUDIENCE = "https://reports-abc123-ew.a.run.app"
READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
FULL_SCOPE = "https://www.googleapis.com/auth/devstorage.full_control"


def _reorder(name: str) -> Edit:
    def edit(root: Path) -> None:
        path = root / name
        path.write_text("\n---\n".join(reversed(path.read_text().split("\n---\n"))))

    return edit


AWS_BLOCK = f"""aws:
  service: s3
  region: eu-west-1
  role_arn: {READ_ROLE}
  session_name: controlplane-artifacts
"""
GCS_BLOCK = """gcp:
  workload_identity_provider: projects/123456789/locations/global/workloadIdentityPools/gitlab-ci/providers/controlplane
  service_account: gcs-reader@acme-prod.iam.gserviceaccount.com
  scopes: [https://www.googleapis.com/auth/devstorage.read_only]
  lifetime: 1h
"""
NO_BINDING_ROLE = _replace("bindings.yaml", f"aws_role_arn: {DEPLOY_ROLE}\n", "")

# (case, example, edits of NEW, expected JSON cloud changes of the one changed backend (binding, setting, old, new))
CASES: list[tuple[str, Path, list[Edit], str, list[tuple[str | None, str, str | None, str | None]]]] = [
    (
        "aws-role-arn",
        AWS_EXAMPLE,
        [_replace("backend.yaml", READ_ROLE, OTHER_ROLE)],
        "artifacts-s3",
        [(None, "role_arn", READ_ROLE, OTHER_ROLE)],
    ),
    (
        "aws-region",
        AWS_EXAMPLE,
        [_replace("backend.yaml", "region: eu-west-1", "region: us-east-2")],
        "artifacts-s3",
        [(None, "region", "eu-west-1", "us-east-2")],
    ),
    (
        "aws-source",
        AWS_EXAMPLE,
        [_replace("backend.yaml", "session_name:", "source: assume_role\n  session_name:")],
        "artifacts-s3",
        [(None, "source", "web_identity", "assume_role")],
    ),
    (
        "binding-role-changed",
        AWS_EXAMPLE,
        [_replace("bindings.yaml", DEPLOY_ROLE, OTHER_ROLE)],
        "artifacts-s3",
        [("main-writes-artifacts", "aws_role_arn", DEPLOY_ROLE, OTHER_ROLE)],
    ),
    (
        "binding-role-removed",
        AWS_EXAMPLE,
        [NO_BINDING_ROLE],
        "artifacts-s3",
        [("main-writes-artifacts", "aws_role_arn", DEPLOY_ROLE, None)],
    ),
    (
        "binding-role-added",
        AWS_EXAMPLE,
        [
            _replace(
                "bindings.yaml", "roles: [artifacts-read]\n", f"roles: [artifacts-read]\naws_role_arn: {OTHER_ROLE}\n"
            )
        ],
        "artifacts-s3",
        [("mr-pipelines-read-artifacts", "aws_role_arn", None, OTHER_ROLE)],
    ),
    (
        "out-of-aws",
        AWS_EXAMPLE,
        [_replace("backend.yaml", AWS_BLOCK, ""), NO_BINDING_ROLE],
        "artifacts-s3",
        [
            (None, "provider", AWS, None),
            (None, "service", "s3", None),
            (None, "region", "eu-west-1", None),
            (None, "role_arn", READ_ROLE, None),
            (None, "source", "web_identity", None),
            (None, "session_name", "controlplane-artifacts", None),
            ("main-writes-artifacts", "aws_role_arn", DEPLOY_ROLE, None),
        ],
    ),
    (
        "gcp-service-account",
        GCP_EXAMPLE,
        [_replace("backends.yaml", READER, "gcs-writer@acme-prod.iam.gserviceaccount.com")],
        "gcs",
        [(None, "service_account", READER, "gcs-writer@acme-prod.iam.gserviceaccount.com")],
    ),
    (
        "gcp-scopes",
        GCP_EXAMPLE,
        [_replace("backends.yaml", f"scopes: [{READ_ONLY_SCOPE}]", f"scopes: [{READ_ONLY_SCOPE}, {FULL_SCOPE}]")],
        "gcs",
        [(None, "scopes", READ_ONLY_SCOPE, f"{READ_ONLY_SCOPE} {FULL_SCOPE}")],
    ),
    (
        "gcp-id-token-audience",
        GCP_EXAMPLE,
        [_replace("backends.yaml", RUN_AUDIENCE, "https://reports-zzz999-ew.a.run.app")],
        "reports-run",
        [(None, "id_token_audience", RUN_AUDIENCE, "https://reports-zzz999-ew.a.run.app")],
    ),
    (
        "out-of-gcp",
        GCP_EXAMPLE,
        [_replace("backends.yaml", GCS_BLOCK, "")],
        "gcs",
        [
            (None, "provider", GCP, None),
            (None, "workload_identity_provider", GCS_BLOCK.split()[2], None),
            (None, "service_account", READER, None),
            (None, "scopes", READ_ONLY_SCOPE, None),
            (None, "lifetime", "3600s", None),
        ],
    ),
]


def _tree(tmp_path: Path, example: Path, name: str, *edits: Edit) -> Path:
    root = tmp_path / name
    shutil.copytree(example, root)
    for edit in edits:
        edit(root)
    return root


def _diff(capsys: pytest.CaptureFixture[str], old: Path, new: Path) -> tuple[int, dict[str, Any], list[str]]:
    code = main(["diff", "--json", str(old), str(new)])
    data = json.loads(capsys.readouterr().out)
    assert main(["diff", str(old), str(new)]) == code
    return code, data, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(("case", "example", "edits", "backend", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_cloud_identity_change_is_an_access_change(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    example: Path,
    edits: list[Edit],
    backend: str,
    expected: list[tuple[str | None, str, str | None, str | None]],
) -> None:
    old, new = _tree(tmp_path, example, "old"), _tree(tmp_path, example, "new", *edits)
    code, data, lines = _diff(capsys, old, new)
    assert code == 1 and data["changed"] is True
    [changed] = data["backends"]
    assert (changed["name"], changed["status"]) == (backend, "changed")
    assert changed["gains"] == [] and changed["losses"] == [] and changed["modes"] == []
    assert [(c["binding"], c["setting"], c["old"], c["new"]) for c in changed["cloud"]] == expected
    assert lines[0] == f"backend {backend}"
    for (binding, setting, was, now), line in zip(expected, lines[1:], strict=False):
        who = "cloud" if binding is None else f"binding {binding}"
        assert line == f"  * {who} {setting}: {was or 'none'} -> {now or 'none'}"
    # and the other way round: into aws/gcp, or the old value back
    code, back, _ = _diff(capsys, new, old)
    assert code == 1
    assert [(c["binding"], c["setting"], c["new"], c["old"]) for c in back["backends"][0]["cloud"]] == expected


@pytest.mark.parametrize("example", [AWS_EXAMPLE, GCP_EXAMPLE], ids=["aws", "gcp"])
def test_unchanged_cloud_policies_report_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], example: Path
) -> None:
    old = _tree(tmp_path, example, "old")
    name = "bindings.yaml" if example == AWS_EXAMPLE else "backends.yaml"
    new = _tree(tmp_path, example, "new", _reorder(name))
    code, data, lines = _diff(capsys, old, new)
    assert (code, data["backends"], lines) == (0, [], [])


def test_gcp_into_aws_lists_both_blocks() -> None:
    gcp = CloudIdentity(GCP, READER, (("service_account", READER), ("lifetime", "3600s")), ())
    aws = CloudIdentity(AWS, READ_ROLE, (("role_arn", READ_ROLE),), (("b", OTHER_ROLE),))
    assert cloud_changes(gcp, aws) == (
        CloudChange(None, "provider", GCP, AWS),
        CloudChange(None, "service_account", READER, None),
        CloudChange(None, "lifetime", "3600s", None),
        CloudChange(None, "role_arn", None, READ_ROLE),
        CloudChange("b", "aws_role_arn", None, OTHER_ROLE),
    )
    assert cloud_changes(aws, aws) == cloud_changes(None, None) == ()


def test_policy_history_in_the_report_names_the_cloud_change(tmp_path: Path) -> None:
    """`report`'s access changes per version are diff's own, cloud included."""
    from controlplane.audit.report import diff_lines
    from controlplane.cli.diff import load_side
    from controlplane.resolved.diff import compare
    from controlplane.sources.policy_dir import ReadLimits

    old = load_side(_tree(tmp_path, AWS_EXAMPLE, "old"), "old", ReadLimits())
    new = load_side(
        _tree(tmp_path, AWS_EXAMPLE, "new", _replace("backend.yaml", READ_ROLE, OTHER_ROLE)), "new", ReadLimits()
    )
    assert old is not None and new is not None
    diff = compare(old.resolved, new.resolved, {}, {})
    assert diff_lines(diff) == [f"* artifacts-s3: cloud role_arn: {READ_ROLE} -> {OTHER_ROLE}"]
