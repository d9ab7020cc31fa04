"""The deny list's buckets: which bucket a job id lands in, the regex each bucket matches with, and the
credentials service keeping them incrementally (issue 13, docs/architecture.md). Envoy's own matching of these
regexes is tests/test_e2e_revocation_buckets.py."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.compiler.revocations import bucket_rbac, bucket_regex, bucket_regexes
from controlplane.credentials import revocations as revocations_module
from controlplane.credentials.exchange_store import MemoryExchangeStore
from controlplane.credentials.revocation_store import FileRevocationStore
from controlplane.credentials.revocations import EXPIRY_QUANTUM, SEAL_SETTLE, Revocations, horizon
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.model.credentials import (
    NO_REVOCATIONS,
    REVOCATION_BUCKETS,
    CredentialInputs,
    revocation_bucket,
    revocation_buckets,
)
from tests.support.ports import LOOPBACK


def test_decimal_ids_go_by_runs_of_16000_and_others_by_crc() -> None:
    assert revocation_bucket("1") == revocation_bucket("15999") == 0
    assert revocation_bucket("16000") == 1 and revocation_bucket("255999") == 15 and revocation_bucket("256000") == 0
    assert revocation_bucket("8000072345") == (8000072345 // 16000) % 16 == 4
    assert revocation_bucket("job-a") == zlib.crc32(b"job-a") % 16
    assert revocation_bucket("\u0661\u0662") == zlib.crc32("\u0661\u0662".encode()) % 16  # digits, not ASCII


def test_a_plain_list_becomes_sorted_de_duplicated_buckets() -> None:
    buckets = revocation_buckets(["32001", "1", "32000", "1", "x"])
    assert len(buckets) == REVOCATION_BUCKETS
    assert buckets[0] == ("1",) and buckets[2] == ("32000", "32001")
    assert CredentialInputs(revoked=buckets).revoked_jobs == ("1", "32000", "32001", "x")
    with pytest.raises(ValueError, match="16 buckets"):
        CredentialInputs(revoked=((),))


def test_the_regex_groups_by_prefix_and_uses_digit_classes() -> None:
    ids = [f"800001200{d}" for d in (0, 1, 2, 3, 5)] + ["8000012177", "8000012178", "8000012179", "8000013001"]
    assert bucket_regex(ids) == "8000012(?:00[0-35]|17[7-9])|8000013001"
    assert bucket_regex(["123"]) == "123"
    assert bucket_regex(["a.b", "x|y", "9"]) == "9|a\\.b|x\\|y"


@pytest.mark.parametrize("seed", range(5))
def test_the_regex_full_matches_exactly_the_listed_ids(seed: int) -> None:
    """Python's `re.fullmatch` stands in for RE2 here (the constructs used mean the same in both); the real
    Envoy is asked in the e2e test."""
    rng = random.Random(seed)
    universe = [str(rng.randrange(1, 10 ** rng.choice([2, 4, 7, 10]))) for _ in range(3000)]
    listed = set(rng.sample(universe, 400)) | {"job.1", "a+b"}
    pattern = re.compile(bucket_regex(sorted(listed)))
    for job in [*universe, "job-1", "jobx1", "ab", "aab"]:
        assert bool(pattern.fullmatch(job)) == (job in listed), job


ODD_ALPHABET = "0123456789+-.*?()[]{}|^$\\ \t\n_aZ\u0661\u0662\u00b2\u00e9\x00/#"


@pytest.mark.parametrize("seed", range(3))
def test_odd_and_mixed_length_ids_full_match_exactly(seed: int) -> None:
    """Ids of one thousand-block with different lengths (`5`, `12`, `123`, `0123`), leading zeros, regex
    metacharacters, whitespace, NUL, non-ASCII digits and the empty id: each matches itself alone."""
    rng = random.Random(seed)

    def odd() -> str:
        if rng.random() < 0.5:
            return "0" * rng.randrange(3) + str(rng.randrange(10 ** rng.randrange(1, 5)))
        return "".join(rng.choice(ODD_ALPHABET) for _ in range(rng.randrange(4)))

    for _ in range(300):
        listed = {odd() for _ in range(rng.randrange(1, 20))}
        pattern = re.compile(bucket_regex(sorted(listed)))
        probes = {odd() for _ in range(40)} | listed
        probes |= {variant for job in listed for variant in (job[:-1], job + "0", "0" + job, job[1:])}
        for job in probes:
            assert bool(pattern.fullmatch(job)) == (job in listed), (sorted(listed), job)


def test_the_empty_id_alone_is_a_regex_envoy_accepts() -> None:
    """Envoy refuses an empty `safe_regex` (the whole bucket NACKed: seen on the real Envoy, e2e)."""
    assert bucket_regex([""]) == "(?:)"
    assert re.fullmatch(bucket_regex([""]), "") and not re.fullmatch(bucket_regex([""]), "1")
    assert bucket_regex(["", "7"]) == "7|(?:)"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_revocation_joins_the_recent_list_and_hands_every_bucket_as_the_same_objects() -> None:
    clock = Clock(10 * EXPIRY_QUANTUM + 1)
    revocations = Revocations(None, clock=clock)
    assert revocations.buckets() == NO_REVOCATIONS and revocations.recent() == ()
    before = revocations.buckets()
    for job in ("2", "1", "16001", "240001"):
        assert revocations.revoke(job, clock.now + 3600)
    assert revocations.recent() == ("1", "16001", "2", "240001")
    assert revocations.buckets() is before  # no bucket re-sent, however many ids they hold
    recent = revocations.recent()
    assert revocations.recent() is recent  # no change: the very same input, nothing compared
    assert not revocations.revoke("1", clock.now + 60)  # a shorter denial of a listed job: nothing
    assert revocations.revoke("1", clock.now + 7200)  # a longer one: the time, not the ids
    assert revocations.recent() is recent and revocations.is_revoked("1")


def test_the_recent_list_is_sealed_into_its_buckets_when_the_next_quantum_begins() -> None:
    start = 10 * EXPIRY_QUANTUM
    clock = Clock(start + 1)
    revocations = Revocations(None, clock=clock)
    for job in ("1", "2", "16001", "240001"):
        revocations.revoke(job, start + 3600)
    empty = revocations.buckets()
    assert revocations.next_expiry() == start + EXPIRY_QUANTUM  # the seal is due, though nothing expires
    clock.now = start + EXPIRY_QUANTUM - 1
    assert not revocations.prune() and revocations.buckets() is empty
    clock.now = start + EXPIRY_QUANTUM
    recent = revocations.recent()
    assert revocations.prune()
    sealed = revocations.buckets()
    assert sealed[0] == ("1", "2") and sealed[1] == ("16001",) and sealed[15] == ("240001",)
    assert all(sealed[i] is empty[i] for i in range(2, 15))  # buckets no id joined: the same objects
    # Make before break: the recent list still holds them, until they settled in their buckets.
    assert revocations.recent() is recent and revocations.next_expiry() == start + EXPIRY_QUANTUM + SEAL_SETTLE
    clock.now = start + EXPIRY_QUANTUM + SEAL_SETTLE - 0.1
    assert not revocations.prune() and revocations.recent() is recent
    clock.now = start + EXPIRY_QUANTUM + SEAL_SETTLE
    assert revocations.prune() and revocations.buckets() is sealed
    assert revocations.recent() == () and revocations.next_expiry() == start + 12 * EXPIRY_QUANTUM
    revocations.revoke("3", start + 3600)  # the next one: the recent list again, the buckets untouched
    assert revocations.recent() == ("3",) and revocations.buckets() is sealed
    assert revocations.revoke("1", start + 7200)  # a longer denial of a sealed job: its bucket keeps its ids
    assert revocations.buckets() is sealed and revocations.recent() == ("3",)
    assert set(CredentialInputs(revoked=sealed, revoked_recently=revocations.recent()).revoked_jobs) == {
        "1",
        "2",
        "3",
        "16001",
        "240001",
    }


def test_the_recent_list_is_sealed_at_once_past_its_limit() -> None:
    clock = Clock(10 * EXPIRY_QUANTUM + 1)
    revocations = Revocations(None, clock=clock, recent_limit=3)
    for job in ("1", "2", "3"):
        revocations.revoke(job, clock.now + 3600)
    assert revocations.recent() == ("1", "2", "3") and revocations.buckets() == NO_REVOCATIONS
    revocations.revoke("16004", clock.now + 3600)  # the fourth: all four sealed
    assert revocations.buckets()[0] == ("1", "2", "3") and revocations.buckets()[1] == ("16004",)
    revocations.revoke("5", clock.now + 3600)  # a new one joins the recent list, with the settling ones
    assert revocations.recent() == ("1", "16004", "2", "3", "5")
    assert revocations.status()["revoked_recently"] == 5
    clock.now += SEAL_SETTLE
    assert revocations.prune() and revocations.recent() == ("5",)
    assert revocations.buckets()[0] == ("1", "2", "3")
    assert not revocations.prune()  # nothing more until the quantum


def test_what_a_start_loads_is_sealed_and_expiry_leaves_from_either_tier(tmp_path: Path) -> None:
    start = 100 * EXPIRY_QUANTUM
    clock = Clock(start)
    first = Revocations(tmp_path / "revocations.json", clock=clock)
    first.revoke("1", start + 10)
    first.revoke("16001", start + 2 * EXPIRY_QUANTUM + 1)
    assert asyncio.run(first.persist())
    again = Revocations(tmp_path / "revocations.json", clock=clock)
    assert again.recent() == () and again.buckets()[0] == ("1",) and again.buckets()[1] == ("16001",)
    again.revoke("2", start + 20)  # recent, expiring at the same boundary as the sealed "1"
    clock.now = start + EXPIRY_QUANTUM
    assert again.prune()  # "2" leaves from the recent list, "1" from its bucket
    assert again.recent() == () and again.buckets()[0] == () and again.buckets()[1] == ("16001",)


def test_expired_entries_leave_at_the_quantum_not_one_by_one() -> None:
    start = 100 * EXPIRY_QUANTUM
    clock = Clock(start)
    revocations = Revocations(None, clock=clock)
    revocations.revoke("1", start + 10)
    revocations.revoke("2", start + 20)
    revocations.revoke("3", start + 2 * EXPIRY_QUANTUM + 1)
    assert revocations.next_expiry() == start + EXPIRY_QUANTUM  # both leave at the next boundary, together
    clock.now = start + 25
    assert not revocations.is_revoked("1") and revocations.is_revoked("3")  # enforcement decisions stay exact
    assert not revocations.prune() and revocations.recent() == ("1", "2", "3")  # the list waits
    clock.now = start + EXPIRY_QUANTUM
    assert horizon(clock.now) == start + EXPIRY_QUANTUM
    assert revocations.prune() and revocations.buckets()[0] == ("3",) and revocations.recent() == ("3",)
    clock.now += SEAL_SETTLE
    assert revocations.prune() and revocations.recent() == ()
    assert revocations.next_expiry() == start + 3 * EXPIRY_QUANTUM


def test_a_bucket_over_the_regex_budget_is_split_and_still_matches_exactly() -> None:
    rng = random.Random(7)
    listed = sorted({str(rng.randrange(10**9, 10**10)) for _ in range(3000)} | {"a.b", ""})
    assert bucket_regexes(listed) == [bucket_regex(listed)]  # under the budget: one regex, as before
    chunks = bucket_regexes(listed, limit=2000)
    assert len(chunks) > 10 and all(len(chunk) <= 2000 for chunk in chunks)
    patterns = [re.compile(chunk) for chunk in chunks]
    for job in [*listed, *(str(rng.randrange(10**9, 10**10)) for _ in range(3000)), "a", "ab"]:
        assert any(p.fullmatch(job) for p in patterns) == (job in listed), job
    assert len(bucket_rbac(listed).rules.policies["revoked-jobs"].principals) == 1


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("revoke"), st.integers(0, 60), st.integers(1, 3 * 3600)),
            st.tuples(st.just("wait"), st.integers(0, 400), st.just(0)),
            st.tuples(st.just("publish"), st.just(0), st.just(0)),
        ),
        max_size=120,
    ),
    on_publication=st.booleans(),
)
def test_no_step_ever_lists_a_denied_job_in_neither_tier(
    steps: list[tuple[str, int, int]], on_publication: bool
) -> None:
    """Whatever the order of revocations, seals, settles and expiries, each published state (what one push carries)
    lists every denied job, and a job leaves the recent list only if the previous state already had it in its
    bucket: a push never takes an id out of both tiers, nor out of one before the other holds it."""
    clock = Clock(10 * EXPIRY_QUANTUM)
    revocations = Revocations(None, clock=clock, recent_limit=5, settle_on_publication=on_publication)

    def state() -> tuple[set[str], set[str]]:
        return {j for bucket in revocations.buckets() for j in bucket}, set(revocations.recent())

    before = state()
    revoked_at: list[float] = []
    for kind, value, ttl in steps:
        if kind == "revoke":
            if revocations.revoke(str(1000 * value + value % 7), clock.now + ttl):
                revoked_at.append(clock.now)
        elif kind == "publish":  # as CredentialService: a push read the inputs after every seal so far
            revocations.published(revocations.seals())
        else:
            clock.now += value
        revocations.prune()
        sealed, recent = after = state()
        for job in before[1] - recent:  # left the recent list: sealed before, or expired
            assert job in before[0] or not revocations.is_revoked(job), job
        for job in before[0] - sealed:  # left a bucket: only by expiry
            assert not revocations.is_revoked(job), job
        listed = sealed | recent
        assert all(job in listed for job in revocations.active())  # nothing denied goes unlisted
        if not on_publication:  # with it, unpublished seals stay listed until a push (fail closed)
            # The recent list, the first seal of the last SEAL_SETTLE seconds and a quantum seal (each may hold
            # older ids), and the later seals of those seconds (only ids revoked in them).
            lately = sum(1 for at in revoked_at if at > clock.now - SEAL_SETTLE)
            assert len(revocations.recent()) <= 3 * (5 + 1) + lately
        before = after


def test_a_burst_of_seals_settles_each_seal_on_its_own_time() -> None:
    """Revocations far faster than RECENT_LIMIT per SEAL_SETTLE (a mass cancel of pipelines): each limit seal used to
    push the settle time of every earlier one back, so nothing left the recent list while the burst lasted (100 ids
    a second for a minute: 6,000 ids, all re-sent with every revocation). Each seal's ids now leave SEAL_SETTLE
    after their own seal: the recent list holds at most what the last SEAL_SETTLE seconds brought, plus the limit."""
    clock = Clock(10 * EXPIRY_QUANTUM + 1)
    revocations = Revocations(None, clock=clock, recent_limit=400)
    rate = 100
    for second in range(60):
        for i in range(rate):
            revocations.revoke(str(10**9 + second * rate + i), clock.now + 3600)
        clock.now += 1
        revocations.prune()
        assert len(revocations.recent()) <= 400 + 1 + rate * (SEAL_SETTLE + 1), second
    assert len(revocations.active()) == 60 * rate
    listed = {job for bucket in revocations.buckets() for job in bucket} | set(revocations.recent())
    assert listed == set(revocations.active())  # nothing denied left both tiers


class EndlessStore(FileRevocationStore):
    """What PostgresRevocationStore hands for a row whose `denied_until` is NaN or Infinity: denied until the row
    changes (tests/test_store_hostile.py)."""

    async def changes(self, since: int) -> tuple[dict[str, float], int]:
        return {"101": math.inf}, 1


@pytest.mark.parametrize("document", ['{"version": 1, "revoked": {"101": Infinity, "102": NaN}}', None])
async def test_an_entry_without_end_never_breaks_expiry_nor_status(tmp_path: Path, document: str | None) -> None:
    """An endless entry (a hostile row: the PostgreSQL store maps NaN to infinity, the file takes `Infinity` and
    `NaN`) once alone on the list: `next_expiry` raised OverflowError (NaN: ValueError), which ended the credential
    service's run loop (and with it the server), and /status failed. A NaN time was also not denied by the
    gateway checks (`is_revoked`) while its bucket listed it."""
    clock = Clock(10 * EXPIRY_QUANTUM + 1)
    if document is None:
        revocations = Revocations(EndlessStore(None), clock=clock)
        await revocations.open()
    else:
        (tmp_path / "revoked.json").write_text(document)
        revocations = Revocations(tmp_path / "revoked.json", clock=clock)
    assert revocations.is_revoked("101") and revocations.leaves_at("101") is None
    assert revocations.revoke("5", clock.now + 60) and revocations.next_expiry() is not None
    clock.now += 2 * EXPIRY_QUANTUM
    assert revocations.prune()
    clock.now += SEAL_SETTLE
    revocations.prune()
    assert revocations.next_expiry() is None and revocations.status()["next_expiry"] is None
    assert all(revocations.is_revoked(job) for job in ("101", *(("102",) if document else ())))
    listed = {job for bucket in revocations.buckets() for job in bucket}
    assert listed == set(revocations.active())


async def test_a_limit_seal_settles_on_time_while_the_run_loop_sleeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit seal happens inside a revocation, while `CredentialService.run` sleeps until its next due time (up to
    60 s away): the settle SEAL_SETTLE later waited for that wake-up, the recent list twice its size meanwhile. The
    revocation that seals wakes the loop."""
    monkeypatch.setattr(revocations_module, "SEAL_SETTLE", 0.3)
    options = CredentialOptions(listen=(LOOPBACK, 0), public=(LOOPBACK, 0), state_dir=tmp_path)

    async def pushed() -> None:
        pass

    service = CredentialService(
        options, issuer_keys=lambda _: None, policy=lambda: None, on_change=pushed, store=MemoryExchangeStore()
    )
    service.revocations.recent_limit = 3
    rounds = 0
    prune = service.revocations.prune

    def counted() -> bool:  # the loop's round: prune, then (nothing changed, nothing to write) asleep
        nonlocal rounds
        rounds += 1
        return prune()

    monkeypatch.setattr(service.revocations, "prune", counted)
    stop = asyncio.Event()
    loop = asyncio.create_task(service.run(stop))
    try:
        started = time.monotonic()
        while rounds == 0 and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        assert rounds == 1  # it sleeps now, until its next due time (60 s at most)
        for job in ("1", "2", "3", "4"):
            assert await service.revoke_finished(job, "success")
        assert len(service.revocations.recent()) == 4 and service.revocations.settles_at() is not None
        started = time.monotonic()
        while service.revocations.recent() and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        assert service.revocations.recent() == (), "the sealed ids did not settle within 5 s"
    finally:
        stop.set()
        await loop


class SharedCompiles:
    """PolicyService.recompile's sharing (runtime/policy_service.py): callers join a compile that has not started,
    a compile reads the inputs once it holds the lock, one compile at a time; each publishes what it read."""

    def __init__(self, inputs: Callable[[], CredentialInputs], compile_seconds: float) -> None:
        self.inputs = inputs
        self.compile_seconds = compile_seconds
        self.lock = asyncio.Lock()
        self.waiting: asyncio.Future[None] | None = None
        self.published: list[CredentialInputs] = []

    async def recompile(self) -> None:
        if self.waiting is None:
            self.waiting = asyncio.ensure_future(self._compile())
        await asyncio.shield(self.waiting)

    async def _compile(self) -> None:
        async with self.lock:
            self.waiting = None  # started: later changes need another compile
            read = self.inputs()
            await asyncio.sleep(self.compile_seconds)  # the compile's own duration (a large policy), not a wait
            self.published.append(read)


async def test_a_settle_never_shares_the_push_of_its_own_seal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile outlasting SEAL_SETTLE (a policy reload of a large policy on a busy host) while a revocation seals
    the recent list: the seal's compile waits its turn, the settle SEAL_SETTLE later joins it, and the one snapshot
    published moved the ids from the recent list into their buckets at once, the one-response move make-before-break
    exists to prevent (an Envoy applies the two configurations separately). Settling now counts from the publication
    of the seal: every published state keeps a sealed id in the recent list until an earlier one had it sealed."""
    monkeypatch.setattr(revocations_module, "SEAL_SETTLE", 0.2)
    options = CredentialOptions(listen=(LOOPBACK, 0), public=(LOOPBACK, 0), state_dir=tmp_path)
    made: list[CredentialService] = []
    compiles = SharedCompiles(lambda: made[0].inputs(), compile_seconds=0.0)
    service = CredentialService(
        options,
        issuer_keys=lambda _: None,
        policy=lambda: None,
        on_change=compiles.recompile,
        store=MemoryExchangeStore(),
    )
    made.append(service)
    service.revocations.recent_limit = 3
    stop = asyncio.Event()
    loop = asyncio.create_task(service.run(stop))
    try:
        for job in ("1", "2", "3"):
            assert await service.revoke_finished(job, "success")
        assert compiles.published[-1].revoked_recently == ("1", "2", "3")
        compiles.compile_seconds = 0.6  # a long compile starts (a policy reload), holding what is listed now
        reload = asyncio.create_task(compiles.recompile())
        while not compiles.lock.locked() or compiles.waiting is not None:  # until it read the inputs
            await asyncio.sleep(0.001)
        assert await service.revoke_finished("16004", "success")  # seals; its compile runs after the reload
        await reload
        compiles.compile_seconds = 0.0
        started = time.monotonic()
        while service.revocations.recent() and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        await compiles.recompile()
        assert compiles.published[-1].revoked_recently == ()
        for before, after in itertools.pairwise(compiles.published):
            sealed_before = {job for bucket in before.revoked for job in bucket}
            for job in set(before.revoked_recently) - set(after.revoked_recently):
                assert job in sealed_before, f"{job} left the recent list in the push that sealed it"
    finally:
        stop.set()
        await loop
