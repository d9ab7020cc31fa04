"""Job-scoped credentials: the shared policy evaluation, signing keys and their rotation, the RFC 8693 exchange
and its HTTP endpoint.

The evaluation is checked against an independent reading of the compiled RBAC principals (the bytes Envoy
gets), on seeded random claims and conditions. Time is a fake clock everywhere except where the fake GitLab
mints tokens with real `iat`s; there the clock starts at real time and is moved explicitly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import stat
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from controlplane import statefile
from controlplane.credentials.exchange import (
    GRANT_TYPE,
    TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT,
    ExchangePolicy,
    ExchangeResult,
    TokenExchange,
)
from controlplane.credentials.http import ExchangeEndpoint
from controlplane.credentials.keys import FileKeyStore, KeyStoreError, SigningKeys, StoredKey, thumbprint
from controlplane.model.credentials import CREDENTIAL_ISSUER, EXCHANGE_PATH
from controlplane.model.policy import Mode
from controlplane.resolved.access import Grant
from controlplane.resolved.conditions import Condition, ResolvedSubject
from controlplane.resolved.evaluate import Evaluator
from controlplane.sources.jwks import normalize_jwks
from controlplane.statefile import StateFileError
from controlplane.telemetry.metrics import REGISTRY
from tests.support.clock import Clock
from tests.support.exchange_policy import exchange_policy
from tests.support.fake_gitlab import OMIT, FakeGitLab, decode_unverified
from tests.support.random_claims import (
    CLAIM_NAMES,
    ISS,
    random_conditions,
    random_value,
    rbac_allows,
    subject_principal,
)

# --- evaluate: tables ------------------------------------------------------------------------------------------


def subject(*conditions: Condition, alternatives: tuple[tuple[Condition, ...], ...] = ()) -> ResolvedSubject:
    return ResolvedSubject.of(conditions, alternatives)


def grant(name: str, *subjects: ResolvedSubject, mode: Mode = Mode.ENFORCE) -> Grant:
    binding, _, role = name.partition("/")
    return Grant(binding, role, mode, (), subjects)


EVALUATOR = Evaluator()
grants_for = EVALUATOR.grants_for
subject_matches = EVALUATOR.subject_matches


BASE = {"iss": ISS, "project_id": "42", "ref": "release/1", "ref_protected": "true", "groups": ["a", "b/c"]}


@pytest.mark.parametrize(
    ("condition", "claims", "expected"),
    [
        (Condition("project_id", ("42",)), BASE, True),
        (Condition("project_id", ("43", "42")), BASE, True),
        (Condition("project_id", ("43",)), BASE, False),
        (Condition("project_id", ("42",)), {**BASE, "project_id": 42}, False),  # not a string: never matches
        (Condition("ref_protected", ("true",)), {**BASE, "ref_protected": True}, False),
        (Condition("project_id", ("42",)), {"iss": ISS}, False),  # absent
        (Condition("pipeline_source", ("merge_request_event",), negated=True), BASE, True),  # absent: not in
        (Condition("pipeline_source", ("merge_request_event",), negated=True), {"pipeline_source": "push"}, True),
        (
            Condition("pipeline_source", ("merge_request_event",), negated=True),
            {"pipeline_source": "merge_request_event"},
            False,
        ),
        (Condition("ref", ("release/*",)), BASE, True),
        (Condition("ref", ("release/*",)), {"ref": "release/1/hotfix"}, False),  # `*` never crosses `/`
        (Condition("ref", ("release/?",)), {"ref": "release/10"}, False),
        (Condition("ref", ("rel*",)), {"ref": "release/1"}, False),
        (Condition("ref", ("release.1",)), {"ref": "releaseX1"}, False),  # literal, not a regex
        (Condition("ref", ("rele?se",)), {"ref": "release\n"}, False),  # a full match, not `$` before a newline
        (Condition("groups", ("b/c",), listy=True), BASE, True),
        (Condition("groups", ("b/*",), listy=True), BASE, True),
        (Condition("groups", ("x",), listy=True), BASE, False),
        (Condition("groups", ("a",), listy=True), {"groups": "a"}, True),  # a listy claim may be a string
        (Condition("groups", ("a",), listy=False), BASE, False),  # a list never matches a plain condition
        (Condition("groups", ("42",), listy=True), {"groups": [42]}, False),  # non-string element
    ],
)
def test_condition_semantics(condition: Condition, claims: Mapping[str, Any], expected: bool) -> None:
    assert subject_matches(claims, subject(condition)) is expected
    assert rbac_allows(subject_principal(subject(condition)), claims) is expected


def test_a_subject_needs_every_condition_and_one_alternative() -> None:
    iss, protected = Condition("iss", (ISS,)), Condition("ref_protected", ("true",))
    alternatives = (
        (Condition("project_id", ("41",)),),
        (Condition("project_id", ("42",)), Condition("ref", ("release/*",))),
    )
    live = subject(iss, protected, alternatives=alternatives)
    assert subject_matches(BASE, live)
    assert not subject_matches({**BASE, "ref": "main"}, live)  # the 42 alternative needs release/*
    assert not subject_matches({**BASE, "ref_protected": "false"}, live)
    assert subject_matches({**BASE, "project_id": "41", "ref": "main"}, live)


def test_grants_for_keeps_enforced_grants_of_which_any_subject_matches() -> None:
    yes = subject(Condition("project_id", ("42",)))
    no = subject(Condition("project_id", ("43",)))
    grants = [
        grant("a/r", no, yes),
        grant("b/r", no),
        grant("c/r", yes, mode=Mode.SHADOW),  # shadow grants nothing
        grant("d/r"),  # all subjects withdrawn
        grant("e/r", yes),
    ]
    assert [g.name for g in grants_for(BASE, grants)] == ["a/r", "e/r"]


# --- evaluate: against the compiled RBAC principals ------------------------------------------------------------
# (the independent reading and the random cases: tests/support/random_claims.py)


def test_evaluation_agrees_with_the_compiled_principals_on_random_cases() -> None:
    rng = random.Random(8693)
    outcomes = set()
    for _ in range(3000):
        alternatives = tuple(random_conditions(rng, rng.randint(1, 2)) for _ in range(rng.choice((0, 0, 1, 2))))
        resolved = subject(*random_conditions(rng, rng.randint(1, 3)), alternatives=alternatives)
        claims = {name: random_value(rng) for name in CLAIM_NAMES if rng.random() < 0.8}
        expected = rbac_allows(subject_principal(resolved), claims)
        assert subject_matches(claims, resolved) is expected, (resolved.conditions, alternatives, claims)
        outcomes.add(expected)
    assert outcomes == {True, False}  # the generator exercises both answers


# --- a policy and the fake GitLab ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gitlab() -> Iterator[FakeGitLab]:
    with FakeGitLab(default_audience="https://reports.local") as fake:
        yield fake


class Setup:
    """A TokenExchange over the fake GitLab's keys, a fresh key store and a clock starting now."""

    def __init__(self, fake: FakeGitLab, tmp_path: Path, *, max_credential_ttl: int = 3600, **options: Any) -> None:
        self.fake = fake
        self.clock = Clock(float(int(time.time())))
        self.keys = SigningKeys(
            FileKeyStore(tmp_path / "keys.json"),
            rotate_every=3600,
            max_credential_ttl=max_credential_ttl,
            publish_lead=60,
            clock=self.clock,
        )
        self.policy: ExchangePolicy | None = exchange_policy(fake)
        relayed = normalize_jwks(json.dumps(fake.jwks()))[0].canonical
        self.exchange = TokenExchange(
            keys=self.keys,
            issuer_keys=lambda name: relayed if name == "gitlab" else None,
            policy=lambda: self.policy,
            clock=self.clock,
            **options,
        )

    def mint(self, **claims: Any) -> str:
        defaults: dict[str, Any] = {
            "project_id": 42,
            "project_path": "acme/platform/deployer",
            "namespace_id": 11,
            "ref": "main",
            "job_id": 5001,
            "pipeline_id": 900,
            "iat": int(self.clock.now),
        }
        return self.fake.mint(**{**defaults, **claims})

    def form(self, token: str, **fields: str) -> dict[str, str]:
        return {
            "grant_type": GRANT_TYPE,
            "subject_token": token,
            "subject_token_type": TOKEN_TYPE_JWT,
            "audience": "reports-api",
            **fields,
        }

    def run(self, token: str, **fields: str) -> ExchangeResult:
        """One exchange, run to completion: these tests are synchronous, the exchange is a coroutine."""
        return asyncio.run(self.exchange.exchange(self.form(token, **fields)))

    def verify(self, credential: str, audience: str = "https://reports.local") -> dict[str, Any]:
        header = jwt.get_unverified_header(credential)
        key = jwt.PyJWKSet.from_json(self.keys.published_jwks())[header["kid"]]
        claims: dict[str, Any] = jwt.decode(
            credential, key, algorithms=["ES256"], audience=audience, issuer=CREDENTIAL_ISSUER
        )
        return claims


@pytest.fixture
def setup(gitlab: FakeGitLab, tmp_path: Path) -> Setup:
    return Setup(gitlab, tmp_path)


def metric(result: str) -> float:
    return REGISTRY.get_sample_value("controlplane_credential_exchanges_total", {"result": result}) or 0.0


# --- exchange: granted -----------------------------------------------------------------------------------------


def test_a_fake_gitlab_token_is_exchanged_for_a_scoped_credential(setup: Setup) -> None:
    subject_token = setup.mint(ttl=3000)
    before = metric("granted")
    result = setup.run(subject_token)
    assert result.status == 200, result.body
    assert result.granted and metric("granted") == before + 1
    body = result.body
    assert body["issued_token_type"] == TOKEN_TYPE_JWT and body["token_type"] == "Bearer"
    assert body["scope"] == "reports-read" and body["expires_in"] == 1200  # the longer of two granting bindings
    claims = setup.verify(body["access_token"])
    subject_claims = decode_unverified(subject_token)
    now = int(setup.clock.now)
    assert claims["iat"] == claims["nbf"] == now and claims["exp"] == now + 1200
    assert claims["sub"] == subject_claims["sub"]
    assert claims["act"] == {"sub": subject_claims["sub"], "iss": setup.fake.issuer}
    assert claims["roles"] == ["reports-read"] and claims["scope"] == "reports-read"
    for name in ("job_id", "pipeline_id", "project_id", "project_path", "namespace_id", "ref", "ref_type"):
        assert claims[name] == subject_claims[name]
    assert claims["ref_protected"] == "true" and claims["user_login"] == "ci-user"
    assert "environment" not in claims
    assert claims["jti"] == result.jti != subject_claims["jti"]
    assert jwt.get_unverified_header(body["access_token"])["kid"] == setup.keys.signing_key().kid
    assert (result.backend, result.project_id, result.job_id, result.roles) == (
        "reports-api",
        "42",
        "5001",
        ("reports-read",),
    )


def test_ttl_is_capped_by_the_signing_keys_max_credential_ttl(gitlab: FakeGitLab, tmp_path: Path) -> None:
    setup = Setup(gitlab, tmp_path, max_credential_ttl=900)
    body = setup.run(setup.mint(ttl=3000)).body
    claims = setup.verify(body["access_token"])
    assert body["expires_in"] == 900 == claims["exp"] - claims["iat"]  # max_credential_ttl 900 < binding 1200


@pytest.mark.parametrize(
    ("mint", "fields", "expected"),
    [
        ({"ref": "release/1", "ttl": 3000}, {"scope": "reports-read"}, 600),  # only "readers" grants: 600
        ({"ref": "release/1", "ttl": 3000}, {"scope": "reports-read", "requested_token_lifetime": "120"}, 120),
        ({"ref": "release/1", "ttl": 200}, {"scope": "reports-read"}, 200),  # subject token's remaining life
        ({"ref": "release/1", "ttl": 3000}, {}, 300),  # two roles: the shorter-lived one bounds the credential
        ({"ref": "release/1", "ttl": 3000}, {"expires_in": "30"}, 30),
    ],
)
def test_ttl_is_the_minimum_of_policy_request_and_subject_life(
    setup: Setup, mint: dict[str, Any], fields: dict[str, str], expected: int
) -> None:
    result = setup.run(setup.mint(**mint), **fields)
    assert result.status == 200, result.body
    assert result.body["expires_in"] == expected
    claims = setup.verify(result.body["access_token"])
    assert claims["exp"] - claims["iat"] == expected


def test_default_scope_is_every_granted_role_and_a_subset_can_be_asked(setup: Setup) -> None:
    token = setup.mint(ref="release/1")
    assert setup.run(token).body["scope"] == "reports-read reports-write"
    narrowed = setup.run(token, scope="reports-write")
    assert setup.verify(narrowed.body["access_token"])["roles"] == ["reports-write"]


def test_the_backend_may_be_named_by_audience_or_resource(setup: Setup) -> None:
    token = setup.mint()
    by_uri = asyncio.run(
        setup.exchange.exchange(
            {**setup.form(token, subject_token_type=TOKEN_TYPE_ID_TOKEN), "audience": "https://reports.local"}
        )
    )
    assert by_uri.status == 200, by_uri.body
    both = setup.run(token, resource="https://reports.local")
    assert both.status == 200, both.body


def test_environment_is_carried_when_the_job_has_one(setup: Setup) -> None:
    result = setup.run(setup.mint(environment="production", environment_protected=True))
    assert setup.verify(result.body["access_token"])["environment"] == "production"


# --- exchange: refusals ----------------------------------------------------------------------------------------


def assert_refused(result: ExchangeResult, error: str, token: str, label: str | None = None) -> None:
    assert result.status == 400, result.body
    assert result.body["error"] == error and result.result == (label or error)
    assert set(result.body) == {"error", "error_description"}
    for part in filter(None, token.split(".")):
        assert part not in json.dumps(result.body)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"grant_type": ""}, "invalid_request"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({"subject_token_type": ""}, "invalid_request"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "invalid_request"),
        ({"audience": ""}, "invalid_request"),
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"}, "invalid_request"),
        ({"actor_token": "x", "actor_token_type": TOKEN_TYPE_JWT}, "invalid_request"),
        ({"requested_token_lifetime": "0"}, "invalid_request"),
        ({"requested_token_lifetime": "-5"}, "invalid_request"),
        ({"expires_in": "1e3"}, "invalid_request"),
        ({"requested_token_lifetime": "5\n"}, "invalid_request"),  # `$` matched before a final newline
        ({"requested_token_lifetime": "\u0665"}, "invalid_request"),  # an Arabic-Indic 5: not ASCII digits
    ],
)
def test_malformed_requests_are_invalid_request(setup: Setup, fields: dict[str, str], error: str) -> None:
    token = setup.mint()
    before = metric("invalid_request")
    assert_refused(setup.run(token, **fields), error, token, "invalid_request")
    assert metric("invalid_request") == before + 1


def test_a_missing_subject_token_is_invalid_request(setup: Setup) -> None:
    assert setup.run("").body["error"] == "invalid_request"


def invalid_subject_tokens(setup: Setup) -> dict[str, str]:
    fake = setup.fake
    now = int(setup.clock.now)
    return {
        "not a JWT": "not-a-token",
        "unpublished key": setup.mint(key=fake.rogue),
        "right kid, wrong key": setup.mint(key=fake.rogue, kid=fake.signing_key.kid),
        "expired": setup.mint(iat=now - 400, ttl=300),
        "not valid yet": setup.mint(nbf=now + 120),
        "another audience": setup.mint(aud="https://elsewhere.example"),
        "unknown issuer": setup.mint(raw={"iss": "https://gitlab.evil.example"}),
        "no jti": setup.mint(raw={"jti": OMIT}),
        "no exp": setup.mint(raw={"exp": OMIT}),
        "exp not a number": setup.mint(raw={"exp": str(now + 300)}),
        "HS256": jwt.encode({"iss": fake.issuer, "aud": "https://reports.local", "exp": now + 60}, "k" * 32),
        "unsigned": jwt.encode({"iss": fake.issuer}, "", algorithm="none"),
        # Found by fuzzing: an unhashable alg raised TypeError (a 500 for anyone), an infinite exp OverflowError.
        "alg is a list": _with_header(setup.mint(), {"alg": ["RS256"], "typ": "JWT"}),
        "alg is an object": _with_header(setup.mint(), {"alg": {}, "typ": "JWT"}),
        "exp is infinite": setup.mint(raw={"exp": float("inf")}),
        "nbf is null": setup.mint(raw={"nbf": None}),
    }


def _with_header(token: str, header: dict[str, Any]) -> str:
    """The token with another header (so a wrong signature): what a forger can send without any key."""
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return ".".join([encoded, *token.split(".")[1:]])


def test_bad_expired_or_forged_subject_tokens_are_invalid_grant(setup: Setup) -> None:
    for label, token in invalid_subject_tokens(setup).items():
        result = setup.run(token)
        assert result.body["error"] == "invalid_grant", (label, result.body)
        assert_refused(result, "invalid_grant", token)


def test_clock_skew_is_the_issuers(setup: Setup) -> None:
    now = int(setup.clock.now)
    within = setup.mint(iat=now - 300, ttl=290, nbf=now + 20)  # expired 10 s ago, valid in 20 s: skew 30 s
    result = setup.run(within)
    assert result.body["error"] == "invalid_grant"  # valid, but no life left to give a credential
    assert "expired" in result.body["error_description"]
    early = setup.mint(nbf=now + 20, ttl=300)
    assert setup.run(early).status == 200


def test_unknown_or_ambiguous_targets_are_invalid_target(setup: Setup) -> None:
    token = setup.mint()
    assert_refused(setup.run(token, audience="billing"), "invalid_target", token)
    assert_refused(setup.run(token, audience="https://nowhere"), "invalid_target", token)
    assert_refused(setup.run(token, resource="deploy-api"), "invalid_target", token)  # two different backends
    echoed = setup.run(token, audience=token)  # a token put in the wrong field is not echoed
    assert_refused(echoed, "invalid_target", token)


def test_a_subject_token_is_exchanged_only_for_the_backend_its_audience_names(setup: Setup) -> None:
    """Envoy refuses a token on a backend whose audience it does not carry; so must the exchange (issue 10 #5)."""
    minted_for_deploy = setup.mint(aud="https://deploy.local")  # the readers binding grants it reports-read
    refused = setup.run(minted_for_deploy, audience="reports-api")
    assert_refused(refused, "invalid_grant", minted_for_deploy)
    assert "audience" in refused.body["error_description"]
    assert_refused(setup.run(minted_for_deploy, resource="https://reports.local"), "invalid_grant", minted_for_deploy)
    several = setup.mint(aud=["https://deploy.local", "https://reports.local"])  # GitLab allows a list
    assert setup.run(several, audience="reports-api").status == 200


def test_roles_not_granted_are_invalid_scope(setup: Setup) -> None:
    token = setup.mint(ref="main")
    assert_refused(setup.run(token, scope="reports-write"), "invalid_scope", token)  # needs release/*
    assert_refused(setup.run(token, scope="reports-read deploy-trigger"), "invalid_scope", token)  # other backend
    assert_refused(setup.run(token, scope="no-such-role"), "invalid_scope", token)
    for_deploy = setup.mint(ref="main", aud="https://deploy.local")
    shadow = setup.run(for_deploy, audience="deploy-api")  # only a shadow binding: nothing is granted
    assert_refused(shadow, "invalid_scope", for_deploy)
    assert "'reports-write'" in setup.run(token, scope="reports-write").body["error_description"]


def test_claims_are_compared_as_strings(setup: Setup) -> None:
    token = setup.mint(raw={"project_id": 42, "namespace_id": 11})  # numbers: no binding matches, as in Envoy
    assert_refused(setup.run(token), "invalid_scope", token)


def test_a_subject_token_is_exchanged_a_bounded_number_of_times(setup: Setup) -> None:
    token = setup.mint(ttl=300)
    assert [setup.run(token).status for _ in range(3)] == [200, 200, 200]
    before = metric("replayed")
    replay = setup.run(token)
    assert_refused(replay, "invalid_grant", token, label="replayed")
    assert metric("replayed") == before + 1
    refused_first = setup.mint(ttl=300)
    assert setup.run(refused_first, scope="reports-write").status == 400  # refusals use nothing up
    assert [setup.run(refused_first).status for _ in range(3)] == [200, 200, 200]


def test_replay_records_are_dropped_once_the_subject_token_expired(gitlab: FakeGitLab, tmp_path: Path) -> None:
    setup = Setup(gitlab, tmp_path, max_uses_per_subject=1, max_tracked_subjects=2)
    first, second = setup.mint(ttl=100), setup.mint(ttl=100)
    assert setup.run(first).status == setup.run(second).status == 200
    full = setup.run(setup.mint(ttl=100))
    assert (full.status, full.body["error"]) == (503, "temporarily_unavailable")  # full: fail closed
    setup.clock.now += 131  # past exp + clock skew: both records are forgotten
    assert setup.run(setup.mint(ttl=100)).status == 200


def test_no_policy_yet_is_temporarily_unavailable(setup: Setup) -> None:
    setup.policy = None
    result = setup.run(setup.mint())
    assert (result.status, result.body["error"], result.result) == (503, "temporarily_unavailable", "unavailable")


def test_issued_credentials_are_indexed_by_job_until_they_expire(setup: Setup) -> None:
    token = setup.mint(job_id=7001, ttl=3000)
    first = setup.run(token, requested_token_lifetime="100")
    second = setup.run(token, requested_token_lifetime="200")
    setup.run(setup.mint(job_id=7002))
    now = setup.clock.now
    assert setup.exchange.credentials_of("7001") == [(first.jti, now + 100), (second.jti, now + 200)]
    assert asyncio.run(setup.exchange.latest_expiry("7001")) == now + 200
    assert REGISTRY.get_sample_value("controlplane_credentials_active") == setup.exchange.active_credentials() == 3
    setup.clock.now += 150
    assert setup.exchange.credentials_of("7001") == [(second.jti, now + 200)]
    setup.clock.now += 10_000
    assert setup.exchange.credentials_of("7001") == [] and asyncio.run(setup.exchange.latest_expiry("7001")) is None
    assert setup.exchange.active_credentials() == 0


# --- signing keys ----------------------------------------------------------------------------------------------


def signing_keys(path: Path, clock: Clock) -> SigningKeys:
    return SigningKeys(FileKeyStore(path), rotate_every=100, max_credential_ttl=30, publish_lead=10, clock=clock)


def published_kids(keys: SigningKeys) -> list[str]:
    return [k["kid"] for k in json.loads(keys.published_jwks())["keys"]]


def test_first_start_creates_a_key_persisted_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.json"
    keys = signing_keys(path, Clock(1000))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (stored,) = FileKeyStore(path).load()
    assert keys.signing_key().kid == stored.kid and stored.not_before == 1000 and stored.retire_after is None
    assert stored.private_pem not in repr(stored)
    assert [p.name for p in path.parent.iterdir()] == ["keys.json"]  # no temporary file left behind
    again = signing_keys(path, Clock(1050))
    assert again.signing_key().kid == stored.kid and FileKeyStore(path).load() == [stored]


def test_the_published_jwks_is_canonical_public_and_its_kid_a_thumbprint(tmp_path: Path) -> None:
    clock = Clock(0)
    keys = signing_keys(tmp_path / "keys.json", clock)
    clock.now = 95
    keys.rotate_if_due()
    text = keys.published_jwks()
    assert normalize_jwks(text)[0].canonical == text
    document = json.loads(text)
    assert [k["kid"] for k in document["keys"]] == sorted(k.kid for k in keys.keys)
    for key in document["keys"]:
        assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}  # no "d"
        assert key["kid"] == thumbprint(key)
    token = jwt.encode({"a": 1}, keys.signing_key().private_key, algorithm="ES256")
    assert jwt.decode(token, jwt.PyJWKSet.from_json(text)[keys.signing_key().kid], algorithms=["ES256"]) == {"a": 1}


def test_rotation_timeline(tmp_path: Path) -> None:
    clock = Clock(0)
    keys = signing_keys(tmp_path / "keys.json", clock)
    first = keys.signing_key().kid
    assert keys.next_change_at() == 90  # rotate_every 100 - publish_lead 10
    clock.now = 89
    assert not keys.rotate_if_due()
    clock.now = 90
    assert keys.rotate_if_due() and not keys.rotate_if_due()
    second = keys.keys[-1].kid
    assert sorted(published_kids(keys)) == sorted([first, second])  # published before it signs
    assert keys.signing_key().kid == first and keys.next_change_at() == 100
    clock.now = 100
    assert keys.signing_key().kid == second
    assert keys.next_change_at() == 130  # the last credential of `first` expires at 100 + 30
    clock.now = 129.9
    assert not keys.rotate_if_due() and first in published_kids(keys)
    clock.now = 130
    assert keys.rotate_if_due() and published_kids(keys) == [second]
    assert keys.next_change_at() == 190
    assert [k.kid for k in signing_keys(tmp_path / "keys.json", clock).keys] == [second]  # persisted


def test_after_a_long_downtime_the_next_key_still_gets_its_publish_lead(tmp_path: Path) -> None:
    clock = Clock(0)
    keys = signing_keys(tmp_path / "keys.json", clock)
    first = keys.signing_key().kid
    clock.now = 500
    restarted = signing_keys(tmp_path / "keys.json", clock)  # rotates on start
    assert len(restarted.keys) == 2 and restarted.keys[-1].not_before == 510
    assert restarted.signing_key().kid == first


def test_no_credential_is_ever_signed_by_a_key_envoy_does_not_hold(tmp_path: Path) -> None:
    """A simulated fleet: Envoy holds the JWKS of one tick ago; every credential must verify until it expires."""
    clock = Clock(0)
    keys = signing_keys(tmp_path / "keys.json", clock)
    envoy_holds = set(published_kids(keys))
    live: list[tuple[str, float]] = []  # (kid, exp)
    rotations = 0
    for tick in range(1, 1000):
        clock.now = tick
        if clock.now >= keys.next_change_at():
            rotations += keys.rotate_if_due()
        # a credential issued now, with the longest life, by the current signing key
        live.append((keys.signing_key().kid, clock.now + 30))
        live = [(kid, exp) for kid, exp in live if exp >= clock.now]
        assert all(kid in envoy_holds for kid, _ in live), tick
        assert len(keys.keys) <= 3
        envoy_holds = set(published_kids(keys))  # the push reaches Envoy within one tick (< publish_lead)
    assert rotations >= 15


def test_a_corrupt_key_store_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(KeyStoreError):
        signing_keys(path, Clock(0))
    path.write_text('{"keys": [{"kid": "x"}]}')
    with pytest.raises(KeyStoreError, match=r"keys\.json: .*malformed"):
        signing_keys(path, Clock(0))


@pytest.mark.parametrize("cut", [0, 1, 40, -2])
def test_a_truncated_or_unusable_key_store_stops_the_start_naming_the_file(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "signing-keys.json"
    signing_keys(path, Clock(0))
    whole = path.read_text()
    path.write_text(whole[:cut])
    with pytest.raises(StateFileError, match=r"signing-keys\.json"):
        signing_keys(path, Clock(0))
    document = json.loads(whole)
    document["keys"][0]["private_pem"] = "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    path.write_text(json.dumps(document))
    with pytest.raises(StateFileError, match=r"signing-keys\.json: .*private key"):
        signing_keys(path, Clock(0))


@pytest.mark.parametrize("document", ["null", "[]"])
def test_a_key_store_that_is_not_an_object_is_refused_not_replaced_by_a_new_key(tmp_path: Path, document: str) -> None:
    """`null` used to read as "no keys yet": a new key was generated and the file overwritten."""
    path = tmp_path / "signing-keys.json"
    path.write_text(document)
    with pytest.raises(StateFileError, match=r"signing-keys\.json: malformed"):
        signing_keys(path, Clock(0))
    assert path.read_text() == document


def test_a_key_store_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    signing_keys(real, Clock(0))
    path = tmp_path / "signing-keys.json"
    path.symlink_to(real)
    with pytest.raises(StateFileError, match=r"signing-keys\.json: is a symbolic link"):
        signing_keys(path, Clock(0))


def test_a_key_that_cannot_be_persisted_is_reported_and_still_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(0)
    path = tmp_path / "signing-keys.json"
    keys = signing_keys(path, clock)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "replace", full)
    clock.now = 90
    assert keys.rotate_if_due()  # the successor is published although the disk refused it
    assert len(keys.keys) == 2 and "signing-keys.json" in caplog.text
    monkeypatch.undo()
    clock.now = 91
    keys.rotate_if_due()  # nothing due, but the last write failed: retried
    assert [k.kid for k in FileKeyStore(path).load()] == [k.kid for k in keys.keys]


def test_a_store_is_any_object_with_load_and_save(tmp_path: Path) -> None:
    class MemoryStore:
        def __init__(self) -> None:
            self.saved: list[StoredKey] = []

        def load(self) -> list[StoredKey]:
            return list(self.saved)

        def save(self, keys: Any) -> None:
            self.saved = list(keys)

    store = MemoryStore()
    keys = SigningKeys(store, rotate_every=100, max_credential_ttl=30, publish_lead=10, clock=Clock(0))
    assert [k.kid for k in store.saved] == [keys.signing_key().kid]


def test_key_metrics(tmp_path: Path) -> None:
    clock = Clock(0)
    keys = signing_keys(tmp_path / "keys.json", clock)
    clock.now = 95
    keys.rotate_if_due()
    assert REGISTRY.get_sample_value("controlplane_signing_keys_published") == 2
    assert REGISTRY.get_sample_value("controlplane_signing_key_age_seconds") == 95


# --- HTTP ------------------------------------------------------------------------------------------------------


@pytest.fixture
async def endpoint(setup: Setup) -> AsyncIterator[tuple[str, Setup]]:
    server = ExchangeEndpoint(setup.exchange, max_body=8192)
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}{EXCHANGE_PATH}", setup
    finally:
        await server.stop()


async def post(url: str, **kwargs: Any) -> tuple[int, Mapping[str, str], dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, **kwargs) as response,
    ):
        return response.status, response.headers, await response.json(content_type=None)


async def test_the_endpoint_grants_and_refuses_without_caching_or_logging_tokens(
    endpoint: tuple[str, Setup], caplog: pytest.LogCaptureFixture
) -> None:
    url, setup = endpoint
    token = setup.mint()
    with caplog.at_level(logging.DEBUG):
        status, headers, body = await post(url, data=setup.form(token))
        assert status == 200, body
        assert headers["Cache-Control"] == "no-store" and headers["Content-Type"].startswith("application/json")
        credential = body["access_token"]
        assert setup.verify(credential)["job_id"] == "5001"
        status, headers, body = await post(url, data=setup.form(token, scope="reports-write"))
        assert (status, body["error"], headers["Cache-Control"]) == (400, "invalid_scope", "no-store")
    assert "granted" in caplog.text and "reports-api" in caplog.text and "invalid_scope" in caplog.text
    for secret in (token, credential, *token.split("."), *credential.split(".")):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"json": {"grant_type": GRANT_TYPE}}, 400),  # not form-encoded
        ({"data": "grant_type=a&grant_type=b", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
        ({"data": {"x": "y" * 9000}}, 413),
        ({"data": b"\xff\xfe=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ],
)
async def test_the_endpoint_refuses_unusable_requests(
    endpoint: tuple[str, Setup], request_kwargs: dict[str, Any], status: int
) -> None:
    url, _ = endpoint
    got, headers, body = await post(url, **request_kwargs)
    assert (got, body["error"], headers["Cache-Control"]) == (status, "invalid_request", "no-store")


async def test_parameters_in_the_url_are_refused(endpoint: tuple[str, Setup]) -> None:
    url, setup = endpoint
    token = setup.mint()
    status, _, body = await post(url + "?subject_token=" + token, data=setup.form(token))
    assert (status, body["error"]) == (400, "invalid_request")


async def test_only_post_is_served(endpoint: tuple[str, Setup]) -> None:
    url, _ = endpoint
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 405
