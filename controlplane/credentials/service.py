"""Job-scoped credentials at run time: signing keys on a schedule, the exchange endpoint, revocations.

What the compiler is told (`inputs()`) changes when a key is published or retired and when a job's access
is revoked or ages out; each change triggers one recompile. The same object is returned until something
changes, so the compiler's memo stays warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.certfiles import WatchedBundle
from controlplane.compiler.jwt import CREDENTIAL_CLOCK_SKEW_SECONDS
from controlplane.credentials import metrics
from controlplane.credentials.coverage import MAX_SIGHTINGS, Sightings
from controlplane.credentials.exchange import (
    DEFAULT_MAX_SUBJECT_AGE,
    ExchangeBackend,
    ExchangePolicy,
    JobToVerify,
    TokenExchange,
)
from controlplane.credentials.exchange_store import ExchangeStore, ExchangeStoreError
from controlplane.credentials.gateway_checks import GatewayJobChecks
from controlplane.credentials.http import ExchangeEndpoint, ExchangeListenerTls
from controlplane.credentials.keys import KEYS_FILE, FileKeyStore, SigningKeys
from controlplane.credentials.keys_pg import SharedKeys
from controlplane.credentials.oidc import OidcEndpoint, OidcIssuer, RelyingPartyTokens, cache_seconds
from controlplane.credentials.recovery import DEFAULT_INTERVAL as DEFAULT_SWEEP_INTERVAL
from controlplane.credentials.recovery import JobRecovery, StatusReader
from controlplane.credentials.revocation_store import RevocationStore
from controlplane.credentials.revocations import REVOCATIONS_FILE, TERMINAL_JOB_STATUSES, Revocations
from controlplane.model.credentials import CredentialInputs, ExchangeTls
from controlplane.serving import EXCHANGE_LIMITS, LOOPBACK, HttpLimits
from controlplane.sources.gitlab_client import GitLabRefused, GitLabUnavailable
from controlplane.sources.gitlab_events import GitLabEvent, JobEvent
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.credentials")

MAX_CONCURRENT_JOB_CHECKS = 4
# The issuer's URL -> how to ask its GitLab for a job's status (blocking), None without `api:` (gitlab_link.py).
JobStatusReaders = Callable[[str], Callable[[str, str], "str | None"] | None]
# (job_id, since) -> whether the audit trail holds a request of that job since then (blocking: run in a thread).
AuditSeen = Callable[[str, float], bool]
# (timeout) -> True once every access-log record received before the call is written (blocking, AuditTrail.flush).
AuditFlush = Callable[[float], bool]
AUDIT_FLUSH_TIMEOUT = 5.0
AUDIT_SEEN_TIMEOUT = 2.0  # a Job Hook waits at most this for the audit trail's answer, then lists the job
MAX_PENDING_ASKS = 10_000  # seen jobs waiting to ask the ledger whether they finished (beyond: the next sighting)


DEFAULT_EXCHANGE_ADDRESS = (LOOPBACK, 9904)  # `--exchange-address` of serve and validate
EXCHANGE_CA_POLL = 2.0  # seconds between checks of the exchange's CA bundle file (a stat), with TLS on


def shared_publish_lead(rotate_every: float) -> float:
    """The lead for replicas sharing keys: a follower hears of a new key, recompiles and pushes it to all its
    Envoys before the leader's first credential signed with it can reach them, with room for a busy replica and a
    notification lost to a reconnect (docs/shared-state.md, "the follower rule"): 10 s, or a quarter of a
    rotation period shorter than 40 s, never under the single-replica 1 s."""
    return max(1.0, min(10.0, rotate_every / 4))


@dataclass(frozen=True)
class CredentialOptions:
    """The credential options with their one default; the command line reads its defaults here."""

    listen: tuple[str, int]  # the exchange endpoint (direct access)
    public: tuple[str, int]  # what gateways route the exchange path to
    state_dir: Path
    rotate_every: float = 86_400.0
    max_credential_ttl: float = 3_600.0
    publish_lead: float = 1.0  # a new key is in every Envoy's config this long before it signs (shared_publish_lead)
    # After a job ends, its raw ID tokens are denied for this long too (0: only exchanged credentials).
    # GitLab ID tokens live as long as the job timeout; set this to the longest timeout you allow.
    deny_id_tokens_for: float = 3 * 3_600.0
    http: HttpLimits = EXCHANGE_LIMITS  # connections and timeouts of the exchange listener
    tls: ExchangeListenerTls | None = None  # HTTPS on the exchange listener; None: plain text
    # The public https URL relying parties know this control plane by (credentials/oidc.py): discovery and JWKS
    # are served below its path on the exchange listener. None: not an OpenID Provider.
    issuer_url: str | None = None

    @property
    def finished_job_retention(self) -> float:
        """How long the exchange refuses a finished job, whatever the deny window: at least as long as any
        token the exchange still accepts (it refuses subject tokens older than this) and any credential."""
        return max(DEFAULT_MAX_SUBJECT_AGE, self.deny_id_tokens_for, self.max_credential_ttl)

    @property
    def recovery_lookback(self) -> float:
        """How far back the recovery sweep looks for jobs: as long as a finished job's raw ID token (denied for
        `deny_id_tokens_for`) or credential (`max_credential_ttl`) could still be used."""
        return max(self.deny_id_tokens_for, self.max_credential_ttl)

    # Seconds between sweeps asking GitLab about jobs whose Job Hook may have been missed (credentials/recovery.py).
    job_sweep_interval: float = DEFAULT_SWEEP_INTERVAL


class CredentialService:
    def __init__(
        self,
        options: CredentialOptions,
        *,
        issuer_keys: Callable[[str], str | None],
        policy: Callable[[], ExchangePolicy | None],
        on_change: Callable[[], Awaitable[object]],
        store: ExchangeStore,
        clock: Callable[[], float] = time.time,
        job_status_reader: JobStatusReaders | None = None,
        shared_keys: SharedKeys | None = None,
        revocation_store: RevocationStore | None = None,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        """`store` (replay counts, finished jobs) is opened and closed by the caller (cli/serve.py), and so are
        `shared_keys` (signing keys shared by replicas, keys_pg.py; None: the state directory's file) and
        `revocation_store` (None: the state directory's file). Key rotation and pruning the shared deny list are
        singleton duties: only while `is_leader()` (always, with the files)."""
        self.options = options
        self.job_status_reader = job_status_reader
        self.on_change = on_change
        self.clock = clock
        self.shared_keys = shared_keys
        self.is_leader = is_leader
        self.keys = (
            shared_keys.keys
            if shared_keys is not None
            else SigningKeys(
                FileKeyStore(options.state_dir / KEYS_FILE),
                rotate_every=options.rotate_every,
                max_credential_ttl=options.max_credential_ttl,
                publish_lead=options.publish_lead,
                clock=clock,
            )
        )
        self.store = store
        self.exchange = TokenExchange(
            keys=self.keys,
            issuer_keys=issuer_keys,
            policy=policy,
            clock=clock,
            replay=self.store,
            ledger=self.store,
            max_subject_age=options.finished_job_retention,
        )
        self.revocations = Revocations(
            revocation_store or options.state_dir / REVOCATIONS_FILE,
            clock=clock,
            is_leader=is_leader,
            settle_on_publication=True,
        )
        self.endpoint = ExchangeEndpoint(self.exchange, limits=options.http, verify=self.verify_job, tls=options.tls)
        self.oidc_issuer = OidcIssuer(options.issuer_url) if options.issuer_url is not None else None
        if self.oidc_issuer is not None:
            self.endpoint.oidc = OidcEndpoint(
                self.oidc_issuer, self.keys.published_jwks, max_age=cache_seconds(options.publish_lead)
            )
        # The CA bundle gateways verify the exchange with, pushed to them: a change recompiles (`run`).
        self._exchange_ca = WatchedBundle(options.tls.ca_file) if options.tls is not None else None
        self._checks: dict[str, asyncio.Task[str]] = {}  # one GitLab request per job, however many exchanges wait
        # Requests in threads at once: the client's rate bound paces them, the default pool must stay free for
        # the deny list's writes and the recovery sweep.
        self._check_slots = asyncio.Semaphore(MAX_CONCURRENT_JOB_CHECKS)
        self._unchecked = RateLimitedLog(log, burst=5, interval=300.0)
        self._check_failures = RateLimitedLog(log, burst=10, interval=60.0)  # one per job seen, after a start
        # Raw ID tokens a gateway let through, from before a gap in webhook delivery: `serve` passes this to the
        # audit receiver, which calls it for each such request (gateway_checks.py).
        self.gateway_checks = GatewayJobChecks(
            policy=policy,
            missed_hooks=self.exchange.missed_hooks,
            revoked=self.revocations.is_revoked,
            check=self.check_job,
            clock=clock,
        )
        # Which finished jobs to list (coverage.py): raw ID tokens seen here, finished jobs nothing listed yet.
        self.sightings = Sightings(keep_for=options.recovery_lookback, clock=clock)
        self._policy = policy
        self._audit_seen: AuditSeen | None = None
        self._audit_flush: AuditFlush | None = None
        self._sighting_tasks: set[asyncio.Task[Any]] = set()  # and revocations whose Job Hook gave up waiting
        self._judged: ExchangePolicy | None = None  # the policy `policy_changed` last re-judged jobs by
        self._asks: dict[str, None] = {}  # seen jobs waiting for the ledger question, in order
        self._asking = False
        self._inputs: CredentialInputs | None = None
        # The latest push of a deny list that lists more jobs, while it runs: a duplicate Job Hook waits for it.
        self._listing_push: asyncio.Future[object] | None = None
        self._wake = shared_keys.wake if shared_keys is not None else asyncio.Event()
        self.port = 0

    def inputs(self) -> CredentialInputs:
        fresh = CredentialInputs(
            jwks=self.keys.published_jwks(),
            exchange_address=self.options.public,
            exchange_tls=self._exchange_tls(),
            revoked=self.revocations.buckets(),
            revoked_recently=self.revocations.recent(),
        )
        if fresh != self._inputs:
            self._inputs = fresh
        return self._inputs

    def _exchange_ca_changed(self) -> bool:
        """Whether the exchange's CA bundle changed (to be pushed). One that does not vouch for the certificate
        the exchange serves is pushed all the same (the operator's bundle is what gateways trust, and they fail
        closed), but said loudly: every token exchange on a new connection fails until the two agree."""
        if self._exchange_ca is None or not self._exchange_ca.changed():
            return False
        refused = self.endpoint.ssl.refused_with(self._exchange_ca.pem) if self.endpoint.ssl is not None else None
        if refused is not None:
            log.error("the exchange's new CA bundle, pushed to gateways, does not vouch for the exchange: %s", refused)
        return True

    def _exchange_tls(self) -> ExchangeTls | None:
        if self.options.tls is None or self._exchange_ca is None:
            return None
        return ExchangeTls(server_name=self.options.tls.server_name, ca_pem=self._exchange_ca.pem)

    def job_recovery(
        self,
        *,
        seen: Callable[[float, int], list[tuple[str, str, str | None, float]]],
        reader_for: Callable[[str | None], StatusReader | None],
    ) -> JobRecovery:
        """The sweep that catches Job Hooks sent while nobody listened: it looks among this service's live
        credentials and the jobs `seen` recently (the audit trail), asks `reader_for` the job's GitLab, and
        revokes here."""
        return JobRecovery(
            live=self.store.jobs_with_credentials,
            seen=seen,
            revoked=self.revocations.active,
            reader_for=reader_for,
            revoke=self.revoke_finished,
            lookback=self.options.recovery_lookback,
            interval=self.options.job_sweep_interval,
        )

    def use_audit_trail(self, seen: AuditSeen, flush: AuditFlush) -> None:
        """Where jobs seen at any replica's gateways are recorded (`serve` passes the audit trail's reads): a
        finished job seen there is listed though this replica never saw it."""
        self._audit_seen = seen
        self._audit_flush = flush

    def job_seen(
        self, *, job_id: str, project_id: str | None, issuer: str, issued_at: float, expires_at: float | None
    ) -> None:
        """`JobSeen` for the access-log receiver: a gateway let a raw ID token of `job_id` through.

        Remembered (with the token's `exp` and the issuer's clock skew) for when the job finishes; and if it has
        finished already unlisted (the record reached us after the Job Hook), listed at once. The gap-in-webhooks
        check (`gateway_checks`) runs as before. Returns at once: the ledger is asked in a task."""
        policy = self._policy()
        found = None if policy is None else policy.issuer_by_url(issuer)
        skew = found.clock_skew if found is not None else 0.0
        self.sightings.saw(job_id, None if expires_at is None else expires_at + skew)
        self.gateway_checks(
            job_id=job_id, project_id=project_id, issuer=issuer, issued_at=issued_at, expires_at=expires_at
        )
        if self.revocations.is_revoked(job_id):
            return
        if self.sightings.take_finished(job_id):
            self._spawn(self._list_seen(job_id))
        elif self.sightings.first_ask(job_id):
            self._ask_ledger(job_id)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._sighting_tasks.add(task)
        task.add_done_callback(self._sighting_tasks.discard)

    def _ask_ledger(self, job: str) -> None:
        """Queue a seen job for the ledger question (did it finish on another replica?); one worker asks them in
        batches, so a burst of new jobs costs one audit flush and one thread, not one each. Bounded: a job over
        `MAX_PENDING_ASKS` is asked by its next sighting."""
        if len(self._asks) >= MAX_PENDING_ASKS:
            self.sightings.forget_ask(job)
            return
        self._asks[job] = None
        if not self._asking:
            self._asking = True
            self._spawn(self._ask_worker())

    async def _ask_worker(self) -> None:
        """Ask the ledger about the queued jobs after this replica's audit trail has written their sightings: a
        Job Hook on another replica writes the ledger before it reads the trail, so one of the two sees the
        other (docs/revocation-coverage.md)."""
        try:
            while self._asks:
                batch = list(self._asks)
                self._asks.clear()
                written = self._audit_flush is None or await asyncio.to_thread(self._audit_flush, AUDIT_FLUSH_TIMEOUT)
                for job in batch:
                    if not written:
                        self.sightings.forget_ask(job)  # not in the trail yet: its next sighting asks again
                    if self.revocations.is_revoked(job):
                        continue
                    try:
                        finished = await self.store.is_finished(job)
                    except ExchangeStoreError as error:
                        self.sightings.forget_ask(job)
                        log.error("%s: job %s seen at a gateway could not be checked against finished jobs", error, job)
                        continue
                    if finished:
                        await self._list_seen(job)
        finally:
            self._asking = False

    async def _list_seen(self, job: str) -> None:
        """List a job seen at a gateway after it finished unlisted (its access-log record came after the hook)."""
        try:
            if not self.revocations.is_revoked(job):
                log.warning("job %s seen at a gateway after it finished: revoked", job)
                metrics.count_finished_job("seen_after_finish")
                await self._list(job, "finished", await self._until_for_seen(job))
        except Exception:
            log.exception("listing job %s seen at a gateway failed", job)

    async def _until_for_seen(self, job: str) -> float:
        """How long a seen, finished job stays listed: the token's `exp` when known, else the deny window, and
        at least as long as its credentials."""
        held = await self._credentials_until(job)
        return max(held, self._raw_token_until(job, seen=True, covered=False))

    async def _credentials_until(self, job: str) -> float:
        """Until when Envoy accepts the job's credentials: the last one's `exp` plus the clock skew jwt_authn
        allows them (0: none). A deny entry ending at `exp` left at the next expiry quantum, and a credential
        expiring just before one passed again for up to that skew."""
        latest = await self.exchange.latest_expiry(job)
        return 0.0 if latest is None else latest + CREDENTIAL_CLOCK_SKEW_SECONDS

    def _raw_token_until(self, job: str, *, seen: bool, covered: bool) -> float:
        """Until when a finished job's raw ID tokens must be denied; 0 when none can pass or with a zero window
        (raw tokens are not denied at all). Seen: the seen token's `exp` (with the issuer's clock skew) when the
        access log carried it, else `--deny-id-tokens-for` from now. Covered: that window at least, since its
        other, unseen tokens could be used too."""
        window = self.options.deny_id_tokens_for
        if window <= 0 or not (seen or covered):
            return 0.0
        fallback = self.clock() + window
        sighting = self.sightings.seen(job) if seen else None
        if sighting is None or sighting.token_until is None:
            return fallback
        return max(sighting.token_until, fallback) if covered else sighting.token_until

    async def _seen_in_trail(self, job: str) -> bool:
        """A gateway of any replica let a raw ID token of the job through (the audit trail; this replica's own
        sightings, written or not, are in `sightings`)."""
        if self._audit_seen is None:
            return False
        since = self.clock() - self.options.recovery_lookback
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._audit_seen, job, since), AUDIT_SEEN_TIMEOUT)
        except Exception as error:  # cannot tell (in time): cover it (fail closed)
            log.error("the audit trail could not say whether job %s was seen (%s): listed", job, error)
            return True

    def job_hooks_may_be_lost(self) -> None:
        """Until `job_hooks_arrive` (the webhook listener is not up yet), any job may have ended unheard: the
        exchange asks GitLab about each (exchange.MissedHooks)."""
        self.exchange.missed_hooks.gap_open()

    def job_hooks_arrive(self, issuer: str | None = None) -> None:
        """Job Hooks are heard from now on (from `issuer`'s GitLab, None: every one): jobs whose tokens were
        minted before now are asked about once, later ones never."""
        self.exchange.missed_hooks.gap_ended(issuer)

    async def start(self) -> int:
        await self.revocations.open()  # before the first compile; unreadable: the start fails (fail closed)
        await self._rotate_keys()
        self.port = await self.endpoint.start(*self.options.listen)
        log.info(
            "token exchange on %s://%s:%d (gateways route it to %s:%d)",
            "http" if self.options.tls is None else "https",
            *self.options.listen[:1],
            self.port,
            *self.options.public,
        )
        return self.port

    async def stop(self) -> None:
        await self.gateway_checks.close()
        tasks = tuple(self._sighting_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.endpoint.stop()

    async def on_event(self, event: GitLabEvent) -> None:
        """A job reached a terminal status: no more exchanges for it, and its job_id denied until nothing it holds
        could be valid.

        Recording the end and reading how long the job's credentials live is one step of the ledger, which the
        exchange's own recording of a credential cannot interleave with (on any replica sharing the ledger): a
        credential is either counted here or never issued.
        """
        if not isinstance(event, JobEvent) or event.status not in TERMINAL_JOB_STATUSES:
            return
        # Shielded: the webhook listener cancels a callback that takes too long (its `callback_timeout`, when a
        # reload holds the compile lock or the ledger is slow) and answers 500. The revocation must still finish:
        # cancelled while the ledger records the end it listed nothing, and after its push it was not written to
        # the store, which is how other replicas learn of it.
        task = asyncio.ensure_future(self.revoke_finished(str(event.job_id), event.status, str(event.project_id)))
        self._sighting_tasks.add(task)
        task.add_done_callback(self._hook_done)
        await asyncio.shield(task)

    def _hook_done(self, task: asyncio.Task[bool]) -> None:
        """A revocation whose Job Hook gave up waiting: its failure is logged here, nobody else reads it."""
        self._sighting_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("revoking a finished job failed", exc_info=task.exception())

    async def revoke_finished(self, job: str, status: str, project_id: str | None = None) -> bool:
        """Deny a finished job (reported by a Job Hook, or found by the recovery sweep) if anything of it could
        still pass a gateway; True when newly denied.

        Listed (coverage.py, docs/revocation-coverage.md) until the latest of: its credentials' and exchanged
        subject tokens' expiry (the ledger); its raw ID tokens' expiry (`_raw_token_until`) when a gateway saw
        one or the policy covers the job (`ExchangePolicy.covers`, by `project_id`; None: unknown, covered). A job
        with none of these is not listed, and a sighting arriving later lists it (`job_seen`).

        Recording the end and reading how long the job's credentials live is one step of the ledger, which the
        exchange's own recording of a credential cannot interleave with (on any replica sharing the ledger): a
        credential is either counted here or never issued. After a restart the exchange's in-memory index is
        empty: the ledger's record is what makes the denial last as long as the job's credentials.
        """
        recorded: float | None = None
        unknown = False  # the ledger failed
        now = self.clock()
        try:
            recorded = await self.store.finish(
                job, now + self.options.finished_job_retention, project_id=project_id, finished_at=now
            )
        except ExchangeStoreError as error:
            log.error("%s: job %s finished but is not recorded; the deny list still applies", error, job)
            # What the job holds (another replica's credentials included) is unknown: deny it for as long as
            # any credential or raw token of it could live, as before coverage existed.
            unknown = True
            recorded = now + max(
                self.options.max_credential_ttl + CREDENTIAL_CLOCK_SKEW_SECONDS, self.options.deny_id_tokens_for
            )
        # Read after `finish`: every credential of the job is counted (any later one is refused).
        credentials = await self._credentials_until(job)
        # `recorded` includes the subject token's `exp`: a raw ID token, denied only with a deny window.
        raw_tokens_denied = self.options.deny_id_tokens_for > 0 or unknown
        held = max(recorded or 0.0, credentials) if raw_tokens_denied else credentials
        policy = self._policy()
        covered = policy is None or policy.covers(project_id)
        # Covered, the deny window applies anyway: only this replica's sightings (a later `exp`) are worth asking.
        # A failed ledger (`unknown`) already lists it for the whole window: PostgreSQL is likely away for the
        # trail too, and the Job Hook must not wait for it.
        seen = self.sightings.seen(job) is not None or (not covered and not unknown and await self._seen_in_trail(job))
        until = max(held, self._raw_token_until(job, seen=seen, covered=covered))
        if until <= self.clock():
            # Nothing of it can pass a gateway now; a later sighting (access log after the hook) lists it.
            self.sightings.finished_unlisted(job, self.clock() + self.options.recovery_lookback)
            log.info("job %s %s: nothing to deny (no credential, not seen, not covered)", job, status)
            metrics.count_finished_job("not_listed")
            return False
        metrics.count_finished_job("credentials" if held > self.clock() else "seen" if seen else "covered")
        return await self._list(job, status, until)

    def policy_changed(self) -> None:
        """A new policy is in service: a raw-token backend may now cover projects it did not, whose jobs finished
        unlisted before it (their ID tokens still valid). Re-judge the jobs the ledger recorded finished within the
        deny window (any replica's Job Hook, before a restart too) and list those of the projects now covered and
        not by the policy judged before, for the deny window from their end (one listed for less, its credentials
        only, is extended). Returns at once: the ledger is read in a task."""
        policy = self._policy()
        if policy is None or self.options.deny_id_tokens_for <= 0:
            return
        # Every compile (each revocation's too) builds a new ExchangePolicy, but its backend entries are kept while
        # unchanged (ExchangePolicy.build's memo): the same entries cover the same jobs, nothing to re-judge. The
        # first policy after a start has nothing to compare with: it may have widened while this replica was down.
        previous, self._judged = self._judged, policy
        if previous is not None and _same_backends(previous.backends, policy.backends):
            return
        self._spawn(self._list_newly_covered(policy, previous))

    async def _list_newly_covered(self, policy: ExchangePolicy, previous: ExchangePolicy | None) -> None:
        """The jobs ended within the deny window of the projects `policy` covers and `previous` did not (None:
        every covered project), listed until their end + the window. The ledger is asked for the projects first
        (a few hundred where tens of thousands of jobs ended), then for the jobs of those newly covered: at most
        `MAX_SIGHTINGS`, the latest ends. A ledger that cannot answer is logged: the next change judges all."""
        window = self.options.deny_id_tokens_for
        since = self.clock() - window
        try:
            projects = await self.store.finished_projects(since)
            newly = [p for p in projects if policy.covers(p) and (previous is None or not previous.covers(p))]
            ended = await self.store.finished_since(since, MAX_SIGHTINGS, newly) if newly else []
        except ExchangeStoreError as error:
            log.error("%s: finished jobs could not be re-judged against the new policy", error)
            self._judged = None
            return
        now = self.clock()
        changed = False
        for end in ended:
            until = end.finished_at + window
            if until <= now or not self.revocations.revoke(end.job_id, until):
                continue
            changed = True
            self.sightings.take_finished(end.job_id)  # listed: a sighting has nothing left to do
            log.warning("job %s finished unlisted and the new policy covers its project: revoked", end.job_id)
            metrics.count_finished_job("covered_by_policy_change")
        try:
            if changed:
                await self._push_listing()  # a duplicate Job Hook of one of them waits for it (`_list`)
            if not await self.revocations.persist():
                self._wake.set()
        except Exception:
            log.exception("listing the finished jobs a new policy covers failed")

    async def _list(self, job: str, status: str, until: float) -> bool:
        """List `job` until `until` and return once Envoy is told: a Job Hook's answer means "denied fleet-wide".

        A job listed already (a Job Hook delivered twice, a sighting racing the hook, another replica's revocation
        taken in) changes nothing, but the push of its listing may still be pending (waiting for its compile, or
        gathering others): answered before it ends, the duplicate would claim a denial no Envoy has yet. It waits
        for the latest push of a listing instead: pushes run one after another, each with every job listed before
        it started, so that one holds the job (it may hold later ones too; it is never an earlier push)."""
        revoked = self.revocations.revoke(job, until)
        if revoked:
            log.info("job %s %s: access revoked fleet-wide until %s", job, status, time.ctime(until))
            await self._push_listing()
        elif (pending := self._listing_push) is not None:
            await asyncio.shield(pending)
        # Written after the push (a file in a thread, or PostgreSQL, which tells the other replicas): the denial
        # reaches this replica's Envoys without waiting for the store, and a crash in between is caught by the
        # job recovery sweep at start (GitLab still says the job finished). A failed write waits in the outbox,
        # retried by `run`.
        if not await self.revocations.persist():
            self._wake.set()
        return revoked

    async def _push_listing(self) -> None:
        """Push a deny list that lists a job more, remembered until it ends so that a duplicate Job Hook can wait
        for it (`_list`); a caller's cancellation never cancels the push others wait for."""
        push: asyncio.Future[object] = asyncio.ensure_future(self._changed())
        self._listing_push = push

        def forget(done: asyncio.Future[object]) -> None:
            if self._listing_push is done:
                self._listing_push = None

        push.add_done_callback(forget)
        await asyncio.shield(push)

    async def revocations_changed(self, payload: str) -> None:
        """The change feed's subscriber (topic "revocations"): jobs another replica revoked are denied by this
        one's Envoys too (one recompile). A resync (`""`, after the feed reconnected) also writes the outbox at
        once: PostgreSQL is back."""
        if payload == "":
            await self.revocations.persist(now=True)
        if await self.revocations.refresh(payload):
            log.info("jobs revoked by another replica: denied here too")
            await self._push_listing()
        self._wake.set()  # the next expiry may be sooner

    async def verify_job(self, job: JobToVerify) -> bool:
        """Ask GitLab whether a job whose Job Hook may have been missed is still running; True: exchange again.

        Finished: revoked exactly as a Job Hook would (the exchange then refuses `job_finished`). Running:
        remembered until the next gap (unless one is still open), so its other exchanges do not ask again.
        Unknown to GitLab (404) or GitLab unreachable: False, and the exchange fails closed (503). Concurrent
        exchanges of one job share one request (with a check started at a gateway, too).
        """
        result = await self.check_job(job, via="exchange")
        metrics.count_job_check(result)
        if result == "no_gitlab":
            # Deliberately open (docs/state-and-recovery.md): nothing could ever vouch for these jobs, and closing
            # would cut off every running job of the issuer at each restart of the control plane.
            self._unchecked.log(
                logging.WARNING,
                "job %s of issuer %s may have finished while Job Hooks were missed, but the issuer has no GitLab "
                "API (api:) to ask: exchanged unchecked",
                job.job_id,
                job.issuer,
                key="unchecked",
            )
        if result == "finished":
            return await self._recorded_finished(job.job_id)  # exchanged again: the ledger refuses it
        return result in ("not_finished", "no_gitlab")

    async def check_job(self, job: JobToVerify, *, via: str = "gateway") -> str:
        """Ask GitLab about a job whose Job Hook may have been missed and act on it; the answer as a metric label.

        `finished`: revoked fleet-wide (`revoke_finished`). `not_finished`, and `no_gitlab` (the issuer has no
        API: nothing could be asked, so the job is not asked about again until the next gap): remembered as
        verified. `not_found`, `error`: nothing changes. One request per job at a time, whoever asks (`via`
        names the first asker in the log)."""
        running = self._checks.get(job.job_id)
        if running is None:
            running = asyncio.ensure_future(self._check(job, via))
            self._checks[job.job_id] = running
            running.add_done_callback(lambda _: self._checks.pop(job.job_id, None))
        return await asyncio.shield(running)

    async def _check(self, job: JobToVerify, via: str) -> str:
        reader = None if self.job_status_reader is None else self.job_status_reader(job.issuer_url)
        asked_at = self.clock()
        if reader is None:
            self.exchange.missed_hooks.verified(job.job_id, asked_at, job.until)
            return "no_gitlab"
        try:
            async with self._check_slots:
                status = await asyncio.to_thread(reader, job.project_id, job.job_id)
        except (GitLabRefused, GitLabUnavailable) as error:
            self._check_failures.log(
                logging.WARNING, "GitLab could not be asked about job %s (at %s): %s", job.job_id, via, error
            )
            return "error"
        if status is None:
            self._check_failures.log(
                logging.WARNING, "GitLab does not know job %s of project %s (at %s)", job.job_id, job.project_id, via
            )
            return "not_found"
        if status in TERMINAL_JOB_STATUSES:
            log.warning("job %s is %s in GitLab but no Job Hook said so: revoked (at %s)", job.job_id, status, via)
            await self.revoke_finished(job.job_id, status, job.project_id)
            return "finished"
        self.exchange.missed_hooks.verified(job.job_id, asked_at, job.until)
        return "not_finished"

    async def _recorded_finished(self, job: str) -> bool:
        """False (503) when the ledger could not record the end: the exchange again would not see it."""
        try:
            return await self.store.is_finished(job)
        except ExchangeStoreError:
            return False

    async def run(self, stop: asyncio.Event) -> None:
        """Rotate keys (or, on a follower of a shared store, follow the leader's rotation) and age out revocations
        exactly when due; woken early by a change notification of the shared keys."""
        while not stop.is_set():
            self._wake.clear()  # set from here on: something is due sooner, go round again at once
            changed = await self._rotate_keys()
            changed = self.revocations.prune() or changed
            changed = self._exchange_ca_changed() or changed
            if changed:
                await self._changed(wake=False)
            await self.revocations.persist()
            next_keys = self.shared_keys.next_step_at() if self.shared_keys else self.keys.next_change_at()
            due = [
                next_keys,
                self.revocations.next_expiry() or float("inf"),
                self.revocations.retry_at() or float("inf"),
            ]
            delay = max(0.05, min(due) - self.clock())
            poll = EXCHANGE_CA_POLL if self._exchange_ca is not None else 60.0
            await _first_of(stop, self._wake, timeout=min(delay, 60.0, poll))

    async def _changed(self, *, wake: bool = True) -> None:
        """`on_change`, after which every seal of the deny list made before it is in a published snapshot (a
        compile reads the inputs once it starts): only now do their ids start settling, however long the compile
        waited for its turn, so the push that empties the recent list is never the one that fills the buckets.
        `wake`: the run loop, for the settle it now has to make (it computes that itself after its own push)."""
        seals = self.revocations.seals()
        await self.on_change()
        if self.revocations.published(seals) and wake:
            self._wake.set()

    async def _rotate_keys(self) -> bool:
        """True when the published JWKS changed. With the file, rotated here (one replica: always the leader);
        shared, the leader writes the rotation and every replica adopts what the database holds."""
        if self.shared_keys is None:
            return self.keys.rotate_if_due() if self.is_leader() else False
        return await self.shared_keys.step(self.is_leader())

    def relying_party_tokens(self) -> RelyingPartyTokens:
        """The signer of tokens for cloud relying parties (`iss` the issuer URL); only with `issuer_url`."""
        if self.oidc_issuer is None:
            raise RuntimeError("the control plane is not an OpenID Provider: no issuer URL was given")
        return RelyingPartyTokens(self.oidc_issuer, self.keys, clock=self.clock)

    def status(self) -> dict[str, object]:
        return {
            "exchange": f"{self.options.listen[0]}:{self.port}",
            "signing_key_age_seconds": round(self.keys.signing_key_age(), 1),
            "published_keys": len(self.keys.keys),
            "published_kids": [k.kid for k in self.keys.keys],  # public thumbprints: replicas compare them
            "signing_keys": {"kind": "file"} if self.shared_keys is None else self.shared_keys.status(),
            "active_credentials": self.exchange.active_credentials(),
            "oidc_issuer": self.oidc_issuer.url if self.oidc_issuer is not None else None,
            "store": self.store.status(),
            **self.revocations.status(),
            # Which finished jobs are listed (docs/revocation-coverage.md): this replica's sightings.
            "coverage": {**self.sightings.status(), "pending_ledger_asks": len(self._asks)},
        }


def _same_backends(a: tuple[ExchangeBackend, ...], b: tuple[ExchangeBackend, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


async def _first_of(stop: asyncio.Event, wake: asyncio.Event, *, timeout: float) -> None:
    """Returns when `stop` or `wake` is set, or after `timeout`."""
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
