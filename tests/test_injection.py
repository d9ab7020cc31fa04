"""Upstream credential injection: the policy key, the compiled filter and SDS secret, and the secrets source."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane.compiler.compile import compile_policy
from controlplane.model.credentials import EXCHANGE_PATH, CredentialInputs
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Injection, Policy
from controlplane.snapshots import golden
from controlplane.snapshots.snapshot import LISTENER, ROUTE, SECRET, build_snapshots
from controlplane.sources.secrets import MAX_SECRET_BYTES, SecretsSource, read_secrets

ISSUER = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
BINDING = "kind: Binding\nname: b\nissuer: gitlab\nroles: [r]\nsubjects: [{project: 42}]\n"
GATEWAY = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [a, b]\n"
ROLE = "kind: Role\nname: r\nbackend: a\nrules: [{methods: [GET]}]\n"
SECRET_VALUE = "s3cr3t-backend-token"


def _backend(name: str, inject: str = "") -> str:
    return (
        f"kind: Backend\nname: {name}\nhosts: [{name}.local]\nendpoints: [{{address: 127.0.0.1, port: 1}}]\n" + inject
    )


def _files(inject: str) -> dict[str, str]:
    return {
        "i.yaml": ISSUER,
        "a.yaml": _backend("a", inject),
        "b.yaml": _backend("b"),
        "r.yaml": ROLE + "---\n" + BINDING + "---\n" + GATEWAY,
    }


def _policy(inject: str = "inject:\n  value_prefix: 'Bearer '\n  secret_file: /run/secrets/a\n") -> Policy:
    return parse_policy(_files(inject))


# -- the policy key


def test_inject_defaults_to_authorization_and_reads_one_source() -> None:
    assert _policy().backend("a").inject == Injection("Authorization", "Bearer ", None, "/run/secrets/a")
    env = _policy("inject: {header: X-Backend-Token, secret_env: BACKEND_A}\n").backend("a").inject
    assert env == Injection("X-Backend-Token", "", "BACKEND_A", None)
    assert _policy().backend("b").inject is None


@pytest.mark.parametrize(
    ("inject", "field", "message"),
    [
        ("inject: {header: Authorization}\n", "inject.secret_env", "missing required key: secret_env or secret_file"),
        ("inject: {secret_env: A, secret_file: /a}\n", "inject.secret_file", "not both"),
        ("inject: {secret_file: relative}\n", "inject.secret_file", "expected an absolute path"),
        ("inject: {secret_env: lower}\n", "inject.secret_env", "environment variable name"),
        ("inject: {header: 'bad header', secret_env: A}\n", "inject.header", "HTTP header name"),
        ("inject: {header: host, secret_env: A}\n", "inject.header", "Host header"),
        ("inject: {secret_env: A, token: abc}\n", "inject.token", "secrets never go in policy files"),
        ("inject: /run/secrets/a\n", "inject", "expected a mapping"),
    ],
)
def test_inject_errors_name_file_line_and_field(inject: str, field: str, message: str) -> None:
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(_files(inject))
    (error,) = raised.value.errors
    assert (error.file, error.line, error.field) == ("a.yaml", 5, field)
    assert message in error.message
    assert "abc" not in str(error)


# -- the compiler


def _compiled(policy: Policy, secrets: dict[str, str] | None) -> dict[str, list[tuple[str, bytes]]]:
    return {t: list(r) for t, r in compile_policy(policy, secrets=secrets)["gw"].resources.items()}


def _hcm(resources: dict[str, list[tuple[str, bytes]]]) -> hcm.HttpConnectionManager:
    ((_, data),) = resources[LISTENER]
    listener = listener_pb2.Listener.FromString(data)
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager


def test_injection_filter_is_off_by_default_after_rbac_and_before_the_router() -> None:
    manager = _hcm(_compiled(_policy(), {"a": SECRET_VALUE}))
    names = [f.name for f in manager.http_filters]
    assert names[-3:] == ["envoy.filters.http.rbac", "inject-a", "envoy.filters.http.router"]
    inject = manager.http_filters[-2]
    assert inject.disabled
    config = credential_injector_pb2.CredentialInjector()
    inject.typed_config.Unpack(config)
    assert config.overwrite and config.credential.name == "envoy.http.injected_credentials.generic"
    generic = generic_pb2.Generic()
    config.credential.typed_config.Unpack(generic)
    assert generic.header == "Authorization"
    assert generic.credential.name == "backend-a-credential"
    assert generic.credential.sds_config.HasField("ads")


def test_injection_is_enabled_only_on_its_backends_virtual_host() -> None:
    ((_, data),) = _compiled(_policy(), {"a": SECRET_VALUE})[ROUTE]
    hosts = {v.name: v for v in route_pb2.RouteConfiguration.FromString(data).virtual_hosts}
    enabled = route_components_pb2.FilterConfig()
    hosts["a"].typed_per_filter_config["inject-a"].Unpack(enabled)
    assert enabled.HasField("config") and not enabled.disabled  # an empty Any, never disabled:false
    assert "inject-a" not in hosts["b"].typed_per_filter_config


def test_the_backend_credential_never_goes_to_the_token_exchange() -> None:
    exchange = CredentialInputs(exchange_address=("127.0.0.1", 1))
    ((_, data),) = compile_policy(_policy(), credentials=exchange, secrets={"a": SECRET_VALUE})["gw"].resources[ROUTE]
    (host,) = [v for v in route_pb2.RouteConfiguration.FromString(data).virtual_hosts if v.name == "a"]
    routes = {r.match.path or r.match.prefix: r for r in host.routes}
    off = route_components_pb2.FilterConfig()
    routes[EXCHANGE_PATH].typed_per_filter_config["inject-a"].Unpack(off)
    assert off.disabled
    assert "inject-a" not in routes["/"].typed_per_filter_config  # the vhost's switch applies


@pytest.mark.parametrize(
    ("inject", "removed"),
    [
        ("", ["authorization"]),
        ("inject: {header: X-Api-Key, secret_env: A}\n", ["authorization"]),
        # The injector's overwrite replaces the job's value; a route removal would run after it and drop it.
        ("inject: {header: authorization, secret_env: A}\n", []),
    ],
)
def test_a_public_path_removes_the_jobs_authorization_unless_the_injector_replaces_it(
    inject: str, removed: list[str]
) -> None:
    files = _files(inject)
    files["a.yaml"] += "public_paths: [/healthz]\n"
    ((_, data),) = _compiled(parse_policy(files), {"a": SECRET_VALUE})[ROUTE]
    (host,) = [v for v in route_pb2.RouteConfiguration.FromString(data).virtual_hosts if v.name == "a"]
    routes = {r.match.path or r.match.prefix: r for r in host.routes}
    assert list(routes["/healthz"].request_headers_to_remove) == removed
    assert not routes["/"].request_headers_to_remove  # jwt_authn's forward: false strips it there


def test_secret_resource_carries_prefix_and_value_and_the_listener_does_not_depend_on_it() -> None:
    first = _compiled(_policy(), {"a": SECRET_VALUE})
    ((name, data),) = first[SECRET]
    secret = secret_pb2.Secret.FromString(data)
    assert name == secret.name == "backend-a-credential"
    assert secret.generic_secret.secret.inline_string == "Bearer " + SECRET_VALUE
    second = _compiled(_policy(), {"a": "rotated"})
    assert second[LISTENER] == first[LISTENER] and second[ROUTE] == first[ROUTE]
    assert second[SECRET] != first[SECRET]


def test_a_missing_secret_is_delivered_empty_so_envoy_refuses_instead_of_forwarding() -> None:
    ((_, data),) = _compiled(_policy(), None)[SECRET]
    assert secret_pb2.Secret.FromString(data).generic_secret.secret.inline_string == ""


def test_no_injection_no_secret_and_an_unchanged_listener() -> None:
    plain = _policy("")
    resources = _compiled(plain, {})
    assert resources.get(SECRET, []) == []
    assert "inject-" not in str([f.name for f in _hcm(resources).http_filters])


def test_golden_output_never_holds_the_secret() -> None:
    snapshots = build_snapshots({"gw": _compiled(_policy(), {"a": SECRET_VALUE})})
    files = golden.render(snapshots["gw"])
    text = "".join(files.values())
    assert SECRET_VALUE not in text and "backend-a-credential" in files["secrets.yaml"]
    assert "REDACTED" in files["secrets.yaml"]
    rotated = build_snapshots({"gw": _compiled(_policy(), {"a": "other"})})
    assert golden.render(rotated["gw"]) == files  # not even a version hash of the value


# -- the secrets source


def test_read_secrets_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "a"
    file.write_text(SECRET_VALUE + "\n")
    monkeypatch.setenv("BACKEND_B", "env-value")
    policy = parse_policy(
        {
            **_files(f"inject: {{secret_file: {file}}}\n"),
            "b.yaml": _backend("b", "inject: {secret_env: BACKEND_B}\n"),
        }
    )
    assert read_secrets(policy) == {"a": SECRET_VALUE, "b": "env-value"}
    file.unlink()
    monkeypatch.delenv("BACKEND_B")
    assert read_secrets(policy) == {}  # unreadable: left out (Envoy then refuses), never a crash


def test_secrets_source_recompiles_when_a_file_changes(tmp_path: Path) -> None:
    file = tmp_path / "a"
    file.write_text("one")
    policy = parse_policy(_files(f"inject: {{secret_file: {file}}}\n"))

    async def scenario() -> list[str]:
        seen: list[str] = []
        changed = asyncio.Event()

        async def on_change() -> None:
            seen.append(source.for_policy(policy)["a"])  # what PolicyService.recompile does
            changed.set()

        source = SecretsSource(on_change, interval=0.01)
        assert source.for_policy(policy) == {"a": "one"}
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        staged = tmp_path / "a.new"
        staged.write_text("two")
        os.replace(staged, file)  # atomic, as a secret manager's sidecar writes it
        await asyncio.wait_for(changed.wait(), timeout=5)
        stop.set()
        await task
        return seen

    assert asyncio.run(scenario()) == ["two"]


@pytest.mark.parametrize("kind", ["fifo", "zero", "big"])
def test_a_secret_file_that_is_not_a_small_regular_file_is_not_read(tmp_path: Path, kind: str) -> None:
    """The secrets are read during a reload: a FIFO there blocked it for good, /dev/zero grew it without bound."""
    file = tmp_path / "secret"
    if kind == "fifo":
        os.mkfifo(file)
    elif kind == "zero":
        file.symlink_to("/dev/zero")
    else:
        file.write_text("x" * (MAX_SECRET_BYTES + 1))
    policy = parse_policy(_files(f"inject: {{secret_file: {file}}}\n"))
    done: list[dict[str, str]] = []
    worker = threading.Thread(target=lambda: done.append(read_secrets(policy)), daemon=True)
    worker.start()
    worker.join(10)
    assert done == [{}]
