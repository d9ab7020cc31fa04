"""The test harness itself, proven on the REAL Envoy 1.40 binary with a static config (no control plane yet).

If these pass, a later end-to-end failure is about the control plane, not about the fakes or the harness: the
fake GitLab's JWKS and tokens are accepted by Envoy's jwt_authn, the failure modes give the statuses the
reference measured (401 vs 403), the echo backend shows what Envoy forwarded, and no Envoy outlives its test.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.bootstrap import bootstrap_yaml, render_bootstrap
from tests.support.backends import EchoBackend, HttpResponse, http_request
from tests.support.envoy import EnvoyProcess, live_processes, validate_config
from tests.support.fake_gitlab import OMIT, FakeGitLab, decode_unverified
from tests.support.fake_oidc import FakeOidc, rfc7638_thumbprint
from tests.support.ports import LOOPBACK, free_port, poll_until

ROOT = Path(__file__).resolve().parent.parent
AUDIENCE = "https://backend.example.com"
JWT_NS = "envoy.filters.http.jwt_authn"


def _claim_is(claim: str, value: str) -> dict[str, Any]:
    return {
        "sourced_metadata": {
            "metadata_matcher": {
                "filter": JWT_NS,
                "path": [{"key": "gitlab_claims"}, {"key": claim}],
                "value": {"string_match": {"exact": value}},
            }
        }
    }


def _static_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}
                    ]
                }
            ],
        },
    }


def gateway_bootstrap(gitlab: FakeGitLab, backend: EchoBackend, listener_port: int, access_log: Path) -> dict[str, Any]:
    """envoy-gitlab-recommended.yaml cut down to one backend: jwt_authn against the fake's JWKS, filter-level
    RBAC deny-all, the backend's policy per vhost (project 42, protected ref), and a JSON access log."""
    jwt_authn = {
        "name": JWT_NS,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "gitlab": {
                    "issuer": gitlab.issuer,
                    "audiences": [AUDIENCE],
                    "require_expiration": True,
                    "clock_skew_seconds": 30,
                    "remote_jwks": {
                        "http_uri": {"uri": gitlab.jwks_uri, "cluster": "gitlab_jwks", "timeout": "2s"},
                        "cache_duration": "300s",
                        "async_fetch": {"fast_listener": False, "failed_refetch_duration": "5s"},
                        "retry_policy": {
                            "num_retries": 3,
                            "retry_back_off": {"base_interval": "0.2s", "max_interval": "2s"},
                        },
                    },
                    "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
                    "forward": False,
                    "payload_in_metadata": "gitlab_claims",
                    "header_in_metadata": "gitlab_jwt_header",
                    "failed_status_in_metadata": "gitlab_jwt_failure",
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "gitlab"}}],
        },
    }
    rbac_deny_all = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW"},
        },
    }
    backend_policy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        "rbac": {
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "ci-project-42-protected": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {"and_ids": {"ids": [_claim_is("project_id", "42"), _claim_is("ref_protected", "true")]}}
                        ],
                    }
                },
            }
        },
    }
    access_log_config = {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log),
            "log_format": {
                "json_format": {
                    "code": "%RESPONSE_CODE%",
                    "details": "%RESPONSE_CODE_DETAILS%",
                    "job_id": f"%DYNAMIC_METADATA({JWT_NS}:gitlab_claims:job_id)%",
                    "project_id": f"%DYNAMIC_METADATA({JWT_NS}:gitlab_claims:project_id)%",
                    "jwt_failure": f"%DYNAMIC_METADATA({JWT_NS}:gitlab_jwt_failure)%",
                }
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ci_ingress",
        "codec_type": "AUTO",
        "access_log": [access_log_config],
        "route_config": {
            "name": "ci_routes",
            "virtual_hosts": [
                {
                    "name": "backend-a",
                    "domains": ["*"],
                    "routes": [{"name": "a-default", "match": {"prefix": "/"}, "route": {"cluster": "backend_a"}}],
                    "typed_per_filter_config": {"envoy.filters.http.rbac": backend_policy},
                }
            ],
        },
        "http_filters": [
            jwt_authn,
            rbac_deny_all,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "node": {"id": "smoke", "cluster": "smoke"},
        "static_resources": {
            "listeners": [
                {
                    "name": "ci_ingress",
                    "address": {"socket_address": {"address": LOOPBACK, "port_value": listener_port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                _static_cluster("backend_a", backend.port),
                _static_cluster("gitlab_jwks", gitlab.port),
            ],
        },
    }


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gitlab() -> Iterator[FakeGitLab]:
    fake = FakeGitLab(default_audience=AUDIENCE).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert not fake.running


@pytest.fixture(scope="module")
def backend() -> Iterator[EchoBackend]:
    with EchoBackend("backend-a") as echo:
        yield echo
    assert not echo.running


@pytest.fixture(scope="module")
def gateway(
    gitlab: FakeGitLab, backend: EchoBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EnvoyProcess, str, Path]]:
    workdir = tmp_path_factory.mktemp("gateway")
    port = free_port()
    access_log = workdir / "access.log"
    envoy = EnvoyProcess(gateway_bootstrap(gitlab, backend, port, access_log), name="gateway", workdir=workdir)
    try:
        envoy.start()  # returns once /ready says LIVE, i.e. after the first JWKS fetch (fast_listener: false)
        yield envoy, f"http://{LOOPBACK}:{port}", access_log
    finally:
        envoy.stop()
    assert not envoy.running and not _pid_alive(envoy.pid)
    assert envoy not in live_processes()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def call(url: str, token: str | None = None, path: str = "/api/x", method: str = "GET") -> HttpResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http_request(url + path, method=method, headers=headers)


# ----------------------------------------------------------------------------------------- fakes


def test_fake_gitlab_serves_gitlab_shaped_discovery_and_jwks(gitlab: FakeGitLab) -> None:
    before = gitlab.jwks_fetches
    discovery = http_request(gitlab.base_url + "/.well-known/openid-configuration").json()
    assert discovery["issuer"] == gitlab.base_url
    assert discovery["jwks_uri"] == gitlab.base_url + "/oauth/discovery/keys"
    assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]

    resp = http_request(gitlab.jwks_uri)
    assert resp.status == 200
    assert resp.headers["cache-control"] == "max-age=86400, public, must-revalidate"
    (key,) = resp.json()["keys"]
    assert key["kid"] == rfc7638_thumbprint(key) == gitlab.signing_key.kid
    assert (key["kty"], key["use"], key["alg"]) == ("RSA", "sig", "RS256")
    assert gitlab.rogue.kid not in {k["kid"] for k in resp.json()["keys"]}
    assert gitlab.jwks_fetches == before + 1


def test_fake_gitlab_tokens_have_gitlab_claim_types(gitlab: FakeGitLab) -> None:
    claims = decode_unverified(gitlab.mint(environment="production", environment_protected=True))
    for name in ("project_id", "namespace_id", "user_id", "pipeline_id", "job_id", "job_project_id"):
        assert isinstance(claims[name], str), name
    assert (claims["project_id"], claims["ref_protected"], claims["environment_protected"]) == (
        "42",
        "true",
        "true",
    )
    assert isinstance(claims["runner_id"], int) and not isinstance(claims["runner_id"], bool)
    assert claims["sub"] == "project_path:acme/deployer:ref_type:branch:ref:main"
    assert claims["iss"] == gitlab.base_url
    assert claims["nbf"] == claims["iat"] - 5
    assert claims["exp"] == claims["iat"] + 300
    assert claims["deployment_tier"] == "production"
    assert "exp" not in decode_unverified(gitlab.mint(raw={"exp": OMIT}))
    assert decode_unverified(gitlab.mint(raw={"project_id": 42}))["project_id"] == 42


def test_fake_gitlab_key_rotation_and_outage() -> None:
    with FakeGitLab() as gitlab:  # its own instance: the module-scoped gateway relies on the shared one's keys
        old = gitlab.signing_key
        new = gitlab.rotate_key()
        assert _kids(gitlab) == [new.kid]
        assert decode_unverified(gitlab.mint()) and gitlab.signing_key == new
        newer = gitlab.rotate_key(keep_old=True)
        assert _kids(gitlab) == [newer.kid, new.kid]
        gitlab.publish([old, newer])
        assert _kids(gitlab) == [old.kid, newer.kid]
        gitlab.fail_jwks(503)
        assert http_request(gitlab.jwks_uri).status == 503
        gitlab.fail_jwks(None)
        assert http_request(gitlab.jwks_uri).status == 200
        assert gitlab.jwks_fetches == 5


def _kids(issuer: FakeGitLab) -> list[str]:
    return [k["kid"] for k in http_request(issuer.jwks_uri).json()["keys"]]


def test_fake_oidc_is_okta_shaped() -> None:
    with FakeOidc() as idp:
        assert idp.issuer == idp.base_url + "/oauth2/default"
        discovery = http_request(idp.discovery_url).json()
        assert discovery["issuer"] == idp.issuer
        assert discovery["jwks_uri"] == idp.issuer + "/v1/keys"
        assert http_request(discovery["jwks_uri"]).json()["keys"][0]["kid"] == idp.signing_key.kid
        claims = decode_unverified(idp.mint(groups=["ops", "dev"]))
        assert claims["groups"] == ["ops", "dev"] and claims["iss"] == idp.issuer and "email" in claims
    assert not idp.running


# ----------------------------------------------------------------------------------------- real Envoy


def test_valid_token_reaches_backend_without_authorization(
    gateway: tuple[EnvoyProcess, str, Path], gitlab: FakeGitLab, backend: EchoBackend
) -> None:
    envoy, url, access_log = gateway
    token = gitlab.mint(job_id=777001)
    resp = call(url, token)
    assert resp.status == 200, resp.text
    echo = resp.json()
    assert echo["backend"] == "backend-a" and echo["method"] == "GET" and echo["path"] == "/api/x"
    assert "authorization" not in echo["headers"]  # forward: false
    assert token not in resp.text

    # The token must not leak into Envoy's logs either (the access log is flushed on a timer: poll for it).
    line = envoy.wait_for(
        lambda: next((ln for ln in _lines(access_log) if '"777001"' in ln), ""), message="access log line"
    )
    assert json.loads(line)["project_id"] == "42"
    assert token not in access_log.read_text()
    assert token not in envoy.log_text(redact=False)
    assert envoy.stats()["http.ci_ingress.jwt_authn.allowed"] >= 1


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_no_token_is_401(gateway: tuple[EnvoyProcess, str, Path], backend: EchoBackend) -> None:
    _envoy, url, _ = gateway
    seen = len(backend.requests)
    resp = call(url, None)
    assert (resp.status, resp.text) == (401, "Jwt is missing")
    assert resp.headers["www-authenticate"].startswith("Bearer realm=")
    assert len(backend.requests) == seen


def test_expired_token_is_401(gateway: tuple[EnvoyProcess, str, Path], gitlab: FakeGitLab) -> None:
    now = int(time.time())
    resp = call(gateway[1], gitlab.mint(iat=now - 600, exp=now - 120))  # beyond the 30 s clock skew
    assert (resp.status, resp.text) == (401, "Jwt is expired")


def test_wrong_audience_is_403(gateway: tuple[EnvoyProcess, str, Path], gitlab: FakeGitLab) -> None:
    resp = call(gateway[1], gitlab.mint(aud="https://other.example.com"))
    assert (resp.status, resp.text) == (403, "Audiences in Jwt are not allowed")


def test_rogue_key_is_401(gateway: tuple[EnvoyProcess, str, Path], gitlab: FakeGitLab) -> None:
    # The published kid with a signature from the unpublished key: only the signature check can catch it.
    resp = call(gateway[1], gitlab.mint(key=gitlab.rogue, kid=gitlab.signing_key.kid))
    assert (resp.status, resp.text) == (401, "Jwt verification fails")


def test_claims_reach_rbac_as_strings(gateway: tuple[EnvoyProcess, str, Path], gitlab: FakeGitLab) -> None:
    url = gateway[1]
    assert call(url, gitlab.mint(project_id=43)).status == 403
    assert call(url, gitlab.mint(ref_protected=False)).status == 403
    assert call(url, gitlab.mint(raw={"project_id": 42})).text == "RBAC: access denied"  # a number never matches


# ----------------------------------------------------------------------------------------- harness


def test_envoy_is_stopped_when_the_test_body_raises() -> None:
    bootstrap = {"node": {"id": "t", "cluster": "t"}, "static_resources": {}}
    with pytest.raises(RuntimeError, match="boom"), EnvoyProcess(bootstrap, name="raiser") as envoy:
        pid = envoy.pid
        assert envoy.ready_state() == "LIVE"
        raise RuntimeError("boom")
    assert not envoy.running and not _pid_alive(pid)
    assert envoy not in live_processes()
    assert "starting main dispatch loop" in envoy.log_text()  # the log outlives the temp dir


def test_a_reused_workdir_never_reads_the_last_runs_admin_port(tmp_path: Path) -> None:
    """The demo keeps its Envoy workdir; a second run must wait for the new admin port, not the old one."""
    bootstrap = {"node": {"id": "t", "cluster": "t"}, "static_resources": {}}
    with EnvoyProcess(bootstrap, name="first", workdir=tmp_path, keep_workdir=True) as first:
        old = first.admin_url
    with EnvoyProcess(bootstrap, name="second", workdir=tmp_path, keep_workdir=True, ready_timeout=10) as second:
        assert second.ready_state() == "LIVE" and second.admin_url != old


def test_rendered_bootstrap_is_valid_for_envoy() -> None:
    for host in ("127.0.0.1", "controlplane.infra.svc.cluster.local"):
        ok, output = validate_config(bootstrap_yaml(group="n", node_id="y", xds_host=host, xds_port=18000))
        assert ok, output


def test_rendered_bootstrap_dials_the_control_plane_over_http2() -> None:
    """No control plane exists yet, so stand in a bare socket: Envoy must connect to it and speak HTTP/2."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        listener.settimeout(0.05)
        bootstrap = render_bootstrap(
            group="edge",
            node_id="edge-1",
            xds_host=LOOPBACK,
            xds_port=listener.getsockname()[1],
            admin_port=0,
        )
        with EnvoyProcess(bootstrap, name="ads-client", wait_ready=False) as envoy:

            def accept() -> list[socket.socket]:
                try:
                    return [listener.accept()[0]]
                except TimeoutError:
                    return []

            (conn,) = envoy.wait_for(accept, timeout=15, message="ADS connection to the fake control plane")
            with conn:
                conn.settimeout(5)
                preface = b""
                while len(preface) < 24:
                    chunk = conn.recv(24 - len(preface))
                    if not chunk:
                        break
                    preface += chunk
                assert preface == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                # Waiting for CDS: not LIVE until a control plane answers.
                assert envoy.ready_state() in {"PRE_INITIALIZING", "INITIALIZING"}
                node = envoy.bootstrap_dump()["node"]
                assert (node["id"], node["cluster"]) == ("edge-1", "edge")
        assert not envoy.running and envoy not in live_processes()


def test_poll_until_reports_the_last_value() -> None:
    calls: list[int] = []

    def never() -> list[int]:
        calls.append(1)
        return []

    with pytest.raises(AssertionError, match=r"never true; last value: \[\]"):
        poll_until(never, timeout=0.05, message="never true")
    assert len(calls) > 1


@pytest.mark.parametrize(
    "override",
    [{"group": ""}, {"node_id": " "}, {"xds_port": 0}, {"xds_port": 70000}, {"admin_address": "localhost"}],
)
def test_render_bootstrap_rejects_bad_input(override: dict[str, Any]) -> None:
    args: dict[str, Any] = {"group": "g", "node_id": "n", "xds_host": "127.0.0.1", "xds_port": 18000}
    with pytest.raises(ValueError):
        render_bootstrap(**{**args, **override})


def test_rendered_bootstrap_shape() -> None:
    boot = render_bootstrap(group="edge", node_id="edge-1", xds_host="cp.internal", xds_port=18000)
    assert boot["node"] == {"id": "edge-1", "cluster": "edge"}
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    ads = boot["dynamic_resources"]["ads_config"]
    assert (ads["api_type"], ads["set_node_on_first_message_only"]) == ("GRPC", True)
    (xds,) = boot["static_resources"]["clusters"]
    assert xds["type"] == "STRICT_DNS"  # every address the name resolves to is an endpoint
    assert (
        render_bootstrap(group="e", node_id="n", xds_host="10.0.0.1", xds_port=1)["static_resources"]["clusters"][0][
            "type"
        ]
        == "STATIC"
    )


def test_controlplane_process_removes_the_state_dir_it_made_and_keeps_a_given_one(tmp_path: Path) -> None:
    """Its own temp state dir (keys, audit store, pins) lives across restarts and goes with the instance."""
    from tests.support.controlplane import ControlPlaneProcess

    with ControlPlaneProcess(ROOT / "examples" / "quickstart", log_path=tmp_path / "cp.log") as server:
        made = server.state_dir
        assert (made / "audit.sqlite3").exists()
    assert not made.exists()
    given = tmp_path / "state"
    with ControlPlaneProcess(ROOT / "examples" / "quickstart", log_path=tmp_path / "cp2.log", state_dir=given):
        pass
    assert (given / "audit.sqlite3").exists()


def test_the_demo_keeps_its_state_in_dot_demo_where_the_readmes_audit_command_looks() -> None:
    from tests.support import demo

    server = demo.controlplane()
    command = server.command()
    assert command[command.index("--state-dir") + 1] == str(demo.ROOT / ".demo" / "state")
    readme = (demo.ROOT / "README.md").read_text()
    (line,) = [line.strip() for line in readme.splitlines() if "controlplane audit" in line and ".demo" in line]
    assert "--state-dir .demo/state" in line, line


def test_spawning_with_preexec_under_a_live_grpc_server_never_aborts_the_child() -> None:
    """CI once lost an Envoy to SIGABRT before exec: gRPC's fork handlers ran in a child forked (for its
    `preexec_fn`) while this process served gRPC. `tests.support` turns them off; 400 spawns show it holds
    (with the handlers on, about 3 in 500 aborted)."""
    import asyncio
    import contextlib
    import ctypes
    import subprocess
    import threading

    from grpc import aio

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    started, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        server = aio.server()
        server.add_insecure_port(f"{LOOPBACK}:0")
        await server.start()
        channel = aio.insecure_channel(f"{LOOPBACK}:{free_port()}")  # keeps gRPC's poller busy reconnecting
        started.set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.channel_ready(), 0.01)
        await channel.close()
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        codes = [subprocess.run(["/bin/true"], preexec_fn=lambda: prctl(1, 9), check=False).returncode
                 for _ in range(400)]  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
    assert codes.count(0) == len(codes), sorted(set(codes))


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    """An outgoing connection's local port comes from the kernel's ephemeral range: a port picked there could be
    taken by one (a PostgreSQL pool connecting) before the server meant for it binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(10_000 <= port < low for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, ports[0]))  # free when handed out
