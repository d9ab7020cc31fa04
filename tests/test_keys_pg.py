"""Signing keys shared by replicas in PostgreSQL (issue 12): sealed at rest, one first key whoever races, rotation
by the leader only, followers publishing byte-identical JWKS, and PostgreSQL away costing only a postponed
rotation. On the session's real server (a fresh database per test), and a gated one for outages."""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import psycopg
import pytest

from controlplane.credentials import key_cipher
from controlplane.credentials.exchange_store import MemoryExchangeStore
from controlplane.credentials.key_cipher import KekError, KeyCipher, SealError, parse_keks
from controlplane.credentials.keys import KeyStoreError
from controlplane.credentials.keys_pg import TOPIC, KeyStoreUnavailable, PostgresKeyStore, SharedKeys
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.store.changes import ChangeFeed
from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import migrate
from controlplane.store.pool import PoolSettings, StorePool
from tests.support.ports import LOOPBACK
from tests.support.postgres import Gate, PostgresServer

ROTATE, TTL, LEAD = 100.0, 30.0, 10.0
KEK = base64.b64encode(b"k" * 32).decode()
OTHER_KEK = base64.b64encode(b"o" * 32).decode()
FAST = PoolSettings(min_size=1, max_size=4, connect_timeout=1.0, acquire_timeout=0.5, statement_timeout=1.0)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_pool(dsn: str, settings: PoolSettings | None = None) -> StorePool:
    pool = StorePool(StoreDsn(dsn, "test"), settings)
    await pool.open()
    async with pool.connection() as conn:
        await migrate(conn)
    return pool


async def open_keys(pool: StorePool, clock: Clock, kek: str = KEK) -> SharedKeys:
    store = PostgresKeyStore(pool, parse_keks(kek, "test KEK"))
    return await SharedKeys.open(store, rotate_every=ROTATE, max_credential_ttl=TTL, publish_lead=LEAD, clock=clock)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[StorePool]:
    made = await open_pool(pg_dsn)
    yield made
    await made.close()


async def rows(pool: StorePool) -> list[tuple[object, ...]]:
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT kid, sealed_private_key FROM signing_keys ORDER BY not_before")
        return await cursor.fetchall()


def kids(keys: SharedKeys) -> list[str]:
    return [k["kid"] for k in json.loads(keys.keys.published_jwks())["keys"]]


# --- the KEK and sealing ------------------------------------------------------------------------------------


def test_a_sealed_key_opens_only_with_its_kek_and_its_kid() -> None:
    cipher = parse_keks(KEK, "test")
    sealed = cipher.seal("kid-1", "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n")
    assert b"secret" not in sealed and cipher.open("kid-1", sealed).startswith("-----BEGIN")
    with pytest.raises(SealError, match="kid-2: the sealed private key does not open") as moved:
        cipher.open("kid-2", sealed)  # the kid is the associated data: a row's key moved to another row
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(SealError, match="does not open") as changed:
        cipher.open("kid-1", bytes(tampered))
    with pytest.raises(SealError, match="which test does not hold") as wrong:
        parse_keks(OTHER_KEK, "test").open("kid-1", sealed)
    with pytest.raises(SealError, match="damaged row"):
        cipher.open("kid-1", b"cpk1short")
    for error in (moved, changed, wrong):
        assert "secret" not in str(error.value) and KEK not in str(error.value)
    assert KEK not in repr(cipher) and "k" * 32 not in repr(cipher)


def test_the_previous_kek_opens_and_the_first_seals() -> None:
    old = parse_keks(OTHER_KEK, "old")
    sealed = old.seal("kid", "pem")
    rotating = parse_keks(f"{KEK}\n{OTHER_KEK}\n", "both")
    assert rotating.open("kid", sealed) == "pem"
    assert rotating.sealed_with(rotating.seal("kid", "pem")) == parse_keks(KEK, "new").primary_id
    assert rotating.sealed_with(sealed) != rotating.primary_id


@pytest.mark.parametrize(
    "text",
    ["", "zzz%%%not-base64!", base64.b64encode(b"short").decode(), f"{KEK} {KEK}", f"{KEK} {OTHER_KEK} {KEK}"],
)
def test_an_unusable_kek_is_refused_without_showing_it(text: str) -> None:
    with pytest.raises(KekError, match="source") as refused:
        parse_keks(text, "source")
    assert (not text) or text.split()[0] not in str(refused.value)


def test_kek_sources_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_TEST_KEK", KEK)
    assert isinstance(key_cipher.resolve(key_env="CP_TEST_KEK", key_file=None), KeyCipher)
    with pytest.raises(KekError, match="CP_TEST_NOPE is not set"):
        key_cipher.resolve(key_env="CP_TEST_NOPE", key_file=None)
    with pytest.raises(KekError, match=r"exactly once.*got none"):
        key_cipher.resolve(key_env=None, key_file=None)
    path = tmp_path / "kek"
    path.write_text(KEK + "\n")
    assert key_cipher.resolve(key_env=None, key_file=path).primary_id == parse_keks(KEK, "x").primary_id
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(KekError, match="symbolic link"):
        key_cipher.from_file(link)


# --- the shared store ---------------------------------------------------------------------------------------


async def test_private_keys_reach_the_database_sealed(pool: StorePool) -> None:
    keys = await open_keys(pool, Clock())
    ((kid, sealed),) = await rows(pool)
    assert kid == keys.keys.signing_key().kid
    assert isinstance(sealed, bytes) and b"PRIVATE KEY" not in sealed and sealed.startswith(b"cpk1")
    assert keys.keys.keys[0].private_pem not in repr(keys.store) + repr(keys.keys.keys)


async def test_concurrent_replicas_on_an_empty_database_create_one_first_key(pg_dsn: str) -> None:
    pools = [await open_pool(pg_dsn) for _ in range(5)]
    try:
        replicas = await asyncio.gather(*(open_keys(p, Clock()) for p in pools))
        assert len(await rows(pools[0])) == 1
        assert len({r.keys.published_jwks() for r in replicas}) == 1
        assert len({r.keys.signing_key().kid for r in replicas}) == 1
    finally:
        for p in pools:
            await p.close()


def _open_in_process(dsn: str, out: multiprocessing.Queue[str]) -> None:
    async def main() -> str:
        pool = await open_pool(dsn)
        try:
            return (await open_keys(pool, Clock())).keys.published_jwks()
        finally:
            await pool.close()

    out.put(asyncio.run(main()))


def test_two_processes_on_an_empty_database_publish_the_same_one_key(pg_dsn: str) -> None:
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[str] = context.Queue()
    workers = [context.Process(target=_open_in_process, args=(pg_dsn, out)) for _ in range(2)]
    for worker in workers:
        worker.start()
    published = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(60)
    assert published[0] == published[1] and len(json.loads(published[0])["keys"]) == 1


async def test_the_leader_rotates_the_follower_follows_and_credentials_cross(pg_dsn: str) -> None:
    clock = Clock()
    leader_pool, follower_pool = await open_pool(pg_dsn), await open_pool(pg_dsn)
    try:
        leader, follower = await open_keys(leader_pool, clock), await open_keys(follower_pool, clock)
        first = leader.keys.signing_key().kid
        clock.now += ROTATE - LEAD  # the successor is due
        assert not await follower.step(is_leader=False)  # a follower never writes the rotation
        assert len(await rows(leader_pool)) == 1
        assert follower.next_step_at() == clock.now + follower.retry_interval  # it polls until it sees it
        assert await leader.step(is_leader=True)
        assert len(kids(leader)) == 2 and leader.keys.signing_key().kid == first  # published, not yet signing
        clock.now += follower.retry_interval
        assert await follower.step(is_leader=False)  # its own view said a change was due: it re-read
        assert follower.keys.published_jwks() == leader.keys.published_jwks()
        assert follower.next_step_at() == leader.keys.next_change_at()
        clock.now = leader.keys.keys[-1].not_before
        assert follower.keys.signing_key().kid == leader.keys.signing_key().kid != first
        token = jwt.encode({"sub": "x"}, follower.keys.signing_key().private_key, algorithm="ES256",
                           headers={"kid": follower.keys.signing_key().kid})  # fmt: skip
        jwk = jwt.PyJWKSet.from_json(leader.keys.published_jwks())[follower.keys.signing_key().kid]
        assert jwt.decode(token, jwk, algorithms=["ES256"]) == {"sub": "x"}
        clock.now += TTL  # the first key's last credential expired: the leader drops it, the follower follows
        assert await leader.step(is_leader=True) and kids(leader) == [leader.keys.signing_key().kid]
        clock.now += follower.retry_interval
        assert await follower.step(is_leader=False)
        assert follower.keys.published_jwks() == leader.keys.published_jwks()
    finally:
        await leader_pool.close()
        await follower_pool.close()


async def test_a_follower_rereads_on_the_leaders_notification(pg_dsn: str) -> None:
    clock = Clock()
    leader_pool, follower_pool = await open_pool(pg_dsn), await open_pool(pg_dsn)
    stop = asyncio.Event()
    try:
        leader, follower = await open_keys(leader_pool, clock), await open_keys(follower_pool, clock)
        feed = ChangeFeed(follower_pool)
        feed.subscribe(TOPIC, follower.on_notification)
        running = asyncio.create_task(feed.run(stop))
        await asyncio.wait_for(feed.listening(), 10)
        await asyncio.wait_for(follower.wake.wait(), 10)  # the feed's resync after connecting
        assert not await follower.step(is_leader=False)
        follower.wake.clear()
        clock.now += ROTATE - LEAD / 2  # late: successor due; the follower's view alone would also re-read
        assert await leader.step(is_leader=True)
        await asyncio.wait_for(follower.wake.wait(), 5)
        assert await follower.step(is_leader=False)
        assert follower.keys.published_jwks() == leader.keys.published_jwks()
        assert leader.keys.keys[-1].not_before == clock.now + LEAD  # its full publish_lead, though late
        stop.set()
        await asyncio.wait_for(running, 10)
    finally:
        stop.set()
        await leader_pool.close()
        await follower_pool.close()


async def test_a_wrong_kek_or_a_tampered_row_fails_closed(pool: StorePool) -> None:
    clock = Clock()
    keys = await open_keys(pool, clock)
    with pytest.raises(KeyStoreError, match="does not hold") as wrong:
        await open_keys(pool, clock, kek=OTHER_KEK)
    assert KEK not in str(wrong.value) and OTHER_KEK not in str(wrong.value)
    async with pool.connection() as conn:
        await conn.execute("UPDATE signing_keys SET sealed_private_key = sealed_private_key || '\\x00'::bytea")
    with pytest.raises(KeyStoreError, match="does not open"):
        await open_keys(pool, clock)
    before = keys.keys.published_jwks()
    clock.now += ROTATE - LEAD
    assert not await keys.step(is_leader=True)  # refused, not overwritten: the current key keeps signing
    assert keys.keys.published_jwks() == before and keys.keys.signing_key()
    assert "does not open" in str(keys.status()["last_error"])


async def test_a_row_whose_private_key_was_swapped_is_refused(pg_dsn: str) -> None:
    """The kid is the public thumbprint: a sealed key of another kid, re-sealed under this kid, is caught."""
    pool = await open_pool(pg_dsn)
    try:
        keys = await open_keys(pool, Clock())
        other = await open_keys(await open_pool(pg_dsn), Clock(5e6))  # same set: read the row back
        assert other.keys.published_jwks() == keys.keys.published_jwks()
        from controlplane.credentials.keys import first_key

        stranger = first_key(0)
        cipher = parse_keks(KEK, "t")
        kid = keys.keys.signing_key().kid
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE signing_keys SET sealed_private_key = %s", (cipher.seal(kid, stranger.private_pem),)
            )
        with pytest.raises(KeyStoreError, match="does not belong to this kid"):
            await open_keys(pool, Clock())
    finally:
        await pool.close()


async def test_kek_rotation_reseals_with_the_first_kek(pool: StorePool) -> None:
    clock = Clock()
    old = await open_keys(pool, clock, kek=OTHER_KEK)
    rotating = await open_keys(pool, clock, kek=f"{KEK} {OTHER_KEK}")  # its first update re-seals
    new_only = await open_keys(pool, clock, kek=KEK)
    assert old.keys.published_jwks() == rotating.keys.published_jwks() == new_only.keys.published_jwks()
    with pytest.raises(KeyStoreError, match="does not hold"):
        await open_keys(pool, clock, kek=OTHER_KEK)


async def test_postgresql_away_postpones_the_rotation_and_signing_goes_on(postgres: PostgresServer) -> None:
    clock = Clock()
    gate = Gate(postgres.port)
    await gate.restore()
    with postgres.database() as dsn:
        pool = await open_pool(gate.dsn(dsn), FAST)
        try:
            keys = await open_keys(pool, clock)
            first = keys.keys.signing_key().kid
            gate.cut()
            clock.now += ROTATE + 50  # overdue while the store is away
            assert not await keys.step(is_leader=True)
            assert keys.keys.signing_key().kid == first and len(kids(keys)) == 1
            status = keys.status()
            assert "unavailable" in str(status["last_error"]) and status["change_overdue_seconds"] == 0
            assert keys.next_step_at() == clock.now + keys.retry_interval
            with pytest.raises(KeyStoreUnavailable):
                await keys.store.load()
            await gate.restore()
            clock.now += 1
            for _ in range(50):  # the pool replaces its broken connections within its bounds
                if await keys.step(is_leader=True):
                    break
                await asyncio.sleep(0.1)
            assert len(kids(keys)) == 2 and keys.status()["last_error"] is None
            assert keys.keys.keys[-1].not_before >= clock.now + LEAD and keys.keys.signing_key().kid == first
        finally:
            gate.cut()
            await pool.close()


async def test_a_notification_never_carries_key_material(pool: StorePool) -> None:
    conn = await psycopg.AsyncConnection.connect(pool.dsn.dsn, autocommit=True)
    try:
        await conn.execute("LISTEN controlplane_changes")
        clock = Clock()
        keys = await open_keys(pool, clock)
        clock.now += ROTATE
        assert await keys.step(is_leader=True)
        payloads = []
        async for notify in conn.notifies(timeout=2.0):
            payloads.append(notify.payload)
        assert payloads and all(p.startswith(f"{TOPIC}:") and "PRIVATE" not in p for p in payloads)
        assert payloads[-1] == f"{TOPIC}:{keys.keys.keys[-1].kid}"
    finally:
        await conn.close()


async def test_credential_services_on_one_database_follow_the_leader(pg_dsn: str, tmp_path: Path) -> None:
    """The service level: a follower's run loop is woken by the leader's notification, re-reads, and recompiles
    (on_change) with the leader's JWKS; its own run loop never rotates."""
    clock = Clock()
    pools = [await open_pool(pg_dsn), await open_pool(pg_dsn)]
    stop = asyncio.Event()
    recompiled: dict[str, int] = {"leader": 0, "follower": 0}

    def service(name: str, shared: SharedKeys, leader: bool) -> CredentialService:
        async def on_change() -> None:
            recompiled[name] += 1

        options = CredentialOptions(
            listen=(LOOPBACK, 0), public=(LOOPBACK, 0), state_dir=tmp_path / name,
            rotate_every=ROTATE, max_credential_ttl=TTL, publish_lead=LEAD,
        )  # fmt: skip
        return CredentialService(
            options, issuer_keys=lambda _: None, policy=lambda: None, on_change=on_change,
            store=MemoryExchangeStore(clock=clock), clock=clock, shared_keys=shared, is_leader=lambda: leader,
        )  # fmt: skip

    try:
        leader = service("leader", await open_keys(pools[0], clock), True)
        follower = service("follower", await open_keys(pools[1], clock), False)
        assert leader.inputs().jwks == follower.inputs().jwks
        assert follower.status()["signing_keys"]["kind"] == "postgres"  # type: ignore[index]
        feed = ChangeFeed(pools[1])
        assert follower.shared_keys is not None
        feed.subscribe(TOPIC, follower.shared_keys.on_notification)
        tasks = [asyncio.create_task(feed.run(stop)), asyncio.create_task(follower.run(stop))]
        await asyncio.wait_for(feed.listening(), 10)
        clock.now += ROTATE - LEAD
        assert await leader._rotate_keys()
        async with asyncio.timeout(10):
            while recompiled["follower"] == 0:
                await asyncio.sleep(0.01)
        assert follower.inputs().jwks == leader.inputs().jwks and len(follower.keys.keys) == 2
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert len(await rows(pools[0])) == 2  # the follower wrote nothing of its own
    finally:
        stop.set()
        for p in pools:
            await p.close()
