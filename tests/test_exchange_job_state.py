"""What the token exchange must remember across webhooks and restarts: which jobs have finished, how often each
subject token was exchanged, and until when each job holds credentials.

Driven through `CredentialService`, as `serve` wires it (a state directory, a job webhook), with a fake clock
starting at real time (the fake GitLab mints tokens with real `iat`s). A "restart" is a second service over the
same state directory: nothing but the files carries over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.credentials.exchange import ExchangePolicy, ExchangeResult
from controlplane.credentials.exchange_store import LiveJob
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.sources.jwks import normalize_jwks
from controlplane.sources.webhooks import JobEvent
from tests.support.fake_gitlab import FakeGitLab
from tests.test_credentials import Clock, exchange_policy

HOUR = 3600.0


@pytest.fixture(scope="module")
def gitlab() -> Iterator[FakeGitLab]:
    with FakeGitLab(default_audience="https://reports.local") as fake:
        yield fake


class Node:
    """One control plane's credential service over a state directory (two Nodes on one directory: a restart)."""

    def __init__(self, fake: FakeGitLab, state: Path, clock: Clock, *, deny_id_tokens_for: float = 0.0) -> None:
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
        self.service = CredentialService(
            options,
            issuer_keys=lambda name: relayed if name == "gitlab" else None,
            policy=lambda: policy,
            on_change=changed,
            clock=clock,
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

    def exchange(self, token: str) -> ExchangeResult:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": "reports-api",
        }
        return self.service.exchange.exchange(form)

    async def finished(self, job_id: int, status: str = "success") -> None:
        event = JobEvent(project_id=42, job_id=job_id, pipeline_id=900, status=status, ref="main")
        await self.service.on_event(event)

    def close(self) -> None:
        self.service.close()


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
    result = node.exchange(token)
    assert refused_because_finished(result), result.body
    assert "finished" in result.body["error_description"]
    clock.now += deny_id_tokens_for + 10  # past the ID-token deny window: the finished record still holds
    assert refused_because_finished(node.exchange(node.mint(8001, iat=int(clock.now) - 60)))
    assert node.exchange(node.mint(8002)).status == 200  # other jobs are not affected
    node.close()


async def test_a_finished_job_is_remembered_across_a_restart(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> None:
    first = Node(gitlab, tmp_path, clock)
    await first.finished(8101, status="canceled")
    first.close()
    second = Node(gitlab, tmp_path, clock)
    assert refused_because_finished(second.exchange(second.mint(8101)))
    second.close()


async def test_credentials_issued_before_a_restart_are_revoked_when_the_job_finishes(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """With --deny-id-tokens-for 0 the deny entry lasts exactly as long as the job's credentials: the restarted
    process must still know how long that is, or the credential keeps working after the job ended."""
    first = Node(gitlab, tmp_path, clock)
    granted = first.exchange(first.mint(8201))
    assert granted.status == 200, granted.body
    expires = clock.now + granted.body["expires_in"]
    first.close()
    second = Node(gitlab, tmp_path, clock)
    await second.finished(8201)
    assert "8201" in second.service.revocations.active()
    assert second.service.revocations.next_expiry() == expires
    second.close()


def test_a_restarted_process_knows_which_gitlab_and_project_to_ask_about_a_job_holding_credentials(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    """The ledger the exchange writes before signing is what the recovery sweep reads: no second record."""
    first = Node(gitlab, tmp_path, clock)
    granted = first.exchange(first.mint(8301))
    assert granted.status == 200, granted.body
    first.close()
    second = Node(gitlab, tmp_path, clock)
    assert second.service.store.jobs_with_credentials(10) == [
        LiveJob("8301", "42", gitlab.issuer, clock.now + granted.body["expires_in"])
    ]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["signing-keys.json"]
    second.close()


async def test_the_replay_bound_survives_a_restart(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> None:
    first = Node(gitlab, tmp_path, clock)
    token = first.mint(8301)
    assert [first.exchange(token).status for _ in range(3)] == [200, 200, 200]
    first.close()
    second = Node(gitlab, tmp_path, clock)
    replay = second.exchange(token)
    assert (replay.status, replay.body["error"], replay.result) == (400, "invalid_grant", "replayed")
    second.close()


async def test_the_replay_bound_holds_across_replicas_sharing_the_state(
    gitlab: FakeGitLab, tmp_path: Path, clock: Clock
) -> None:
    one, two = Node(gitlab, tmp_path, clock), Node(gitlab, tmp_path, clock)
    token = one.mint(8401)
    statuses = [node.exchange(token).status for node in (one, two, one, two, one)]
    assert statuses == [200, 200, 200, 400, 400]
    await one.finished(8402)
    assert refused_because_finished(two.exchange(two.mint(8402)))  # a job finished on one replica, refused on both
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
    result = node.exchange(old)
    assert (result.status, result.body["error"]) == (400, "invalid_grant") and "older" in result.body[
        "error_description"
    ]
    node.close()


async def test_a_store_that_cannot_count_refuses_with_503(gitlab: FakeGitLab, tmp_path: Path, clock: Clock) -> None:
    node = Node(gitlab, tmp_path, clock)
    node.service.store.close()  # every read and write now fails
    result = node.exchange(node.mint(8601))
    assert (result.status, result.body["error"], result.result) == (503, "temporarily_unavailable", "unavailable")
    assert "access_token" not in result.body
