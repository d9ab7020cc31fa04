"""`controlplane explain`: why a request was (or would be) allowed or denied, in words and as JSON.

The token comes from a file or stdin, never the command line (argv is visible to every user of the machine);
it is decoded here and its signature is NOT checked (Envoy checks it): only its claims are used, and only the
claims are sent to a server. Against a policy directory the answer is the policy's alone (no GitLab live state
beyond the files, no deny list); `--server` asks a running serve, which answers with its policy in service,
GitLab's live state and its revoked jobs (`POST /explain` on its admin port).

Exit status: 0 allowed, 1 refused (denied, revoked, unauthenticated, no route, rejected), 2 a usage or input
error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from controlplane.model.errors import PolicyInvalid
from controlplane.resolved.explain import (
    ExplainError,
    Request,
    document,
    explain,
    printable,
    read_json_object,
    read_token,
    text_lines,
)
from controlplane.sources.policy_dir import ReadLimits

EXIT_ALLOWED, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
SERVER_TIMEOUT = 10.0
MAX_INPUT_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a server's answer: a few KiB; more is not one (a truncated body is not JSON)

EPILOG = """\
exit status: 0 allowed, 1 refused (denied, revoked, unauthenticated, no route, rejected), 2 usage or input error.
The token's signature is not checked (Envoy checks it); offline, revoked jobs and GitLab's live state are unknown:
ask a running server with --server. JSON output: docs/explain.md."""


_LOOKS_LIKE_A_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.")


class InputError(Exception):
    """A token, claims file or request that cannot be read: exit 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("policy", type=Path, nargs="?", help="policy directory (or ask a running server: --server)")
    parser.add_argument("--server", metavar="HOST:PORT", help="a running serve's admin address (its live state)")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token-file", metavar="PATH", help="the JWT, from a file or - for stdin (never argv)")
    token.add_argument("--claims", metavar="FILE", help="the token's claims as a JSON object, from a file or -")
    parser.add_argument("--method", default="GET", help="HTTP method (default GET)")
    parser.add_argument("--host", help="the Host header the job sent")
    parser.add_argument("--path", help="the request path (default /)")
    parser.add_argument("--url", help="instead of --host/--path: http://HOST[:PORT]/PATH (the port picks a gateway)")
    parser.add_argument("--gateway", help="the gateway group the request reaches (default: the one fronting it)")
    parser.add_argument(
        "--no-exchange", action="store_true", help="offline: serve runs with --no-exchange (no exchanged credentials)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")
    # Unexpected arguments are kept for run_explain rather than refused by argparse, whose error repeats them:
    # a token pasted on the command line would be printed again, to the terminal or the CI log.
    parser.set_defaults(unexpected=[])
    setattr(parser, "parse_known_args", _keeping_unexpected(parser.parse_known_args))  # noqa: B010


def _keeping_unexpected(parse: Callable[..., tuple[argparse.Namespace, list[str]]]) -> Callable[..., Any]:
    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, unexpected = parse(args, namespace)
        parsed.unexpected = [*parsed.unexpected, *unexpected]
        return parsed, []

    return parse_known_args


def run_explain(args: argparse.Namespace, limits: ReadLimits) -> int:
    try:
        refuse_argv_tokens(args)
        if (args.policy is None) == (args.server is None):
            raise InputError("give a policy directory or --server HOST:PORT (one of them)")
        claims, problem = read_claims(args)
        request = build_request(args)
        if args.server is not None:
            doc = _ask_server(args.server, claims, request, problem)
        else:
            doc = _ask_offline(args.policy, limits, claims, request, problem, exchange=not args.no_exchange)
    except InputError as error:
        print(printable(f"controlplane explain: {error}"), file=sys.stderr)  # a server's words too
        return EXIT_USAGE
    if args.format == "json":
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in text_lines(doc):
            print(line)
    return EXIT_ALLOWED if doc["allowed"] else EXIT_REFUSED


def refuse_argv_tokens(args: argparse.Namespace) -> None:
    """A token given on the command line is refused and never repeated: argv is visible to every user of the
    machine (and kept in shell history), and an error that echoed it would print it again."""
    values = [args.policy, args.server, args.host, args.path, args.url, args.method, args.gateway, args.claims]
    values += [args.token_file, *args.unexpected]
    if any(_LOOKS_LIKE_A_JWT.search(str(v)) for v in values if v is not None):
        raise InputError(
            "a token on the command line is visible to every user of this machine and stays in shell history: "
            "it was not used (nor is it repeated here); pass it with --token-file FILE, or --token-file - (stdin)"
        )
    if args.unexpected:
        raise InputError(f"{len(args.unexpected)} unexpected argument(s), not repeated here (one may be a token)")


def _read(source: str) -> str:
    try:
        raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1) if source == "-" else _read_file(Path(source))
    except OSError as error:
        raise InputError(f"{source}: {error.strerror or error}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(f"{source}: over {MAX_INPUT_BYTES} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InputError(f"{source}: not UTF-8 text") from None


def _read_file(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(MAX_INPUT_BYTES + 1)


def read_claims(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str | None]:
    """The claims of `--token-file` (decoded, not verified) or `--claims`; None: the request has no token, or
    (with the second item, why) a token Envoy cannot read, which it answers with 401 where a token is checked:
    a developer pastes what they have, and that is an answer too."""
    if args.token_file is not None:
        return read_token(_read(args.token_file))
    if args.claims is not None:
        text = _read(args.claims)
        try:
            claims = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise InputError(f"{args.claims}: not JSON ({str(error)[:80]})") from None
        if not isinstance(claims, dict):
            raise InputError(f"{args.claims}: the claims must be a JSON object")
        # JSON Python reads but Envoy would not (a key twice, NaN, too deep): the token carrying it is a 401.
        return read_json_object(text, "token's payload")
    return None, None


def decode_token(text: str) -> dict[str, Any]:
    """The payload of a compact JWS, or InputError when Envoy could not read it. Never echoes the token."""
    claims, problem = read_token(text)
    if claims is None:
        raise InputError(problem or "not a JWT")
    return claims


def build_request(args: argparse.Namespace) -> Request:
    port = None
    if args.url is not None:
        if args.host is not None or args.path is not None:
            raise InputError("--url replaces --host and --path: give one or the other")
        parts = urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"--url must be http://HOST[:PORT]/PATH, got {args.url!r}")
        try:
            port = parts.port
        except ValueError:
            raise InputError(f"--url has a bad port: {args.url!r}") from None
        host = parts.netloc.rpartition("@")[2]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    else:
        if args.host is None:
            raise InputError("give --host (or --url)")
        host, path = args.host, args.path or "/"
    if not path.startswith("/"):
        raise InputError(f"the path must start with '/', got {path!r}")
    return Request(args.method, host, path, args.gateway, port)


def _ask_offline(
    policy_dir: Path,
    limits: ReadLimits,
    claims: dict[str, Any] | None,
    request: Request,
    problem: str | None,
    *,
    exchange: bool,
) -> dict[str, Any]:
    from controlplane.admin.explain import explain_inputs, serve_default_credentials
    from controlplane.model.loader import parse_policy
    from controlplane.resolved.index import Resolution
    from controlplane.sources.policy_dir import read_policy_dir

    try:
        policy = parse_policy(read_policy_dir(policy_dir, limits))
        resolved = Resolution().update(policy)
    except PolicyInvalid as invalid:
        for line in invalid.lines():
            print(line, file=sys.stderr)
        raise InputError(f"{policy_dir}: invalid policy ({invalid.total} error(s))") from None
    except OSError as error:
        raise InputError(f"{policy_dir}: {error}") from None
    inputs = explain_inputs(policy, resolved, serve_default_credentials(exchange), revocations_known=False)
    try:
        return document(explain(inputs, claims, request, int(time.time()), problem))
    except ExplainError as error:
        raise InputError(str(error)) from None


def _ask_server(address: str, claims: dict[str, Any] | None, request: Request, problem: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"claims": claims, "method": request.method, "host": request.host, "path": request.path}
    if problem is not None:
        body["token_problem"] = problem
    if request.gateway is not None:
        body["gateway"] = request.gateway
    if request.port is not None:
        body["port"] = request.port
    url = f"http://{address}/explain"
    sent = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(sent, timeout=SERVER_TIMEOUT) as response:
            answer = json.loads(response.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as error:
        text = error.read(4096).decode(errors="replace").strip()
        raise InputError(f"{address}: {error.code} {text}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise InputError(f"{address}: {getattr(error, 'reason', error)}") from None
    if not isinstance(answer, dict) or not _an_answer(answer):
        raise InputError(f"{address}: not an explain answer")
    return answer


def _an_answer(answer: object) -> bool:
    """The shape `text_lines` and the exit status read (docs/explain.md), so another server's reply is refused
    in words rather than a traceback."""
    if not isinstance(answer, dict) or not isinstance(answer.get("decision"), str):
        return False
    lists = ("steps", "nearest", "notes")
    if not isinstance(answer.get("allowed"), bool) or not isinstance(answer.get("status"), int):
        return False
    if not isinstance(answer.get("reason"), str) or not all(isinstance(answer.get(k), list) for k in lists):
        return False
    steps_ok = all(isinstance(s, dict) and {"step", "ok", "text"} <= set(s) for s in answer["steps"])
    nearest_ok = all(
        isinstance(c, dict)
        and {"grant", "mode", "failing", "failures"} <= set(c)
        and isinstance(c["failures"], list)
        and all(isinstance(f, dict) and "text" in f for f in c["failures"])
        for c in answer["nearest"]
    )
    return steps_ok and nearest_ok
