"""A bounded async connection pool to the shared store, failing fast and clearly when PostgreSQL is away.

Why bounded everywhere: a replica that loses PostgreSQL must keep serving what it has and fail closed where it
must (issue 12, item 6), which it can only do if every store call returns, or raises `StoreUnavailable`,
within a known time. So the pool has a fixed min/max size (no connection storm against a recovering server),
each connection attempt has a connect timeout, each checkout waits at most `acquire_timeout`, and each
statement is cut off by the server at `statement_timeout`. Connections name themselves `controlplane` in
pg_stat_activity. The pool is opened and closed explicitly by its owner; nothing connects at import.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psycopg
from psycopg import conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from controlplane.store.dsn import StoreDsn

log = logging.getLogger("controlplane.store")

APPLICATION_NAME = "controlplane"
Connection = psycopg.AsyncConnection[tuple[object, ...]]


class StoreUnavailable(Exception):
    """PostgreSQL did not answer within the bound; the message shows the redacted DSN, never a password."""


@dataclass(frozen=True)
class PoolSettings:
    min_size: int = 1
    max_size: int = 8
    connect_timeout: float = 5.0  # one connection attempt (libpq rounds up to whole seconds, at least 2)
    acquire_timeout: float = 5.0  # waiting for a free (or new) connection from the pool
    statement_timeout: float = 5.0  # the server cancels a statement running longer

    @property
    def work_timeout(self) -> float:
        """A unit of work (a connection's few statements) not finished by then is abandoned client-side: a
        server that accepts and never answers (hung, or a relay in front of it) is never noticed by the
        server-side statement_timeout, nor by TCP keepalives, which its kernel answers. psycopg then spends up to
        10 s trying to cancel the statement before it closes the connection."""
        return 4 * self.statement_timeout

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"pool sizes must satisfy 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        for name in ("connect_timeout", "acquire_timeout", "statement_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


class StorePool:
    """The control plane's connections to PostgreSQL: `await open()`, `async with connection()`, `await close()`."""

    def __init__(self, dsn: StoreDsn, settings: PoolSettings | None = None) -> None:
        self.dsn = dsn
        self.settings = settings or PoolSettings()
        s = self.settings
        self._pool = AsyncConnectionPool(
            dsn.dsn,
            min_size=s.min_size,
            max_size=s.max_size,
            timeout=s.acquire_timeout,
            reconnect_timeout=max(s.acquire_timeout, s.connect_timeout),
            open=False,
            name="controlplane-store",
            check=AsyncConnectionPool.check_connection,  # a connection broken while idle is replaced, not handed out
            kwargs=self.connection_kwargs(),
        )

    def connection_kwargs(self) -> dict[str, str | int]:
        """libpq settings of every connection the control plane opens, pooled or dedicated (a LISTEN, a lock).
        The DSN's own `options` (e.g. a search_path) are kept; the statement timeout is added after them.
        TCP keepalives make a peer that vanished without closing (a cut network) an error within ~10 s on an
        otherwise idle connection, instead of never."""
        s = self.settings
        own = conninfo.conninfo_to_dict(self.dsn.dsn).get("options")
        options = f"{own or ''} -c statement_timeout={math.ceil(s.statement_timeout * 1000)}".strip()
        return {
            "connect_timeout": max(2, math.ceil(s.connect_timeout)),
            "application_name": APPLICATION_NAME,
            "options": options,
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        }

    async def dedicated(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        """A connection of its own, outside the pool, in autocommit: for what holds a session (LISTEN, an
        advisory lock) and must not be handed back. The caller closes it. StoreUnavailable when unreachable."""
        try:
            info = conninfo.make_conninfo(self.dsn.dsn, **self.connection_kwargs())
            return await psycopg.AsyncConnection.connect(info, autocommit=True)
        except psycopg.OperationalError as error:
            raise self._unavailable(type(error).__name__) from None

    async def open(self) -> None:
        """Connect `min_size` connections, or raise StoreUnavailable once connect_timeout has passed."""
        try:
            await self._pool.open(wait=True, timeout=self.settings.connect_timeout)
        except PoolTimeout:
            await self._pool.close()
            raise self._unavailable(f"no connection within {self.settings.connect_timeout:g}s") from None

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
        """A connection for one unit of work (committed on a clean exit, rolled back on an error); a server that
        is down or too slow is StoreUnavailable within acquire_timeout (plus one connect attempt), one that does
        not answer within `work_timeout` (plus psycopg's cancel attempt)."""
        bound = asyncio.timeout(self.settings.work_timeout)
        try:
            async with bound, self._pool.connection() as conn:
                yield conn
        except TimeoutError:
            if not bound.expired():
                raise  # the caller's own
            raise self._unavailable(f"no answer within {self.settings.work_timeout:g}s") from None
        except PoolTimeout:
            raise self._unavailable(f"no connection within {self.settings.acquire_timeout:g}s") from None
        except psycopg.OperationalError as error:  # the server went away mid-use, or cancelled a slow statement
            raise self._unavailable(type(error).__name__) from None

    @asynccontextmanager
    async def transaction(self, failed: Callable[[str], Exception]) -> AsyncIterator[Connection]:
        """One transaction on a pooled connection; any failure, PostgreSQL's or the pool's, raised as
        `failed(reason)`, so each store reports it in its own error naming what it was doing."""
        try:
            async with self.connection() as conn, conn.transaction():
                yield conn
        except (StoreUnavailable, psycopg.Error) as error:
            raise failed(failure_reason(error)) from None

    def _unavailable(self, why: str) -> StoreUnavailable:
        return StoreUnavailable(f"PostgreSQL at {self.dsn.redacted()} unavailable: {why}")


def failure_reason(error: Exception) -> str:
    """The error's first line: a StoreUnavailable names the redacted DSN; a server error never holds a password."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
