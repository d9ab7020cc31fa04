"""How the REAL Envoy 1.40 can choose a route (so a signing role, docs/envoy-aws-signing.md fact 9) by the job's
token: the route is chosen before jwt_authn runs, so a per-binding AWS role needs the route chosen again after the
token is verified. Observed here: jwt_authn's `clear_route_cache` with routes matching a header from
`claim_to_headers` (and how a job can forge it), or the payload in dynamic metadata (docs/aws-backends.md).

A static Envoy (no control plane): one listener, jwt_authn with an inline JWKS, routes answering directly with the
name of the role they stand for, so the answer says which route served the request. The last two tests (facts 8,
9) route to an echo server instead, to see which filters ran and with which per-route configuration: the set of
filters is fixed from the route chosen before jwt_authn, a filter's per-route configuration is read from the route
finally served (so binding roles sign by per-route configuration, not by a filter each).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.backends import EchoBackend
from tests.support.envoy import EnvoyProcess
from tests.support.ports import LOOPBACK, free_port
from tests.support.role_choice_envoy import HCM_URL, ISSUER, JWT_URL, ROUTER_URL, Issuer, route_taken

pytestmark = pytest.mark.e2e

CLAIM_HEADER = "x-ci-ref-protected"
HEADER_MUTATION_URL = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"


def _bootstrap(
    port: int, jwks: str, *, clear_route_cache: bool, strip_first: str, by_metadata: bool = False
) -> dict[str, Any]:
    provider: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": ["s3"],
        "local_jwks": {"inline_string": jwks},
        "forward": False,
        "claim_to_headers": [{"header_name": CLAIM_HEADER, "claim_name": "ref_protected"}],
        "clear_route_cache": clear_route_cache,
    }
    if by_metadata:  # the payload in dynamic metadata only, no header at all
        del provider["claim_to_headers"]
        provider["payload_in_metadata"] = "jwt_payload"
    filters: list[dict[str, Any]] = []
    if strip_first == "mutation":  # the job's own copy of the header removed before jwt_authn
        mutation = {"mutations": {"request_mutations": [{"remove": CLAIM_HEADER}]}}
        filters.append({"name": "strip", "typed_config": {"@type": HEADER_MUTATION_URL, **mutation}})
    filters.append(
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": JWT_URL,
                "providers": {"ci": provider},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "ci"}}],
            },
        }
    )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_URL}})
    answer = {"status": 200, "body": {"inline_string": "{}"}}
    chooses: dict[str, Any] = {"headers": [{"name": CLAIM_HEADER, "string_match": {"exact": "true"}}]}
    if by_metadata:
        path = [{"key": "jwt_payload"}, {"key": "ref_protected"}]
        metadata = {"filter": "envoy.filters.http.jwt_authn", "path": path, "value": {"bool_match": True}}
        chooses = {"dynamic_metadata": [metadata]}
    routes = [
        {
            "match": {"prefix": "/"} | chooses,
            "direct_response": answer | {"body": {"inline_string": "deploy"}},
        },
        {"match": {"prefix": "/"}, "direct_response": answer | {"body": {"inline_string": "read"}}},
    ]
    hcm = {
        "@type": HCM_URL,
        "stat_prefix": "facts",
        "route_config": {"virtual_hosts": [{"name": "s3", "domains": ["*"], "routes": routes}]}
        | ({"internal_only_headers": [CLAIM_HEADER]} if strip_first == "internal_only" else {}),
        "http_filters": filters,
    }
    listener = {
        "name": "facts",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {"admin": {}, "static_resources": {"listeners": [listener]}}


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


def _envoy(
    issuer: Issuer, *, clear_route_cache: bool, strip_first: str = "", by_metadata: bool = False
) -> Iterator[int]:
    port = free_port()
    boot = _bootstrap(
        port, issuer.jwks, clear_route_cache=clear_route_cache, strip_first=strip_first, by_metadata=by_metadata
    )
    envoy = EnvoyProcess(boot, name="role-choice").start()
    try:
        yield port
    finally:
        envoy.stop()


@pytest.fixture(scope="module")
def chosen_again(issuer: Issuer) -> Iterator[int]:
    yield from _envoy(issuer, clear_route_cache=True)


@pytest.fixture(scope="module")
def chosen_once(issuer: Issuer) -> Iterator[int]:
    yield from _envoy(issuer, clear_route_cache=False)


@pytest.fixture(scope="module")
def stripped(issuer: Issuer) -> Iterator[int]:
    yield from _envoy(issuer, clear_route_cache=True, strip_first="mutation")


@pytest.fixture(scope="module")
def internal_only(issuer: Issuer) -> Iterator[int]:
    yield from _envoy(issuer, clear_route_cache=True, strip_first="internal_only")


def test_without_clear_route_cache_the_route_is_the_one_chosen_before_the_token(
    issuer: Issuer, chosen_once: int
) -> None:
    assert route_taken(chosen_once, issuer.token(ref_protected=True)) == (200, "read")


def test_clear_route_cache_chooses_the_route_again_on_the_claim_header(issuer: Issuer, chosen_again: int) -> None:
    assert route_taken(chosen_again, issuer.token(ref_protected=True)) == (200, "deploy")
    assert route_taken(chosen_again, issuer.token(ref_protected=False)) == (200, "read")
    assert route_taken(chosen_again, issuer.token()) == (200, "read")
    assert route_taken(chosen_again, "not-a-token")[0] == 401


def test_the_claim_header_replaces_a_copy_the_job_sent(issuer: Issuer, chosen_again: int) -> None:
    assert route_taken(chosen_again, issuer.token(ref_protected=False), **{CLAIM_HEADER: "true"}) == (200, "read")


def test_a_job_copy_of_the_header_survives_when_its_token_lacks_the_claim(issuer: Issuer, chosen_again: int) -> None:
    """The danger: a token without the claim leaves the job's own header in place, and it chooses the route."""
    assert route_taken(chosen_again, issuer.token(), **{CLAIM_HEADER: "true"}) == (200, "deploy")


def test_a_header_mutation_before_jwt_authn_is_too_late(issuer: Issuer, stripped: int) -> None:
    """The route was chosen with the job's copy all the same: observed; the likely reason (not observed further) is
    that header_mutation looks the route up for its per-route config before removing, and jwt_authn clears the route
    cache only when it sets a header, which a token without the claim does not make it do."""
    assert route_taken(stripped, issuer.token(), **{CLAIM_HEADER: "true"}) == (200, "deploy")
    assert route_taken(stripped, issuer.token(ref_protected=True)) == (200, "deploy")


def test_internal_only_headers_remove_the_job_copy_before_the_route_is_chosen(
    issuer: Issuer, internal_only: int
) -> None:
    """RouteConfiguration `internal_only_headers`: the connection manager removes them from a request of an external
    peer before any filter; a loopback client counts as external with no `internal_address_config` (as here)."""
    assert route_taken(internal_only, issuer.token(), **{CLAIM_HEADER: "true"}) == (200, "read")
    assert route_taken(internal_only, issuer.token(ref_protected=True)) == (200, "deploy")


@pytest.fixture(scope="module")
def by_metadata(issuer: Issuer) -> Iterator[int]:
    yield from _envoy(issuer, clear_route_cache=True, by_metadata=True)


def test_routes_matching_the_payload_in_dynamic_metadata(issuer: Issuer, by_metadata: int) -> None:
    """RouteMatch `dynamic_metadata` on jwt_authn's `payload_in_metadata`: nothing a job sends can match it."""
    assert route_taken(by_metadata, issuer.token(ref_protected=True)) == (200, "deploy")
    assert route_taken(by_metadata, issuer.token(ref_protected=False)) == (200, "read")
    assert route_taken(by_metadata, issuer.token(), **{CLAIM_HEADER: "true"}) == (200, "read")


@pytest.fixture(scope="module")
def by_metadata_once(issuer: Issuer) -> Iterator[int]:
    yield from _envoy(issuer, clear_route_cache=False, by_metadata=True)


def test_routes_matching_metadata_need_clear_route_cache_too(issuer: Issuer, by_metadata_once: int) -> None:
    assert route_taken(by_metadata_once, issuer.token(ref_protected=True)) == (200, "read")


# -- which filters run, and which per-route configuration they read, once the route is chosen again (facts 8, 9)

FILTER_CONFIG_URL = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
MUTATION_PER_ROUTE_URL = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute"


def _adds(header: str, value: str) -> dict[str, Any]:
    entry = {"append": {"header": {"key": header, "value": value}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}}
    return {"mutations": {"request_mutations": [entry]}}


def _per_route(header: str, value: str) -> dict[str, Any]:
    return {"@type": FILTER_CONFIG_URL, "config": {"@type": MUTATION_PER_ROUTE_URL, **_adds(header, value)}}


def _filters_bootstrap(port: int, echo_port: int, jwks: str) -> dict[str, Any]:
    """Two header_mutation filters standing for two roles' signers, both disabled on the listener: `a` switched on
    for the host, `b` switched on only by the route a `ref_protected: true` token is routed to once jwt_authn wrote
    the payload, which also gives `a` a per-route configuration of its own. Each route adds `x-route` itself (the
    router applies the final route's)."""
    provider = {
        "issuer": ISSUER,
        "audiences": ["s3"],
        "local_jwks": {"inline_string": jwks},
        "forward": False,
        "payload_in_metadata": "jwt_payload",
        "clear_route_cache": True,
    }
    jwt_filter = {
        "@type": JWT_URL,
        "providers": {"ci": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "ci"}}],
    }
    filters = [
        {"name": "envoy.filters.http.jwt_authn", "typed_config": jwt_filter},
        {"name": "a", "disabled": True, "typed_config": {"@type": HEADER_MUTATION_URL, **_adds("x-filter", "a")}},
        {"name": "b", "disabled": True, "typed_config": {"@type": HEADER_MUTATION_URL, **_adds("x-filter", "b")}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_URL}},
    ]
    chosen = {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": "jwt_payload"}, {"key": "ref_protected"}]}
    deploy = {
        "match": {"prefix": "/", "dynamic_metadata": [chosen | {"value": {"bool_match": True}}]},
        "route": {"cluster": "echo"},
        "request_headers_to_add": [{"header": {"key": "x-route", "value": "deploy"}}],
        "typed_per_filter_config": {
            "a": _per_route("x-per-route", "deploy"),
            "b": _per_route("x-per-route-b", "deploy"),
        },
    }
    read = {
        "match": {"prefix": "/"},
        "route": {"cluster": "echo"},
        "request_headers_to_add": [{"header": {"key": "x-route", "value": "read"}}],
    }
    host = {
        "name": "s3",
        "domains": ["*"],
        "routes": [deploy, read],
        "typed_per_filter_config": {"a": _per_route("x-per-route", "host")},
    }
    hcm = {"@type": HCM_URL, "stat_prefix": "facts", "route_config": {"virtual_hosts": [host]}, "http_filters": filters}
    listener = {
        "name": "facts",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    endpoint = {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": echo_port}}}}
    cluster = {
        "name": "echo",
        "type": "STATIC",
        "load_assignment": {"cluster_name": "echo", "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    return {"admin": {}, "static_resources": {"listeners": [listener], "clusters": [cluster]}}


@pytest.fixture(scope="module")
def filters_chosen_again(issuer: Issuer) -> Iterator[int]:
    echo = EchoBackend(name="facts-echo").start()
    port = free_port()
    envoy = EnvoyProcess(_filters_bootstrap(port, echo.port, issuer.jwks), name="role-filters").start()
    try:
        yield port
    finally:
        envoy.stop()
        echo.stop()


def _seen(port: int, token: str) -> dict[str, str]:
    """The headers the upstream received."""
    status, body = route_taken(port, token)
    assert status == 200, body
    headers: dict[str, str] = json.loads(body)["headers"]
    return {k.lower(): v for k, v in headers.items()}


def test_the_filters_that_run_are_those_of_the_route_chosen_before_jwt_authn(
    issuer: Issuer, filters_chosen_again: int
) -> None:
    """Fact 8: the re-chosen route serves (`x-route: deploy`), but the filters that ran are the first route's: `a`
    (switched on for the host), not `b` (switched on only by the deploy route)."""
    seen = _seen(filters_chosen_again, issuer.token(ref_protected=True))
    assert seen["x-route"] == "deploy"
    assert seen["x-filter"] == "a"  # `b` never ran
    assert "x-per-route-b" not in seen


def test_a_filter_reads_its_per_route_configuration_from_the_route_finally_served(
    issuer: Issuer, filters_chosen_again: int
) -> None:
    """Fact 9: filter `a` applied the deploy route's per-route configuration, which the route chosen before jwt_authn
    does not have; a token routed to `read` gets the host's."""
    assert "deploy" in _seen(filters_chosen_again, issuer.token(ref_protected=True))["x-per-route"]
    read = _seen(filters_chosen_again, issuer.token(ref_protected=False))
    assert (read["x-route"], read["x-per-route"]) == ("read", "host")
