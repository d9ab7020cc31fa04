"""`controlplane serve`: the long-running process. Wires the layers together and nothing else."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from controlplane import __version__
from controlplane.admin.http import AdminServer, is_loopback
from controlplane.audit.als import AccessLogService
from controlplane.audit.store import AuditStore
from controlplane.credentials.exchange_store import ExchangeStoreError
from controlplane.credentials.recovery import JobRecovery
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.gc_control import CollectorSchedule
from controlplane.gitlab_link import GitLabLink, PolicyProject
from controlplane.keyrelay import KeyRelay
from controlplane.model.policy import Policy
from controlplane.service import DEFAULT_RELOAD_TIMEOUT, PolicyService
from controlplane.serving import (
    ADMIN_LIMITS,
    WEBHOOK_LIMITS,
    HttpLimits,
    fit_connection_budget,
    fit_xds_connections,
    raise_open_file_limit,
)
from controlplane.snapshots.cache import SnapshotCache
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_client import token_from
from controlplane.sources.gitlab_events import GitLabEvent
from controlplane.sources.gitlab_policy import GitLabPolicySource
from controlplane.sources.gitlab_repo import PolicyRepo
from controlplane.sources.pins import PinStore
from controlplane.sources.policy_dir import DEFAULT_LIMITS, ReadLimits
from controlplane.sources.policy_source import DirectorySource, PolicySource
from controlplane.sources.secrets import SecretsSource
from controlplane.sources.watch import watch_policy_dir
from controlplane.sources.webhooks import WebhookReceiver, secrets_from
from controlplane.statefile import StateFileError, lock_state_dir, secure_state_dir
from controlplane.xds.fleet_status import ProxyRegistry, cache_versions
from controlplane.xds.server import XdsServer
from controlplane.xds.tls import InsecureTransport, ServerTls, XdsTransportError, check_transport, pushes_secrets

log = logging.getLogger("controlplane")


@dataclass(frozen=True)
class GitLabPolicyOptions:
    """The policy lives in a GitLab project (instead of a directory)."""

    url: str
    project: str
    token_env: str | None = None
    token_file: str | None = None
    poll_seconds: float = 60.0  # a push webhook reloads at once; polling catches missed hooks


@dataclass(frozen=True)
class WebhookOptions:
    host: str
    port: int
    secret_env: str | None = None
    secret_file: str | None = None


@dataclass(frozen=True)
class ServeOptions:
    policy: Path
    xds_host: str
    xds_port: int
    admin_host: str
    admin_port: int
    debounce: float = 0.1
    max_wait: float = 1.0
    shutdown_grace: float = 5.0
    gc_interval: float = 60.0  # seconds between scheduled garbage collections (gc_control.py); 0: CPython's own
    gc_full_every: int = 1  # N > 1: only every Nth is full, the others skip what earlier ones kept
    jwks_refresh: float = 30.0
    # How long start-up waits for relayed issuers' first keys before serving xDS: an Envoy reconnecting to a
    # restarted control plane must not be sent the placeholder keys (every token refused) in the meantime.
    jwks_startup_wait: float = 10.0
    # The same for the first GitLab inventory read (until then GitLab-backed bindings are withdrawn).
    gitlab_startup_wait: float = 15.0
    state_dir: Path = Path(".controlplane")
    policy_gitlab: GitLabPolicyOptions | None = None
    webhooks: WebhookOptions | None = None
    credentials: CredentialOptions | None = None
    audit_db: Path | None = None  # default: <state_dir>/audit.sqlite3
    audit_retention: float = 30 * 86_400.0
    xds_tls: ServerTls | None = None  # mTLS on the xDS port; None: plain text
    xds_insecure: bool = False  # plain text explicitly allowed even when the policy pushes secrets
    admin_limits: HttpLimits = ADMIN_LIMITS  # connections and timeouts per HTTP listener (serving.py)
    webhook_limits: HttpLimits = WEBHOOK_LIMITS
    xds_max_connections: int | None = None  # None: unbounded here; `serve` derives it from the open-file limit
    policy_limits: ReadLimits = DEFAULT_LIMITS  # size bounds of the policy tree (directory or GitLab project)
    reload_timeout: float = DEFAULT_RELOAD_TIMEOUT  # a reload running longer makes the server not ready


# What `serve` keeps in its state directory (see controlplane/statefile.py); made private at every start.
STATE_FILES = ("lock", "signing-keys.json", "revoked-jobs.json", "pins.json", "exchange.sqlite3", "audit.sqlite3")


class ControlPlane:
    """The running control plane: policy service, xDS server, admin server and the policy watcher."""

    def __init__(self, options: ServeOptions) -> None:
        """Reads every state file; one that cannot be read raises `StateFileError` (see `serve`)."""
        self.options = options
        self._state_lock = lock_state_dir(options.state_dir)  # held for the process's life: one serve per dir
        secure_state_dir(options.state_dir, STATE_FILES)
        self.cache = SnapshotCache()
        self.registry = ProxyRegistry()
        self.policy_project = _policy_project(options.policy_gitlab)
        self.gitlab = GitLabLink(
            on_inventory_change=self._on_inventory_change,
            on_policy_push=self._policy_pushed,
            policy_project=self.policy_project,
            on_reachable=self._on_gitlab_reachable,
        )
        self.policy = PolicyService(
            _policy_source(options),
            self.cache,
            inventories=self.gitlab.inventories,
            pin_store=PinStore(options.state_dir / "pins.json"),
            reload_timeout=options.reload_timeout,
        )
        self.keys = KeyRelay(self.policy.set_keys, refresh_interval=options.jwks_refresh)
        self.credentials = (
            CredentialService(
                options.credentials,
                issuer_keys=lambda issuer: self.keys.keys.get(issuer),
                policy=lambda: self.policy.exchange_policy,
                on_change=lambda: self.policy.recompile("credentials changed"),
                job_status_reader=self.gitlab.job_status_reader,
            )
            if options.credentials
            else None
        )
        if self.credentials is not None:
            self.policy.credentials = self.credentials.inputs
        # Injected upstream credentials: a changed secret file recompiles, which changes only Secret resources.
        self.secrets = SecretsSource(lambda: self.policy.recompile("backend secret changed"))
        self.policy.secrets = self.secrets.for_policy
        self._secrets_loop: asyncio.Task[None] | None = None
        self.webhooks = (
            WebhookReceiver(
                secrets=secrets_from(options.webhooks.secret_env, options.webhooks.secret_file),
                on_event=self._on_webhook,
                limits=options.webhook_limits,
            )
            if options.webhooks
            else None
        )
        self.webhook_port = 0
        self.audit = AuditStore(
            options.audit_db or options.state_dir / "audit.sqlite3", retention=options.audit_retention
        )
        # A raw ID token from before a gap in webhook delivery, seen at a gateway: GitLab is asked about its job.
        self.als = AccessLogService(
            self.audit, on_job=self.credentials.gateway_checks if self.credentials is not None else None
        )
        self.recovery = _job_recovery(self.credentials, self.audit, self.gitlab)
        self._recovery_loop: asyncio.Task[None] | None = None
        self.xds = XdsServer(
            self.cache,
            self.registry,
            log=logging.getLogger("controlplane.xds"),
            extra_handlers=[self.als.handler()],
            max_connections=options.xds_max_connections,
        )
        self.als.senders = self.xds  # access logs are accepted only from gateways holding an ADS stream
        current_versions = cache_versions(self.cache)
        self.admin = AdminServer(
            status=self.status,
            fleet=lambda query: self.registry.fleet(query, current_versions),
            ready=lambda: self.policy.ready,
            not_ready_reason=self.policy.not_ready_reason,
            host=options.admin_host,
            port=options.admin_port,
            limits=options.admin_limits,
        )
        self.stopping = asyncio.Event()
        self._policy_push = asyncio.Event()  # set by a push webhook to the policy project
        self._transport_refusal: str | None = None
        self.policy.accept = self._transport_problem
        self.policy.prepare = lambda policy: self.gitlab.read_new_subjects(policy, self.policy.pins)
        self._credential_loop: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.collector = (
            CollectorSchedule(options.gc_interval, full_every=options.gc_full_every, idle_for=self.xds.idle_for)
            if options.gc_interval > 0
            else None
        )
        self._collector_loop: asyncio.Task[None] | None = None
        self.xds_port = 0
        self.admin_port = 0

    def status(self) -> dict[str, object]:
        """The status document without the fleet: the admin server adds proxies and summary per query."""
        return {
            "version": __version__,
            "policy": self.policy.status(),
            "jwks": self.keys.status(),
            "gitlab": self.gitlab.status(),
            "credentials": self.credentials.status() if self.credentials else None,
        }

    async def start(self) -> None:
        """Watch first, then load: an edit made while the first load runs is never missed."""
        watching = asyncio.Event()
        if self.options.policy_gitlab is None:
            watcher = watch_policy_dir(
                self.options.policy,
                self._on_policy_change,
                quiet=self.options.debounce,
                max_wait=self.options.max_wait,
                stop=self.stopping,
                ready=watching,
            )
        else:
            watcher = self._poll_policy_project(self.options.policy_gitlab.poll_seconds, watching)
        self._watcher = asyncio.create_task(watcher)
        self._watcher.add_done_callback(self._watcher_done)
        await asyncio.wait({self._watcher, asyncio.ensure_future(watching.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if self.credentials is not None:
            self.credentials.exchange.missed_hooks.gap_open()  # until the webhook listener is up: ask GitLab
            await self.credentials.start()  # keys exist (and are compiled in) before anything is served
            self._credential_loop = asyncio.create_task(self.credentials.run(self.stopping))
        await self.policy.reload_off_loop()
        self._secrets_loop = asyncio.create_task(self.secrets.run(self.stopping))
        await self._follow_issuers(wait=self.options.jwks_startup_wait)
        await self.gitlab.settled(self.options.gitlab_startup_wait)
        if self.recovery is not None:  # Job Hooks sent while we were down are lost: ask GitLab (recovery.py)
            self._recovery_loop = asyncio.create_task(self.recovery.run(self.stopping))
        if self.webhooks is not None and self.options.webhooks is not None:
            self.webhook_port = await self.webhooks.start(self.options.webhooks.host, self.options.webhooks.port)
            log.info("GitLab webhooks on http://%s:%d/webhooks/gitlab", self.options.webhooks.host, self.webhook_port)
        if self.credentials is not None:  # jobs minted before now are asked about once (credentials/exchange.py)
            self.credentials.exchange.missed_hooks.gap_ended()
        self._check_transport()
        self._log_transport()
        self.xds_port = await self.xds.start(self.options.xds_host, self.options.xds_port, tls=self.options.xds_tls)
        self.admin_port = await self.admin.start()
        if self.collector is not None:
            self.collector.start()
            self._collector_loop = asyncio.create_task(self.collector.run(self.stopping))
        log.info(
            "controlplane %s serving xDS on %s:%d, admin on http://%s:%d, policy %s",
            __version__,
            self.options.xds_host,
            self.xds_port,
            self.options.admin_host,
            self.admin_port,
            self.policy.source.description,
        )

    def _check_transport(self) -> None:
        """Secrets never go over plain text by accident: at start-up, a policy refused for that reason (see
        `_transport_problem`) stops `serve` with exit code 2 before the xDS port opens."""
        if self.policy.current is None and self._transport_refusal is not None:
            raise InsecureTransport(self._transport_refusal)

    def _transport_problem(self, policy: Policy) -> str | None:
        """The policy service's vetting hook: a policy that would push secrets over plain text is rejected like
        an invalid one (the last good policy stays in service), before anything is compiled or published."""
        try:
            check_transport(
                tls=self.options.xds_tls, insecure=self.options.xds_insecure, secrets=pushes_secrets(policy.backends)
            )
        except XdsTransportError as refused:
            self._transport_refusal = str(refused)
            return self._transport_refusal
        return None

    def _log_transport(self) -> None:
        """Plain text anywhere but loopback deserves a warning even without secrets: the config is not public."""
        options = self.options
        if options.xds_tls is not None:
            log.info("xDS requires mTLS: client certificates signed by %s", options.xds_tls.client_ca_file)
        elif not is_loopback(options.xds_host):
            log.warning(
                "xDS on %s is plain text: anyone who can reach it can read the proxies' configuration "
                "(see --xds-tls-cert)",
                options.xds_host,
            )

    async def run(self) -> None:
        await self.start()
        await self.stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        log.info("shutting down: draining xDS streams for up to %.1fs", self.options.shutdown_grace)
        self.stopping.set()
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._secrets_loop is not None:
            await asyncio.gather(self._secrets_loop, return_exceptions=True)
        await self.keys.stop()
        await self.gitlab.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self._recovery_loop is not None:  # a sweep may be waiting on GitLab's retries: no reason to wait
            self._recovery_loop.cancel()
            await asyncio.gather(self._recovery_loop, return_exceptions=True)
        if self.credentials is not None:
            await self.credentials.stop()
            if self._credential_loop is not None:
                await asyncio.gather(self._credential_loop, return_exceptions=True)
        await self.als.close()
        await self.xds.stop(self.options.shutdown_grace)
        if self.collector is not None:
            if self._collector_loop is not None:
                await asyncio.gather(self._collector_loop, return_exceptions=True)
            self.collector.stop()
        await asyncio.to_thread(self.audit.close)
        await self.admin.stop()
        if self._state_lock >= 0:
            os.close(self._state_lock)
            self._state_lock = -1
        log.info("stopped")

    def _watcher_done(self, task: asyncio.Task[None]) -> None:
        """A watcher that dies must not go unnoticed: the served policy would silently stop following edits."""
        if task.cancelled() or self.stopping.is_set():
            return
        error = task.exception()
        log.critical("policy watcher stopped (%s); shutting down so a supervisor restarts us", error)
        self.stopping.set()

    async def _on_policy_change(self, changed: set[str]) -> None:
        log.info("policy change: %s", ", ".join(sorted(changed)) or "(directory)")
        await self.policy.reload_off_loop()
        await self._follow_issuers()

    async def _follow_issuers(self, wait: float = 0.0) -> None:
        """Relay the keys and watch the GitLab inventories of the policy in service (a rejected change keeps
        the old ones)."""
        current = self.policy.current
        if current is not None:
            self.gitlab.follow(current, self.policy.pins)
            await self.keys.update(current.issuers, wait=wait)

    async def _on_webhook(self, event: GitLabEvent) -> None:
        await self.gitlab.on_event(event)
        if self.credentials is not None:
            await self.credentials.on_event(event)

    def _on_gitlab_reachable(self, issuer: str) -> None:
        if self.credentials is not None:
            self.credentials.exchange.missed_hooks.gap_ended(issuer)
        if self.recovery is not None:
            self.recovery.request(f"gitlab {issuer} reachable again")

    async def _on_inventory_change(self) -> None:
        await self.policy.recompile("GitLab inventory changed")
        # Paths resolved for the first time are now pinned to ids: watch those ids too, so a project renamed
        # (or a path taken over by another project) is still read by id.
        current = self.policy.current
        if current is not None:
            self.gitlab.follow(current, self.policy.pins)

    async def _reload_policy(self) -> None:
        if await self.policy.reload_off_loop():
            await self._follow_issuers()

    async def _policy_pushed(self) -> None:
        """A webhook only wakes the policy project's loop: the reload reads GitLab and may judge new subjects
        there, longer than a webhook delivery may wait for its answer. Pushes during a reload make one more."""
        self._policy_push.set()

    async def _poll_policy_project(self, every: float, ready: asyncio.Event) -> None:
        """The policy project's head is re-read on a push and now and then: a push webhook that never arrived
        is caught."""
        ready.set()
        while not self.stopping.is_set():
            pushed = asyncio.ensure_future(self._policy_push.wait())
            stopping = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({pushed, stopping}, timeout=every, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (pushed, stopping):
                waiter.cancel()
            if self.stopping.is_set():
                return
            self._policy_push.clear()
            await self._reload_policy()

    def request_stop(self) -> None:
        self.stopping.set()


def _job_recovery(credentials: CredentialService | None, audit: AuditStore, gitlab: GitLabLink) -> JobRecovery | None:
    """Revocation needs the credential service; jobs are looked for among its live credentials and the audit
    trail's recent requests, for as long as a finished job's raw ID token or credential could still be used."""
    if credentials is None:
        return None
    options = credentials.options
    return JobRecovery(
        live=credentials.store.jobs_with_credentials,
        seen=audit.recent_jobs,
        revoked=credentials.revocations.active,
        reader_for=gitlab.job_status_reader,
        revoke=credentials.revoke_finished,
        lookback=max(options.deny_id_tokens_for, options.max_credential_ttl),
        interval=options.job_sweep_interval,
    )


def _policy_project(options: GitLabPolicyOptions | None) -> PolicyProject | None:
    return (
        None
        if options is None
        else PolicyProject(int(options.project) if options.project.isdigit() else options.project)
    )


def _policy_source(options: ServeOptions) -> PolicySource:
    gitlab = options.policy_gitlab
    if gitlab is None:
        return DirectorySource(options.policy, options.policy_limits)
    client = GitLabSource(gitlab.url, token_from(gitlab.token_env, gitlab.token_file))
    project = int(gitlab.project) if gitlab.project.isdigit() else gitlab.project
    return GitLabPolicySource(PolicyRepo(client, project, options.policy_limits))


def _fit_listeners(options: ServeOptions, open_files: int) -> ServeOptions:
    """Every listener's connection bound within the open-file limit: the HTTP listeners lowered if need be to
    leave half the descriptors to xDS, and xDS given what they and a reserve leave (docs/http-listeners.md)."""
    listeners = {"admin": options.admin_limits.max_connections}
    if options.webhooks is not None:
        listeners["webhook"] = options.webhook_limits.max_connections
    if options.credentials is not None:
        listeners["exchange"] = options.credentials.http.max_connections
    fitted = fit_connection_budget(open_files, listeners)
    credentials = options.credentials
    if credentials is not None:
        credentials = replace(credentials, http=credentials.http.with_connections(fitted["exchange"]))
    webhooks = fitted.get("webhook", options.webhook_limits.max_connections)
    return replace(
        options,
        xds_max_connections=fit_xds_connections(open_files, fitted, options.xds_max_connections),
        admin_limits=options.admin_limits.with_connections(fitted["admin"]),
        webhook_limits=options.webhook_limits.with_connections(webhooks),
        credentials=credentials,
    )


async def serve(options: ServeOptions) -> int:
    try:
        plane = ControlPlane(_fit_listeners(options, raise_open_file_limit()))
    except (StateFileError, ExchangeStoreError) as unreadable:
        # Fail closed: never start with an empty deny list, keys, pins, use counts or finished jobs.
        log.critical("refusing to start: %s", unreadable)
        return 3
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plane.request_stop)
    try:
        await plane.run()
    except XdsTransportError as refused:
        log.critical("refusing to start: %s", refused)
        await plane.stop()
        return 2
    return 0
