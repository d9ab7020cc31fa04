"""Per-binding AWS roles served end to end: the fake AWS (moto, SigV4 and IAM enforced) with a role per binding,
the policy choosing among them by the job's claims, and a real `serve` with a real Envoy in front, built as one
`World` (see tests/test_e2e_aws_binding_roles.py for what each role is for).

`aws_roles_world` is a context manager, not a fixture: each suite that needs the stack (the binding-role tests
in tests/test_e2e_aws_binding_roles.py, the attacks in tests/test_e2e_aws_role_attacks.py) keeps a small
module-scoped fixture over it, so each module builds and stops its own stack. It lives here because test modules
do not import each other (tests/test_no_test_imports.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.fake_aws import BUCKET, OBJECT_KEY, REGION, S3_READ_POLICY, FakeAws
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

HOST = f"s3.{REGION}.amazonaws.com"
AUDIENCE = f"https://{HOST}"
PATH = f"/{BUCKET}/{OBJECT_KEY}"
INVENTORY = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"
READ_WRITE = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "*"}],
}


@dataclass
class Roles:
    backend: str  # the backend's own role_arn: S3 read only
    mr_read: str
    deploy: str
    tags: str  # the control plane may not assume it


@dataclass
class RolesStack(Served):
    def job(self, job_id: int, **claims: Any) -> str:
        base: dict[str, Any] = {"aud": AUDIENCE, "project_id": 42, "project_path": "acme/deployer", "namespace_id": 11}
        return self.gitlab.mint(job_id=job_id, **(base | claims))


def policy(fake: FakeAws, roles: Roles) -> Callable[[PolicyInputs], dict[str, str]]:
    """The policy files for the roles, written by the stack into its policy directory."""

    def files(given: PolicyInputs) -> dict[str, str]:
        aws = f"aws: {{service: s3, region: {REGION}, role_arn: '{roles.backend}', source: assume_role}}"
        return {
            "inventory.yaml": INVENTORY,
            "policy.yaml": documents(
                issuer(given.issuer, extra="inventory: inventory.yaml"),
                backend("s3", fake.port, host=HOST, extra=aws),
                role("read", "s3", paths=[f"/{BUCKET}/**"]),
                role("write", "s3", methods=["PUT"], paths=[f"/{BUCKET}/**"]),
                binding(
                    "main-deploys",
                    ["read", "write"],
                    "{project: 42, ref: main, ref_protected: true}",
                    extra=f"aws_role_arn: '{roles.deploy}'",
                ),
                binding(
                    "mr-reads",
                    ["read"],
                    "{project: 42, pipeline_source: merge_request_event}",
                    extra=f"aws_role_arn: '{roles.mr_read}'",
                ),
                binding("others", ["read", "write"], "{project: 42}"),
                binding("tags-read", ["read"], "{project: 42, ref_type: tag}", extra=f"aws_role_arn: '{roles.tags}'"),
                gateway(given.listen_port, ["s3"], access_log=given.access_log),
            ),
        }

    return files


@dataclass
class World:
    fake: FakeAws
    roles: Roles
    stack: RolesStack

    def send(self, token: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str | None]:
        """(status, the role AWS saw the request signed as: None when no signed request reached AWS). A PUT writes
        an object of its own, never the one the GETs read."""
        seen = len(self.fake.signed_by)
        path = PATH if method == "GET" else f"/{BUCKET}/written.txt"
        response = self.stack.request(HOST, path, token, method=method, headers=headers)
        signed = self.fake.signed_by[seen:]
        if not signed:
            return response.status, None
        (key,) = signed
        return response.status, self.fake.role_of_key(key)


@contextmanager
def aws_roles_world(root: Path) -> Iterator[World]:
    """The fake AWS with the four roles, the policy above served by a real `serve` and Envoy from `root` (an empty
    directory), ready once each role a job can reach signs; everything is stopped on leaving."""
    fake = FakeAws().start()
    try:
        roles = Roles(
            backend=fake.assume_role_arn,
            mr_read=fake.add_role("ci-mr-read", S3_READ_POLICY),
            deploy=fake.add_role("ci-main-deploy", READ_WRITE),
            tags=fake.add_role("ci-tags-read", S3_READ_POLICY, assumable=False),
        )
        key = fake.user_key
        (root / "credentials").write_text(
            f"[default]\naws_access_key_id = {key.access_key_id}\naws_secret_access_key = {key.secret_access_key}\n"
        )
        env = {
            "AWS_ENDPOINT_URL_STS": fake.endpoint,
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "credentials"),
            "AWS_CONFIG_FILE": str(root / "no-config"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        (root / "stack").mkdir()

        def ready(built: RolesStack) -> bool:
            jobs = (built.job(1, ref="main"), built.job(2, pipeline_source="merge_request_event"), built.job(3))
            return all(built.request(HOST, PATH, token).status == 200 for token in jobs)

        with serve_stack(
            root / "stack",
            policy(fake, roles),
            kind=RolesStack,
            envoy=EnvoySpec("aws-roles-envoy", "aws-roles-envoy"),
            backends=(),
            serve_args=("--xds-insecure",),
            env=env,
            ready=ready,
            ready_timeout=40,
        ) as built:
            yield World(fake, roles, built)
    finally:
        fake.stop()
