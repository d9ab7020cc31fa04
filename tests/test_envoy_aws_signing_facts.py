"""What the REAL Envoy 1.40 `aws_request_signing` HTTP filter does with credentials a control plane pushes, the facts
issue 16's AWS backends rest on (docs/envoy-aws-signing.md).

A tiny ADS server (tests/support/tiny_ads.py) serves the listener (LDS) and, where a test says so, the signing
filter's configuration (ECDS); a loopback backend records every request as it arrived, and each signature is
checked here by recomputing AWS Signature Version 4 from AWS's documented algorithm (`sigv4_signature`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.aws_request_signing.v3 import aws_request_signing_pb2 as signing_pb2
from google.protobuf import json_format

from controlplane.snapshots.snapshot import LISTENER
from tests.support.backends import LoopbackHTTPServer, Request, Response
from tests.support.ecds_envoy import ECDS, Client, ads_envoy, ecds_filter, listener_stats, once, typed
from tests.support.envoy import EnvoyProcess
from tests.support.ports import LOOPBACK, free_port
from tests.support.tiny_ads import TinyAds

pytestmark = pytest.mark.e2e

SIGNING = "envoy.filters.http.aws_request_signing"
SIGNING_URL = "type.googleapis.com/envoy.extensions.filters.http.aws_request_signing.v3.AwsRequestSigning"
PER_ROUTE_URL = "type.googleapis.com/envoy.extensions.filters.http.aws_request_signing.v3.AwsRequestSigningPerRoute"
HCM_URL = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
FILTER_CONFIG_URL = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
ROUTER_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_PROTOS = (signing_pb2,)  # its descriptors resolve the `@type`s below
REGION = "eu-west-1"
# Fake keys in AWS's documented example shape; nothing real.
OLD = ("AKIDOLDEXAMPLE", "old/secret/EXAMPLEKEY", "old-session-token")
NEW = ("AKIDNEWEXAMPLE", "new/secret/EXAMPLEKEY", "new-session-token")
READ_ONLY = ("AKIDREADONLYEXAMPLE", "ro/secret/EXAMPLEKEY", "ro-session-token")


# --- AWS Signature Version 4, recomputed from the documented algorithm ---------------------------------------------


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _canonical_query(query: dict[str, list[str]]) -> str:
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, values in query.items() for v in values)
    return "&".join(f"{k}={v}" for k, v in pairs)


def parse_authorization(header: str) -> dict[str, str]:
    algorithm, _, rest = header.partition(" ")
    fields = dict(part.strip().split("=", 1) for part in rest.split(","))
    return {"algorithm": algorithm, **fields}


def sigv4_signature(request: Request, secret: str, *, region: str = REGION, service: str = "s3") -> str:
    """The signature AWS computes for `request` as the backend received it: canonical request (method, path,
    sorted query, the signed headers lower-cased and trimmed, the payload hash), string to sign (algorithm,
    x-amz-date, scope, hash of the canonical request), key derived by HMAC from date, region, service."""
    auth = parse_authorization(request.headers["authorization"])
    signed = auth["SignedHeaders"].split(";")
    canonical_headers = "".join(f"{name}:{' '.join(request.headers[name].split())}\n" for name in signed)
    payload_hash = request.headers.get("x-amz-content-sha256") or hashlib.sha256(request.body).hexdigest()
    canonical = "\n".join(
        [
            request.method,
            quote(request.path, safe="/-_.~"),
            _canonical_query(dict(request.query)),
            canonical_headers,
            auth["SignedHeaders"],
            payload_hash,
        ]
    )
    amz_date = request.headers["x-amz-date"]
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def assert_signed(request: Request, credentials: tuple[str, str, str], *, service: str = "s3") -> dict[str, str]:
    """The request carries a valid SigV4 signature by `credentials`, its session token signed too."""
    access, secret, session = credentials
    auth = parse_authorization(request.headers["authorization"])
    assert auth["algorithm"] == "AWS4-HMAC-SHA256"
    assert auth["Credential"].startswith(f"{access}/") and auth["Credential"].endswith(
        f"/{REGION}/{service}/aws4_request"
    )
    assert request.headers["x-amz-security-token"] == session
    assert "x-amz-security-token" in auth["SignedHeaders"].split(";")
    assert auth["Signature"] == sigv4_signature(request, secret, service=service)
    return auth


def test_the_signature_check_can_fail() -> None:
    """The checker refuses a request whose body or signed header changed after signing, or another secret."""
    scope = f"A/20260101/{REGION}/s3/aws4_request"
    headers = {"host": "h", "x-amz-date": "20260101T000000Z"}
    draft = f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host;x-amz-date, Signature=0"
    signature = sigv4_signature(Request("PUT", "/b/k", {}, {**headers, "authorization": draft}, b"body"), "s")
    signed = {**headers, "authorization": draft.replace("Signature=0", f"Signature={signature}")}
    assert sigv4_signature(Request("PUT", "/b/k", {}, signed, b"body"), "s") == signature
    assert sigv4_signature(Request("PUT", "/b/k", {}, signed, b"other"), "s") != signature
    assert sigv4_signature(Request("PUT", "/b/k", {}, {**signed, "host": "x"}, b"body"), "s") != signature
    assert sigv4_signature(Request("PUT", "/b/other", {}, signed, b"body"), "s") != signature
    assert sigv4_signature(Request("PUT", "/b/k", {}, signed, b"body"), "wrong secret") != signature


# --- the Envoy under test ---------------------------------------------------------------------------------------


def signing_config(credentials: tuple[str, str, str] | None = OLD, **options: Any) -> dict[str, Any]:
    """The filter's configuration (JSON form of AwsRequestSigning), credentials inline."""
    config: dict[str, Any] = {"@type": SIGNING_URL, "service_name": "s3", "region": REGION, **options}
    if credentials is not None:
        access, secret, session = credentials
        inline = {"access_key_id": access, "secret_access_key": secret, "session_token": session}
        config["credential_provider"] = {"inline_credential": inline}
    return config


def signing_listener(
    port: int,
    http_filter: dict[str, Any],
    routes: list[dict[str, Any]] | None = None,
    more_filters: list[dict[str, Any]] | None = None,
) -> Any:
    default = {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
    manager = {
        "@type": HCM_URL,
        "stat_prefix": "aws",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [*(routes or []), default]}]},
        "http_filters": [
            http_filter,
            *(more_filters or []),
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_URL}},
        ],
    }
    return json_format.ParseDict(
        {
            "name": "aws",
            "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
            ],
        },
        listener_pb2.Listener(),
    )


@contextmanager
def aws_envoy() -> Iterator[tuple[TinyAds, EnvoyProcess, LoopbackHTTPServer]]:
    """Envoy on a TinyAds (LDS over ADS) with a static cluster `backend`: a loopback server that answers 200 and
    records every request. Started from a worker thread (see tests/support/ecds_envoy.py `envoy_on_ads`)."""
    backend = LoopbackHTTPServer(name="aws-backend")
    backend.router.add("*", "/{rest:path}", lambda _request: Response(200, b"ok"))
    backend.start()
    ads = TinyAds()
    envoy = ads_envoy(ads.port, group="aws")
    endpoint = {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": backend.port}}}}
    envoy.bootstrap["static_resources"]["clusters"].append(
        {
            "name": "backend",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [endpoint]}]},
        }
    )
    try:
        with ThreadPoolExecutor(1) as spawner:
            spawner.submit(envoy.start).result()
        with ads:
            yield ads, envoy, backend
    finally:
        envoy.stop()
        backend.stop()


def serve(ads: TinyAds, envoy: EnvoyProcess, port: int, http_filter: dict[str, Any], **kw: Any) -> None:
    ads.put(LISTENER, "aws", signing_listener(port, http_filter, **kw))
    envoy.wait_ready()
    listening(port)


def listening(port: int) -> None:
    """Wait until the listener on `port` accepts connections (a listener added to a live server binds later)."""
    _wait(lambda: not isinstance(once(port, "/ready"), str))


def inline(config: dict[str, Any]) -> dict[str, Any]:
    return {"name": SIGNING, "typed_config": config}


def request(port: int, method: str = "GET", path: str = "/", body: bytes | None = None, **headers: str) -> int:
    client = Client(port)
    try:
        client.conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = client.conn.getresponse()
        response.read()
        return response.status
    finally:
        client.close()


def test_envoy_version() -> None:
    """The facts below were observed on this exact build; an upgrade must re-run (and may break) them."""
    with aws_envoy() as (ads, envoy, _):
        serve(ads, envoy, free_port(), inline(signing_config()))
        version = json.loads(envoy.admin_get("/server_info")[1])["version"]
    assert version.split("/")[1:3] == ["1.40.0", "Clean"], version


def test_inline_credentials_pushed_by_xds_sign_every_request_and_replace_the_callers_authorization() -> None:
    port = free_port()
    with aws_envoy() as (ads, envoy, backend):
        serve(ads, envoy, port, inline(signing_config()))
        assert request(port, "GET", "/bucket/key?list-type=2&prefix=a", authorization="Bearer job-credential") == 200
        seen = backend.requests[-1]
    auth = assert_signed(seen, OLD)
    assert "job-credential" not in json.dumps(seen.headers)  # the job's own credential never reaches AWS
    assert set(auth["SignedHeaders"].split(";")) >= {"host", "x-amz-date", "x-amz-security-token"}
    assert seen.headers["x-amz-content-sha256"] == hashlib.sha256(b"").hexdigest()


def test_signing_headers_the_caller_sends_are_overwritten() -> None:
    """A job cannot choose the date, session token or payload hash: Envoy replaces each (a caller's
    `UNSIGNED-PAYLOAD` included); other `x-amz-*` headers the caller sends are signed as they are."""
    port = free_port()
    forged = {"x_amz_date": "20200101T000000Z", "x_amz_security_token": "forged", "x_amz_meta_note": "kept"}
    with aws_envoy() as (ads, envoy, backend):
        serve(ads, envoy, port, inline(signing_config()))
        assert request(port, "PUT", "/bucket/k", body=b"abc", x_amz_content_sha256="UNSIGNED-PAYLOAD", **forged) == 200
        seen = backend.requests[-1]
    assert seen.headers["x-amz-date"] != "20200101T000000Z"
    assert seen.headers["x-amz-security-token"] == OLD[2]
    assert seen.headers["x-amz-content-sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert "x-amz-meta-note" in assert_signed(seen, OLD)["SignedHeaders"].split(";")


def test_the_payload_is_hashed_unless_unsigned_payload_is_asked_for() -> None:
    body = b'{"a": "payload"}'
    port, unsigned_port = free_port(), free_port()
    with aws_envoy() as (ads, envoy, backend):
        serve(ads, envoy, port, inline(signing_config()))
        assert request(port, "PUT", "/bucket/key", body=body) == 200
        hashed = backend.requests[-1]
        listener = signing_listener(unsigned_port, inline(signing_config(use_unsigned_payload=True)))
        listener.name = "unsigned"
        ads.put(LISTENER, "unsigned", listener)
        listening(unsigned_port)
        assert request(unsigned_port, "PUT", "/bucket/key", body=body) == 200
        unsigned = backend.requests[-1]
    assert hashed.body == body and hashed.headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
    assert_signed(hashed, OLD)
    assert unsigned.body == body and unsigned.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert_signed(unsigned, OLD)


def test_host_rewrite_is_what_is_signed_and_sent() -> None:
    port = free_port()
    with aws_envoy() as (ads, envoy, backend):
        serve(ads, envoy, port, inline(signing_config(host_rewrite="bucket.s3.eu-west-1.amazonaws.com")))
        assert request(port, "GET", "/key") == 200
        seen = backend.requests[-1]
    assert seen.headers["host"] == "bucket.s3.eu-west-1.amazonaws.com"
    assert_signed(seen, OLD)


def test_per_route_configuration_signs_each_route_with_its_own_credentials() -> None:
    """The listener's filter signs with one role's credentials; a route's AwsRequestSigningPerRoute replaces the
    whole configuration for that route: a different role (and service) per route, so per binding."""
    port = free_port()
    per_route = {
        "@type": PER_ROUTE_URL,
        "stat_prefix": "readonly",
        "aws_request_signing": _message(READ_ONLY, service_name="sts"),
    }
    read_only = {
        "match": {"prefix": "/read/"},
        "route": {"cluster": "backend"},
        "typed_per_filter_config": {SIGNING: per_route},
    }
    with aws_envoy() as (ads, envoy, backend):
        serve(ads, envoy, port, inline(signing_config(NEW)), routes=[read_only])
        assert request(port, "GET", "/read/object") == 200
        assert request(port, "GET", "/write/object") == 200
        read, write = backend.requests[-2:]
    assert_signed(read, READ_ONLY, service="sts")
    assert_signed(write, NEW)


def test_new_credentials_by_ecds_take_effect_with_no_failed_request() -> None:
    """The filter's configuration by ECDS: new credentials are a new ECDS resource, the listener is untouched, a
    kept-alive connection stays open, and requests sent all along succeed, each signed by the old or new key."""
    port = free_port()
    with aws_envoy() as (ads, envoy, backend):
        ads.put(ECDS, SIGNING, typed(SIGNING, json_format.ParseDict(_message(OLD), signing_pb2.AwsRequestSigning())))
        serve(ads, envoy, port, ecds_filter(SIGNING, SIGNING_URL))
        before = listener_stats(envoy)
        client = Client(port)
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                statuses.append(client.status("/bucket/key"))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            _wait(lambda: len(statuses) >= 20)
            ads.put(
                ECDS, SIGNING, typed(SIGNING, json_format.ParseDict(_message(NEW), signing_pb2.AwsRequestSigning()))
            )
            _wait(lambda: NEW[0] in backend.requests[-1].headers["authorization"])
            settled = len(statuses)
            _wait(lambda: len(statuses) >= settled + 20)
        finally:
            stop.set()
            loader.join(10)
            client.close()
        requests = [r for r in backend.requests if r.path == "/bucket/key"]  # not the readiness probes
        assert listener_stats(envoy) == before  # the listener was neither modified nor drained
    assert set(statuses) == {200} and len(requests) == len(statuses)
    keys = [NEW if NEW[0] in r.headers["authorization"] else OLD for r in requests]
    assert keys == sorted(keys, key=lambda k: k is NEW)  # old, then new, never back
    for seen, credentials in zip(requests, keys, strict=True):
        assert_signed(seen, credentials)


def _message(credentials: tuple[str, str, str], **options: Any) -> dict[str, Any]:
    """The configuration as a nested message (no `@type`)."""
    config = signing_config(credentials, **options)
    del config["@type"]
    return config


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until true, failing past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_the_secret_and_session_token_are_redacted_in_the_config_dump_the_key_id_is_not() -> None:
    port = free_port()
    with aws_envoy() as (ads, envoy, _):
        serve(ads, envoy, port, inline(signing_config()))
        dump = json.dumps(envoy.config_dump())
        added = envoy.stats("aws_request_signing")["http.aws.aws_request_signing.signing_added"]
        assert request(port, path="/counted") == 200
        stats = envoy.stats("aws_request_signing")
    assert OLD[1] not in dump and OLD[2] not in dump and '"secret_access_key": "[redacted]"' in dump
    assert OLD[0] in dump  # the access key id is not a secret to Envoy
    assert stats["http.aws.aws_request_signing.signing_added"] == added + 1
    assert stats["http.aws.aws_request_signing.signing_failed"] == 0


def test_without_credentials_the_request_goes_out_unsigned_with_the_callers_authorization(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fails open: a filter whose provider chain finds no credentials (here: only the environment, which holds
    none) forwards the request as it came. A control plane must never leave a route signing with no credentials,
    and must strip the caller's Authorization itself (it would reach AWS otherwise)."""
    port = free_port()
    nothing = {"custom_credential_provider_chain": True, "environment_credential_provider": {}}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # Envoy inherits this environment
    with aws_envoy() as (ads, envoy, backend):
        serve(ads, envoy, port, inline(signing_config(None, credential_provider=nothing)))
        assert request(port, path="/unsigned", authorization="Bearer job-credential") == 200
        seen = backend.requests[-1]
    assert seen.headers["authorization"] == "Bearer job-credential"
    assert "x-amz-date" not in seen.headers and "x-amz-security-token" not in seen.headers


def test_every_header_present_is_signed_and_a_hashed_body_is_bounded_by_the_buffer_limit() -> None:
    """Signed: every request header the filter sees (the caller's own included), not those the router adds after
    it. A body to hash is buffered whole: past the connection buffer limit (1 MiB by default) Envoy answers 413,
    while an unsigned payload streams."""
    big = b"x" * (3 * 1024 * 1024)
    port, unsigned_port = free_port(), free_port()
    with aws_envoy() as (ads, envoy, backend):
        serve(ads, envoy, port, inline(signing_config()))
        assert request(port, "GET", "/bucket/key?b=2&a=1", user_agent="ua", x_custom="c") == 200
        seen = backend.requests[-1]
        assert request(port, "PUT", "/bucket/big", body=big) == 413
        listener = signing_listener(unsigned_port, inline(signing_config(use_unsigned_payload=True)))
        listener.name = "unsigned"
        ads.put(LISTENER, "unsigned", listener)
        listening(unsigned_port)
        assert request(unsigned_port, "PUT", "/bucket/big", body=big) == 200
        streamed = backend.requests[-1]
    signed = set(parse_authorization(seen.headers["authorization"])["SignedHeaders"].split(";"))
    assert {"user-agent", "x-custom", "x-request-id", "accept-encoding"} <= signed
    assert not {"x-forwarded-proto", "x-envoy-expected-rq-timeout-ms"} & signed
    assert_signed(seen, OLD)
    assert streamed.path == "/bucket/big" and len(streamed.body) == len(big)
    assert_signed(streamed, OLD)


def test_one_ecds_signing_filter_per_role_the_others_disabled_per_route() -> None:
    """Per-binding roles with ECDS refresh: one signing filter per role, each its own ECDS resource; every route
    disables all but its role's (`FilterConfig{disabled: true}` in `typed_per_filter_config`). A refresh of one
    role's credentials leaves the other's routes alone. (The reverse, filters `disabled` on the listener and
    enabled per route by `FilterConfig{disabled: false}` without a config, is refused: `Empty route/virtual host
    per filter configuration`.)"""
    port = free_port()
    off = {"@type": FILTER_CONFIG_URL, "disabled": True}
    routes = [
        {"match": {"prefix": "/read/"}, "route": {"cluster": "backend"}, "typed_per_filter_config": {"deploy": off}},
        {"match": {"prefix": "/"}, "route": {"cluster": "backend"}, "typed_per_filter_config": {"read": off}},
    ]
    with aws_envoy() as (ads, envoy, backend):
        ads.put(ECDS, "read", typed("read", _signing_message(READ_ONLY)))
        ads.put(ECDS, "deploy", typed("deploy", _signing_message(OLD)))
        filters = [ecds_filter(name, SIGNING_URL) for name in ("read", "deploy")]
        ads.put(LISTENER, "aws", signing_listener(port, filters[0], routes=routes, more_filters=filters[1:]))
        envoy.wait_ready()
        listening(port)
        assert request(port, path="/read/a") == 200
        assert_signed(backend.requests[-1], READ_ONLY)
        assert request(port, path="/deploy/a") == 200
        assert_signed(backend.requests[-1], OLD)
        ads.put(ECDS, "deploy", typed("deploy", _signing_message(NEW)))
        _wait(
            lambda: request(port, path="/deploy/b") == 200 and NEW[0] in backend.requests[-1].headers["authorization"]
        )
        assert_signed(backend.requests[-1], NEW)
        assert request(port, path="/read/b") == 200
        assert_signed(backend.requests[-1], READ_ONLY)
        assert not ads.nacks


def test_a_filter_disabled_on_the_listener_cannot_be_enabled_per_route_without_a_config() -> None:
    port = free_port()
    on = {"@type": FILTER_CONFIG_URL, "disabled": False}
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}, "typed_per_filter_config": {"deploy": on}}]
    with aws_envoy() as (ads, envoy, _):
        plain = signing_listener(free_port(), inline(signing_config()))
        plain.name = "plain"  # makes the server live; the listener under test comes as an update
        ads.put(LISTENER, "plain", plain)
        envoy.wait_ready()
        ads.put(ECDS, "deploy", typed("deploy", _signing_message(OLD)))
        disabled = ecds_filter("deploy", SIGNING_URL) | {"disabled": True}
        ads.put(LISTENER, "aws", signing_listener(port, disabled, routes=routes))
        _wait(lambda: bool(ads.nacks))
    assert "Empty route/virtual host per filter configuration for deploy filter" in ads.nacks[-1]


def _signing_message(credentials: tuple[str, str, str]) -> signing_pb2.AwsRequestSigning:
    return json_format.ParseDict(_message(credentials), signing_pb2.AwsRequestSigning())


def test_a_filter_disabled_on_the_listener_is_enabled_per_virtual_host_by_an_empty_config() -> None:
    """What the compiler relies on (compiler/aws.py): each role's ECDS signing filter `disabled` on the listener
    and switched on only on its backend's virtual host by `FilterConfig` with an *empty* `config` (as the
    credential injector is, docs/envoy-filters.md), so no other virtual host needs to name it; a route of that
    host can switch it off again."""
    port = free_port()
    on = {"@type": FILTER_CONFIG_URL, "config": {}}
    off = {"@type": FILTER_CONFIG_URL, "disabled": True}
    routes = [
        {"match": {"prefix": "/off/"}, "route": {"cluster": "backend"}, "typed_per_filter_config": {"deploy": off}},
        {"match": {"prefix": "/"}, "route": {"cluster": "backend"}},
    ]
    with aws_envoy() as (ads, envoy, backend):
        ads.put(ECDS, "deploy", typed("deploy", _signing_message(OLD)))
        disabled = ecds_filter("deploy", SIGNING_URL) | {"disabled": True}
        listener = signing_listener(port, disabled, routes=routes)
        _enable_on_virtual_host(listener, "deploy", on)
        ads.put(LISTENER, "aws", listener)
        envoy.wait_ready()
        listening(port)
        assert request(port, path="/a") == 200
        assert_signed(backend.requests[-1], OLD)
        assert request(port, path="/off/a") == 200
        assert "AWS4-HMAC-SHA256" not in backend.requests[-1].headers.get("authorization", "")
        assert not ads.nacks


def _enable_on_virtual_host(listener: Any, name: str, config: dict[str, Any]) -> None:
    """Sets `typed_per_filter_config[name]` on the listener's one virtual host, in place."""
    as_dict = json_format.MessageToDict(listener, preserving_proto_field_name=True)
    manager = as_dict["filter_chains"][0]["filters"][0]["typed_config"]
    manager["route_config"]["virtual_hosts"][0]["typed_per_filter_config"] = {name: config}
    listener.CopyFrom(json_format.ParseDict(as_dict, listener_pb2.Listener()))
