"""`controlplane serve`: the long-running process. Builds the parts and connects them; the decisions are theirs
(what an event reaches: event_router.py; what the xDS port may carry: xds/tls.py; start and stop: supervisor.py;
how connections share the open-file limit: serving.py; how far back revocation looks and when Job Hooks may
have been missed: credentials/service.py).

The parts form cycles (the policy service compiles in the credential service's keys and the GitLab link's
inventories, and those recompile it when they change; the GitLab link reports to the event router, which
drives it). Each cycle is cut by a `Forward` (runtime/forward.py) to the policy service or the event router,
built before anything that calls them and connected as soon as they exist: every other part is built after
what it calls, and a call that came too early would fail naming the part, not as a NameError from a closure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from controlplane import __version__
from controlplane.admin.explain import explain_inputs
from controlplane.admin.http import AdminServer
from controlplane.audit.als import AccessLogService
from controlplane.audit.store import DB_NAME as AUDIT_DB
from controlplane.audit.store import AuditStore, AuditTrail
from controlplane.audit.store_pg import PostgresAuditStore
from controlplane.certfiles import CertificateFileError
from controlplane.cli.options import ServeOptions, StoreOptions, WebhookOptions
from controlplane.credentials.exchange_store import DB_NAME as EXCHANGE_DB
from controlplane.credentials.exchange_store import ExchangeStore, ExchangeStoreError, SqliteExchangeStore
from controlplane.credentials.exchange_store_pg import PostgresExchangeStore
from controlplane.credentials.key_cipher import KekError
from controlplane.credentials.keys import KEYS_FILE
from controlplane.credentials.keys_pg import TOPIC as KEYS_TOPIC
from controlplane.credentials.keys_pg import PostgresKeyStore, SharedKeys
from controlplane.credentials.revocation_store import RevocationStoreError
from controlplane.credentials.revocation_store_pg import TOPIC as REVOCATIONS_TOPIC
from controlplane.credentials.revocation_store_pg import PostgresRevocationStore
from controlplane.credentials.revocations import REVOCATIONS_FILE
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.model.policy import Policy
from controlplane.resolved.explain import ExplainInputs
from controlplane.runtime.aws_signing import AwsSigners, source_factory
from controlplane.runtime.event_router import POLICY_TOPIC, EventRouter
from controlplane.runtime.forward import Forward
from controlplane.runtime.gc_control import CollectorSchedule
from controlplane.runtime.gcp_backends import GcpBackends
from controlplane.runtime.gitlab_link import GitLabLink, PolicyProject
from controlplane.runtime.keyrelay import KeyRelay
from controlplane.runtime.merge_request_statuses import MAX_UNWATCHED, MergeRequestStatuses
from controlplane.runtime.policy_check import LiveInputs
from controlplane.runtime.policy_service import PolicyService
from controlplane.runtime.replication import (
    leader,
    proxies_summary,
    registered,
    replica_id,
    this_replica,
)
from controlplane.runtime.supervisor import Supervisor
from controlplane.serving import HttpLimits, raise_open_file_limit
from controlplane.snapshots.cache import SnapshotCache
from controlplane.sources.deliveries_pg import PostgresDeliveryKeys
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_client import token_from
from controlplane.sources.gitlab_policy import GitLabPolicySource
from controlplane.sources.gitlab_repo import PolicyRepo
from controlplane.sources.inventory_table import RESYNC_TOPIC, InventoryTable
from controlplane.sources.inventory_table import TOPIC as INVENTORY_TOPIC
from controlplane.sources.kubernetes import KubeAccess, KubernetesEndpoints
from controlplane.sources.pins import PINS_FILE, PinStore, RememberedPins
from controlplane.sources.pins_pg import TOPIC as PINS_TOPIC
from controlplane.sources.pins_pg import PostgresPinStore
from controlplane.sources.policy_source import DirectorySource, PolicySource
from controlplane.sources.secrets import SecretsSource
from controlplane.sources.watch import watch_policy_dir
from controlplane.sources.webhooks import WebhookReceiver, secrets_from
from controlplane.statefile import LOCK_NAME, StateFileError, lock_state_dir, secure_state_dir
from controlplane.store.changes import ChangeFeed, publish
from controlplane.store.dsn import DsnError
from controlplane.store.leader import LeaderLease, StaticLeader
from controlplane.store.migrations import MigrationError
from controlplane.store.pool import StorePool, StoreUnavailable
from controlplane.store.replicas import ReplicaRegistry
from controlplane.xds.fleet_status import ProxyRegistry, cache_versions
from controlplane.xds.server import XdsServer
from controlplane.xds.tls import TransportPolicy, XdsTransportError

log = logging.getLogger("controlplane")


# What `serve` keeps in its state directory (see controlplane/statefile.py); made private at every start.
# Revocations (and key changes) wait this long for others to share their compile and push: a burst of finished jobs
# is a few pushes (issue 13), at a cost of 0.1 s of the 1 s a revocation may take to reach every Envoy.
CREDENTIAL_CHANGES_GATHER = 0.1
KUBERNETES_CHANGES_GATHER = 0.02  # a rollout's burst of slice events: one compile (the 1 s budget: tests/test_e2e_kube)
STATE_FILES = (LOCK_NAME, KEYS_FILE, REVOCATIONS_FILE, PINS_FILE, EXCHANGE_DB, AUDIT_DB)


def _policy_source(options: ServeOptions, is_leader: Callable[[], bool]) -> PolicySource:
    gitlab = options.policy_gitlab
    if gitlab is None:
        return DirectorySource(options.policy, options.policy_limits)
    client = GitLabSource(gitlab.url, token_from(gitlab.token_env, gitlab.token_file))
    return GitLabPolicySource(PolicyRepo(client, gitlab.project_ref, options.policy_limits), is_leader=is_leader)


async def serve(options: ServeOptions) -> int:
    """Exit code 0 when stopped (SIGTERM, SIGINT), 1 when a part failed (or failed to stop in time, or at all,
    or could not start: a port in use; a second SIGTERM or SIGINT exits at once with 128 + the signal), 2 when
    the xDS transport refuses the configuration (or the store's DSN source is unusable), 3 when a state file
    cannot be read or the shared PostgreSQL store cannot be reached and migrated (fail closed: never start with
    an empty deny list, keys, pins, use counts or finished jobs)."""
    try:
        async with Supervisor(stop_deadline=options.stop_deadline) as parts:
            await _serve(options.fitted_to(raise_open_file_limit()), parts)
    except (StateFileError, ExchangeStoreError, RevocationStoreError, StoreUnavailable, MigrationError) as unreadable:
        log.critical("refusing to start: %s", unreadable)
        return 3
    except (XdsTransportError, CertificateFileError, DsnError, KekError) as refused:
        log.critical("refusing to start: %s", refused)
        return 2
    except OSError as failed:  # a port in use, a directory not writable: the message says which, a traceback not
        log.critical("could not start: %s", failed)
        return 1
    log.info("stopped")
    return 1 if parts.failed else 0


def _published(kube: KubernetesEndpoints, gcp: GcpBackends, aws: AwsSigners, current: Policy | None) -> None:
    """The policy in service changed: Kubernetes watches, Google token and AWS credential refreshers follow it."""
    kube.retain(current)
    gcp.follow(current)
    aws.follow(current)


def _live_inputs(gitlab: GitLabLink, policy: PolicyService, head: Policy) -> LiveInputs:
    """What a merge request's head is judged against: GitLab as the served policy sees it, plus what it names."""
    return LiveInputs(gitlab.inventories_for(head, policy.pins, MAX_UNWATCHED), policy.pins)


async def _serve(options: ServeOptions, parts: Supervisor) -> None:
    """The parts in the order they are built and started; `parts` stops them in the reverse order. Cycles
    (the policy service recompiles on events of parts that read it) are cut by `Forward`s (module docstring)."""
    parts.enter(_held_state_dir(options.state_dir), name="state directory lock")  # one serve per state dir
    parts.stop_on_signals()
    started = time.time()

    # The leader lease first: singleton duties built below ask `is_leader` (always True with --store file).
    lease = leader(options.store.resolve_dsn(), replica_id(options.store.replica_id), options.store.leader_retry)
    parts.run("leader lease", lease.run(parts.stopping))
    is_leader: Callable[[], bool] = lease.is_leader  # key rotation, GitLab polling, commit statuses, retention

    # Built: every state file is read here, before anything is served.
    to_policy: Forward[PolicyService] = Forward("policy service")
    to_events: Forward[EventRouter] = Forward("event router")
    stores = await _shared_stores(options, parts)
    audit = await _audit_store(options, parts, stores.pool, is_leader)  # stopped before the pool's owner
    deliveries = PostgresDeliveryKeys(stores.pool) if stores.pool is not None else None  # webhook keys, shared
    gitlab = GitLabLink(
        on_inventory_change=lambda: to_events().inventory_changed(),
        spawn=parts.spawn,
        on_policy_push=lambda: to_events().policy_pushed(),
        policy_project=None if options.policy_gitlab is None else PolicyProject(options.policy_gitlab.project_ref),
        on_reachable=lambda issuer: to_events().gitlab_reachable(issuer),
        share=InventoryTable(stores.pool) if stores.pool is not None else None,  # only the leader reads GitLab
        is_leader=is_leader,
    )
    parts.on_stop(gitlab.stop, name="GitLab watchers")
    lease.subscribe(gitlab.on_leadership)
    pins = await _pin_store(options, stores, parts, lambda: to_policy().recompile("remembered project ids changed"))
    keys = KeyRelay(
        lambda relayed: to_policy().set_keys(relayed), spawn=parts.spawn, refresh_interval=options.jwks_refresh
    )
    parts.on_stop(keys.stop, name="JWKS relay")
    # Injected upstream credentials: a changed secret file recompiles, which changes only Secret resources.
    secrets = SecretsSource(lambda: to_policy().recompile("backend secret changed"))
    # Backends naming Kubernetes Services: their EndpointSlices watched while the policy names them.
    kube = KubernetesEndpoints(KubeAccess(options.kubeconfig, options.kube_context), allow=options.kube_allow_endpoints)
    parts.on_stop(lambda: asyncio.to_thread(kube.stop), name="Kubernetes watches")
    credentials = (
        CredentialService(
            options.credentials,
            store=stores.exchange,
            shared_keys=await _shared_keys(options.credentials, options.store, stores, parts),
            revocation_store=None if stores.pool is None else PostgresRevocationStore(stores.pool),
            is_leader=is_leader,
            issuer_keys=lambda issuer: keys.keys.get(issuer),
            policy=lambda: to_policy().exchange_policy,
            on_change=lambda: to_policy().recompile("credentials changed", gather=CREDENTIAL_CHANGES_GATHER),
            job_status_reader=gitlab.job_status_reader,
        )
        if options.credentials is not None
        else None
    )
    aws = _aws_signers(credentials, lambda: to_policy().recompile("AWS credentials changed"))
    parts.on_stop(lambda: asyncio.to_thread(aws.stop), name="AWS credential refreshers")
    # gcp backends: their Google tokens, refreshed in memory; a change recompiles (only their Secrets change).
    issuer = credentials is not None and credentials.oidc_issuer is not None
    gcp = GcpBackends(
        credentials.relying_party_tokens if credentials is not None and issuer else None,
        lambda: to_policy().recompile("gcp credential changed"),
    )
    pool = stores.pool  # the replica registry's: every shared store's one pool
    transport = TransportPolicy(host=options.xds_host, tls=options.xds_tls, insecure=options.xds_insecure)
    cache = SnapshotCache()
    policy = to_policy.connect(
        PolicyService(
            _policy_source(options, is_leader),  # commit statuses: posted by the leader
            cache,
            inventories=gitlab.inventories,
            pin_store=pins,
            reload_timeout=options.reload_timeout,
            credentials=credentials.inputs if credentials is not None else lambda: None,
            # A policy that now covers a project lists its jobs that finished unlisted (coverage).
            exchange_policy_changed=credentials.policy_changed if credentials is not None else lambda: None,
            secrets=lambda policy: {**secrets.for_policy(policy), **gcp.for_policy(policy)},
            aws_credentials=aws.for_policy,
            accept=lambda policy: transport.accept(policy) or gcp.accept(policy),
            prepare=lambda candidate: kube.prepare(candidate) or gitlab.read_new_subjects(candidate, to_policy().pins),
            endpoints=kube.for_backend,
            published=partial(_published, kube, gcp, aws),
        )
    )
    if credentials is not None:
        credentials.use_audit_trail(
            lambda job, since: bool(audit.query(job=job, since=since, limit=1)), lambda timeout: audit.flush(timeout)
        )
    # Revocation needs the credential service; jobs are looked for among its credentials and the audit trail.
    recovery = (
        credentials.job_recovery(seen=audit.recent_jobs, reader_for=gitlab.job_status_reader)
        if credentials is not None
        else None
    )
    events = to_events.connect(
        EventRouter(
            policy=policy,
            gitlab=gitlab,
            keys=keys,
            credentials=credentials,
            recovery=recovery,
            is_leader=is_leader,
            announce_policy=_announcer(stores.pool, POLICY_TOPIC) if options.policy_gitlab is not None else None,
        )
    )

    # Started, inputs first: watch before the first load, so an edit made while it runs is never missed. Each
    # step is abandoned, and the rest of the start with it, once a part failed (supervisor.py).
    if stores.feed is not None:  # followers: the leader's GitLab inventories, read from the table from now on
        parts.run("GitLab inventory share", gitlab.run(parts.stopping))
    watching = asyncio.Event()
    parts.run("policy watcher", _policy_watcher(options, events, parts.stopping, watching))
    await parts.step(watching.wait())  # a watcher that could not start stops the start here
    if options.policy_gitlab is not None and isinstance(policy.source, GitLabPolicySource):  # merge requests' heads
        repo = PolicyRepo(policy.source.repo.source, policy.source.repo.project, options.policy_limits)
        live = partial(_live_inputs, gitlab, policy)  # GitLab now, read-only: never widens a watch
        served = policy.source.repo
        statuses = MergeRequestStatuses(
            repo, is_leader=is_leader, live=live, served_bytes=lambda: served.last_tree_bytes
        )
        gitlab.on_merge_request = statuses.wake  # an MR webhook, or a push to another branch: a round now
        parts.run("merge-request statuses", statuses.run(options.policy_gitlab.poll_seconds, parts.stopping))
    if credentials is not None:
        credentials.job_hooks_may_be_lost()  # until the webhook listener is up: ask GitLab
        # Its keys exist (compiled in) before anything is served.
        await parts.start(credentials.start(), credentials.stop, name="credential service")
        parts.run("credential service", credentials.run(parts.stopping))
    changed = "Kubernetes endpoints changed"
    parts.run(
        "Kubernetes endpoints",
        kube.run(lambda: policy.recompile(changed, gather=KUBERNETES_CHANGES_GATHER), parts.stopping),
    )
    await parts.start(gcp.start(), gcp.stop, name="gcp credentials")
    await parts.step(policy.reload_off_loop())
    if stores.feed is not None:  # after the first compile: what it reports recompiles; at connect, all re-read
        if credentials is not None:
            stores.feed.subscribe(REVOCATIONS_TOPIC, credentials.revocations_changed, coalesce=True)
        if options.policy_gitlab is not None:
            stores.feed.subscribe(POLICY_TOPIC, events.policy_noticed, coalesce=True)
        stores.feed.subscribe(INVENTORY_TOPIC, gitlab.on_shared, coalesce=True)
        stores.feed.subscribe(RESYNC_TOPIC, gitlab.on_resync_request)
        if isinstance(pins, PostgresPinStore):
            stores.feed.subscribe(PINS_TOPIC, pins.on_notify, coalesce=True)
        parts.run("change feed", stores.feed.run(parts.stopping))
    parts.run("secrets watcher", secrets.run(parts.stopping))
    await parts.step(events.follow_issuers(wait=options.jwks_startup_wait))
    await parts.step(gitlab.settled(options.gitlab_startup_wait))
    if recovery is not None:  # Job Hooks sent while we were down are lost: ask GitLab (recovery.py)
        # Cancelled when stopping: a sweep may be waiting on GitLab's retries, no reason to wait for it.
        parts.run("job recovery", recovery.run(parts.stopping), cancel=True)
    if options.webhooks is not None:
        await _start_webhooks(options.webhooks, options.webhook_limits, events, parts, deliveries)
    if credentials is not None:  # jobs minted before now are asked about once (credentials/exchange.py)
        credentials.job_hooks_arrive()

    # Served: the xDS port only once the policy, keys and inventories are in.
    transport.check_start(serving=policy.current is not None)
    registry = ProxyRegistry()
    current_versions = cache_versions(cache)
    replicas: list[ReplicaRegistry] = []  # the registry, once the addresses are bound (--store postgres)
    admin = AdminServer(
        status=lambda: {
            "version": __version__,
            "policy": policy.status(),
            "jwks": keys.status(),
            "gitlab": gitlab.status(),
            "kubernetes": kube.status(),
            "credentials": credentials.status() if credentials else None,
            "aws": aws.status(),
            "gcp": gcp.status(),
            "change_feed": stores.feed.status() if stores.feed is not None else None,
            "audit": audit.status(),
            **_store_status(lease, replicas),
            **_shared_inputs_status(pins, deliveries),
        },
        fleet=lambda query: registry.fleet(query, current_versions),
        whole_fleet=lambda: replicas[0].whole_fleet() if replicas else None,
        ready=lambda: _not_ready(policy, stores, options.store.unready_after) is None,
        not_ready_reason=lambda: _not_ready(policy, stores, options.store.unready_after),
        host=options.admin_host,
        port=options.admin_port,
        limits=options.admin_limits,
        explain=lambda: _explain_inputs(policy),
    )
    # Registered before the xDS server's stop, so /readyz and /metrics still answer while the streams drain.
    parts.on_stop(admin.stop, name="admin server")
    xds = XdsServer(
        cache, registry, log=logging.getLogger("controlplane.xds"), max_connections=options.xds_max_connections
    )
    # Access logs are accepted only from gateways holding an ADS stream (`senders`). A raw ID token from before
    # a gap in webhook delivery, seen at a gateway: GitLab is asked about its job (`on_job`).
    # Every such sighting is also remembered for the deny list: a finished job is listed only if something of it
    # could still pass (credentials/coverage.py), and a sighting after its Job Hook lists it at once.
    # Each allowed request to an aws:/gcp: backend records the cloud identity the policy in service sends it as.
    als = AccessLogService(
        audit,
        senders=xds,
        on_job=credentials.job_seen if credentials is not None else None,
        policy=lambda: policy.current,
    )
    xds_port = await parts.start(
        xds.start(options.xds_host, options.xds_port, tls=options.xds_tls, extra_handlers=[als.handler()]),
        lambda: _drain(als, xds, options.shutdown_grace),
        name="xDS server",
    )
    admin_port = await parts.step(admin.start())
    if isinstance(lease, LeaderLease) and pool is not None:
        info = this_replica(
            lease.replica_id, (options.xds_host, xds_port), (options.admin_host, admin_port), __version__, started
        )
        summary = proxies_summary(registry, current_versions, lambda: policy.state.versions)
        registry_of_replicas = await parts.step(registered(pool, info, fleet=summary, is_leader=is_leader))
        parts.on_stop(registry_of_replicas.stop, name="replica registry row")  # marked stopped before the pool closes
        parts.run("replica registry", registry_of_replicas.run(parts.stopping))
        replicas.append(registry_of_replicas)
    if options.gc_interval > 0:
        collector = CollectorSchedule(options.gc_interval, full_every=options.gc_full_every, idle_for=xds.idle_for)
        collector.start()
        parts.on_stop(collector.stop, name="garbage collector")
        parts.run("garbage collector schedule", collector.run(parts.stopping))
    log.info(
        "controlplane %s serving xDS on %s:%d, admin on http://%s:%d, policy %s",
        __version__,
        options.xds_host,
        xds_port,
        options.admin_host,
        admin_port,
        policy.source.description,
    )
    await parts.wait()


@dataclass(frozen=True)
class SharedStores:
    """What `--store` chose. With PostgreSQL, one pool serves every store (`pool`), and one change feed tells this
    replica what the others wrote (`feed`); with files both are None and each part keeps its state-directory file."""

    exchange: ExchangeStore
    pool: StorePool | None = None
    feed: ChangeFeed | None = None


async def _shared_stores(options: ServeOptions, parts: Supervisor) -> SharedStores:
    """The stores, opened now, before anything is served, and closed after the credential service stopped.
    PostgreSQL is connected and migrated here (by the exchange store, which owns the shared pool and closes it):
    unreachable, it raises ExchangeStoreError naming the redacted DSN (exit 3, as an unreadable state file)."""
    dsn = options.store.resolve_dsn()
    if dsn is None:
        sqlite = SqliteExchangeStore(options.state_dir / EXCHANGE_DB)
        parts.on_stop(sqlite.close, name="exchange store")
        return SharedStores(sqlite)
    pool = StorePool(dsn, options.store.pool_settings())
    shared = PostgresExchangeStore(pool)
    await parts.start(shared.open(), shared.close, name="exchange store")
    log.info("exchange state in PostgreSQL at %s", dsn)
    return SharedStores(shared, pool, ChangeFeed(pool))


async def _audit_store(
    options: ServeOptions, parts: Supervisor, pool: StorePool | None, is_leader: Callable[[], bool]
) -> AuditTrail:
    """The audit trail: SQLite in the state directory, or PostgreSQL on the shared pool (migrated with it), its
    writer on this loop buffering while PostgreSQL is away, its retention swept by the leader (audit/store_pg.py).
    Built after the exchange store, so stopped (its buffer written) before that store closes the pool."""
    if pool is None:
        sqlite = AuditStore(options.audit_db or options.state_dir / AUDIT_DB, retention=options.audit_retention)
        parts.on_stop(lambda: asyncio.to_thread(sqlite.close), name="audit store")
        return sqlite
    shared = PostgresAuditStore(pool, retention=options.audit_retention, is_leader=is_leader)
    await parts.start(shared.open(), shared.close, name="audit store")
    log.info("audit trail in PostgreSQL at %s", pool.dsn)
    return shared


def _announcer(pool: StorePool | None, topic: str) -> Callable[[], Awaitable[None]] | None:
    """Tells every replica (this one too) that `topic` changed; None without a shared store."""
    if pool is None:
        return None

    async def announce() -> None:
        async with pool.connection() as conn:
            await publish(conn, topic)

    return announce


def _explain_inputs(policy: PolicyService) -> ExplainInputs | None:
    """`POST /explain` reads the policy in service with its live state, deny list and credentials."""
    current = policy.in_service
    if current is None:
        return None
    return explain_inputs(*current, policy.credentials(), revocations_known=True)


def _not_ready(policy: PolicyService, stores: SharedStores, unready_after: float) -> str | None:
    """Why new Envoys should go to another replica, or None. A replica cut off from PostgreSQL keeps serving its
    Envoys the last good snapshot, but it no longer hears of revocations and key changes made through the
    others, and it could not start again: past `unready_after` it stops taking new ones (docs/shared-state.md)."""
    reason = policy.not_ready_reason()
    if reason is None and stores.feed is not None and (away := stores.feed.unreachable_for()) > unready_after:
        reason = f"shared store unreachable for {away:.0f}s: changes made through other replicas are not seen here"
    return reason


def _store_status(lease: LeaderLease | StaticLeader, replicas: list[ReplicaRegistry]) -> dict[str, object]:
    """`/status` `store`: the leader and the replicas (--store postgres only: with files, the document is
    as it always was)."""
    if not isinstance(lease, LeaderLease):
        return {}
    return {"store": {"leader": lease.status(), "replicas": replicas[0].status() if replicas else None}}


async def _pin_store(
    options: ServeOptions, stores: SharedStores, parts: Supervisor, on_change: Callable[[], Awaitable[object]]
) -> RememberedPins | PostgresPinStore:
    """The remembered project ids: the state directory's file, or the shared table (read now: StoreUnavailable
    stops the start, as an unreadable pins file does); its writer runs until stopping."""
    if stores.pool is None:
        return PinStore(options.state_dir / PINS_FILE)
    pins = PostgresPinStore(stores.pool, on_change=on_change)
    await pins.open()
    parts.run("pins writer", pins.run(parts.stopping))
    return pins


def _shared_inputs_status(
    pins: RememberedPins | PostgresPinStore, deliveries: PostgresDeliveryKeys | None
) -> dict[str, object]:
    """`/status` `shared_inputs` (--store postgres only): pins not yet written, webhook keys kept in memory only."""
    if not isinstance(pins, PostgresPinStore) or deliveries is None:
        return {}
    return {"shared_inputs": {"pins": pins.status(), "webhook_deliveries": deliveries.status()}}


async def _shared_keys(
    options: CredentialOptions, store: StoreOptions, stores: SharedStores, parts: Supervisor
) -> SharedKeys | None:
    """With PostgreSQL, the signing keys every replica shares (None: the state directory's file), read (the first
    key created when there is none) on the exchange store's pool before anything is served, and followed through
    the change feed. A missing KEK is a usage error (exit 2); keys that do not open, exit 3."""
    if stores.pool is None or stores.feed is None:
        return None
    shared = await SharedKeys.open(
        PostgresKeyStore(stores.pool, store.key_cipher()),
        rotate_every=options.rotate_every,
        max_credential_ttl=options.max_credential_ttl,
        publish_lead=options.publish_lead,
    )
    stores.feed.subscribe(KEYS_TOPIC, shared.on_notification, coalesce=True)
    return shared


@contextlib.contextmanager
def _held_state_dir(state_dir: Path) -> Iterator[None]:
    """The state directory's lock, held until the last part stopped; its files made private at every start."""
    lock = lock_state_dir(state_dir)
    try:
        secure_state_dir(state_dir, STATE_FILES)
        yield
    finally:
        os.close(lock)


def _policy_watcher(
    options: ServeOptions, events: EventRouter, stopping: asyncio.Event, ready: asyncio.Event
) -> Coroutine[Any, Any, None]:
    """A directory is watched for edits; a GitLab project is polled, and woken by its push webhooks."""
    if options.policy_gitlab is None:
        return watch_policy_dir(
            options.policy,
            events.policy_files_changed,
            quiet=options.debounce,
            max_wait=options.max_wait,
            stop=stopping,
            ready=ready,
        )
    return events.poll_policy_project(options.policy_gitlab.poll_seconds, ready, stopping)


async def _start_webhooks(
    options: WebhookOptions,
    limits: HttpLimits,
    events: EventRouter,
    parts: Supervisor,
    seen: PostgresDeliveryKeys | None,
) -> None:
    webhooks = WebhookReceiver(
        secrets=secrets_from(options.secret_env, options.secret_file),
        on_event=events.webhook,
        limits=limits,
        seen=seen,
    )
    port = await parts.start(webhooks.start(options.host, options.port), webhooks.stop, name="webhook receiver")
    log.info("GitLab webhooks on http://%s:%d/webhooks/gitlab", options.host, port)


async def _drain(als: AccessLogService, xds: XdsServer, grace: float) -> None:
    """Access-log streams end first (their records committed), then the xDS streams, each told to reconnect."""
    log.info("shutting down: draining xDS streams for up to %.1fs", grace)
    await als.close()
    await xds.stop(grace)


def _aws_signers(credentials: CredentialService | None, recompile: Callable[[], Awaitable[object]]) -> AwsSigners:
    """One refresher per AWS role the policy names (runtime/aws_signing.py); each new credential, or the expiry of
    the last, recompiles from the refresher's thread on this loop. Web identity needs `--issuer-url`."""
    loop = asyncio.get_running_loop()
    issuer = credentials.oidc_issuer if credentials is not None else None
    factory = source_factory(issuer.url if issuer is not None else None, credentials.keys if credentials else None)

    def changed() -> None:
        asyncio.run_coroutine_threadsafe(_awaited(recompile), loop)

    return AwsSigners(factory, changed)


async def _awaited(call: Callable[[], Awaitable[object]]) -> None:
    await call()
