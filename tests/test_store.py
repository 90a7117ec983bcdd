"""The store contract, run on every backend: a real SQLite file and a real PostgreSQL
schema (the `store` fixture). PostgreSQL's own tests (leadership,
migrations under concurrency) are in test_postgres_store.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bridge.errors import ConfigError, EventInvalid, StoreUnavailable
from bridge.events import About, Alias, Forget, Identify, Output, Track
from bridge.store import (
    Backlog,
    Delivery,
    Retention,
    Selection,
    Store,
    Translation,
    derived_event_id,
    open_store,
    operations,
)
from bridge.store import sqlite as sqlite_store
from bridge.store.operations import CLEANUP_CHUNK
from tests.conftest import table_rows, write_lock_held

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0


def delivery(
    event_id: str = "evt_1",
    *calls: Output,
    source: str = "stripe",
    raw: bytes | None = b'{"id":"evt_1"}',
    at: float = NOW,
) -> Delivery:
    return Delivery(
        source=source,
        provider_event_id=event_id,
        received_at=at,
        raw_body=raw,
        headers={"stripe-signature": "t=1,v1=00"},
        calls=list(calls) or [Track(event="purchase", user_id="u1")],
    )


async def test_accept_then_redelivery_adds_nothing(store: Store) -> None:
    assert await store.accept(delivery()) == "accepted"
    assert await store.accept(delivery()) == "duplicate"
    assert await store.accept(delivery(source="stripe-eu")) == "accepted"
    stats = await store.stats(NOW)
    assert (stats.inbox, stats.pending, stats.raw_payloads) == (2, 2, 2)


async def test_simultaneous_redeliveries_store_once(store: Store) -> None:
    results = await asyncio.gather(*(store.accept(delivery()) for _ in range(50)))
    assert sorted(set(results)) == ["accepted", "duplicate"]
    assert results.count("accepted") == 1
    assert (await store.stats(NOW)).pending == 1


async def test_ignored_delivery_is_recorded_without_rows(store: Store) -> None:
    ignored = Delivery(source="stripe", provider_event_id="evt_x", received_at=NOW)
    assert await store.accept(ignored) == "accepted"
    assert await store.accept(ignored) == "duplicate"
    stats = await store.stats(NOW)
    assert (stats.inbox, stats.pending) == (1, 0)


async def test_every_track_row_gets_a_stable_event_id(store: Store) -> None:
    await store.accept(delivery("evt_9", Track(event="a"), Track(event="b", event_id="own")))
    rows = await store.claim("track", 10, 1 << 20, NOW)
    ids = [msgspec.json.decode(r.body)["event_id"] for r in rows]
    assert ids == [derived_event_id("stripe", "evt_9", 0), "own"]


def test_derived_event_ids_are_recorded_values_unique_to_source_delivery_and_place() -> None:
    # Millimetric dedupes on these ids: one that changed across versions would count a
    # redelivery after an upgrade twice, so they are pinned as they always were.
    assert derived_event_id("stripe", "evt_9", 0) == "97f8b83f5df34b8dd172ad318df4e575"
    assert derived_event_id("stripe", "evt_9", 1) == "9fa3604ebed3816bd7e21bcc1c5b9d84"
    places = [
        (source, delivery_id, index)
        for source in ("stripe", "stripe-eu", "shopify")
        for delivery_id in ("evt_1", "evt_2", "evt_10")
        for index in range(3)
    ]
    # Fields that could run together if joined without a separator stay apart too.
    places += [("stripe", "evt_11", 0), ("stripe", "evt_1", 10), ("stripeevt_1", "", 0)]
    assert len({derived_event_id(*place) for place in places}) == len(places)


async def test_calls_without_an_event_id_never_collide_across_sources_or_places(
    store: Store,
) -> None:
    """Two calls of one delivery, and the same delivery id from two sources: every call
    is its own row, none taken for a redelivery of another."""
    for source in ("stripe", "stripe-eu"):
        calls = (
            Track(event="a", user_id="u1"),
            Track(event="a", user_id="u1"),
            # Links not yet known (a known one is not sent again): each its own row.
            Identify(user_id=f"{source}-u1", anonymous_id="a1"),
            Identify(user_id=f"{source}-u2", anonymous_id="a2"),
        )
        assert await store.accept(delivery("evt_1", *calls, source=source)) == "accepted"
    tracks = await store.claim("track", 10, 1 << 20, NOW)
    ids = [msgspec.json.decode(r.body)["event_id"] for r in tracks]
    assert len(ids) == len(set(ids)) == 4
    assert len(await store.claim("identify", 10, 1 << 20, NOW)) == 4


async def test_claim_respects_count_bytes_and_claims(store: Store) -> None:
    for i in range(10):
        await store.accept(delivery(f"e{i}", Track(event="x", event_id=f"id{i}")))
    first = await store.claim("track", 4, 1 << 20, NOW)
    assert len(first) == 4
    one_size = len(first[0].body) + 1
    second = await store.claim("track", 100, one_size * 3, NOW)
    assert len(second) == 3  # the byte budget, not the count, stopped it
    assert {r.id for r in first}.isdisjoint(r.id for r in second)
    third = await store.claim("track", 100, 1 << 20, NOW)
    assert len(third) == 3
    assert await store.claim("track", 100, 1 << 20, NOW) == []  # all claimed


async def test_a_row_larger_than_the_budget_is_claimed_alone(store: Store) -> None:
    for name in ("big", "bigger"):
        await store.accept(delivery(name, Track(event=name, properties={"p": "y" * 5000})))
    await store.accept(delivery("small", Track(event="small")))
    claims = [await store.claim("track", 100, 100, NOW) for _ in range(4)]
    events = [[msgspec.json.decode(r.body)["event"] for r in rows] for rows in claims]
    assert events == [["big"], ["bigger"], ["small"], []]  # none takes another along


async def test_claim_fills_the_byte_budget_exactly(store: Store) -> None:
    for i in range(5):
        await store.accept(delivery(f"e{i}", Track(event="x", event_id=f"id{i}")))
    everything = await store.claim("track", 100, 1 << 20, NOW)
    ids = [r.id for r in everything]
    one = len(everything[0].body) + 1  # a body and its comma in the batch
    assert {len(r.body) + 1 for r in everything} == {one}
    for budget, taken in ((3 * one, 3), (3 * one - 1, 2), (one, 1), (5 * one, 5)):
        await store.retry(ids, NOW, count_attempt=False)  # all due again
        assert len(await store.claim("track", 100, budget, NOW)) == taken, budget
    await store.retry(ids, NOW, count_attempt=False)
    assert len(await store.claim("track", 4, 1 << 20, NOW)) == 4  # the count, exactly


async def test_retry_makes_rows_due_later_and_counts_attempts(store: Store) -> None:
    await store.accept(delivery())
    (row,) = await store.claim("track", 10, 1 << 20, NOW)
    await store.retry([row.id], NOW + 30, count_attempt=True)
    assert await store.claim("track", 10, 1 << 20, NOW + 29) == []
    (again,) = await store.claim("track", 10, 1 << 20, NOW + 30)
    assert again.attempts == 1
    await store.retry([row.id], NOW + 30, count_attempt=False)  # a 429 is not an attempt
    (third,) = await store.claim("track", 10, 1 << 20, NOW + 30)
    assert third.attempts == 1


async def test_hasten_makes_rows_waiting_on_a_retry_due_now(store: Store) -> None:
    for name in ("failed", "limited", "in_flight", "fresh"):
        await store.accept(delivery(name))
    failed, limited, _in_flight, fresh = await store.claim("track", 10, 1 << 20, NOW)
    await store.retry([failed.id], NOW + 300, count_attempt=True)  # backing off
    await store.retry([limited.id], NOW + 300, count_attempt=False)  # a 429, no attempt
    await store.retry([fresh.id], NOW, count_attempt=False)  # due already
    assert await store.hasten("identify", NOW) == 0  # another route's rows stay
    assert await store.hasten("track", NOW) == 1  # in flight: still claimed, left alone
    due = await store.claim("track", 10, 1 << 20, NOW)
    assert sorted(r.id for r in due) == sorted([failed.id, fresh.id])


async def test_recover_releases_claims_of_a_dead_forwarder(store: Store) -> None:
    await store.accept(delivery())
    assert len(await store.claim("track", 10, 1 << 20, NOW)) == 1
    assert await store.claim("track", 10, 1 << 20, NOW + 1) == []
    assert await store.recover(NOW + 1) == 1
    assert len(await store.claim("track", 10, 1 << 20, NOW + 1)) == 1


async def test_delivered_dead_replay_and_purge(store: Store) -> None:
    for i in range(4):
        await store.accept(delivery(f"e{i}", source="stripe" if i < 3 else "shopify"))
    rows = await store.claim("track", 10, 1 << 20, NOW)
    await store.delivered([rows[0].id], NOW)
    await store.dead_letter([r.id for r in rows[1:]], "400 invalid_payload: nope", NOW)
    stats = await store.stats(NOW)
    assert (stats.pending, stats.delivered, stats.dead) == (0, 1, 3)
    assert await store.backlog() == Backlog(pending=0, dead=3, oldest_pending_at=None)
    dead = await store.dead_letters()
    assert [(d.source, d.reason) for d in dead] == [
        ("stripe", "400 invalid_payload: nope"),
        ("stripe", "400 invalid_payload: nope"),
        ("shopify", "400 invalid_payload: nope"),
    ]
    assert await store.replay(Selection(ids=[dead[0].id]), NOW) == 1
    assert await store.replay(Selection(source="shopify"), NOW) == 1
    assert await store.purge(Selection()) == 1  # the one dead letter left
    stats = await store.stats(NOW)
    assert (stats.pending, stats.delivered, stats.dead) == (2, 1, 0)
    assert await store.backlog() == Backlog(pending=2, dead=0, oldest_pending_at=NOW)
    assert await store.replay(Selection(include_delivered=True, since=NOW - 1), NOW) == 1
    assert (await store.stats(NOW)).pending == 3


async def test_forget_purges_pending_rows_and_raw_payloads(store: Store) -> None:
    await store.accept(
        delivery("e1", Track(event="purchase", user_id="u1"), raw=b'{"customer":"u1","amount":100}')
    )
    await store.accept(
        delivery("e2", Identify(user_id="u1", traits={"plan": "pro"}), raw=b'{"user":"u1"}')
    )
    await store.accept(
        delivery("e3", Track(event="purchase", user_id="u10"), raw=b'{"customer":"u10"}')
    )
    await store.accept(delivery("e4", Forget(user_id="u1"), raw=b'{"deleted":"u1"}'))
    stats = await store.stats(NOW)
    assert stats.pending == 2  # u10's purchase and the forget itself
    assert stats.raw_payloads == 1  # only u10's: u1's deliveries and the forget's own are gone
    assert await store.erase("u1") == 0  # nothing was left for the forwarder's pass
    # Nothing about u1 is stored afterwards, even from a late delivery.
    await store.accept(delivery("e5", Track(event="login", user_id="u1"), raw=b'{"u":"u1"}'))
    stats = await store.stats(NOW)
    assert (stats.pending, stats.raw_payloads) == (2, 1)
    forget = await store.claim("forget", 10, 1 << 20, NOW)
    assert [msgspec.json.decode(r.body) for r in forget] == [{"user_id": "u1"}]


async def test_forget_waits_for_calls_in_flight_then_erases_them(store: Store) -> None:
    await store.accept(
        delivery("e1", Track(event="purchase", user_id="u1"), raw=b'{"customer":"u1"}')
    )
    (in_flight,) = await store.claim("track", 10, 1 << 20, NOW)
    await store.accept(delivery("e2", Forget(user_id="u1")))
    assert await store.claim("forget", 10, 1 << 20, NOW) == []  # must not overtake
    await store.erase("u1")
    await store.delivered([in_flight.id], NOW)
    (forget,) = await store.claim("forget", 10, 1 << 20, NOW)
    await store.delivered([forget.id], NOW)
    await store.erase("u1")
    assert await table_rows(store, "SELECT body FROM outbox") == []
    assert await table_rows(store, "SELECT raw_body FROM inbox WHERE raw_body IS NOT NULL") == []


async def test_a_failed_send_for_a_forgotten_user_is_not_retried(store: Store) -> None:
    await store.accept(delivery("e1", Track(event="purchase", user_id="u1")))
    (row,) = await store.claim("track", 10, 1 << 20, NOW)
    await store.accept(delivery("e2", Forget(user_id="u1")))
    await store.retry([row.id], NOW, count_attempt=True)
    assert await store.claim("track", 10, 1 << 20, NOW) == []
    assert len(await store.claim("forget", 10, 1 << 20, NOW)) == 1


async def beside_a_forget(store: Store, n: int, user: str, work: Awaitable[None]) -> None:
    """Run `work` while the user's forget is accepted, starting it a little later each
    round `n` (so that some rounds fall inside the forget's transaction); then nothing
    about the user is left to send, and the forget goes."""

    async def later() -> None:
        await asyncio.sleep(n * 0.0002)
        await work

    await asyncio.gather(later(), store.accept(delivery(f"f{n}", Forget(user_id=user))))
    assert await store.claim("track", 10, 1 << 20, NOW) == [], f"round {n}"
    (forget,) = await store.claim("forget", 10, 1 << 20, NOW)
    await store.delivered([forget.id], NOW)


async def test_a_send_failing_while_its_user_is_forgotten_is_never_sent_again(
    store: Store,
) -> None:
    """A failed send returned to the queue while its user's forget is accepted: either the
    forget erases the returned row or the return drops it, never neither (on PostgreSQL
    they were two transactions each reading before the other committed: CI saw the user's
    identify sent after their forget was accepted)."""
    for n in range(40):
        user = f"u_race_{n}"
        await store.accept(delivery(f"e{n}", Track(event="purchase", user_id=user)))
        (row,) = await store.claim("track", 10, 1 << 20, NOW)
        await beside_a_forget(store, n, user, store.retry([row.id], NOW, count_attempt=False))


async def test_a_batch_translated_while_its_user_is_forgotten_queues_nothing_about_them(
    store: Store,
) -> None:
    """A translated batch about a user recorded while the user's forget is accepted (an
    operator's forget on one instance, the translate stage on another): either the batch
    sees the forget and queues nothing about the user, or the forget erases what it
    queued; never a call left to be sent about a forgotten user."""
    for n in range(40):
        user = f"u_batch_{n}"
        await store.append(raw_delivery(f"t{n}"))
        (stored,) = await store.untranslated(10)
        batch = [Translation(delivery=stored, outputs=[Track(event="purchase", user_id=user)])]
        await beside_a_forget(store, n, user, store.record(batch))


async def test_cleanup_follows_retention(store: Store) -> None:
    day = 86400.0
    await store.accept(delivery("old", at=NOW - 40 * day))
    await store.accept(delivery("recent", at=NOW - 8 * day))
    await store.accept(delivery("new", at=NOW))
    rows = await store.claim("track", 10, 1 << 20, NOW)
    await store.delivered([rows[0].id, rows[1].id], NOW - 8 * day)
    counts = await store.cleanup(Retention(), NOW)
    assert counts == {"delivered": 2, "raw_payloads": 2, "inbox": 1}
    stats = await store.stats(NOW)
    assert (stats.inbox, stats.raw_payloads, stats.delivered, stats.pending) == (2, 1, 0, 1)


async def test_cleanup_goes_on_past_its_first_chunk(store: Store) -> None:
    """Retention drops rows in chunks of 5,000, each its own transaction: more than one
    chunk is dropped in full, and what is within retention stays."""
    day = 86400.0
    many = [Track(event="x", event_id=f"bulk{i}") for i in range(CLEANUP_CHUNK + 1)]
    await store.accept(delivery("bulk", *many, at=NOW - 8 * day))
    await store.accept(delivery("new", at=NOW))
    rows = await store.claim("track", 2 * len(many), 1 << 30, NOW)
    assert len(rows) == len(many) + 1
    await store.delivered([r.id for r in rows], NOW - 8 * day)
    counts = await store.cleanup(Retention(), NOW)
    assert counts == {"delivered": len(many) + 1, "raw_payloads": 1, "inbox": 0}
    assert (await store.stats(NOW)).delivered == 0


async def test_erasing_a_user_takes_every_call_however_many(store: Store) -> None:
    many = [Track(event="x", event_id=f"u1-{i}", user_id="u1") for i in range(CLEANUP_CHUNK + 1)]
    await store.accept(delivery("bulk", *many))
    await store.accept(delivery("other", Track(event="x", event_id="u2-0", user_id="u2")))
    assert await store.erase("u1") == len(many) + 1  # the calls and the raw payload
    (left,) = await store.claim("track", 2 * len(many), 1 << 30, NOW)
    assert msgspec.json.decode(left.body)["user_id"] == "u2"


async def test_cleanup_of_every_kind_goes_on_past_a_chunk(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operations, "CLEANUP_CHUNK", 3)  # 3 rows a chunk: 7 make three
    day = 86400.0
    for i in range(7):
        await store.accept(delivery(f"old{i}", at=NOW - 40 * day))
    await store.accept(delivery("new", at=NOW))
    rows = await store.claim("track", 100, 1 << 30, NOW)
    await store.delivered([r.id for r in rows[:7]], NOW - 8 * day)
    counts = await store.cleanup(Retention(), NOW)
    assert counts == {"delivered": 7, "raw_payloads": 7, "inbox": 7}
    stats = await store.stats(NOW)
    assert (stats.inbox, stats.raw_payloads, stats.delivered, stats.pending) == (1, 1, 0, 1)


async def test_paused_reason_is_shared_through_the_store(store: Store) -> None:
    await store.set_paused("401 invalid_api_key")
    assert (await store.stats(NOW)).paused == "401 invalid_api_key"
    await store.set_paused(None)
    assert (await store.stats(NOW)).paused is None


async def test_concurrent_accepts_all_survive_a_reopen(database_url: str) -> None:
    url = database_url
    first = open_store(url)
    await first.open()
    await asyncio.gather(*(first.accept(delivery(f"e{i}")) for i in range(1000)))
    await first.close()
    again = open_store(url)
    await again.open()
    try:
        assert (await again.stats(NOW)).pending == 1000
    finally:
        await again.close()


async def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=999")
    db.close()
    store = open_store(f"sqlite:///{path}")
    with pytest.raises(ConfigError, match="schema version 999, newer than"):
        await store.open()


async def test_an_unusable_database_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "bridge.db").mkdir()
    with pytest.raises(StoreUnavailable, match="sqlite"):
        await open_store(f"sqlite:///{tmp_path}/bridge.db").open()


async def test_operations_on_a_closed_store_fail_clearly(database_url: str) -> None:
    store = open_store(database_url)
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.stats(time.time())
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.backlog()


async def test_a_forget_claim_drops_stale_rows_of_the_user(store: Store) -> None:
    await store.accept(delivery("e1", Track(event="purchase", user_id="u1")))
    await store.claim("track", 10, 1 << 20, NOW)  # a send that never came back
    await store.accept(delivery("e2", Forget(user_id="u1")))
    assert await store.claim("forget", 10, 1 << 20, NOW) == []  # its lease still runs
    # Once the lease is over the stale row is dropped and the forget can go.
    assert len(await store.claim("forget", 10, 1 << 20, NOW + 3600)) == 1
    assert await store.claim("track", 10, 1 << 20, NOW + 3600) == []


async def test_recover_drops_released_rows_of_a_forgotten_user(store: Store) -> None:
    await store.accept(delivery("e1", Track(event="purchase", user_id="u1")))
    await store.claim("track", 10, 1 << 20, NOW)
    await store.accept(delivery("e2", Forget(user_id="u1")))
    await store.recover(NOW)
    assert await store.claim("track", 10, 1 << 20, NOW) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_one_forwarder_per_database_file(store: Store, tmp_path: Path) -> None:
    await store.recover(NOW)
    other = open_store(f"sqlite:///{tmp_path}/bridge.db")
    await other.open()
    try:
        with pytest.raises(StoreUnavailable, match="another millimetric-bridge process"):
            await other.recover(NOW)
    finally:
        await other.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_counting_needs_no_write_lock_and_the_backlog_says_when_intake_has_none(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counting whole tables runs beside the writer, not on it (where every delivery
    # waited behind it): an `outbox` command holding the write lock does not stop it.
    # The backlog, which /readyz serves, still says that intake cannot write.
    await store.accept(delivery("e1"))
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 300)
    await store._call(lambda conn: conn.execute("PRAGMA busy_timeout=300"))  # type: ignore[attr-defined]
    with write_lock_held(tmp_path / "bridge.db"):
        stats = await store.stats(NOW)
        assert (stats.inbox, stats.pending, stats.raw_payloads) == (1, 1, 1)
        assert len(await store.dead_letters()) == 0
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.backlog()
    assert (await store.backlog()).pending == 1


async def test_aliases_and_forgetting_a_visitor(store: Store) -> None:
    from bridge.events import Alias, ForgetVisitor

    await store.accept(
        delivery(
            "e1",
            Alias(alias="stripe:cus_1", anonymous_id="b1"),
            Track(event="purchase", anonymous_id="stripe:cus_1", user_id="u1"),
        )
    )
    await store.accept(delivery("e2", Track(event="renewal", anonymous_id="stripe:cus_1")))
    rows = await store.claim("track", 10, 1 << 20, NOW)
    bodies = [msgspec.json.decode(r.body) for r in rows]
    assert [(b["anonymous_id"], b.get("user_id")) for b in bodies] == [("b1", "u1"), ("b1", "u1")]
    await store.delivered([r.id for r in rows], NOW)
    await store.accept(delivery("e3", ForgetVisitor(anonymous_id="stripe:cus_1")))
    (forget,) = await store.claim("forget", 10, 1 << 20, NOW)
    assert msgspec.json.decode(forget.body) == {"user_id": "u1"}
    left = await table_rows(
        store, "SELECT (SELECT COUNT(*) FROM identities), (SELECT COUNT(*) FROM aliases)"
    )
    assert left == [(0, 0)]
    # An unknown visitor has no user to forget: nothing is queued.
    await store.accept(delivery("e4", ForgetVisitor(anonymous_id="stripe:cus_unknown")))
    assert await store.claim("forget", 10, 1 << 20, NOW) == []


async def through_the_pipeline(store: Store, deliveries: list[Delivery]) -> list[str]:
    """Append concurrently (group commit), then translate in one batch as the stage does,
    each delivery becoming the calls it carries."""
    results = await asyncio.gather(*(store.append(d) for d in deliveries))
    outputs: dict[tuple[str, str], list[Output]] = {}
    for d in deliveries:  # a twin's copy is a duplicate: the first one is translated
        outputs.setdefault((d.source, d.provider_event_id), d.calls)
    stored = await store.untranslated(10_000)
    await store.record(
        [Translation(delivery=s, outputs=outputs[(s.source, s.provider_event_id)]) for s in stored]
    )
    return list(results)


async def test_deliveries_taken_together_keep_their_answers_and_order(store: Store) -> None:
    """Concurrent appends share a commit and a batch is translated in one transaction (on
    PostgreSQL, simple deliveries in a few statements): each caller still gets its own
    answer, twins in one group store once, a delivery's calls keep their order, and a
    forgotten user's calls are neither stored nor sent."""
    await store.accept(delivery("gone", Forget(user_id="u-gone")))
    batch = [
        delivery(
            f"e{i}",
            Identify(user_id=f"u{i}", traits={"plan": "pro"}),
            Track(event="purchase", user_id=f"u{i}"),
        )
        for i in range(40)
    ]
    batch += [delivery("e7"), delivery("e7")]  # twins of one already in the group
    batch.append(delivery("about-gone", Track(event="purchase", user_id="u-gone")))
    batch.append(Delivery(source="stripe", provider_event_id="ignored", received_at=NOW))
    results = await through_the_pipeline(store, batch)
    assert results == ["accepted"] * 40 + ["duplicate", "duplicate", "accepted", "accepted"]
    tracks = await store.claim("track", 1000, 1 << 24, NOW)
    identifies = await store.claim("identify", 1000, 1 << 24, NOW)
    assert sorted(msgspec.json.decode(r.body)["user_id"] for r in tracks) == sorted(
        f"u{i}" for i in range(40)
    )
    assert len(identifies) == 40
    # Within each delivery, the identify was stored before the track.
    first_of = {msgspec.json.decode(r.body)["user_id"]: r.id for r in identifies}
    assert all(first_of[msgspec.json.decode(r.body)["user_id"]] < r.id for r in tracks)
    raw = await table_rows(
        store, "SELECT provider_event_id FROM inbox WHERE raw_body IS NOT NULL ORDER BY 1"
    )
    assert "about-gone" not in {event_id for (event_id,) in raw}
    stats = await store.stats(NOW)
    assert stats.inbox == 43  # the forget, 40, the forgotten user's and the ignored one
    assert stats.pending == 81  # 40 identifies, 40 tracks and the forget


async def test_visitors_tracked_together_carry_what_is_known_of_them(store: Store) -> None:
    from bridge.events import Alias

    await store.accept(
        delivery(
            "link",
            Alias(alias="stripe:cus_1", anonymous_id="b1"),
            Identify(anonymous_id="b1", user_id="u1"),
            Identify(anonymous_id="b2", user_id="u2"),
        )
    )
    await store.delivered([r.id for r in await store.claim("identify", 10, 1 << 20, NOW)], NOW)
    visitors = ["stripe:cus_1", "b1", "b2", "stripe:cus_unknown"] * 5
    await through_the_pipeline(
        store,
        [
            delivery(f"p{i}", Track(event="purchase", anonymous_id=visitor))
            for i, visitor in enumerate(visitors)
        ],
    )
    rows = await store.claim("track", 100, 1 << 24, NOW)
    seen = {
        (b["anonymous_id"], b.get("user_id"))
        for b in map(msgspec.json.decode, (r.body for r in rows))
    }
    assert len(rows) == 20
    assert seen == {("b1", "u1"), ("b2", "u2"), ("stripe:cus_unknown", None)}
    subjects = await table_rows(store, "SELECT DISTINCT subject FROM outbox WHERE route = 'track'")
    assert len(subjects) == 3  # u1's, u2's, and none for the unknown visitor


async def test_nul_and_the_escape_character_are_stored_faithfully(store: Store) -> None:
    """PostgreSQL's text cannot hold NUL; ids come from what visitors control (a cart
    attribute, checkout metadata). Such a delivery once failed with 503 for ever."""
    odd = ["evt_\x00nul", "b\x00", "\uffff0", "\uffff\x00\uffff", "plain"]
    good = [delivery(f"e{i}") for i in range(20)]
    nul = [
        delivery(
            f"{value}:{n}",
            Track(event="purchase", event_id=f"p:{value}", anonymous_id=value, user_id=value),
        )
        for n, value in enumerate(odd)
    ]
    results = await asyncio.gather(*(store.accept(d) for d in [*good[:10], *nul, *good[10:]]))
    assert results == ["accepted"] * 25
    assert await store.accept(nul[0]) == "duplicate"  # its id compares as it was sent
    # Learned and put on a later call, the id comes back as it was.
    await store.accept(delivery("later", Track(event="renewal", anonymous_id="b\x00")))
    rows = await store.claim("track", 100, 1 << 20, NOW)
    bodies = [msgspec.json.decode(r.body) for r in rows]
    sent = {b["event_id"]: b for b in bodies}
    assert {f"p:{v}" for v in odd} <= set(sent)
    assert [b.get("user_id") for b in bodies if b["event"] == "renewal"] == ["b\x00"]
    odd_rows = [r.id for r, b in zip(rows, bodies, strict=True) if b["event_id"][:2] == "p:"]
    await store.dead_letter(odd_rows, "invalid \x00 value", NOW)
    dead = await store.dead_letters()
    assert sorted((d.event_id or "", d.reason) for d in dead) == sorted(
        (f"p:{v}", "invalid \x00 value") for v in odd
    )


# -- erasure by links: what the bridge knows links to the user, never a substring ----------


def raw(*args: Any) -> bytes:
    return msgspec.json.encode({"data": list(args)})


async def pending_users(store: Store) -> list[str | None]:
    rows = await store.claim("track", 100, 1 << 20, NOW)
    await store.retry([r.id for r in rows], NOW, count_attempt=False)
    return [msgspec.json.decode(r.body).get("user_id") for r in rows]


async def kept_raw(store: Store) -> list[bytes]:
    rows = await table_rows(store, "SELECT raw_body FROM inbox WHERE raw_body IS NOT NULL")
    return sorted(bytes(body) for (body,) in rows)


async def test_forgetting_a_short_id_leaves_other_users_data_alone(store: Store) -> None:
    """Forgetting user "1" once deleted every pending call whose body held `"quantity":1`."""
    await store.accept(
        delivery("e1", Track(event="purchase", user_id="1"), raw=raw("buyer 1", "quantity", 1))
    )
    for n in (2, 3):
        await store.accept(
            delivery(
                f"e{n}",
                Track(event="purchase", user_id=f"u{n}", properties={"quantity": 1}),
                raw=raw(f"buyer u{n}", {"quantity": 1, "id": "1"}),
            )
        )
    await store.accept(delivery("e9", Forget(user_id="1"), raw=None))
    assert await store.erase("1") == 0
    assert await pending_users(store) == ["u2", "u3"]
    assert await kept_raw(store) == sorted(
        [raw("buyer u2", {"quantity": 1, "id": "1"}), raw("buyer u3", {"quantity": 1, "id": "1"})]
    )


async def test_a_blank_user_id_is_refused_before_anything_is_erased(store: Store) -> None:
    await store.accept(delivery("e1", Track(event="purchase", user_id="u1")))
    for blank in ("", " ", "\t\n"):
        with pytest.raises(EventInvalid, match="user_id"):
            Forget(user_id=blank)
    assert await store.erase("u2") == 0
    assert await pending_users(store) == ["u1"]


async def test_forget_reaches_the_visitors_learned_for_the_user(store: Store) -> None:
    """A visitor's purchase stored before the bridge learned who the visitor is, and the
    deliveries of a customer id aliased to that visitor, are the user's too."""
    await store.accept(
        delivery("e1", Track(event="purchase", anonymous_id="b1"), raw=raw("browser b1 bought"))
    )
    await store.accept(
        delivery(
            "e2",
            Alias(alias="stripe:cus_1", anonymous_id="b1"),
            Track(event="renewal", anonymous_id="stripe:cus_1"),
            raw=raw("invoice of cus_1", "jane@example.org"),
        )
    )
    await store.accept(
        delivery("e3", Track(event="purchase", anonymous_id="b2"), raw=raw("browser b2 bought"))
    )
    await store.accept(delivery("e4", Identify(user_id="u1", anonymous_id="b1"), raw=raw("link")))
    await store.accept(delivery("e5", Forget(user_id="u1"), raw=None))
    assert await pending_users(store) == [None]  # b2's purchase alone is left
    assert await kept_raw(store) == [raw("browser b2 bought")]
    assert await table_rows(store, "SELECT COUNT(*) FROM identities") == [(0,)]


async def test_a_visitors_call_in_flight_holds_the_forget_back(store: Store) -> None:
    await store.accept(delivery("e1", Track(event="purchase", anonymous_id="b1")))
    (in_flight,) = await store.claim("track", 10, 1 << 20, NOW)
    await store.accept(delivery("e2", Identify(user_id="u1", anonymous_id="b1")))
    await store.accept(delivery("e3", Forget(user_id="u1")))
    assert await store.claim("forget", 10, 1 << 20, NOW) == []  # must not overtake it
    await store.delivered([in_flight.id], NOW)
    (forget,) = await store.claim("forget", 10, 1 << 20, NOW)
    await store.delivered([forget.id], NOW)
    await store.erase("u1")
    assert await table_rows(store, "SELECT body FROM outbox WHERE route = 'track'") == []


async def test_identifiers_declared_by_the_handler_are_erased_with_the_user(store: Store) -> None:
    """A Shopify customer's order that became no call, and a Stripe customer's invoices
    that never named the app's user: reached through the identifiers their handler
    declared, beside the forget or as the forgotten user's id itself."""
    shop = "shopify:shop1.myshopify.com:9"
    await store.accept(
        delivery("o1", About(identifier=shop), source="shopify", raw=raw("order", "jane"))
    )
    await store.accept(
        delivery(
            "o2",
            About(identifier="shopify:shop1.myshopify.com:10"),
            source="shopify",
            raw=raw("order", "john"),
        )
    )
    await store.accept(delivery("r1", Forget(user_id=shop), source="shopify", raw=None))
    assert await kept_raw(store) == [raw("order", "john")]

    await store.accept(
        delivery(
            "i1",
            About(identifier="stripe:cus_7"),
            Track(event="purchase", anonymous_id="stripe:cus_7"),
            raw=raw("invoice", "jane"),
        )
    )
    await store.accept(
        delivery("i2", Track(event="purchase", anonymous_id="stripe:cus_8"), raw=raw("other"))
    )
    await store.accept(
        delivery("d1", About(identifier="stripe:cus_7"), Forget(user_id="u7"), raw=raw("gone"))
    )
    assert await pending_users(store) == [None]
    assert await kept_raw(store) == [raw("order", "john"), raw("other")]


async def test_forgetting_an_unknown_visitor_drops_what_is_stored_about_them(
    store: Store,
) -> None:
    from bridge.events import ForgetVisitor

    await store.accept(
        delivery("e1", Track(event="purchase", anonymous_id="stripe:cus_1"), raw=raw("cus_1"))
    )
    await store.accept(
        delivery("e2", Track(event="purchase", anonymous_id="stripe:cus_2"), raw=raw("cus_2"))
    )
    await store.accept(delivery("e3", ForgetVisitor(anonymous_id="stripe:cus_1"), raw=None))
    assert await kept_raw(store) == [raw("cus_2")]
    assert await store.claim("forget", 10, 1 << 20, NOW) == []  # nobody to forget there
    assert len(await pending_users(store)) == 2  # anonymous calls are not the store's to drop


# -- the pipeline: append, translate (record), quarantine, retranslate -----------------------


def raw_delivery(event_id: str, body: bytes = b'{"id":"x"}', source: str = "stripe") -> Delivery:
    return Delivery(
        source=source,
        provider_event_id=event_id,
        received_at=NOW,
        raw_body=body,
        headers={"stripe-signature": "t=1,v1=00", "x-topic": "orders/paid"},
    )


async def test_a_group_of_appends_answers_each_delivery_and_stores_each_once(
    store: Store,
) -> None:
    """Appends taken in one commit share it: a redelivery of a stored delivery, or a twin
    in the same group, must still get its own `duplicate`, and every other delivery its
    `accepted`, stored once with its own fields, however many arrive at once."""
    assert await store.append(raw_delivery("old", b'{"id":"old"}')) == "accepted"
    fresh = [raw_delivery(f"g{i}", f'{{"id":"g{i}"}}'.encode()) for i in range(300)]
    results = await asyncio.gather(*(store.append(d) for d in fresh))
    assert results == ["accepted"] * 300
    mixed = [
        raw_delivery("n1"),
        raw_delivery("old"),  # stored before: a redelivery
        raw_delivery("n2"),
        raw_delivery("n2"),  # its twin, in the same group
        raw_delivery("g7"),
        raw_delivery("n1", source="shopify"),  # the same id from another source is new
    ]
    results = await asyncio.gather(*(store.append(d) for d in mixed))
    assert results == ["accepted", "duplicate", "accepted", "duplicate", "duplicate", "accepted"]
    stored = await store.untranslated(1000)
    assert len(stored) == 1 + 300 + 3
    assert Counter((d.source, d.provider_event_id) for d in stored).most_common(1)[0][1] == 1
    by_id = {d.provider_event_id: d for d in stored if d.source == "stripe"}
    assert by_id["g123"].raw_body == b'{"id":"g123"}'
    assert by_id["old"].raw_body == b'{"id":"old"}'  # the redelivery changed nothing
    assert by_id["g299"].headers == {"stripe-signature": "t=1,v1=00", "x-topic": "orders/paid"}


async def test_appended_deliveries_wait_untranslated_in_arrival_order(store: Store) -> None:
    # Deliveries arriving together share a commit (their order among them is the
    # server's); those arriving one after the other wait in that order.
    results = await asyncio.gather(*(store.append(raw_delivery(f"e{i}")) for i in range(30)))
    assert results == ["accepted"] * 30
    for n in range(30, 35):
        assert await store.append(raw_delivery(f"e{n}")) == "accepted"
    assert await store.append(raw_delivery("e3")) == "duplicate"
    waiting = await store.untranslated(100)
    names = [d.provider_event_id for d in waiting]
    assert sorted(names[:30]) == sorted(f"e{i}" for i in range(30))
    assert names[30:] == [f"e{n}" for n in range(30, 35)]
    assert waiting[0].headers == {"stripe-signature": "t=1,v1=00", "x-topic": "orders/paid"}
    assert waiting[0].raw_body == b'{"id":"x"}'
    backlog = await store.backlog()
    assert (backlog.untranslated, backlog.oldest_untranslated_at, backlog.pending) == (35, NOW, 0)
    assert [d.id for d in await store.untranslated(2)] == [d.id for d in waiting[:2]]


async def test_recorded_translations_queue_calls_once(store: Store) -> None:
    for name in ("e1", "e2", "e3"):
        await store.append(raw_delivery(name))
    first, second, third = await store.untranslated(10)
    purchase = Track(event="purchase", event_id="purchase:in_1", user_id="u1")
    await store.record(
        [
            Translation(delivery=first, outputs=[purchase]),
            # The same payment named by a second event: one call, never two.
            Translation(delivery=second, outputs=[purchase, Identify(user_id="u1")]),
            Translation(delivery=third, failure="payload: not a Stripe event"),
        ]
    )
    # Recorded again (another translator, or a retry): nothing more.
    await store.record([Translation(delivery=first, outputs=[purchase])])
    assert await store.untranslated(10) == []
    rows = await store.claim("track", 10, 1 << 20, NOW)
    assert [msgspec.json.decode(r.body)["event_id"] for r in rows] == ["purchase:in_1"]
    assert len(await store.claim("identify", 10, 1 << 20, NOW)) == 1
    stats = await store.stats(NOW)
    assert (stats.untranslated, stats.quarantined, stats.raw_payloads) == (0, 1, 3)
    (letter,) = await store.dead_letters()
    assert (letter.kind, letter.id, letter.source, letter.provider_event_id) == (
        "delivery",
        third.id,
        "stripe",
        "e3",
    )
    assert letter.reason == "payload: not a Stripe event"
    assert letter.body == b'{"id":"x"}'


async def test_retranslating_queues_only_what_is_not_queued_or_sent(store: Store) -> None:
    for name in ("e1", "e2"):
        await store.append(raw_delivery(name))
    good, bad = await store.untranslated(10)
    track = Track(event="purchase", event_id="purchase:1", user_id="u1")
    await store.record(
        [
            Translation(delivery=good, outputs=[track, Identify(user_id="u1", traits={"a": 1})]),
            Translation(delivery=bad, failure="handler: KeyError"),
        ]
    )
    sent = await store.claim("track", 10, 1 << 20, NOW)
    await store.delivered([r.id for r in sent], NOW)
    assert await store.retranslate(Selection(deliveries=[bad.id])) == 1
    assert await store.retranslate(Selection(source="stripe")) == 1  # the translated one
    again = await store.untranslated(10)
    assert [d.id for d in again] == [good.id, bad.id]
    fixed = Track(event="purchase", event_id="purchase:2", user_id="u2")
    await store.record(
        [
            Translation(
                delivery=again[0], outputs=[track, Identify(user_id="u1", traits={"a": 1})]
            ),
            Translation(delivery=again[1], outputs=[fixed]),
        ]
    )
    rows = await store.claim("track", 10, 1 << 20, NOW)
    assert [msgspec.json.decode(r.body)["event_id"] for r in rows] == ["purchase:2"]
    assert len(await store.claim("identify", 10, 1 << 20, NOW)) == 1  # queued once in all
    assert (await store.stats(NOW)).quarantined == 0
    assert await store.dead_letters() == []


async def test_a_quarantined_delivery_is_kept_past_retention_until_purged(store: Store) -> None:
    day = 86400.0
    await store.append(raw_delivery("old"))
    (stored,) = await store.untranslated(10)
    await store.record([Translation(delivery=stored, failure="event: properties too large")])
    await store.cleanup(Retention(), NOW + 60 * day)
    assert (await store.stats(NOW)).raw_payloads == 1
    assert await store.purge(Selection(ids=[stored.id])) == 0  # an outbox id names no delivery
    assert await store.purge(Selection(deliveries=[stored.id])) == 1
    stats = await store.stats(NOW)
    assert (stats.quarantined, stats.raw_payloads, stats.inbox) == (0, 0, 1)
    assert await store.append(raw_delivery("old")) == "duplicate"  # still recognised
    assert await store.retranslate(Selection(deliveries=[stored.id])) == 0  # nothing left


async def test_a_forget_reaches_deliveries_translated_after_it(store: Store) -> None:
    """Erasure wins over the pipeline: a delivery about the user that arrived before the
    forget but is translated after it is neither queued nor kept."""
    await store.append(raw_delivery("e1", b'{"email":"u1@example.org"}'))
    await store.accept(delivery("f1", Forget(user_id="u1"), raw=None))
    (stored,) = await store.untranslated(10)
    await store.record([Translation(delivery=stored, outputs=[Track(event="x", user_id="u1")])])
    assert await store.claim("track", 10, 1 << 20, NOW) == []
    assert (await store.stats(NOW)).raw_payloads == 0


async def quarantine(store: Store, *bodies: bytes) -> list[int]:
    """Deliveries of these bodies, appended and quarantined; their inbox ids."""
    for n, body in enumerate(bodies):
        await store.append(raw_delivery(f"q{n}-{len(body)}", body))
    stored = await store.untranslated(len(bodies))
    await store.record([Translation(delivery=d, failure="handler: KeyError 'x'") for d in stored])
    return [d.id for d in stored]


async def test_a_forget_erases_quarantined_deliveries_that_name_the_user(store: Store) -> None:
    """A quarantined delivery has no links (its handler could not say whom it is about):
    a forget reads its body, and erases it when a whole string value names the user, a
    visitor learned for them or an identifier declared beside the forget; a number or a
    part of a value names nobody."""
    await store.accept(delivery("e0", Identify(user_id="u1", anonymous_id="anon_7")))
    about_user, about_visitor, about_customer, others = await quarantine(
        store,
        b'{"data":{"object":{"metadata":{"millimetric_user_id":"u1"}}}}',
        b'{"visitor":["x",{"id":"anon_7"}]}',
        b'{"customer":"shop:42"}',
        b'{"pending_webhooks":1,"user":"u10","note":"u1 and more","u1":"key, not value"}',
    )
    assert (
        await store.accept(
            delivery("f1", Forget(user_id="u1"), About(identifier="shop:42"), raw=None)
        )
        == "accepted"
    )
    letters = await store.dead_letters()
    assert [(d.id, d.body) for d in letters] == [
        (others, b'{"pending_webhooks":1,"user":"u10","note":"u1 and more","u1":"key, not value"}')
    ]
    stats = await store.stats(NOW)
    assert (stats.quarantined, stats.raw_payloads) == (1, 1)
    # Gone for good: nothing left to translate again.
    selection = Selection(deliveries=[about_user, about_visitor, about_customer])
    assert await store.retranslate(selection) == 0


async def test_a_delivery_quarantined_after_its_user_was_forgotten_is_erased(
    store: Store,
) -> None:
    await store.accept(delivery("f1", Forget(user_id="u1"), raw=None))
    kept, erased = await quarantine(store, b'{"user":"u2"}', b'{"user":{"id":"u1"}}')
    (letter,) = await store.dead_letters()
    assert letter.id == kept
    assert (await store.stats(NOW)).raw_payloads == 1
    assert await store.retranslate(Selection(deliveries=[erased])) == 0


async def test_forgetting_a_visitor_erases_quarantined_deliveries_naming_it(store: Store) -> None:
    from bridge.events import ForgetVisitor

    kept, erased = await quarantine(store, b'{"anonymous_id":"anon_8"}', b'["anon_9"]')
    await store.accept(delivery("f1", ForgetVisitor(anonymous_id="anon_9"), raw=None))
    assert [d.id for d in await store.dead_letters()] == [kept]
    assert await store.retranslate(Selection(deliveries=[erased])) == 0


async def test_received_says_which_deliveries_of_a_source_the_inbox_holds(store: Store) -> None:
    ids = ["evt_0", "evt_1", "evt_\x00nul", "evt_2"]
    for i, event_id in enumerate(ids):
        await store.append(
            Delivery(
                source="stripe", provider_event_id=event_id, received_at=NOW + i, raw_body=b"{}"
            )
        )
    await store.append(
        Delivery(source="stripe-eu", provider_event_id="evt_9", received_at=NOW - 9, raw_body=b"{}")
    )
    asked = ["evt_0", "evt_2", "evt_\x00nul", "evt_9", "evt_x"]
    assert await store.received("stripe", asked) == {"evt_0", "evt_2", "evt_\x00nul"}
    assert await store.received("stripe-eu", asked) == {"evt_9"}
    assert await store.received("stripe", []) == set()
    many = [f"evt_absent_{i}" for i in range(1200)] + ["evt_1"]  # more than one statement takes
    assert await store.received("stripe", many) == {"evt_1"}
    assert await store.first_received("stripe") == NOW
    assert await store.first_received("stripe-eu") == NOW - 9
    assert await store.first_received("paddle") is None


async def test_the_reconcile_checkpoint_is_kept_per_source_across_a_reopen(
    database_url: str,
) -> None:
    store = open_store(database_url)
    await store.open()
    assert await store.reconciled_until("stripe") is None
    await store.set_reconciled_until("stripe", NOW + 0.123456789)
    await store.set_reconciled_until("stripe-eu", NOW - 5)
    await store.set_reconciled_until("stripe", NOW + 1.5)  # the next window's end
    await store.set_paused("401 invalid_api_key")
    await store.close()
    again = open_store(database_url)
    await again.open()
    try:
        assert await again.reconciled_until("stripe") == NOW + 1.5
        assert await again.reconciled_until("stripe-eu") == NOW - 5
        assert await again.reconciled_until("paddle") is None
        assert (await again.stats(NOW)).paused == "401 invalid_api_key"  # untouched
    finally:
        await again.close()
