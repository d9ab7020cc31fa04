"""An S3 backend signing with its own AWS role plus one binding with a role of its own (merge-request pipelines
read as ci-mr-read; the project's other jobs as the backend's role): the smallest policy where a job's binding
chooses the signing role. Nothing listens on its backend's port: the suites compile it, or exchange tokens for it.

Shared by the role attacks on the exchange and the route choice (tests/test_attack_roles.py) and by the static
Envoy check of merged per-project routes (tests/test_e2e_aws_role_attacks.py); it lives here because test modules
do not import each other (tests/test_no_test_imports.py).
"""

from __future__ import annotations

from tests.support.policy_parts import backend, binding, documents, role

MR_READ = "arn:aws:iam::123456789012:role/ci-mr-read"
BACKEND_ROLE = "arn:aws:iam::123456789012:role/ci-read-write"
AWS_POLICY = documents(
    backend(
        "s3",
        9000,
        host="s3.local",
        extra=f"aws: {{service: s3, region: eu-west-1, role_arn: '{BACKEND_ROLE}', source: assume_role}}",
    ),
    role("s3-read", "s3", ["GET"]),
    binding(
        "mr-reads",
        ["s3-read"],
        "{project: acme/platform/deployer, pipeline_source: merge_request_event}",
        extra=f"aws_role_arn: '{MR_READ}'",
    ),
    binding("others", ["s3-read"], "{project: acme/platform/deployer}"),
)
