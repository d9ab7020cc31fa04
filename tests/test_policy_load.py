"""Policy loading: a full tree round trip, and every class of error with its file, line and field."""

from __future__ import annotations

import os
import socket
import stat
import textwrap
import threading
import time
from dataclasses import MISSING, fields
from inspect import signature
from pathlib import Path

import pytest

from controlplane import regularfile
from controlplane.model import errors as errors_module
from controlplane.model import yaml_source
from controlplane.model.errors import PolicyError, PolicyInvalid, Source
from controlplane.model.inventory import DEFAULT_ARCHIVED, Group, Inventory, Project
from controlplane.model.loader import PolicyLoader, parse_policy
from controlplane.model.parse_cache import PARSE_CACHE_BYTES, ParseCache
from controlplane.model.policy import (
    DEFAULT_BACKEND_CREDENTIALS,
    DEFAULT_CREDENTIAL_TTL_SECONDS,
    DEFAULT_INJECTION_HEADER,
    DEFAULT_INJECTION_PREFIX,
    DEFAULT_JWKS_MODE,
    DEFAULT_RECONCILE_SECONDS,
    DEFAULT_REQUESTS_PER_SECOND,
    Backend,
    Binding,
    ClaimMatch,
    Endpoint,
    Gateway,
    GitLabApi,
    Injection,
    Issuer,
    IssuerKind,
    JwksMode,
    Mode,
    Policy,
    Role,
    RoleRule,
    Subject,
    UpstreamTLS,
)
from controlplane.model.yaml_source import parse_yaml, to_plain
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.policy_dir import ReadLimits, load_policy_dir, read_policy_dir


def _text(source: str) -> str:
    return textwrap.dedent(source).lstrip("\n")


# A complete tree touching every kind and most keys. Line numbers below are counted from line 1 of each text.
FULL: dict[str, str] = {
    "issuers.yaml": _text(
        """
        apiVersion: controlplane/v1
        kind: Issuer
        name: gitlab
        type: gitlab
        url: https://gitlab.example.com
        inventory: inventory/gitlab.yaml
        ---
        kind: Issuer
        name: okta
        type: oidc
        url: https://acme.okta.com/oauth2/default
        jwks_uri: https://acme.okta.com/oauth2/default/v1/keys
        jwks_cache: 10m
        clock_skew: 5
        """
    ),
    "inventory/gitlab.yaml": _text(
        """
        groups:
          - {id: 10, path: acme}
          - {id: 11, path: acme/platform, parent_id: 10}
        projects:
          - {id: 42, path: acme/platform/deployer, namespace_id: 11}
          - {id: 43, path: acme/old, namespace_id: 10, archived: true}
        """
    ),
    "backends/api.yaml": _text(
        """
        kind: Backend
        name: api
        hosts: [api.example.com, api.internal]
        endpoints:
          - {address: 10.0.0.1, port: 8443}
          - {address: api-1.internal, port: 8443}
        tls: true
        connect_timeout: 250ms
        timeout: 1m
        public_paths: [/healthz]
        ---
        ---
        kind: Backend
        name: wild
        hosts: ["*.apps.example.com"]
        audience: apps
        endpoints: [{address: "::1", port: 80}]
        tls: {sni: apps.example.com, ca_file: /etc/ca.pem}
        """
    ),
    "roles.yml": _text(
        """
        kind: Role
        name: api-read
        backend: api
        rules:
          - methods: [GET, HEAD]
          - paths: ["/v1/*/items", "/reports/**"]
            methods: [POST]
        ---
        kind: Role
        name: apps-all
        backend: wild
        rules: [{paths: ["/**"]}]
        """
    ),
    "bindings.yaml": _text(
        """
        kind: Binding
        name: deployer
        issuer: gitlab
        roles: [api-read, apps-all]
        subjects:
          - project: acme/platform/deployer
            ref: [main, "release/*"]
            ref_protected: true
            user_id: 7
          - group: [acme, 11]
            include_subgroups: false
            deployment_tier: production
            claims: {job_project_id: "42"}
        ---
        kind: Binding
        name: people
        issuer: okta
        mode: shadow
        roles: [apps-all]
        subjects:
          - claims:
              groups: [admins, sre]
              email_verified: true
        """
    ),
    "gateway.yaml": _text(
        """
        kind: Gateway
        name: edge
        listen: {port: 10000}
        backends: [wild, api]
        ---
        kind: Gateway
        name: internal
        listen: {address: 127.0.0.1, port: 10001}
        backends: [api]
        access_log: /var/log/envoy/access.log
        """
    ),
}


def _expected_full_policy() -> Policy:
    def at(file: str, line: int) -> Source:
        return Source(file, line)

    inventory = Inventory(
        projects=(Project(42, "acme/platform/deployer", 11), Project(43, "acme/old", 10, archived=True)),
        groups=(Group(10, "acme"), Group(11, "acme/platform", parent_id=10)),
    )
    return Policy(
        issuers=(
            Issuer(
                "gitlab",
                IssuerKind.GITLAB,
                "https://gitlab.example.com",
                "https://gitlab.example.com/oauth/discovery/keys",
                clock_skew_seconds=30,
                jwks_cache_seconds=300,
                source=at("issuers.yaml", 2),
                inventory=inventory,
            ),
            Issuer(
                "okta",
                IssuerKind.OIDC,
                "https://acme.okta.com/oauth2/default",
                "https://acme.okta.com/oauth2/default/v1/keys",
                clock_skew_seconds=5,
                jwks_cache_seconds=600,
                source=at("issuers.yaml", 8),
            ),
        ),
        backends=(
            Backend(
                "api",
                ("api.example.com", "api.internal"),
                "https://api.example.com",
                (Endpoint("10.0.0.1", 8443), Endpoint("api-1.internal", 8443)),
                UpstreamTLS("api.example.com", "/etc/ssl/certs/ca-certificates.crt"),
                connect_timeout_ms=250,
                request_timeout_ms=60_000,
                public_paths=("/healthz",),
                source=at("backends/api.yaml", 1),
            ),
            Backend(
                "wild",
                ("*.apps.example.com",),
                "apps",
                (Endpoint("::1", 80),),
                UpstreamTLS("apps.example.com", "/etc/ca.pem"),
                connect_timeout_ms=2000,
                request_timeout_ms=15_000,
                public_paths=(),
                source=at("backends/api.yaml", 13),
            ),
        ),
        roles=(
            Role(
                "api-read",
                "api",
                (RoleRule(("GET", "HEAD"), ()), RoleRule(("POST",), ("/v1/*/items", "/reports/**"))),
                at("roles.yml", 1),
            ),
            Role("apps-all", "wild", (RoleRule((), ("/**",)),), at("roles.yml", 9)),
        ),
        bindings=(
            Binding(
                "deployer",
                "gitlab",
                ("api-read", "apps-all"),
                (
                    Subject(
                        projects=("acme/platform/deployer",),
                        groups=(),
                        include_subgroups=True,
                        claims=(
                            ClaimMatch("ref", ("main", "release/*"), at("bindings.yaml", 7)),
                            ClaimMatch("ref_protected", ("true",), at("bindings.yaml", 8)),
                            ClaimMatch("user_id", ("7",), at("bindings.yaml", 9)),
                        ),
                        source=at("bindings.yaml", 6),
                    ),
                    Subject(
                        projects=(),
                        groups=("acme", 11),
                        include_subgroups=False,
                        claims=(
                            ClaimMatch("deployment_tier", ("production",), at("bindings.yaml", 12)),
                            ClaimMatch("job_project_id", ("42",), at("bindings.yaml", 13)),
                        ),
                        source=at("bindings.yaml", 10),
                    ),
                ),
                Mode.ENFORCE,
                at("bindings.yaml", 1),
            ),
            Binding(
                "people",
                "okta",
                ("apps-all",),
                (
                    Subject(
                        projects=(),
                        groups=(),
                        include_subgroups=True,
                        claims=(
                            ClaimMatch("email_verified", ("true",), at("bindings.yaml", 23)),
                            ClaimMatch("groups", ("admins", "sre"), at("bindings.yaml", 22)),
                        ),
                        source=at("bindings.yaml", 21),
                    ),
                ),
                Mode.SHADOW,
                at("bindings.yaml", 15),
            ),
        ),
        gateways=(
            Gateway("edge", "0.0.0.0", 10000, ("api", "wild"), "/dev/stdout", at("gateway.yaml", 1)),
            Gateway("internal", "127.0.0.1", 10001, ("api",), "/var/log/envoy/access.log", at("gateway.yaml", 6)),
        ),
        files=(
            "backends/api.yaml",
            "bindings.yaml",
            "gateway.yaml",
            "inventory/gitlab.yaml",
            "issuers.yaml",
            "roles.yml",
        ),
    )


def test_full_policy_round_trip() -> None:
    assert parse_policy(FULL) == _expected_full_policy()


def test_same_input_gives_equal_policy_whatever_the_order_of_files() -> None:
    reordered = dict(reversed(list(FULL.items())))
    assert parse_policy(FULL) == parse_policy(reordered) == parse_policy(dict(FULL))


def test_api_version_is_optional_and_issuer_is_implied_when_there_is_one() -> None:
    policy = parse_policy(BASE)
    assert policy.bindings[0].issuer == "gitlab"
    assert policy.issuers[0].inventory is None
    assert policy.backends[0].tls is None


# --- errors ------------------------------------------------------------------------------------------

# Document openings shared by the error cases (their lines are 1..n; the case adds the rest).
BINDING_HEAD = "kind: Binding\nname: ci\nroles: [read]\nsubjects:\n"
BACKEND_HEAD = "kind: Backend\nname: api\n"
GITLAB_HEAD = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
OIDC_HEAD = (
    "kind: Issuer\nname: gitlab\ntype: oidc\nurl: https://idp.example.com\njwks_uri: https://idp.example.com/k\n"
)
ROLE_HEAD = "kind: Role\nname: read\n"

# A minimal valid tree; each error test replaces one or two files of it.
BASE: dict[str, str] = {
    "issuer.yaml": "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com\n",
    "backend.yaml": BACKEND_HEAD + "hosts: [api.example.com]\nendpoints: [{address: a, port: 8}]\n",
    "role.yaml": "kind: Role\nname: read\nbackend: api\nrules: [{methods: [GET]}]\n",
    "binding.yaml": "kind: Binding\nname: ci\nroles: [read]\nsubjects: [{project: 42}]\n",
    "gateway.yaml": "kind: Gateway\nname: edge\nlisten: {port: 10000}\nbackends: [api]\n",
}


def _errors(files: dict[str, str]) -> list[PolicyError]:
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(files)
    return raised.value.errors


def _with(**texts: str) -> dict[str, str]:
    """BASE with some files replaced (`binding="..."` replaces binding.yaml; `x__y` is x/y.yaml)."""
    files = dict(BASE)
    for stem, text in texts.items():
        files[stem.replace("__", "/") + ".yaml"] = _text(text)
    return files


def _only_error(files: dict[str, str]) -> tuple[str, int, str, str]:
    errors = _errors(files)
    assert len(errors) == 1, "\n".join(map(str, errors))
    (error,) = errors
    return error.file, error.line, error.field, error.message


def test_base_is_valid() -> None:
    parse_policy(BASE)


# (files, file, line, field, message fragment): one row per error class.
ERROR_CASES = [
    pytest.param(
        _with(binding=BINDING_HEAD + "  - project: 42\n    ref_protected: yes\n"),
        ("binding.yaml", 6, "subjects[0].ref_protected", "expected true or false, got 'yes'"),
        id="yes-is-not-a-boolean",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: api\nbackend: api\nrules: [{methods: [GET]}]\n"),
        ("role.yaml", 4, "backend", "duplicate key 'backend' (first at line 3)"),
        id="duplicate-key",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: api\nrules: [{methods: [GET]}\n"),
        ("role.yaml", 4, "", "invalid YAML"),  # the last line, not one past it
        id="yaml-syntax",
    ),
    pytest.param(
        _with(role="kind: Role\nname: &n read\nbackend: *n\nrules: [{methods: [GET]}]\n"),
        ("role.yaml", 3, "", "anchors and aliases are not supported"),
        id="alias",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: !!binary YXBp\nrules: [{methods: [GET]}]\n"),
        ("role.yaml", 3, "backend", "unsupported YAML tag"),
        id="yaml-tag",
    ),
    pytest.param(
        _with(role="- kind: Role\n"),
        ("role.yaml", 1, "", "expected a mapping with kind and name"),
        id="document-not-a-mapping",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "bakend: api\nrules: [{methods: [GET]}]\n"),
        (
            "role.yaml",
            3,
            "bakend",
            "unknown key 'bakend' (did you mean 'backend'?); allowed: apiVersion, backend,",
        ),
        id="unknown-key",
    ),
    pytest.param(
        _with(role="kind: Rol\nname: read\n"),
        ("role.yaml", 1, "kind", "unknown kind 'Rol' (did you mean 'Role'?); allowed: Backend, Binding,"),
        id="unknown-kind",
    ),
    pytest.param(
        _with(role="name: read\nbackend: api\n"),
        ("role.yaml", 1, "kind", "missing required key"),
        id="missing-kind",
    ),
    pytest.param(
        _with(role="apiVersion: controlplane/v2\n" + ROLE_HEAD + "backend: api\nrules: [{methods: [GET]}]\n"),
        ("role.yaml", 1, "apiVersion", "expected 'controlplane/v1', got 'controlplane/v2'"),
        id="api-version",
    ),
    pytest.param(
        _with(role="kind: Role\nname: Read_Only\nbackend: api\nrules: [{methods: [GET]}]\n"),
        ("role.yaml", 2, "name", "must be lower-case letters, digits and '-'"),
        id="bad-name",
    ),
    pytest.param(
        _with(role="kind: Role\nbackend: api\nrules: [{methods: [GET]}]\n"),
        ("role.yaml", 1, "name", "missing required key"),
        id="missing-name",
    ),
    # Issuer
    pytest.param(
        _with(issuer="kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com/\n"),
        ("issuer.yaml", 4, "url", "must not end with '/'"),
        id="issuer-url-trailing-slash",
    ),
    pytest.param(
        _with(issuer="kind: Issuer\nname: gitlab\ntype: gitlab\nurl: gitlab.example.com\n"),
        ("issuer.yaml", 4, "url", "expected an http(s) URL"),
        id="issuer-url-scheme",
    ),
    pytest.param(
        _with(issuer="kind: Issuer\nname: gitlab\ntype: github\nurl: https://gitlab.example.com\n"),
        ("issuer.yaml", 3, "type", "unknown issuer type 'github'"),
        id="issuer-type",
    ),
    pytest.param(
        _with(issuer="kind: Issuer\nname: gitlab\ntype: oidc\nurl: https://idp.example.com\n"),
        ("issuer.yaml", 1, "jwks_uri", "missing required key for oidc issuers"),
        id="oidc-needs-jwks-uri",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "clock_skew: 0\n"),
        ("issuer.yaml", 5, "clock_skew", "must be between 1s and 5m, got 0ms (0 is not allowed"),
        id="clock-skew-zero",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "jwks_cache: 2d\n"),
        ("issuer.yaml", 5, "jwks_cache", "expected a duration such as 250ms, 30s, 5m, 1h"),
        id="duration-syntax",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "jwks_cache: 1500ms\n"),
        ("issuer.yaml", 5, "jwks_cache", "whole seconds only"),
        id="duration-whole-seconds",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "inventory: inv.yaml\n"),
        ("issuer.yaml", 5, "inventory", "no file 'inv.yaml' in the policy tree"),
        id="inventory-missing",
    ),
    pytest.param(
        _with(
            issuer="""
            kind: Issuer
            name: gitlab
            type: oidc
            url: https://idp.example.com
            jwks_uri: https://idp.example.com/keys
            inventory: inv.yaml
            """,
            binding="kind: Binding\nname: ci\nroles: [read]\nsubjects: [{claims: {sub: x}}]\n",
            inv="groups: []\n",
        ),
        ("issuer.yaml", 6, "inventory", "only for gitlab issuers"),
        id="inventory-on-oidc",
    ),
    pytest.param(
        _with(
            issuer=GITLAB_HEAD + "inventory: inv.yaml\n",
            inv="""
            groups:
              - {id: 10, path: acme}
              - {id: 11, path: acme/platform, parent_id: 12}
            """,
        ),
        ("inv.yaml", 3, "groups[1].parent_id", "no group with id 12 in this inventory"),
        id="inventory-parent-missing",
    ),
    pytest.param(
        _with(
            issuer=GITLAB_HEAD + "inventory: inv.yaml\n",
            inv="""
            groups: [{id: 10, path: acme}]
            projects:
              - {id: 42, path: acme/app, namespace_id: 10}
              - {id: 43, path: acme/app, namespace_id: 10}
            """,
        ),
        ("inv.yaml", 4, "projects[1].path", "duplicate value 'acme/app' (first at line 3)"),
        id="inventory-duplicate-path",
    ),
    pytest.param(
        _with(
            issuer=GITLAB_HEAD + "inventory: inv.yaml\n",
            inv="""
            groups: [{id: 10, path: acme}]
            projects:
              - {id: 42, path: other/app, namespace_id: 10}
            """,
        ),
        ("inv.yaml", 3, "projects[0].path", "'other/app' is not directly under group 10 ('acme')"),
        id="inventory-path-disagrees-with-parent",
    ),
    pytest.param(
        _with(
            issuer=GITLAB_HEAD + "inventory: inv.yaml\n",
            inv="groups: [{id: 0, path: acme}]\n",
        ),
        ("inv.yaml", 1, "groups[0].id", "expected a positive integer within GitLab's 64-bit ids, got '0'"),
        id="inventory-id",
    ),
    # Backend
    pytest.param(
        _with(backend=BACKEND_HEAD + "hosts: [API.example.com:443]\nendpoints: [{address: a, port: 1}]\n"),
        ("backend.yaml", 3, "hosts[0]", "expected a lower-case DNS name (or *.domain) without port"),
        id="backend-host",
    ),
    pytest.param(
        _with(backend=BACKEND_HEAD + "hosts: []\nendpoints: [{address: a, port: 1}]\n"),
        ("backend.yaml", 3, "hosts", "must not be empty"),
        id="backend-hosts-empty",
    ),
    pytest.param(
        _with(backend=BACKEND_HEAD + "hosts: [a.example.com]\nendpoints: [{address: a, port: 70000}]\n"),
        ("backend.yaml", 4, "endpoints[0].port", "must be between 1 and 65535, got 70000"),
        id="backend-port",
    ),
    pytest.param(
        _with(backend=BACKEND_HEAD + "hosts: [a.example.com]\nendpoints: [{address: 'a b', port: 1}]\n"),
        ("backend.yaml", 4, "endpoints[0].address", "expected an IP address or a lower-case DNS name"),
        id="backend-address",
    ),
    pytest.param(  # Python parses it; Envoy NACKed the assignment holding it
        _with(backend=BACKEND_HEAD + "hosts: [a.example.com]\nendpoints: [{address: 'fe80::1%eth0', port: 1}]\n"),
        ("backend.yaml", 4, "endpoints[0].address", "an IPv6 address with a zone"),
        id="backend-address-zone",
    ),
    pytest.param(
        _with(backend=BACKEND_HEAD + "hosts: ['*.example.com']\nendpoints: [{address: a, port: 1}]\n"),
        ("backend.yaml", 1, "audience", "missing required key when hosts[0] is a wildcard"),
        id="backend-wildcard-needs-audience",
    ),
    pytest.param(
        _with(
            backend="""
            kind: Backend
            name: api
            hosts: ['*.example.com']
            audience: api
            endpoints: [{address: a, port: 1}]
            tls: true
            """
        ),
        ("backend.yaml", 6, "tls.sni", "missing required key when hosts[0] is a wildcard"),
        id="backend-wildcard-needs-sni",
    ),
    pytest.param(
        _with(
            backend="""
            kind: Backend
            name: api
            hosts: [api.example.com]
            endpoints: [{address: a, port: 1}]
            tls: {ca_file: certs/ca.pem}
            """
        ),
        ("backend.yaml", 5, "tls.ca_file", "expected an absolute path"),
        id="backend-ca-file",
    ),
    pytest.param(
        _with(
            backend="""
            kind: Backend
            name: api
            hosts: [api.example.com]
            endpoints: [{address: a, port: 1}]
            public_paths: [/health*]
            """
        ),
        ("backend.yaml", 5, "public_paths[0]", "expected an exact path (no globs"),
        id="backend-public-path",
    ),
    pytest.param(
        _with(
            backend="""
            kind: Backend
            name: api
            hosts: [api.example.com]
            endpoints: [{address: a, port: 1}]
            connect_timeout: 0
            """
        ),
        ("backend.yaml", 5, "connect_timeout", "must be between 1ms and 1m, got 0ms"),
        id="backend-timeout",
    ),
    # Role
    pytest.param(
        _with(role=ROLE_HEAD + "backend: api\nrules: [{methods: [get]}]\n"),
        ("role.yaml", 4, "rules[0].methods[0]", "methods are upper-case: write 'GET'"),
        id="role-method-case",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: api\nrules: [{methods: [TRACE]}]\n"),
        ("role.yaml", 4, "rules[0].methods[0]", "unknown method 'TRACE'"),
        id="role-method-unknown",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: api\nrules:\n  - paths: [/a/**/b]\n"),
        ("role.yaml", 5, "rules[0].paths[0]", "'**' is only allowed as a final '/**'"),
        id="role-path-double-star",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: api\nrules:\n  - paths: [v1]\n"),
        ("role.yaml", 5, "rules[0].paths[0]", "must start with '/'"),
        id="role-path-slash",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: api\nrules:\n  - {}\n"),
        ("role.yaml", 5, "rules[0]", "a rule needs methods or paths"),
        id="role-empty-rule",
    ),
    pytest.param(
        _with(role=ROLE_HEAD + "backend: apii\nrules: [{methods: [GET]}]\n"),
        ("role.yaml", 3, "backend", "no Backend named 'apii' (did you mean 'api'?)"),
        id="role-backend-unknown",
    ),
    # Gateway
    pytest.param(
        _with(gateway="kind: Gateway\nname: edge\nlisten: {address: localhost, port: 1}\nbackends: [api]\n"),
        ("gateway.yaml", 3, "listen.address", "expected an IP address, got 'localhost'"),
        id="gateway-address",
    ),
    pytest.param(
        _with(gateway="kind: Gateway\nname: edge\nlisten: {}\nbackends: [api]\n"),
        ("gateway.yaml", 3, "listen.port", "missing required key"),
        id="gateway-port-missing",
    ),
    pytest.param(
        _with(gateway="kind: Gateway\nname: edge\nlisten: {port: 1}\nbackends: [api, api]\n"),
        ("gateway.yaml", 4, "backends[1]", "duplicate value 'api' (first at line 4)"),
        id="gateway-duplicate-backend",
    ),
    # Binding
    pytest.param(
        _with(binding=BINDING_HEAD + "  - ref: main\n"),
        ("binding.yaml", 5, "subjects[0]", "every GitLab subject must pin a project or a group"),
        id="subject-unpinned",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - project: 42\n    group: 7\n"),
        ("binding.yaml", 6, "subjects[0].group", "pin a project or a group, not both"),
        id="subject-project-and-group",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, include_subgroups: true}\n"),
        ("binding.yaml", 5, "subjects[0].include_subgroups", "only with group"),
        id="subject-include-subgroups-without-group",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - project: 'acme/*'\n"),
        (
            "binding.yaml",
            5,
            "subjects[0].project",
            "expected a project path (namespace/project) or a positive id",
        ),
        id="subject-project-glob",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, ref_type: merge}\n"),
        ("binding.yaml", 5, "subjects[0].ref_type", "unknown value 'merge'; allowed: branch, tag"),
        id="subject-enum",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, ref: 'a/**'}\n"),
        ("binding.yaml", 5, "subjects[0].ref", "'**' is not allowed in claim values"),
        id="subject-double-star",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, ref: ['']}\n"),
        ("binding.yaml", 5, "subjects[0].ref[0]", "must not be empty"),
        id="subject-empty-value",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, user_id: 1.5}\n"),
        ("binding.yaml", 5, "subjects[0].user_id", "expected a string, an integer or true/false, got 1.5"),
        id="subject-float",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, user_id: 017}\n"),
        ("binding.yaml", 5, "subjects[0].user_id", "YAML reads 017 as the number 15: quote it"),
        id="subject-non-decimal-number",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, claims: {aud: x}}\n"),
        (
            "binding.yaml",
            5,
            "subjects[0].claims.aud",
            "claim 'aud' is checked by the token validation itself",
        ),
        id="subject-reserved-claim",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, claims: {ref: x}}\n"),
        (
            "binding.yaml",
            5,
            "subjects[0].claims.ref",
            "write 'ref' as a key of the subject, not under claims",
        ),
        id="subject-typed-claim-under-claims",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, claims: {a: null}}\n"),
        ("binding.yaml", 5, "subjects[0].claims.a", "expected a string, an integer or true/false, got null"),
        id="subject-null-claim",
    ),
    pytest.param(
        _with(binding=BINDING_HEAD + "  - {project: 1, refs: main}\n"),
        ("binding.yaml", 5, "subjects[0].refs", "unknown key 'refs' (did you mean 'ref'?)"),
        id="subject-unknown-key",
    ),
    pytest.param(
        _with(
            issuer=(
                "kind: Issuer\nname: gitlab\ntype: oidc\n"
                "url: https://idp.example.com\njwks_uri: https://idp.example.com/keys\n"
            ),
            binding=BINDING_HEAD + "  - {claims: {sub: x}, ref: main}\n",
        ),
        ("binding.yaml", 5, "subjects[0].ref", "only for gitlab issuers"),
        id="oidc-subject-gitlab-key",
    ),
    pytest.param(
        _with(
            issuer=(
                "kind: Issuer\nname: gitlab\ntype: oidc\n"
                "url: https://idp.example.com\njwks_uri: https://idp.example.com/keys\n"
            ),
            binding=BINDING_HEAD + "  - {}\n",
        ),
        ("binding.yaml", 5, "subjects[0].claims", "missing required key for oidc issuers"),
        id="oidc-subject-needs-claims",
    ),
    pytest.param(
        _with(binding="kind: Binding\nname: ci\nroles: [read]\nmode: audit\nsubjects: [{project: 1}]\n"),
        ("binding.yaml", 4, "mode", "unknown mode 'audit'; allowed: enforce, shadow"),
        id="binding-mode",
    ),
    pytest.param(
        _with(binding="kind: Binding\nname: ci\nroles: [reed]\nsubjects: [{project: 1}]\n"),
        ("binding.yaml", 3, "roles[0]", "no Role named 'reed' (did you mean 'read'?)"),
        id="binding-role-unknown",
    ),
    pytest.param(
        _with(binding="kind: Binding\nname: ci\nroles: []\nsubjects: [{project: 1}]\n"),
        ("binding.yaml", 3, "roles", "must not be empty"),
        id="binding-roles-empty",
    ),
    pytest.param(
        _with(binding="kind: Binding\nname: ci\nissuer: gitlb\nroles: [read]\nsubjects: [{project: 1}]\n"),
        ("binding.yaml", 3, "issuer", "no Issuer named 'gitlb' (did you mean 'gitlab'?)"),
        id="binding-issuer-unknown",
    ),
    # Issuer: jwks and api (live GitLab)
    pytest.param(
        _with(issuer=GITLAB_HEAD + "jwks: local\n"),
        ("issuer.yaml", 5, "jwks", "unknown jwks mode 'local'; allowed: relay, remote"),
        id="jwks-mode-unknown",
    ),
    pytest.param(
        _with(
            issuer=OIDC_HEAD + "api: {token_env: GITLAB_TOKEN}\n",
            binding="kind: Binding\nname: ci\nroles: [read]\nsubjects: [{claims: {sub: x}}]\n",
        ),
        ("issuer.yaml", 6, "api", "only for gitlab issuers"),
        id="api-on-oidc",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "inventory: inv.yaml\napi: {token_env: GITLAB_TOKEN}\n", inv="groups: []\n"),
        ("issuer.yaml", 6, "api", "use either inventory (offline) or api (live GitLab)"),
        id="api-and-inventory",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  groups: [acme]\n"),
        ("issuer.yaml", 6, "api.token_env", "missing required key: token_env or token_file"),
        id="api-token-missing",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: GITLAB_TOKEN\n  token_file: /run/secrets/gitlab\n"),
        ("issuer.yaml", 7, "api.token_file", "use token_env or token_file, not both"),
        id="api-token-twice",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api: {token_env: gitlab-token}\n"),
        ("issuer.yaml", 5, "api.token_env", "expected an environment variable name such as GITLAB_TOKEN"),
        id="api-token-env-name",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api: {token_file: secrets/gitlab}\n"),
        ("issuer.yaml", 5, "api.token_file", "expected an absolute path, got 'secrets/gitlab'"),
        id="api-token-file-relative",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: GITLAB_TOKEN\n  token: glpat-abcdefghijklmnop\n"),
        ("issuer.yaml", 7, "api.token", "tokens never go in policy files"),
        id="api-literal-token",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "private_token: glpat-abcdefghijklmnop\n"),
        ("issuer.yaml", 5, "private_token", "tokens never go in policy files"),
        id="issuer-literal-private-token",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api: {token_env: T, url: 'ftp://gitlab.example.com'}\n"),
        ("issuer.yaml", 5, "api.url", "expected an http(s) URL"),
        id="api-url-scheme",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  groups: [acme, 'acme/*']\n"),
        ("issuer.yaml", 7, "api.groups[1]", "expected a group path or a positive id, got 'acme/*' (no globs)"),
        id="api-group-glob",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  groups: [0]\n"),
        ("issuer.yaml", 7, "api.groups[0]", "expected a positive integer within GitLab's 64-bit ids, got '0'"),
        id="api-group-id",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  reconcile: 5s\n"),
        ("issuer.yaml", 7, "api.reconcile", "must be between 10s and 24h, got 5s"),
        id="api-reconcile-range",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  reconcile: 10m\n  max_staleness: 5m\n"),
        ("issuer.yaml", 8, "api.max_staleness", "must be at least reconcile (10m)"),
        id="api-staleness-below-reconcile",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  max_staleness: 1m\n"),
        ("issuer.yaml", 7, "api.max_staleness", "must be at least reconcile (5m)"),
        id="api-staleness-below-default-reconcile",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  requests_per_second: 0\n"),
        ("issuer.yaml", 7, "api.requests_per_second", "must be between 0.1 and 1000, got 0"),
        id="api-rate-range",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  requests_per_second: true\n"),
        ("issuer.yaml", 7, "api.requests_per_second", "expected a number, got true"),
        id="api-rate-type",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  policy_project: acme\n"),
        ("issuer.yaml", 7, "api.policy_project", "unknown key 'policy_project'"),
        id="api-policy-project-path",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api:\n  token_env: T\n  reconcile_interval: 5m\n"),
        ("issuer.yaml", 7, "api.reconcile_interval", "unknown key 'reconcile_interval' (did you mean 'reconcile'?)"),
        id="api-unknown-key",
    ),
    pytest.param(
        _with(issuer=GITLAB_HEAD + "api: GITLAB_TOKEN\n"),
        ("issuer.yaml", 5, "api", "expected a mapping, got 'GITLAB_TOKEN'"),
        id="api-not-a-mapping",
    ),
]


@pytest.mark.parametrize(("files", "expected"), ERROR_CASES)
def test_each_error_names_file_line_and_field(files: dict[str, str], expected: tuple[str, int, str, str]) -> None:
    """The error is there, at its place; consequences elsewhere (a Role gone missing) may add others."""
    errors = _errors(files)
    listing = "\n".join(map(str, errors))
    at_place = [e.message for e in errors if (e.file, e.line, e.field) == expected[:3]]
    assert len(at_place) == 1, listing
    assert expected[3] in at_place[0], listing
    assert len({(e.file, e.line, e.field) for e in errors}) == len(errors), f"reported twice:\n{listing}"


# --- Issuer: JWKS mode and live GitLab ---------------------------------------------------------------


def test_api_and_jwks_keys_round_trip() -> None:
    issuer = """
        kind: Issuer
        name: gitlab
        type: gitlab
        url: https://gitlab.example.com
        jwks: remote
        api:
          url: https://gitlab-api.internal:8443/gitlab/
          token_file: /run/secrets/gitlab-token
          groups: [acme, acme/platform, 17]
          reconcile: 2m
          max_staleness: 1h
          requests_per_second: 2.5
        """
    (parsed,) = parse_policy(_with(issuer=issuer)).issuers
    assert parsed.jwks_mode is JwksMode.REMOTE
    assert parsed.inventory is None
    assert parsed.api == GitLabApi(
        url="https://gitlab-api.internal:8443/gitlab",
        token_file="/run/secrets/gitlab-token",
        groups=("acme", "acme/platform", "17"),
        reconcile_seconds=120,
        max_staleness_seconds=3600,
        requests_per_second=2.5,
    )


def test_api_defaults_follow_the_issuer() -> None:
    issuer = GITLAB_HEAD + "api: {token_env: GITLAB_TOKEN, requests_per_second: 1000}\n"
    (parsed,) = parse_policy(_with(issuer=issuer)).issuers
    assert parsed.jwks_mode is JwksMode.RELAY
    assert parsed.api == GitLabApi(
        url="https://g.example.com",
        token_env="GITLAB_TOKEN",
        groups=(),
        reconcile_seconds=300,
        max_staleness_seconds=None,
        requests_per_second=1000.0,
    )


def _field_default(cls: type, name: str) -> object:
    (found,) = [f for f in fields(cls) if f.name == name]
    assert found.default is not MISSING, f"{cls.__name__}.{name} has no default"
    return found.default


def test_an_omitted_optional_key_gets_the_dataclass_default() -> None:
    """Drift guard for "one place for each default": what the loader fills in for an absent key is exactly the
    field's default in model/policy.py (and model/inventory.py), and both are the named constant."""
    files = _with(
        issuer=GITLAB_HEAD + "inventory: inv.yaml\n",
        inv="groups: [{id: 10, path: acme}]\nprojects: [{id: 42, path: acme/app, namespace_id: 10}]\n",
        backend=BACKEND_HEAD + "hosts: [api.example.com]\nendpoints: [{address: a, port: 8}]\n"
        "inject: {secret_env: API_KEY}\n",
    )
    policy = parse_policy(files)
    (issuer,), (backend,), (binding,) = policy.issuers, policy.backends, policy.bindings
    assert backend.inject is not None and issuer.inventory is not None
    live = GITLAB_HEAD + "api: {token_env: GITLAB_TOKEN}\n"
    (watched,) = parse_policy(_with(issuer=live)).issuers
    assert watched.api is not None
    read = {
        (Issuer, "jwks_mode"): issuer.jwks_mode,
        (GitLabApi, "reconcile_seconds"): watched.api.reconcile_seconds,
        (GitLabApi, "requests_per_second"): watched.api.requests_per_second,
        (Backend, "credentials"): backend.credentials,
        (Injection, "header"): backend.inject.header,
        (Injection, "prefix"): backend.inject.prefix,
        (Binding, "credential_ttl_seconds"): binding.credential_ttl_seconds,
        (Project, "archived"): issuer.inventory.projects[0].archived,
    }
    assert read == {key: _field_default(*key) for key in read}
    constants = {
        (Issuer, "jwks_mode"): DEFAULT_JWKS_MODE,
        (GitLabApi, "reconcile_seconds"): DEFAULT_RECONCILE_SECONDS,
        (GitLabApi, "requests_per_second"): DEFAULT_REQUESTS_PER_SECOND,
        (Backend, "credentials"): DEFAULT_BACKEND_CREDENTIALS,
        (Injection, "header"): DEFAULT_INJECTION_HEADER,
        (Injection, "prefix"): DEFAULT_INJECTION_PREFIX,
        (Binding, "credential_ttl_seconds"): DEFAULT_CREDENTIAL_TTL_SECONDS,
        (Project, "archived"): DEFAULT_ARCHIVED,
    }
    assert read == constants
    # The GitLab client built without the policy's value (the policy repository's reader) uses the same bound.
    assert signature(GitLabSource).parameters["requests_per_second"].default == DEFAULT_REQUESTS_PER_SECOND


def test_jwks_mode_applies_to_oidc_issuers_too() -> None:
    files = _with(
        issuer2=OIDC_HEAD.replace("name: gitlab", "name: okta") + "jwks: remote\n",
        binding="kind: Binding\nname: ci\nissuer: gitlab\nroles: [read]\nsubjects: [{project: 42}]\n",
    )
    modes = {i.name: i.jwks_mode for i in parse_policy(files).issuers}
    assert modes == {"gitlab": JwksMode.RELAY, "okta": JwksMode.REMOTE}


def test_a_token_written_in_policy_is_rejected_without_being_echoed() -> None:
    secret = "glpat-abcdefghijklmnop"
    errors = _errors(_with(issuer=GITLAB_HEAD + f"api:\n  token_env: GITLAB_TOKEN\n  private_token: {secret}\n"))
    assert [e.field for e in errors] == ["api.private_token"]
    assert secret not in str(errors[0]) and "token_env or token_file" in errors[0].message


def test_duplicate_names_are_reported_at_both_places() -> None:
    files = _with(role2=ROLE_HEAD + "backend: api\nrules: [{methods: [GET]}]\n")
    errors = _errors(files)
    assert [(e.file, e.line, e.field) for e in errors] == [
        ("role.yaml", 1, "name"),
        ("role2.yaml", 1, "name"),
    ]
    assert "also used by Role 'read' at role2.yaml:1" in errors[0].message
    assert "also used by Role 'read' at role.yaml:1" in errors[1].message


def test_duplicate_hosts_are_reported_on_both_backends() -> None:
    other = """
        kind: Backend
        name: other
        hosts: [x.example.com, api.example.com]
        endpoints: [{address: a, port: 1}]
        """
    errors = _errors(_with(backend2=other))
    assert [(e.file, e.line, e.field) for e in errors] == [
        ("backend.yaml", 3, "hosts[0]"),
        ("backend2.yaml", 3, "hosts[1]"),
    ]
    assert "Backend 'other' at backend2.yaml:3" in errors[0].message


def test_issuer_is_required_when_there_are_several() -> None:
    second = "kind: Issuer\nname: okta\ntype: oidc\nurl: https://i.example.com\njwks_uri: https://i.example.com/k\n"
    file, line, field, message = _only_error(_with(issuer2=second))
    assert (file, line, field) == ("binding.yaml", 1, "issuer")
    assert "one of gitlab, okta" in message


def test_many_errors_are_reported_at_once_sorted_by_file_and_line() -> None:
    files = _with(
        backend=BACKEND_HEAD + "hosts: [api.example.com]\nendpoints: [{address: a, port: 0}]\ntls: maybe\n",
        role=ROLE_HEAD + "backend: api\nrules: [{methods: [GET], paths: [x]}]\nextra: 1\n",
        binding="""
            kind: Binding
            name: ci
            roles: [read, nope]
            subjects:
              - project: 42
                ref_protected: 'yes'
              - group: acme
                environment_protected: on
            """,
    )
    rendered = [str(e) for e in _errors(files)]
    assert rendered == [
        "backend.yaml:4: endpoints[0].port: must be between 1 and 65535, got 0",
        "backend.yaml:5: tls: expected a mapping, got 'maybe'",
        "binding.yaml:3: roles[1]: no Role named 'nope'",
        "binding.yaml:6: subjects[0].ref_protected: expected true or false, got 'yes'",
        "binding.yaml:8: subjects[1].environment_protected: expected true or false, got 'on'"
        " (quote it if you mean the string)",
        "role.yaml:4: rules[0].paths[0]: must start with '/', got 'x'",
        "role.yaml:5: extra: unknown key 'extra'; allowed: apiVersion, backend, kind, name, rules",
    ]


def test_a_broken_file_does_not_cascade_into_missing_references() -> None:
    """Names declared after a syntax error cannot be seen; references to them are not blamed."""
    files = _with(role=ROLE_HEAD + "backend: api\nrules: [\n")
    errors = _errors(files)
    assert [(e.file, e.field) for e in errors] == [("role.yaml", "")]


def test_inventory_like_file_without_reference_gets_a_hint() -> None:
    file, line, field, message = _only_error(_with(inv="groups: [{id: 1, path: acme}]\n"))
    assert (file, line, field) == ("inv.yaml", 1, "kind")
    assert "reference this file from an Issuer's inventory" in message


def test_claim_values_become_strings() -> None:
    binding = """
        kind: Binding
        name: ci
        roles: [read]
        subjects:
          - project: 42
            ref_protected: false
            user_id: [7, "8"]
            claims: {custom: true}
        """
    (subject,) = parse_policy(_with(binding=binding)).bindings[0].subjects
    assert [(c.claim, c.values) for c in subject.claims] == [
        ("custom", ("true",)),
        ("ref_protected", ("false",)),
        ("user_id", ("7", "8")),
    ]
    assert subject.projects == (42,)


def test_empty_documents_and_comment_only_files_are_ignored() -> None:
    files = dict(BASE, **{"empty.yaml": "", "comments.yaml": "# nothing yet\n---\n---\n"})
    assert parse_policy(files).files == tuple(sorted(files))


# --- yaml_source -------------------------------------------------------------------------------------


def test_yaml_keeps_types_and_lines() -> None:
    parsed = parse_yaml("f.yaml", "a: 1\nb:\n  - true\n  - '2'\n  - 2024-01-01\n")
    assert parsed.complete and not parsed.errors
    (doc,) = parsed.documents
    assert to_plain(doc) == {"a": 1, "b": [True, "2", "2024-01-01"]}
    assert doc.key_line("b") == 2 and doc.get("b").items[2].line == 5  # type: ignore[union-attr]


def test_yaml_syntax_error_stops_the_file_but_keeps_earlier_documents() -> None:
    parsed = parse_yaml("f.yaml", "a: 1\n---\nb: [\n")
    assert not parsed.complete
    assert len(parsed.documents) == 1
    assert [(e.file, e.line) for e in parsed.errors] == [("f.yaml", 3)]


# --- policy directory --------------------------------------------------------------------------------


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_policy_dir_reads_yaml_recursively_and_skips_hidden_and_editor_files(tmp_path: Path) -> None:
    _write_tree(tmp_path, FULL)
    _write_tree(
        tmp_path,
        {
            ".git/config.yaml": "x: [",
            ".hidden.yaml": "x: [",
            ".#bindings.yaml": "x: [",
            "bindings.yaml~": "x: [",
            "bindings.yaml.swp": "x: [",
            "README.md": "# policy",
        },
    )
    texts = read_policy_dir(tmp_path)
    assert list(texts) == sorted(FULL)
    assert texts == FULL
    assert load_policy_dir(tmp_path) == _expected_full_policy()


def test_policy_dir_missing_or_empty_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PolicyInvalid, match=r"nope.*does not exist"):
        read_policy_dir(missing)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(PolicyInvalid) as raised:
        load_policy_dir(tmp_path)
    assert raised.value.errors[0].file == str(tmp_path)
    assert "no policy files" in raised.value.errors[0].message


def test_policy_dir_reports_files_that_are_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"kind: Role\nname: \xff\n")
    with pytest.raises(PolicyInvalid) as raised:
        read_policy_dir(tmp_path)
    assert [(e.file, e.line) for e in raised.value.errors] == [("bad.yaml", 1)]
    assert "not UTF-8" in raised.value.errors[0].message


def test_binding_credential_ttl() -> None:
    binding = """kind: Binding
name: b
issuer: gitlab
roles: [r]
credential_ttl: 10m
subjects: [{project: 42}]
"""
    files = {
        "i.yaml": "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n",
        "r.yaml": "kind: Backend\nname: x\nhosts: [x.local]\nendpoints: [{address: 127.0.0.1, port: 1}]\n---\n"
        "kind: Role\nname: r\nbackend: x\nrules: [{methods: [GET]}]\n",
        "b.yaml": binding,
    }
    assert parse_policy(files).bindings[0].credential_ttl_seconds == 600
    files["b.yaml"] = binding.replace("10m", "5s")
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(files)
    assert raised.value.errors[0].field == "credential_ttl" and raised.value.errors[0].line == 5


def test_a_reload_parses_only_the_files_that_changed() -> None:
    """A policy commit usually touches one file of many: the others' YAML is not composed again."""
    files = {f"team-{i}.yaml": f"kind: Role\nname: r{i}\nbackend: b\nrules: [{{methods: [GET]}}]\n" for i in range(5)}
    cache = ParseCache()
    for name, text in files.items():
        cache.parse(name, text)
    before = cache.info()
    changed = {**files, "team-0.yaml": files["team-0.yaml"] + "# edited\n"}
    results = [cache.parse(name, text) for name, text in changed.items()]
    after = cache.info()
    assert (after.hits - before.hits, after.misses - before.misses) == (4, 1)
    assert all(r.complete and not r.errors for r in results)


# --- reloading: documents of unchanged files are reused, never with a stale view of the tree -------------


def _errors_of(files: dict[str, str], loader: PolicyLoader | None = None) -> list[str]:
    with pytest.raises(PolicyInvalid) as invalid:
        loader.load(files) if loader is not None else parse_policy(files)
    return [str(e) for e in invalid.value.errors]


def test_a_reload_reuses_the_documents_of_unchanged_files() -> None:
    loader = PolicyLoader()
    first = loader.load(FULL)
    changed = {**FULL, "roles.yml": FULL["roles.yml"].replace("methods: [GET, HEAD]", "methods: [GET]")}
    second = loader.load(changed)
    assert second.backends[0] is first.backends[0] and second.bindings[0] is first.bindings[0]
    assert second.roles[0] is not first.roles[0] and second.roles[0] != first.roles[0]
    assert (loader.cache_info().hits, loader.cache_info().misses) == (len(FULL) - 1, len(FULL) + 1)
    assert PolicyLoader().load(changed) == second == parse_policy(changed)


def test_one_shot_loads_share_nothing() -> None:
    """`parse_policy` keeps no memo: validate, compile and the tests never see another load's objects."""
    first, second = parse_policy(FULL), parse_policy(FULL)
    assert first == second and first.backends[0] is not second.backends[0]


def test_an_unchanged_binding_sees_a_role_removed_from_another_file() -> None:
    loader = PolicyLoader()
    loader.load(FULL)
    without = {**FULL, "roles.yml": FULL["roles.yml"].split("---")[0]}
    errors = _errors_of(without, loader)
    assert any(e.startswith("bindings.yaml:") and "no Role named 'apps-all'" in e for e in errors), errors


def test_an_unchanged_binding_sees_its_issuer_change_type() -> None:
    """Subjects depend on the issuer's type (GitLab keys are refused for an oidc issuer)."""
    loader = PolicyLoader()
    loader.load(FULL)
    gitlab_as_oidc = FULL["issuers.yaml"].replace(
        "type: gitlab\nurl: https://gitlab.example.com\ninventory: inventory/gitlab.yaml",
        "type: oidc\nurl: https://gitlab.example.com\njwks_uri: https://gitlab.example.com/oauth/discovery/keys",
    )
    assert gitlab_as_oidc != FULL["issuers.yaml"]
    errors = _errors_of({**FULL, "issuers.yaml": gitlab_as_oidc}, loader)
    assert any(e.startswith("bindings.yaml:") for e in errors), errors


def test_an_unchanged_backend_still_claims_its_hosts() -> None:
    """Same names before and after, so api.yaml's documents are reused: their hosts must still be claimed."""
    other = "kind: Backend\nname: copy\nhosts: [{host}]\nendpoints: [{{address: 10.0.0.9, port: 80}}]\n"
    loader = PolicyLoader()
    loader.load({**FULL, "backends/copy.yaml": other.format(host="copy.internal")})
    errors = _errors_of({**FULL, "backends/copy.yaml": other.format(host="api.internal")}, loader)
    assert any(e.startswith("backends/api.yaml:") and "host is also served by" in e for e in errors), errors
    assert any(e.startswith("backends/copy.yaml:") and "host is also served by" in e for e in errors), errors


def test_a_document_that_failed_is_reported_again_on_the_next_load() -> None:
    broken = {**FULL, "roles.yml": FULL["roles.yml"].replace("backend: api\n", "backend: nope\n")}
    loader = PolicyLoader()
    assert _errors_of(broken, loader) == _errors_of(broken, loader)


# --- hostile input: only regular files inside the tree, bounded sizes, bounded nesting, short quotes ----------


def _read_in_time(root: Path, timeout: float = 10.0, **limits: int) -> tuple[dict[str, str] | None, list[str]]:
    """read_policy_dir in a thread with a deadline: a read that blocks (a FIFO) fails the test instead of hanging it."""
    outcome: list[tuple[dict[str, str] | None, list[str]]] = []

    def run() -> None:
        try:
            outcome.append((read_policy_dir(root, ReadLimits(**limits) if limits else ReadLimits()), []))
        except PolicyInvalid as invalid:
            outcome.append((None, [str(e) for e in invalid.errors]))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "read_policy_dir blocked"
    assert outcome, "read_policy_dir raised something other than PolicyInvalid"
    return outcome[0]


def test_a_symlink_leaving_the_tree_is_an_error_and_its_target_is_never_quoted(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("upstream-api-key-SUPERSECRET-0123456789\n")
    root = tmp_path / "policy"
    _write_tree(root, FULL)
    (root / "leak.yaml").symlink_to(secret)
    texts, errors = _read_in_time(root)
    assert texts is None
    assert len(errors) == 1 and errors[0].startswith("leak.yaml:1: ") and "outside the policy tree" in errors[0]
    assert "SUPERSECRET" not in errors[0] and str(secret) not in errors[0]


def test_a_symlink_inside_the_tree_is_read(tmp_path: Path) -> None:
    """Kubernetes ConfigMap volumes are all symlinks: x.yaml -> ..data/x.yaml -> ..2024_01/x.yaml."""
    _write_tree(tmp_path / "..2024_01", FULL)
    (tmp_path / "..data").symlink_to("..2024_01")
    for name in FULL:
        if "/" not in name:
            (tmp_path / name).symlink_to(f"..data/{name}")
    texts, errors = _read_in_time(tmp_path)
    assert not errors and texts is not None and set(texts) == {n for n in FULL if "/" not in n}


def test_fifos_devices_and_sockets_are_errors_not_reads(tmp_path: Path) -> None:
    _write_tree(tmp_path, FULL)
    os.mkfifo(tmp_path / "p.yaml")
    (tmp_path / "z.yaml").symlink_to("/dev/zero")  # leaves the tree, and is a device
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.yaml"))
        texts, errors = _read_in_time(tmp_path)
    assert texts is None
    by_file = {e.split(":")[0]: e for e in errors}
    assert set(by_file) == {"p.yaml", "s.yaml", "z.yaml"}, errors
    assert "not a regular file (a named pipe)" in by_file["p.yaml"]
    assert "not a regular file (a socket)" in by_file["s.yaml"]
    assert all(e.split(":")[1] == "1" for e in errors)


def test_a_device_inside_the_tree_is_refused_by_type(tmp_path: Path) -> None:
    """/dev/zero grew the server to 5 GB; a device reached without a symlink is refused by its type too."""
    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    _write_tree(tmp_path, FULL)
    os.mknod(tmp_path / "zero.yaml", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is
    texts, errors = _read_in_time(tmp_path)
    assert texts is None and len(errors) == 1
    assert errors[0].startswith("zero.yaml:1: ") and "not a regular file (a character device)" in errors[0]


def test_file_and_tree_size_bounds(tmp_path: Path) -> None:
    _write_tree(tmp_path, FULL)
    (tmp_path / "big.yaml").write_text("# " + "x" * 5000 + "\n")
    texts, errors = _read_in_time(tmp_path, max_file_bytes=4096)
    assert texts is None and len(errors) == 1
    assert errors[0].startswith("big.yaml:1: ") and "larger than the 4096-byte limit" in errors[0]
    total = sum(len(t.encode()) for t in FULL.values()) + 5003
    texts, errors = _read_in_time(tmp_path, max_tree_bytes=total - 1)
    assert texts is None and len(errors) == 1 and f"more than the {total - 1}-byte limit" in errors[0]
    texts, errors = _read_in_time(tmp_path, max_tree_bytes=total)
    assert not errors and texts is not None


def test_a_file_that_grows_while_read_is_cut_at_the_bound(tmp_path: Path) -> None:
    """fstat said small, but the read stops at the bound whatever the file turns into meanwhile."""
    (tmp_path / "a.yaml").write_text("x" * 100)
    fd = os.open(tmp_path / "a.yaml", os.O_RDONLY)
    try:
        assert regularfile.read_bounded(fd, 10) is None
        os.lseek(fd, 0, os.SEEK_SET)
        assert regularfile.read_bounded(fd, 100) == b"x" * 100
    finally:
        os.close(fd)


def _nested(depth: int) -> str:
    return "kind: Role\nname: r\nbackend: b\nrules: " + "[" * depth + "]" * depth + "\n"


@pytest.mark.parametrize("depth", [65, 900, 200_000])
def test_deep_nesting_is_an_error_with_file_and_line_not_a_crash(depth: int) -> None:
    parsed = parse_yaml("deep.yaml", _nested(depth))
    assert len(parsed.errors) == 1
    error = str(parsed.errors[0])
    assert error.startswith("deep.yaml:4: ") and "nested deeper than 64 levels" in error, error
    if depth < 1000:  # past 1,000 levels libyaml stops first, with the line but no field
        assert error.startswith("deep.yaml:4: rules" + "[0]" * 63 + ": ")
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy({"deep.yaml": _nested(depth)})
    assert any("nested deeper than 64" in str(e) for e in raised.value.errors)


def test_deep_block_nesting_names_the_field_path() -> None:
    text = "kind: Role\nname: r\nrules:\n  - paths:\n" + "".join("  " * (i + 2) + "- \n" for i in range(70))
    parsed = parse_yaml("deep.yaml", text.replace("- \n", "-\n"))
    (error,) = parsed.errors
    assert error.field.startswith("rules[0].paths[0][0]") and error.line > 4, error


def test_nesting_at_the_bound_is_accepted() -> None:
    parsed = parse_yaml("ok.yaml", "a: " + "[" * 63 + "]" * 63 + "\n")
    assert parsed.complete and not parsed.errors


def test_error_messages_quote_at_most_a_short_value() -> None:
    long = "upstream-api-key-SUPERSECRET-" + "x" * 200
    errors = _errors_of({**FULL, "roles.yml": FULL["roles.yml"].replace("backend: api\n", f"backend: {long}\n", 1)})
    (quoted,) = [e for e in errors if "SUPERSECRET" in e]
    assert "x" * 40 not in quoted and "…" in quoted
    errors = _errors_of({**FULL, "b.yaml": f"kind: Backend\nname: x\nhosts: [x.local]\nendpoints: {long}\n"})
    assert all(len(e) < 200 for e in errors), errors


def test_the_parse_cache_keeps_only_the_latest_text_of_each_file_within_a_byte_bound() -> None:
    """86 -> 237 MB: the old cache kept every 50 MB file it had seen."""
    big = "a: '" + "x" * 1_000_000 + "'\n"
    cache = ParseCache()
    for i in range(40):
        cache.parse("big.yaml", big + f"# {i}\n")
    assert cache.info().bytes <= 2_000_000
    for i in range(40):
        cache.parse(f"f{i}.yaml", big)
    assert cache.info().bytes <= PARSE_CACHE_BYTES


# --- bounded errors: one hostile file cannot multiply into millions of errors --------------------------------


def _invalid(files: dict[str, str]) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(files)
    return raised.value


def _timed_invalid(files: dict[str, str], within: float) -> PolicyInvalid:
    started = time.perf_counter()
    invalid = _invalid(files)
    elapsed = time.perf_counter() - started
    assert elapsed < within, f"took {elapsed:.1f}s"
    return invalid


def test_a_long_list_of_bad_items_stops_at_the_error_bound() -> None:
    """2.1M bad items in 4 MB once gave 2.1M errors, 45 s of reload and 1.2 GB: a file shows at most 100."""
    items = ",".join(["1"] * 100_000)
    invalid = _timed_invalid(_with(role=ROLE_HEAD + f"backend: api\nrules: [{items}]\n"), within=10.0)
    assert len(invalid.errors) == errors_module.MAX_ERRORS_PER_FILE
    assert str(invalid.errors[0]) == "role.yaml:4: rules[0]: expected a mapping, got 1"
    assert "more errors not shown" in str(invalid).splitlines()[-1]
    assert len(str(invalid)) < 20_000


def test_many_unknown_keys_stop_at_the_error_bound() -> None:
    keys = "".join(f"  k{i}: 1\n" for i in range(20_000))
    invalid = _timed_invalid(_with(role=ROLE_HEAD + "backend: api\nrules:\n- methods: [GET]\n" + keys), within=10.0)
    assert len(invalid.errors) == errors_module.MAX_ERRORS_PER_FILE
    assert invalid.stopped and str(invalid).endswith("... and more errors not shown")


def test_many_duplicate_keys_stop_at_the_error_bound() -> None:
    keys = "".join("  methods: [GET]\n" for _ in range(20_000))
    invalid = _timed_invalid(_with(role=ROLE_HEAD + "backend: api\nrules:\n-" + keys[1:]), within=10.0)
    assert len(invalid.errors) == errors_module.MAX_ERRORS_PER_FILE
    assert str(invalid).endswith("... and more errors not shown (19899 counted before checking stopped)")


def test_errors_across_many_files_stop_at_the_total_bound() -> None:
    bad = ROLE_HEAD.replace("read", "r{i}") + "backend: api\nrules: [" + ",".join(["1"] * 50) + "]\n"
    files = {**BASE, **{f"roles/{i:03}.yaml": bad.format(i=i) for i in range(50)}}
    invalid = _invalid(files)
    assert len(invalid.errors) == errors_module.MAX_ERRORS
    assert str(invalid).endswith("... and more errors not shown")


def test_duplicate_names_give_linear_error_text() -> None:
    """Each of 2,000 repeats listed every other one: 6,000 errors and 108 MB of text from a 46 KB file."""
    n = 5_000
    invalid = _timed_invalid(_with(role2=(ROLE_HEAD + "backend: api\nrules: [{methods: [GET]}]\n---\n") * n), 10.0)
    assert invalid.total == n + 1  # every later definition, and the first one
    assert len(str(invalid)) < 100 * 200  # the shown ones, each naming one other place
    first = next(e for e in invalid.errors if e.file == "role.yaml")
    assert first.message.endswith(f"also used by Role 'read' at role2.yaml:1 and {n - 1} more places")
    later = next(e for e in invalid.errors if e.file == "role2.yaml" and e.line == 6)
    assert later.message == "duplicate name, also used by Role 'read' at role.yaml:1 (the first definition)"


def test_a_huge_integer_is_an_error_with_file_and_line() -> None:
    """int() refuses more than 4,300 digits: the ValueError escaped as an internal error naming no file."""
    file, line, field, message = _only_error(_with(binding=BINDING_HEAD + "- project: " + "9" * 5000 + "\n"))
    assert (file, line, field) == ("binding.yaml", 5, "subjects[0].project")
    assert message.startswith("number too long (5000 characters")


def test_a_huge_sexagesimal_integer_is_refused_at_once() -> None:
    """YAML 1.1 reads 1:59:59 as an integer in base 60; PyYAML builds it in quadratic time."""
    file, line, field, message = _only_error(_with(binding=BINDING_HEAD + "- project: 1" + ":59" * 200_000 + "\n"))
    assert (file, line, field) == ("binding.yaml", 5, "subjects[0].project")
    assert message.startswith("number too long")


def test_a_long_float_is_an_error_with_file_and_line() -> None:
    file, line, field, message = _only_error(_with(binding=BINDING_HEAD + "- project: 1." + "5" * 5000 + "\n"))
    assert (file, line, field) == ("binding.yaml", 5, "subjects[0].project")
    assert message.startswith("number too long")


def test_a_symlink_to_a_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    """A linked directory was skipped in silence: a team's files could vanish from the policy unnoticed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "bad.yaml").write_text("kind: Nope\n")
    root = tmp_path / "policy"
    _write_tree(root, BASE)
    (root / "team").symlink_to(outside)
    (root / "dev").symlink_to("/dev")
    with pytest.raises(PolicyInvalid) as raised:
        read_policy_dir(root)
    assert [str(e) for e in raised.value.errors] == [
        "dev:1: a symlink to a directory: not followed (link the files, or copy the directory)",
        "team:1: a symlink to a directory: not followed (link the files, or copy the directory)",
    ]


def test_a_file_of_too_many_values_is_refused_before_it_is_built() -> None:
    """Composing 2.1M list items (4 MB) took 1 GB and 14 s before any check ran: values are counted first."""
    limit = yaml_source.MAX_NODES_PER_FILE
    items = ",".join(["1"] * (limit + 10))
    file, line, field, message = _only_error(_with(role=ROLE_HEAD + f"backend: api\nrules: [{items}]\n"))
    assert (file, line, field) == ("role.yaml", 4, "")
    assert message == f"more than {limit} values (scalars, lists and mappings) in one file: split it"
    parsed = parse_yaml("ok.yaml", "rules: [" + ",".join(["1"] * (limit - 10)) + "]\n")
    assert not parsed.errors


@pytest.mark.parametrize("fast", [True, False], ids=["libyaml", "pure-python"])
def test_both_composers_count_values_alike(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    if not fast:
        monkeypatch.setattr(yaml_source, "_FastLoader", None)
    text = "a: 1\nrules:\n" + "- 1\n" * 1000
    parsed = parse_yaml(f"many-{fast}.yaml", text, max_nodes=1000)  # item 996 is value 1,001
    assert [str(e) for e in parsed.errors] == [
        f"many-{fast}.yaml:998: more than 1000 values (scalars, lists and mappings) in one file: split it"
    ]


# --- found by fuzzing (docs/fuzzing.md) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "text", "field"),
    [
        # `$` also matched before a final newline, so a newline reached Envoy names, domains and header names.
        ("role", 'kind: Role\nname: "api\\n"\nbackend: api\nrules: [{paths: ["/**"]}]\n', "name"),
        ("backend", BASE["backend.yaml"].replace("hosts: [api.example.com]", 'hosts: ["api.example.com\\n"]'), "hosts"),
        # `\d` matched any Unicode digit: Arabic-Indic "300s" was a duration.
        ("issuer", BASE["issuer.yaml"] + "jwks_cache: '\u0663\u0660\u0660s'\n", "jwks_cache"),
    ],
)
def test_patterns_match_the_whole_value_in_ascii(stem: str, text: str, field: str) -> None:
    errors = _errors(_with(**{stem: text}))
    assert any(e.field.startswith(field) for e in errors), "\n".join(map(str, errors))


@pytest.mark.parametrize("url", ["http://[", "https://gitlab.ex]mple.com"])
def test_a_url_urlsplit_refuses_is_an_error_with_file_and_line(url: str) -> None:
    file, line, field, message = _only_error(_with(issuer=BASE["issuer.yaml"].replace("url: ", f"url: '{url}' #", 1)))
    assert (file, field) == ("issuer.yaml", "url") and line >= 1 and "URL" in message


@pytest.mark.parametrize("value", ["0xffffffffffffffffffffffff", "99999999999999999999999", str(2**63)])
def test_ids_past_gitlabs_64_bit_range_are_errors(value: str) -> None:
    subject = f"kind: Binding\nname: far\nroles: [read]\nsubjects: [{{project: {value}}}]\n"
    errors = _errors(_with(binding2=subject))
    assert any("project" in e.field and "64-bit" in e.message for e in errors), "\n".join(map(str, errors))


def test_a_syntax_error_at_the_end_names_a_line_the_file_has() -> None:
    for text in ("{", "a: [", "- a\nb"):
        (error,) = _errors(_with(extra=text))
        assert 1 <= error.line <= len(text.splitlines()), (text, error)
