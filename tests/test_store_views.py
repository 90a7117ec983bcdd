"""The console's reads from the store (`bridge.store.views`), on every backend."""

from __future__ import annotations

import pytest

from bridge.events import Track
from bridge.store import Delivery, Store, Translation

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0


async def stored(
    store: Store, event_id: str, at: float, *, source: str = "stripe", fails: bool = False
) -> int:
    """A delivery appended and translated (or quarantined); its inbox id."""
    await store.append(
        Delivery(
            source=source,
            provider_event_id=event_id,
            received_at=at,
            raw_body=b'{"id":"%s"}' % event_id.encode(),
            headers={"x-topic": "orders/paid"},
        )
    )
    (waiting,) = await store.untranslated(10)
    await store.record(
        [
            Translation(delivery=waiting, failure="KeyError: 'data'")
            if fails
            else Translation(
                delivery=waiting, outputs=[Track(event="purchase", user_id=f"u-{event_id}")]
            )
        ]
    )
    return waiting.id


async def test_deliveries_newest_first_filtered_and_paged(store: Store) -> None:
    ids = [
        await stored(store, f"e{i}", NOW + i, source="stripe" if i % 2 else "shopify")
        for i in range(7)
    ]
    bad = await stored(store, "bad", NOW + 10, fails=True)
    newest = await store.deliveries(limit=3)
    assert [d.id for d in newest] == [bad, ids[6], ids[5]]
    assert newest[0].state == "quarantined"
    assert (newest[1].calls, newest[1].pending, newest[1].delivered, newest[1].dead) == (1, 1, 0, 0)
    following = await store.deliveries(before=newest[-1].id, limit=3)
    assert [d.id for d in following] == [ids[4], ids[3], ids[2]]
    stripe = await store.deliveries(source="stripe")
    assert [d.provider_event_id for d in stripe] == ["bad", "e5", "e3", "e1"]
    assert [d.id for d in await store.deliveries(source="stripe", before=ids[5])] == [
        ids[3],
        ids[1],
    ]
    assert [d.id for d in await store.deliveries(result="quarantined")] == [bad]
    assert [d.id for d in await store.deliveries(source="shopify", result="quarantined")] == []

    rows = await store.claim("track", 10, 1 << 20, NOW + 20)
    dead = next(r for r in rows if b"u-e3" in r.body)
    await store.dead_letter([dead.id], "400 invalid_payload: properties too big", NOW + 20)
    await store.delivered([r.id for r in rows if r.id != dead.id], NOW + 20)
    assert [d.provider_event_id for d in await store.deliveries(result="dead")] == ["e3"]
    (e3,) = await store.deliveries(source="stripe", result="dead")
    assert (e3.pending, e3.delivered, e3.dead) == (0, 0, 1)
    assert [d.delivered for d in await store.deliveries(result="translated")] == [
        1,
        1,
        1,
        0,
        1,
        1,
        1,
    ]


async def test_a_delivery_with_its_headers_calls_and_answers(store: Store) -> None:
    inbox_id = await stored(store, "evt_one", NOW)
    (row,) = await store.claim("track", 10, 1 << 20, NOW)
    await store.dead_letter([row.id], "400 invalid_payload: event is too long", NOW + 1)
    found = await store.delivery(inbox_id)
    assert found is not None
    assert (found.source, found.provider_event_id, found.state) == (
        "stripe",
        "evt_one",
        "translated",
    )
    assert found.headers == {"x-topic": "orders/paid"}
    assert (found.raw_kept, found.raw_size) == (True, len(b'{"id":"evt_one"}'))
    (call,) = found.calls
    assert (call.route, call.state, call.attempts, call.in_flight) == ("track", "dead", 1, False)
    assert call.reason == "400 invalid_payload: event is too long"
    assert b'"user_id":"u-evt_one"' in call.body
    assert await store.raw_body(inbox_id) == b'{"id":"evt_one"}'
    assert await store.delivery(inbox_id + 1000) is None
    assert await store.raw_body(inbox_id + 1000) is None

    quarantined = await store.delivery(await stored(store, "evt_bad", NOW, fails=True))
    assert quarantined is not None
    assert (quarantined.state, quarantined.reason, quarantined.calls) == (
        "quarantined",
        "KeyError: 'data'",
        [],
    )


async def test_a_raw_body_dropped_by_a_forget_is_no_longer_shown(store: Store) -> None:
    from bridge.events import Forget

    inbox_id = await stored(store, "evt_gone", NOW)
    await store.accept(
        Delivery(
            source="admin",
            provider_event_id="forget-1",
            received_at=NOW,
            calls=[Forget(user_id="u-evt_gone")],
        )
    )
    found = await store.delivery(inbox_id)
    assert found is not None
    assert (found.raw_kept, found.headers, found.calls) == (False, {}, [])
    assert await store.raw_body(inbox_id) is None


async def test_activity_of_each_source_over_the_last_hour_and_day(store: Store) -> None:
    await stored(store, "old", NOW - 2 * 86400)
    await stored(store, "yesterday", NOW - 7200)
    await stored(store, "recent", NOW - 60)
    await stored(store, "broken", NOW - 30, fails=True)
    dead_id = await stored(store, "refused", NOW - 7000)
    rows = await store.claim("track", 10, 1 << 20, NOW)
    (refused,) = [r for r in rows if b"u-refused" in r.body]
    await store.dead_letter([refused.id], "400 invalid_payload", NOW)
    await stored(store, "order", NOW - 10, source="shopify")
    stripe, shopify, github = await store.activity(["stripe", "shopify", "github"], NOW)
    assert stripe.source == "stripe"
    assert stripe.last_received_at == NOW - 30
    assert (stripe.hour, stripe.day, stripe.failed_hour, stripe.failed_day) == (2, 4, 1, 2)
    assert (shopify.last_received_at, shopify.hour, shopify.day, shopify.failed_day) == (
        NOW - 10,
        1,
        1,
        0,
    )
    assert (github.last_received_at, github.hour, github.day) == (None, 0, 0)
    assert dead_id


async def test_rates_of_the_last_hour_by_minute(store: Store) -> None:
    since = NOW - 3600
    for i, at in enumerate([since - 5, since + 1, since + 59, since + 61, NOW - 1]):
        await stored(store, f"r{i}", at)
    rows = await store.claim("track", 10, 1 << 20, NOW)
    await store.delivered([rows[0].id, rows[1].id], since + 125)
    await store.dead_letter([rows[2].id], "400", NOW - 0.5)
    rates = await store.rates(since, 60, 60)
    assert (rates.since, rates.step, len(rates.received)) == (since, 60, 60)
    assert rates.received[:2] == [2, 1]
    assert rates.received[-1] == 1
    assert sum(rates.received) == 4  # the one before the hour is not counted
    assert rates.delivered[2] == 2
    assert sum(rates.delivered) == 2
    assert rates.dead[-1] == 1
