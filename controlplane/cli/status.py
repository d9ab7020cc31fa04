"""``controlplane status``: what every proxy has accepted, and whether anything is being rejected.

It reads the admin server's ``/status`` JSON over plain urllib so the command works from a bare install with
no event loop. Exit codes are meant for scripts and cron alerts: 0 healthy, 1 admin unreachable, 2 the policy
has errors or some proxy is NACKing its config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from controlplane.admin.query import BadQuery, parse_count, parse_text

ADMIN_ENV = "CONTROLPLANE_ADMIN"
ADMIN_ADDRESS_ENV = "CONTROLPLANE_ADMIN_ADDRESS"  # serve's admin listener (cli/environment.py)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TIMEOUT_SECONDS = 5.0

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_UNHEALTHY = 2

# In push order; "-" where a proxy has none. ECDS: the filter configurations (deny lists, jwt_authn) a
# gateway's listener names, each a resource of its own since issue 13.
ACKED_TYPES = ("sds", "cds", "eds", "lds", "ecds", "rds")
PROTOCOLS = ("sotw", "delta")  # what --protocol accepts (the server checks the same list)
VERSION_WIDTH = 8
NACK_ERROR_WIDTH = 60


class AdminUnreachable(Exception):
    """The admin endpoint could not be read; the message names the URL and why."""


@dataclass(frozen=True)
class StatusFilters:
    """The ``/status`` query the command sends: the same filters whether the output is a table or JSON."""

    group: str | None = None
    protocol: str | None = None
    node: str | None = None
    nacked: bool = False
    stale: bool = False
    limit: str | None = None  # a count or "all"; None leaves the server's default (100 rows)
    offset: int = 0
    summary: bool = False
    fleet: bool = False  # every replica's proxies too, from the shared registry (scope=all)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StatusFilters:
        return cls(
            group=args.group,
            protocol=args.protocol,
            node=args.node,
            nacked=args.nacked,
            stale=args.stale,
            limit=args.limit,
            offset=args.offset,
            summary=args.summary,
            fleet=args.fleet,
        )

    def query(self) -> dict[str, str]:
        """Only what differs from the server's defaults, so the URL stays short and readable in errors."""
        given = {
            "group": self.group,
            "protocol": self.protocol,
            "node": self.node,
            "nacked": "1" if self.nacked else None,
            "stale": "1" if self.stale else None,
            "limit": self.limit,
            "offset": str(self.offset) if self.offset else None,
            "summary": "1" if self.summary else None,
            "scope": "all" if self.fleet else None,
        }
        return {name: value for name, value in given.items() if value is not None}


def _limit(value: str) -> str:
    """``--limit``: a row count or ``all``, checked by the server's own rules so a typo fails before any
    request is made."""
    _count("limit", value)
    return value.strip().lower()


def _offset(value: str) -> int:
    return _count("offset", value) or 0


def _text(name: str) -> Callable[[str], str]:
    def checked(value: str) -> str:
        try:
            parse_text(name, value)
        except BadQuery as bad:
            raise argparse.ArgumentTypeError(str(bad)) from None
        return value

    return checked


def _count(name: str, value: str) -> int | None:
    if not value.strip():  # the server reads an empty value as "not given"; on the command line it is a slip
        raise argparse.ArgumentTypeError(f"--{name} needs a value")
    try:
        return parse_count(name, value, None)
    except BadQuery as bad:
        raise argparse.ArgumentTypeError(str(bad)) from None


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``status`` options; ``--admin`` falls back to $CONTROLPLANE_ADMIN for ops shells.

    The filters mirror the ``/status`` query parameters and are applied server-side, so the counts and the
    summary cover the whole filtered fleet even though only ``--limit`` rows are listed.
    """
    from controlplane.cli.options import ServeOptions

    served = f"http://{ServeOptions.admin_host}:{ServeOptions.admin_port}"  # serve's default admin address
    parser.add_argument(
        "--admin",
        default=os.environ.get(ADMIN_ENV) or _listener_url() or served,
        help=f"admin server base URL (default: ${ADMIN_ENV}, else serve's ${ADMIN_ADDRESS_ENV} as the image sets "
        f"it, else {served})",
    )
    parser.add_argument("--json", action="store_true", help="print the raw status JSON")
    parser.add_argument("--group", type=_text("group"), default=None, help="only proxies in this gateway group")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None, help="only proxies speaking this xDS variant")
    parser.add_argument(
        "--node",
        type=_text("node"),
        default=None,
        metavar="PATTERN",
        help="only node ids containing PATTERN, or matching it as a glob",
    )
    parser.add_argument("--nacked", action="store_true", help="only proxies whose last response was a NACK")
    parser.add_argument("--stale", action="store_true", help="only proxies holding a non-current version of a type")
    parser.add_argument(
        "--limit", type=_limit, default=None, metavar="N|all", help="proxies to list (default: the server's, 100)"
    )
    parser.add_argument("--offset", type=_offset, default=0, metavar="N", help="skip the first N matching proxies")
    parser.add_argument("--summary", action="store_true", help="counts by group and version only, no proxy list")
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="also the proxies of every replica (--store postgres: from the replica registry, as of their last beat)",
    )


def run_status_command(args: argparse.Namespace) -> int:
    """``controlplane status`` from parsed arguments (see `add_status_arguments`)."""
    return run_status(args.admin, as_json=args.json, filters=StatusFilters.from_args(args))


def run_status(
    admin_url: str,
    *,
    as_json: bool,
    group: str | None = None,
    nacked_only: bool = False,
    filters: StatusFilters | None = None,
) -> int:
    """Fetch ``/status`` and print it; returns the process exit code (see module docstring).

    ``group`` and ``nacked_only`` are the original keyword arguments, kept for callers that predate
    `StatusFilters`; ``filters`` wins when given.
    """
    url = status_url(admin_url, filters or StatusFilters(group=group, nacked=nacked_only))
    try:
        status = fetch_status(url)
    except AdminUnreachable as exc:
        print(f"controlplane status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        render(status, sys.stdout, now=time.time())
    return EXIT_UNHEALTHY if is_unhealthy(status) else EXIT_OK


def _listener_url() -> str | None:
    """`serve`'s admin listener as the image configures it (CONTROLPLANE_ADMIN_ADDRESS, HOST:PORT), so that
    `controlplane status` in the container asks the server beside it; None when unset or malformed."""
    from controlplane.cli.environment import admin_url

    address = os.environ.get(ADMIN_ADDRESS_ENV, "")
    host, _, port = address.rpartition(":")
    if not (host and port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        return None
    return admin_url((host.strip("[]"), int(port)))


def status_url(admin_url: str, filters: StatusFilters) -> str:
    """Build the ``/status`` URL; filtering happens server-side so the JSON output is filtered too."""
    query = filters.query()
    base = admin_url.rstrip("/") + "/status"
    return f"{base}?{urllib.parse.urlencode(query)}" if query else base


def fetch_status(url: str) -> dict[str, Any]:
    """GET and decode the status document, turning every failure into one readable AdminUnreachable."""
    try:
        # No proxy: the admin listener is serve's own, on loopback or in the pod; HTTP_PROXY must not reroute it.
        with _DIRECT.open(url, timeout=TIMEOUT_SECONDS) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise AdminUnreachable(f"admin at {url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminUnreachable(f"cannot reach admin at {url}: {reason}") from None
    try:
        status = json.loads(body)
    except ValueError as exc:
        raise AdminUnreachable(f"admin at {url} returned invalid JSON: {exc}") from None
    if not isinstance(status, dict):
        raise AdminUnreachable(f"admin at {url} returned {type(status).__name__}, expected an object")
    return status


def is_unhealthy(status: dict[str, Any]) -> bool:
    """Policy errors or any matching proxy NACKing: both mean config is not reaching the fleet as written.

    The NACK count comes from the summary, which covers every proxy matching the filters, so a NACKing proxy
    beyond ``--limit`` (or with ``--summary``) still fails the check; the listed rows are the fallback for a
    server that sends no such count.
    """
    policy = status.get("policy") or {}
    if policy.get("errors"):
        return True
    nacking = (status.get("summary") or {}).get("nacking")
    if isinstance(nacking, int):
        return nacking > 0
    return any(p.get("last_nack") is not None for p in status.get("proxies") or [])


def render(status: dict[str, Any], out: TextIO, *, now: float) -> None:
    """Print the fleet summary (by group, then by type and version), the listed proxies, then policy state.

    Summary first: at fleet size it is the answer; the rows are the examples. Policy comes last so its
    errors sit right above the prompt.
    """
    summary = status.get("summary") or {}
    _write_fleet_line(out, summary, status.get("filters") or {})
    _write_groups(out, summary)
    out.write("\n")
    if _write_versions(out, summary.get("groups") or {}):
        out.write("\n")
    proxies = status.get("proxies")
    if proxies is not None:
        _write_table(out, PROXY_HEADER, proxy_rows(proxies, now=now), empty=NO_PROXIES)
        out.write(showing_line(len(proxies), status.get("page") or {}) + "\n\n")
    store = status.get("store")
    if isinstance(store, dict):
        _write_replicas(out, store, now=now)
    fleet = status.get("fleet")
    if isinstance(fleet, dict):
        _write_whole_fleet(out, fleet, now=now)
    _write_policy(out, status.get("policy") or {}, now=now)


PROXY_HEADER = ("NODE", "GROUP", "PROTO", "PEER", "CONNECTED SINCE", *(t.upper() for t in ACKED_TYPES), "LAST NACK")
GROUP_HEADER = ("GROUP", "PROXIES", *(p.upper() for p in PROTOCOLS), "NACKING", "STALE")
VERSION_HEADER = ("GROUP", "TYPE", "CURRENT", "ON CURRENT", "STALE", "NO ACK", "NACKING", "OTHER VERSIONS")
NO_PROXIES = "no proxies connected (or none match the filter)"
OTHER_VERSIONS_SHOWN = 3


def proxy_rows(proxies: list[dict[str, Any]], *, now: float) -> list[tuple[str, ...]]:
    """One row per proxy, sorted by group then node so repeated runs diff cleanly."""
    ordered = sorted(proxies, key=lambda p: (str(p.get("group", "")), str(p.get("node", ""))))
    return [_proxy_row(p, now=now) for p in ordered]


def _proxy_row(proxy: dict[str, Any], *, now: float) -> tuple[str, ...]:
    acked = {str(k).lower(): str(v) for k, v in (proxy.get("acked") or {}).items()}
    since = proxy.get("connected_since")
    return (
        str(proxy.get("node", "?")),
        str(proxy.get("group", "?")),
        str(proxy.get("protocol", "?")),
        str(proxy.get("peer") or "-"),
        format_age(now - since) if isinstance(since, int | float) else "-",
        *(shorten(acked[t]) if acked.get(t) else "-" for t in ACKED_TYPES),
        format_nack(proxy.get("last_nack")),
    )


def showing_line(listed: int, page: dict[str, Any]) -> str:
    """``showing N of M proxies``, with how to see the rest when the list is cut short."""
    total = page.get("total")
    if not isinstance(total, int):
        return f"showing {listed} proxies"
    offset = page.get("offset") or 0
    start = f" from #{offset + 1}" if offset and listed else ""
    line = f"showing {listed} of {total} proxies{start}"
    if listed < total:
        line += " (use --limit N or --limit all, --offset N, --json; narrow with --group/--node/--nacked/--stale)"
    return line


def _write_fleet_line(out: TextIO, summary: dict[str, Any], filters: dict[str, Any]) -> None:
    """One line answering "how is the fleet": how many, how many NACKing, how many behind."""
    by_group = summary.get("by_group") or {}
    matching = summary.get("proxies", sum(int(n) for n in by_group.values()))
    connected = summary.get("connected", matching)
    scope = f"{connected} connected"
    if filters:
        scope = f"{matching} of {scope} match {_describe(filters)}"
    labels = (("nacking", "NACKing"), ("stale", "stale (not on the current version)"))
    counts = [f"{summary[key]} {label}" for key, label in labels if key in summary]
    out.write("proxies: " + ", ".join([scope, *counts]) + "\n")


def _describe(filters: dict[str, Any]) -> str:
    return " ".join(name if value is True else f"{name}={value}" for name, value in sorted(filters.items()))


def _write_groups(out: TextIO, summary: dict[str, Any]) -> None:
    """Per group: size, protocols, NACKing and stale counts (only sizes from a server without ``groups``)."""
    groups = summary.get("groups") or {}
    by_group = summary.get("by_group") or {}
    rows = [_group_row(name, groups.get(name) or {"proxies": by_group[name]}) for name in sorted(by_group)]
    _write_table(out, GROUP_HEADER, rows, empty="no groups")


def _group_row(name: str, group: dict[str, Any]) -> tuple[str, ...]:
    protocols = group.get("protocols") or {}
    return (
        name,
        str(group.get("proxies", "?")),
        *(str(protocols.get(p, 0)) if protocols else "-" for p in PROTOCOLS),
        str(group.get("nacking", "-")),
        str(group.get("stale", "-")),
    )


def _write_versions(out: TextIO, groups: dict[str, Any]) -> bool:
    """Per group and type: the current version, how many hold it, and who is elsewhere; False if nothing to show."""
    rows = [
        _version_row(name, label, counts)
        for name in sorted(groups)
        for label, counts in (groups[name].get("types") or {}).items()
        if _in_use(counts)
    ]
    if rows:
        _write_table(out, VERSION_HEADER, rows, empty="")
    return bool(rows)


def _in_use(counts: dict[str, Any]) -> bool:
    """A type nobody holds or rejects (SDS without secrets, say) would only add a row of zeros."""
    return bool(counts.get("on_current") or counts.get("stale") or counts.get("nacking"))


def _version_row(group: str, label: str, counts: dict[str, Any]) -> tuple[str, ...]:
    current = counts.get("current")
    return (
        group,
        label,
        shorten(str(current)) if current else "-",
        str(counts.get("on_current", 0)),
        str(counts.get("stale", 0)),
        str(counts.get("no_ack", 0)),
        str(counts.get("nacking", 0)),
        format_other_versions(counts),
    )


def format_other_versions(counts: dict[str, Any]) -> str:
    """The non-current versions held, most held first, as ``cccccccc (12)``; the rest as one count."""
    current = counts.get("current")
    others = [(str(v), int(n)) for v, n in (counts.get("versions") or {}).items() if v != current]
    shown = [f"{shorten(v)} ({n})" for v, n in others[:OTHER_VERSIONS_SHOWN]]
    rest = sum(n for _, n in others[OTHER_VERSIONS_SHOWN:]) + int(counts.get("other_versions") or 0)
    if rest:
        shown.append(f"+{rest} on other versions")
    return ", ".join(shown) or "-"


def shorten(version: str) -> str:
    """Versions are content hashes; eight characters identify one at a glance."""
    return version[:VERSION_WIDTH]


def format_nack(nack: dict[str, Any] | None) -> str:
    """``type@version: error`` on one line, so a multi-line Envoy rejection cannot break the table."""
    if not nack:
        return "-"
    error = " ".join(str(nack.get("error", "")).split())[:NACK_ERROR_WIDTH].rstrip()
    return f"{nack.get('type', '?')}@{shorten(str(nack.get('version', '')))}: {error}"


def format_age(seconds: float) -> str:
    """Compact age such as ``3m12s``; clock skew between hosts never shows a negative age."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _write_table(out: TextIO, header: tuple[str, ...], rows: Sequence[tuple[str, ...]], *, empty: str) -> None:
    if not rows:
        out.write(f"{empty}\n")
        return
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


REPLICA_HEADER = ("REPLICA", "STATE", "LEADER", "XDS", "ADMIN", "HOST", "PROXIES", "VERSIONS", "LAST SEEN")
FLEET_HEADER = ("REPLICA", *PROXY_HEADER)


def _write_replicas(out: TextIO, store: dict[str, Any], *, now: float) -> None:
    """The leader lease and every registered replica (address, proxies, versions served, last beat)."""
    lease = store.get("leader") or {}
    holder = lease.get("holder") or "unknown"
    role = "leader" if lease.get("leader") else f"follower (leader: {holder})"
    out.write(f"this replica: {lease.get('replica', '?')}, {role}\n")
    registry = store.get("replicas") or {}
    rows = [_replica_row(r, now=now) for r in registry.get("replicas") or []]
    _write_table(out, REPLICA_HEADER, rows, empty="no replicas registered")
    if registry.get("last_error"):
        out.write(f"  registry not updated: {registry['last_error']}\n")
    out.write("\n")


def _replica_row(replica: dict[str, Any], *, now: float) -> tuple[str, ...]:
    versions = replica.get("versions") or {}
    seen = replica.get("last_seen")
    return (
        str(replica.get("replica", "?")) + (" *" if replica.get("this") else ""),
        str(replica.get("state", "?")),
        "yes" if replica.get("leader") else "-",
        str(replica.get("xds_address") or "-"),
        str(replica.get("admin_address") or "-"),
        str(replica.get("host") or "-"),
        str(replica.get("proxies") if replica.get("proxies") is not None else "-"),
        ", ".join(f"{g}@{shorten(str(versions[g]))}" for g in sorted(versions)) or "-",
        f"{format_age(now - seen)} ago" if isinstance(seen, int | float) else "-",
    )


def _write_whole_fleet(out: TextIO, fleet: dict[str, Any], *, now: float) -> None:
    """Every replica's proxies, as each replica last published them."""
    replicas = fleet.get("replicas") or []
    out.write(f"whole fleet: {fleet.get('connected', 0)} proxies on {len(replicas)} replicas\n")
    rows = [(str(p.get("replica", "?")), *_proxy_row(p, now=now)) for p in fleet.get("proxies") or []]
    _write_table(out, FLEET_HEADER, rows, empty=NO_PROXIES)
    if fleet.get("not_listed"):
        out.write(f"  {fleet['not_listed']} more not listed (each replica publishes its first proxies only)\n")
    out.write("\n")


def _write_policy(out: TextIO, policy: dict[str, Any], *, now: float) -> None:
    last_good = policy.get("last_good_load")
    age = f"{format_age(now - last_good)} ago" if isinstance(last_good, int | float) else "never"
    errors = [str(e) for e in policy.get("errors") or []]
    out.write(f"policy: {policy.get('root', '?')}\n")
    out.write(f"  last good load: {age}\n")
    versions = policy.get("snapshot_versions") or {}
    if versions:
        out.write("  serving: " + ", ".join(f"{g}@{shorten(str(versions[g]))}" for g in sorted(versions)) + "\n")
    if errors:
        # Errors already read "file:line: field: message"; listing them verbatim keeps them grep-able.
        out.write(f"  errors ({len(errors)}), still serving the last good snapshot:\n")
        out.writelines(f"    {e}\n" for e in errors)
    else:
        out.write("  errors: none\n")
