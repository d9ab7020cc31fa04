"""What the REAL Envoy 1.40 does with filters delivered by ECDS (extension config discovery), the facts issue 13's
design rests on (docs/envoy-ecds.md): a change of an ECDS resource changes enforcement without modifying the
listener or draining a connection; a filter whose resource never came (or was removed) fails closed; jwt_authn
keys rotate the same way and route-level requirements still apply; Delta ADS carries it; several ECDS filters chain.

A tiny ADS server (tests/support/tiny_ads.py) serves a listener (LDS) and the filter configurations (ECDS);
routes are inline direct responses, so no upstream is involved.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, json_format
from jwt.algorithms import ECAlgorithm

from controlplane.cli.bootstrap import render_bootstrap
from controlplane.snapshots.snapshot import LISTENER
from tests.support.envoy import EnvoyProcess
from tests.support.ports import LOOPBACK, free_port
from tests.support.tiny_ads import TinyAds

pytestmark = pytest.mark.e2e

ECDS = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
RBAC_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
JWT_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_PROTOS = (rbac_pb2, jwt_pb2, router_pb2, hcm_pb2)  # their descriptors resolve the `@type`s below
LISTENER_STATS = ("listener_manager.listener_modified", "listener_manager.total_filter_chains_draining")


def rbac(action: str, denied_jobs: list[str] | None = None, stat_prefix: str = "") -> rbac_pb2.RBAC:
    """ALLOW everything, or DENY requests whose `x-job` header is one of `denied_jobs` (an RE2 alternation)."""
    principal: dict[str, Any] = {"any": True}
    if denied_jobs is not None:
        regex = "|".join(denied_jobs)
        principal = {"header": {"name": "x-job", "string_match": {"safe_regex": {"regex": regex}}}}
    policy = {"permissions": [{"any": True}], "principals": [principal]}
    config = {"rules": {"action": action, "policies": {"p": policy}}, "rules_stat_prefix": stat_prefix}
    return json_format.ParseDict(config, rbac_pb2.RBAC())


def typed(name: str, message: Any) -> extension_pb2.TypedExtensionConfig:
    config = extension_pb2.TypedExtensionConfig(name=name)
    config.typed_config.Pack(message)
    return config


def ecds_filter(name: str, type_url: str, **options: Any) -> dict[str, Any]:
    discovery = {"config_source": {"ads": {}, "resource_api_version": "V3"}, "type_urls": [type_url], **options}
    return {"name": name, "config_discovery": discovery}


def listener(port: int, filters: list[dict[str, Any]], routes: list[dict[str, Any]] | None = None) -> Any:
    ok = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "ecds",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [*(routes or []), ok]}]},
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return json_format.ParseDict(
        {
            "name": "ecds-listener",
            "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}],
        },  # fmt: skip
        listener_pb2.Listener(),
    )


@contextmanager
def envoy_on_ads(api: str = "sotw") -> Iterator[tuple[TinyAds, EnvoyProcess]]:
    with TinyAds() as ads:
        boot = render_bootstrap(group="ecds", node_id=f"ecds-{api}", xds_host=LOOPBACK, xds_port=ads.port, api=api,
                                admin_port=0)  # fmt: skip
        del boot["dynamic_resources"]["cds_config"]
        with EnvoyProcess(boot, name=f"ecds-{api}", wait_ready=False) as envoy:
            yield ads, envoy


class Client:
    """One keep-alive HTTP/1.1 connection that must stay the same connection: a close by Envoy fails the test."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
        self.conn.connect()
        self.local = self.conn.sock.getsockname()

    def get(self, path: str = "/", **headers: str) -> tuple[int, str]:
        self.conn.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = self.conn.getresponse()
        body = response.read().decode()
        assert response.getheader("connection") != "close", "Envoy is closing this connection"
        assert self.conn.sock is not None and self.conn.sock.getsockname() == self.local, "a new connection"
        return response.status, body

    def status(self, path: str = "/", **headers: str) -> int:
        return self.get(path, **headers)[0]

    def close(self) -> None:
        self.conn.close()


def once(port: int, path: str = "/", **headers: str) -> int | str:
    """A request on a fresh connection, or the name of the error when the port does not accept one."""
    try:
        client = Client(port)
    except OSError as error:
        return type(error).__name__
    try:
        return client.status(path, **headers)
    finally:
        client.close()


def listener_stats(envoy: EnvoyProcess) -> dict[str, int]:
    stats = envoy.stats("^listener_manager\\.")
    return {k: stats.get(k, 0) for k in LISTENER_STATS}


def ecds_stat(envoy: EnvoyProcess, name: str, stat: str) -> int:
    key = f"extension_config_discovery.http_filter.{name}.{stat}"
    return envoy.stats(f"^{key}$").get(key, 0)


def live_listener(ads: TinyAds, envoy: EnvoyProcess, port: int, filters: list[dict[str, Any]], **kw: Any) -> None:
    """A first listener without ECDS makes the server LIVE; then `filters`' listener is added as an update."""
    plain = listener(free_port(), [])
    plain.name = "plain"
    ads.put(LISTENER, "plain", plain)
    envoy.wait_ready()
    ads.put(LISTENER, "ecds-listener", listener(port, filters, **kw))


def test_envoy_version(tmp_path: Any) -> None:
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


@pytest.mark.parametrize(("api", "after_removal"), [("sotw", 200), ("delta", 403)])
def test_removed_resource(api: str, after_removal: int) -> None:
    """Delta: a removed resource puts the filter back on its default. SotW: an empty response is refused
    (the filter wants exactly one resource) and the last configuration stays in force."""
    port = free_port()
    with envoy_on_ads(api) as (ads, envoy):
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("ALLOW")))
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL, default_config=any_of(rbac("DENY")))])
        envoy.wait_for(lambda: once(port) == 200, 5, "listener up")
        sent = len(ads.sent)
        ads.remove(ECDS, "deny-list")
        envoy.wait_for(lambda: len(ads.sent) > sent and ads.last_answered(ECDS), 5, "removal answered")
        envoy.wait_for(lambda: once(port) == after_removal, 5, f"{after_removal} after removal")
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


def any_of(message: Any) -> dict[str, Any]:
    packed = any_pb2.Any()
    packed.Pack(message)
    as_dict: dict[str, Any] = json_format.MessageToDict(packed)
    return as_dict
