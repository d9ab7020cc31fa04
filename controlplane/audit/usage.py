"""What the audit trail says happened in a time window, aggregated in the database: `controlplane report`'s input.

A compliance report covers weeks of traffic; loading the window's rows into the process would cost memory in
proportion to the traffic. Every table here is one GROUP BY run by SQLite or PostgreSQL (the same SQL, only the
placeholder differs), returning at most `cap` groups, each with the number of groups in all (a window function:
the same scan), so the report can say "N more" instead of silently stopping. The window is half-open,
`since <= time < until`, on the time the control plane received each record (a sender cannot choose it:
audit/store.py).

Empty claims (a request without a valid token) stay None: the report shows them as such, never as a project.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from controlplane.compiler.names import REVOKED_POLICY

if TYPE_CHECKING:
    import psycopg

    Connection = psycopg.AsyncConnection[tuple[object, ...]]


class Query(NamedTuple):
    """One aggregate: the columns it returns (names the report uses), GROUP BY and ORDER BY, an extra filter."""

    name: str
    keys: tuple[str, ...]  # grouped audit columns, returned first
    measures: tuple[tuple[str, str], ...]  # (column name, SQL aggregate), returned after the keys
    order: tuple[str, ...]  # ORDER BY expressions (NULL-safe, so both databases sort alike)
    where: str = ""  # an extra condition, no placeholders
    # Columns a store written by an older release may lack (the reader never migrates): without them the
    # table is empty, as the records that would fill it were written before the column existed.
    needs: tuple[str, ...] = ()


_COUNTS: tuple[tuple[str, str], ...] = (
    ("requests", "COUNT(*)"),
    ("first", "MIN(time)"),
    ("last", "MAX(time)"),
)


def _ordered(*columns: str) -> tuple[str, ...]:
    return tuple(f"COALESCE({_quoted(c)}, '')" for c in columns)


def _quoted(column: str) -> str:
    return f'"{column}"'  # "user" is a reserved word in PostgreSQL; quoting is harmless for the others


QUERIES: tuple[Query, ...] = (
    Query(
        "jobs",  # the issuer too: a token from another issuer may carry the same project and job claims
        ("project_id", "project_path", "job_id", "pipeline_id", "ref", "user", "issuer"),
        (
            ("requests", "COUNT(*)"),
            ("allowed", "SUM(CASE WHEN decision = 'allowed' THEN 1 ELSE 0 END)"),
            ("denied", "SUM(CASE WHEN decision = 'denied' THEN 1 ELSE 0 END)"),
            ("first", "MIN(time)"),
            ("last", "MAX(time)"),
        ),
        _ordered("project_path", "project_id", "job_id", "pipeline_id", "ref", "user", "issuer"),
    ),
    Query(
        "usage",
        ("project_path", "job_id", "backend", "method", "path", "decision"),
        _COUNTS,
        _ordered("project_path", "job_id", "backend", "path", "method", "decision"),
    ),
    Query(
        "denials",
        ("project_path", "job_id", "user", "backend", "method", "path", "status", "policy", "details"),
        _COUNTS,
        (*_ordered("project_path", "job_id", "user", "backend", "path", "method"), '"status"', *_ordered("details")),
        where="decision = 'denied'",
    ),
    Query(  # one group per job (its refused requests in one sum), in the report's order: shortest id first
        "revoked_use",
        ("job_id",),
        (*_COUNTS, ("project_path", "MIN(project_path)"), ("projects", "COUNT(DISTINCT project_path)")),
        ("LENGTH(COALESCE(job_id, ''))", *_ordered("job_id")),
        where=f"decision = 'denied' AND policy = '{REVOKED_POLICY}'",
    ),
    Query(  # who requests reached the cloud as (docs/cloud-audit.md): per identity and backend
        "cloud_identities",
        ("cloud_identity", "backend"),
        (("requests", "COUNT(*)"), ("jobs", "COUNT(DISTINCT job_id)"), ("first", "MIN(time)"), ("last", "MAX(time)")),
        _ordered("cloud_identity", "backend"),
        where="cloud_identity IS NOT NULL",
        needs=("cloud_identity",),
    ),
    Query(  # the same, per project and job
        "cloud_use",
        ("project_path", "job_id", "cloud_identity", "backend"),
        _COUNTS,
        _ordered("project_path", "job_id", "cloud_identity", "backend"),
        where="cloud_identity IS NOT NULL",
        needs=("cloud_identity",),
    ),
)


class Table(NamedTuple):
    """At most `cap` groups, as dicts keyed by the query's columns, and how many groups there were in all."""

    rows: list[dict[str, Any]]
    total: int


class Usage(NamedTuple):
    totals: dict[str, Any]  # requests, allowed, denied, jobs, projects, first, last
    tables: dict[str, Table]  # by Query.name


_TOTALS = (
    "SELECT COUNT(*) AS requests, SUM(CASE WHEN decision = 'allowed' THEN 1 ELSE 0 END) AS allowed,"
    " SUM(CASE WHEN decision = 'denied' THEN 1 ELSE 0 END) AS denied, COUNT(DISTINCT job_id) AS jobs,"
    " COUNT(DISTINCT project_path) AS projects, MIN(time) AS first, MAX(time) AS last"
    " FROM audit WHERE time >= {p} AND time < {p}"
)
_GROUPS = "groups_in_all"
_TOTAL_KEYS = ("requests", "allowed", "denied", "jobs", "projects", "first", "last")


def _where(query: Query, placeholder: str) -> str:
    extra = f" AND {query.where}" if query.where else ""
    return f"WHERE time >= {placeholder} AND time < {placeholder}{extra}"


def group_sql(query: Query, placeholder: str) -> str:
    """The groups, capped, each with the number of groups in all (a window function over the grouped rows, so
    one scan of the window answers both): parameters (since, until, cap)."""
    keys = ", ".join(_quoted(k) for k in query.keys)
    measures = ", ".join(f"{sql} AS {_quoted(name)}" for name, sql in query.measures)
    return (
        f"SELECT {keys}, {measures}, COUNT(*) OVER () AS {_quoted(_GROUPS)} FROM audit {_where(query, placeholder)}"
        f" GROUP BY {keys} ORDER BY {', '.join(query.order)} LIMIT {placeholder}"
    )


def _table(query: Query, rows: Sequence[Sequence[Any]]) -> Table:
    """The rows without their trailing group count; no row: no group (the cap is at least 1)."""
    total = int(str(rows[0][-1])) if rows else 0
    return Table([_row(query, tuple(r)[:-1]) for r in rows], total)


def _row(query: Query, values: Sequence[Any]) -> dict[str, Any]:
    names = (*query.keys, *(name for name, _ in query.measures))
    # PostgreSQL's SUM of integers is a numeric (Decimal): counts are ints in the report whichever store
    return {name: int(v) if isinstance(v, Decimal) else v for name, v in zip(names, values, strict=True)}


def _totals(values: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(_TOTAL_KEYS, values, strict=True))
    for key in ("requests", "allowed", "denied", "jobs", "projects"):
        out[key] = int(out[key] or 0)  # SUM over no rows is NULL; PostgreSQL's SUM a Decimal
    return out


def summarise(conn: sqlite3.Connection, since: float, until: float, cap: int) -> Usage:
    """The window's aggregates from a SQLite audit store (a read-only connection: audit/store.py open_readonly).

    All in one read transaction, so one snapshot: serve's writer commits batches of records received a moment
    earlier (inside the window) while the report runs, and the totals and tables must count the same rows."""
    conn.execute("BEGIN")
    try:
        totals = _totals(conn.execute(_TOTALS.format(p="?"), (since, until)).fetchone())
        present = {str(row[1]) for row in conn.execute("PRAGMA table_info(audit)")}
        tables = {}
        for query in QUERIES:
            if not present.issuperset(query.needs):
                tables[query.name] = Table([], 0)
                continue
            rows = conn.execute(group_sql(query, "?"), (since, until, max(1, cap))).fetchall()
            tables[query.name] = _table(query, rows)
    finally:
        conn.execute("ROLLBACK")
    return Usage(totals, tables)


async def summarise_pg(conn: Connection, since: float, until: float, cap: int) -> Usage:
    """`summarise` against the PostgreSQL trail (store_pg.py's table: the same columns), in the caller's
    transaction (REPEATABLE READ: one snapshot for every aggregate, as `summarise`)."""
    cursor = await conn.execute(_TOTALS.format(p="%s").encode(), (since, until))
    first = await cursor.fetchone()
    assert first is not None  # an aggregate without GROUP BY always returns one row
    totals = _totals(first)
    cursor = await conn.execute(
        b"SELECT attname FROM pg_attribute WHERE attrelid = 'audit'::regclass AND attnum > 0 AND NOT attisdropped"
    )
    present = {str(row[0]) for row in await cursor.fetchall()}
    tables = {}
    for query in QUERIES:
        if not present.issuperset(query.needs):
            tables[query.name] = Table([], 0)
            continue
        cursor = await conn.execute(group_sql(query, "%s").encode(), (since, until, max(1, cap)))
        tables[query.name] = _table(query, await cursor.fetchall())
    return Usage(totals, tables)
