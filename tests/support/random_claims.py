"""Seeded random claims and conditions, and an independent reading of the RBAC principals the compiler emits
(Envoy's matcher semantics, on the principal bytes Envoy gets): the oracle a policy evaluation or a route choice
is checked against on random cases.

Shared by the evaluation's tests (tests/test_credentials.py) and the role-route attacks (tests/test_attack_roles.py);
it lives here because test modules do not import each other (tests/test_no_test_imports.py).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from envoy.config.rbac.v3 import rbac_pb2
from envoy.type.matcher.v3 import string_pb2, value_pb2

from controlplane.compiler.claims import PrincipalEncoder
from controlplane.resolved.conditions import Condition, ResolvedSubject

ISS = "https://gitlab.example.com"


def subject_principal(subject: ResolvedSubject) -> rbac_pb2.Principal:
    return rbac_pb2.Principal.FromString(PrincipalEncoder().principal(subject))


def rbac_allows(principal: rbac_pb2.Principal, claims: Mapping[str, Any]) -> bool:
    """An independent reading of the principals the compiler emits, with Envoy's matcher semantics."""
    kind = principal.WhichOneof("identifier")
    if kind == "and_ids":
        return all(rbac_allows(p, claims) for p in principal.and_ids.ids)
    if kind == "or_ids":
        return any(rbac_allows(p, claims) for p in principal.or_ids.ids)
    if kind == "not_id":
        return not rbac_allows(principal.not_id, claims)
    assert kind == "sourced_metadata", kind
    matcher = principal.sourced_metadata.metadata_matcher
    assert matcher.filter == "envoy.filters.http.jwt_authn"
    payload, claim = (segment.key for segment in matcher.path)
    assert payload == "jwt_payload"
    return claim in claims and value_matches(matcher.value, claims[claim])


def value_matches(matcher: value_pb2.ValueMatcher, value: object) -> bool:
    kind = matcher.WhichOneof("match_pattern")
    if kind == "string_match":
        return isinstance(value, str) and string_matches(matcher.string_match, value)
    if kind == "or_match":
        return any(value_matches(m, value) for m in matcher.or_match.value_matchers)
    assert kind == "list_match", kind
    return isinstance(value, list) and any(value_matches(matcher.list_match.one_of, v) for v in value)


def string_matches(matcher: string_pb2.StringMatcher, value: str) -> bool:
    if matcher.WhichOneof("match_pattern") == "exact":
        return bool(value == matcher.exact)
    return re.fullmatch(matcher.safe_regex.regex, value) is not None  # RE2 safe_regex is a full match


CLAIM_NAMES = ("iss", "project_id", "ref", "groups", "pipeline_source")
STRINGS = ("42", "43", "main", "release/1", "release/1/x", "merge_request_event", ISS, "a")
PATTERNS = (*STRINGS, "release/*", "*", "rel?ase/1", "4?")


def random_value(rng: random.Random) -> object:
    """A string, a number, a bool, null, or a list (of strings, or mixed)."""
    values: list[object] = [
        rng.choice(STRINGS),
        42,
        True,
        None,
        rng.sample(STRINGS, rng.randint(0, 3)),
        [rng.choice(STRINGS), 42],
    ]
    return rng.choice(values)


def random_conditions(rng: random.Random, count: int) -> tuple[Condition, ...]:
    return tuple(
        Condition(
            rng.choice(CLAIM_NAMES),
            tuple(rng.sample(PATTERNS, rng.randint(1, 2))),
            negated=rng.random() < 0.3,
            listy=rng.random() < 0.4,
        )
        for _ in range(count)
    )
