"""The `controlplane` command line."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from controlplane import __version__
from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.telemetry import logformat
from controlplane.telemetry.grpclog import bound_native_stderr, route_grpc_logs

if TYPE_CHECKING:
    from collections.abc import Callable

    from controlplane.cli.options import ServeOptions
    from controlplane.cli.validate import ServedInputs
    from controlplane.model.policy import Policy
    from controlplane.resolved.access import ResolvedPolicy
    from controlplane.snapshots.snapshot import Snapshot
    from controlplane.sources.policy_dir import ReadLimits

DEFAULT_POLICY = os.environ.get("CONTROLPLANE_POLICY", "policy")


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    # a port past 65535 is refused here: getaddrinfo wraps it (75438 dialled 9902), bind raised OverflowError
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _issuer_url(value: str) -> str:
    from controlplane.credentials.oidc import IssuerUrlError, parse_issuer_url

    try:
        return parse_issuer_url(value)
    except IssuerUrlError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _host_ports(value: str) -> list[tuple[str, int]]:
    """One or more HOST:PORT, comma-separated: `bootstrap --xds-address` lists the control plane's replicas."""
    return [_host_port(part.strip()) for part in value.split(",") if part.strip()] or [_host_port(value)]


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (`127.0.0.0/8`) or a single address; host bits set are a usage error, not a silent widening."""
    try:
        return ipaddress.ip_network(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a network such as 127.0.0.0/8, got {value!r} ({error})") from None


def _log_level(value: str) -> str:
    """A level logging knows; an unknown one (`CONTROLPLANE_LOG_LEVEL=verbose`) raised a raw traceback at start."""
    if value.upper() not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(f"expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {value!r}")
    return value


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {value!r}")
    return int(value)


def _positive_float(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The policy tree's size bounds, the same for every command that reads one (docs/policy-input.md)."""
    from controlplane.sources.policy_dir import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_FILES, DEFAULT_MAX_TREE_BYTES

    parser.add_argument(
        "--max-policy-file-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_FILE_BYTES,
        help=f"largest policy file read (default {DEFAULT_MAX_FILE_BYTES})",
    )
    parser.add_argument(
        "--max-policy-tree-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_TREE_BYTES,
        help=f"largest policy tree read, all files together (default {DEFAULT_MAX_TREE_BYTES})",
    )
    parser.add_argument(
        "--max-policy-files",
        type=_positive_int,
        default=DEFAULT_MAX_FILES,
        help=f"most policy files a tree may hold (default {DEFAULT_MAX_FILES})",
    )


def _limits(args: argparse.Namespace) -> ReadLimits:
    from controlplane.sources.policy_dir import ReadLimits

    return ReadLimits(
        max_file_bytes=args.max_policy_file_bytes,
        max_tree_bytes=args.max_policy_tree_bytes,
        max_files=args.max_policy_files,
    )


def _parser() -> argparse.ArgumentParser:
    from controlplane.audit.store import DB_NAME as AUDIT_DB
    from controlplane.cli import environment as env
    from controlplane.cli.audit import add_audit_arguments
    from controlplane.cli.bootstrap import API_TYPES, DEFAULT_ADMIN_PORT, DEFAULT_API
    from controlplane.cli.defaults import option_default
    from controlplane.cli.environment import add_healthcheck_arguments, address_default, file_default
    from controlplane.cli.options import STORE_KINDS, GitLabPolicyOptions, ServeOptions, StoreOptions
    from controlplane.cli.status import add_status_arguments
    from controlplane.credentials.oidc import ISSUER_URL_ENV
    from controlplane.credentials.service import DEFAULT_EXCHANGE_ADDRESS, CredentialOptions
    from controlplane.serving import ADMIN_LIMITS, EXCHANGE_LIMITS, WEBHOOK_LIMITS, HttpLimits

    def serve_default(name: str) -> Any:
        return option_default(ServeOptions, name)

    def store_default(name: str) -> Any:
        return option_default(StoreOptions, name)

    def credential_default(name: str) -> Any:
        return option_default(CredentialOptions, name)

    xds_address = (serve_default("xds_host"), serve_default("xds_port"))

    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__)
    parser.add_argument("--version", action="version", version=f"controlplane {__version__}")
    parser.add_argument("--log-level", type=_log_level, default=os.environ.get("CONTROLPLANE_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=logformat.FORMATS,
        default=os.environ.get("CONTROLPLANE_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per line for log collectors (env CONTROLPLANE_LOG_FORMAT)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a policy directory; exit 1 listing every error")
    validate.add_argument("policy", type=Path)
    from controlplane.cli.validate import add_served_input_arguments

    add_served_input_arguments(validate, _host_port)
    _add_limit_arguments(validate)

    diff = commands.add_parser("diff", help="who gains or loses access between two policies (dirs or git revisions)")
    from controlplane.cli.diff import add_arguments as add_diff_arguments

    add_diff_arguments(diff)
    _add_limit_arguments(diff)
    mr_check = commands.add_parser("mr-check", help="a policy merge request's CI job: validate, diff, MR note")
    _add_limit_arguments(mr_check)
    from controlplane.cli.merge_request import add_arguments as add_mr_arguments

    add_mr_arguments(mr_check)

    report = commands.add_parser("report", help="compliance evidence for a window: policy versions, access, use")
    from controlplane.cli.report import add_arguments as add_report_arguments

    add_report_arguments(report)
    _add_limit_arguments(report)

    compile_ = commands.add_parser("compile", help="compile a policy directory to reviewed YAML snapshots")
    compile_.add_argument("policy", type=Path)
    compile_.add_argument("--out", type=Path, required=True, help="directory to (re)write, e.g. snapshots/NAME")
    _add_limit_arguments(compile_)

    suggest = commands.add_parser("suggest", help="least-privilege roles and bindings from observed traffic and CI")
    from controlplane.cli.suggest import add_arguments as add_suggest_arguments

    add_suggest_arguments(suggest)
    _add_limit_arguments(suggest)

    serve = commands.add_parser("serve", help="run the ADS server on a watched policy directory")
    serve.add_argument(
        "--policy", type=Path, default=Path(DEFAULT_POLICY), help="policy directory (env CONTROLPLANE_POLICY)"
    )
    admin_address = (serve_default("admin_host"), serve_default("admin_port"))
    serve.add_argument(
        "--xds-address",
        type=_host_port,
        default=address_default(env.XDS_ADDRESS_ENV, xds_address),
        help=f"HOST:PORT for ADS (env {env.XDS_ADDRESS_ENV})",
    )
    serve.add_argument(
        "--admin-address",
        type=_host_port,
        default=address_default(env.ADMIN_ADDRESS_ENV, admin_address),
        help=f"HOST:PORT for admin HTTP (env {env.ADMIN_ADDRESS_ENV})",
    )
    serve.add_argument(
        "--debounce",
        type=float,
        default=serve_default("debounce"),
        help="seconds of quiet before a policy change is applied",
    )
    serve.add_argument(
        "--max-wait",
        type=float,
        default=serve_default("max_wait"),
        help="longest delay for a change during constant writes",
    )
    _add_limit_arguments(serve)
    serve.add_argument(
        "--reload-timeout",
        type=_positive_float,
        default=serve_default("reload_timeout"),
        help="seconds a policy reload may run before /readyz says not ready (it cannot be interrupted)",
    )
    serve.add_argument(
        "--gc-interval",
        type=float,
        default=serve_default("gc_interval"),
        help="seconds between garbage collections done between pushes instead of during them (0: Python's own)",
    )
    serve.add_argument(
        "--gc-full-every",
        type=int,
        default=serve_default("gc_full_every"),
        help="N > 1: only every Nth scheduled collection is full, the others skip what earlier ones kept (frozen)",
    )
    serve.add_argument(
        "--jwks-refresh",
        type=float,
        default=serve_default("jwks_refresh"),
        help="seconds between JWKS refreshes of relayed issuers (min 1)",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=serve_default("state_dir"),
        help="where remembered project ids are kept (env CONTROLPLANE_STATE_DIR)",
    )
    store = serve.add_argument_group("exchange state: replay counts and finished jobs (docs/shared-state.md)")
    store.add_argument(
        "--store",
        choices=STORE_KINDS,
        default=store_default("kind"),
        help="file: SQLite in the state directory (one host); postgres: shared by replicas, needs one DSN source",
    )
    store.add_argument("--store-dsn-env", default=store_default("dsn_env"), help="environment variable holding the DSN")
    store.add_argument(
        "--store-dsn-file", type=Path, default=store_default("dsn_file"), help="file holding the DSN (one line)"
    )
    store.add_argument(
        "--store-dsn",
        default=store_default("dsn"),
        help="the DSN itself, refused with a password (visible to every user: use the two above or PGPASSFILE)",
    )
    store.add_argument(
        "--replica-id",
        default=store_default("replica_id"),
        help="this replica's name in the shared registry (--store postgres; default: a new uuid at each start)",
    )
    store.add_argument(
        "--leader-retry",
        type=float,
        default=store_default("leader_retry"),
        metavar="S",
        help="seconds between a follower's tries of the leader lock (--store postgres)",
    )
    store.add_argument(
        "--store-pool-size",
        type=int,
        default=store_default("pool_size"),
        metavar="N",
        help="connections to PostgreSQL at most, every shared store together (--store postgres)",
    )
    store.add_argument(
        "--store-timeout",
        type=float,
        default=store_default("timeout"),
        metavar="S",
        help="bound of one connect, one wait for a pooled connection and one statement (--store postgres)",
    )
    store.add_argument(
        "--store-unready-after",
        type=float,
        default=store_default("unready_after"),
        metavar="S",
        help="/readyz answers 503 once PostgreSQL has been unreachable this long (--store postgres)",
    )
    store.add_argument(
        "--store-key-env",
        default=store_default("key_env"),
        help="environment variable holding the key-encryption key of the signing keys (postgres, base64 of 32 bytes)",
    )
    store.add_argument(
        "--store-key-file",
        type=Path,
        default=store_default("key_file"),
        help="file holding that key (a second one after it: the previous key, during a KEK rotation)",
    )
    repo = serve.add_argument_group("policy on GitLab (instead of --policy)")
    repo.add_argument("--policy-project", help="GitLab project (path or id) whose default branch holds the policy")
    repo.add_argument("--gitlab-url", help="GitLab base URL for --policy-project")
    repo.add_argument("--gitlab-token-env", help="environment variable holding a read_api + api (statuses) token")
    repo.add_argument("--gitlab-token-file", help="file holding that token")
    repo.add_argument(
        "--policy-poll",
        type=float,
        default=option_default(GitLabPolicyOptions, "poll_seconds"),
        help="seconds between checks of the policy head",
    )
    creds = serve.add_argument_group("job-scoped credentials (token exchange)")
    creds.add_argument(
        "--exchange-address",
        type=_host_port,
        default=address_default(env.EXCHANGE_ADDRESS_ENV, DEFAULT_EXCHANGE_ADDRESS),
        help=f"HOST:PORT the token exchange listens on (also routed by every gateway at /.controlplane/token; env "
        f"{env.EXCHANGE_ADDRESS_ENV})",
    )
    creds.add_argument(
        "--exchange-public-address",
        type=_host_port,
        default=address_default(env.EXCHANGE_PUBLIC_ADDRESS_ENV, None),
        help=f"what gateways dial (default: --exchange-address; env {env.EXCHANGE_PUBLIC_ADDRESS_ENV})",
    )
    creds.add_argument("--no-exchange", action="store_true", help="disable token exchange and credentials")
    creds.add_argument(
        "--issuer-url",
        type=_issuer_url,
        default=os.environ.get(ISSUER_URL_ENV) or None,
        help=f"public https URL relying parties (AWS, Google Cloud) know the control plane by: discovery and JWKS "
        f"are served below it on the exchange listener (docs/oidc-issuer.md; env {ISSUER_URL_ENV})",
    )
    creds.add_argument(
        "--key-rotation",
        type=_positive_float,
        default=credential_default("rotate_every"),
        help="seconds between signing-key rotations",
    )
    creds.add_argument(
        "--key-publish-lead",
        type=_positive_float,
        help="seconds a new signing key is published before it signs (default 1; with --store postgres 10, or a "
        "quarter of a shorter --key-rotation, so every replica's Envoys hold it first)",
    )
    creds.add_argument(
        "--max-credential-ttl",
        type=float,
        default=credential_default("max_credential_ttl"),
        help="upper bound of any credential's life",
    )
    creds.add_argument(
        "--deny-id-tokens-for",
        type=float,
        default=credential_default("deny_id_tokens_for"),
        help="after a job ends, also deny its raw ID tokens for this many seconds (its timeout); 0: credentials only",
    )
    creds.add_argument(
        "--job-sweep-interval",
        type=float,
        default=credential_default("job_sweep_interval"),
        help="seconds between sweeps asking GitLab whether jobs with access finished (missed Job Hooks)",
    )
    creds.add_argument("--exchange-tls-cert", type=Path, help="HTTPS on the exchange: PEM certificate chain")
    creds.add_argument("--exchange-tls-key", type=Path, help="HTTPS on the exchange: PEM private key")
    creds.add_argument(
        "--exchange-tls-ca", type=Path, help="PEM CA bundle gateways verify the exchange with (pushed to them)"
    )
    creds.add_argument(
        "--exchange-tls-name", help="name gateways check in its certificate (default: the public address's host)"
    )
    audit = serve.add_argument_group("audit trail")
    audit.add_argument("--audit-db", type=Path, help=f"SQLite file (default: <state dir>/{AUDIT_DB})")
    audit.add_argument(
        "--audit-retention",
        type=float,
        default=serve_default("audit_retention"),
        help="seconds audit records are kept",
    )
    xds_tls = serve.add_argument_group("xDS transport security (README: Securing xDS)")
    xds_tls.add_argument("--xds-tls-cert", type=Path, help="PEM certificate chain of the xDS server")
    xds_tls.add_argument("--xds-tls-key", type=Path, help="PEM private key of the xDS server")
    xds_tls.add_argument("--xds-client-ca", type=Path, help="PEM CA that signs proxies' client certificates")
    xds_tls.add_argument(
        "--xds-insecure",
        action="store_true",
        help="allow plain-text xDS even when the policy pushes secrets (`inject:`, `aws:` or `gcp:` backends)",
    )
    serve.add_argument(
        "--xds-max-connections",
        type=int,
        default=serve_default("xds_max_connections"),
        help="connections the xDS port holds at once, more are closed (default: the open-file limit less the HTTP "
        "listeners' bounds and a reserve of 1/16)",
    )
    kube = serve.add_argument_group("Kubernetes Services as backends (docs/kubernetes-endpoints.md)")
    kube.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig of the API server to watch EndpointSlices on (default: the pod's service account)",
    )
    kube.add_argument("--kube-context", help="the kubeconfig's context to use (default: its current-context)")
    kube.add_argument(
        "--kube-allow-endpoints",
        type=_network,
        action="append",
        default=[],
        metavar="CIDR",
        help="serve discovered endpoints in this network although its addresses are refused by default (loopback, "
        "link-local, metadata...: docs/kubernetes-endpoints.md); for test clusters, never in production. Repeatable",
    )
    hooks = serve.add_argument_group("GitLab webhooks")
    hooks.add_argument(
        "--webhook-address",
        type=_host_port,
        default=address_default(env.WEBHOOK_ADDRESS_ENV, None),
        help=f"HOST:PORT for POST /webhooks/gitlab (off if unset; env {env.WEBHOOK_ADDRESS_ENV})",
    )
    hooks.add_argument("--webhook-secret-env", help="environment variable holding the webhook secret token(s)")
    hooks.add_argument(
        "--webhook-secret-file",
        default=file_default(env.WEBHOOK_SECRET_FILE_ENV),
        help=f"file holding webhook secret token(s), one per line (env {env.WEBHOOK_SECRET_FILE_ENV})",
    )
    http = serve.add_argument_group("HTTP listeners: admin, webhooks, exchange (README: Operations)")
    http.add_argument(
        "--http-header-timeout",
        type=float,
        default=option_default(HttpLimits, "header_timeout"),
        help="seconds a connection may take to send complete request headers (after connecting or its last reply)",
    )
    http.add_argument(
        "--http-request-timeout",
        type=float,
        default=option_default(HttpLimits, "request_timeout"),
        help="seconds to read a request body and answer (408)",
    )
    for name, limits in (("admin", ADMIN_LIMITS), ("webhook", WEBHOOK_LIMITS), ("exchange", EXCHANGE_LIMITS)):
        http.add_argument(
            f"--{name}-max-connections",
            type=int,
            default=limits.max_connections,
            help=f"connections the {name} listener holds at once; more wait in the kernel's backlog",
        )

    audit_cmd = commands.add_parser("audit", help="what did a job (or project) do? reads the audit trail")
    add_audit_arguments(audit_cmd)

    status = commands.add_parser("status", help="list connected proxies and policy state from a running server")
    add_status_arguments(status)

    explain = commands.add_parser("explain", help="why is a request allowed or denied? (exit 0 yes, 1 no, 2 usage)")
    from controlplane.cli.explain import add_arguments as add_explain_arguments

    add_explain_arguments(explain)
    _add_limit_arguments(explain)

    healthcheck = commands.add_parser("healthcheck", help="exit 0 if a running serve's /healthz answers (probes)")
    add_healthcheck_arguments(healthcheck, _host_port, admin_address)

    bootstrap = commands.add_parser("bootstrap", help="print an Envoy bootstrap for a gateway group")
    bootstrap.add_argument("--group", required=True, help="gateway name; becomes node.cluster")
    bootstrap.add_argument("--node-id", default=None, help="node.id (default: <group>-<hostname>)")
    bootstrap.add_argument(
        "--xds-address",
        dest="xds_addresses",
        type=_host_ports,
        action="extend",
        help="control plane HOST:PORT; repeat it or give a comma list for several replicas (Envoy fails over "
        f"between them), or one name that resolves to all of them (default: {xds_address[0]}:{xds_address[1]})",
    )
    bootstrap.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT)
    bootstrap.add_argument("--tls-ca", help="mTLS to the control plane: CA that signed its server certificate")
    bootstrap.add_argument("--tls-cert", help="this proxy's client certificate chain (PEM file path on the proxy)")
    bootstrap.add_argument("--tls-key", help="this proxy's client private key (PEM file path on the proxy)")
    bootstrap.add_argument(
        "--api", choices=tuple(API_TYPES), default=DEFAULT_API, help="ADS flavour: State of the World or Delta xDS"
    )
    bootstrap.add_argument("--tls-sni", help="server name to send and verify (default: the --xds-address host)")
    bootstrap.add_argument(
        "--tls-sds-dir",
        help="write two SDS files naming the --tls-* files into this directory (on the proxy) and refer to them: "
        "Envoy then re-reads the certificates when they rotate; without it, it reads them once at start",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.log_format not in logformat.FORMATS:  # argparse checks choices on the command line, not defaults
        print(f"controlplane: CONTROLPLANE_LOG_FORMAT must be one of {', '.join(logformat.FORMATS)}", file=sys.stderr)
        return 2
    logformat.install(args.log_level.upper(), args.log_format)
    route_grpc_logs()  # grpc would log a client's header bytes, once per request
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO
    handler = _COMMANDS[args.command]
    try:
        code = handler(args)
        sys.stdout.flush()  # inside the try: output still buffered can meet a closed pipe too
    except BrokenPipeError:
        return _stdout_closed()
    return code


# What a shell reports for a command killed by SIGPIPE (128 + 13), as `controlplane audit ... | head` is.
EXIT_BROKEN_PIPE = 141


def _stdout_closed() -> int:
    """The reader went away (`| head`): stop quietly, as Unix tools do, with no traceback.

    stdout is pointed at /dev/null so that the interpreter's own flush at exit cannot raise again
    (the recipe of Python's signal module documentation).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


class Compiled(NamedTuple):
    """What `validate` reports and `compile` writes, from one compile of a policy tree."""

    policy: Policy
    snapshots: dict[str, Snapshot]
    warnings: list[PolicyError]  # the policy's own and those of resolving its subjects, as serve reports them
    inputs: ServedInputs
    resolved: ResolvedPolicy  # what the snapshots were compiled from


def _compile_or_report(
    policy_dir: Path, limits: ReadLimits, served: Callable[[Policy], ServedInputs] | None = None
) -> Compiled | None:
    """Compile a policy tree, or print every error (file:line: field: message) and return None.

    `served`: what serve would compile in besides the files (see cli/validate.py); without it, the policy
    alone."""
    from controlplane.cli.validate import ServedInputs
    from controlplane.compiler.compile import check_reserved_names
    from controlplane.model.errors import QUOTE_LIMIT
    from controlplane.model.loader import parse_policy, policy_warnings
    from controlplane.resolved.aws_roles import overlap_warnings
    from controlplane.resolved.index import Resolution
    from controlplane.runtime.gc_control import no_cyclic_gc
    from controlplane.snapshots.build import compile_model
    from controlplane.sources.policy_dir import read_policy_dir

    try:
        policy = parse_policy(read_policy_dir(policy_dir, limits))
        inputs = served(policy) if served is not None else ServedInputs()
        check_reserved_names(policy, inputs.credentials)  # before resolving, as compile_policy does
        with no_cyclic_gc():
            resolved = Resolution().update(policy, inputs.pins)
            snapshots = compile_model(
                policy,
                keys=inputs.keys,
                credentials=inputs.credentials,
                secrets=inputs.secrets,
                resolved=resolved,
            )
        warnings = [*policy_warnings(policy), *resolved.warnings, *overlap_warnings(policy, resolved)]
        return Compiled(policy, snapshots, sorted(warnings), inputs, resolved)
    except PolicyInvalid as invalid:
        for line in invalid.lines():  # bounded: at most 100 per file, 1,000 in all, then a count of the rest
            print(line, file=sys.stderr)
        counted = f"at least {invalid.total}" if invalid.stopped else str(invalid.total)
        print(f"{counted} error(s) in {policy_dir}", file=sys.stderr)
    except OSError as error:
        print(f"{policy_dir}: {error}", file=sys.stderr)
    except Exception as error:  # a bug: one line, like any other verdict (the policy repo's CI shows it)
        text = str(error)
        brief = text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 1] + "…"
        print(f"{policy_dir}: internal error: {type(error).__name__}: {brief}", file=sys.stderr)
    return None


def _validate(args: argparse.Namespace) -> int:
    from controlplane.certfiles import CertificateFileError
    from controlplane.cli.options import StoreOptions
    from controlplane.cli.validate import exchange_tls, served_inputs
    from controlplane.credentials.key_cipher import KekError
    from controlplane.store.dsn import DsnError

    store = StoreOptions(
        args.store, args.store_dsn, args.store_dsn_env, args.store_dsn_file, args.store_key_env, args.store_key_file
    )
    try:  # as serve checks them: a missing or unusable source is a usage error, named, never echoing a secret
        store.resolve_dsn()
        store.check_key_source(credentials=not args.no_exchange)
    except (DsnError, KekError) as error:
        print(f"controlplane validate: {error}", file=sys.stderr)
        return 2

    try:  # serve's exchange TLS flags and files, as serve checks them at start
        exchange_tls(args)
    except (ValueError, CertificateFileError) as error:
        print(f"controlplane validate: {error}", file=sys.stderr)
        return 2
    compiled = _compile_or_report(args.policy, _limits(args), lambda policy: served_inputs(policy, args))
    if compiled is None:
        return 1
    policy = compiled.policy
    counts = (
        f"{len(policy.issuers)} issuer(s), {len(policy.backends)} backend(s), {len(policy.roles)} role(s), "
        f"{len(policy.bindings)} binding(s), {len(policy.gateways)} gateway(s)"
    )
    for warning in compiled.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {args.policy}: {counts}")
    for group, snapshot in sorted(compiled.snapshots.items()):
        print(f"  gateway {group}: version {snapshot.summary_version}")
    for note in compiled.inputs.notes:
        print(f"note: {note}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    from controlplane.snapshots import golden

    try:
        golden.check_output(args.out, args.policy)  # before compiling: a refused --out costs no compile
    except golden.OutputRefused as refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {args.out}: {error}", file=sys.stderr)
        return 1
    compiled = _compile_or_report(args.policy, _limits(args))
    if compiled is None:
        return 1
    try:  # `--out afile/x`, a full disk, no permission: one line naming the path, as for the policy's own OSError
        written = golden.write(compiled.snapshots, args.out, resolved=compiled.resolved, policy_dir=args.policy)
    except OSError as error:
        print(f"error: {args.out}: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from controlplane.cli.serve import serve

    options = serve_options(args)
    if isinstance(options, str):
        print(options, file=sys.stderr)
        return 2
    restore_stderr = bound_native_stderr()  # grpc core writes a line per malformed stream, straight to fd 2
    try:
        return asyncio.run(serve(options))
    finally:
        restore_stderr()


def serve_options(args: argparse.Namespace) -> ServeOptions | str:
    """The parsed `serve` flags as options, or why they do not go together."""
    from controlplane.cli.environment import check_exchange_public_address
    from controlplane.cli.options import GitLabPolicyOptions, ServeOptions, StoreOptions, WebhookOptions
    from controlplane.credentials.key_cipher import KekError
    from controlplane.credentials.service import CredentialOptions, shared_publish_lead
    from controlplane.serving import HttpLimits
    from controlplane.store.dsn import DsnError

    if args.job_sweep_interval < 1:
        return "--job-sweep-interval must be at least 1 second"
    if not args.no_exchange:
        try:
            check_exchange_public_address(args.exchange_address, args.exchange_public_address)
        except ValueError as error:
            return str(error)
    lead = args.key_publish_lead
    if lead is None:  # one replica: 1 s; replicas sharing keys: time for every one to push it first
        lead = shared_publish_lead(args.key_rotation) if args.store == "postgres" else CredentialOptions.publish_lead
    if args.no_exchange and args.issuer_url is not None:
        return "--issuer-url needs the token exchange: its listener serves discovery and the keys (drop --no-exchange)"
    if not args.no_exchange and args.key_rotation <= lead:
        return f"--key-rotation ({args.key_rotation:g}s) must be longer than --key-publish-lead ({lead:g}s)"
    if args.gc_interval < 0 or args.gc_full_every < 1:
        return "--gc-interval must be >= 0 (0: Python's own collector) and --gc-full-every >= 1"
    policy_gitlab = None
    if args.policy_project:
        if not args.gitlab_url:
            return "--policy-project needs --gitlab-url"
        policy_gitlab = GitLabPolicyOptions(
            args.gitlab_url, args.policy_project, args.gitlab_token_env, args.gitlab_token_file, args.policy_poll
        )
    from controlplane.cli.validate import exchange_tls_flags
    from controlplane.credentials.http import ExchangeListenerTls
    from controlplane.xds.tls import server_tls_from_flags

    try:
        xds_tls = server_tls_from_flags(args.xds_tls_cert, args.xds_tls_key, args.xds_client_ca)
    except ValueError as error:
        return str(error)
    if xds_tls is not None and args.xds_insecure:
        return "--xds-insecure contradicts --xds-tls-cert/--xds-tls-key/--xds-client-ca: pick one"
    try:
        exchange_tls_files = exchange_tls_flags(args)
    except ValueError as error:
        return str(error)
    exchange_tls = None
    if exchange_tls_files is not None:
        cert, key, ca, server_name = exchange_tls_files
        exchange_tls = ExchangeListenerTls(cert, key, ca, server_name=server_name)
    webhooks = None
    if args.webhook_address:
        if not (args.webhook_secret_env or args.webhook_secret_file):
            return "--webhook-address needs --webhook-secret-env or --webhook-secret-file"
        host, port = args.webhook_address
        webhooks = WebhookOptions(host, port, args.webhook_secret_env, args.webhook_secret_file)

    if args.xds_max_connections is not None and args.xds_max_connections < 1:
        return "--xds-max-connections must be at least 1"
    try:
        http = HttpLimits(header_timeout=args.http_header_timeout, request_timeout=args.http_request_timeout)
        admin_limits, webhook_limits, exchange_limits = (
            http.with_connections(count)
            for count in (args.admin_max_connections, args.webhook_max_connections, args.exchange_max_connections)
        )
    except ValueError as error:
        return f"HTTP listener options: {error}"
    try:
        store = StoreOptions(
            args.store,
            args.store_dsn,
            args.store_dsn_env,
            args.store_dsn_file,
            args.store_key_env,
            args.store_key_file,
            replica_id=args.replica_id,
            leader_retry=args.leader_retry,
            pool_size=args.store_pool_size,
            timeout=args.store_timeout,
            unready_after=args.store_unready_after,
        )
    except ValueError as error:
        return str(error)
    try:
        store.resolve_dsn()  # a missing or unusable source is a usage error here; serve reads it again at start
        store.check_key_source(credentials=not args.no_exchange)
    except (DsnError, KekError) as error:
        return str(error)
    return ServeOptions(
        store=store,
        policy=args.policy,
        xds_host=args.xds_address[0],
        xds_port=args.xds_address[1],
        admin_host=args.admin_address[0],
        admin_port=args.admin_address[1],
        debounce=args.debounce,
        max_wait=args.max_wait,
        gc_interval=args.gc_interval,
        gc_full_every=args.gc_full_every,
        jwks_refresh=args.jwks_refresh,
        state_dir=args.state_dir,
        policy_gitlab=policy_gitlab,
        webhooks=webhooks,
        credentials=None
        if args.no_exchange
        else CredentialOptions(
            listen=args.exchange_address,
            public=args.exchange_public_address or args.exchange_address,
            state_dir=args.state_dir,
            rotate_every=args.key_rotation,
            publish_lead=lead,
            max_credential_ttl=args.max_credential_ttl,
            deny_id_tokens_for=args.deny_id_tokens_for,
            http=exchange_limits,
            job_sweep_interval=args.job_sweep_interval,
            tls=exchange_tls,
            issuer_url=args.issuer_url,
        ),
        audit_db=args.audit_db,
        audit_retention=args.audit_retention,
        xds_tls=xds_tls,
        xds_insecure=args.xds_insecure,
        admin_limits=admin_limits,
        xds_max_connections=args.xds_max_connections,
        webhook_limits=webhook_limits,
        policy_limits=_limits(args),
        reload_timeout=args.reload_timeout,
        kubeconfig=args.kubeconfig,
        kube_context=args.kube_context,
        kube_allow_endpoints=tuple(args.kube_allow_endpoints),
    )


def _status(args: argparse.Namespace) -> int:
    from controlplane.cli.status import run_status_command

    return run_status_command(args)


def _bootstrap(args: argparse.Namespace) -> int:
    import socket

    from controlplane.cli.bootstrap import ClientTls, bootstrap_yaml
    from controlplane.cli.options import ServeOptions

    tls_files = (args.tls_ca, args.tls_cert, args.tls_key)
    if (any(tls_files) and not all(tls_files)) or ((args.tls_sni or args.tls_sds_dir) and not any(tls_files)):
        print(
            "--tls-ca, --tls-cert and --tls-key go together (and --tls-sni, --tls-sds-dir need them)", file=sys.stderr
        )
        return 2
    tls = (
        ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_sni, args.tls_sds_dir) if all(tls_files) else None
    )
    (host, port), *more = args.xds_addresses or [(ServeOptions.xds_host, ServeOptions.xds_port)]
    node_id = args.node_id or f"{args.group}-{socket.gethostname()}"
    try:
        text = bootstrap_yaml(
            group=args.group,
            node_id=node_id,
            xds_host=host,
            xds_port=port,
            admin_port=args.admin_port,
            tls=tls,
            api=args.api,
            more_xds_addresses=more,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if tls is not None and tls.sds_dir is not None:
        from controlplane.cli.bootstrap import write_sds_files
        from controlplane.statefile import StateFileError

        try:
            write_sds_files(tls)
        except (OSError, StateFileError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            print(f"error: cannot write the SDS files into {tls.sds_dir}: {reason}", file=sys.stderr)
            return 2
    print(text)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from controlplane.cli.explain import run_explain

    return run_explain(args, _limits(args))


def _healthcheck(args: argparse.Namespace) -> int:
    from controlplane.cli.environment import run_healthcheck

    return run_healthcheck(args)


def _diff(args: argparse.Namespace) -> int:
    from controlplane.cli.diff import run_diff

    return run_diff(args, _limits(args))


def _report(args: argparse.Namespace) -> int:
    from controlplane.cli.report import run_report

    return run_report(args, _limits(args))


def _mr_check(args: argparse.Namespace) -> int:
    from controlplane.cli.merge_request import run_mr_check

    return run_mr_check(args, _limits(args))


def _audit(args: argparse.Namespace) -> int:
    from controlplane.cli.audit import run_audit

    return run_audit(args)


def _suggest(args: argparse.Namespace) -> int:
    from controlplane.cli.suggest import run_suggest

    return run_suggest(args, _limits(args))


_COMMANDS = {
    "audit": _audit,
    "diff": _diff,
    "report": _report,
    "mr-check": _mr_check,
    "validate": _validate,
    "compile": _compile,
    "explain": _explain,
    "serve": _serve,
    "status": _status,
    "bootstrap": _bootstrap,
    "healthcheck": _healthcheck,
    "suggest": _suggest,
}
