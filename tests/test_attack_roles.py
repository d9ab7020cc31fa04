"""Attacks on per-binding AWS roles and the shared refresh schedule (issue 16 point 2), each a regression test of
what was found broken or checked to hold: docs/aws-role-attacks.md has the inputs, what was observed and why."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2

from controlplane.cloud.aws import AwsCredential, Refresher, StsError
from controlplane.compiler.aws import SigningCredential, role_routes
from controlplane.credentials.exchange import GRANT_TYPE, TOKEN_TYPE_JWT, ExchangeMemo, ExchangePolicy, TokenExchange
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Policy
from controlplane.resolved.aws_roles import RoleChoice, chosen_role, merged_projects, route_alternatives
from controlplane.resolved.conditions import Condition, ResolvedSubject
from controlplane.resolved.index import Resolution
from controlplane.runtime.aws_signing import AwsSigners, source_factory
from controlplane.sources.jwks import normalize_jwks
from tests.compiled import policy_of
from tests.support.aws_role_policy import AWS_POLICY, MR_READ
from tests.support.clock import Clock
from tests.support.fake_aws import REGION, S3_READ_POLICY, FakeAws
from tests.support.fake_gitlab import FakeGitLab
from tests.support.policy_parts import ACME_INVENTORY, backend, binding, documents, issuer, role
from tests.support.ports import poll_until
from tests.support.random_claims import (
    CLAIM_NAMES,
    ISS,
    random_conditions,
    random_value,
    rbac_allows,
    subject_principal,
    value_matches,
)
from tests.support.scripted_sts import Scripted, cred

# -- the schedule: a credential that is already past use when it arrives


def test_a_credential_dead_on_arrival_is_a_failure_not_a_hot_loop() -> None:
    """STS's clock behind ours (or ours jumped forward, or a fetch slower than a 1 s lifetime): the answer expires
    before it is received. Before: taken as a success whose refresh is due at once, so the thread called STS
    back-to-back without pause (and every call was one more STS request), and the role stayed at 503."""
    clock = Clock(1000.0)
    source = Scripted(clock)
    source.script = [cred(issued=1000.0, lifetime=-5.0, key=f"ASIADEAD{n}") for n in range(100)]
    refresher = Refresher("dead-on-arrival", source, clock=clock, sample=lambda: 0.0)
    wakes = [refresher.poll() for _ in range(20)]  # the clock does not move: what a spinning thread would do
    assert source.calls == 1, "STS called again with no backoff"
    assert refresher.current() is None and refresher.state.failures == 1
    assert wakes[-1] > clock.now


def test_a_dead_answer_does_not_replace_the_credential_held() -> None:
    """A refresh answered with an expired session keeps the usable one (as a failure does) and backs off, instead
    of dropping the role to 503 and retrying in a loop."""
    clock = Clock(1000.0)
    source = Scripted(clock)
    refresher = Refresher("dead-refresh", source, clock=clock, sample=lambda: 0.0)
    refresher.poll()
    held = refresher.current()
    assert held is not None
    clock.now = 2770.0  # the refresh is due
    dead = AwsCredential("ASIADEAD", "s", "t", 2769.0, "arn:aws:iam::1:role/r", 2770.0)
    source.script = [dead, dead, StsError("Throttling", "r", refused=False)]
    wake = refresher.poll()
    assert refresher.current() is held
    assert wake > clock.now and refresher.state.failures == 1
    refresher.poll()
    assert source.calls == 2  # backing off, not spinning


# -- an exchanged credential escapes the binding's role (the policy: tests/support/aws_role_policy.py)


@pytest.fixture(scope="module")
def gitlab() -> Iterator[FakeGitLab]:
    with FakeGitLab(default_audience="https://s3.local") as fake:
        yield fake


def _aws_exchange(
    fake: FakeGitLab, tmp_path: Path, backends: str = AWS_POLICY
) -> tuple[TokenExchange, Callable[..., dict[str, Any]]]:
    issuer_yaml = issuer(fake.issuer, extra="inventory: inventory.yaml")
    policy = policy_of(issuer=issuer_yaml, inventory=ACME_INVENTORY, backends=backends)
    exchange_policy = ExchangePolicy.build(policy, Resolution().update(policy))
    clock = Clock(float(int(time.time())))
    keys = SigningKeys(
        FileKeyStore(tmp_path / "keys.json"), rotate_every=3600, max_credential_ttl=600, publish_lead=60, clock=clock
    )
    relayed = normalize_jwks(json.dumps(fake.jwks()))[0].canonical
    exchange = TokenExchange(keys=keys, issuer_keys=lambda _: relayed, policy=lambda: exchange_policy, clock=clock)

    def run(**claims: Any) -> dict[str, Any]:
        base = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11, "job_id": 7001}
        token = fake.mint(**(base | {"iat": int(clock.now)} | claims))
        form = {
            "grant_type": GRANT_TYPE,
            "subject_token": token,
            "subject_token_type": TOKEN_TYPE_JWT,
            "audience": "s3",
        }
        result = asyncio.run(exchange.exchange(form))
        return {"status": result.status, **result.body}

    return exchange, run


def test_an_exchanged_credential_is_not_a_way_out_of_the_binding_role(gitlab: FakeGitLab, tmp_path: Path) -> None:
    """A merge-request job is signed with its binding's read-only role when it sends its ID token. Its exchanged
    credential carries roles, not its claims: it matches no binding role's route (its `iss` is the control
    plane's) and was signed with the BACKEND's role (docs/aws-backends.md "Not built / limits"), here a broader
    one: the job left the role its policy gave it by exchanging its token first. Now the exchange refuses a job
    whom a binding's own role would sign (its requests go with its ID token); others still get a credential."""
    _, run = _aws_exchange(gitlab, tmp_path)
    refused = run(pipeline_source="merge_request_event")
    assert refused["status"] == 400 and refused["error"] == "invalid_target", refused
    assert "mr-reads" in refused["error_description"]
    granted = run(pipeline_source="push", job_id=7002)
    assert granted["status"] == 200 and granted["scope"] == "s3-read"


def test_on_an_exchanged_only_aws_backend_a_binding_role_is_not_silently_replaced(
    gitlab: FakeGitLab, tmp_path: Path
) -> None:
    """`credentials: exchanged`: the compiler makes no role routes there (raw ID tokens are refused), so every
    credential was signed with the backend's role and a binding's `aws_role_arn` was silently ignored. The
    exchange now refuses the jobs such a role would sign (fail closed) rather than lend them the backend's."""
    exchanged_only = AWS_POLICY.replace("source: assume_role}", "source: assume_role}\ncredentials: exchanged")
    assert exchanged_only != AWS_POLICY
    _, run = _aws_exchange(gitlab, tmp_path, exchanged_only)
    assert run(pipeline_source="merge_request_event")["error"] == "invalid_target"
    assert run(pipeline_source="push", job_id=7003)["status"] == 200


# -- policy updates renaming roles mid-traffic: refreshers left running, threads and fds


def _role_policy(session: str, arns: Sequence[str]) -> Policy:
    """One S3 backend per role ARN, each with `session` as its STS session name (a new one replaces every
    refresher: `follow` compares how a role is obtained)."""
    docs = [
        "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n",
        "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\n"
        f"backends: [{', '.join(f'b{i}' for i in range(len(arns)))}]\n",
    ]
    for i, arn in enumerate(arns):
        aws = f"{{service: s3, region: {REGION}, role_arn: '{arn}', source: assume_role, session_name: {session}}}"
        endpoint = "endpoints: [{address: 127.0.0.1, port: 1}]"
        docs.append(f"kind: Backend\nname: b{i}\nhosts: [b{i}.local]\n{endpoint}\naws: {aws}\n")
    return parse_policy({"p.yaml": "---\n".join(docs)})


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_policy_updates_renaming_roles_leave_no_refresher_thread_nor_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 policy updates, each replacing 3 roles' refreshers (real STS calls at the fake AWS): afterwards only the
    last policy's refreshers run, and threads and open files are back near where they were."""
    with FakeAws().start() as fake:
        key = fake.user_key
        (tmp_path / "credentials").write_text(
            f"[default]\naws_access_key_id = {key.access_key_id}\naws_secret_access_key = {key.secret_access_key}\n"
        )
        for name, value in {
            "AWS_ENDPOINT_URL_STS": fake.endpoint,
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            monkeypatch.setenv(name, value)
        arns = [fake.assume_role_arn, *(fake.add_role(f"churn-{i}", S3_READ_POLICY) for i in range(2))]
        changed: list[int] = []
        signers = AwsSigners(source_factory(None, None), lambda: changed.append(1))
        try:
            signers.follow(_role_policy("s0", arns))
            poll_until(lambda: len(signers.for_policy(_role_policy("s0", arns))) == 3, 20, message="first sessions")
            threads, fds = threading.active_count(), _open_fds()
            for n in range(1, 11):
                policy = _role_policy(f"s{n}", arns)
                signers.follow(policy)
                poll_until(lambda p=policy: len(signers.for_policy(p)) == 3, 20, message=f"sessions of update {n}")
            poll_until(
                lambda: threading.active_count() <= threads + 1, 20, message="stopped refreshers' threads to end"
            )
            gc.collect()
            assert _open_fds() <= fds + 6, (fds, _open_fds())
            aws_threads = [t for t in threading.enumerate() if t.name.startswith("aws-credentials-")]
            assert len(aws_threads) == 3, [t.name for t in aws_threads]
        finally:
            signers.stop()


# -- the route a token takes and the RBAC principal it meets read the same claims the same way


def _route_matches(route: route_components_pb2.Route, claims: Mapping[str, Any]) -> bool:
    """Envoy's reading of a role route's `dynamic_metadata` matchers (ANDed), independent of the compiler: a
    missing claim is a null value, which no string or list matcher matches; `invert` flips the answer."""
    for matcher in route.match.dynamic_metadata:
        assert matcher.filter == "envoy.filters.http.jwt_authn"
        payload, claim = (segment.key for segment in matcher.path)
        assert payload == "jwt_payload"
        if value_matches(matcher.value, claims.get(claim)) is matcher.invert:
            return False
    return True


def _random_subject(rng: random.Random) -> ResolvedSubject:
    """Random conditions and alternatives; half the time alternatives per project as a live inventory makes them
    (one exact `project_id` each, the rest shared), which the compiler merges into one route."""
    conditions = random_conditions(rng, rng.randint(1, 2))
    if rng.random() < 0.5:
        shared = tuple(c for c in random_conditions(rng, rng.randint(0, 1)) if c.claim != "project_id")
        projects = rng.sample(("42", "43", "a", "main"), rng.randint(1, 3))
        return ResolvedSubject.of(conditions, [(Condition("project_id", (p,)), *shared) for p in projects])
    return ResolvedSubject.of(conditions, [random_conditions(rng, 1) for _ in range(rng.choice((0, 0, 2)))])


def test_the_role_route_taken_is_the_binding_rbac_and_explain_would_name_on_random_tokens() -> None:
    """Random subjects (globs, list claims, negations, alternatives) of three bindings with roles, random claims
    of every type (strings, numbers, bools, null, lists, mixed lists): the first compiled role route a token
    matches (Envoy's reading) is the binding `chosen_role` names (explain, audit, the exchange), and that
    binding's RBAC principal admits the token; no route matched means no binding's subject admits it. The RBAC
    principals are built from the subjects as resolved, so the merge of per-project alternatives is checked too."""
    backend = policy_of(issuer=issuer(ISS), backends=AWS_POLICY).backends[0]
    default = route_components_pb2.Route(name="s3-default", match=route_components_pb2.RouteMatch(prefix="/"))
    rng = random.Random(16)
    outcomes: set[str | None] = set()
    for _ in range(1500):
        choices = []
        for name in ("a", "b", "c"):
            subjects = [_random_subject(rng) for _ in range(rng.randint(1, 2))]
            matches = merged_projects(tuple(m for s in subjects for m in route_alternatives(s)))  # as compiled
            choices.append((RoleChoice(name, f"arn:aws:iam::1:role/{name}", matches), subjects))
        credentials = [SigningCredential("ASIA", "s", "t")] * len(choices)
        routes = role_routes(backend, [c for c, _ in choices], default, credentials)
        claims = {name: random_value(rng) for name in CLAIM_NAMES if rng.random() < 0.8}
        taken = next((r.name.split("/")[1] for r in routes if _route_matches(r, claims)), None)
        assert taken == chosen_role([c for c, _ in choices], "backend", claims)[0], (claims, taken)
        for name, subjects in ((c.binding, s) for c, s in choices):
            admitted = any(rbac_allows(subject_principal(s), claims) for s in subjects)
            if name == taken:
                assert admitted
                break
            assert not admitted, (name, claims)  # an earlier binding admitting the token would have been taken
        outcomes.add(taken)
    assert outcomes == {"a", "b", "c", None}


def test_the_exchange_sees_a_binding_role_added_with_its_grants_unchanged(gitlab: FakeGitLab) -> None:
    """A policy update adding `aws_role_arn` to a binding leaves its grants (and a resolution's tuple of them)
    as they were: the exchange's memo must still rebuild the backend's role choices."""
    issuer_yaml = issuer(gitlab.issuer, extra="inventory: inventory.yaml")
    without = policy_of(
        issuer=issuer_yaml, inventory=ACME_INVENTORY, backends=AWS_POLICY.replace(f"aws_role_arn: '{MR_READ}'", "")
    )
    with_role = replace(
        without,
        bindings=tuple(replace(b, aws_role_arn=MR_READ) if b.name == "mr-reads" else b for b in without.bindings),
    )
    resolution = Resolution()
    memo: ExchangeMemo = {}
    before = ExchangePolicy.build(without, resolution.update(without), memo)
    assert before.backends[0].aws_roles == ()
    after = ExchangePolicy.build(with_role, resolution.update(with_role), memo)
    assert [c.binding for c in after.backends[0].aws_roles] == ["mr-reads"]


# -- one role named by two backends (or a binding) that obtain it differently


TEAM_ROLE = "arn:aws:iam::123456789012:role/team-a-deploy"


def _two_backends(second_aws: str, binding_arn: str | None = None) -> dict[str, str]:
    team_a = f"{{service: s3, region: eu-west-1, role_arn: '{TEAM_ROLE}', session_name: team-a}}"
    files = {
        "a.yaml": documents(
            issuer("https://g.example.com"),
            backend("team-a", 1, extra=f"aws: {team_a}"),
            role("a-read", "team-a", ["GET"]),
        ),
        "b.yaml": documents(
            backend("aaa-other", 2, extra=f"aws: {second_aws}"),
            role("b-read", "aaa-other", ["GET"]),
        ),
    }
    if binding_arn is not None:
        files["c.yaml"] = binding("c", ["b-read"], "{project: 42}", extra=f"aws_role_arn: '{binding_arn}'")
    return files


def test_a_role_is_obtained_one_way_whoever_names_it() -> None:
    """Backend `team-a` obtains its role by web identity as session `team-a`. Another policy author adds a backend
    named to sort first, naming the same role with `source: assume_role` and no session name. Before: accepted,
    and the role was then obtained that other way for both (`roles_of` keeps the first by name), so `team-a`
    answered 503 wherever AssumeRole is not allowed, and CloudTrail saw another session name: one backend's
    settings silently broke another's. Now a role signs for one backend (model/kinds/aws.py shared_role_errors:
    the token asserts `backend:<name>` to STS), so naming it on a second backend is an error, whichever way."""
    hostile = f"{{service: sqs, region: us-east-1, role_arn: '{TEAM_ROLE}', source: assume_role}}"
    same = f"{{service: sqs, region: us-east-1, role_arn: '{TEAM_ROLE}', session_name: team-a}}"
    for second in (hostile, same):
        with pytest.raises(PolicyInvalid) as raised:
            parse_policy(_two_backends(second))
        (error,) = raised.value.errors
        assert error.field == "aws" and "team-a" in error.message and "aaa-other" in error.message
    # a binding of aaa-other's naming team-a's role would ride on team-a's credential: refused too
    other = "arn:aws:iam::123456789012:role/other"
    aaa_assume = f"{{service: sqs, region: us-east-1, role_arn: '{other}', source: assume_role}}"
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(_two_backends(aaa_assume, binding_arn=TEAM_ROLE))
    (error,) = raised.value.errors
    assert (error.file, error.field) == ("c.yaml", "aws_role_arn")
