"""The GitLab inventory as last read by the leader, in PostgreSQL: what followers compile with.

Why: replicas must compile byte-identical resources (an Envoy moving between them gets nothing re-sent), and
the inventory is an input of the compile; and N replicas polling GitLab would multiply its load by N. So only
the leader reads GitLab (runtime/gitlab_link.py) and writes each issuer's inventory here, one row per issuer:
the document (projects, groups), `read_at` (the read's time, from which every replica judges staleness the
same way) and a content hash, so a reconcile that found nothing new rewrites only `read_at`. Each write that
changes the row notifies topic `gitlab-inventory` (payload: the issuer's name); followers re-read the rows
whose hash changed. Followers that need a re-sync (a webhook reached them) ask the leader through topic
`gitlab-resync`: they never call GitLab for inventory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from controlplane.model.inventory import Environment, Group, Inventory, Project, Ref
from controlplane.store.changes import publish
from controlplane.store.pool import StorePool, StoreUnavailable

log = logging.getLogger("controlplane.gitlab")

TOPIC = "gitlab-inventory"
RESYNC_TOPIC = "gitlab-resync"
# A document larger than this (as JSON text) is refused unread: thousands of projects take a few hundred kB, and
# parsing a row another writer bloated must not cost a replica gigabytes.
MAX_DOCUMENT_BYTES = 32 * 1024 * 1024

_WRITE = """
INSERT INTO gitlab_inventories AS g (issuer, document, content_hash, read_at, written_at)
VALUES (%(issuer)s, %(document)s, %(hash)s, %(read_at)s, %(now)s)
ON CONFLICT (issuer) DO UPDATE SET
    document = CASE WHEN g.content_hash = excluded.content_hash THEN g.document ELSE excluded.document END,
    content_hash = excluded.content_hash, read_at = excluded.read_at, written_at = excluded.written_at
WHERE g.content_hash IS DISTINCT FROM excluded.content_hash OR g.read_at IS DISTINCT FROM excluded.read_at
RETURNING 1
"""
_HEADS = "SELECT issuer, content_hash, read_at FROM gitlab_inventories"
# The size is judged by the server, so an oversized document never crosses the wire.
_DOCUMENTS = """
SELECT issuer, size, CASE WHEN size <= %(limit)s THEN document END
FROM (SELECT issuer, document, octet_length(document::text) AS size FROM gitlab_inventories
      WHERE issuer = ANY(%(wanted)s)) AS d
"""


class RowRefused(ValueError):
    """A row this replica cannot take as a leader's read: malformed, oversized, or its hash does not match."""


def document(inventory: Inventory) -> dict[str, Any]:
    """The content of an inventory (not its read time or staleness) as JSON values."""
    return {
        "projects": [asdict(p) for p in inventory.projects],
        "groups": [asdict(g) for g in inventory.groups],
    }


def content_hash(inventory: Inventory) -> str:
    text = json.dumps(document(inventory), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def from_document(doc: Mapping[str, Any], read_at: float | None) -> Inventory:
    """The inverse of `document`: equal dataclasses, so the compile gives the leader's very resources."""
    return Inventory(
        projects=tuple(_project(p) for p in doc.get("projects", ())),
        groups=tuple(Group(int(g["id"]), str(g["path"]), g.get("parent_id")) for g in doc.get("groups", ())),
        fetched_at=read_at,
    )


def _project(p: Mapping[str, Any]) -> Project:
    refs = p.get("refs")
    environments = p.get("environments")
    return Project(
        id=int(p["id"]),
        path=str(p["path"]),
        namespace_id=int(p["namespace_id"]),
        archived=bool(p["archived"]),
        default_branch=p.get("default_branch"),
        refs=None if refs is None else tuple(Ref(r["name"], r["type"], bool(r["protected"])) for r in refs),
        environments=None
        if environments is None
        else tuple(Environment(e["name"], e["tier"], bool(e["protected"])) for e in environments),
    )


@dataclass(frozen=True)
class StoredInventory:
    content_hash: str
    read_at: float | None
    inventory: Inventory | None  # None when its hash is the one the reader already had (not read again)


class InventoryTable:
    """One row per GitLab issuer; `write` by the leader, `read` by followers, `request_resync` by anyone."""

    def __init__(self, pool: StorePool, *, clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self._clock = clock
        self.refused: dict[str, str] = {}  # issuer -> why its row was not taken (status; logged once per reason)

    async def write(self, issuer: str, inventory: Inventory) -> bool:
        """True when the row changed (content or read time); the change is then announced."""
        params = {
            "issuer": issuer,
            "document": Jsonb(document(inventory)),
            "hash": content_hash(inventory),
            "read_at": inventory.fetched_at,
            "now": self._clock(),
        }
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(_WRITE, params)
                changed = await cursor.fetchone() is not None
                if changed:
                    await publish(conn, TOPIC, issuer)
        except psycopg.Error as error:
            raise StoreUnavailable(f"gitlab inventories: {type(error).__name__}") from None
        return changed

    async def read(self, known: Mapping[str, str] | None = None) -> dict[str, StoredInventory]:
        """Every issuer's row; the document only of those whose hash differs from `known` (issuer → hash).

        A row that cannot be taken (malformed document or read time, oversized, hash not its content: another
        writer's bug or tampering) is left out, logged and kept in `refused`: the reader keeps its last good
        inventory for that issuer, which turns stale on time (fail closed), and every other row is still read."""
        known = known or {}
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_HEADS)
                heads = {str(i): (str(h), r) for i, h, r in await cursor.fetchall()}
                wanted = sorted(i for i, (h, _) in heads.items() if known.get(i) != h)
                documents: dict[str, tuple[int, Any]] = {}
                if wanted:
                    cursor = await conn.execute(_DOCUMENTS, {"wanted": wanted, "limit": MAX_DOCUMENT_BYTES})
                    documents = {str(i): (int(str(n)), d) for i, n, d in await cursor.fetchall()}
        except psycopg.Error as error:
            raise StoreUnavailable(f"gitlab inventories: {type(error).__name__}") from None
        rows: dict[str, StoredInventory] = {}
        for issuer, (hash_, read_at) in heads.items():
            try:
                rows[issuer] = _row(hash_, read_at, documents.get(issuer))
            except RowRefused as error:
                self._refuse(issuer, str(error))
            else:
                self.refused.pop(issuer, None)
        for issuer in set(self.refused) - set(heads):
            del self.refused[issuer]
        return rows

    def _refuse(self, issuer: str, reason: str) -> None:
        if self.refused.get(issuer) != reason:
            log.error(
                "gitlab_inventories row %r refused: %s; this replica keeps its last good inventory of it "
                "(stale on time)",
                issuer[:200],
                reason,
            )
        self.refused[issuer] = reason

    async def request_resync(self, payload: str) -> None:
        """Ask the leader to re-read what a webhook named (`all`, `project:<id>`, `rename:<id>`)."""
        try:
            async with self._pool.connection() as conn:
                await publish(conn, RESYNC_TOPIC, payload)
        except psycopg.Error as error:
            raise StoreUnavailable(f"gitlab re-sync request: {type(error).__name__}") from None


def _row(hash_: str, read_at: object, fetched: tuple[int, Any] | None) -> StoredInventory:
    if read_at is not None and not (isinstance(read_at, float | int) and math.isfinite(read_at)):
        raise RowRefused(f"read_at is not a finite time: {str(read_at)[:40]}")
    when = None if read_at is None else float(read_at)
    if fetched is None:
        return StoredInventory(hash_, when, None)
    size, doc = fetched
    if doc is None:
        raise RowRefused(f"document of {size} bytes, over the {MAX_DOCUMENT_BYTES} bytes bound")
    try:
        inventory = from_document(doc, when)
        own = content_hash(inventory)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
        raise RowRefused(f"malformed document ({type(error).__name__}: {str(error)[:200]})") from None
    if own != hash_:
        raise RowRefused("content_hash does not match the document")
    return StoredInventory(hash_, when, inventory)
