"""Where the audit trail is, as `audit`, `suggest` and `report` are told: one set of options, one reading of them.

The three commands read the trail `serve` writes: the SQLite file in serve's state directory (`--state-dir`, or
the file itself with `--db`), or with `--store postgres` the table the replicas share (the DSN from
`--store-dsn-env`, `--store-dsn-file` or, without a password, `--store-dsn`, checked as `serve` checks it).
Registered and resolved here so the flags, their help and their errors are the same in each command.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.audit.store import DB_NAME
from controlplane.cli.options import STORE_KINDS, StoreOptions
from controlplane.statefile import DEFAULT_STATE_DIR, STATE_DIR_ENV, default_state_dir
from controlplane.store.dsn import StoreDsn

if TYPE_CHECKING:
    import psycopg

STATE_DIR_HELP = f"serve's --state-dir, where the trail is {DB_NAME} (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})"


def add_trail_arguments(parser: argparse.ArgumentParser, *, state_dir_help: str = STATE_DIR_HELP) -> None:
    """--state-dir, --db, --store and the DSN's three sources."""
    parser.add_argument("--state-dir", type=Path, default=None, help=state_dir_help)
    parser.add_argument("--db", type=Path, default=None, help="the audit store file itself (overrides --state-dir)")
    parser.add_argument(
        "--store",
        choices=STORE_KINDS,
        default=StoreOptions.kind,
        help="file: the SQLite file; postgres: serve's shared trail",
    )
    parser.add_argument("--store-dsn-env", default=None, help="environment variable holding the PostgreSQL DSN")
    parser.add_argument("--store-dsn-file", type=Path, default=None, help="file holding that DSN (one line)")
    parser.add_argument("--store-dsn", default=None, help="the DSN itself, refused with a password")


def trail_dsn(args: argparse.Namespace) -> StoreDsn | None:
    """The PostgreSQL DSN with `--store postgres`, else None (the SQLite file). Raises DsnError (a usage error:
    no source, two sources, a password on the command line), whose message never holds the password."""
    return StoreOptions(args.store, args.store_dsn, args.store_dsn_env, args.store_dsn_file).resolve_dsn()


def state_dir(args: argparse.Namespace) -> Path:
    """`--state-dir`, else serve's default ($CONTROLPLANE_STATE_DIR or `.controlplane`)."""
    return args.state_dir if args.state_dir is not None else default_state_dir()


def trail_db(args: argparse.Namespace) -> Path:
    """The SQLite file: `--db`, else the one in the state directory."""
    return args.db if args.db is not None else state_dir(args) / DB_NAME


@asynccontextmanager
async def read_only_session(
    dsn: StoreDsn, statement_timeout: float
) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """One pooled connection in a read-only transaction, the pool closed after: the commands never migrate, so
    they cannot alter the schema or the trail either. psycopg is imported here, not by `controlplane --help`."""
    from controlplane.store.pool import PoolSettings, StorePool

    pool = StorePool(dsn, PoolSettings(min_size=1, max_size=1, statement_timeout=statement_timeout))
    await pool.open()
    try:
        async with pool.connection() as conn:
            await conn.set_read_only(True)
            yield conn
    finally:
        await pool.close()
