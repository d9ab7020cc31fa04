"""The store's schema, created and migrated by the control plane itself, safely from several replicas at once.

Why in the binary: a fleet of replicas rolls out without a separate migration job, and each replica knows the
schema it needs. The migrations are listed below in order, each (version, name, SQL), and never edited once
released: a change is a new migration. `migrate()` applies every pending one in ONE transaction that first
takes `pg_advisory_xact_lock(MIGRATION_LOCK)`, so replicas starting together serialise on the lock; the second
finds the work done and applies nothing; a failure rolls everything back (PostgreSQL DDL is transactional), and
the lock is released with the transaction, even when the process dies. A database at a version newer than any
this binary knows was migrated by a newer release: this one refuses to start rather than run against a schema
it does not understand (roll forward, or restore the database).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

log = logging.getLogger("controlplane.store")

# Every advisory-lock key the control plane takes, listed here so no two uses collide. MIGRATION_LOCK ("cp-mig"
# in ASCII) is the single bigint form; per-row locks use the two-int4 form (namespace, hashtext(key)), a key
# space PostgreSQL keeps apart from the bigint one. Any value works as long as no other user of the database
# takes the same one for something else.
MIGRATION_LOCK = 0x63702D6D6967
EXCHANGE_JOB_LOCK = 0x63704A42  # "cpJB": the exchange store's per-job lock, (EXCHANGE_JOB_LOCK, hashtext(job_id))
LEADER_LOCK = 0x63702D6C6561  # "cp-lea": the one leader's session lock (store/leader.py), bigint form
SIGNING_KEYS_LOCK = 0x63704B59  # "cpKY": (SIGNING_KEYS_LOCK, 0), held by each change of the signing-key set
REVOCATION_LOCK = 0x63702D726576  # "cp-rev": serialises deny-list writes, so `seq` commits in order
AUDIT_PRUNE_LOCK = 0x63704150  # "cpAP": one retention sweep of the audit table at a time, (AUDIT_PRUNE_LOCK, 0)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


class MigrationError(Exception):
    """The schema could not be brought to this binary's version; the control plane must not start."""


class SchemaTooNew(MigrationError):
    """The database was migrated by a newer release than this one (a downgrade)."""


# Timestamps are double precision Unix seconds, as in the SQLite exchange store, so the two implementations
# of ReplayCounter/JobLedger share their arithmetic and the clock they are tested with (an injected float
# clock), instead of mixing the database's now() with the process's.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "exchange store: replay counts, finished jobs, job credentials",
        """
        CREATE TABLE replay (
            subject text PRIMARY KEY,
            uses integer NOT NULL CHECK (uses >= 0),
            expires_at double precision NOT NULL
        );
        CREATE INDEX replay_expiry ON replay (expires_at);
        CREATE TABLE finished_jobs (
            job_id text PRIMARY KEY,
            keep_until double precision NOT NULL
        );
        CREATE INDEX finished_jobs_expiry ON finished_jobs (keep_until);
        CREATE TABLE job_credentials (
            job_id text PRIMARY KEY,
            project_id text,
            issuer text NOT NULL,
            expires_at double precision NOT NULL
        );
        CREATE INDEX job_credentials_expiry ON job_credentials (expires_at);
        """,
    ),
    Migration(
        2,
        "leader and replicas: who holds the leader lock, each replica's heartbeat",
        """
        CREATE TABLE leader_holder (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            replica_id text,
            pid integer,
            since double precision
        );
        CREATE TABLE replicas (
            replica_id text PRIMARY KEY,
            host text NOT NULL,
            xds_address text NOT NULL,
            admin_address text NOT NULL,
            version text NOT NULL,
            started_at double precision NOT NULL,
            last_seen double precision NOT NULL,
            heartbeat_every double precision NOT NULL,
            stopped_at double precision,
            leader boolean NOT NULL DEFAULT false,
            fleet jsonb NOT NULL DEFAULT '{}'::jsonb
        );
        CREATE INDEX replicas_last_seen ON replicas (last_seen);
        """,
    ),
    Migration(
        3,
        "signing keys: the set every replica signs with and publishes, private keys sealed",
        """
        CREATE TABLE signing_keys (
            kid text PRIMARY KEY,
            sealed_private_key bytea NOT NULL,
            created_at double precision NOT NULL,
            not_before double precision NOT NULL,
            retire_after double precision
        );
        """,
    ),
    Migration(
        4,
        "revocations: the fleet-wide deny list, read incrementally by seq",
        """
        CREATE SEQUENCE revocations_seq AS bigint;
        CREATE TABLE revocations (
            job_id text PRIMARY KEY,
            denied_until double precision NOT NULL,
            seq bigint NOT NULL
        );
        CREATE INDEX revocations_by_seq ON revocations (seq);
        CREATE INDEX revocations_expiry ON revocations (denied_until);
        """,
    ),
    Migration(
        5,
        "audit trail: append-only records, indexed for the audit command's queries",
        # The columns of audit/store.py's AuditRecord, as in audit.sqlite3; "user" is quoted (a reserved word).
        # The indexes serve `audit --job`, `--project` (a path or an id) and `--since`, each ordered by time,
        # and the retention sweep (time). Append-only as in SQLite: a trigger refuses UPDATE.
        """
        CREATE TABLE audit (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            time double precision NOT NULL,
            gateway text NOT NULL,
            node text NOT NULL,
            backend text,
            method text NOT NULL,
            path text NOT NULL,
            status integer NOT NULL,
            decision text NOT NULL CHECK (decision IN ('allowed', 'denied')),
            details text,
            policy text,
            project_id text,
            project_path text,
            pipeline_id text,
            job_id text,
            ref text,
            "user" text,
            credential_jti text,
            issuer text,
            peer text,
            identity text,
            reported_time double precision
        );
        CREATE INDEX audit_job ON audit (job_id, time);
        CREATE INDEX audit_project ON audit (project_path, time);
        CREATE INDEX audit_project_id ON audit (project_id, time);
        CREATE INDEX audit_time ON audit (time);
        CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'audit records are append-only'; END $$;
        CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit
            FOR EACH ROW EXECUTE FUNCTION audit_append_only();
        """,
    ),
    Migration(
        6,
        "gitlab inputs: remembered project ids, webhook deliveries, inventories as last read",
        """
        CREATE TABLE pins (
            issuer text NOT NULL,
            path text NOT NULL,
            project_id bigint NOT NULL CHECK (project_id > 0),
            pinned_at double precision NOT NULL,
            PRIMARY KEY (issuer, path)
        );
        CREATE TABLE webhook_deliveries (
            key text PRIMARY KEY,
            expires_at double precision NOT NULL
        );
        CREATE INDEX webhook_deliveries_expiry ON webhook_deliveries (expires_at);
        CREATE TABLE gitlab_inventories (
            issuer text PRIMARY KEY,
            document jsonb NOT NULL,
            content_hash text NOT NULL,
            read_at double precision,
            written_at double precision NOT NULL
        );
        """,
    ),
    Migration(
        7,
        "exchange store: the latest subject token expiry of each job holding credentials",
        # A finished job stays denied until its ID token expires too (docs/revocation-coverage.md); NULL: rows
        # written before this migration, whose credentials alone count.
        """
        ALTER TABLE job_credentials ADD COLUMN subject_expires_at double precision;
        CREATE INDEX job_credentials_held ON job_credentials (greatest(expires_at, subject_expires_at));
        """,
    ),
    Migration(
        8,
        "exchange store: the project and end time of each finished job",
        # A policy change that widens coverage re-judges the jobs that ended within the deny window, on every
        # replica and after a restart (docs/revocation-coverage.md); NULL: rows written before this migration.
        """
        ALTER TABLE finished_jobs ADD COLUMN project_id text, ADD COLUMN finished_at double precision;
        CREATE INDEX finished_jobs_project ON finished_jobs (project_id, finished_at);
        """,
    ),
    Migration(
        9,
        "audit trail: the ref type, ref protection, pipeline source and environment claims of each request",
        # What `controlplane suggest` pins subjects on from observation (audit.sqlite3's schema version 3);
        # NULL: rows written before this migration. Adding nullable columns rewrites no row.
        """
        ALTER TABLE audit ADD COLUMN ref_type text, ADD COLUMN ref_protected text,
            ADD COLUMN pipeline_source text, ADD COLUMN environment text;
        """,
    ),
    Migration(
        10,
        "audit trail: the cloud identity (AWS role ARN, Google service account) each request was sent as",
        # audit.sqlite3's schema version 4; NULL for rows written before and for requests sent as no cloud identity.
        "ALTER TABLE audit ADD COLUMN cloud_identity text;",
    ),
)

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def check_order(migrations: tuple[Migration, ...]) -> None:
    """Versions are 1, 2, 3... with no gap or repeat: a gap would make "the latest" ambiguous."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise MigrationError(f"migrations must be numbered 1..n in order, got {versions}")


async def migrate(
    conn: psycopg.AsyncConnection[tuple[object, ...]], migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[int]:
    """Bring the database to the latest version; returns the versions this call applied (empty when none).
    `conn` must be idle (no transaction open): the migration is one transaction of its own."""
    check_order(migrations)
    latest = migrations[-1].version if migrations else 0
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(_CREATE_LEDGER)
        cursor = await conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        done = {int(str(version)): str(name) for version, name in await cursor.fetchall()}
        current = max(done, default=0)
        if current > latest:
            raise SchemaTooNew(
                f"the database schema is at version {current}, newer than this release knows ({latest}): "
                "it was migrated by a newer control plane; run that release, or restore the database"
            )
        for migration in migrations:
            known = done.get(migration.version)
            if known is not None:
                if known != migration.name:
                    raise MigrationError(
                        f"schema version {migration.version} was applied as {known!r}, "
                        f"this release calls it {migration.name!r}: the database belongs to another build"
                    )
                continue
            await conn.execute(migration.sql.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
            )
            applied.append(migration.version)
    if applied:
        log.info("store schema migrated to version %d (applied %s)", latest, applied)
    return applied


async def schema_version(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """The database's schema version (0 when never migrated)."""
    cursor = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return 0
    cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
    row = await cursor.fetchone()
    return int(str(row[0])) if row is not None else 0
