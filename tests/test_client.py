"""The Millimetric client against the real local sink over loopback HTTP: every answer
class, and Retry-After in both of its forms."""

from __future__ import annotations

import asyncio
import email.utils
import gc
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from bridge.client import (
    MAX_RETRY_AFTER,
    Accepted,
    AuthProblem,
    Invalid,
    MillimetricClient,
    RateLimited,
    Retryable,
    batch_body,
    build_http_client,
    parse_retry_after,
)
from bridge.events import Forget, Identify, Track
from bridge.sink import DEV_KEY
from tests.conftest import RunningSink, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with build_http_client(timeout=2.0, connect_timeout=1.0) as client:
        yield client


def client_for(http: httpx.AsyncClient, sink: RunningSink, key: str = DEV_KEY) -> MillimetricClient:
    return MillimetricClient(http, key=key, host=sink.url)


def set_knobs(sink: RunningSink, **knobs: object) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json=knobs).raise_for_status()


async def test_every_route_is_accepted_and_recorded(
    http: httpx.AsyncClient, sink: RunningSink
) -> None:
    client = client_for(http, sink)
    assert await client.track(Track(event="signup", event_id="t1", user_id="u1")) == Accepted(202)
    assert await client.batch([Track(event="purchase", event_id=f"b{i}") for i in range(3)]) == (
        Accepted(202)
    )
    assert await client.identify(Identify(user_id="u1", anonymous_id="a1")) == Accepted(202)
    assert await client.forget(Forget(user_id="u1")) == Accepted(202)

    listing = (await http.get(f"{sink.url}/_sink/events")).json()["events"]
    assert [(e["route"], e["body"].get("event_id")) for e in listing] == [
        ("track", "t1"),
        ("track", "b0"),
        ("track", "b1"),
        ("track", "b2"),
        ("identify", None),
        ("forget", None),
    ]


async def test_idempotency_on_event_id(http: httpx.AsyncClient, sink: RunningSink) -> None:
    client = client_for(http, sink)
    for _ in range(3):
        assert await client.batch([Track(event="x", event_id="same")]) == Accepted(202)
    stats = (await http.get(f"{sink.url}/_sink/stats")).json()
    assert stats["unique_event_ids"] == 1
    assert stats["duplicates"] == 2


async def test_invalid_payload_is_permanent_and_names_the_field(
    http: httpx.AsyncClient, sink: RunningSink
) -> None:
    client = client_for(http, sink)
    outcome = await client.post("/v1/track", b'{"event":"' + b"x" * 129 + b'"}')
    assert isinstance(outcome, Invalid)
    assert outcome.status == 400
    assert "invalid_payload" in outcome.reason
    assert "$.event" in outcome.reason

    derived = await client.post("/v1/batch", b'{"events":[{"event":"x","country":"FR"}]}')
    assert isinstance(derived, Invalid)
    assert "country is derived by the server" in derived.reason


@pytest.mark.parametrize(
    ("key", "route", "status", "code"),
    [
        ("not-a-key", "/v1/track", 401, "malformed_api_key"),
        ("sk_live_someone_else", "/v1/track", 401, "invalid_api_key"),
        ("pk_dev_local_bridge", "/v1/track", 403, "origin_not_allowed"),
        ("rk_dev_local_bridge", "/v1/forget", 403, "forget_requires_secret_key"),
        ("rk_dev_local_bridge", "/v1/batch", 403, "read_only_key"),
    ],
)
async def test_key_problems_are_auth_problems(
    http: httpx.AsyncClient, sink: RunningSink, key: str, route: str, status: int, code: str
) -> None:
    body = b'{"user_id":"u1"}' if route == "/v1/forget" else b'{"events":[{"event":"x"}]}'
    if route == "/v1/track":
        body = b'{"event":"x"}'
    outcome = await client_for(http, sink, key).post(route, body)
    assert isinstance(outcome, AuthProblem)
    assert outcome.status == status
    assert code in outcome.reason
    assert (await http.get(f"{sink.url}/_sink/stats")).json()["received"] == 0


async def test_rate_limit_gives_rate_limited_with_the_wait(
    http: httpx.AsyncClient, sink: RunningSink
) -> None:
    # All at once: one at a time, a busy machine gives the bucket time to refill (5/s).
    client = client_for(http, sink)
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(client.batch([Track(event="x", event_id=f"r{i}")]) for i in range(40))
    )
    refilled = 5 * (time.monotonic() - started)
    accepted = outcomes.count(Accepted(202))
    assert 20 <= accepted <= 20 + refilled + 1  # burst 20
    limited = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(limited) == 40 - accepted
    assert all(o.retry_after >= 1.0 for o in limited)  # Retry-After is whole seconds


async def test_server_errors_are_retryable(http: httpx.AsyncClient, sink: RunningSink) -> None:
    set_knobs(sink, fail_for_seconds=30)
    outcome = await client_for(http, sink).track(Track(event="x"))
    assert isinstance(outcome, Retryable)
    assert outcome.status == 503

    set_knobs(sink, fail_for_seconds=0, error_rate=1.0)
    outcome = await client_for(http, sink).track(Track(event="x"))
    assert outcome == Retryable(outcome.reason, 500)


async def test_timeouts_are_retryable(sink: RunningSink) -> None:
    set_knobs(sink, latency_ms=1500)
    async with build_http_client(timeout=0.2) as http:
        outcome = await client_for(http, sink).track(Track(event="x"))
    assert isinstance(outcome, Retryable)
    assert outcome.reason.startswith("timeout")


async def test_connection_errors_are_retryable(http: httpx.AsyncClient) -> None:
    client = MillimetricClient(http, key=DEV_KEY, host=f"http://127.0.0.1:{free_port()}")
    outcome = await client.track(Track(event="x"))
    assert isinstance(outcome, Retryable)
    assert outcome.reason.startswith("connection: ConnectError")


async def test_retry_after_as_http_date() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {DEV_KEY}"
        return httpx.Response(429, headers={"retry-after": later})

    async with build_http_client(transport=httpx.MockTransport(answer)) as http:
        outcome = await MillimetricClient(http, key=DEV_KEY, host="http://mm").track(
            Track(event="x")
        )
    assert isinstance(outcome, RateLimited)
    assert 28 <= outcome.retry_after <= 30


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (199, Retryable),
        (200, Accepted),
        (204, Accepted),
        (299, Accepted),
        (300, Retryable),
        (400, Invalid),
        (401, AuthProblem),
        (403, AuthProblem),
        (404, Retryable),
        (413, Invalid),
        (422, Invalid),
        (429, RateLimited),
        (500, Retryable),
        (503, Retryable),
    ],
)
async def test_every_status_is_classified(status: int, outcome: type[object]) -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status, json={"error": "some_code", "message": "in words"})

    async with build_http_client(transport=httpx.MockTransport(answer)) as http:
        # A host written with a trailing slash still makes one route.
        got = await MillimetricClient(http, key=DEV_KEY, host="http://mm/").track(Track(event="x"))
    assert type(got) is outcome
    if isinstance(got, Invalid | AuthProblem | Retryable):
        assert got.reason == f"{status} some_code: in words"
        assert got.status == status
    (request,) = sent
    assert str(request.url) == "http://mm/v1/track"
    assert request.headers["authorization"] == f"Bearer {DEV_KEY}"
    assert request.headers["content-type"] == "application/json"


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("0", now=now) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) == 1.0
    assert parse_retry_after("soon") == 1.0
    assert parse_retry_after("nan") == parse_retry_after("inf") == 1.0
    assert parse_retry_after("-5") == 0.0
    # A server's mistake (or a hostile one) cannot hold a lane for days: an hour at most.
    assert MAX_RETRY_AFTER == 3600.0
    assert parse_retry_after("3599.5", now=now) == 3599.5
    assert parse_retry_after("99999999", now=now) == MAX_RETRY_AFTER
    ten_days = email.utils.formatdate(now + 10 * 86400, usegmt=True)
    assert parse_retry_after(ten_days, now=now) == MAX_RETRY_AFTER


def test_a_retry_after_date_without_a_zone_is_gmt(monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 9110 dates are GMT, whatever the machine's zone: "-0000" says no zone at all.
    now = 1_700_000_000.0
    zoneless = email.utils.formatdate(now + 90)
    assert zoneless.endswith(" -0000")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after(zoneless, now=now) == 90.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    ("sent", "wait"),
    [("7", 7.0), ("2.5", 2.5), ("0", 0.0), ("99999999", MAX_RETRY_AFTER)],
)
async def test_the_wait_is_the_retry_after_sent_up_to_an_hour(
    http: httpx.AsyncClient, sink: RunningSink, sent: str, wait: float
) -> None:
    set_knobs(sink, fail_for_seconds=30, fail_status=429, retry_after=sent)
    assert await client_for(http, sink).track(Track(event="x")) == RateLimited(wait)
    # The rate limit's own 429s carry it too.
    set_knobs(sink, fail_for_seconds=0)
    client = client_for(http, sink)
    outcomes = await asyncio.gather(
        *(client.batch([Track(event="x", event_id=f"w{i}")]) for i in range(25))
    )
    assert RateLimited(wait) in outcomes  # past the burst of 20
    assert {type(o) for o in outcomes} == {Accepted, RateLimited}


def test_batch_body_is_the_wire_format() -> None:
    body = batch_body([b'{"event":"a"}', b'{"event":"b"}'])
    assert msgspec.json.decode(body) == {"events": [{"event": "a"}, {"event": "b"}]}


async def test_a_sent_batch_is_freed_at_once_not_by_the_cyclic_collector(
    http: httpx.AsyncClient, sink: RunningSink
) -> None:
    # A batch body is up to 256 KB; `serve` runs the cyclic collector rarely (bridge/cli.py),
    # so a body held by a reference cycle stays in memory long after it is sent.
    client = client_for(http, sink)
    await client.track(Track(event="warm", event_id="w"))  # the connection, opened once
    gc.collect()
    gc.disable()
    try:
        for i in range(5):
            outcome = await client.batch(
                [Track(event="purchase", event_id=f"c{i}-{n}") for n in range(50)]
            )
            assert outcome == Accepted(202)
        assert gc.collect() == 0
    finally:
        gc.enable()
