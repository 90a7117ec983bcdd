"""Clerk: what each event becomes, the handler contract on its samples, and one end to end
run through the real app and the real sink, signed the way Svix signs (svix-* headers,
computed here from the specification rather than by the code under test).

The payloads are synthetic (see fixtures/clerk/README.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from bridge.app import create_app
from bridge.config import load_settings
from bridge.errors import PayloadInvalid, SignatureInvalid
from bridge.events import Forget, Identify, Track, encode
from bridge.plugin import Handler, WebhookRequest
from bridge.registry import check_handler, load_sources
from bridge.testing import TEST_SECRET, run_handler, signed_request
from handlers import clerk
from handlers.clerk import handler
from tests.conftest import RunningSink, ServerThread, translated

FIXTURES = Path(__file__).parent / "fixtures" / "clerk"
SECRET = "whsec_" + base64.b64encode(b"clerk endpoint secret, current!!").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"clerk endpoint secret, previous!").decode()
USER = "user_2pSynthUser0000000000000001"


def fixture(name: str, **changes: Any) -> dict[str, Any]:
    """A payload with `changes` applied to its data (`timestamp_` sets the envelope's)."""
    event: dict[str, Any] = msgspec.json.decode((FIXTURES / f"{name}.SYNTHETIC.json").read_bytes())
    for key, value in changes.items():
        if key == "timestamp_":
            event["timestamp"] = value
        else:
            event["data"][key] = value
    return event


def body_of(event: dict[str, Any]) -> bytes:
    return msgspec.json.encode(event)


def translate(event: dict[str, Any], **options: Any) -> list[Any]:
    return run_handler(handler, body_of(event), **options).calls


# --- translation -----------------------------------------------------------------------


def test_is_a_handler_and_its_samples_are_the_fixtures() -> None:
    assert check_handler("clerk", handler) is handler
    samples = handler.samples()
    assert set(samples) == {"user.created", "session.created", "user.deleted"}
    for name, sample in samples.items():
        assert sample.body == (FIXTURES / f"{name}.SYNTHETIC.json").read_bytes()


def test_user_created_is_identify_and_signup() -> None:
    calls = translate(fixture("user.created"))
    assert calls == [
        Identify(user_id=USER, anonymous_id="anon_7f3c2a91"),
        Track(
            event="signup",
            event_id=f"signup:{USER}",
            timestamp=datetime(2024, 11, 27, 10, 0, 0, 200000, tzinfo=UTC),
            anonymous_id="anon_7f3c2a91",
            user_id=USER,
        ),
    ]


def test_user_created_without_a_browser_id_still_identifies() -> None:
    calls = translate(fixture("user.created", unsafe_metadata={}))
    assert calls[0] == Identify(user_id=USER)
    assert isinstance(calls[1], Track)
    assert calls[1].anonymous_id is None


def test_no_personal_data_leaves_the_bridge() -> None:
    calls = translate(fixture("user.created"))
    sent = b"".join(encode(c) for c in calls)
    for personal in (b"ada@example.org", b"Ada", b"Lovelace", b"192.0.2.10", b"Mozilla"):
        assert personal not in sent


def test_session_created_is_login() -> None:
    calls = translate(fixture("session.created"))
    assert calls == [
        Track(
            event="login",
            event_id="login:sess_2pSynthSession0000000000001",
            timestamp=datetime(2024, 11, 27, 10, 1, 0, 400000, tzinfo=UTC),
            user_id=USER,
        )
    ]


def test_the_time_is_the_events_else_the_objects_creation() -> None:
    without = fixture("session.created")
    del without["timestamp"]
    (login,) = translate(without)
    assert login.timestamp == datetime(2024, 11, 27, 10, 1, 0, 300000, tzinfo=UTC)
    neither = fixture("session.created", created_at=None)
    del neither["timestamp"]
    assert translate(neither)[0].timestamp is None  # the bridge's arrival time then
    with pytest.raises(PayloadInvalid, match="usable time"):
        translate(fixture("session.created", timestamp_=10**20))


def test_user_deleted_is_forget_only_when_the_source_asks() -> None:
    assert translate(fixture("user.deleted")) == []
    assert translate(fixture("user.deleted"), forget_on_user_deleted=True) == [Forget(user_id=USER)]


@pytest.mark.parametrize(
    "kind", ["user.updated", "session.ended", "organization.created", "email.created"]
)
def test_other_events_are_acknowledged_and_ignored(kind: str) -> None:
    event = fixture("user.created")
    event["type"] = kind
    event["data"] = {"anything": ["clerk", "may", "send"]}
    assert translate(event) == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"data": {}}',  # no type
        b'{"type": "user.created", "data": {"id": 5}, "object": "event"}',
        b'{"type": "user.created", "data": {"id": "user_1"}, "timestamp": "yesterday"}',
        b'{"type": "user.created", "data": {}}',
        b'{"type": "session.created", "data": {"id": "sess_1"}}',
    ],
)
def test_unreadable_bodies_are_payload_invalid(body: bytes) -> None:
    with pytest.raises(PayloadInvalid):
        run_handler(handler, body)


def test_the_delivery_id_is_the_message_id_from_either_header_family() -> None:
    body = body_of(fixture("user.created"))
    signed = signed_request(handler, body)
    assert handler.delivery_id(signed) == signed.headers["webhook-id"]
    now = int(time.time())
    svix = WebhookRequest(
        source="clerk",
        headers={
            "svix-id": "msg_2pSvixMessage",
            "svix-timestamp": str(now),
            "svix-signature": svix_signature(TEST_SECRET, "msg_2pSvixMessage", now, body),
        },
        body=body,
        received_at=time.time(),
    )
    handler.scheme.verify(svix, [TEST_SECRET], 300)
    assert handler.delivery_id(svix) == "msg_2pSvixMessage"


def test_freshen_makes_a_new_delivery_about_a_new_user() -> None:
    sample = handler.samples()["user.created"]
    fresh = handler.freshen(sample)
    first, second = run_handler(handler, sample.body), run_handler(handler, fresh.body)
    assert first.delivery_id != second.delivery_id
    assert first.calls[0] != second.calls[0]
    assert translate(
        msgspec.json.decode(handler.freshen(handler.samples()["session.created"]).body)
    )


# --- the handler contract on this handler's samples (it is not an entry point yet) -----

SAMPLES = sorted(handler.samples())


@pytest.mark.parametrize("event", SAMPLES)
def test_contract_samples_translate_the_same_every_time(event: str) -> None:
    sample = handler.samples()[event]
    one, two = (run_handler(handler, sample.body, headers=sample.headers) for _ in range(2))
    assert one.delivery_id
    assert one.delivery_id == two.delivery_id
    assert one.calls == two.calls


@pytest.mark.parametrize("event", SAMPLES)
def test_contract_refusals_and_rotation(event: str) -> None:
    h: Handler = handler
    body = h.samples()[event].body
    good = signed_request(h, body)
    tampered = WebhookRequest(
        source="clerk",
        headers=good.headers,
        body=body.replace(b"}", b" }", 1),
        received_at=time.time(),
    )
    with pytest.raises(SignatureInvalid):
        h.scheme.verify(tampered, [TEST_SECRET], 300)
    with pytest.raises(SignatureInvalid):
        h.scheme.verify(good, ["whsec_b3RoZXIgc2VjcmV0"], 300)
    h.scheme.verify(good, ["whsec_b3RoZXIgc2VjcmV0", TEST_SECRET], 300)
    for skew in (-301, 310):  # ahead by a margin: the clock moves on before verify
        skewed = signed_request(h, body, timestamp=int(time.time()) + skew)
        with pytest.raises(SignatureInvalid, match="tolerance"):
            h.scheme.verify(skewed, [TEST_SECRET], 300)


# --- end to end ------------------------------------------------------------------------


def svix_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Bridge:
    def __init__(self, url: str, sink: RunningSink, database: Path) -> None:
        self.url = url
        self.sink = sink
        self.database = database

    def post(
        self,
        event: dict[str, Any] | bytes,
        msg_id: str,
        *,
        secrets: tuple[str, ...] = (SECRET,),
        timestamp: int | None = None,
    ) -> httpx.Response:
        """As Svix sends it: svix-* headers, one v1 entry per secret during rotation."""
        body = event if isinstance(event, bytes) else body_of(event)
        when = timestamp or int(time.time())
        headers = {
            "svix-id": msg_id,
            "svix-timestamp": str(when),
            "svix-signature": " ".join(svix_signature(s, msg_id, when, body) for s in secrets),
            "content-type": "application/json",
        }
        return httpx.post(f"{self.url}/webhooks/clerk", content=body, headers=headers)

    def arrived(self, count: int, within: float = 10) -> list[dict[str, Any]]:
        return self.sink.arrived(count, within)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Bridge]:
    (tmp_path / "bridge.toml").write_text("[sources.clerk]\nforget_on_user_deleted = true\n")
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        "CLERK_WEBHOOK_SECRET": f"{OLD_SECRET}, {SECRET}",
    }
    sources = load_sources(env, {"clerk": clerk.handler})
    with ServerThread(create_app(load_settings(env), sources=sources)) as server:
        yield Bridge(server.url, sink, tmp_path / "bridge.db")


def test_end_to_end_signup_login_redelivery_and_erasure(bridge: Bridge) -> None:
    assert bridge.post(fixture("user.created"), "msg_signup").json() == {
        "ok": True,
        "result": "accepted",
    }
    # Svix retries a message with the same id, a new time and a new signature.
    retry = bridge.post(fixture("user.created"), "msg_signup", timestamp=int(time.time()) - 5)
    assert retry.json()["result"] == "duplicate"
    # During rotation Svix signs with both secrets; the old one alone is accepted too.
    assert (
        bridge.post(fixture("session.created"), "msg_login", secrets=(SECRET, OLD_SECRET)).json()[
            "result"
        ]
        == "accepted"
    )
    calls = sorted(bridge.arrived(3), key=lambda c: (c["route"], c.get("event", "")))
    assert calls == [
        {"route": "identify", "user_id": USER, "anonymous_id": "anon_7f3c2a91"},
        {
            "route": "track",
            "event": "login",
            "event_id": "login:sess_2pSynthSession0000000000001",
            "timestamp": "2024-11-27T10:01:00.400000Z",
            "user_id": USER,
        },
        {
            "route": "track",
            "event": "signup",
            "event_id": f"signup:{USER}",
            "timestamp": "2024-11-27T10:00:00.200000Z",
            "anonymous_id": "anon_7f3c2a91",
            "user_id": USER,
        },
    ]
    assert bridge.post(fixture("user.deleted"), "msg_deleted").status_code == 200
    assert bridge.arrived(4)[-1] == {"route": "forget", "user_id": USER}


def test_end_to_end_refusals_store_nothing_and_an_unreadable_body_is_quarantined(
    bridge: Bridge,
) -> None:
    body = body_of(fixture("user.created"))
    stale = bridge.post(body, "msg_stale", timestamp=int(time.time()) - 301)
    assert stale.status_code == 401
    assert "tolerance" in stale.json()["reason"]
    future = bridge.post(body, "msg_future", timestamp=int(time.time()) + 310)
    assert future.status_code == 401
    wrong = bridge.post(body, "msg_wrong", secrets=("whsec_b3RoZXIgc2VjcmV0",))
    assert wrong.status_code == 401
    unsigned = httpx.post(f"{bridge.url}/webhooks/clerk", content=body)
    assert unsigned.status_code == 401
    assert unsigned.json()["reason"] == "missing webhook-id header"
    garbage = httpx.post(
        f"{bridge.url}/webhooks/clerk",
        content=body,
        headers={
            b"svix-id": b"msg_\xe9",
            b"svix-timestamp": b"\xb2",
            b"svix-signature": b"v1,\xff",
        },
    )
    assert garbage.status_code == 401
    # Signed but unreadable: taken, then quarantined by the translate stage, never sent.
    assert bridge.post(b"{not json", "msg_bad").json() == {"ok": True, "result": "accepted"}
    state, reason = translated(bridge.database, "msg_bad")
    assert state == "quarantined"
    assert reason is not None
    assert reason.startswith("payload: ")
    with sqlite3.connect(bridge.database) as db:
        stored = db.execute("SELECT provider_event_id FROM inbox").fetchall()
    assert stored == [("msg_bad",)]  # the refusals stored nothing
    assert httpx.get(f"{bridge.url}/readyz").json()["pending"] == 0
    assert httpx.get(f"{bridge.sink.url}/_sink/stats").json()["received"] == 0
