"""Who a token belongs to: resolved subjects encoded as RBAC principals on jwt_authn claims.

Pure encoding of `controlplane.resolved.conditions`, which says what they mean. Every claim is matched as a
string (GitLab sends `"42"` and `"true"`; a string matcher never matches a number or a bool,
docs/envoy-filters.md#claims-are-compared-as-strings). Globs compile to anchored RE2 where `*` never crosses `/`.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.rbac.v3 import rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2

from controlplane.compiler import wire
from controlplane.compiler.names import JWT_FILTER, PAYLOAD_KEY
from controlplane.compiler.util import serialized
from controlplane.resolved.conditions import Condition, ResolvedSubject, glob_to_regex, is_glob


def string_matcher(value: str) -> string_pb2.StringMatcher:
    if is_glob(value):
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=glob_to_regex(value)))
    return string_pb2.StringMatcher(exact=value)


def _claim_value_matcher(value: str, listy: bool) -> value_pb2.ValueMatcher:
    single = value_pb2.ValueMatcher(string_match=string_matcher(value))
    if not listy:
        return single
    # OIDC claims such as `groups` may be a list or a string; one_of matches a list element.
    in_list = value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=single))
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=[single, in_list]))


def claim_principal(claim: str, value: str, listy: bool = False) -> rbac_pb2.Principal:
    """The claim equals `value` (or, `listy`, is a list holding it); uncached, for one-off lists."""
    return _claim_principal(claim, _claim_value_matcher(value, listy))


def claim_string_principal(claim: str, matcher: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    """The claim is a string `matcher` matches (the revocation buckets' regex)."""
    return _claim_principal(claim, value_pb2.ValueMatcher(string_match=matcher))


def _claim_principal(claim: str, value: value_pb2.ValueMatcher) -> rbac_pb2.Principal:
    matcher = metadata_pb2.MetadataMatcher(
        filter=JWT_FILTER,
        path=[
            metadata_pb2.MetadataMatcher.PathSegment(key=PAYLOAD_KEY),
            metadata_pb2.MetadataMatcher.PathSegment(key=claim),
        ],
        value=value,
    )
    return rbac_pb2.Principal(sourced_metadata=rbac_pb2.SourcedMetadata(metadata_matcher=matcher))


def _any_of(principals: Sequence[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    if len(principals) == 1:
        return principals[0]
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=principals))


def condition_principal(condition: Condition) -> rbac_pb2.Principal:
    matched = _any_of([claim_principal(condition.claim, v, condition.listy) for v in condition.values])
    return rbac_pb2.Principal(not_id=matched) if condition.negated else matched


class PrincipalEncoder:
    """Subjects as serialized RBAC principals, assembled from each condition's cached, already framed bytes
    (see wire.py): the same few conditions (issuer, protected ref, no MR pipelines) recur in every binding.

    Principal{and_ids: [conditions..., Principal{or_ids: [Principal{and_ids: alternative}...]}]}.
    """

    LIMIT = 65536
    """Conditions kept: past this many (a policy that changed a lot), the cache starts again at a compile."""

    def __init__(self) -> None:
        self._framed: dict[Condition, bytes] = {}

    def next_generation(self) -> None:
        if len(self._framed) > self.LIMIT:
            self._framed = {}

    def principal(self, subject: ResolvedSubject) -> bytes:
        ids = self._joined(subject.conditions)
        if subject.alternatives:
            ands = (wire.length_delimited(_AND_IDS, self._joined(alt)) for alt in subject.alternatives)
            any_of = b"".join(wire.length_delimited(_SET_IDS, principal) for principal in ands)
            ids += wire.length_delimited(_SET_IDS, wire.length_delimited(_OR_IDS, any_of))
        return wire.length_delimited(_AND_IDS, ids)

    def _joined(self, conditions: Sequence[Condition]) -> bytes:
        """Hot: when every condition is known, the lookups and the join run without a Python call each."""
        try:
            return b"".join(map(self._framed.__getitem__, conditions))
        except KeyError:
            return b"".join(map(self._frame, conditions))

    def _frame(self, condition: Condition) -> bytes:
        """The condition as one `ids` entry of a Principal.Set."""
        framed = self._framed.get(condition)
        if framed is None:
            framed = self._framed[condition] = _framed_condition(condition)
        return framed


def _framed_condition(condition: Condition) -> bytes:
    return wire.length_delimited(_SET_IDS, serialized(condition_principal(condition)))


_AND_IDS = wire.number(rbac_pb2.Principal, "and_ids")
_OR_IDS = wire.number(rbac_pb2.Principal, "or_ids")
_SET_IDS = wire.number(rbac_pb2.Principal.Set, "ids")


def condition_metadata_matcher(condition: Condition) -> metadata_pb2.MetadataMatcher:
    """The condition as one RouteMatch `dynamic_metadata` entry (routes ANDing them choose a binding's AWS role,
    compiler/aws.py): the same claim matching as `condition_principal`, several values as `or_match`, a negated
    condition `invert`ed (true when the claim is absent, as RBAC's `not_id`)."""
    values = [_claim_value_matcher(v, condition.listy) for v in condition.values]
    value = (
        values[0] if len(values) == 1 else value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=values))
    )
    return metadata_pb2.MetadataMatcher(
        filter=JWT_FILTER,
        path=[
            metadata_pb2.MetadataMatcher.PathSegment(key=PAYLOAD_KEY),
            metadata_pb2.MetadataMatcher.PathSegment(key=condition.claim),
        ],
        value=value,
        invert=condition.negated,
    )
