"""The compiler's side of the control plane's own credentials (issue 4, points 2 and 4).

Exchanged credentials are verified by a `controlplane` jwt_authn provider with inline keys and authorized by
their `roles` claim; revoked jobs are denied by a second RBAC instance through bytes appended once to the
assembled route configuration; the token exchange is routed on every host without token checks. Checked on
the messages the compiler produces, and by the real Envoy (`envoy --mode validate`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_config
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from google.protobuf import json_format
from jwt.algorithms import ECAlgorithm

from controlplane.compiler import compile as compile_module
from controlplane.compiler import rbac, revocations
from controlplane.compiler.compile import CompiledGroup, compile_policy
from controlplane.compiler.memo import CompilerMemo
from controlplane.model.credentials import CREDENTIAL_ISSUER, EXCHANGE_PATH, CredentialInputs, revocation_buckets
from controlplane.model.errors import PolicyInvalid
from controlplane.model.policy import Backend, Mode, Policy
from controlplane.resolved.access import Grant
from controlplane.resolved.conditions import Condition, ResolvedSubject
from controlplane.resolved.index import Resolution
from controlplane.snapshots.build import compile_model
from controlplane.snapshots.snapshot import ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE
from tests.compiled import (
    clusters,
    connection_manager,
    filter_configs,
    jwt_authentication,
    policy_of,
    routes,
    vhost_rbac,
    vhost_requirement,
    vhost_requirement_name,
)
from tests.support.envoy import validate_config
from tests.support.static_bootstrap import as_static_bootstrap

ISSUER = """
kind: Issuer
name: gitlab
type: gitlab
url: https://gitlab.example.com
inventory: inventory.yaml
"""
INVENTORY = """
groups:
  - {id: 10, path: acme}
projects:
  - {id: 42, path: acme/deployer, namespace_id: 10}
"""
BACKENDS = """
kind: Backend
name: reports
hosts: [reports.local]
endpoints: [{address: 127.0.0.1, port: 8081}]
public_paths: [/healthz]
---
kind: Backend
name: vault
hosts: [vault.local]
audience: https://vault.example.com
endpoints: [{address: 127.0.0.1, port: 8082}]
credentials: exchanged
---
kind: Backend
name: ledger
hosts: [ledger.local]
endpoints: [{address: 127.0.0.1, port: 8083}]
---
kind: Role
name: reports-read
backend: reports
rules: [{methods: [GET, HEAD]}]
---
kind: Role
name: reports-write
backend: reports
rules: [{methods: [POST], paths: ["/reports/**"]}]
---
kind: Role
name: vault-read
backend: vault
rules: [{methods: [GET]}]
---
kind: Gateway
name: gw
listen: {port: 10000}
backends: [reports, vault, ledger]
"""
BINDINGS = """
kind: Binding
name: deployer
roles: [reports-read, vault-read]
subjects:
  - project: acme/deployer
    ref_protected: true
"""
KEYS = '{"keys":[{"crv":"P-256","kid":"cp-1","kty":"EC","x":"x","y":"y"}]}'  # shape only; Envoy is not asked here
CREDENTIALS = CredentialInputs(
    jwks=KEYS, exchange_address=("127.0.0.1", 18080), revoked=revocation_buckets(["777", "555", "777"])
)


@functools.cache
def policy() -> Policy:
    return policy_of(issuer=ISSUER, inventory=INVENTORY, backends=BACKENDS, bindings=BINDINGS)


def gateway(
    credentials: CredentialInputs | None = CREDENTIALS,
    memo: CompilerMemo | None = None,
    resolution: Resolution | None = None,
) -> CompiledGroup:
    """With a memo, pass the resolution held beside it: the memo reuses a backend while its grants are the
    very objects the resolution handed out last time."""
    resolved = resolution.update(policy()) if resolution is not None else None
    return compile_policy(policy(), memo, credentials=credentials, resolved=resolved)["gw"]


def vhost(group: CompiledGroup, name: str) -> rc.VirtualHost:
    return next(v for v in routes(group).virtual_hosts if v.name == name)


def unpacked(config: Any, message_type: Callable[[], Any]) -> Any:
    message = message_type()
    assert config.Unpack(message)
    return message


def requirement(group: CompiledGroup, backend: str) -> Any:
    return json_format.MessageToDict(vhost_requirement(group, backend), preserving_proto_field_name=True)


# --- provider ---------------------------------------------------------------------------------------


def test_no_credentials_no_provider_and_the_same_bytes_as_empty_inputs() -> None:
    without = gateway(None)
    assert set(jwt_authentication(without).providers) == {"gitlab"}
    assert gateway(CredentialInputs()).resources == without.resources
    assert not any(name == "controlplane-exchange" for name in clusters(without))


def test_credential_provider_shares_the_issuer_providers_settings_with_inline_keys() -> None:
    providers = jwt_authentication(gateway()).providers
    own, gitlab = providers["controlplane"], providers["gitlab"]
    assert own.issuer == CREDENTIAL_ISSUER
    assert own.local_jwks.inline_string == KEYS
    assert list(own.audiences) == sorted(["https://reports.local", "https://vault.example.com", "https://ledger.local"])
    for shared in ("from_headers", "forward", "payload_in_metadata", "header_in_metadata"):
        assert getattr(own, shared) == getattr(gitlab, shared), shared
    assert own.jwt_cache_config == gitlab.jwt_cache_config and own.jwt_cache_config.jwt_cache_size > 0
    assert own.require_expiration and not own.forward and own.clock_skew_seconds > 0
    rule = jwt_authentication(gateway()).rules[0]
    assert {r.provider_name for r in rule.requires.requires_any.requirements} == {"controlplane", "gitlab"}


def test_an_issuer_or_binding_named_like_the_credentials_entries_is_refused() -> None:
    clash = policy_of(
        issuer=ISSUER.replace("name: gitlab", "name: controlplane"),
        inventory=INVENTORY,
        backends=BACKENDS,
        bindings=BINDINGS.replace("name: deployer", "name: exchanged"),
    )
    compile_policy(clash)  # without credentials, nothing is reserved
    with pytest.raises(PolicyInvalid) as raised:
        compile_policy(clash, credentials=CREDENTIALS)
    assert sorted(map(str, raised.value.errors)) == [
        "bindings.yaml:2: name: 'exchanged' is reserved for the control plane's exchanged credentials; rename it",
        "issuer.yaml:2: name: 'controlplane' is reserved for the control plane's exchanged credentials; rename it",
    ]


# --- requirements and RBAC --------------------------------------------------------------------------


def test_any_backend_accepts_its_issuers_tokens_or_a_credential_with_its_audience() -> None:
    assert requirement(gateway(), "reports") == {
        "requires_any": {
            "requirements": [
                {"provider_and_audiences": {"provider_name": p, "audiences": ["https://reports.local"]}}
                for p in ("controlplane", "gitlab")
            ]
        }
    }


def test_exchanged_backend_accepts_only_credentials() -> None:
    group = gateway()
    assert requirement(group, "vault") == {
        "provider_and_audiences": {"provider_name": "controlplane", "audiences": ["https://vault.example.com"]}
    }
    # The binding grants vault-read, but only to raw ID tokens: that policy is not emitted on this backend.
    assert sorted(vhost_rbac(group, "vault").rbac.rules.policies) == ["exchanged/vault-read"]
    per_route = unpacked(
        vhost(group, "vault").typed_per_filter_config["envoy.filters.http.jwt_authn"], jwt_config.PerRouteConfig
    )
    assert per_route.requirement_name in jwt_authentication(group).requirement_map


def test_exchanged_backend_without_credentials_denies_everything() -> None:
    group = gateway(None)
    assert vhost_requirement_name(group, "vault") is None
    rules = vhost_rbac(group, "vault").rbac.rules
    assert rules.action == rbac_config.RBAC.ALLOW and len(rules.policies) == 0  # deny all (docs/envoy-filters.md)


def test_one_exchanged_policy_per_role_beside_the_binding_policies() -> None:
    policies = vhost_rbac(gateway(), "reports").rbac.rules.policies
    assert sorted(policies) == ["deployer/reports-read", "exchanged/reports-read", "exchanged/reports-write"]
    (principal,) = policies["exchanged/reports-write"].principals
    conditions = [json_format.MessageToDict(i.sourced_metadata.metadata_matcher) for i in principal.and_ids.ids]
    assert conditions == [
        {
            "filter": "envoy.filters.http.jwt_authn",
            "path": [{"key": "jwt_payload"}, {"key": "iss"}],
            "value": {"stringMatch": {"exact": CREDENTIAL_ISSUER}},
        },
        {
            "filter": "envoy.filters.http.jwt_authn",
            "path": [{"key": "jwt_payload"}, {"key": "roles"}],
            "value": {
                "orMatch": {
                    "valueMatchers": [
                        {"stringMatch": {"exact": "reports-write"}},
                        {"listMatch": {"oneOf": {"stringMatch": {"exact": "reports-write"}}}},
                    ]
                }
            },
        },
    ]


@pytest.mark.parametrize("role", ["reports-read", "reports-write"])
def test_exchanged_policy_permissions_are_the_roles_rules(role: str) -> None:
    anyone = ResolvedSubject.of([Condition("sub", ("x",))])
    alone = rbac.RbacEncoder().backend_rbac(
        "reports", [Grant("b", "p", Mode.ENFORCE, policy().role(role).rules, (anyone,))]
    )
    policies = vhost_rbac(gateway(), "reports").rbac.rules.policies
    assert policies[f"exchanged/{role}"].permissions == alone.rbac.rules.policies["b/p"].permissions


def test_deny_by_default_holds_with_credentials() -> None:
    group = gateway()
    ledger = vhost_rbac(group, "ledger").rbac.rules  # no roles on ledger: nothing to exchange for either
    assert ledger.action == rbac_config.RBAC.ALLOW and len(ledger.policies) == 0
    main = unpacked(connection_manager(group).http_filters[18].typed_config, rbac_filter.RBAC)
    assert main.rules.action == rbac_config.RBAC.ALLOW and len(main.rules.policies) == 0


# --- revocations ------------------------------------------------------------------------------------


BUCKETS = [f"controlplane.revoked_jobs.{i:02d}" for i in range(16)]
RECENT = "controlplane.revoked_jobs.recent"
DENY_LISTS = [*BUCKETS, RECENT]


def test_revocation_buckets_sit_between_jwt_authn_and_rbac_by_ecds_failing_closed() -> None:
    for credentials in (None, CREDENTIALS):
        filters = connection_manager(gateway(credentials)).http_filters
        names = [f.name for f in filters][:19]
        assert names == ["envoy.filters.http.jwt_authn", *DENY_LISTS, "envoy.filters.http.rbac"]
        for bucket in filters[1:18]:
            discovery = bucket.config_discovery
            assert not bucket.HasField("typed_config") and discovery.config_source.HasField("ads")
            assert list(discovery.type_urls) == ["type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"]
            assert not discovery.apply_default_config_without_warming  # warm until the bucket arrives
            default = unpacked(discovery.default_config, rbac_filter.RBAC)
            assert default.rules.action == rbac_config.RBAC.ALLOW and not default.rules.policies  # deny-all


def bucket_rbac(group: CompiledGroup, index: int) -> Any:
    config = filter_configs(group)[DENY_LISTS[index]]
    assert config.name == DENY_LISTS[index]
    return unpacked(config.typed_config, rbac_filter.RBAC)


def test_every_bucket_is_emitted_and_only_a_listed_jobs_bucket_denies() -> None:
    group = gateway()  # 555 and 777 (and 777 again): both in bucket 0 (thousand-block 0)
    # Empty buckets too (a removed bucket would deny everyone), and jwt_authn's configuration.
    assert sorted(filter_configs(group)) == [*BUCKETS, RECENT, "envoy.filters.http.jwt_authn"]
    listed = bucket_rbac(group, 0).rules
    assert listed.action == rbac_config.RBAC.DENY and list(listed.policies) == ["revoked-jobs"]
    policy = listed.policies["revoked-jobs"]
    assert [p.any for p in policy.permissions] == [True]
    (principal,) = policy.principals
    matcher = principal.sourced_metadata.metadata_matcher
    assert matcher.filter == "envoy.filters.http.jwt_authn"
    assert [s.key for s in matcher.path] == ["jwt_payload", "job_id"]  # credentials and ID tokens alike
    assert matcher.value.string_match.safe_regex.regex == "(?:555|777)"
    for index in range(1, 17):
        rules = bucket_rbac(group, index).rules
        assert rules.action == rbac_config.RBAC.DENY and not rules.policies  # denies nothing
    # The route configuration no longer carries a deny list, nor switches one off.
    config = routes(group)
    assert not config.typed_per_filter_config
    assert all(not name.startswith("controlplane.") for v in config.virtual_hosts for name in v.typed_per_filter_config)


def test_a_revocation_re_encodes_one_bucket_and_leaves_listener_routes_and_backends_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memo, resolution = CompilerMemo(), Resolution()
    first = gateway(CredentialInputs(jwks=KEYS, revoked=revocation_buckets(["1", "5001"])), memo, resolution)
    calls: list[str] = []
    encoded: list[str] = []
    real_parts, real_bucket = compile_module._backend_parts, revocations.bucket_config_bytes

    def counted(backend: Backend, *rest: Any) -> Any:
        calls.append(backend.name)
        return real_parts(backend, *rest)

    def counted_bucket(name: str, ids: Any) -> bytes:
        encoded.append(name)
        return real_bucket(name, ids)

    monkeypatch.setattr(compile_module, "_backend_parts", counted)
    monkeypatch.setattr(revocations, "bucket_config_bytes", counted_bucket)
    second = gateway(CredentialInputs(jwks=KEYS, revoked=revocation_buckets(["1", "2", "5001"])), memo, resolution)
    assert calls == [] and encoded == [BUCKETS[0]]  # only bucket 0 changed
    assert second.resources[LISTENER] == first.resources[LISTENER]
    assert second.resources[ROUTE] == first.resources[ROUTE]
    changed = [
        a[0]
        for a, b in zip(first.resources[EXTENSION_CONFIG], second.resources[EXTENSION_CONFIG], strict=True)
        if a != b
    ]
    assert changed == [BUCKETS[0]]


def test_a_recent_revocation_re_encodes_the_recent_list_alone_whatever_the_buckets_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memo, resolution = CompilerMemo(), Resolution()
    sealed = revocation_buckets(str(n) for n in range(1, 20_000, 7))
    first = gateway(CredentialInputs(jwks=KEYS, revoked=sealed, revoked_recently=("30001",)), memo, resolution)
    encoded: list[tuple[str, int]] = []
    real_bucket = revocations.bucket_config_bytes

    def counted_bucket(name: str, ids: Any) -> bytes:
        encoded.append((name, len(ids)))
        return real_bucket(name, ids)

    monkeypatch.setattr(revocations, "bucket_config_bytes", counted_bucket)
    inputs = CredentialInputs(jwks=KEYS, revoked=sealed, revoked_recently=("30001", "30002"))
    second = gateway(inputs, memo, resolution)
    assert encoded == [(RECENT, 2)]
    before, after = dict(first.resources[EXTENSION_CONFIG]), dict(second.resources[EXTENSION_CONFIG])
    assert [n for n in after if after[n] != before[n]] == [RECENT] and len(after[RECENT]) < 300
    recent = bucket_rbac(second, 16).rules.policies["revoked-jobs"].principals[0]
    assert recent.sourced_metadata.metadata_matcher.value.string_match.safe_regex.regex == "3000[12]"
    assert inputs.revoked_jobs[:2] == ("1", "10004") and "30002" in inputs.revoked_jobs


def test_every_gateway_group_gets_the_same_buckets() -> None:
    policy_two = policy_of(
        issuer=ISSUER,
        inventory=INVENTORY,
        backends=BACKENDS + "---\nkind: Gateway\nname: other\nlisten: {port: 10001}\nbackends: [reports]\n",
        bindings=BINDINGS,
    )
    groups = compile_policy(policy_two, credentials=CREDENTIALS)
    assert len(groups) == 2
    first, second = ([r for r in g.resources[EXTENSION_CONFIG] if r[0] in BUCKETS] for g in groups.values())
    assert len(first) == 16 and first == second


def test_jwt_authn_comes_by_ecds_and_a_key_rotation_changes_only_its_configuration() -> None:
    """The listener names jwt_authn's configuration (no default: it warms, then fails closed); the keys, ours or
    a relayed issuer's, are in that ECDS resource, so a rotation leaves the listener's bytes alone."""
    group = gateway()
    (jwt_filter,) = [f for f in connection_manager(group).http_filters if f.name == "envoy.filters.http.jwt_authn"]
    assert not jwt_filter.HasField("typed_config") and jwt_filter.config_discovery.config_source.HasField("ads")
    assert not jwt_filter.config_discovery.HasField("default_config")
    assert list(jwt_filter.config_discovery.type_urls) == [
        "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
    ]
    assert "controlplane" in jwt_authentication(group).providers
    rotated = gateway(
        CredentialInputs(
            jwks=KEYS.replace("cp-1", "cp-2"),
            exchange_address=CREDENTIALS.exchange_address,
            revoked=CREDENTIALS.revoked,
        )
    )
    assert rotated.resources[LISTENER] == group.resources[LISTENER]
    assert rotated.resources[ROUTE] == group.resources[ROUTE]
    before, after = dict(group.resources[EXTENSION_CONFIG]), dict(rotated.resources[EXTENSION_CONFIG])
    assert [name for name in before if before[name] != after[name]] == ["envoy.filters.http.jwt_authn"]
    relayed = compile_policy(policy(), credentials=CREDENTIALS, keys={"gitlab": KEYS})["gw"]
    assert relayed.resources[LISTENER] == group.resources[LISTENER]


def test_memo_equals_a_cold_compile_with_credentials_and_revocations() -> None:
    memo, resolution = CompilerMemo(), Resolution()
    steps = [
        None,
        CREDENTIALS,
        CredentialInputs(jwks=KEYS, revoked=revocation_buckets(["9"])),
        CredentialInputs(jwks=KEYS.replace("cp-1", "cp-2"), exchange_address=("cp.internal", 8443)),
        CredentialInputs(revoked=revocation_buckets(["9", "12345", "x-1"])),
        CREDENTIALS,
    ]
    for credentials in steps:
        warm = compile_policy(policy(), memo, credentials=credentials, resolved=resolution.update(policy()))
        cold = compile_policy(policy(), credentials=credentials)
        assert {g: c.resources for g, c in warm.items()} == {g: c.resources for g, c in cold.items()}, credentials


# --- token exchange route ---------------------------------------------------------------------------


def test_exchange_route_comes_first_on_every_host_with_every_check_off() -> None:
    group = gateway()
    for host in routes(group).virtual_hosts:
        first = host.routes[0]
        assert first.name == f"{host.name}-exchange"
        assert first.match.path == EXCHANGE_PATH and first.route.cluster == "controlplane-exchange"
        config = first.typed_per_filter_config
        # The buckets need no switch: with jwt_authn off there is no `job_id` metadata they could match.
        assert sorted(config) == ["envoy.filters.http.jwt_authn", "envoy.filters.http.rbac"]
        assert unpacked(config["envoy.filters.http.jwt_authn"], jwt_config.PerRouteConfig).disabled
        assert not unpacked(config["envoy.filters.http.rbac"], rbac_filter.RBACPerRoute).HasField("rbac")  # off
        assert host.routes[-1].match.prefix == "/"
    public = vhost(group, "reports").routes[1]
    assert public.match.path == "/healthz" and "envoy.filters.http.rbac" in public.typed_per_filter_config
    without = gateway(CredentialInputs(jwks=KEYS))
    assert all(h.routes[0].name != f"{h.name}-exchange" for h in routes(without).virtual_hosts)


@pytest.mark.parametrize(
    ("address", "kind"),
    [(("127.0.0.1", 18080), cluster_pb2.Cluster.STATIC), (("cp.internal", 8443), cluster_pb2.Cluster.LOGICAL_DNS)],
)
def test_exchange_cluster_is_static_for_an_ip_and_dns_otherwise(address: tuple[str, int], kind: int) -> None:
    group = gateway(CredentialInputs(exchange_address=address))
    exchange = clusters(group)["controlplane-exchange"]
    assert exchange.type == kind
    endpoint = exchange.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (endpoint.address, endpoint.port_value) == address
    assert not exchange.HasField("transport_socket")
    assert "controlplane-exchange" not in dict(group.resources[ENDPOINT])


# --- the real Envoy -----------------------------------------------------------------------------------


def test_real_envoy_accepts_credentials_revocations_and_the_exchange_route() -> None:
    public = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    keys = json.dumps({"keys": [{**public, "kid": "cp-1", "alg": "ES256", "use": "sig"}]})
    credentials = CredentialInputs(
        jwks=keys,
        exchange_address=("cp.internal", 8443),
        revoked=revocation_buckets(["555", "777", "8000012001", "8000012003"]),
    )
    snapshots = compile_model(policy(), credentials=credentials)
    ok, output = validate_config(as_static_bootstrap(snapshots["gw"]))
    assert ok, output[-3000:]
