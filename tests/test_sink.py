"""The local sink holds to the ingest contract: batch limits, rate limits, knobs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from bridge.client import batch_body
from bridge.events import BATCH_MAX_BYTES, Track, encode
from bridge.sink import DEV_KEY
from tests.conftest import RunningSink

AUTH = {"authorization": f"Bearer {DEV_KEY}"}


def post(sink: RunningSink, route: str, body: bytes) -> httpx.Response:
    # One pooled connection per sink keeps bursts fast.
    client = _clients.get(sink.url)
    if client is None:
        client = _clients[sink.url] = httpx.Client(headers=AUTH)
    return client.post(f"{sink.url}/v1/{route}", content=body)


_clients: dict[str, httpx.Client] = {}


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _clients.values():
        client.close()
    _clients.clear()


def events_body(n: int, prefix: str = "e", size: int = 0) -> bytes:
    props = {"pad": "x" * size} if size else {}
    return batch_body(
        [encode(Track(event="x", event_id=f"{prefix}{i}", properties=props)) for i in range(n)]
    )


def test_batch_takes_500_events_and_refuses_501(sink: RunningSink) -> None:
    assert post(sink, "batch", events_body(500)).status_code == 202
    refused = post(sink, "batch", events_body(501, prefix="f"))
    assert refused.status_code == 400
    assert refused.json() == {
        "ok": False,
        "error": "invalid_payload",
        "message": "events: 1-500 per batch, got 501",
    }
    assert post(sink, "batch", b'{"events":[]}').status_code == 400
    assert httpx.get(f"{sink.url}/_sink/stats").json()["unique_event_ids"] == 500


def test_batch_body_limit_is_256kb(sink: RunningSink) -> None:
    one = len(events_body(1, size=1000)) - len(b'{"events":[]}')
    n = BATCH_MAX_BYTES // (one + 1)
    body = events_body(n, size=1000)
    # Pad the last event so the body is exactly at the limit, then one byte over.
    pad = BATCH_MAX_BYTES - len(body)
    last_pad = b"x" * (1000 + pad)
    exact = body[: body.rfind(b"x" * 1000)] + last_pad + body[body.rfind(b"x" * 1000) + 1000 :]
    assert len(exact) == BATCH_MAX_BYTES
    assert post(sink, "batch", exact).status_code == 202
    over = exact.replace(b'"event_id":"e', b'"event_id":"g').replace(last_pad, last_pad + b"x")
    assert len(over) == BATCH_MAX_BYTES + 1
    refused = post(sink, "batch", over)
    assert refused.status_code == 400
    assert "262144" in refused.json()["message"]


def test_a_bad_event_refuses_the_whole_batch(sink: RunningSink) -> None:
    body = b'{"events":[{"event":"ok","event_id":"a"},{"event":""}]}'
    refused = post(sink, "batch", body)
    assert refused.status_code == 400
    assert "$.events[1].event" in refused.json()["message"]
    assert httpx.get(f"{sink.url}/_sink/stats").json()["received"] == 0


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"event":"x"', b"\xff\xfe"])
def test_malformed_bodies_are_400(sink: RunningSink, body: bytes) -> None:
    assert post(sink, "track", body).status_code == 400


def test_track_limit_is_burst_200_then_50_a_second(sink: RunningSink) -> None:
    started = time.monotonic()
    statuses = [post(sink, "track", b'{"event":"x"}').status_code for _ in range(300)]
    refilled = 50 * (time.monotonic() - started)  # the bucket refills while we send
    assert 200 <= statuses.count(202) <= 200 + refilled + 1
    assert statuses.count(429) >= 100 - refilled - 1
    assert statuses[:200] == [202] * 200


def test_limits_can_be_switched_off(sink: RunningSink) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json={"limits": False}).raise_for_status()
    statuses = {post(sink, "batch", events_body(1, prefix=f"n{i}-")).status_code for i in range(40)}
    assert statuses == {202}


def test_fail_for_first_seconds_then_recover(sink: RunningSink) -> None:
    knobs = httpx.post(f"{sink.url}/_sink/knobs", json={"fail_for_seconds": 0.5}).json()
    assert knobs["fail_for_seconds"] == 0.5
    assert post(sink, "track", b'{"event":"x"}').status_code == 503
    time.sleep(0.6)
    assert post(sink, "track", b'{"event":"x"}').status_code == 202


def test_added_latency(sink: RunningSink) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json={"latency_ms": 200})
    started = time.monotonic()
    post(sink, "track", b'{"event":"x"}')
    assert time.monotonic() - started >= 0.2


def test_bad_knobs_are_refused(sink: RunningSink) -> None:
    answer = httpx.post(f"{sink.url}/_sink/knobs", json={"error_rate": "lots"})
    assert answer.status_code == 400
    assert "error_rate" in answer.json()["message"]
    assert httpx.post(f"{sink.url}/_sink/knobs", json={"nope": 1}).status_code == 400


def test_keys_can_be_revoked_and_restored(sink: RunningSink) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json={"keys": []})
    assert post(sink, "track", b'{"event":"x"}').json()["error"] == "invalid_api_key"
    httpx.post(f"{sink.url}/_sink/knobs", json={"keys": [DEV_KEY]})
    assert post(sink, "track", b'{"event":"x"}').status_code == 202


def test_any_key_in_the_published_format_is_taken(sink: RunningSink) -> None:
    keys = ["sk_live_a_b_c", "sk_test_ab-cd_x_y"]
    httpx.post(f"{sink.url}/_sink/knobs", json={"keys": keys}).raise_for_status()
    for key in keys:
        answer = httpx.post(
            f"{sink.url}/v1/track",
            content=b'{"event":"x"}',
            headers={"authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 202, answer.text
    for malformed in ("sk__a_b", "xk_a_b_c", "sk_live_a\tb_c"):
        answer = httpx.post(
            f"{sink.url}/v1/track",
            content=b'{"event":"x"}',
            headers={"authorization": f"Bearer {malformed}"},
        )
        assert (answer.status_code, answer.json()["error"]) == (401, "malformed_api_key")


def test_listing_pages_and_filters(sink: RunningSink) -> None:
    post(sink, "batch", events_body(5))
    post(sink, "identify", b'{"user_id":"u1"}')
    page = httpx.get(f"{sink.url}/_sink/events", params={"after": 1, "limit": 2}).json()
    assert [e["seq"] for e in page["events"]] == [2, 3]
    only = httpx.get(f"{sink.url}/_sink/events", params={"route": "identify"}).json()
    assert [msgspec.to_builtins(e["body"]) for e in only["events"]] == [{"user_id": "u1"}]
    httpx.post(f"{sink.url}/_sink/reset")
    assert httpx.get(f"{sink.url}/_sink/events").json() == {"events": []}


def test_track_without_event_id_gets_one(sink: RunningSink) -> None:
    answer = post(sink, "track", b'{"event":"x"}').json()
    assert answer["ok"] is True
    assert len(answer["event_id"]) == 32


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_knobs_take_json_only(sink: RunningSink, content_type: str | None) -> None:
    # A web page can post these three types to any origin without asking first; a body of
    # any of them changing the sink would let any site a developer visits start an outage.
    headers = {"content-type": content_type} if content_type else {}
    answer = httpx.post(
        f"{sink.url}/_sink/knobs", content=b'{"fail_for_seconds": 60}', headers=headers
    )
    assert answer.status_code == 415
    assert answer.json()["error"] == "unsupported_media_type"
    assert httpx.get(f"{sink.url}/_sink/knobs").json()["fail_for_seconds"] == 0
    charset = {"content-type": "Application/JSON; charset=utf-8"}
    taken = httpx.post(f"{sink.url}/_sink/knobs", content=b'{"latency_ms": 1}', headers=charset)
    assert taken.json()["latency_ms"] == 1


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "http://localhost", "http://127.0.0.1:1"]
)
def test_knobs_and_reset_refuse_another_sites_pages(sink: RunningSink, origin: str) -> None:
    post(sink, "identify", b'{"user_id":"u1"}')
    foreign = {"origin": origin}
    knobs = httpx.post(f"{sink.url}/_sink/knobs", json={"keys": []}, headers=foreign)
    assert knobs.status_code == 403
    assert knobs.json()["error"] == "cross_site"
    assert httpx.post(f"{sink.url}/_sink/reset", headers=foreign).status_code == 403
    assert httpx.get(f"{sink.url}/_sink/knobs").json()["keys"] != []
    assert len(httpx.get(f"{sink.url}/_sink/events").json()["events"]) == 1
    # The sink's own origin, and tools that send none, are taken.
    own = {"origin": sink.url}
    assert httpx.post(f"{sink.url}/_sink/knobs", json={"limits": True}, headers=own).is_success
    assert httpx.post(f"{sink.url}/_sink/reset", headers=own).json() == {"ok": True}
    assert httpx.get(f"{sink.url}/_sink/events").json() == {"events": []}
