"""Which finished jobs go on the deny list, and until when (credentials/coverage.py, docs/revocation-coverage.md).

(a) a job that obtained a credential: until its credentials and the ID token it exchanged expire (the ledger);
(b) a job whose raw ID token a gateway let through: until that token's `exp` (with the issuer's clock skew), else
    `--deny-id-tokens-for`; seen here (in memory) or at another replica (the audit trail); a sighting after the
    Job Hook lists the job at once;
(c) a job a backend accepting raw ID tokens must cover (the default, as before): `--deny-id-tokens-for`, unless
    every such backend is `credentials: exchanged`, opted out (`revoke: seen-jobs`) or pins other projects.
A job with none of these is not listed. Driven through `CredentialService` with a fake clock and the fake GitLab.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.compiler.jwt import CREDENTIAL_CLOCK_SKEW_SECONDS
from controlplane.credentials.exchange import ExchangePolicy
from controlplane.credentials.exchange_store import DB_NAME, FinishedJob, SqliteExchangeStore
from controlplane.credentials.revocations import EXPIRY_QUANTUM
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.model.credentials import NO_REVOCATIONS
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.resolved.index import Resolution
from controlplane.sources.gitlab_events import JobEvent
from controlplane.sources.jwks import normalize_jwks
from controlplane.telemetry.metrics import REGISTRY
from tests.compiled import policy_of
from tests.support.clock import Clock
from tests.support.fake_gitlab import FakeGitLab
from tests.support.policy_parts import ACME_INVENTORY, TTL_10M, backend, binding, documents, issuer, role
from tests.support.ports import eventually

HOUR = 3600.0
DENY = 3 * HOUR


@pytest.fixture(scope="module")
def gitlab() -> Iterator[FakeGitLab]:
    with FakeGitLab(default_audience="https://reports.local") as fake:
        yield fake


@pytest.fixture
def clock() -> Clock:
    return Clock(float(int(time.time())))


def policy(
    fake: FakeGitLab, *, reports: str = "", deploy: str = "", deploy_subject: str = "{project: 42}"
) -> ExchangePolicy:
    """reports-api (granted to project 42's jobs) and deploy-api (granted to `deploy_subject`); `reports` and
    `deploy` are extra Backend keys (`credentials: exchanged`, `revoke: seen-jobs`)."""
    model = policy_of(
        issuer=issuer(fake.issuer, extra="inventory: inventory.yaml"),
        inventory=ACME_INVENTORY,
        backends=documents(
            backend("reports-api", 8081, extra=reports),
            backend("deploy-api", 8082, extra=deploy),
            role("reports-read", "reports-api", ["GET"]),
            role("deploy-trigger", "deploy-api", ["POST"]),
        ),
        bindings=documents(
            binding("readers", ["reports-read"], "{project: acme/platform/deployer}", extra=TTL_10M),
            binding("deployers", ["deploy-trigger"], deploy_subject, extra=TTL_10M),
        ),
    )
    return ExchangePolicy.build(model, Resolution().update(model))


EXCHANGED = {"reports": "credentials: exchanged", "deploy": "credentials: exchanged"}


class Node:
    """One replica's credential service; two Nodes on one state directory share the ledger (a SQLite file)."""

    def __init__(self, fake: FakeGitLab, state: Path, clock: Clock, chosen: ExchangePolicy, deny: float = DENY) -> None:
        self.fake, self.clock, self.policy = fake, clock, chosen
        self.audit: set[str] = set()  # the shared audit trail's jobs, as another replica wrote them
        relayed = normalize_jwks(json.dumps(fake.jwks()))[0].canonical
        self.store = SqliteExchangeStore(state / DB_NAME, clock=clock)

        async def changed() -> None:
            pass

        options = CredentialOptions(
            listen=("127.0.0.1", 0), public=("127.0.0.1", 0), state_dir=state, deny_id_tokens_for=deny
        )
        self.service = CredentialService(
            options,
            store=self.store,
            issuer_keys=lambda name: relayed if name == "gitlab" else None,
            policy=lambda: self.policy,
            on_change=changed,
            clock=clock,
        )
        self.service.keys.rotate_if_due()
        self.service.use_audit_trail(lambda job, since: job in self.audit, lambda timeout: True)

    @property
    def skew(self) -> float:
        return self.policy.issuers[0].clock_skew

    async def finished(self, job: int, project: int = 42) -> None:
        event = JobEvent(project_id=project, job_id=job, pipeline_id=900, status="success", ref="main")
        await self.service.on_event(event)

    async def exchanged(self, job: int) -> None:
        """The job (of project 42) exchanges its ID token, issued now and valid 3000 s, for a deploy-api credential."""
        token = self.fake.mint(
            job_id=job,
            project_id=42,
            project_path="acme/platform/deployer",
            namespace_id=11,
            iat=int(self.clock.now),
            ttl=3000,
            aud="https://deploy.local",
        )
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": "deploy-api",
        }
        granted = await self.service.exchange.exchange(form)
        assert granted.status == 200, granted.body

    def seen(self, job: int, exp: float | None, project: int = 42) -> None:
        self.service.job_seen(
            job_id=str(job), project_id=str(project), issuer=self.fake.issuer, issued_at=self.clock.now, expires_at=exp
        )

    async def settled(self) -> None:
        """Until the tasks sightings started are done (each a few awaits on the loop, no I/O but SQLite)."""
        deadline = time.monotonic() + 5
        while self.service._sighting_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not self.service._sighting_tasks

    def listed(self) -> dict[str, float]:
        return {job: self.service.revocations._until[job] for job in self.service.revocations.active()}

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def node(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> Iterator[Node]:
    made = Node(gitlab, tmp_path, clock, policy(gitlab, **EXCHANGED))
    yield made
    made.close()


# --- (c) policy coverage ---------------------------------------------------------------------------------------


def test_a_backend_accepting_raw_id_tokens_covers_every_finished_job_by_default(gitlab: FakeGitLab) -> None:
    assert policy(gitlab).covers("42") and policy(gitlab).covers(None)
    # grants pinned to project 42 on both: a job of project 43 provably reaches neither
    assert not policy(gitlab).covers("43")


def test_a_grant_that_does_not_pin_the_project_covers_every_project(gitlab: FakeGitLab) -> None:
    chosen = policy(gitlab, deploy_subject="{group: acme/platform, ref: main}")
    assert chosen.covers("43") and chosen.covers("999")


def test_exchanged_or_opted_out_backends_cover_no_unseen_job(gitlab: FakeGitLab) -> None:
    assert not policy(gitlab, **EXCHANGED).covers(None)
    opted = policy(gitlab, reports="revoke: seen-jobs", deploy="credentials: exchanged")
    assert not opted.covers(None)
    assert policy(gitlab, reports="revoke: seen-jobs").covers("42")  # deploy-api still covers


def test_the_revoke_option_is_checked_with_file_line_and_field() -> None:
    base = {
        "issuer.yaml": "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com\n",
        "role.yaml": "kind: Role\nname: read\nbackend: api\nrules: [{methods: [GET]}]\n",
    }
    head = "kind: Backend\nname: api\nhosts: [api.example.com]\nendpoints: [{address: a, port: 8}]\n"
    parsed = parse_policy({**base, "backend.yaml": head + "revoke: seen-jobs\n"})
    assert parsed.backends[0].revoke == "seen-jobs" and not parsed.backends[0].covers_unseen_jobs
    assert parse_policy({**base, "backend.yaml": head}).backends[0].covers_unseen_jobs
    with pytest.raises(PolicyInvalid) as wrong:
        parse_policy({**base, "backend.yaml": head + "revoke: never\n"})
    ((error,),) = [wrong.value.errors]
    assert (error.file, error.line, error.field) == ("backend.yaml", 5, "revoke") and "seen-jobs" in error.message
    with pytest.raises(PolicyInvalid) as useless:
        parse_policy({**base, "backend.yaml": head + "credentials: exchanged\nrevoke: seen-jobs\n"})
    ((error,),) = [useless.value.errors]
    assert (error.line, error.field) == (6, "revoke") and "credentials: any" in error.message


async def test_with_a_covering_backend_a_never_seen_job_is_listed_for_the_deny_window(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    node = Node(gitlab, tmp_path, clock, policy(gitlab))
    try:
        await node.finished(5001)
        assert node.listed() == {"5001": clock.now + DENY}  # as before coverage existed
        await node.finished(5002, project=43)  # no raw-token backend admits project 43
        assert "5002" not in node.listed()
    finally:
        node.close()


@pytest.mark.parametrize("restarted", [False, True], ids=["same-process", "restarted"])
async def test_a_policy_change_that_covers_a_finished_unlisted_job_lists_it(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock, restarted: bool
) -> None:
    """A job not covered when it finished (no raw-token backend admitted its project) is listed when a new policy
    covers its project, for the deny window from its end: its ID tokens are still valid, and the backend's
    `finished-jobs` default promises no window. Before, nothing re-judged it: its tokens passed until a sighting
    listed it; and a replica restarted since the job ended (or another one) had forgotten it, so its tokens passed
    on. The ledger's record of the end (project, time) is what is re-judged, so a restart changes nothing."""
    node = Node(gitlab, tmp_path, clock, policy(gitlab))
    try:
        await node.finished(5002, project=43)  # ended longer ago than the deny window: its tokens have expired
        clock.now += DENY + 1
        ended = clock.now
        await node.finished(5003, project=43)  # no raw-token backend admits project 43: not listed
        assert not node.listed()
        if restarted:
            node.close()
            node = Node(gitlab, tmp_path, clock, policy(gitlab))
            node.service.policy_changed()  # the first policy after the start: judged, nothing newly covered
            await node.settled()
            assert not node.listed()
        clock.now += 600
        # A commit grants project 43's jobs the raw-token deploy-api: 5003's ID token (valid for hours) passes now.
        node.policy = policy(gitlab, deploy_subject="{project: 43}")
        assert node.policy.covers("43")
        node.service.policy_changed()  # what the policy service calls when it publishes a new policy
        await node.settled()
        assert node.listed() == {"5003": ended + DENY}
        node.service.policy_changed()  # the same backend entries again (a revocation's recompile): no ledger read
        assert not node.service._sighting_tasks
        asked: list[object] = []
        finished_since = node.store.finished_since

        async def spied(since: float, limit: int, projects: Collection[str | None]) -> list[FinishedJob]:
            asked.append(sorted(projects, key=str))
            return await finished_since(since, limit, projects)

        node.store.finished_since = spied  # type: ignore[method-assign]
        node.policy = policy(gitlab, deploy_subject="{project: 44}")
        node.service.policy_changed()  # narrowed again: what is listed stays listed
        await node.settled()
        assert node.listed() == {"5003": ended + DENY}
        assert not asked  # no job of a newly covered project (44) ended: no job read
        node.policy = policy(gitlab, deploy_subject="{group: acme}")  # covers every project: only 43 is new
        node.service.policy_changed()
        await node.settled()
        assert asked == [["43"]] and node.listed() == {"5003": ended + DENY}
    finally:
        node.close()


async def test_a_job_hook_cut_short_by_its_timeout_still_lists_the_job(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook listener gives `on_event` 5 s (`callback_timeout`) and then cancels it (answering 500). A
    revocation cancelled while the ledger records the end listed nothing (the job's tokens passed until the
    recovery sweep); cancelled while its push waited (a reload holding the compile lock), it was never written to
    the store, so other replicas did not deny it until this one's next housekeeping round (up to a minute)."""
    node = Node(gitlab, tmp_path, clock, policy(gitlab))  # covers project 42's finished jobs
    try:
        release = asyncio.Event()
        finish = node.store.finish

        async def slow_finish(job_id: str, keep_until: float, **recorded: Any) -> float | None:
            await release.wait()
            return await finish(job_id, keep_until, **recorded)

        monkeypatch.setattr(node.store, "finish", slow_finish)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(node.finished(5004), 0.05)
        release.set()
        await eventually(lambda: "5004" in node.listed(), "the job listed after its hook timed out")
        await eventually(lambda: not node.service.revocations._outbox, "the entry written to the store")

        pushed = asyncio.Event()

        async def slow_push() -> None:
            await pushed.wait()

        node.service.on_change = slow_push
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(node.finished(5005), 0.05)
        assert "5005" in node.listed()  # enforced here at once, its push pending
        pushed.set()
        await eventually(lambda: not node.service.revocations._outbox, "the entry written to the store after its push")
    finally:
        node.close()


async def test_a_duplicate_job_hook_is_answered_only_once_the_first_ones_push_has_ended(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Job Hook's answer means "denied fleet-wide". GitLab delivering the same hook again while the first one's
    push is still pending (its compile waiting for the lock, or gathering others) finds the job listed already
    (`revoke` changes nothing): it was answered at once, before any Envoy denied the job. It now waits for that
    same push, and a duplicate after the push is answered at once, with no push of its own."""
    node = Node(gitlab, tmp_path, clock, policy(gitlab))  # covers project 42's finished jobs (the same `until`)
    try:
        released, events, found, _ = gated_pushes(node, monkeypatch)

        async def hook(name: str) -> None:
            await node.finished(5301)
            events.append(f"{name} answered")

        first = asyncio.ensure_future(hook("first"))
        await eventually(lambda: "push started" in events, "the first hook's push started")
        duplicate = asyncio.ensure_future(hook("duplicate"))
        await eventually(lambda: len(found) == 2, "the duplicate found the job listed")
        assert found == [True, False]
        for _ in range(50):  # what is left of an answer is loop steps without I/O: let them all run
            await asyncio.sleep(0)
        assert not duplicate.done() and events == ["push started"]
        released.set()
        await asyncio.gather(first, duplicate)
        assert events[:2] == ["push started", "push ended"] and sorted(events[2:]) == [
            "duplicate answered",
            "first answered",
        ]
        await hook("late")  # after the push: answered at once, nothing pushed again
        assert events.count("push started") == 1 and events[-1] == "late answered"
        assert node.service._listing_push is None
    finally:
        node.close()


async def test_a_job_hook_for_a_job_another_replica_listed_waits_for_the_push_taking_it_in(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a job another replica listed first: taken in here (the change feed), its push to this
    replica's Envoys pending, the hook arriving here finds it listed and must not be answered before that push."""
    node = Node(gitlab, tmp_path, clock, policy(gitlab))
    try:
        released, events, found, revoke = gated_pushes(node, monkeypatch)

        async def taken_in(payload: str) -> bool:  # what another replica wrote: the job, for the deny window
            return revoke("5311", clock.now + DENY)

        monkeypatch.setattr(node.service.revocations, "refresh", taken_in)
        feed = asyncio.ensure_future(node.service.revocations_changed("5311"))
        await eventually(lambda: "push started" in events, "the push taking the job in started")
        hook = asyncio.ensure_future(node.finished(5311))
        await eventually(lambda: found, "the hook found the job listed")
        assert found == [False]
        for _ in range(50):  # what is left of an answer is loop steps without I/O: let them all run
            await asyncio.sleep(0)
        assert not hook.done() and events == ["push started"]
        released.set()
        await asyncio.gather(feed, hook)
        assert events == ["push started", "push ended"]
    finally:
        node.close()


def gated_pushes(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, list[str], list[bool], Callable[[str, float], bool]]:
    """The node's pushes wait for the event returned (each logged in `events`), the store is always written (no
    thread: once listed, an answer is a few loop steps away), and each `revoke` says in `found` whether it listed
    the job; the real `revoke` is returned for what another replica would write."""
    released = asyncio.Event()
    events: list[str] = []
    found: list[bool] = []
    revoke = node.service.revocations.revoke

    async def gated_push() -> None:
        events.append("push started")
        await released.wait()
        events.append("push ended")

    async def persisted(*, now: bool = False) -> bool:
        return True

    def counted_revoke(job_id: str, until: float) -> bool:
        found.append(revoke(job_id, until))
        return found[-1]

    node.service.on_change = gated_push
    monkeypatch.setattr(node.service.revocations, "persist", persisted)
    monkeypatch.setattr(node.service.revocations, "revoke", counted_revoke)
    return released, events, found, revoke


# --- nothing of it can pass: not listed ------------------------------------------------------------------------


def finished_jobs(reason: str) -> float:
    return REGISTRY.get_sample_value("controlplane_finished_jobs_total", {"reason": reason}) or 0.0


async def test_an_exchanged_only_policy_does_not_list_a_job_that_never_touched_a_gateway(node: Node) -> None:
    unlisted = finished_jobs("not_listed")
    await node.finished(5101)
    assert node.listed() == {}
    assert finished_jobs("not_listed") == unlisted + 1
    assert await node.store.is_finished("5101")  # the exchange still refuses it


async def test_an_opted_out_raw_backend_does_not_list_an_unseen_job(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    opted = Node(gitlab, tmp_path, clock, policy(gitlab, reports="revoke: seen-jobs", deploy="revoke: seen-jobs"))
    try:
        await opted.finished(5102)
        assert opted.listed() == {}
    finally:
        opted.close()


# --- (a) credentials -------------------------------------------------------------------------------------------


async def test_a_job_that_exchanged_is_listed_until_its_credential_and_id_token_expired(
    node: Node, clock: Clock
) -> None:
    await node.exchanged(5201)
    await node.finished(5201)
    # the credential lives 10 minutes, the ID token 3000 s (+ skew): the later one bounds the entry
    assert node.listed() == {"5201": int(clock.now) + 3000 + node.skew}


async def test_with_no_deny_window_a_job_is_listed_for_its_credentials_only(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    node = Node(gitlab, tmp_path, clock, policy(gitlab), deny=0.0)
    try:
        node.seen(5202, clock.now + 3000)
        await node.finished(5202)
        assert node.listed() == {}  # raw ID tokens are not denied at all with --deny-id-tokens-for 0
    finally:
        node.close()


async def test_a_credential_stays_denied_while_envoy_still_accepts_it_past_its_exp(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """Envoy accepts our credentials CREDENTIAL_CLOCK_SKEW_SECONDS past their `exp` (jwt_authn's clock skew): the
    entry must last as long. Ending at `exp`, it left at the first expiry quantum after it, and a credential
    expiring just before one passed again for up to that skew."""
    clock.now = EXPIRY_QUANTUM * math.ceil(clock.now / EXPIRY_QUANTUM) + 10 * EXPIRY_QUANTUM - 600 - 1
    node = Node(gitlab, tmp_path, clock, policy(gitlab), deny=0.0)
    try:
        await node.exchanged(5203)
        ((_, exp),) = node.service.exchange.credentials_of("5203")
        assert exp % EXPIRY_QUANTUM == EXPIRY_QUANTUM - 1  # a quantum boundary 1 s after it
        await node.finished(5203)
        assert node.listed() == {"5203": exp + CREDENTIAL_CLOCK_SKEW_SECONDS}
        clock.now = exp + CREDENTIAL_CLOCK_SKEW_SECONDS - 1  # past the boundary; Envoy still accepts it
        node.service.revocations.prune()
        assert node.service.revocations.buckets() != NO_REVOCATIONS
    finally:
        node.close()


# --- (b) seen at a gateway -------------------------------------------------------------------------------------


async def test_a_seen_job_is_listed_until_its_tokens_exp(node: Node, clock: Clock) -> None:
    node.seen(5301, clock.now + 1200)
    node.seen(5301, clock.now + 900)  # an earlier token never shortens it
    node.seen(5302, None)  # an entry without `exp`: the deny window
    await node.settled()
    assert node.listed() == {}  # running: nothing listed
    await node.finished(5301)
    await node.finished(5302)
    assert node.listed() == {"5301": clock.now + 1200 + node.skew, "5302": clock.now + DENY}


async def test_a_covered_job_is_listed_for_the_deny_window_even_if_its_seen_token_expires_sooner(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """Its other ID tokens (other audiences) were never seen, and a covering backend could admit them."""
    covering = Node(gitlab, tmp_path, clock, policy(gitlab))
    try:
        covering.seen(5305, clock.now + 600)
        covering.seen(5306, clock.now + DENY + 600)  # a token outliving the window: its exp
        await covering.finished(5305)
        await covering.finished(5306)
        assert covering.listed() == {"5305": clock.now + DENY, "5306": clock.now + DENY + 600 + covering.skew}
    finally:
        covering.close()


async def test_a_job_seen_at_another_replica_is_listed_from_the_audit_trail(node: Node, clock: Clock) -> None:
    node.audit.add("5303")
    await node.finished(5303)
    assert node.listed() == {"5303": clock.now + DENY}


async def test_an_unreadable_audit_trail_lists_the_job(node: Node, clock: Clock) -> None:
    def broken(job: str, since: float) -> bool:
        raise OSError("disk gone")

    node.service.use_audit_trail(broken, lambda timeout: True)
    await node.finished(5304)
    assert "5304" in node.listed()


async def test_a_sighting_after_the_job_hook_lists_it_at_once(node: Node, clock: Clock) -> None:
    late = finished_jobs("seen_after_finish")
    await node.finished(5401)
    assert node.listed() == {}
    node.seen(5401, clock.now + 600)
    await node.settled()
    assert node.listed() == {"5401": clock.now + 600 + node.skew}
    assert finished_jobs("seen_after_finish") == late + 1


async def test_a_sighting_on_another_replica_after_the_hook_asks_the_shared_ledger(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock, node: Node
) -> None:
    other = Node(gitlab, tmp_path, clock, node.policy)  # same state directory: the same ledger
    try:
        other.seen(5402, clock.now + 500)  # running: asked once, not finished
        await other.settled()
        await node.finished(5402)
        assert node.listed() == {}  # the hook's replica has no record of it (this test's audit trail is empty)
        other.seen(5402, clock.now + 500)  # asked once already: a later hook finds it in the audit trail instead
        await other.settled()
        assert other.listed() == {}
        other.service.sightings.forget_ask("5402")
        other.seen(5402, clock.now + 500)
        await other.settled()
        assert other.listed() == {"5402": clock.now + 500 + other.skew}
    finally:
        other.close()


async def test_the_sighting_asks_the_ledger_only_after_its_record_is_written(node: Node, clock: Clock) -> None:
    """Write-then-read on both sides: a hook on another replica writes the ledger, then reads the trail; a
    sighting is written to the trail, then reads the ledger. An unwritten record is asked about again."""
    order: list[str] = []

    def flush(timeout: float) -> bool:
        order.append("flush")
        return False  # not written (PostgreSQL away): the next sighting asks again

    node.service.use_audit_trail(lambda job, since: False, flush)
    node.seen(5403, clock.now + 100)
    await node.settled()
    node.seen(5403, clock.now + 100)
    await node.settled()
    assert order == ["flush", "flush"]


def test_sightings_are_bounded_and_forget_old_ones(clock: Clock) -> None:
    from controlplane.credentials.coverage import Sightings

    seen = Sightings(keep_for=100, clock=clock, capacity=2)
    assert seen.saw("1", None) and not seen.saw("1", clock.now + 50)
    seen.saw("2", None)
    seen.saw("3", None)
    assert seen.seen("1") is None and seen.seen("3") is not None  # the oldest went first
    clock.now += 101
    assert seen.seen("2") is None  # no exp known, older than keep_for
    seen.saw("4", clock.now + 500)
    clock.now += 200
    assert seen.seen("4") is not None  # its token still lives
    seen.finished_unlisted("9", clock.now + 10)
    assert seen.take_finished("9") and not seen.take_finished("9")


async def test_a_burst_of_new_jobs_costs_one_audit_flush(node: Node, clock: Clock) -> None:
    """Seen jobs queue for the ledger question; one worker flushes the trail once per batch, then asks each."""
    flushes: list[float] = []

    def flush(timeout: float) -> bool:
        flushes.append(timeout)
        return True

    node.service.use_audit_trail(lambda job, since: False, flush)
    await node.finished(5501)  # finished on "another replica" (the shared ledger), unlisted: never seen there
    node.service.sightings = type(node.service.sightings)(keep_for=DENY, clock=clock)  # this replica knows nothing
    for job in range(5500, 5510):
        node.seen(job, clock.now + 100)
    await node.settled()
    assert len(flushes) == 1
    assert node.listed() == {"5501": clock.now + 100 + node.skew}


async def test_an_audit_trail_that_does_not_answer_in_time_lists_the_job(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Job Hook must not hang on PostgreSQL: past AUDIT_SEEN_TIMEOUT the job is listed (fail closed)."""
    from controlplane.credentials import service

    monkeypatch.setattr(service, "AUDIT_SEEN_TIMEOUT", 0.05)
    release = threading.Event()

    def hanging(job: str, since: float) -> bool:
        release.wait(5)
        return False

    node.service.use_audit_trail(hanging, lambda timeout: True)
    try:
        started = time.monotonic()
        await node.finished(5601)
        assert "5601" in node.listed() and time.monotonic() - started < 1
    finally:
        release.set()
