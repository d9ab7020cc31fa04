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
from collections.abc import Sequence
from typing import Any, TextIO

DEFAULT_ADMIN = "http://127.0.0.1:9902"
ADMIN_ENV = "CONTROLPLANE_ADMIN"
TIMEOUT_SECONDS = 5.0

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_UNHEALTHY = 2

ACKED_TYPES = ("sds", "cds", "eds", "lds", "rds")  # in push order; "-" where a proxy has none
VERSION_WIDTH = 8
NACK_ERROR_WIDTH = 60


class AdminUnreachable(Exception):
    """The admin endpoint could not be read; the message names the URL and why."""


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``status`` options; ``--admin`` falls back to $CONTROLPLANE_ADMIN for ops shells."""
    parser.add_argument(
        "--admin",
        default=os.environ.get(ADMIN_ENV, DEFAULT_ADMIN),
        help=f"admin server base URL (default: ${ADMIN_ENV} or {DEFAULT_ADMIN})",
    )
    parser.add_argument("--json", action="store_true", help="print the raw status JSON")
    parser.add_argument("--group", default=None, help="only proxies in this gateway group")
    parser.add_argument("--nacked", action="store_true", help="only proxies whose last response was a NACK")


def run_status(admin_url: str, *, as_json: bool, group: str | None, nacked_only: bool) -> int:
    """Fetch ``/status`` and print it; returns the process exit code (see module docstring)."""
    url = status_url(admin_url, group=group, nacked_only=nacked_only)
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


def status_url(admin_url: str, *, group: str | None, nacked_only: bool) -> str:
    """Build the ``/status`` URL; filtering happens server-side so the JSON output is filtered too."""
    query: dict[str, str] = {}
    if group is not None:
        query["group"] = group
    if nacked_only:
        query["nacked"] = "1"
    base = admin_url.rstrip("/") + "/status"
    return f"{base}?{urllib.parse.urlencode(query)}" if query else base


def fetch_status(url: str) -> dict[str, Any]:
    """GET and decode the status document, turning every failure into one readable AdminUnreachable."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
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
    """Policy errors or any (listed) proxy NACKing: both mean config is not reaching the fleet as written."""
    policy = status.get("policy") or {}
    if policy.get("errors"):
        return True
    return any(p.get("last_nack") is not None for p in status.get("proxies") or [])


def render(status: dict[str, Any], out: TextIO, *, now: float) -> None:
    """Print the proxy table, then policy state, then per-group counts."""
    proxies = status.get("proxies")
    if proxies is not None:
        _write_table(out, proxy_rows(proxies, now=now))
        out.write("\n")
    _write_policy(out, status.get("policy") or {}, now=now)
    out.write("\n")
    _write_summary(out, (status.get("summary") or {}).get("by_group") or {})


PROXY_HEADER = ("NODE", "GROUP", "PROTO", "CONNECTED SINCE", *(t.upper() for t in ACKED_TYPES), "LAST NACK")


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
        format_age(now - since) if isinstance(since, int | float) else "-",
        *(shorten(acked[t]) if acked.get(t) else "-" for t in ACKED_TYPES),
        format_nack(proxy.get("last_nack")),
    )


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


def _write_table(out: TextIO, rows: Sequence[tuple[str, ...]]) -> None:
    if not rows:
        out.write("no proxies connected (or none match the filter)\n")
        return
    widths = [max(len(r[i]) for r in (PROXY_HEADER, *rows)) for i in range(len(PROXY_HEADER))]
    for row in (PROXY_HEADER, *rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


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


def _write_summary(out: TextIO, by_group: dict[str, Any]) -> None:
    total = sum(int(n) for n in by_group.values())
    out.write(f"proxies: {total} connected\n")
    out.writelines(f"  {group}: {by_group[group]}\n" for group in sorted(by_group))
