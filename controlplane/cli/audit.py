"""``controlplane audit``: what a job (or a project, or everyone since T) did through the gateways.

It opens the audit store's SQLite file read-only, directly: no server needs to be up, a running ``serve`` is
not disturbed (WAL lets readers and the writer work at once), and the command cannot alter the trail. With
``--store postgres`` it reads the fleet's trail from PostgreSQL instead (the DSN from ``--store-dsn-env`` or
``--store-dsn-file``, as ``serve``), one connection, one SELECT; the output is the same.
Times are shown and parsed in UTC, so what is printed can be pasted back into ``--since``.

Exit codes: 0 (even when nothing matches), 1 the store cannot be read, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from controlplane.audit.store import (
    DEFAULT_QUERY_LIMIT,
    open_readonly,
    query_records,
)
from controlplane.cli.output import add_format_arguments
from controlplane.cli.trail import add_trail_arguments, read_only_session, trail_db, trail_dsn
from controlplane.store.dsn import DsnError, StoreDsn

EXIT_OK = 0
EXIT_UNREADABLE = 1
EXIT_USAGE = 2

_DURATION = re.compile(r"^([0-9]+)([smhd])\Z")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Column heading → record key, in the order an auditor reads a line.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("TIME", "time"),
    ("GATEWAY", "gateway"),
    ("METHOD", "method"),
    ("PATH", "path"),
    ("STATUS", "status"),
    ("DECISION", "decision"),
    ("POLICY", "policy"),
    ("CLOUD_IDENTITY", "cloud_identity"),
    ("PROJECT", "project_path"),
    ("PIPELINE", "pipeline_id"),
    ("JOB", "job_id"),
    ("REF", "ref"),
    ("PROTECTED", "ref_protected"),
    ("SOURCE", "pipeline_source"),
    ("ENVIRONMENT", "environment"),
    ("USER", "user"),
)
MAX_CELL = 60


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``audit`` options. At least one of --job, --project, --since; given together, all apply."""
    parser.epilog = "exit status: 0 (even when nothing matches), 1 the trail cannot be read, 2 usage error."
    parser.add_argument("--job", help="a CI job id")
    parser.add_argument("--project", help="a project path (acme/app) or id")
    parser.add_argument("--since", help="a duration back from now (30m, 1h, 7d) or an ISO time (UTC if no offset)")
    add_format_arguments(parser, json_help="print the records as a JSON array")
    parser.add_argument("--limit", type=int, default=DEFAULT_QUERY_LIMIT, help="at most this many, the most recent")
    add_trail_arguments(parser)


def parse_since(text: str, now: float | None = None) -> float:
    """`30m` → now - 1800; `2026-01-02T03:04:05Z` (or with an offset, or a bare date, read as UTC) → its time."""
    match = _DURATION.match(text.strip())
    if match:
        return (time.time() if now is None else now) - int(match[1]) * _UNIT_SECONDS[match[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: expected a duration like 30m, 1h, 7d or an ISO time, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_audit(args: argparse.Namespace) -> int:
    """Query the store and print a table (or JSON); returns the exit code."""
    if args.job is None and args.project is None and args.since is None:
        print("controlplane audit: give --job ID, --project PATH or --since T", file=sys.stderr)
        return EXIT_USAGE
    if args.limit < 1:
        print("controlplane audit: --limit must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        since = None if args.since is None else parse_since(args.since)
    except ValueError as error:
        print(f"controlplane audit: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        dsn = trail_dsn(args)
    except DsnError as error:
        print(f"controlplane audit: {error}", file=sys.stderr)
        return EXIT_USAGE
    if dsn is not None:
        try:
            records = asyncio.run(_query_postgres(dsn, args.job, args.project, since, args.limit))
        except Exception as error:  # StoreUnavailable (names the redacted DSN) or a server error: never the DSN
            print(
                f"controlplane audit: cannot read the trail at {dsn.redacted()}: {_first_line(error)}", file=sys.stderr
            )
            return EXIT_UNREADABLE
    else:
        db = trail_db(args)
        try:
            conn = open_readonly(db)
            try:
                records = query_records(conn, job=args.job, project=args.project, since=since, limit=args.limit)
            finally:
                conn.close()
        except (OSError, sqlite3.Error) as error:
            print(f"controlplane audit: cannot read {db}: {error}", file=sys.stderr)
            return EXIT_UNREADABLE
    shown = [{**record, "time": format_time(record["time"])} for record in records]
    if args.format == "json":
        json.dump(shown, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(shown, sys.stdout)
    return EXIT_OK


async def _query_postgres(
    dsn: StoreDsn, job: str | None, project: str | None, since: float | None, limit: int
) -> list[dict[str, Any]]:
    """One pooled connection, the query, closed: the CLI never migrates, so it cannot alter the schema either."""
    from controlplane.audit import store_pg

    async with read_only_session(dsn, statement_timeout=60.0) as conn:
        return await store_pg.query_records(conn, job=job, project=project, since=since, limit=limit)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def print_table(records: Sequence[dict[str, Any]], out: TextIO) -> None:
    """Aligned columns; empty values as `-`; long cells cut with `…` so one request stays one line."""
    if not records:
        print("no matching audit records", file=out)
        return
    rows = [[_cell(record.get(key)) for _, key in TABLE_COLUMNS] for record in records]
    headings = [heading for heading, _ in TABLE_COLUMNS]
    widths = [max(len(heading), *(len(row[i]) for row in rows)) for i, heading in enumerate(headings)]
    for line in (headings, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip(), file=out)


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"
