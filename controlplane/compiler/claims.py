"""Who a token belongs to: binding subjects compiled to RBAC principals on jwt_authn claims.

Every claim is matched as a string (GitLab sends `"42"` and `"true"`; a string matcher never matches a
number or a bool, envoy-1.40-verified.md G10). Globs compile to anchored RE2 where `*` never crosses `/`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

from envoy.config.rbac.v3 import rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2

from controlplane.compiler import wire
from controlplane.compiler.names import JWT_FILTER, PAYLOAD_KEY
from controlplane.compiler.util import serialized


def is_glob(value: str) -> bool:
    return "*" in value or "?" in value


def glob_to_regex(glob: str) -> str:
    """`*` is any run of characters except `/`, `?` one such character; everything else is literal."""
    parts = []
    for char in glob:
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(char))
    return "^" + "".join(parts) + "$"


def string_matcher(value: str) -> string_pb2.StringMatcher:
    if is_glob(value):
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=glob_to_regex(value)))
    return string_pb2.StringMatcher(exact=value)


class Condition(NamedTuple):
    """claim ∈ values, or (negated) claim ∉ values. `listy` claims may be a string or a list of strings.

    A NamedTuple, not a dataclass: tens of thousands are made and hashed per compile of a large policy.
    """

    claim: str
    values: tuple[str, ...]
    negated: bool = False
    listy: bool = False


class ResolvedSubject(NamedTuple):
    """A subject after paths became ids, with its RBAC principal already encoded (see wire.py)."""

    conditions: tuple[Condition, ...]
    principal: bytes

    alternatives: tuple[tuple[Condition, ...], ...] = ()

    @classmethod
    def of(cls, conditions: Sequence[Condition], alternatives: Sequence[Sequence[Condition]] = ()) -> ResolvedSubject:
        """All `conditions`, and (when given) any one of the `alternatives` (each an AND).

        Encoded once from each condition's cached, already framed bytes:
        Principal{and_ids: [conditions..., Principal{or_ids: [Principal{and_ids: alternative}...]}]}.
        """
        ids = b"".join(map(_framed_condition, conditions))
        if alternatives:
            ands = (wire.length_delimited(_AND_IDS, b"".join(map(_framed_condition, alt))) for alt in alternatives)
            any_of = b"".join(wire.length_delimited(_SET_IDS, principal) for principal in ands)
            ids += wire.length_delimited(_SET_IDS, wire.length_delimited(_OR_IDS, any_of))
        frozen = tuple(tuple(alt) for alt in alternatives)
        return cls(tuple(conditions), wire.length_delimited(_AND_IDS, ids), frozen)


def _claim_value_matcher(value: str, listy: bool) -> value_pb2.ValueMatcher:
    single = value_pb2.ValueMatcher(string_match=string_matcher(value))
    if not listy:
        return single
    # OIDC claims such as `groups` may be a list or a string; one_of matches a list element.
    in_list = value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=single))
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=[single, in_list]))


def claim_principal(claim: str, value: str, listy: bool = False) -> rbac_pb2.Principal:
    """The claim equals `value` (or, `listy`, is a list holding it); uncached, for one-off lists."""
    matcher = metadata_pb2.MetadataMatcher(
        filter=JWT_FILTER,
        path=[
            metadata_pb2.MetadataMatcher.PathSegment(key=PAYLOAD_KEY),
            metadata_pb2.MetadataMatcher.PathSegment(key=claim),
        ],
        value=_claim_value_matcher(value, listy),
    )
    return rbac_pb2.Principal(sourced_metadata=rbac_pb2.SourcedMetadata(metadata_matcher=matcher))


def _any_of(principals: Sequence[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    if len(principals) == 1:
        return principals[0]
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=principals))


@functools.lru_cache(maxsize=65536)
def condition_principal(condition: Condition) -> rbac_pb2.Principal:
    """Cached: the same few conditions (issuer, protected ref, no MR pipelines) recur in every binding.

    Callers must not mutate the result; protobuf copies it when it is placed into another message.
    """
    matched = _any_of([claim_principal(condition.claim, v, condition.listy) for v in condition.values])
    return rbac_pb2.Principal(not_id=matched) if condition.negated else matched


def subject_principal(subject: ResolvedSubject) -> rbac_pb2.Principal:
    return rbac_pb2.Principal.FromString(subject.principal)


_AND_IDS = wire.number(rbac_pb2.Principal, "and_ids")
_OR_IDS = wire.number(rbac_pb2.Principal, "or_ids")
_SET_IDS = wire.number(rbac_pb2.Principal.Set, "ids")


@functools.lru_cache(maxsize=65536)
def _framed_condition(condition: Condition) -> bytes:
    """The condition as one `ids` entry of a Principal.Set: the same few recur in every binding."""
    return wire.length_delimited(_SET_IDS, serialized(condition_principal(condition)))
