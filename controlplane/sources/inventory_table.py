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
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from controlplane.model.inventory import Environment, Group, Inventory, Project, Ref
from controlplane.store.changes import publish
from controlplane.store.pool import StorePool, StoreUnavailable

TOPIC = "gitlab-inventory"
RESYNC_TOPIC = "gitlab-resync"

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
_DOCUMENTS = "SELECT issuer, document FROM gitlab_inventories WHERE issuer = ANY(%s)"


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
        """Every issuer's row; the document only of those whose hash differs from `known` (issuer → hash)."""
        known = known or {}
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_HEADS)
                heads = {str(i): (str(h), None if r is None else float(str(r))) for i, h, r in await cursor.fetchall()}
                wanted = sorted(i for i, (h, _) in heads.items() if known.get(i) != h)
                documents: dict[str, Any] = {}
                if wanted:
                    cursor = await conn.execute(_DOCUMENTS, (wanted,))
                    documents = {str(i): d for i, d in await cursor.fetchall()}
        except psycopg.Error as error:
            raise StoreUnavailable(f"gitlab inventories: {type(error).__name__}") from None
        return {
            issuer: StoredInventory(
                hash_, read_at, from_document(documents[issuer], read_at) if issuer in documents else None
            )
            for issuer, (hash_, read_at) in heads.items()
        }

    async def request_resync(self, payload: str) -> None:
        """Ask the leader to re-read what a webhook named (`all`, `project:<id>`, `rename:<id>`)."""
        try:
            async with self._pool.connection() as conn:
                await publish(conn, RESYNC_TOPIC, payload)
        except psycopg.Error as error:
            raise StoreUnavailable(f"gitlab re-sync request: {type(error).__name__}") from None
