"""The listeners' CONTROLPLANE_*_ADDRESS variables and `controlplane healthcheck` (controlplane/cli/environment.py):
how the image is configured without changing its CMD, and how its HEALTHCHECK asks serve."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import pytest

from controlplane.cli.environment import run_healthcheck
from controlplane.cli.main import _parser, main, serve_options
from controlplane.cli.options import ServeOptions
from tests.support.backends import LoopbackHTTPServer, Response
from tests.support.ports import free_port

ADDRESSES = {
    "CONTROLPLANE_XDS_ADDRESS": "0.0.0.0:18000",
    "CONTROLPLANE_ADMIN_ADDRESS": "0.0.0.0:9902",
    "CONTROLPLANE_EXCHANGE_ADDRESS": "0.0.0.0:9904",
    "CONTROLPLANE_EXCHANGE_PUBLIC_ADDRESS": "controlplane-exchange:9904",
    "CONTROLPLANE_WEBHOOK_ADDRESS": "0.0.0.0:9903",
    "CONTROLPLANE_WEBHOOK_SECRET_FILE": "/run/secrets/webhook",
}


def _options(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str) -> ServeOptions:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = serve_options(_parser().parse_args(["serve", *argv]))
    assert isinstance(options, ServeOptions), options
    return options


def test_every_listener_follows_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    options = _options(monkeypatch, ADDRESSES)
    assert (options.xds_host, options.xds_port) == ("0.0.0.0", 18000)
    assert (options.admin_host, options.admin_port) == ("0.0.0.0", 9902)
    assert options.credentials is not None
    assert options.credentials.listen == ("0.0.0.0", 9904)
    assert options.credentials.public == ("controlplane-exchange", 9904)
    assert options.webhooks is not None
    assert (options.webhooks.host, options.webhooks.port) == ("0.0.0.0", 9903)
    assert options.webhooks.secret_file == "/run/secrets/webhook"


def test_a_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    options = _options(monkeypatch, ADDRESSES, "--xds-address", "127.0.0.1:1", "--admin-address", "127.0.0.1:2")
    assert (options.xds_port, options.admin_port) == (1, 2)


def test_without_variables_the_defaults_stay_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ADDRESSES:
        monkeypatch.delenv(name, raising=False)
    options = _options(monkeypatch, {})
    assert (options.xds_host, options.admin_host) == ("127.0.0.1", "127.0.0.1")
    assert options.credentials is not None and options.credentials.listen[0] == "127.0.0.1"
    assert options.webhooks is None


def test_validate_compiles_the_exchange_address_serve_would(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ADDRESSES.items():
        monkeypatch.setenv(name, value)
    validate = _parser().parse_args(["validate", "p"])
    assert validate.exchange_public_address == ("controlplane-exchange", 9904)
    assert validate.exchange_address == ("0.0.0.0", 9904)


def test_a_malformed_variable_is_a_usage_error_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONTROLPLANE_XDS_ADDRESS", "18000")
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["serve"])
    assert exit_.value.code == 2
    assert "--xds-address: expected HOST:PORT, got '18000'" in capsys.readouterr().err


def _admin(status: int) -> LoopbackHTTPServer:
    server = LoopbackHTTPServer(name="admin")
    server.router.add("GET", "/healthz", lambda _request: Response(status, b"ok\n" if status == 200 else b"no\n"))
    return server


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_healthcheck_asks_healthz_on_loopback_for_a_wildcard_address(
    status: int, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with _admin(status) as admin:
        args = argparse.Namespace(admin_address=("0.0.0.0", admin.port), timeout=5.0)
        assert run_healthcheck(args) == code
        assert [request.path for request in admin.requests] == ["/healthz"]
    err = capsys.readouterr().err
    assert (f"/healthz answered {status}" in err) == (code == 1), err


def test_healthcheck_reads_the_admin_variable_and_says_why_it_failed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("CONTROLPLANE_ADMIN_ADDRESS", f"0.0.0.0:{port}")
    assert main(["healthcheck", "--timeout", "2"]) == 1
    assert f"unhealthy: http://127.0.0.1:{port}/healthz:" in capsys.readouterr().err


def test_healthcheck_gives_up_on_a_listener_that_trickles_its_answer(capsys: pytest.CaptureFixture[str]) -> None:
    # Each byte arrives well within the socket timeout, so only a deadline on the whole answer ends the probe.
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def trickle() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(0.05):
                    connection.sendall(b"X")

        server = threading.Thread(target=trickle, daemon=True)
        server.start()
        args = argparse.Namespace(admin_address=("127.0.0.1", listener.getsockname()[1]), timeout=0.5)
        codes: list[int] = []
        probe = threading.Thread(target=lambda: codes.append(run_healthcheck(args)), daemon=True)
        started = time.monotonic()
        probe.start()
        probe.join(5)
        stop.set()
        server.join(5)
    assert codes == [1], "healthcheck still waiting 5 s after its 0.5 s timeout"
    assert time.monotonic() - started < 2
    assert "no answer within 0.5 s" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_healthcheck_refuses_a_timeout_that_is_not_a_positive_number(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["healthcheck", "--timeout", timeout])
    assert exit_.value.code == 2
    assert f"--timeout: expected a positive number of seconds, got {timeout!r}" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["127.0.0.1:75438", "127.0.0.1:\uff19\uff19\uff10\uff12", "127.0.0.1:\u00b2"])
def test_a_port_that_is_not_one_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    # getaddrinfo wrapped 75438 to 9902, so the probe asked another port than the one named
    monkeypatch.setenv("CONTROLPLANE_ADMIN_ADDRESS", address)
    for argv in (["healthcheck"], ["serve"]):
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args(argv)
        assert exit_.value.code == 2
        assert f"--admin-address: expected HOST:PORT, got {address!r}" in capsys.readouterr().err


def test_an_unknown_log_level_is_a_usage_error_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONTROLPLANE_LOG_LEVEL", "verbose")  # raised ValueError from logging, a raw traceback
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["healthcheck"])
    assert exit_.value.code == 2
    assert (
        "--log-level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'verbose'" in capsys.readouterr().err
    )
    monkeypatch.setenv("CONTROLPLANE_LOG_LEVEL", "debug")
    assert _parser().parse_args(["healthcheck"]).log_level == "debug"


@pytest.mark.parametrize(
    ("env", "argv"),
    [
        ({"CONTROLPLANE_EXCHANGE_ADDRESS": "0.0.0.0:9904"}, ()),  # the image's listener, no public address
        ({"CONTROLPLANE_EXCHANGE_ADDRESS": "[::]:9904"}, ()),
        ({}, ("--exchange-public-address", "0.0.0.0:9904")),
    ],
)
def test_serve_refuses_to_route_gateways_to_a_wildcard_exchange_address(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: tuple[str, ...]
) -> None:
    # 0.0.0.0 compiled into every gateway's exchange cluster: Envoy dialled its own host and every exchange failed
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused = serve_options(_parser().parse_args(["serve", *argv]))
    assert isinstance(refused, str) and "which gateways cannot dial" in refused
    assert "CONTROLPLANE_EXCHANGE_PUBLIC_ADDRESS" in refused
    options = _options(monkeypatch, env, *argv, "--no-exchange")  # no exchange, nothing to route
    assert options.credentials is None


def test_status_in_the_container_asks_the_admin_listener_beside_it_and_no_proxy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`controlplane status` run in the image (where CONTROLPLANE_ADMIN_ADDRESS moves the admin listener) asks that
    listener, on loopback for a wildcard host; and a proxy set in the environment never reroutes it (it asked the
    default 127.0.0.1:9902 and went through HTTP_PROXY)."""
    document = {"version": "v1", "policy": {"errors": 0}, "summary": {}, "proxies": [], "page": {}}
    server = LoopbackHTTPServer(name="admin")
    server.router.add("GET", "/status", lambda _request: Response(200, json.dumps(document).encode()))
    with server as admin:
        monkeypatch.delenv("CONTROLPLANE_ADMIN", raising=False)
        monkeypatch.setenv("CONTROLPLANE_ADMIN_ADDRESS", f"0.0.0.0:{admin.port}")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens: a proxied ask fails
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("NO_PROXY", "")
        args = _parser().parse_args(["status", "--json"])
        assert args.admin == f"http://127.0.0.1:{admin.port}"
        main(["status", "--json"])
        assert [request.path.split("?")[0] for request in admin.requests] == ["/status"]
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
