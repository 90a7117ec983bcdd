"""The forwarder against the real local sink over HTTP, on a real SQLite outbox."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from bridge.client import MillimetricClient, batch_body, build_http_client
from bridge.events import BATCH_MAX_BYTES, Forget, Identify, Track, encode
from bridge.ratelimit import RateLimit
from bridge.sink import DEV_KEY
from bridge.stages import forward
from bridge.stages.forward import Forwarder, ForwarderConfig
from bridge.store import Delivery, Store
from tests.conftest import RunningSink, free_port, table_rows

pytestmark = [
    pytest.mark.anyio,
    # The forwarder is the same over every store; these tests read the SQLite file itself.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

FAST = ForwarderConfig(
    linger=0.02,
    idle_poll=0.05,
    backoff_base=0.05,
    backoff_cap=0.3,
    outage_hold=0.05,
    outage_hold_cap=0.3,
    probe_min=0.1,
    probe_max=0.3,
)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with build_http_client(timeout=5.0) as client:
        yield client


async def sink_get(http: httpx.AsyncClient, sink: RunningSink, what: str, **params: Any) -> Any:
    return (await http.get(f"{sink.url}/_sink/{what}", params=params)).json()


async def knobs(http: httpx.AsyncClient, sink: RunningSink, **values: Any) -> None:
    (await http.post(f"{sink.url}/_sink/knobs", json=values)).raise_for_status()


async def fill(
    store: Store,
    n: int,
    *,
    prefix: str = "e",
    user: str | None = None,
    properties: dict[str, Any] | None = None,
    at: float | None = None,
) -> list[str]:
    """`n` track events, received `at` (now by default): due then, and that old."""
    ids = [f"{prefix}{i}" for i in range(n)]
    for event_id in ids:
        await store.accept(
            Delivery(
                source="test",
                provider_event_id=event_id,
                received_at=time.time() if at is None else at,
                calls=[
                    Track(
                        event="purchase",
                        event_id=event_id,
                        user_id=user,
                        properties=properties or {},
                    )
                ],
            )
        )
    return ids


async def wait_until(check: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await anyio.sleep(0.05)


async def answered(http: httpx.AsyncClient, sink: RunningSink, answer: str, n: int) -> None:
    """Wait until the sink has given `answer` (such as "batch 503") at least `n` times."""

    async def reached() -> bool:
        stats = await sink_get(http, sink, "stats")
        return bool(stats["answers"].get(answer, 0) >= n)

    await wait_until(reached)


def forwarder(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, config: ForwarderConfig = FAST
) -> Forwarder:
    return Forwarder(store, MillimetricClient(http, key=DEV_KEY, host=sink.url), config)


async def drained(store: Store) -> bool:
    return (await store.stats(time.time())).pending == 0


async def test_batches_hold_at_most_500_events(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    ids = await fill(store, 1200)
    fwd = forwarder(store, http, sink)
    fwd.start()
    await wait_until(lambda: drained(store))
    await fwd.stop()
    stats = await sink_get(http, sink, "stats")
    assert stats["unique_event_ids"] == 1200
    assert stats["answers"] == {"batch 202": 3}
    received = (await sink_get(http, sink, "events", limit=2000))["events"]
    assert sorted(e["body"]["event_id"] for e in received) == sorted(ids)
    # The events of one request share its arrival time: 500 + 500 + 200.
    assert sorted(Counter(e["arrived"] for e in received).values()) == [200, 500, 500]


async def fill_bytes(store: Store, prefix: str, rows: int, batch: int) -> None:
    """`rows` track events whose `/v1/batch` body, all in one, is `batch` bytes."""
    base = [len(encode(Track(event="purchase", event_id=f"{prefix}{i}"))) for i in range(rows)]
    padding = len(encode(Track(event="purchase", properties={"p": ""}))) - len(
        encode(Track(event="purchase"))
    )
    room = batch - len(batch_body([b"x" * n for n in base])) - rows * padding
    for i in range(rows):
        share = room // rows + (1 if i < room % rows else 0)
        call = Track(event="purchase", event_id=f"{prefix}{i}", properties={"p": "x" * share})
        await store.accept(
            Delivery(
                source="test",
                provider_event_id=f"{prefix}{i}",
                received_at=time.time(),
                calls=[call],
            )
        )


async def test_a_batch_body_is_256kb_at_most_wrapper_included(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    # 40 events whose batch, `{"events":[...]}` and commas included, is exactly the limit:
    # one request. Then 40 more, one byte larger in all: two.
    for prefix, size, requests in (("a", BATCH_MAX_BYTES, 1), ("b", BATCH_MAX_BYTES + 1, 2)):
        await fill_bytes(store, prefix, 40, size)
        fwd = forwarder(store, http, sink)
        fwd.start()
        await wait_until(lambda: drained(store))
        await fwd.stop()
        stats = await sink_get(http, sink, "stats")
        assert stats["answers"] == {"batch 202": requests + (prefix == "b")}, prefix
    assert stats["unique_event_ids"] == 80


async def test_batches_stay_under_256kb(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await fill(store, 120, properties={"pad": "x" * 7000})  # ~7 KB each: ~36 a batch
    fwd = forwarder(store, http, sink)
    fwd.start()
    await wait_until(lambda: drained(store))
    await fwd.stop()
    stats = await sink_get(http, sink, "stats")
    assert stats["unique_event_ids"] == 120
    # 120 events of ~7 KB make ~840 KB: four requests, and the sink refuses any over 256 KB.
    assert stats["answers"] == {"batch 202": 4}


async def test_a_429_storm_delays_but_loses_nothing(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, tmp_path: Path
) -> None:
    await fill(store, 1500)
    # Pace far above the sink's 5/s so the sink answers 429 often.
    config = msgspec.structs.replace(
        FAST, batch_limit=RateLimit(rate=100, burst=100), batch_events=50
    )
    fwd = forwarder(store, http, sink, config)
    fwd.start()
    await wait_until(lambda: drained(store), within=60)
    await fwd.stop()
    stats = await sink_get(http, sink, "stats")
    limited = stats["answers"].get("batch 429", 0)
    assert limited >= 1
    assert stats["unique_event_ids"] == 1500
    assert fwd.counts["rate_limited"] == limited
    # 30 requests, 20 in the sink's burst, then 5 a second: each 429 holds the lane for
    # its Retry-After (1 s), in which the sink refills 5, so two or three holds do. At most
    # 4 requests are in flight when one is answered 429: 12 at most (a lane that ignored
    # Retry-After got 150).
    assert limited <= 12
    assert fwd.counts["dead"] == 0
    db = sqlite3.connect(tmp_path / "bridge.db")
    attempts = db.execute("SELECT MAX(attempts) FROM outbox").fetchone()[0]
    db.close()
    assert attempts == 0  # a 429 is not a failed attempt


async def test_a_429_holds_the_lane_for_its_retry_after(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await fill(store, 100)
    # A second of 429s, each saying to wait 3 s: one request, one hold, then everything.
    await knobs(http, sink, fail_for_seconds=1.0, fail_status=429, retry_after="3")
    limited = sample("bridge_millimetric_answers_total", route="/v1/batch", status="429")
    waited = sample("bridge_retry_wait_seconds_total", cause="rate_limited")
    started = time.time()
    fwd = forwarder(store, http, sink, msgspec.structs.replace(FAST, max_in_flight=1))
    fwd.start()
    await wait_until(lambda: drained(store))
    await fwd.stop()
    stats = await sink_get(http, sink, "stats")
    assert stats["answers"] == {"batch 429": 1, "batch 202": 1}
    assert fwd.counts["rate_limited"] == 1
    assert sample("bridge_millimetric_answers_total", route="/v1/batch", status="429") == (
        limited + 1
    )
    assert sample("bridge_retry_wait_seconds_total", cause="rate_limited") == waited + 3
    received = (await sink_get(http, sink, "events"))["events"]
    assert len(received) == 100
    assert min(e["arrived"] for e in received) >= started + 3.0  # not after the 1 s outage


async def test_a_retry_after_of_days_holds_the_rows_an_hour_at_most(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, tmp_path: Path
) -> None:
    await fill(store, 10)
    await knobs(http, sink, fail_for_seconds=60, fail_status=429, retry_after="864000")
    fwd = forwarder(store, http, sink)
    started = time.time()
    fwd.start()

    async def limited() -> bool:
        return fwd.counts["rate_limited"] >= 1

    await wait_until(limited)
    answered = time.time()
    await fwd.stop()
    assert (await sink_get(http, sink, "stats"))["answers"] == {"batch 429": 1}
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as db:
        due = db.execute("SELECT state, MIN(next_at), MAX(next_at) FROM outbox").fetchone()
    state, first, last = due
    assert state == "pending"
    assert started + 3600 <= first <= last <= answered + 3600  # not ten days


async def test_the_published_pace_provokes_no_429(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await fill(store, 500)
    # 25 requests: past the sink's burst of 20, so only pacing at 5/s avoids a 429.
    fwd = forwarder(store, http, sink, msgspec.structs.replace(FAST, batch_events=20))
    started = time.monotonic()
    fwd.start()
    await wait_until(lambda: drained(store), within=30)
    elapsed = time.monotonic() - started
    await fwd.stop()
    stats = await sink_get(http, sink, "stats")
    assert stats["answers"] == {"batch 202": 25}
    assert elapsed >= 24 / 5 - 0.3  # the first request goes at once, then 5 a second


async def test_an_outage_then_recovery(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await fill(store, 700)
    await knobs(http, sink, fail_for_seconds=2.0)  # after the fill, however long it took
    fwd = forwarder(store, http, sink)
    fwd.start()
    await wait_until(lambda: drained(store), within=30)
    await fwd.stop()
    stats = await sink_get(http, sink, "stats")
    assert stats["answers"].get("batch 503", 0) >= 2
    assert stats["unique_event_ids"] == 700
    assert fwd.counts["dead"] == 0


def most_probes(seconds: float, config: ForwarderConfig) -> int:
    """The most requests a lane can send in an outage this long: one at its start, then one
    after each hold, 0.1, 0.2, 0.4 s... up to the cap (a slower machine sends fewer)."""
    probes, held, hold = 1, 0.0, config.outage_hold
    while held + hold <= seconds:
        probes, held, hold = probes + 1, held + hold, min(config.outage_hold_cap, hold * 2)
    return probes


async def test_an_outage_costs_few_requests_and_recovery_sends_the_backlog_at_once(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    """Deliveries keep coming through an outage: the lane sends a probe now and then, not a
    batch for every row that comes due; rows back off for days, yet the backlog goes in
    full batches as soon as Millimetric answers again. Counted in requests and in the rows'
    own retry times, never against a clock bound, so a slow machine cannot fail it."""
    await knobs(http, sink, fail_for_seconds=3600)  # an outage, until the test ends it
    await fill(store, 500)
    config = msgspec.structs.replace(
        FAST,
        backoff_base=1e6,  # a row's own retry would wait days (jitter aside)
        backoff_cap=1e7,
        outage_hold=0.1,
        outage_hold_cap=0.4,
        max_in_flight=1,  # each request answered before the next: the holds alone pace them
    )
    fwd = forwarder(store, http, sink, config)
    started = time.time()  # the forwarder's clock, which times its holds
    fwd.start()
    for wave in range(50):  # 10 new rows every 50 ms, each wave due at once
        await fill(store, 10, prefix=f"w{wave}-")
        await anyio.sleep(0.05)

    await answered(http, sink, "batch 503", 3)
    backed_off = await table_rows(
        store,
        "SELECT event_id, next_at FROM outbox WHERE state = 'pending' AND attempts > 0 ORDER BY id",
    )
    await knobs(http, sink, fail_for_seconds=0)  # Millimetric answers again
    outage = time.time() - started
    await fill(store, 10, prefix="after-")  # a delivery after the outage
    await wait_until(lambda: drained(store), within=60)
    drained_at = time.time()
    await fwd.stop()

    stats = await sink_get(http, sink, "stats")
    # The outage cost what the holds allow, whatever its length: about 2.5 requests a
    # second, where the batch pace alone (5/s) and the waves would have sent one per wave.
    assert 3 <= stats["answers"]["batch 503"] <= most_probes(outage, config)
    # The rows it backed off did not wait for their own retry: the first answer made them
    # all due, and they went in full batches (the first success, then 500 at a time), in
    # the order they were queued.
    assert len(backed_off) >= 500
    assert drained_at < min(next_at for _, next_at in backed_off)
    assert stats["answers"]["batch 202"] <= 1 + math.ceil(1010 / 500)
    waiting = {event_id for event_id, _ in backed_off}
    arrived = await sink_get(http, sink, "events", limit=2000)
    sent = [e["body"]["event_id"] for e in arrived["events"]]
    assert [e for e in sent if e in waiting] == [event_id for event_id, _ in backed_off]
    # Every event arrived, once.
    assert (stats["unique_event_ids"], stats["duplicates"]) == (1010, 0)
    assert fwd.counts["dead"] == 0


async def test_rows_older_than_max_age_become_dead_letters(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await knobs(http, sink, fail_for_seconds=60)
    await fill(store, 3)
    fwd = forwarder(store, http, sink, msgspec.structs.replace(FAST, max_age=0.5))
    fwd.start()
    await wait_until(lambda: drained(store), within=20)
    await fwd.stop()
    dead = await store.dead_letters()
    assert len(dead) == 3
    assert dead[0].reason.startswith("gave up after")
    assert "503" in dead[0].reason


async def test_a_poison_event_is_isolated(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, tmp_path: Path
) -> None:
    await fill(store, 100)
    # An event Millimetric refuses although the bridge thought it fine (rules change).
    db = sqlite3.connect(tmp_path / "bridge.db")
    db.execute("""UPDATE outbox SET body = CAST('{"event":"purchase","event_id":"e42","os":"x"}'
                  AS BLOB) WHERE event_id = 'e42'""")
    db.commit()
    db.close()
    fwd = forwarder(store, http, sink)
    fwd.start()
    await wait_until(lambda: drained(store))
    await fwd.stop()
    stats = await sink_get(http, sink, "stats")
    assert stats["unique_event_ids"] == 99
    (dead,) = await store.dead_letters()
    assert dead.event_id == "e42"
    assert "400 invalid_payload" in dead.reason
    assert "os is derived by the server" in dead.reason


async def test_a_refused_key_pauses_without_touching_rows_then_resumes(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, tmp_path: Path
) -> None:
    await knobs(http, sink, keys=[])
    await fill(store, 10)
    # Five batches: those claimed while a probe is answered are put back unsent.
    fwd = forwarder(store, http, sink, msgspec.structs.replace(FAST, batch_events=2))
    fwd.start()

    async def paused() -> bool:
        return fwd.paused is not None

    await wait_until(paused)
    assert "invalid_api_key" in (fwd.paused or "")
    assert (await store.stats(time.time())).paused == fwd.paused  # what `outbox status` shows
    await anyio.sleep(0.5)  # several probes
    db = sqlite3.connect(tmp_path / "bridge.db")
    assert db.execute("SELECT state, attempts, COUNT(*) FROM outbox GROUP BY 1, 2").fetchall() == [
        ("pending", 0, 10)
    ]
    db.close()
    await knobs(http, sink, keys=[DEV_KEY])
    await wait_until(lambda: drained(store))
    await fwd.stop()
    assert fwd.paused is None
    assert (await store.stats(time.time())).paused is None
    assert (await sink_get(http, sink, "stats"))["unique_event_ids"] == 10


async def test_forget_purges_pending_and_is_not_overtaken(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, tmp_path: Path
) -> None:
    await knobs(http, sink, latency_ms=400)
    await fill(store, 5, prefix="sent-", user="u1")
    fwd = forwarder(store, http, sink)
    fwd.start()

    async def in_flight() -> bool:
        return claimed(tmp_path / "bridge.db") == 5

    await wait_until(in_flight)  # the batch with u1's events is on its way
    await fill(store, 5, prefix="late-", user="u1")  # pending, not yet claimed
    await store.accept(
        Delivery(
            source="cli",
            provider_event_id="forget-1",
            received_at=time.time(),
            calls=[Forget(user_id="u1")],
        )
    )
    fwd.wake("forget")
    await fill(store, 3, prefix="after-", user="u1")  # after the forget: never stored
    await wait_until(lambda: drained(store))
    await fwd.stop()
    received = (await sink_get(http, sink, "events"))["events"]
    order = [(e["route"], e["body"].get("event_id")) for e in received]
    assert order == [*[("track", f"sent-{i}") for i in range(5)], ("forget", None)]
    # The forget was sent only after Millimetric had answered the batch in flight.
    assert received[-1]["arrived"] >= max(e["at"] for e in received[:-1])


def claimed(db: Path) -> int:
    """How many rows a send in flight holds."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE claimed = 1").fetchone()[0])


async def identify_rows(store: Store, n: int) -> None:
    """`n` identify calls (u0 and a0, u1 and a1, ...), a delivery each."""
    for i in range(n):
        await store.accept(
            Delivery(
                source="t",
                provider_event_id=f"i{i}",
                received_at=time.time(),
                calls=[Identify(user_id=f"u{i}", anonymous_id=f"a{i}")],
            )
        )


async def test_identify_goes_to_its_own_route(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await identify_rows(store, 1)
    fwd = forwarder(store, http, sink)
    fwd.start()
    await wait_until(lambda: drained(store))
    await fwd.stop()
    received = (await sink_get(http, sink, "events", route="identify"))["events"]
    assert [e["body"] for e in received] == [{"user_id": "u0", "anonymous_id": "a0"}]


# -- on a clock the test moves -----------------------------------------------------------------
#
# Holds, probes and backoffs end when the forwarder's clock says so: with a clock that only
# the test moves, each one ends exactly when the test decides, however slow the machine.
# Rows are received at START, so they are due from the first moment on that clock.

START = 1_000_000.0


class Clock:
    """The forwarder's clock, standing still until the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TopOfJitter:
    """Stands in for the forwarder's `random`: each backoff's bounds, recorded, and its
    longest wait (the jitter's top), so a row's `next_at` tells the ceiling."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return high


def sample(name: str, **labels: str) -> float:
    """A series of /metrics now (the registry is the process's: tests compare before/after)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def clocked(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, config: ForwarderConfig, clock: Clock
) -> Forwarder:
    client = MillimetricClient(http, key=DEV_KEY, host=sink.url)
    return Forwarder(store, client, config, clock=clock)


async def counted(fwd: Forwarder, key: str, n: int, within: float = 20) -> None:
    async def reached() -> bool:
        return fwd.counts[key] >= n

    await wait_until(reached, within)
    assert fwd.counts[key] == n, fwd.counts


async def test_retries_back_off_exponentially_with_full_jitter_up_to_the_cap(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    jitter = TopOfJitter()
    monkeypatch.setattr(forward, "random", jitter)
    await knobs(http, sink, fail_for_seconds=3600)
    await fill(store, 1, at=START)
    clock = Clock(START)
    config = msgspec.structs.replace(FAST, backoff_base=1.0, backoff_cap=20.0)
    waited = sample("bridge_retry_wait_seconds_total", cause="backoff")
    fwd = clocked(store, http, sink, config, clock)
    fwd.start()
    ceilings = [2.0, 4.0, 8.0, 16.0, 20.0]  # base * 2**attempts, up to the cap
    for attempt, ceiling in enumerate(ceilings, start=1):
        # `retried` counts once the row's retry is written.
        await counted(fwd, "retried", attempt)
        assert fwd.counts["requests"] == attempt
        rows = await table_rows(store, "SELECT attempts, claimed, next_at FROM outbox")
        assert rows == [(attempt, 0, clock.now + ceiling)]
        clock.now += ceiling  # due again, not a moment before (the jitter's top)
    await fwd.stop()
    # Full jitter: anywhere from no wait at all up to the ceiling.
    assert jitter.calls == [(0, ceiling) for ceiling in ceilings]
    assert fwd.counts["dead"] == fwd.counts["delivered"] == 0
    added = sample("bridge_retry_wait_seconds_total", cause="backoff") - waited
    assert added == pytest.approx(sum(ceilings))


async def test_rows_max_age_old_are_dead_lettered_naming_the_hours_and_the_last_answer(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await knobs(http, sink, fail_for_seconds=3600)
    await fill(store, 1, prefix="old", at=START)
    clock = Clock(START + 7200)  # the row is exactly max_age old when its answer comes
    config = msgspec.structs.replace(FAST, max_age=7200.0)
    dead = sample("bridge_dead_letters_total", route="track")
    fwd = clocked(store, http, sink, config, clock)
    fwd.start()
    await counted(fwd, "dead", 1)
    assert await table_rows(store, "SELECT state, attempts, done_at FROM outbox") == [
        ("dead", 1, START + 7200)
    ]
    (letter,) = await store.dead_letters()
    last_answer = "503 unavailable: sink fault: failing on purpose"
    assert letter.reason == f"gave up after 2 h; last answer: {last_answer}"
    # Younger rows are tried again, until they are that old too; then they join it.
    await fill(store, 2, prefix="young", at=START + 100)
    clock.now += 1  # past the outage hold
    await counted(fwd, "retried", 2)
    clock.now = START + 100 + 7200  # past their backoff, and max_age old
    await counted(fwd, "dead", 3)
    await fwd.stop()
    assert fwd.counts["retried"] == 2
    assert len(await store.dead_letters()) == 3
    assert sample("bridge_dead_letters_total", route="track") - dead == 3


async def test_a_refused_key_is_probed_after_probe_min_then_half_as_often_up_to_probe_max(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await knobs(http, sink, keys=[])
    await fill(store, 3, at=START)
    clock = Clock(START)
    # Probes after 0.1, 0.2, then 0.3 s; one send at a time, so a lane that looks while a
    # probe is answered waits for its pause before it claims the rows that probe released.
    config = msgspec.structs.replace(FAST, max_in_flight=1)
    fwd = clocked(store, http, sink, config, clock)
    fwd.start()

    async def refused(n: int) -> None:
        """The n-th refusal is in: the store says paused again (the test cleared it)."""

        async def done() -> bool:
            return (await store.stats(time.time())).paused is not None

        await wait_until(done)
        stats = await sink_get(http, sink, "stats")
        assert stats["answers"] == {"batch 401": n}

    await refused(1)
    assert "invalid_api_key" in (fwd.paused or "")
    assert (await store.stats(time.time())).paused == fwd.paused  # what `outbox status` shows
    assert sample("bridge_forwarder_paused") == 1
    for n, wait in enumerate([0.1, 0.2, 0.3, 0.3], start=2):
        refused_at = clock.now
        await store.set_paused(None)  # each refusal writes it again: how the test sees one
        clock.now = refused_at + wait - 0.01
        # Not a moment early: a probe let through now would be in within this second.
        await anyio.sleep(1.0 if n == 3 else 0)
        assert (await sink_get(http, sink, "stats"))["answers"] == {"batch 401": n - 1}
        clock.now = refused_at + wait
        await refused(n)
    # Nothing was charged or dropped meanwhile; the probe after the key is fixed resumes.
    rows = await table_rows(store, "SELECT state, attempts, COUNT(*) FROM outbox GROUP BY 1, 2")
    assert rows == [("pending", 0, 3)]
    await knobs(http, sink, keys=[DEV_KEY])
    clock.now += 0.3
    await wait_until(lambda: drained(store))
    await fwd.stop()
    assert fwd.paused is None
    assert (await store.stats(time.time())).paused is None
    assert sample("bridge_forwarder_paused") == 0
    assert fwd.counts["delivered"] == 3


async def test_outage_holds_double_up_to_the_cap_and_recovery_sends_the_retries_at_once(
    store: Store, http: httpx.AsyncClient, sink: RunningSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forward, "random", TopOfJitter())
    await knobs(http, sink, fail_for_seconds=3600)
    clock = Clock(START)
    config = msgspec.structs.replace(
        FAST,
        backoff_base=1000.0,  # a failed row waits 1000 s on this clock (the cap)
        backoff_cap=1000.0,
        outage_hold=0.05,
        outage_hold_cap=0.15,
        idle_poll=60.0,  # the lane looks for rows only when woken (or a minute later)
        max_in_flight=1,
    )
    answers = {
        status: sample("bridge_millimetric_answers_total", route="/v1/batch", status=status)
        for status in ("503", "202")
    }
    forwarded = sample("bridge_forwarded_calls_total", route="track")
    fwd = clocked(store, http, sink, config, clock)

    async def send_one(n: int, hold: float, settled: tuple[str, int]) -> None:
        """A new row, the lane woken: the n-th request goes once the hold since the last
        answer is over, not before; then wait for its answer to be `settled`."""
        answered = clock.now
        await fill(store, 1, prefix=f"r{n}-", at=START)
        # One wake a request: the lane's one pass claims the one new row. The doubled
        # hold is checked early too: nothing goes a moment before it ends.
        clock.now = answered + hold - (0.01 if n == 3 else 0)
        fwd.wake()
        if n == 3:
            await anyio.sleep(1.0)
            assert fwd.counts["requests"] == n - 1
            clock.now = answered + hold  # the lane, held, sees it at its next look
        await counted(fwd, *settled)
        assert fwd.counts["requests"] == n

    await fill(store, 1, prefix="r1-", at=START)
    fwd.start()
    await counted(fwd, "retried", 1)
    for n, hold in enumerate([0.05, 0.1, 0.15, 0.15], start=2):  # doubled, then the cap
        await send_one(n, hold, ("retried", n))
    await knobs(http, sink, fail_for_seconds=0)  # Millimetric answers again
    answered = clock.now
    await fill(store, 1, prefix="r6-", at=START)
    clock.now = answered + 0.15
    fwd.wake()
    # The first success makes the five rows backed off for 1000 s due now, and wakes the
    # lane for them: on this clock no time passes, and the lane's own poll is a minute.
    await counted(fwd, "delivered", 6)
    assert fwd.counts["requests"] == 7
    done = await table_rows(store, "SELECT DISTINCT done_at FROM outbox WHERE state = 'delivered'")
    assert done == [(clock.now,)]  # when retention counts from
    assert (await sink_get(http, sink, "stats"))["answers"] == {"batch 503": 5, "batch 202": 2}
    # A new outage starts over from the shortest hold.
    await knobs(http, sink, fail_for_seconds=3600)
    await fill(store, 1, prefix="again", at=START)
    fwd.wake()
    await counted(fwd, "retried", 6)
    await send_one(9, 0.05, ("retried", 7))
    await fwd.stop()
    sent = {
        status: sample("bridge_millimetric_answers_total", route="/v1/batch", status=status)
        - before
        for status, before in answers.items()
    }
    assert sent == {"503": 7, "202": 2}
    assert sample("bridge_forwarded_calls_total", route="track") - forwarded == 6


async def test_a_batch_costs_one_token_of_the_pace(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    # A forwarder starts with one token (another may just have spent the burst), and this
    # pace adds the next in 1000 s: the first batch goes at once on that one token.
    await fill(store, 1)
    config = msgspec.structs.replace(FAST, batch_limit=RateLimit(rate=0.001, burst=20))
    fwd = forwarder(store, http, sink, config)
    fwd.start()
    await wait_until(lambda: drained(store))
    await fwd.stop(grace=0.2)  # the lane waits for its next token: cut short
    assert (await sink_get(http, sink, "stats"))["answers"] == {"batch 202": 1}


async def test_the_forwarder_leads_while_started_and_wake_sends_without_waiting_for_the_poll(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    fwd = forwarder(store, http, sink, msgspec.structs.replace(FAST, idle_poll=60.0))
    assert (fwd.running, fwd.leading) == (False, False)
    fwd.start()

    async def leading() -> bool:
        return fwd.leading

    await wait_until(leading)
    assert fwd.running
    assert fwd.leading is True
    assert sample("bridge_forwarder_leader") == 1
    # New rows (in one transaction: one batch) and a wake, as intake gives after an
    # accept: sent now, not in a minute.
    calls = [Track(event="purchase", event_id=f"w{i}") for i in range(3)]
    await store.accept(
        Delivery(source="test", provider_event_id="w", received_at=time.time(), calls=calls)
    )
    fwd.wake()
    await wait_until(lambda: drained(store))
    await fwd.stop()
    assert (fwd.running, fwd.leading) == (False, False)
    assert sample("bridge_forwarder_leader") == 0
    assert fwd.counts == {
        "requests": 1,
        "delivered": 3,
        "dead": 0,
        "rate_limited": 0,
        "retried": 0,
    }


async def test_identify_rows_wait_uncharged_while_the_key_is_refused(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    await knobs(http, sink, keys=[])
    await fill(store, 1)  # the track lane's batches are the probes
    await identify_rows(store, 3)
    fwd = forwarder(store, http, sink)
    fwd.start()

    await answered(http, sink, "batch 401", 3)
    # The identify lane claims its rows after each probe and puts them back, uncharged.
    rows = await table_rows(
        store, "SELECT route, state, attempts, COUNT(*) FROM outbox GROUP BY 1, 2, 3"
    )
    assert sorted(rows) == [("identify", "pending", 0, 3), ("track", "pending", 0, 1)]
    await knobs(http, sink, keys=[DEV_KEY])
    await wait_until(lambda: drained(store))
    await fwd.stop()
    received = (await sink_get(http, sink, "events", route="identify"))["events"]
    assert [e["body"]["user_id"] for e in received] == ["u0", "u1", "u2"]


async def test_a_refused_key_with_only_identify_rows_waiting_is_probed_and_resumes(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    # No track row to probe with: the identify lane's first row is the probe.
    await knobs(http, sink, keys=[])
    await identify_rows(store, 1)
    fwd = forwarder(store, http, sink)
    fwd.start()

    await answered(http, sink, "identify 401", 2)
    await knobs(http, sink, keys=[DEV_KEY])
    await wait_until(lambda: drained(store))
    await fwd.stop()
    assert fwd.paused is None
    received = (await sink_get(http, sink, "events", route="identify"))["events"]
    assert [e["body"] for e in received] == [{"user_id": "u0", "anonymous_id": "a0"}]


async def test_answers_without_a_status_are_counted_as_timeout_or_connection(
    store: Store, http: httpx.AsyncClient, sink: RunningSink
) -> None:
    def answers(status: str) -> float:
        return sample("bridge_millimetric_answers_total", route="/v1/batch", status=status)

    before = {status: answers(status) for status in ("timeout", "connection")}
    await fill(store, 1, at=START)
    await knobs(http, sink, latency_ms=1000)
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with build_http_client(timeout=0.2) as impatient:
        for at, host, status in ((START, sink.url, "timeout"), (START + 10, nowhere, "connection")):
            client = MillimetricClient(impatient, key=DEV_KEY, host=host)
            # On a clock that stands still, the hold after the failure never ends: one try
            # (and the row's backoff is over at the next forwarder's time).
            fwd = Forwarder(store, client, FAST, clock=Clock(at))
            fwd.start()
            await counted(fwd, "retried", 1)
            await fwd.stop()
            assert answers(status) == before[status] + 1, status
    assert answers("timeout") == before["timeout"] + 1
