"""What only the PostgreSQL store does: several instances on one database (migrations
under a lock, claims that skip each other's rows, one leader and failover), a newer
schema refused, an unreachable server as StoreUnavailable. The shared contract is in
test_store.py, run on both backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from bridge.client import MillimetricClient, build_http_client
from bridge.errors import ConfigError, StoreUnavailable
from bridge.events import Track
from bridge.sink import DEV_KEY
from bridge.stages.forward import Forwarder, ForwarderConfig
from bridge.store import Delivery, Store, open_store
from bridge.store.postgres import PostgresStore, _migrations
from tests.conftest import RunningSink, free_port, postgres_schema, table_rows

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NOW = 1_800_000_000.0
LEADER_PID = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((classid::bigint << 32) | objid::bigint) = %s"
)


@pytest.fixture
def url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


async def opened(url: str) -> Store:
    store = open_store(url)
    await store.open()
    return store


async def fill(store: Store, n: int, at: float = NOW, start: int = 0) -> None:
    await asyncio.gather(
        *(
            store.accept(
                Delivery(
                    source="test",
                    provider_event_id=f"e{i}",
                    received_at=at,
                    calls=[Track(event="purchase", event_id=f"e{i}")],
                )
            )
            for i in range(start, start + n)
        )
    )


async def test_instances_starting_together_migrate_once(url: str) -> None:
    stores = await asyncio.gather(*(opened(url) for _ in range(5)))
    try:
        versions = await table_rows(stores[0], "SELECT version FROM schema_migrations")
        assert versions == [(version,) for version, _ in _migrations()]  # each once
        await fill(stores[1], 3)
        assert (await stores[4].stats(NOW)).pending == 3
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_newer_database_is_refused(url: str) -> None:
    store = await opened(url)
    await store.close()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 0)")
    with pytest.raises(ConfigError, match="schema version 999, newer than"):
        await opened(url)


async def test_an_unreachable_server_is_store_unavailable_without_the_password() -> None:
    url = f"postgresql://bridge:hunter2-secret@127.0.0.1:{free_port()}/bridge"
    with pytest.raises(StoreUnavailable, match="cannot use") as refused:
        await open_store(url).open()
    assert "hunter2" not in str(refused.value)
    assert "bridge@127.0.0.1" in str(refused.value)


async def test_claims_of_two_instances_never_overlap(url: str) -> None:
    first, second = await opened(url), await opened(url)
    try:
        await fill(first, 600)
        batches = await asyncio.gather(
            *(store.claim("track", 50, 1 << 20, NOW) for _ in range(8) for store in (first, second))
        )
        ids = [row.id for batch in batches for row in batch]
        assert len(ids) == len(set(ids)) == 600  # each row claimed once, none left out
    finally:
        await first.close()
        await second.close()


def terminate_leader(url: str, leader: Store) -> None:
    """Kill the server session holding the leader lock (a vanished machine, a network cut)."""
    assert isinstance(leader, PostgresStore)
    with psycopg.connect(url, autocommit=True) as admin:
        (pid,) = admin.execute(LEADER_PID, (leader.leader_key,)).fetchall()
        admin.execute("SELECT pg_terminate_backend(%s)", pid)


async def test_one_leader_and_failover_when_its_connection_dies(url: str) -> None:
    leader, standby = await opened(url), await opened(url)
    try:
        await fill(leader, 3)
        assert await leader.recover(NOW) == 0  # leads; nothing was claimed before
        assert await standby.recover(NOW) == 0  # does not lead: releases nothing
        in_flight = await leader.claim("track", 10, 1 << 20, NOW)
        assert len(in_flight) == 3
        waiting = asyncio.ensure_future(standby.lead())
        await asyncio.sleep(1.5)
        assert not waiting.done()  # stands by while the leader's lock is held
        terminate_leader(url, leader)
        started = time.monotonic()
        await asyncio.wait_for(leader.lost(), 5)  # the old leader knows it stopped leading
        assert await asyncio.wait_for(waiting, 5) == 3  # the claims of the old leader
        assert time.monotonic() - started < 5
        assert len(await standby.claim("track", 10, 1 << 20, NOW)) == 3
    finally:
        await leader.close()
        await standby.close()


async def test_a_closed_leader_hands_over(url: str) -> None:
    first, second = await opened(url), await opened(url)
    try:
        assert await first.lead() == 0
        waiting = asyncio.ensure_future(second.lead())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await first.close()  # a clean stop (SIGTERM) releases the lock at once
        await asyncio.wait_for(waiting, 3)
    finally:
        await first.close()
        await second.close()


async def test_a_forwarder_that_loses_the_lead_stops_and_another_forwards(
    url: str, sink: RunningSink
) -> None:
    fast = ForwarderConfig(linger=0.02, idle_poll=0.05)
    first, second = await opened(url), await opened(url)
    await fill(first, 300, at=time.time())
    async with build_http_client(timeout=5.0) as http:
        forwarders = [
            Forwarder(store, MillimetricClient(http, key=DEV_KEY, host=sink.url), fast)
            for store in (first, second)
        ]
        try:
            for store, forwarder in zip((first, second), forwarders, strict=True):
                await store.recover(time.time())
                forwarder.start()
            await wait_until(lambda: forwarders[0].leading)
            assert not forwarders[1].leading
            assert forwarders[1].running  # standing by
            terminate_leader(url, first)
            await wait_until(lambda: forwarders[1].leading and not forwarders[0].leading)
            assert forwarders[0].running  # stands by in its turn
            await fill(first, 200, at=time.time(), start=300)  # a standby takes webhooks
            await wait_until(lambda: len(sink.state.seen_event_ids) >= 500)
            for _ in range(100):  # the sink counts an event before the bridge hears back
                if (await second.stats(time.time())).pending == 0:
                    break
                await asyncio.sleep(0.1)
            assert (await second.stats(time.time())).pending == 0
        finally:
            for forwarder in forwarders:
                await forwarder.stop(1)
            await first.close()
            await second.close()
    answers = (await asyncio.to_thread(httpx.get, f"{sink.url}/_sink/stats")).json()["answers"]
    assert not [k for k in answers if k.endswith(" 429")]
    events = await asyncio.to_thread(
        httpx.get, f"{sink.url}/_sink/events", params={"route": "track", "limit": 1000}
    )
    assert {e["body"]["event_id"] for e in events.json()["events"]} == {f"e{i}" for i in range(500)}


async def wait_until(check: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def test_a_fault_in_a_group_commit_reaches_every_caller(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bridge.store.postgres as postgres_store

    store = await opened(url)
    try:

        async def broken(*_args: object) -> None:
            raise RuntimeError("a bug in the group path")

        with monkeypatch.context() as patched:
            patched.setattr(postgres_store, "_append_group", broken)
            waiting = [
                store.append(Delivery(source="test", provider_event_id=f"e{i}", received_at=NOW))
                for i in range(5)
            ]
            answers = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
        assert [type(answer) for answer in answers] == [RuntimeError] * 5  # none left waiting
        later = [_purchase(f"e{i}") for i in range(5, 10)]
        assert await asyncio.gather(*map(store.append, later)) == ["accepted"] * 5
        assert (await store.stats(NOW)).untranslated == 5  # the next group commits as usual
    finally:
        await store.close()


def _purchase(event_id: str) -> Delivery:
    return Delivery(
        source="test",
        provider_event_id=event_id,
        received_at=NOW,
        calls=[Track(event="purchase", event_id=event_id)],
    )


async def test_an_unreachable_database_fails_every_waiting_caller_at_once(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not once per group, nor once more per delivery: each would wait for a connection."""
    store = await opened(url)
    assert isinstance(store, PostgresStore)
    assert store._pool is not None
    tried: list[str] = []
    run = store._run

    async def counted(fn: Callable[..., Any], *args: Any) -> Any:
        tried.append(fn.__name__)
        return await run(fn, *args)

    monkeypatch.setattr(store, "_run", counted)
    try:
        await store._pool.close()  # the database as good as gone
        answers = await asyncio.gather(
            *(store.append(_purchase(f"e{i}")) for i in range(600)), return_exceptions=True
        )
        assert all(isinstance(answer, StoreUnavailable) for answer in answers)
        assert tried == ["_append_group"]
    finally:
        await store.close()


async def test_a_twin_held_by_another_transaction_holds_up_no_other_delivery(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bridge.store.postgres as postgres_store

    monkeypatch.setattr(postgres_store, "GROUP_LOCK_TIMEOUT_MS", 200)
    store = await opened(url)
    try:
        async with await psycopg.AsyncConnection.connect(url) as other:
            # Another instance inserting the same delivery, its transaction still open.
            await other.execute(
                "INSERT INTO inbox (source, provider_event_id, received_at, calls)"
                " VALUES ('test', 'twin', 0, 1)"
            )
            twin = asyncio.create_task(store.append(_purchase("twin")))
            others = [store.append(_purchase(f"e{i}")) for i in range(5)]
            assert await asyncio.wait_for(asyncio.gather(*others), 10) == ["accepted"] * 5
            assert not twin.done()  # it alone waits for the other transaction
            await other.rollback()
        assert await asyncio.wait_for(twin, 10) == "accepted"
    finally:
        await store.close()


async def test_a_committer_cancelled_before_it_ran_leaves_nobody_waiting(url: str) -> None:
    store = await opened(url)
    assert isinstance(store, PostgresStore)
    try:
        waiting = asyncio.create_task(store.append(_purchase("e1")))
        await asyncio.sleep(0)  # the accept is queued, its committer not yet started
        assert store._grouping is not None
        store._grouping.cancel()  # as a loop shutting down does
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 5)
        assert await store.append(_purchase("e2")) == "accepted"  # a new committer
    finally:
        await store.close()
