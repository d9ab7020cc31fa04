"""Who a token belongs to: binding subjects compiled to RBAC principals on jwt_authn claims.

Every claim is matched as a string (GitLab sends `"42"` and `"true"`; a string matcher never matches a
number or a bool, envoy-1.40-verified.md G10). Globs compile to anchored RE2 where `*` never crosses `/`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from envoy.config.rbac.v3 import rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2

from controlplane.compiler import wire
from controlplane.compiler.names import JWT_FILTER, PAYLOAD_KEY
from controlplane.compiler.util import serialized
from controlplane.model.errors import PolicyError
from controlplane.model.inventory import Inventory
from controlplane.model.policy import Issuer, IssuerKind, Subject

MERGE_REQUEST_SOURCE = "merge_request_event"


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

    @classmethod
    def of(cls, conditions: Sequence[Condition]) -> ResolvedSubject:
        """Principal{and_ids: {ids: [...]}} from each condition's cached, already framed bytes."""
        ids = b"".join(map(_framed_condition, conditions))
        return cls(tuple(conditions), wire.length_delimited(_AND_IDS, ids))


def _claim_value_matcher(value: str, listy: bool) -> value_pb2.ValueMatcher:
    single = value_pb2.ValueMatcher(string_match=string_matcher(value))
    if not listy:
        return single
    # OIDC claims such as `groups` may be a list or a string; one_of matches a list element.
    in_list = value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=single))
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=[single, in_list]))


def _claim_principal(claim: str, value: str, listy: bool) -> rbac_pb2.Principal:
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
    matched = _any_of([_claim_principal(condition.claim, v, condition.listy) for v in condition.values])
    return rbac_pb2.Principal(not_id=matched) if condition.negated else matched


def subject_principal(subject: ResolvedSubject) -> rbac_pb2.Principal:
    return rbac_pb2.Principal.FromString(subject.principal)


_AND_IDS = wire.number(rbac_pb2.Principal, "and_ids")
_SET_IDS = wire.number(rbac_pb2.Principal.Set, "ids")


@functools.lru_cache(maxsize=65536)
def _framed_condition(condition: Condition) -> bytes:
    """The condition as one `ids` entry of a Principal.Set: the same few recur in every binding."""
    return wire.length_delimited(_SET_IDS, serialized(condition_principal(condition)))


class Resolver:
    """Turns policy subjects into conditions: paths to ids through an issuer's inventory, plus the fixed rules."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        inventory = issuer.inventory or Inventory()
        self._projects = {p.path: p.id for p in inventory.projects}
        self._groups = {g.path: g.id for g in inventory.groups}
        self._inventory = inventory

    def resolve(self, subject: Subject, errors: list[PolicyError]) -> ResolvedSubject | None:
        conditions = [Condition("iss", (self.issuer.url,))]
        if self.issuer.kind is IssuerKind.GITLAB:
            pins = self._gitlab_pins(subject, errors)
            if pins is None:
                return None
            conditions.extend(pins)
        conditions.extend(
            Condition(m.claim, m.values, listy=self.issuer.kind is IssuerKind.OIDC) for m in subject.claims
        )
        if self.issuer.kind is IssuerKind.GITLAB and not any(m.claim == "pipeline_source" for m in subject.claims):
            # Fork merge-request pipelines carry the fork's project claims: denied unless asked for by name.
            conditions.append(Condition("pipeline_source", (MERGE_REQUEST_SOURCE,), negated=True))
        return ResolvedSubject.of(conditions)

    def _gitlab_pins(self, subject: Subject, errors: list[PolicyError]) -> list[Condition] | None:
        before = len(errors)
        if len(subject.projects) == 1 and isinstance(subject.projects[0], int):
            return [Condition("project_id", (str(subject.projects[0]),))]  # the common case, kept cheap
        if subject.projects:
            ids = [self._project_id(ref, subject, errors) for ref in subject.projects]
            condition = Condition("project_id", _sorted_ids(ids))
        elif subject.groups:
            groups = [self._group_ids(ref, subject, errors) for ref in subject.groups]
            condition = Condition("namespace_id", _sorted_ids(i for group in groups for i in group))
        else:
            errors.append(
                PolicyError.at(subject.source, "subject", "every GitLab subject must pin a project or a group")
            )
            return None
        return None if len(errors) > before else [condition]

    def _project_id(self, ref: int | str, subject: Subject, errors: list[PolicyError]) -> int:
        if isinstance(ref, int):
            return ref
        found = self._projects.get(ref)
        if found is None:
            errors.append(PolicyError.at(subject.source, "project", self._unknown("project", ref)))
            return -1
        return found

    def _group_ids(self, ref: int | str, subject: Subject, errors: list[PolicyError]) -> tuple[int, ...]:
        group_id = ref if isinstance(ref, int) else self._groups.get(ref)
        if group_id is None:
            errors.append(PolicyError.at(subject.source, "group", self._unknown("group", str(ref))))
            return ()
        if not subject.include_subgroups:
            return (group_id,)
        return self._inventory.group_and_descendant_ids(group_id)

    def _unknown(self, what: str, path: str) -> str:
        if self.issuer.inventory is None:
            return f"{what} path {path!r} needs an inventory on issuer {self.issuer.name!r} (or write the id)"
        return f"no {what} with path {path!r} in the inventory of issuer {self.issuer.name!r}"


def _sorted_ids(ids: Iterable[int]) -> tuple[str, ...]:
    return tuple(str(i) for i in sorted(set(ids)))
