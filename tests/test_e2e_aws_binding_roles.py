"""Per-binding AWS roles end to end (docs/aws-backends.md): policy → the real `serve` (a refresher per role the
policy names, backends' and bindings' alike: AssumeRole at the fake STS) → a REAL Envoy 1.40 choosing the signing
role by the job's verified token (routes on jwt_authn's payload, `clear_route_cache`) → moto with SigV4 and IAM
policies enforced (tests/support/fake_aws.py), which tells which role each request was signed as.

Roles: merge-request pipelines read with a read-only role; protected main reads and writes with a deploy role;
tag pipelines name a role the control plane may not assume (its refresher fails: 503 on its routes only); any
other pipeline of the project reads and writes under the backend's own role, which AWS lets read only. The
policy, the fake AWS and the stack are built by tests/support/aws_roles_world.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.aws_roles_world import AUDIENCE, HOST, PATH, World, aws_roles_world
from tests.support.fake_aws import OBJECT_BODY
from tests.support.fake_gitlab import SigningKey
from tests.support.ports import poll_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with aws_roles_world(tmp_path_factory.mktemp("aws-binding-roles")) as built:
        yield built


def test_each_job_is_signed_with_its_binding_role_as_aws_sees_it(world: World) -> None:
    job = world.stack.job
    mr = job(101, ref="feature", ref_protected=False, pipeline_source="merge_request_event")
    assert world.send(mr) == (200, world.roles.mr_read)
    assert world.send(mr, "PUT")[0] == 403  # RBAC: mr-reads grants no write; AWS never sees it
    main = job(102, ref="main", ref_protected=True)
    assert world.send(main) == (200, world.roles.deploy)
    assert world.send(main, "PUT") == (200, world.roles.deploy)  # the deploy role may write: S3 accepted it
    push = job(103, ref="feature", ref_protected=False)
    assert world.send(push) == (200, world.roles.backend)
    # RBAC lets `others` write, but it signs with the backend's read-only role: AWS itself refuses the PUT
    assert world.send(push, "PUT") == (403, world.roles.backend)
    response = world.stack.request(HOST, PATH, main)
    assert response.text.encode() == OBJECT_BODY


def test_nothing_a_job_sends_buys_another_role(world: World) -> None:
    job = world.stack.job
    # (hyphenated: the fake's WSGI server drops a header with '_', which breaks any signature over it). The x-ci-*
    # identity headers are replaced at the router, after signing: the signer leaves them out, so AWS still accepts.
    forged = {
        "ref-protected": "true",
        "x-ref": "main",
        "pipeline-source": "push",
        "x-jwt-payload": "{}",
        "x-ci-ref": "main",
        "x-ci-project-id": "1",
    }
    mr = job(111, ref="feature", ref_protected=False, pipeline_source="merge_request_event")
    assert world.send(mr, headers=forged) == (200, world.roles.mr_read)
    # a merge-request pipeline of protected main is no deploy job (pipeline_source is excluded, `invert` on Envoy)
    mr_on_main = job(112, ref="main", ref_protected=True, pipeline_source="merge_request_event")
    assert world.send(mr_on_main) == (200, world.roles.mr_read)
    assert world.send(mr_on_main, "PUT") == (403, None)  # and main-deploys' grant does not apply to it
    # a claim forged in a token of another key: jwt_authn refuses it, AWS never sees it
    forger = SigningKey.generate()
    stolen = world.stack.gitlab.mint(aud=AUDIENCE, project_id=42, ref="main", key=forger)
    assert world.send(stolen, "PUT") == (401, None)


def test_a_role_without_a_credential_closes_its_routes_only(world: World) -> None:
    """The tags role may not be assumed (AccessDenied at STS): its jobs get 503, never an unsigned request nor
    another role; every other role keeps signing."""
    job = world.stack.job
    tag = job(121, ref="v1.0", ref_type="tag", ref_protected=True)
    assert world.send(tag) == (503, None)
    assert world.send(job(122, ref="main")) == (200, world.roles.deploy)
    assert world.send(job(123, ref="feature", ref_protected=False)) == (200, world.roles.backend)
    log = world.stack.controlplane.log_text()
    assert world.fake.user_key.secret_access_key not in log and "SecretAccessKey" not in log


def test_the_audit_trail_records_the_role_each_request_was_signed_with(world: World) -> None:
    job = world.stack.job
    sent = {
        "131": (job(131, ref="main"), world.roles.deploy),
        "132": (
            job(132, ref="feature", ref_protected=False, pipeline_source="merge_request_event"),
            world.roles.mr_read,
        ),
        "133": (job(133, ref="feature", ref_protected=False), world.roles.backend),
        "134": (job(134, ref="v2.0", ref_type="tag"), None),  # 503: sent as no one
    }
    for token, _ in sent.values():
        world.stack.request(HOST, PATH, token)
    database = str(world.stack.controlplane.state_dir / "audit.sqlite3")

    def rows(job_id: str) -> list[dict[str, Any]]:
        command = [sys.executable, "-m", "controlplane", "audit", "--job", job_id, "--json", "--db", database]
        return list(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))

    for job_id, (_, role_arn) in sent.items():
        (row,) = poll_until(lambda job_id=job_id: rows(job_id), 10, message=f"job {job_id} in the trail")
        assert (row["backend"], row["cloud_identity"]) == ("s3", role_arn), row
