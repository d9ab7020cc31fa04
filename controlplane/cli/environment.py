"""The listeners' addresses from the environment, and `controlplane healthcheck`: what a container needs.

A container image is configured by environment variables (its CMD stays `serve`), and its HEALTHCHECK runs a
command inside the container with no shell and no curl. So every `serve` listener takes its default address from
a `CONTROLPLANE_*_ADDRESS` variable when it is set (a flag still wins), and `healthcheck` asks the admin
listener named by the same variable for `/healthz`: changing the admin port in one place moves the probe with it
(docs/deploying-image.md).
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import sys
import threading
from collections.abc import Callable

XDS_ADDRESS_ENV = "CONTROLPLANE_XDS_ADDRESS"
ADMIN_ADDRESS_ENV = "CONTROLPLANE_ADMIN_ADDRESS"
EXCHANGE_ADDRESS_ENV = "CONTROLPLANE_EXCHANGE_ADDRESS"
EXCHANGE_PUBLIC_ADDRESS_ENV = "CONTROLPLANE_EXCHANGE_PUBLIC_ADDRESS"
WEBHOOK_ADDRESS_ENV = "CONTROLPLANE_WEBHOOK_ADDRESS"
WEBHOOK_SECRET_FILE_ENV = "CONTROLPLANE_WEBHOOK_SECRET_FILE"

# A listener bound to every interface is reached, from inside its own container, on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
HEALTHCHECK_TIMEOUT = 3.0


def address_default(variable: str, default: tuple[str, int] | None) -> str | tuple[str, int] | None:
    """`default`, or the variable's HOST:PORT text when it is set and not empty. argparse converts a string
    default with the flag's type, so a malformed value is a usage error naming the flag, as on the command line."""
    return os.environ.get(variable) or default


def file_default(variable: str) -> str | None:
    """The variable's path when set and not empty: a secret's file, never the secret itself."""
    return os.environ.get(variable) or None


def check_exchange_public_address(listen: tuple[str, int], public: tuple[str, int] | None) -> None:
    """Raise ValueError when what gateways dial for the exchange (`public`, else `listen`) is a wildcard. The
    image listens on 0.0.0.0:9904, and without CONTROLPLANE_EXCHANGE_PUBLIC_ADDRESS that address went into every
    gateway's exchange cluster, where Envoy dials its own host: every exchange failed while the control plane
    was healthy (docs/deploying-image.md)."""
    address = public or listen
    if address[0] in _WILDCARDS:
        named = "--exchange-public-address" if public else "--exchange-address, with no --exchange-public-address,"
        raise ValueError(
            f"{named} is {_bracketed(address[0])}:{address[1]}, which gateways cannot dial: set "
            f"--exchange-public-address (env {EXCHANGE_PUBLIC_ADDRESS_ENV}) to the HOST:PORT they reach this "
            "exchange at (a Service name)"
        )


def add_healthcheck_arguments(
    parser: argparse.ArgumentParser, host_port: Callable[[str], tuple[str, int]], default: tuple[str, int]
) -> None:
    parser.add_argument(
        "--admin-address",
        type=host_port,
        default=address_default(ADMIN_ADDRESS_ENV, default),
        help=f"serve's admin HOST:PORT (env {ADMIN_ADDRESS_ENV}); a wildcard host is asked on loopback",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=HEALTHCHECK_TIMEOUT, help="seconds to wait for the whole answer"
    )


def _seconds(value: str) -> float:
    """A positive, finite number of seconds: 0, a negative number or NaN reached the socket and raised there."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def run_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when serve's `/healthz` answers 200, else 1 with one line saying why (what a HEALTHCHECK or an
    exec probe records), within `--timeout` in all. http.client's timeout bounds each socket operation, not the
    answer: a listener that trickles a header byte now and then held the probe for as long as it liked, so the
    request runs on a daemon thread that is given up on when the time is over."""
    host, port = args.admin_address
    host = _WILDCARDS.get(host, host)
    url = f"{admin_url(args.admin_address)}/healthz"
    answer: list[int | OSError | http.client.HTTPException] = []
    asking = threading.Thread(target=_ask, args=(host, port, args.timeout, answer), name="healthcheck", daemon=True)
    asking.start()
    asking.join(args.timeout)
    if not answer:
        print(f"unhealthy: {url}: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    status = answer[0]
    if not isinstance(status, int):
        print(f"unhealthy: {url}: {status}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


def _ask(host: str, port: int, timeout: float, answer: list[int | OSError | http.client.HTTPException]) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        answer.append(connection.getresponse().status)
    except (OSError, http.client.HTTPException) as error:
        answer.append(error)
    finally:
        connection.close()


def admin_url(address: tuple[str, int]) -> str:
    """The base URL at which a command on serve's own host reaches the admin listener bound at `address`."""
    host, port = address
    return f"http://{_bracketed(_WILDCARDS.get(host, host))}:{port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
