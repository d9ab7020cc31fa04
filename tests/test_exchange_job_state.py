"""What the token exchange must remember across webhooks and restarts: which jobs have finished, how often each
subject token was exchanged, and until when each job holds credentials.

Driven through `CredentialService`, as `serve` wires it (a state directory, a job webhook), with a fake clock
starting at real time (the fake GitLab mints tokens with real `iat`s). A "restart" is a second service over the
same state directory: nothing but the files carries over.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.compiler.jwt import CREDENTIAL_CLOCK_SKEW_SECONDS
from controlplane.credentials.exchange import ExchangePolicy, ExchangeResult, MissedHooks
from controlplane.credentials.exchange_store import DB_NAME, ExchangeStore, LiveJob, SqliteExchangeStore
from controlplane.credentials.exchange_store_pg import PostgresExchangeStore
from controlplane.credentials.revocations import EXPIRY_QUANTUM
from controlplane.credentials.service import CredentialOptions, CredentialService, JobStatusReaders
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_events import JobEvent
from controlplane.sources.jwks import normalize_jwks
from controlplane.store.dsn import StoreDsn
from controlplane.store.pool import PoolSettings, StorePool
from controlplane.telemetry.metrics import REGISTRY
from tests.support.clock import Clock
from tests.support.exchange_policy import exchange_policy
from tests.support.fake_gitlab import FakeGitLab
from tests.support.postgres import Gate, running_server

HOUR = 3600.0


@pytest.fixture(scope="module")
def gitlab() -> Iterator[FakeGitLab]:
    with FakeGitLab(default_audience="https://reports.local") as fake:
        yield fake


class Node:
    """One control plane's credential service over a state directory (two Nodes on one directory: a restart)."""

    def __init__(
        self,
        fake: FakeGitLab,
        state: Path,
        clock: Clock,
        *,
        deny_id_tokens_for: float = 0.0,
        job_status_reader: JobStatusReaders | None = None,
        store: ExchangeStore | None = None,
    ) -> None:
        self.fake = fake
        self.clock = clock
        self.changes = 0
        relayed = normalize_jwks(json.dumps(fake.jwks()))[0].canonical
        policy: ExchangePolicy = exchange_policy(fake)

        async def changed() -> None:
            self.changes += 1

        options = CredentialOptions(
            listen=("127.0.0.1", 0),
            public=("127.0.0.1", 0),
            state_dir=state,
            deny_id_tokens_for=deny_id_tokens_for,
        )
        self.sqlite: SqliteExchangeStore | None = None
        if store is None:
            store = self.sqlite = SqliteExchangeStore(state / DB_NAME, clock=clock)
        self.store = store
        self.service = CredentialService(
            options,
            store=self.store,
            issuer_keys=lambda name: relayed if name == "gitlab" else None,
            policy=lambda: policy,
            on_change=changed,
            clock=clock,
            job_status_reader=job_status_reader,
        )
        self.service.keys.rotate_if_due()

    def mint(self, job_id: int, **claims: Any) -> str:
        defaults: dict[str, Any] = {
            "project_id": 42,
            "project_path": "acme/platform/deployer",
            "namespace_id": 11,
            "iat": int(self.clock.now),
            "ttl": 3000,
        }
        return self.fake.mint(job_id=job_id, **{**defaults, **claims})

    async def exchange(self, token: str) -> ExchangeResult:
        return await self.service.exchange.exchange(form_for(token))

    async def exchange_checked(self, token: str) -> ExchangeResult:
        """As the HTTP endpoint does: GitLab is asked about the job first when the exchange says so."""
        return await self.service.endpoint.exchange_checked(form_for(token))

    async def finished(self, job_id: int, status: str = "success") -> None:
        event = JobEvent(project_id=42, job_id=job_id, pipeline_id=900, status=status, ref="main")
        await self.service.on_event(event)

    def close(self) -> None:
        if self.sqlite is not None:
            self.sqlite.close()


def form_for(token: str) -> dict[str, str]:
    return {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": "reports-api",
    }


@pytest.fixture
def clock() -> Clock:
    return Clock(float(int(time.time())))


def refused_because_finished(result: ExchangeResult) -> bool:
    return result.status == 400 and result.body["error"] == "invalid_grant" and result.result == "job_finished"


@pytest.mark.parametrize("deny_id_tokens_for", [0.0, 3 * HOUR])
async def test_a_finished_job_gets_no_credential(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock, deny_id_tokens_for: float
) -> None:
    node = Node(gitlab, tmp_path, clock, deny_id_tokens_for=deny_id_tokens_for)
    token = node.mint(8001)  # minted while the job ran, exchanged only after it finished
    await node.finished(8001)
    result = await node.exchange(token)
    assert refused_because_finished(result), result.body
    assert "finished" in result.body["error_description"]
    clock.now += deny_id_tokens_for + 10  # past the ID-token deny window: the finished record still holds
    assert refused_because_finished(await node.exchange(node.mint(8001, iat=int(clock.now) - 60)))
    assert (await node.exchange(node.mint(8002))).status == 200  # other jobs are not affected
    node.close()


async def test_a_finished_job_is_remembered_across_a_restart(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> None:
    first = Node(gitlab, tmp_path, clock)
    await first.finished(8101, status="canceled")
    first.close()
    second = Node(gitlab, tmp_path, clock)
    assert refused_because_finished(await second.exchange(second.mint(8101)))
    second.close()


async def test_credentials_issued_before_a_restart_are_revoked_when_the_job_finishes(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """With --deny-id-tokens-for 0 the deny entry lasts exactly as long as the job's credentials: the restarted
    process must still know how long that is, or the credential keeps working after the job ended."""
    first = Node(gitlab, tmp_path, clock)
    granted = await first.exchange(first.mint(8201))
    assert granted.status == 200, granted.body
    expires = clock.now + granted.body["expires_in"]
    first.close()
    second = Node(gitlab, tmp_path, clock)
    await second.finished(8201)
    assert "8201" in second.service.revocations.active()
    # It leaves the list at the first quantum boundary after the credentials' expiry plus the clock skew jwt_authn
    # allows them (not the 3 h default). Without the skew this failed whenever the fixture's clock put the expiry
    # within 10 s before a boundary (a fresh-clone CI run).
    until = expires + CREDENTIAL_CLOCK_SKEW_SECONDS
    assert second.service.revocations.leaves_at("8201") == math.ceil(until / EXPIRY_QUANTUM) * EXPIRY_QUANTUM
    second.close()


async def test_a_restarted_process_knows_which_gitlab_and_project_to_ask_about_a_job_holding_credentials(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """The ledger the exchange writes before signing is what the recovery sweep reads: no second record."""
    first = Node(gitlab, tmp_path, clock)
    granted = await first.exchange(first.mint(8301))
    assert granted.status == 200, granted.body
    first.close()
    second = Node(gitlab, tmp_path, clock)
    assert await second.service.store.jobs_with_credentials(10) == [
        LiveJob("8301", "42", gitlab.issuer, clock.now + granted.body["expires_in"])
    ]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["signing-keys.json"]
    second.close()


async def test_the_replay_bound_survives_a_restart(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> None:
    first = Node(gitlab, tmp_path, clock)
    token = first.mint(8301)
    assert [(await first.exchange(token)).status for _ in range(3)] == [200, 200, 200]
    first.close()
    second = Node(gitlab, tmp_path, clock)
    replay = await second.exchange(token)
    assert (replay.status, replay.body["error"], replay.result) == (400, "invalid_grant", "replayed")
    second.close()


async def test_the_replay_bound_holds_across_replicas_sharing_the_state(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    one, two = Node(gitlab, tmp_path, clock), Node(gitlab, tmp_path, clock)
    token = one.mint(8401)
    statuses = [(await node.exchange(token)).status for node in (one, two, one, two, one)]
    assert statuses == [200, 200, 200, 400, 400]
    await one.finished(8402)
    assert refused_because_finished(
        await two.exchange(two.mint(8402))
    )  # a job finished on one replica, refused on both
    one.close()
    two.close()


async def test_a_subject_token_older_than_the_finished_job_record_is_refused(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """The ledger forgets a finished job after `finished_job_retention`; a token minted before then is refused
    for its age, so forgetting never lets an old job's token through."""
    node = Node(gitlab, tmp_path, clock)
    retention = node.service.options.finished_job_retention
    assert retention >= 7 * 24 * HOUR
    old = node.mint(8501, iat=int(clock.now - retention - 1), ttl=int(retention) + 3600)
    result = await node.exchange(old)
    assert (result.status, result.body["error"]) == (400, "invalid_grant") and "older" in result.body[
        "error_description"
    ]
    node.close()


async def test_a_store_that_cannot_count_refuses_with_503(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> None:
    node = Node(gitlab, tmp_path, clock)
    node.service.store.close()  # every read and write now fails
    result = await node.exchange(node.mint(8601))
    assert (result.status, result.body["error"], result.result) == (503, "temporarily_unavailable", "unavailable")
    assert "access_token" not in result.body


# -- jobs whose Job Hook may have been missed (a gap in webhook delivery): GitLab is asked before granting


class Asked:
    """The issuer's job status reader, as serve wires it (a GitLabSource on the fake GitLab), counting requests."""

    def __init__(self, fake: FakeGitLab) -> None:
        self.source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=1, timeout=5.0)
        self.issuer = fake.issuer
        self.calls: list[tuple[str, str]] = []

    def __call__(self, issuer_url: str) -> Callable[[str, str], str | None] | None:
        return self.read if issuer_url == self.issuer else None

    def read(self, project_id: str, job_id: str) -> str | None:
        self.calls.append((project_id, job_id))
        return self.source.fetch_job_status(project_id, job_id)


@pytest.fixture
def asked(gitlab: FakeGitLab) -> Asked:
    return Asked(gitlab)


@pytest.fixture
def node(gitlab: FakeGitLab, tmp_path: Path, clock: Clock, asked: Asked) -> Iterator[Node]:
    """A node whose exchange asks GitLab (through `asked`) about jobs whose Job Hook may have been missed."""
    built = Node(gitlab, tmp_path, clock, job_status_reader=asked)
    yield built
    built.close()


@pytest.fixture(scope="module")
def project(gitlab: FakeGitLab) -> int:
    return gitlab.add_project("acme/platform/deployer", id=42)


def job_checks(result: str) -> float:
    return REGISTRY.get_sample_value("controlplane_exchange_job_checks_total", {"result": result}) or 0.0


async def test_a_job_that_finished_during_a_gap_and_never_exchanged_is_refused(
    gitlab: FakeGitLab, project: int, tmp_path: Path, clock: Clock
) -> None:
    """The attack: the job's Job Hook was lost while the control plane was down and it never exchanged, so no
    sweep knew it; its token, minted before the restart, must not buy a credential after it."""
    asked = Asked(gitlab)
    node = Node(gitlab, tmp_path, clock, job_status_reader=asked, deny_id_tokens_for=3 * HOUR)
    job = gitlab.add_job(project)
    token = node.mint(job, iat=int(clock.now) - 60)
    gitlab.set_job_status(job, "success")  # no webhook: this is the missed Job Hook
    node.service.job_hooks_arrive()  # the restart
    result = await node.exchange_checked(token)
    assert refused_because_finished(result), result.body
    assert asked.calls == [("42", str(job))]
    assert str(job) in node.service.revocations.active()  # revoked as the hook would have: its ID token too
    assert refused_because_finished(await node.exchange_checked(node.mint(job, iat=int(clock.now) - 30)))
    assert len(asked.calls) == 1  # the ledger answers now
    node.close()


async def test_a_token_minted_after_the_gap_is_not_checked(
    gitlab: FakeGitLab, project: int, clock: Clock, asked: Asked, node: Node
) -> None:
    node.service.job_hooks_arrive()
    job = gitlab.add_job(project)
    clock.now += exchange_policy(gitlab).issuers[0].clock_skew + 1  # beyond GitLab's clock running ahead
    assert (await node.exchange_checked(node.mint(job))).status == 200
    assert asked.calls == []  # its Job Hook would have arrived


async def test_a_running_job_is_granted_and_not_asked_twice_until_the_next_gap(
    gitlab: FakeGitLab, project: int, clock: Clock, asked: Asked, node: Node
) -> None:
    job = gitlab.add_job(project)
    hooks = node.service.exchange.missed_hooks
    hooks.gap_ended()
    before = job_checks("not_finished")
    for _ in range(2):
        result = await node.exchange_checked(node.mint(job, iat=int(clock.now) - 60))
        assert result.status == 200, result.body
    assert len(asked.calls) == 1 and job_checks("not_finished") == before + 1
    clock.now += 10
    hooks.gap_ended("gitlab")  # GitLab answered again after failures: hooks may have been missed meanwhile
    assert (await node.exchange_checked(node.mint(job, iat=int(clock.now) - 5))).status == 200
    assert len(asked.calls) == 2


async def test_gitlab_unreachable_fails_closed_with_503(
    gitlab: FakeGitLab, project: int, clock: Clock, asked: Asked, node: Node
) -> None:
    job = gitlab.add_job(project)
    token = node.mint(job, iat=int(clock.now) - 60)
    node.service.job_hooks_arrive()
    errors, unavailable = job_checks("error"), metric_exchanges("unavailable")
    gitlab.set_down()
    try:
        result = await node.exchange_checked(token)
    finally:
        gitlab.set_down(False)
    assert (result.status, result.body["error"], result.result) == (503, "temporarily_unavailable", "unavailable")
    assert "access_token" not in result.body
    assert job_checks("error") == errors + 1 and metric_exchanges("unavailable") == unavailable + 1
    assert (await node.exchange_checked(token)).status == 200  # GitLab back: nothing was used up by the 503


async def test_a_job_gitlab_does_not_know_is_refused(
    gitlab: FakeGitLab, project: int, clock: Clock, asked: Asked, node: Node
) -> None:
    node.service.job_hooks_arrive()
    result = await node.exchange_checked(node.mint(987_654_321, iat=int(clock.now) - 60))
    assert (result.status, result.result) == (503, "unavailable")


async def test_an_issuer_without_gitlab_api_is_exchanged_unchecked_and_counted(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    node = Node(gitlab, tmp_path, clock, job_status_reader=lambda issuer_url: None)
    node.service.job_hooks_arrive()
    before = job_checks("no_gitlab")
    for _ in range(2):
        assert (await node.exchange_checked(node.mint(8801, iat=int(clock.now) - 60))).status == 200
    assert job_checks("no_gitlab") == before + 1  # warned once per job and gap
    node.close()


async def test_while_the_webhook_listener_is_not_up_every_exchange_asks(
    gitlab: FakeGitLab, project: int, asked: Asked, node: Node
) -> None:
    node.service.job_hooks_may_be_lost()
    job = gitlab.add_job(project)
    for _ in range(2):
        assert (await node.exchange_checked(node.mint(job))).status == 200
    assert len(asked.calls) == 2  # nothing vouches for the job until Job Hooks can arrive


async def test_without_a_verifier_the_exchange_fails_closed(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> None:
    node = Node(gitlab, tmp_path, clock)
    node.service.job_hooks_arrive()
    pending = await node.exchange(node.mint(8901, iat=int(clock.now) - 60))
    assert (pending.status, pending.result) == (503, "verify") and pending.verify is not None
    assert pending.verify.job_id == "8901" and pending.verify.project_id == "42"
    node.service.endpoint.verify = None
    assert (await node.exchange_checked(node.mint(8901, iat=int(clock.now) - 60))).status == 503
    node.close()


def test_verified_jobs_are_bounded_and_expire_with_their_tokens() -> None:
    clock = Clock(1000.0)
    hooks = MissedHooks(clock, capacity=3)
    hooks.gap_ended()
    for job in range(5):
        hooks.verified(str(job), 1000.0, 2000.0 + job)
    assert len(hooks) == 3
    assert [hooks.needs_check(str(job), "gitlab", 900, 0) for job in range(5)] == [True, True, False, False, False]
    clock.now = 2003.5
    assert len(hooks) == 1  # expired with the tokens they were asked for
    assert not hooks.needs_check("0", "gitlab", 1000, 0)  # minted at the gap's end: its hook would arrive
    assert hooks.needs_check("0", "gitlab", 1000, 5)  # unless GitLab's clock may run ahead of ours


def metric_exchanges(result: str) -> float:
    return REGISTRY.get_sample_value("controlplane_credential_exchanges_total", {"result": result}) or 0.0


async def test_while_postgresql_is_away_the_exchange_fails_closed_and_recovers_when_it_is_back(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """`serve --store postgres` after start: PostgreSQL unreachable means 503 and no credential (never a credential
    whose use was not counted), then credentials again once it answers. A server of its own behind a gate."""
    settings = PoolSettings(min_size=1, max_size=2, connect_timeout=1.0, acquire_timeout=0.5, statement_timeout=1.0)
    with running_server() as server:
        gate = Gate(server.port)
        await gate.restore()
        store = PostgresExchangeStore(StorePool(StoreDsn(gate.dsn(server.admin_dsn), "test"), settings), clock=clock)
        await store.open()
        try:
            node = Node(gitlab, tmp_path, clock, store=store)
            assert node.service.status()["store"] == {
                "kind": "postgres",
                "dsn": StoreDsn(gate.dsn(server.admin_dsn), "t").redacted(),
            }
            assert (await node.exchange(node.mint(8501))).status == 200
            gate.cut()
            token = node.mint(8502)
            away = await node.exchange(token)
            assert (away.status, away.body["error"], away.result) == (503, "temporarily_unavailable", "unavailable")
            assert "access_token" not in away.body
            await gate.restore()
            statuses = []
            for _ in range(40):  # the pool replaces its broken connections within its bounds
                result = await node.exchange(token)
                statuses.append(result.status)
                if result.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert statuses[-1] == 200 and set(statuses[:-1]) <= {503}, statuses
            assert "access_token" in result.body
        finally:
            gate.cut()
            await store.close()
