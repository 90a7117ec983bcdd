"""The relay, over real HTTP: Millimetric's API on the bridge, the same answers as the local
sink's for every error and field limit, durable through an outage of Millimetric, capped
by the backlog, each event_id sent once, a forget after everything before it and nothing
about the user after it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from bridge.app import create_app
from bridge.config import load_settings
from bridge.errors import ConfigError, IngestRefused, StoreUnavailable
from bridge.events import BATCH_MAX_BYTES, PROPERTIES_MAX_BYTES, Forget, Track
from bridge.ingest_api import parse_call
from bridge.registry import RELAY_SOURCE
from bridge.sink import DEV_KEY
from bridge.stages import relay as relay_stage
from bridge.stages.relay_handler import Relayed, encoded, with_relay
from bridge.stages.translate import Translator, TranslatorConfig, translate_one
from bridge.store import Delivery, Store, StoredDelivery
from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, ServerThread

#: The bridge takes the sink's own dev key, so one request can go to either.
AUTH = {"authorization": f"Bearer {DEV_KEY}"}
OTHER_KEY = "sk_live_relay_second"
SECRET = "whsec_relay_secret"


def relay_env(sink: RunningSink, database_url: str, **extra: str) -> dict[str, str]:
    return {
        "MILLIMETRIC_KEY": DEV_KEY,
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": database_url,
        "BRIDGE_RELAY_KEYS": f"{DEV_KEY}, {OTHER_KEY}",
        "STRIPE_WEBHOOK_SECRET": SECRET,
        **extra,
    }


@contextlib.contextmanager
def serve(sink: RunningSink, database_url: str, **extra: str) -> Iterator[ServerThread]:
    with ServerThread(create_app(load_settings(relay_env(sink, database_url, **extra)))) as server:
        yield server


@pytest.fixture
def relay(sink: RunningSink, database_url: str) -> Iterator[ServerThread]:
    """A bridge with the relay on, on each backend, forwarding to the real sink."""
    with serve(sink, database_url) as server:
        yield server


@pytest.fixture
def sqlite_relay(sink: RunningSink, tmp_path: Path) -> Iterator[ServerThread]:
    with serve(sink, f"sqlite:///{tmp_path}/bridge.db") as server:
        yield server


def post(url: str, route: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return httpx.post(
        f"{url}/v1/{route}", content=content, headers=AUTH if headers is None else headers
    )


def knobs(sink: RunningSink, **changes: Any) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json=changes).raise_for_status()


def wait_for(check: Callable[[], Any], within: float = 20) -> Any:
    deadline = time.monotonic() + within
    while not (found := check()):
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)
    return found


def sink_calls(sink: RunningSink) -> list[dict[str, Any]]:
    return [{"route": r.route, **msgspec.json.decode(r.body)} for r in list(sink.state.received)]


def test_the_relay_is_off_without_keys(sink: RunningSink, tmp_path: Path) -> None:
    env = relay_env(sink, f"sqlite:///{tmp_path}/bridge.db")
    del env["BRIDGE_RELAY_KEYS"]
    with ServerThread(create_app(load_settings(env))) as server:
        for route in ("track", "identify", "batch", "forget"):
            assert post(server.url, route, {"event": "x", "user_id": "u"}).status_code == 404


# -- the same answers as the sink ------------------------------------------------------------

WIDE = "x" * 129
NARROW = "x" * 128
#: Properties whose compact JSON is exactly the limit (`{"p":"..."}`: 8 bytes around it).
AT_LIMIT = {"p": "x" * (PROPERTIES_MAX_BYTES - 8)}
OVER_LIMIT = {"p": "x" * (PROPERTIES_MAX_BYTES - 7)}


def events(n: int, prefix: str, **fields: Any) -> dict[str, Any]:
    return {"events": [{"event": "e", "event_id": f"{prefix}{i}", **fields} for i in range(n)]}


def batch_over_256kb() -> bytes:
    pad = "x" * 1000
    body = msgspec.json.encode(events(300, "big", properties={"pad": pad}))
    assert len(body) > BATCH_MAX_BYTES
    return body


CASES: list[tuple[str, str, Any, dict[str, str] | None]] = [
    # keys
    ("no key", "track", {"event": "x"}, {}),
    ("basic auth", "track", {"event": "x"}, {"authorization": "Basic dXNlcjpwYXNz"}),
    ("not a key", "track", {"event": "x"}, {"authorization": "Bearer not-a-key"}),
    ("two parts", "track", {"event": "x"}, {"authorization": "Bearer sk_live_abc"}),
    ("unknown key", "track", {"event": "x"}, {"authorization": "Bearer sk_live_some_one"}),
    ("browser key", "track", {"event": "x"}, {"authorization": "Bearer pk_dev_local_bridge"}),
    (
        "read-only forget",
        "forget",
        {"user_id": "u"},
        {"authorization": "Bearer rk_dev_local_bridge"},
    ),
    ("read-only track", "track", {"event": "x"}, {"authorization": "Bearer rk_dev_local_bridge"}),
    ("browser forget", "forget", {"user_id": "u"}, {"authorization": "Bearer pk_dev_local_bridge"}),
    # bodies that are not JSON objects
    ("empty body", "track", b"", None),
    ("not json", "track", b"not json", None),
    ("an array", "track", b"[]", None),
    ("truncated", "track", b'{"event":"x"', None),
    ("not utf-8", "track", b"\xff\xfe", None),
    (
        "nested deep",
        "track",
        b'{"event":"x","properties":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}",
        None,
    ),
    # track fields
    ("event missing", "track", {"user_id": "u"}, None),
    ("event empty", "track", {"event": ""}, None),
    ("event 129", "track", {"event": WIDE}, None),
    ("event not text", "track", {"event": 5}, None),
    ("event_id empty", "track", {"event": "x", "event_id": ""}, None),
    ("event_id 129", "track", {"event": "x", "event_id": WIDE}, None),
    ("no zone", "track", {"event": "x", "timestamp": "2024-05-01T10:00:00"}, None),
    ("not a time", "track", {"event": "x", "timestamp": "yesterday"}, None),
    ("seconds offset", "track", {"event": "x", "timestamp": "2024-05-01T10:00:00+01:00:30"}, None),
    ("user_id number", "track", {"event": "x", "user_id": 7}, None),
    ("url number", "track", {"event": "x", "url": 7}, None),
    ("properties list", "track", {"event": "x", "properties": [1]}, None),
    ("properties 8 KB + 1", "track", {"event": "x", "properties": OVER_LIMIT}, None),
    ("unknown field", "track", {"event": "x", "colour": "red"}, None),
    ("server's field", "track", {"event": "x", "source": "google"}, None),
    ("server's ip_hash", "track", {"event": "x", "ip_hash": "abc"}, None),
    # identify and forget
    ("identify no user", "identify", {"anonymous_id": "a"}, None),
    ("identify traits list", "identify", {"user_id": "u", "traits": [1]}, None),
    ("identify unknown", "identify", {"user_id": "u", "email": "e"}, None),
    ("forget no user", "forget", {}, None),
    ("forget blank", "forget", {"user_id": "  "}, None),
    ("forget number", "forget", {"user_id": 5}, None),
    # batches
    ("batch empty", "batch", {"events": []}, None),
    ("batch 501", "batch", events(501, "b501-"), None),
    ("batch over 256 KB", "batch", batch_over_256kb(), None),
    ("batch bad event", "batch", {"events": [{"event": "ok"}, {"event": ""}]}, None),
    ("batch unknown", "batch", {"events": [{"event": "ok"}], "more": 1}, None),
    ("batch not a list", "batch", {"events": {"event": "ok"}}, None),
]


@pytest.mark.parametrize(("case", "route", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_every_refusal_is_the_sinks_own(
    sqlite_relay: ServerThread,
    sink: RunningSink,
    case: str,
    route: str,
    body: Any,
    headers: dict[str, str] | None,
) -> None:
    knobs(sink, limits=False)  # the sink's rate limits are Millimetric's, not the relay's
    at_sink = post(sink.url, route, body, headers)
    at_relay = post(sqlite_relay.url, route, body, headers)
    assert at_sink.status_code in (400, 401, 403), case
    assert (at_relay.status_code, at_relay.json()) == (at_sink.status_code, at_sink.json())
    assert at_relay.headers["content-type"] == "application/json"
    assert sink.state.received == []  # nothing refused was stored, nor forwarded


ACCEPTED: list[tuple[str, str, Any]] = [
    ("event 128", "track", {"event": NARROW, "event_id": NARROW}),
    ("properties 8 KB", "track", {"event": "x", "properties": AT_LIMIT}),
    ("zoned time", "track", {"event": "x", "timestamp": "2024-05-01T10:00:00+05:30"}),
    (
        "every field",
        "track",
        {
            "event": "$pageview",
            "event_id": "every-1",
            "timestamp": "2024-05-01T10:00:00Z",
            "anonymous_id": "a-every",
            "user_id": "u-every",
            "session_id": "s",
            "url": "https://shop.example/?utm_source=news&gclid=1",
            "path": "/",
            "referrer": "https://news.example/",
            "properties": {"nested": {"ok": [1, 2]}},
        },
    ),
    ("identify", "identify", {"user_id": "u1", "anonymous_id": "a1", "traits": {"plan": "pro"}}),
    ("forget", "forget", {"user_id": "u-forget"}),
    ("batch 500", "batch", events(500, "b500-")),
]


@pytest.mark.parametrize(("case", "route", "body"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_what_the_sink_takes_the_relay_takes_and_forwards(
    sqlite_relay: ServerThread, sink: RunningSink, case: str, route: str, body: Any
) -> None:
    knobs(sink, limits=False)
    at_sink = post(sink.url, route, body)
    assert at_sink.status_code == 202, case
    httpx.post(f"{sink.url}/_sink/reset").raise_for_status()
    answer = post(sqlite_relay.url, route, body)
    assert answer.status_code == 202
    expected = len(body["events"]) if route == "batch" else 1
    # A track naming both ids teaches the bridge who the visitor is: as for any call in
    # the outbox, an identify of the pair goes first, once.
    learns = route == "track" and "anonymous_id" in body and "user_id" in body
    calls = wait_for(lambda: len(sink_calls(sink)) >= expected + learns and sink_calls(sink))
    if learns:
        learned = calls.pop(0)
        assert learned == {"route": "identify", "user_id": "u-every", "anonymous_id": "a-every"}
    assert {c["route"] for c in calls} == {"track" if route == "batch" else route}
    assert len(calls) == expected
    if route == "track":
        assert answer.json() == {"ok": True, "event_id": body.get("event_id", calls[0]["event_id"])}
        sent = dict(calls[0])
        del sent["route"]
        # What the bridge fills in when the call names none: the event_id it answered
        # with, and the time the call reached it.
        assert sent.pop("event_id") == answer.json()["event_id"]
        if "timestamp" not in body:
            assert sent.pop("timestamp").endswith("Z")
        body = {k: v for k, v in body.items() if k != "event_id"}
        assert sent == body  # otherwise as it came
    elif route == "batch":
        assert answer.json() == {"ok": True, "accepted": 500}
        assert [c["event_id"] for c in calls] == [e["event_id"] for e in body["events"]]
    else:
        assert answer.json() == {"ok": True}


def test_a_key_must_be_one_of_the_relay_keys_whatever_millimetric_knows(
    sqlite_relay: ServerThread, sink: RunningSink
) -> None:
    second = post(
        sqlite_relay.url, "track", {"event": "x"}, {"authorization": f"Bearer {OTHER_KEY}"}
    )
    assert second.status_code == 202
    # A browser key is refused for what it is, known or not: the relay has no allowed origins.
    for key in ("pk_live_anything_else", "pk_dev_local_bridge"):
        refused = post(
            sqlite_relay.url, "track", {"event": "x"}, {"authorization": f"Bearer {key}"}
        )
        assert (refused.status_code, refused.json()["error"]) == (403, "origin_not_allowed")
    lower = post(
        sqlite_relay.url, "track", {"event": "x"}, {"authorization": f"bearer {OTHER_KEY}"}
    )
    assert lower.status_code == 202  # the scheme is case-insensitive, as at the sink
    wrong = post(
        sqlite_relay.url, "track", {"event": "x"}, {"authorization": f"Bearer {OTHER_KEY}x"}
    )
    assert (wrong.status_code, wrong.json()) == (401, {"ok": False, "error": "invalid_api_key"})


def test_keys_in_the_published_format_work_end_to_end(sink: RunningSink, tmp_path: Path) -> None:
    # Underscores and dashes inside the parts: `serve` starts, the relay and the sink take them.
    keys = ["sk_live_a_b_c", "sk_test_ab-cd_x_y"]
    knobs(sink, keys=keys)
    env = {"MILLIMETRIC_KEY": keys[0], "BRIDGE_RELAY_KEYS": ",".join(keys)}
    with serve(sink, f"sqlite:///{tmp_path}/bridge.db", **env) as server:
        for n, key in enumerate(keys):
            answer = post(
                server.url,
                "track",
                {"event": "x", "event_id": f"k{n}"},
                {"authorization": f"Bearer {key}"},
            )
            assert answer.status_code == 202, answer.text
        assert [c["event_id"] for c in sink.arrived(2)] == ["k0", "k1"]
        unknown = post(server.url, "track", {"event": "x"}, {"authorization": "Bearer sk_a_b_c"})
        assert unknown.json()["error"] == "invalid_api_key"


def test_a_track_without_event_id_gets_one_and_its_arrival_time(
    sqlite_relay: ServerThread, sink: RunningSink
) -> None:
    before = time.time()
    answers = [
        post(sqlite_relay.url, "track", {"event": "signup", "user_id": "u7"}) for _ in range(3)
    ]
    ids = [a.json()["event_id"] for a in answers]
    assert len(set(ids)) == 3  # three calls, three events
    calls = wait_for(lambda: len(sink_calls(sink)) >= 3 and sink_calls(sink))
    assert sorted(c["event_id"] for c in calls) == sorted(ids)
    for call in calls:
        stamped = datetime.fromisoformat(call["timestamp"])
        assert stamped.tzinfo is not None
        assert before - 1 <= stamped.timestamp() <= time.time()


def test_a_retried_track_with_its_own_event_id_is_sent_once(
    relay: ServerThread, sink: RunningSink
) -> None:
    track = {"event": "order_completed", "event_id": "order-42", "user_id": "u42"}
    answers = [post(relay.url, "track", track) for _ in range(3)]
    answers.append(
        post(relay.url, "batch", {"events": [track, {"event": "x", "event_id": "other"}]})
    )
    assert [a.status_code for a in answers] == [202] * 4
    assert [a.json()["event_id"] for a in answers[:3]] == ["order-42"] * 3
    wait_for(lambda: {c.get("event_id") for c in sink_calls(sink)} >= {"order-42", "other"})
    time.sleep(0.5)  # a second copy would show by now
    sent = [c for c in sink_calls(sink) if c.get("event_id") == "order-42"]
    assert len(sent) == 1
    assert sink.state.duplicates == 0  # never even sent twice


def test_a_millimetric_outage_loses_nothing(relay: ServerThread, sink: RunningSink) -> None:
    knobs(sink, fail_for_seconds=3.0)
    sent: set[str] = set()
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 2.0:  # relay traffic all through the outage
        if n % 5 == 4:
            batch = events(20, f"outage-b{n}-", user_id=f"u{n}")
            assert post(relay.url, "batch", batch).status_code == 202
            sent |= {e["event_id"] for e in batch["events"]}
        else:
            answer = post(relay.url, "track", {"event": "x", "user_id": f"u{n}"})
            assert answer.status_code == 202
            sent.add(answer.json()["event_id"])
        n += 1
    assert (
        post(relay.url, "identify", {"user_id": "u-outage", "traits": {"k": 1}}).status_code == 202
    )
    assert sink.state.answers["batch 503"] + sink.state.answers["identify 503"] >= 1
    wait_for(lambda: {c.get("event_id") for c in sink_calls(sink)} >= sent, within=60)
    time.sleep(0.5)
    tracks = [c for c in sink_calls(sink) if c["route"] == "track"]
    assert len(tracks) == len(sent)  # each once
    assert any(c["route"] == "identify" and c["user_id"] == "u-outage" for c in sink_calls(sink))


def signed_webhook(n: int) -> tuple[bytes, dict[str, str]]:
    body = msgspec.json.encode(
        {
            "id": f"evt_relay_{n}",
            "object": "event",
            "type": "customer.subscription.created",
            "livemode": True,
            "created": int(time.time()),
            "data": {"object": {"id": f"sub_{n}", "object": "subscription", "customer": "cus_r"}},
        }
    )
    return body, sign(stripe, body, SECRET)


def test_past_the_backlog_cap_the_relay_answers_429_and_webhooks_still_200(
    sink: RunningSink, database_url: str
) -> None:
    knobs(sink, keys=[])  # Millimetric refuses the key: forwarding pauses, calls wait
    with serve(sink, database_url, BRIDGE_RELAY_MAX_PENDING="5") as server:
        taken = [post(server.url, "track", {"event": "x", "event_id": f"cap{i}"}) for i in range(5)]
        assert [a.status_code for a in taken] == [202] * 5
        for route, body in (("track", {"event": "x"}), ("batch", events(2, "capb"))):
            refused = post(server.url, route, body)
            assert refused.status_code == 429
            assert refused.json()["error"] == "rate_limited"
            assert "BRIDGE_RELAY_MAX_PENDING" in refused.json()["message"]
            assert int(refused.headers["retry-after"]) >= 1
        # Nor is an erasure: the forget is taken, erases at once, and waits its turn.
        assert post(server.url, "forget", {"user_id": "usr_cap"}).status_code == 202
        for n in range(3):  # webhook intake is never refused for the relay's backlog
            body, headers = signed_webhook(n)
            assert httpx.post(
                f"{server.url}/webhooks/stripe", content=body, headers=headers
            ).json() == {
                "ok": True,
                "result": "accepted",
            }
        knobs(sink, keys=[DEV_KEY])  # the key works again: the backlog drains
        wait_for(
            lambda: (
                {f"cap{i}" for i in range(5)} <= {c.get("event_id") for c in sink_calls(sink)}
                and {"route": "forget", "user_id": "usr_cap"} in sink_calls(sink)
            ),
            within=90,
        )
        # Once the backlog read again shows room, the relay takes calls again.
        wait_for(lambda: post(server.url, "track", {"event": "x"}).status_code == 202, within=30)


def test_a_batch_counts_its_calls_against_the_cap(sink: RunningSink, database_url: str) -> None:
    """A batch of 100 is 100 calls waiting, whether still in the inbox or in the outbox."""
    knobs(sink, keys=[])  # forwarding paused: the calls wait
    with serve(sink, database_url, BRIDGE_RELAY_MAX_PENDING="150") as server:
        for n in range(2):
            assert post(server.url, "batch", events(100, f"capb{n}-")).status_code == 202
        # 200 calls wait: refused at once. (Counted as one delivery each, the batches
        # would let about 150 tracks in; a read of the backlog taken while the second
        # still waited for translation lets at most 49 in until the next read.)
        taken = 0
        while (answer := post(server.url, "track", {"event": "x"})).status_code == 202:
            taken += 1
            assert taken < 50
        assert (answer.status_code, answer.json()["error"]) == (429, "rate_limited")


def test_forget_erases_at_once_and_is_sent_after_everything_before_it(
    sink: RunningSink, tmp_path: Path
) -> None:
    db = tmp_path / "bridge.db"
    user, visitor, keep = "usr_relay_forget", "anon_relay_forget", "usr_relay_keep"
    knobs(sink, keys=[])  # forwarding paused: every call below waits in the outbox
    with serve(sink, f"sqlite:///{db}") as server:
        for body in (
            {"event": "signup", "event_id": "f1", "user_id": user, "anonymous_id": visitor},
            {"event": "viewed", "event_id": "f2", "anonymous_id": visitor},  # the visitor alone
            {"event": "bought", "event_id": "k1", "user_id": keep},
        ):
            assert post(server.url, "track", body).status_code == 202
        assert (
            post(server.url, "identify", {"user_id": user, "traits": {"plan": "pro"}}).status_code
            == 202
        )
        assert mentions(db, user)
        assert mentions(db, visitor)

        assert post(server.url, "forget", {"user_id": user}).status_code == 202
        # Erased before the 202, WAL and all: what is left of the user is the forget itself,
        # waiting to be sent.
        assert not mentions(db, visitor)
        assert [route for route, body in outbox(db) if user in body] == ["forget"]
        assert mentions(db, keep)
        # After the forget, nothing naming the user is kept or sent. (The link to their
        # visitor went with the erasure: a later call naming that visitor alone is not
        # known to be theirs, for webhooks as for the relay.)
        after = [
            ("track", {"event": "late", "event_id": "f3", "user_id": user}),
            ("identify", {"user_id": user, "anonymous_id": "anon_new"}),
            ("batch", {"events": [{"event": "late", "event_id": "f5", "user_id": user}]}),
        ]
        for route, body in after:
            assert post(server.url, route, body).status_code == 202
        assert (
            post(
                server.url, "track", {"event": "after", "event_id": "k2", "user_id": keep}
            ).status_code
            == 202
        )
        knobs(sink, keys=[DEV_KEY])
        wait_for(
            lambda: (
                {"k1", "k2"} <= {c.get("event_id") for c in sink_calls(sink)}
                and sink.state.answers["forget 202"]
            )
        )
        time.sleep(1.0)  # anything more would show by now
        calls = sink_calls(sink)
    about = [c for c in calls if user in json.dumps(c) or visitor in json.dumps(c)]
    assert about == [{"route": "forget", "user_id": user}]
    assert {c.get("event_id") for c in calls if c["route"] == "track"} == {"k1", "k2"}
    wait_for(lambda: not mentions(db, user))  # the forget sent, its own row goes too


def outbox(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [
            (route, bytes(body).decode())
            for route, body in conn.execute("SELECT route, body FROM outbox")
        ]


def mentions(db: Path, needle: str) -> bool:
    """Whether any byte of the SQLite file, its WAL or its shared memory holds `needle`."""
    return any(
        needle.encode() in path.read_bytes()
        for path in db.parent.glob(db.name + "*")
        if path.is_file() and not path.name.endswith(".lock")
    )


@contextlib.contextmanager
def translation_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The translate stage's loop waits until the event is set (as on a bridge whose stage
    is behind): deliveries stay untranslated meanwhile."""
    release = threading.Event()
    run = Translator.run

    async def held(self: Translator, stopping: asyncio.Event) -> None:
        await asyncio.to_thread(release.wait)
        await run(self, stopping)

    monkeypatch.setattr(Translator, "run", held)
    try:
        yield release
    finally:
        release.set()


@pytest.mark.parametrize("caught_up", [True, False], ids=["caught-up", "not-caught-up"])
def test_a_forget_reaches_the_calls_before_it_that_wait_for_translation(
    sink: RunningSink,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caught_up: bool,
) -> None:
    """Calls about a user appended but not yet translated when their forget comes: none
    reaches Millimetric, the forget does, and so do other users' calls, the batch's
    included. The forget first translates what waits (`caught-up`); when that takes too
    long (`not-caught-up`: no time for it) the forget goes ahead, and the user's calls are
    dropped as they are translated (their tombstone)."""
    user, visitor, keep = "usr_waiting_forget", "anon_waiting_forget", "usr_waiting_keep"
    if not caught_up:
        monkeypatch.setattr(relay_stage, "CATCH_UP_SECONDS", 0.0)
    knobs(sink, keys=[])  # forwarding paused too: nothing is sent before the forget
    with translation_held(monkeypatch) as release, serve(sink, database_url) as server:
        before = [
            (
                "track",
                {"event": "signup", "event_id": "w1", "user_id": user, "anonymous_id": visitor},
            ),
            ("track", {"event": "viewed", "event_id": "w2", "anonymous_id": visitor}),
            (
                "batch",
                {
                    "events": [
                        {"event": "bought", "event_id": "w3", "user_id": user},
                        {"event": "bought", "event_id": "k1", "user_id": keep},
                    ]
                },
            ),
            ("identify", {"user_id": user, "traits": {"plan": "pro"}}),
            ("track", {"event": "viewed", "event_id": "k2", "user_id": keep}),
        ]
        for route, body in before:
            assert post(server.url, route, body).status_code == 202
        assert httpx.get(f"{server.url}/readyz").json()["untranslated"] == len(before)

        assert post(server.url, "forget", {"user_id": user}).json() == {"ok": True}
        waiting = httpx.get(f"{server.url}/readyz").json()["untranslated"]
        assert waiting == (0 if caught_up else len(before))
        if caught_up and database_url.startswith("sqlite:///"):
            db = tmp_path / "bridge.db"  # erased before the 202, the batch's payload too
            assert not mentions(db, visitor)
            # What is left of the user is the forget itself, until it is sent.
            assert {route for route, body in outbox(db) if user in body} <= {"forget"}
        release.set()
        knobs(sink, keys=[DEV_KEY])
        wait_for(
            lambda: (
                {"k1", "k2"} <= {c.get("event_id") for c in sink_calls(sink)}
                and sink.state.answers["forget 202"]
            )
        )
        time.sleep(1.0)  # anything more would show by now
        calls = sink_calls(sink)
    # Not caught up, the visitor's own track is not known to be the user's when it is
    # translated (its link came with a call that the forget dropped): why the forget
    # translates what waits first.
    names = (user, visitor) if caught_up else (user,)
    about = [c for c in calls if any(name in json.dumps(c) for name in names)]
    assert about == [{"route": "forget", "user_id": user}]
    assert {c["event_id"] for c in calls if c["route"] == "track"} >= {"k1", "k2"}


def test_forget_needs_a_secret_key_and_a_user(sqlite_relay: ServerThread) -> None:
    refused = post(
        sqlite_relay.url, "forget", {"user_id": "u"}, {"authorization": "Bearer rk_live_x_y"}
    )
    assert refused.json() == {"ok": False, "error": "forget_requires_secret_key"}
    assert post(sqlite_relay.url, "forget", {"user_id": ""}).json()["error"] == "invalid_payload"


def test_a_body_over_the_limit_is_413(sink: RunningSink, tmp_path: Path) -> None:
    with serve(sink, f"sqlite:///{tmp_path}/bridge.db", BRIDGE_MAX_BODY_BYTES="2048") as server:
        big = {"event": "x", "url": "https://x.example/" + "a" * 4096}
        answer = post(server.url, "track", big)
        assert answer.status_code == 413
        assert answer.json()["error"] == "payload_too_large"
        assert post(server.url, "track", {"event": "x"}).status_code == 202


def test_one_log_line_per_request_and_metrics_without_keys_or_values(
    sqlite_relay: ServerThread, sink: RunningSink
) -> None:
    secret_value = "person@example.org"
    with capture_logs() as lines:
        post(
            sqlite_relay.url,
            "track",
            {"event": "x", "user_id": secret_value},
            {**AUTH, "x-request-id": "req-r1"},
        )
        post(sqlite_relay.url, "track", {"event": "", "user_id": secret_value})
        post(sqlite_relay.url, "batch", events(3, "logb", user_id=secret_value))
        post(
            sqlite_relay.url, "track", {"event": "x"}, {"authorization": "Bearer sk_live_wrong_key"}
        )
        post(sqlite_relay.url, "track", {"event": "x", secret_value: 1})
    relay_lines = [line for line in lines if line["event"] == "relay"]
    assert [
        (x["route"], x["result"], x["reason"], x["status"], x["calls"]) for x in relay_lines
    ] == [
        ("track", "accepted", None, 202, 1),
        ("track", "rejected", "invalid_payload", 400, 0),
        ("batch", "accepted", None, 202, 3),
        ("track", "rejected", "invalid_api_key", 401, 0),
        ("track", "rejected", "invalid_payload", 400, 0),
    ]
    assert all(line["source"] == "relay" for line in relay_lines)
    assert relay_lines[0]["request_id"] == "req-r1"
    dumped = json.dumps(lines, default=str)
    for value in (secret_value, DEV_KEY, OTHER_KEY, "sk_live_wrong_key"):
        assert value not in dumped
    text = httpx.get(f"{sqlite_relay.url}/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert (
        samples[
            (
                "bridge_relay_requests_total",
                (("reason", ""), ("result", "accepted"), ("route", "batch")),
            )
        ]
        >= 1
    )
    assert (
        samples[
            (
                "bridge_relay_requests_total",
                (("reason", "invalid_api_key"), ("result", "rejected"), ("route", "track")),
            )
        ]
        >= 1
    )
    assert samples[("bridge_relayed_calls_total", (("route", "batch"),))] >= 3
    assert secret_value not in text
    assert DEV_KEY not in text


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("pk_live_abc_def", "is a pk_ browser key"),
        ("rk_live_abc_def", "is an rk_ read-only key"),
        ("sk_live_abc", "malformed"),
        (f"{OTHER_KEY},,{DEV_KEY}", "empty entry"),
        (f"{OTHER_KEY},not a key", "malformed"),
    ],
)
def test_bad_relay_keys_stop_start_up_without_repeating_them(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_settings({"MILLIMETRIC_KEY": DEV_KEY, "BRIDGE_RELAY_KEYS": value})
    assert caught.value.variable == "BRIDGE_RELAY_KEYS"
    for key in value.split(","):
        if key:
            assert key not in str(caught.value)


def test_relay_settings_and_their_defaults() -> None:
    off = load_settings({"MILLIMETRIC_KEY": DEV_KEY})
    assert (off.relay_keys, off.relay_max_pending) == ((), 1_000_000)
    assert load_settings({"MILLIMETRIC_KEY": DEV_KEY, "BRIDGE_RELAY_KEYS": " "}).relay_keys == ()
    on = load_settings(
        {
            "MILLIMETRIC_KEY": DEV_KEY,
            "BRIDGE_RELAY_KEYS": f" {DEV_KEY} ,{OTHER_KEY}",
            "BRIDGE_RELAY_MAX_PENDING": "20",
        }
    )
    assert (on.relay_keys, on.relay_max_pending) == ((DEV_KEY, OTHER_KEY), 20)
    for bad, says in (("many", "whole number"), ("0", "at least 1"), ("1.5", "whole number")):
        with pytest.raises(ConfigError, match=says):
            load_settings({"MILLIMETRIC_KEY": DEV_KEY, "BRIDGE_RELAY_MAX_PENDING": bad})


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (StoreUnavailable("sqlite: disk I/O error"), "sqlite: disk I/O error"),
        (sqlite3.InterfaceError("quoting usr_secret_value"), "the store failed: InterfaceError"),
    ],
)
@pytest.mark.parametrize(
    ("route", "body", "operation"),
    [
        # A track is appended to the inbox; a forget is stored with its erasure at once.
        ("track", {"event": "x", "user_id": "usr_secret_value"}, "append"),
        ("forget", {"user_id": "usr_secret_value"}, "accept"),
    ],
)
def test_a_store_that_cannot_take_a_call_is_503_with_retry_after(
    sink: RunningSink,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    message: str,
    route: str,
    body: dict[str, Any],
    operation: str,
) -> None:
    app = create_app(load_settings(relay_env(sink, f"sqlite:///{tmp_path}/bridge.db")))
    with ServerThread(app) as server:

        async def refuse(delivery: Any) -> Any:
            raise raised

        monkeypatch.setattr(app.state.store, operation, refuse)
        with capture_logs() as lines:
            answer = post(server.url, route, body)
        assert answer.status_code == 503
        assert answer.json() == {"ok": False, "error": "store_unavailable", "message": message}
        assert answer.headers["retry-after"] == "5"
        (line,) = [line for line in lines if line["event"] == "relay"]
        assert (line["result"], line["reason"], line["status"]) == (
            "rejected",
            "store_unavailable",
            503,
        )
        assert "usr_secret_value" not in json.dumps(lines, default=str)
        monkeypatch.undo()  # the store takes calls again
        assert post(server.url, route, body).status_code == 202


def test_a_nul_in_any_value_is_relayed_as_it_came(relay: ServerThread, sink: RunningSink) -> None:
    """PostgreSQL's text cannot hold a NUL: a relay delivery naming one is translated and
    sent all the same, never quarantined."""
    track = {
        "event": "nul\u0000event",
        "event_id": "nul\u0000id",
        "user_id": "usr\u0000nul",
        "anonymous_id": "anon\u0000nul",
        "properties": {"k\u0000": "v\u0000"},
    }
    assert post(relay.url, "track", track).json() == {"ok": True, "event_id": "nul\u0000id"}
    identify = {"user_id": "usr\u0000nul", "traits": {"t": "\u0000"}}
    assert post(relay.url, "identify", identify).status_code == 202
    calls = wait_for(lambda: len(sink_calls(sink)) >= 3 and sink_calls(sink))
    sent = {c["route"]: {k: v for k, v in c.items() if k != "route"} for c in calls}
    assert sent["track"] == {**track, "timestamp": sent["track"]["timestamp"]}
    assert identify in [{k: v for k, v in c.items() if k != "route"} for c in calls]
    assert httpx.get(f"{relay.url}/readyz").json()["quarantined"] == 0


def test_a_request_is_stored_as_one_delivery_of_its_checked_completed_calls(
    sink: RunningSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the 202: one `relay` delivery a request, untranslated, whose raw body is the
    request's calls as the Structs read them, completed, re-encoded compact and canonical
    (a track or a batch as a batch's body)."""
    db = tmp_path / "bridge.db"
    with translation_held(monkeypatch), serve(sink, f"sqlite:///{db}") as server:
        before = time.time()
        track = post(server.url, "track", {"user_id": "u1", "event": "signup"})
        zoned = "2024-05-01T10:00:00+05:30"
        batch = post(
            server.url,
            "batch",
            {"events": [{"event": "a", "timestamp": zoned, "event_id": "b1"}, {"event": "b"}]},
        )
        identify = post(server.url, "identify", {"traits": {"plan": "pro"}, "user_id": "u1"})
        assert [a.status_code for a in (track, batch, identify)] == [202] * 3
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                "SELECT source, provider_event_id, state, raw_body FROM inbox ORDER BY id"
            ).fetchall()
            assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
    assert [(r[0], r[2]) for r in rows] == [("relay", "untranslated")] * 3
    assert len({r[1] for r in rows}) == 3
    assert all(r[1].startswith("relay-") for r in rows)
    stored_track, stored_batch, stored_identify = (bytes(r[3]) for r in rows)
    stamped = json.loads(stored_track)["events"][0]["timestamp"]
    assert before - 1 <= datetime.fromisoformat(stamped).timestamp() <= time.time()
    event_id = track.json()["event_id"]
    assert stored_track == (
        b'{"events":[{"event":"signup","event_id":"%s","timestamp":"%s","user_id":"u1"}]}'
        % (event_id.encode(), stamped.encode())
    )
    (first, second) = json.loads(stored_batch)["events"]
    assert first == {"event": "a", "event_id": "b1", "timestamp": zoned}
    assert set(second) == {"event", "event_id", "timestamp"}
    assert stored_identify == b'{"identify":{"user_id":"u1","traits":{"plan":"pro"}}}'


def test_what_the_relay_stores_its_handler_gives_back_and_a_bad_one_is_quarantined(
    sink: RunningSink, database_url: str
) -> None:
    """A relay delivery the Structs refuse cannot come from the relay (it checked the calls
    before storing them); one that does all the same is quarantined and listed like any
    other, and holds back none after it."""
    good = Relayed(events=[Track(event="x", event_id="good-1", user_id="u")])
    with serve(sink, database_url) as server:
        app = server.server.config.app
        store: Store = app.state.store
        assert server.loop is not None

        def append(provider_event_id: str, body: bytes) -> None:
            delivery = Delivery(
                source=RELAY_SOURCE,
                provider_event_id=provider_event_id,
                received_at=time.time(),
                raw_body=body,
            )
            asyncio.run_coroutine_threadsafe(store.append(delivery), server.loop).result(10)
            app.state.translator.wake()

        append("relay-bad", b'{"events":[{"event":""}]}')
        append("relay-good", encoded(good))
        assert [c["event_id"] for c in sink.arrived(1)] == ["good-1"]
        dead = httpx.get(f"{server.url}/readyz").json()
        assert dead["quarantined"] == 1
        (letter,) = asyncio.run_coroutine_threadsafe(store.dead_letters(), server.loop).result(10)
    assert (letter.kind, letter.source, letter.provider_event_id) == (
        "delivery",
        "relay",
        "relay-bad",
    )
    assert letter.reason.startswith("payload: not a relay delivery")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
TRACKS = st.fixed_dictionaries(
    {"event": st.text(min_size=1, max_size=130)},
    optional={
        "event_id": st.text(max_size=130),
        "timestamp": st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
        "anonymous_id": st.text(),
        "user_id": st.text(),
        "url": st.text(),
        "properties": st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=4),
    },
)
REQUESTS = st.one_of(
    st.tuples(st.just("track"), TRACKS),
    st.tuples(st.just("batch"), st.fixed_dictionaries({"events": st.lists(TRACKS, max_size=3)})),
    st.tuples(
        st.just("identify"),
        st.fixed_dictionaries(
            {"user_id": st.text()},
            optional={"anonymous_id": st.text(), "traits": st.dictionaries(st.text(), JSON_VALUES)},
        ),
    ),
)


@settings(max_examples=300, deadline=None, database=None)
@given(request=REQUESTS)
def test_whatever_the_relay_takes_translates_back_to_the_same_calls(
    request: tuple[str, dict[str, Any]],
) -> None:
    """So a relay delivery is never quarantined for its content."""
    route, body = request
    try:
        call = parse_call(route, msgspec.json.encode(body))
    except IngestRefused:  # answered 400, never stored
        assume(False)
        return
    assert not isinstance(call, Forget)  # none is generated: a forget is never appended
    relayed, count, _ = relay_stage._prepared(call, time.time())
    stored = StoredDelivery(
        id=1,
        source=RELAY_SOURCE,
        provider_event_id="relay-x",
        received_at=0.0,
        raw_body=encoded(relayed),
        headers={},
    )
    translation = translate_one(stored, with_relay({}))
    assert translation.failure is None
    expected = [*relayed.events, *([relayed.identify] if relayed.identify else [])]
    assert translation.outputs == expected
    assert len(expected) == count


@pytest.mark.anyio
async def test_a_translate_batch_ends_at_its_calls_and_the_rest_follows(store: Store) -> None:
    """Relay batches become hundreds of calls a delivery: a batch of the translate stage
    ends once its deliveries have become `batch_calls` calls (the writes of one batch
    hold up everything else meanwhile), and the next batch takes the rest."""
    for n in range(3):
        relayed = Relayed(events=[Track(event="x", event_id=f"c{n}-{i}") for i in range(100)])
        delivery = Delivery(
            source=RELAY_SOURCE,
            provider_event_id=f"relay-calls-{n}",
            received_at=time.time(),
            raw_body=encoded(relayed),
        )
        assert await store.append(delivery) == "accepted"
    translator = Translator(store, with_relay({}), TranslatorConfig(batch_calls=150))
    assert await translator.step() == 2  # 100 calls, then 200: past 150
    assert (await store.backlog()).untranslated == 1
    assert await translator.step() == 1
    assert (await store.backlog()).pending == 300
