"""What the REAL Envoy 1.40 does with filters delivered by ECDS (extension config discovery), the facts issue 13's
design rests on (docs/envoy-ecds.md): a change of an ECDS resource changes enforcement without modifying the
listener or draining a connection; a filter whose resource never came (or was removed) fails closed; jwt_authn
keys rotate the same way and route-level requirements still apply; Delta ADS carries it; several ECDS filters chain.

A tiny ADS server (tests/support/tiny_ads.py, driven through tests/support/ecds_envoy.py) serves a listener (LDS)
and the filter configurations (ECDS); routes are inline direct responses, so no upstream is involved.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from google.protobuf import json_format
from jwt.algorithms import ECAlgorithm

from controlplane.snapshots.snapshot import LISTENER
from tests.support.ecds_envoy import (
    ECDS,
    JWT_URL,
    LISTENER_STATS,
    RBAC_URL,
    Client,
    any_of,
    ecds_filter,
    ecds_stat,
    envoy_on_ads,
    job_ids,
    listener,
    listener_stats,
    live_listener,
    once,
    rbac,
    typed,
)
from tests.support.ports import LOOPBACK, free_port

pytestmark = pytest.mark.e2e


def test_envoy_version() -> None:
    """The facts below were observed on this exact build; an upgrade must re-run (and may break) them."""
    with envoy_on_ads() as (ads, envoy):
        ads.put(LISTENER, "plain", listener(free_port(), []))
        envoy.wait_ready()
        version = json.loads(envoy.admin_get("/server_info")[1])["version"]
    assert version.split("/")[1:3] == ["1.40.0", "Clean"], version


@pytest.mark.parametrize("api", ["sotw", "delta"])
def test_rbac_change_through_ecds_keeps_the_listener_and_the_connection(api: str) -> None:
    port = free_port()
    with envoy_on_ads(api) as (ads, envoy):
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ["1001"])))
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL)])
        envoy.wait_for(lambda: once(port, x_job="1002") == 200, message="listener up")
        client = Client(port)
        assert (client.status(x_job="1001"), client.status(x_job="1002")) == (403, 200)
        listeners = listener_stats(envoy)
        closed = f"listener.{LOOPBACK}_{port}.downstream_cx_destroy"
        closed_before = envoy.stats("downstream_cx_destroy$")[closed]
        reloads = ecds_stat(envoy, "deny-list", "config_reload")

        pushed = time.monotonic()
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ["1001", "1002"])))
        envoy.wait_for(lambda: client.status(x_job="1002") == 403, 5, "the new deny list in force", interval=0.001)
        took = time.monotonic() - pushed

        assert client.status(x_job="1001") == 403 and client.status(x_job="1003") == 200  # same connection
        assert listener_stats(envoy) == listeners == dict.fromkeys(LISTENER_STATS, 0)
        assert ecds_stat(envoy, "deny-list", "config_reload") == reloads + 1
        assert envoy.stats("downstream_cx_destroy$")[closed] == closed_before
        assert took < 1.0, took
        client.close()
        assert not ads.nacks


@pytest.mark.parametrize(
    ("options", "while_missing"),
    [
        pytest.param({}, 500, id="no-default"),
        pytest.param({"default_config": "DENY"}, 403, id="default-deny"),
    ],
)
def test_missing_resource_warms_then_fails_closed(options: dict[str, Any], while_missing: int) -> None:
    """Until the resource comes the listener warms (port closed); after initial_fetch_timeout the filter runs on
    its default, or answers 500 without one: no request ever passes a filter whose configuration is missing."""
    port = free_port()
    if "default_config" in options:
        options = {"default_config": any_of(rbac(options["default_config"]))}
    discovery = ecds_filter("deny-list", RBAC_URL, **options)
    discovery["config_discovery"]["config_source"]["initial_fetch_timeout"] = "1s"
    with envoy_on_ads("delta") as (ads, envoy):
        live_listener(ads, envoy, port, [discovery])
        envoy.wait_for_stat("listener_manager.total_listeners_warming")
        assert once(port) == "ConnectionRefusedError"
        envoy.wait_for_stat("extension_config_discovery.http_filter.deny-list.init_fetch_timeout", timeout=5)
        envoy.wait_for(lambda: once(port, x_job="1") == while_missing, 5, "listener active on its default")
        assert envoy.stats("total_listeners_warming")["listener_manager.total_listeners_warming"] == 0


def test_default_without_warming_applies_at_once() -> None:
    port = free_port()
    options = {"default_config": any_of(rbac("DENY")), "apply_default_config_without_warming": True}
    with envoy_on_ads() as (ads, envoy):
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL, **options)])
        envoy.wait_for(lambda: once(port) == 403, 5, "listener active on its default at once")
        assert ecds_stat(envoy, "deny-list", "init_fetch_timeout") == 0  # not timed out: never waited
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("ALLOW")))
        envoy.wait_for(lambda: once(port) == 200, 5, "the resource replaces the default")


@pytest.mark.parametrize(
    ("api", "default", "after_removal"),
    [("sotw", "DENY", 200), ("delta", "DENY", 403), ("delta", None, 500)],
)
def test_removed_resource(api: str, default: str | None, after_removal: int) -> None:
    """Delta: a removed resource puts the filter back on its default (500 without one). SotW: Envoy ACKs the
    empty response, no ECDS stat moves, and the last configuration stays in force: SotW cannot take it back."""
    port = free_port()
    with envoy_on_ads(api) as (ads, envoy):
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("ALLOW")))
        options = {"default_config": any_of(rbac(default))} if default else {}
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL, **options)])
        envoy.wait_for(lambda: once(port) == 200, 5, "listener up")
        sent = len(ads.sent)
        ads.remove(ECDS, "deny-list")
        envoy.wait_for(lambda: len(ads.sent) > sent and ads.last_answered(ECDS), 5, "removal answered")
        envoy.wait_for(lambda: once(port) == after_removal, 5, f"{after_removal} after removal")
        assert not ads.nacks
        assert ecds_stat(envoy, "deny-list", "config_reload") == (1 if api == "sotw" else 2)
        assert listener_stats(envoy) == dict.fromkeys(LISTENER_STATS, 0)


def test_chained_ecds_filters_run_in_listed_order() -> None:
    """One RBAC per bucket, each its own ECDS resource: all apply, in http_filters order (the first denies)."""
    port = free_port()
    with envoy_on_ads("delta") as (ads, envoy):
        ads.put(ECDS, "bucket-a", typed("bucket-a", rbac("DENY", ["1", "3"], stat_prefix="a_")))
        ads.put(ECDS, "bucket-b", typed("bucket-b", rbac("DENY", ["2", "3"], stat_prefix="b_")))
        live_listener(ads, envoy, port, [ecds_filter(b, RBAC_URL) for b in ("bucket-a", "bucket-b")])
        envoy.wait_for(lambda: once(port, x_job="4") == 200, 5, "listener up")
        assert [once(port, x_job=job) for job in "123"] == [403, 403, 403]
        denied = envoy.stats("rbac\\.[ab]_\\.denied$")
        assert (denied["http.ecds.rbac.a_.denied"], denied["http.ecds.rbac.b_.denied"]) == (2, 1)  # 3: a only
        ads.put(ECDS, "bucket-b", typed("bucket-b", rbac("DENY", ["5"], stat_prefix="b_")))
        envoy.wait_for(lambda: once(port, x_job="2") == 200, 5, "bucket-b alone replaced")
        assert once(port, x_job="1") == 403 and once(port, x_job="5") == 403
        assert listener_stats(envoy) == dict.fromkeys(LISTENER_STATS, 0)


class Keys:
    """ES256 keys and the tokens they sign, as an issuer's JWKS rotation would publish them."""

    ISSUER, AUDIENCE = "https://ci.invalid", "gateway"

    def __init__(self, *kids: str) -> None:
        self.private = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in kids}

    def jwks(self, *kids: str) -> str:
        keys = []
        for kid in kids:
            jwk = json.loads(ECAlgorithm.to_jwk(self.private[kid].public_key()))
            keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
        return json.dumps({"keys": keys})

    def token(self, kid: str) -> str:
        claims = {"iss": self.ISSUER, "aud": self.AUDIENCE, "sub": "job", "exp": int(time.time()) + 600}
        return jwt.encode(claims, self.private[kid], algorithm="ES256", headers={"kid": kid})


def jwt_authn(jwks: str) -> jwt_pb2.JwtAuthentication:
    provider = {"issuer": Keys.ISSUER, "audiences": [Keys.AUDIENCE], "local_jwks": {"inline_string": jwks}}
    config = {"providers": {"ci": provider}, "requirement_map": {"ci-token": {"provider_name": "ci"}}}
    return json_format.ParseDict(config, jwt_pb2.JwtAuthentication())


@pytest.mark.parametrize("api", ["sotw", "delta"])
def test_jwt_authn_keys_rotate_through_ecds_and_route_requirements_apply(api: str) -> None:
    """A key rotation is an ECDS push: no listener change, the same connection, the new key accepted at once;
    a route's PerRouteConfig `requirement_name` still selects the requirement of the ECDS-configured filter."""
    keys = Keys("old", "new")
    port = free_port()
    protected = {
        "match": {"prefix": "/protected"},
        "direct_response": {"status": 200, "body": {"inline_string": "protected"}},
        "typed_per_filter_config": {
            "jwt": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
                "requirement_name": "ci-token",
            }
        },
    }
    with envoy_on_ads(api) as (ads, envoy):
        ads.put(ECDS, "jwt", typed("jwt", jwt_authn(keys.jwks("old"))))
        live_listener(ads, envoy, port, [ecds_filter("jwt", JWT_URL)], routes=[protected])
        envoy.wait_for(lambda: once(port) == 200, 5, "listener up")
        client = Client(port)
        old, new = (f"Bearer {keys.token(kid)}" for kid in ("old", "new"))
        assert client.get("/protected", authorization=old) == (200, "protected")
        assert client.status("/protected") == 401  # the route's requirement applies
        assert client.status("/protected", authorization=new) == 401  # not yet published
        assert client.status("/elsewhere") == 200  # no requirement on that route
        listeners = listener_stats(envoy)

        ads.put(ECDS, "jwt", typed("jwt", jwt_authn(keys.jwks("old", "new"))))
        envoy.wait_for(lambda: client.status("/protected", authorization=new) == 200, 5, "new key", interval=0.001)
        assert client.status("/protected", authorization=old) == 200  # both during the overlap
        ads.put(ECDS, "jwt", typed("jwt", jwt_authn(keys.jwks("new"))))
        envoy.wait_for(lambda: client.status("/protected", authorization=old) == 401, 5, "old key retired")
        assert client.status("/protected", authorization=new) == 200
        assert listener_stats(envoy) == listeners == dict.fromkeys(LISTENER_STATS, 0)
        assert ecds_stat(envoy, "jwt", "config_reload") == 3
        client.close()
        assert not ads.nacks


def test_re2_alternation_needs_the_program_size_runtime_key() -> None:
    """By default a deny list of 100 ids as one RE2 alternation is refused (program size 493 > 100); the
    runtime key `re2.max_program_size.error_level` lets 50,000 ids through, enforced as one regex."""
    port = free_port()
    with envoy_on_ads("delta") as (ads, envoy):
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ["1"])))
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL)])
        envoy.wait_for(lambda: once(port, x_job="1") == 403, 5, "listener up")
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", job_ids(100))))
        envoy.wait_for(lambda: ads.nacks, 5, "the NACK")
        assert "RE2 program size of 493 > max program size of 100 set for the error level" in ads.nacks[0]
        counts = {stat: ecds_stat(envoy, "deny-list", stat) for stat in ("update_success", "update_rejected")}
        assert counts == {"update_success": 1, "update_rejected": 1}  # config_reload moves too: not a success
        assert (once(port, x_job="1"), once(port, x_job=job_ids(100)[5])) == (403, 200)  # the old list kept
    ids = job_ids(50_000)
    with envoy_on_ads("delta", runtime={"re2.max_program_size.error_level": 1_000_000}) as (ads, envoy):
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ids)))
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL)])
        envoy.wait_for(lambda: once(port, x_job="1") == 200, 10, "listener up")
        assert [once(port, x_job=job) for job in (ids[0], ids[-1], ids[-1] + "0")] == [403, 403, 200]
        assert not ads.nacks


def test_server_stays_initializing_until_its_first_listeners_filter_config_arrives() -> None:
    """At startup the listener counts as active at once, yet Envoy is not LIVE and the port is not bound until the
    ECDS resource arrives (or initial_fetch_timeout expires: 15 s by default per the API reference)."""
    port = free_port()
    with envoy_on_ads("sotw") as (ads, envoy):
        ads.put(LISTENER, "ecds-listener", listener(port, [ecds_filter("deny-list", RBAC_URL)]))
        envoy.wait_for(lambda: ads.last_answered(LISTENER), 10, "LDS ACKed")
        envoy.wait_for_stat("listener_manager.total_listeners_active")
        assert (envoy.ready_state(), once(port)) == ("INITIALIZING", "ConnectionRefusedError")
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("ALLOW")))
        envoy.wait_ready(5)
        assert once(port) == 200
