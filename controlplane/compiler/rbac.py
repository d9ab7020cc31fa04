"""Authorization: bindings compiled to Envoy RBAC, one RBACPerRoute per backend's virtual host.

Deny by default is explicit everywhere: an RBAC filter without `rules`, or `RBACPerRoute{rbac: {}}`,
ALLOWS everything in Envoy (docs/envoy-filters.md#rbac-shapes-that-allow-everything); `rules{action: ALLOW}`
with no policies denies.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.rbac.v3 import rbac_pb2 as rbac_config
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2

from controlplane.compiler import wire
from controlplane.compiler.claims import PrincipalEncoder
from controlplane.compiler.names import EXCHANGED_POLICY_PREFIX, shadow_stat_prefix
from controlplane.compiler.util import serialized
from controlplane.model.policy import Mode, Role, RoleRule
from controlplane.resolved.access import Grant
from controlplane.resolved.conditions import Condition, ResolvedSubject


def deny_all_filter() -> rbac_filter.RBAC:
    """The HCM-level RBAC: anything no backend claims (unknown Host, no route) is denied."""
    return rbac_filter.RBAC(rules=rbac_config.RBAC(action=rbac_config.RBAC.ALLOW))


def exchanged_grants(credential_issuer: str, roles: Sequence[Role]) -> tuple[Grant, ...]:
    """One policy per role of a backend: its rules, to a credential of the control plane listing the role.

    `iss` is pinned like every principal's, so an OIDC token with its own `roles` claim never qualifies. The
    claim is a list (a credential may carry several roles); `listy` also accepts a lone string. Named
    `exchanged/<role>`: a Binding named like the prefix would collide, so that name is reserved whenever
    credentials are enabled.
    """
    issued = Condition("iss", (credential_issuer,))
    return tuple(
        Grant(
            EXCHANGED_POLICY_PREFIX,
            role.name,
            Mode.ENFORCE,
            role.rules,
            (ResolvedSubject.of([issued, Condition("roles", (role.name,), listy=True)]),),
        )
        for role in roles
    )


class RbacEncoder:
    """Grants as serialized RBACPerRoute, assembled from cached pieces (see wire.py): the caches are this
    object's, held by the caller's CompilerMemo from one compile to the next."""

    LIMIT = 16384
    """Role rules kept: past this many, the cache starts again at a compile."""

    def __init__(self) -> None:
        self.principals = PrincipalEncoder()
        self._rules: dict[RoleRule, bytes] = {}

    def next_generation(self) -> None:
        self.principals.next_generation()
        if len(self._rules) > self.LIMIT:
            self._rules = {}

    def backend_rbac(self, backend: str, grants: Sequence[Grant]) -> rbac_filter.RBACPerRoute:
        return rbac_filter.RBACPerRoute.FromString(self.backend_rbac_bytes(backend, grants))

    def backend_rbac_bytes(self, backend: str, grants: Sequence[Grant]) -> bytes:
        """Serialized RBACPerRoute: ALLOW with the enforced policies (none = deny all), plus shadow rules.

        ALLOW is the enum's zero value, so `rules` is an explicitly present but empty-looking message when
        nothing is granted, which Envoy reads as deny all.
        """
        # A grant whose subjects all lost access (GitLab withdrew them) has no principal left: it grants nothing,
        # and Envoy rejects a policy without principals, so it is left out rather than emitted empty.
        live = [g for g in grants if g.subjects]
        enforced = sorted((g for g in live if g.mode is Mode.ENFORCE), key=lambda g: g.name)
        shadow = sorted((g for g in live if g.mode is Mode.SHADOW), key=lambda g: g.name)
        rbac = wire.length_delimited(_RULES, self._allow_policies(enforced))
        if shadow:
            rbac += wire.length_delimited(_SHADOW_RULES, self._allow_policies(shadow))
            rbac += wire.length_delimited(_SHADOW_PREFIX, shadow_stat_prefix(backend).encode())
        return wire.length_delimited(_PER_ROUTE_RBAC, rbac)

    def _allow_policies(self, grants: Sequence[Grant]) -> bytes:
        return b"".join(wire.map_entry(_POLICIES, g.name, self._policy_bytes(g)) for g in grants)

    def _policy_bytes(self, grant: Grant) -> bytes:
        permissions = b"".join(map(self._rule, grant.rules))
        principal = self.principals.principal
        return permissions + b"".join(wire.length_delimited(_PRINCIPALS, principal(s)) for s in grant.subjects)

    def _rule(self, rule: RoleRule) -> bytes:
        framed = self._rules.get(rule)
        if framed is None:
            framed = self._rules[rule] = _framed_rule(rule)
        return framed


_PER_ROUTE_RBAC = wire.number(rbac_filter.RBACPerRoute, "rbac")
_RULES = wire.number(rbac_filter.RBAC, "rules")
_SHADOW_RULES = wire.number(rbac_filter.RBAC, "shadow_rules")
_SHADOW_PREFIX = wire.number(rbac_filter.RBAC, "shadow_rules_stat_prefix")
_POLICIES = wire.number(rbac_config.RBAC, "policies")
_PERMISSIONS = wire.number(rbac_config.Policy, "permissions")
_PRINCIPALS = wire.number(rbac_config.Policy, "principals")
assert rbac_config.RBAC.ALLOW == 0, "ALLOW must be the default action for the encoding above"


def _framed_rule(rule: RoleRule) -> bytes:
    return wire.length_delimited(_PERMISSIONS, serialized(_rule_permission(rule)))


def rbac_disabled() -> rbac_filter.RBACPerRoute:
    """Only for routes that take no token (public paths, token exchange): RBACPerRoute without `rbac` turns
    an RBAC instance off there."""
    return rbac_filter.RBACPerRoute()


def _rule_permission(rule: RoleRule) -> rbac_config.Permission:
    parts = []
    if rule.methods:
        parts.append(_any_permission([_method(m) for m in rule.methods]))
    if rule.paths:
        parts.append(_any_permission([_path(p) for p in rule.paths]))
    if not parts:
        return rbac_config.Permission(any=True)
    if len(parts) == 1:
        return parts[0]
    return rbac_config.Permission(and_rules=rbac_config.Permission.Set(rules=parts))


def _any_permission(permissions: list[rbac_config.Permission]) -> rbac_config.Permission:
    if len(permissions) == 1:
        return permissions[0]
    return rbac_config.Permission(or_rules=rbac_config.Permission.Set(rules=permissions))


def _method(method: str) -> rbac_config.Permission:
    return rbac_config.Permission(
        header=route_components_pb2.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact=method))
    )


def _path(pattern: str) -> rbac_config.Permission:
    """Matched on the path without its query (`url_path`), after the HCM has normalized it."""
    return rbac_config.Permission(url_path=path_pb2.PathMatcher(path=path_string_matcher(pattern)))


def path_string_matcher(pattern: str) -> string_pb2.StringMatcher:
    """`/a/b` exact; `*` within one segment; a trailing `/**` is the path itself and anything below it."""
    any_depth = pattern.endswith("/**")
    stem = pattern[: -len("/**")] if any_depth else pattern
    if "*" not in stem:
        if not any_depth:
            return string_pb2.StringMatcher(exact=stem)
        if not stem:
            return string_pb2.StringMatcher(prefix="/")
    regex = "".join("[^/]*" if c == "*" else _re_escape(c) for c in stem)
    suffix = "(/.*)?" if any_depth else ""
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=f"^{regex}{suffix}$"))


def _re_escape(char: str) -> str:
    return "\\" + char if char in r".^$+?()[]{}|\\" else char
