"""The compiler rules (README "Concepts", docs/envoy-filters.md), checked on the Envoy messages it produces."""

from __future__ import annotations

import re

import pytest
from google.protobuf import json_format

from controlplane.compiler import route
from controlplane.compiler.compile import compile_policy
from controlplane.compiler.memo import CompilerMemo
from controlplane.compiler.rbac import path_string_matcher
from controlplane.model.errors import PolicyInvalid
from controlplane.resolved.conditions import glob_to_regex
from controlplane.resolved.index import Resolution
from tests.compiled import (
    clusters,
    connection_manager,
    jwt_authentication,
    policy_of,
    routes,
    vhost_rbac,
    vhost_requirement,
    vhost_requirement_name,
)
from tests.support.policy_parts import issuer

ISSUER = issuer("https://gitlab.example.com", extra="inventory: inventory.yaml")
INVENTORY = """
groups:
  - {id: 10, path: acme}
  - {id: 11, path: acme/platform, parent_id: 10}
  - {id: 12, path: acme/platform/tools, parent_id: 11}
projects:
  - {id: 42, path: acme/platform/deployer, namespace_id: 11}
"""
BACKENDS = """
kind: Backend
name: billing
hosts: [billing.local]
endpoints: [{address: 127.0.0.1, port: 8081}]
---
kind: Backend
name: ledger
hosts: [ledger.local]
endpoints: [{address: 127.0.0.1, port: 8082}]
---
kind: Role
name: billing-read
backend: billing
rules: [{methods: [GET, HEAD]}]
---
kind: Gateway
name: gw
listen: {port: 10000}
backends: [billing, ledger]
"""


def compile_with(bindings: str, **extra: str) -> dict[str, object]:
    policy = policy_of(issuer=ISSUER, inventory=INVENTORY, backends=BACKENDS, bindings=bindings, **extra)
    return compile_policy(policy)  # type: ignore[return-value]


def as_json(message: object) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True)  # type: ignore[arg-type]


BINDING = """
kind: Binding
name: deployer-reads
issuer: gitlab
roles: [billing-read]
subjects:
  - project: acme/platform/deployer
    ref_protected: true
    ref: "release/*"
"""


def test_backend_without_bindings_denies_everything_explicitly() -> None:
    group = compile_with(BINDING)["gw"]
    ledger = vhost_rbac(group, "ledger")  # type: ignore[arg-type]
    assert ledger.HasField("rbac") and ledger.rbac.HasField("rules")
    assert len(ledger.rbac.rules.policies) == 0  # ALLOW with no policies = deny all (docs/envoy-filters.md)
    manager = connection_manager(group)  # type: ignore[arg-type]
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.jwt_authn",
        *(f"controlplane.revoked_jobs.{i:02d}" for i in range(16)),
        "controlplane.revoked_jobs.recent",
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    assert "rules" in as_json(manager.http_filters[18].typed_config)


def test_claims_compile_to_strings_and_pins_to_ids() -> None:
    text = as_json(vhost_rbac(compile_with(BINDING)["gw"], "billing"))  # type: ignore[arg-type]
    assert '"exact": "42"' in text and '"key": "project_id"' in text
    assert '"exact": "true"' in text and '"key": "ref_protected"' in text
    assert '"exact": "https://gitlab.example.com"' in text  # every principal pins the issuer
    assert "acme/platform/deployer" not in text  # paths are not identities


def test_merge_request_pipelines_denied_unless_named() -> None:
    default = vhost_rbac(compile_with(BINDING)["gw"], "billing")  # type: ignore[arg-type]
    principal = default.rbac.rules.policies["deployer-reads/billing-read"].principals[0]
    negated = [p for p in principal.and_ids.ids if p.HasField("not_id")]
    assert len(negated) == 1 and "merge_request_event" in as_json(negated[0])

    opted_in = BINDING + "    pipeline_source: [push, merge_request_event]\n"
    rbac = vhost_rbac(compile_with(opted_in)["gw"], "billing")  # type: ignore[arg-type]
    principal = rbac.rbac.rules.policies["deployer-reads/billing-read"].principals[0]
    assert not [p for p in principal.and_ids.ids if p.HasField("not_id")]
    assert "merge_request_event" in as_json(principal)


@pytest.mark.parametrize(
    ("glob", "matches", "rejects"),
    [
        ("release/*", ["release/1.2", "release/"], ["release/a/b", "releases/1", "xrelease/1"]),
        ("v?.*", ["v1.2", "v1."], ["v12.3", "v1/2"]),
        ("a.b", ["a.b"], ["axb"]),
    ],
)
def test_glob_star_never_crosses_a_slash(glob: str, matches: list[str], rejects: list[str]) -> None:
    regex = re.compile(glob_to_regex(glob))
    assert all(regex.match(v) for v in matches)
    assert not any(regex.match(v) for v in rejects)


@pytest.mark.parametrize(
    ("pattern", "matches", "rejects"),
    [
        ("/status", ["/status"], ["/status/x", "/statusx"]),
        ("/items/**", ["/items", "/items/1", "/items/1/2"], ["/itemsx", "/other"]),
        ("/items/*/files", ["/items/9/files"], ["/items/9/8/files"]),
        ("/**", ["/", "/a/b"], []),
    ],
)
def test_role_paths(pattern: str, matches: list[str], rejects: list[str]) -> None:
    matcher = path_string_matcher(pattern)
    kind = matcher.WhichOneof("match_pattern")
    value = matcher.safe_regex.regex if kind == "safe_regex" else getattr(matcher, kind)

    def hit(path: str) -> bool:
        if kind == "exact":
            return path == value
        if kind == "prefix":
            return path.startswith(value)
        return re.match(value, path) is not None

    assert all(hit(p) for p in matches)
    assert not any(hit(p) for p in rejects)


def test_group_pin_covers_subgroups_by_namespace_id() -> None:
    bindings = BINDING.replace("project: acme/platform/deployer", "group: acme/platform")
    text = as_json(vhost_rbac(compile_with(bindings)["gw"], "billing"))  # type: ignore[arg-type]
    assert '"key": "namespace_id"' in text
    assert '"exact": "11"' in text and '"exact": "12"' in text and '"exact": "10"' not in text


def test_unknown_project_path_is_an_error_with_file_and_line() -> None:
    bindings = BINDING.replace("acme/platform/deployer", "acme/unknown")
    with pytest.raises(PolicyInvalid) as raised:
        compile_with(bindings)
    (error,) = raised.value.errors
    assert error.file == "bindings.yaml" and error.line == 7 and error.field == "project"
    assert "acme/unknown" in error.message


def test_shadow_bindings_go_to_shadow_rules_only() -> None:
    shadow = BINDING.replace("kind: Binding\n", "kind: Binding\nmode: shadow\n")
    rbac = vhost_rbac(compile_with(shadow)["gw"], "billing").rbac  # type: ignore[arg-type]
    assert len(rbac.rules.policies) == 0
    assert list(rbac.shadow_rules.policies) == ["deployer-reads/billing-read"]
    assert rbac.shadow_rules_stat_prefix == "billing_"


def test_jwt_provider_extracts_bearer_only_never_forwards_and_caches() -> None:
    group = compile_with(BINDING)["gw"]
    provider = jwt_authentication(group).providers["gitlab"]  # type: ignore[arg-type]
    assert [(h.name, h.value_prefix) for h in provider.from_headers] == [("Authorization", "Bearer ")]
    assert not provider.forward and provider.jwt_cache_config.jwt_cache_size > 0
    assert provider.issuer == "https://gitlab.example.com"
    requirement = vhost_requirement(group, "billing")  # type: ignore[arg-type]
    assert list(requirement.provider_and_audiences.audiences) == ["https://billing.local"]
    assert "jwks-gitlab" not in clusters(group)  # type: ignore[arg-type]  # relayed (default): keys are inline


def test_a_host_moved_to_another_backend_with_the_same_audience_keeps_its_requirement_name() -> None:
    """The listener holds requirements and the routes name them; Envoy applies the two one after the other,
    so a name that changed with the backend would be a 403 "Wrong requirement_name" in between."""
    before = compile_with(BINDING)["gw"]
    moved = BACKENDS.replace("name: billing\n", "name: billing-v2\n").replace("backend: billing", "backend: billing-v2")
    policy = policy_of(
        issuer=ISSUER,
        inventory=INVENTORY,
        backends=moved.replace("[billing, ledger]", "[billing-v2, ledger]"),
        bindings=BINDING,
    )
    after = compile_policy(policy)["gw"]
    name = vhost_requirement_name(before, "billing")  # type: ignore[arg-type]
    assert name is not None and name == vhost_requirement_name(after, "billing-v2")
    assert name in jwt_authentication(after).requirement_map
    # billing and ledger share audience rules only if their audiences match: here each has its own.
    assert len(jwt_authentication(after).requirement_map) == 2


def test_identity_headers_replace_client_sent_ones_once_for_every_host() -> None:
    config = routes(compile_with(BINDING)["gw"])  # type: ignore[arg-type]
    removed = set(config.request_headers_to_remove)
    added = {h.header.key for h in config.request_headers_to_add}
    assert added == removed == {"x-ci-project-id", "x-ci-project-path", "x-ci-pipeline-id", "x-ci-job-id", "x-ci-ref"}
    assert all(not v.request_headers_to_add and not v.request_headers_to_remove for v in config.virtual_hosts)


def test_assembled_route_configuration_is_what_protobuf_itself_would_encode() -> None:
    """Envoy hashes nothing, but our versions do: assembling from cached pieces must not change the bytes."""
    config = routes(compile_with(BINDING)["gw"])  # type: ignore[arg-type]
    hosts = [v.SerializeToString(deterministic=True) for v in config.virtual_hosts]
    assembled = route.route_configuration_bytes(config.name, hosts)
    parsed = route.route_configuration(config.name, hosts)
    assert parsed.SerializeToString(deterministic=True) == assembled


def test_same_policy_same_bytes_with_and_without_memo() -> None:
    first = compile_with(BINDING)
    memo, resolution = CompilerMemo(), Resolution()
    policy = policy_of(issuer=ISSUER, inventory=INVENTORY, backends=BACKENDS, bindings=BINDING)
    warm = compile_policy(policy, memo, resolved=resolution.update(policy))
    again = compile_policy(policy, memo, resolved=resolution.update(policy))
    changed = policy_of(
        issuer=ISSUER, inventory=INVENTORY, backends=BACKENDS, bindings=BINDING.replace("release", "hotfix")
    )
    assert first["gw"].resources == warm["gw"].resources == again["gw"].resources  # type: ignore[attr-defined]
    warm_changed = compile_policy(changed, memo, resolved=resolution.update(changed))
    assert warm_changed["gw"].resources == compile_policy(changed)["gw"].resources


def test_oidc_claims_match_strings_or_list_members() -> None:
    okta = """
kind: Issuer
name: okta
type: oidc
url: https://example.okta.com/oauth2/default
jwks_uri: https://example.okta.com/oauth2/default/v1/keys
"""
    bindings = """
kind: Binding
name: admins
issuer: okta
roles: [billing-read]
subjects:
  - claims: {groups: admins}
"""
    text = as_json(vhost_rbac(compile_with(bindings, okta=okta)["gw"], "billing"))  # type: ignore[arg-type]
    assert '"one_of"' in text and '"exact": "admins"' in text
    assert "merge_request_event" not in text


def test_backend_credentials_key_defaults_to_any_and_names_the_allowed_values() -> None:
    exchanged = BACKENDS.replace("name: ledger\n", "name: ledger\ncredentials: exchanged\n")
    policy = policy_of(issuer=ISSUER, inventory=INVENTORY, backends=exchanged, bindings=BINDING)
    assert {b.name: b.credentials for b in policy.backends} == {"billing": "any", "ledger": "exchanged"}
    with pytest.raises(PolicyInvalid) as raised:
        policy_of(
            issuer=ISSUER,
            inventory=INVENTORY,
            backends=BACKENDS.replace("name: ledger\n", "name: ledger\ncredentials: exchange\n"),
        )
    (error,) = raised.value.errors
    assert (error.file, error.line, error.field) == ("backends.yaml", 9, "credentials")
    assert error.message == "unknown credentials 'exchange' (did you mean 'exchanged'?); allowed: any, exchanged"


def test_without_credentials_every_listener_has_the_revocation_buckets_and_no_host_lists_jobs() -> None:
    group = compile_with(BINDING)["gw"]
    names = [f.name for f in connection_manager(group).http_filters]  # type: ignore[arg-type]
    assert names.index("controlplane.revoked_jobs.00") == 1 and names.index("controlplane.revoked_jobs.15") == 16
    for host in routes(group).virtual_hosts:  # type: ignore[arg-type]
        assert not any(name.startswith("controlplane.") for name in host.typed_per_filter_config)
        assert all(r.match.path != "/.controlplane/token" for r in host.routes)
    assert set(jwt_authentication(group).providers) == {"gitlab"}  # type: ignore[arg-type]
