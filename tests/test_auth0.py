"""Auth0 log streams: the Authorization token, the three body formats, one event per log
record (deduplicated on log_id), bad records skipped without sinking their batch, and the
end-to-end path through the real app and the real sink."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from bridge.errors import PayloadInvalid, SignatureInvalid
from bridge.events import Forget, Identify, Track, encode
from bridge.plugin import WebhookRequest
from bridge.testing import TEST_SECRET, run_handler, signed_request
from handlers.auth0 import Auth0Options, AuthorizationScheme, handler
from tests.conftest import RunningSink, translated
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "auth0"
TOKEN = "Bearer 6f1d0c2b9a8e7f6d5c4b3a29"
OLD_TOKEN = "Bearer 0a1b2c3d4e5f"
USER = "auth0|6740a1f2c3d4e5f60718293a"
LOGIN_ID = "90020261120101645000000000000000000000000000000000000003"
SIGNUP = f"signup:auth0:{USER}"  # one sign-up per user, whichever record tells of it


def records() -> list[dict[str, Any]]:
    decoded: list[dict[str, Any]] = msgspec.json.decode(
        (FIXTURES / "log_stream_batch.json").read_bytes()
    )
    return decoded


def sdu() -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode((FIXTURES / "sdu.SYNTHETIC.json").read_bytes())
    return decoded


def jsonl(items: list[Any]) -> bytes:
    return b"\n".join(msgspec.json.encode(i) for i in items) + b"\n"


def request(body: bytes, authorization: str | None) -> WebhookRequest:
    headers = {} if authorization is None else {"authorization": authorization}
    return WebhookRequest(source="auth0", headers=headers, body=body, received_at=time.time())


def event_ids(calls: list[Any]) -> list[str | None]:
    return [c.event_id for c in calls if isinstance(c, Track)]


# -- the token ---------------------------------------------------------------------------


def test_the_whole_authorization_value_is_the_token() -> None:
    scheme = AuthorizationScheme()
    body = (FIXTURES / "log_stream_batch.json").read_bytes()
    scheme.verify(request(body, TOKEN), [TOKEN], 300)
    scheme.verify(request(body, TOKEN), [OLD_TOKEN, TOKEN], 300)  # rotation
    for wrong in ("6f1d0c2b9a8e7f6d5c4b3a29", "Bearer 6f1d0c2b9a8e7f6d5c4b3a2", "bearer x"):
        with pytest.raises(SignatureInvalid, match="does not match"):
            scheme.verify(request(body, wrong), [TOKEN], 300)
    with pytest.raises(SignatureInvalid, match="missing Authorization header"):
        scheme.verify(request(body, None), [TOKEN], 300)
    with pytest.raises(SignatureInvalid, match="missing Authorization header"):
        scheme.verify(request(body, "  "), [TOKEN], 300)
    with pytest.raises(SignatureInvalid):
        scheme.verify(request(body, "Bearer \udcff\u00e9"), [TOKEN], 300)  # odd bytes: refused


def test_the_token_is_never_kept_and_the_scheme_says_the_body_is_not_signed() -> None:
    scheme = handler.scheme
    assert scheme.headers == ()  # the intake stores the listed headers; this one is a secret
    assert scheme.signs_timestamp is False
    assert getattr(scheme, "signs_body", True) is False
    assert scheme.sign(b"[]", TOKEN, 0) == {
        "authorization": TOKEN,
        "content-type": "application/json",
    }


# -- bodies -------------------------------------------------------------------------------


def test_array_json_lines_and_single_objects_become_the_same_events() -> None:
    array = run_handler(handler, (FIXTURES / "log_stream_batch.json").read_bytes())
    lines = run_handler(handler, (FIXTURES / "log_stream_batch.jsonl").read_bytes())
    singles = [run_handler(handler, msgspec.json.encode(r)) for r in records()]
    assert array.calls == lines.calls == [c for s in singles for c in s.calls]
    identify, signup, login = array.calls  # the failed sign-up (fs) is ignored
    assert identify == Identify(
        user_id=USER,
        traits={"connection": "Username-Password-Authentication", "strategy": "auth0"},
    )
    assert isinstance(signup, Track)
    assert isinstance(login, Track)
    assert (signup.event, signup.event_id) == ("signup", SIGNUP)
    assert (login.event, login.event_id) == ("login", f"login:auth0:{LOGIN_ID}")
    assert signup.user_id == login.user_id == USER
    assert signup.timestamp is not None
    assert signup.timestamp.isoformat() == "2026-11-20T10:16:30.480000+00:00"
    assert login.properties == {
        "connection": "Username-Password-Authentication",
        "strategy": "auth0",
        "client_id": "aZ7kQ2nV9xL0pT4rB8wY1cE6",
        "client_name": "Acme Web",
    }
    # Three deliveries of the same records: three delivery ids, the same event ids.
    assert len({array.delivery_id, lines.delivery_id}) == 2
    assert array.delivery_id.startswith("sha256:")


def test_no_ip_user_agent_name_or_email_leaves_the_bridge() -> None:
    calls = run_handler(handler, (FIXTURES / "log_stream_batch.json").read_bytes()).calls
    wire = b"".join(encode(c) for c in calls if isinstance(c, Track | Identify | Forget))
    for private in (b"203.0.113.42", b"Mozilla", b"kim@example.org", b"password", b"tenant"):
        assert private not in wire


def test_a_bad_record_does_not_sink_its_batch() -> None:
    _, ss, s = records()
    no_date = {
        "log_id": "90020261120000000000000000000000000000000000000000000009",
        "data": {**s["data"], "date": None},
    }
    naive_date = {
        "log_id": "90020261120000000000000000000000000000000000000000000010",
        "data": {**s["data"], "date": "2026-11-20T10:16:45"},
    }
    no_log_id = {"data": {k: v for k, v in s["data"].items() if k != "log_id"}}
    long_log_id = {"log_id": "9" * 101, "data": {**s["data"], "log_id": "9" * 101}}
    wrong = [
        {"data": "not an object"},
        42,
        "text",
        None,
        [],
        no_date,
        naive_date,
        no_log_id,
        long_log_id,
        {"log_id": "x"},
    ]
    expected = run_handler(handler, msgspec.json.encode([ss, s])).calls
    assert len(expected) == 3
    array = msgspec.json.encode([ss, *wrong, s])
    assert run_handler(handler, array).calls == expected
    lines = jsonl([ss, *wrong]) + b"{not json at all\n\n" + jsonl([s])
    assert run_handler(handler, lines).calls == expected
    batch = handler.parse(request(array, TOKEN))
    assert (len(batch.records), batch.skipped) == (2, len(wrong))


def test_a_record_nested_past_the_decoders_depth_does_not_sink_its_batch() -> None:
    _, ss, s = records()
    expected = run_handler(handler, msgspec.json.encode([ss, s])).calls
    deep = b"[" * 5000 + b"]" * 5000  # msgspec raises RecursionError on it
    nested = b'{"log_id": "x", "data": {"type": "s", "details": ' + deep + b"}}"
    for bad in (deep, nested):
        # First, in the middle and last: each line is its own record.
        for lines in (bad + b"\n" + jsonl([ss, s]), jsonl([ss]) + bad + b"\n" + jsonl([s])):
            assert run_handler(handler, lines).calls == expected
    with pytest.raises(PayloadInvalid):  # nothing else in the body: refused, not a 500
        handler.parse(request(deep, TOKEN))


def test_the_log_id_may_be_only_inside_data() -> None:
    s = records()[2]
    del s["log_id"]
    assert event_ids(run_handler(handler, msgspec.json.encode(s)).calls) == [
        f"login:auth0:{LOGIN_ID}"
    ]


@pytest.mark.parametrize(
    "body", [b"", b"   ", b"not json", b"{not json", b"42", b'"text"', b"null", b"\xff\xfe"]
)
def test_a_body_that_is_not_a_log_stream_is_refused(body: bytes) -> None:
    with pytest.raises(PayloadInvalid):
        handler.parse(request(body, TOKEN))


def test_an_empty_array_is_acknowledged() -> None:
    assert run_handler(handler, b"[]").calls == []


def test_records_without_a_user_and_other_types_are_ignored() -> None:
    fs, _, s = records()
    anonymous_login = {**s, "data": {**s["data"], "user_id": ""}}
    others = [{**s, "data": {**s["data"], "type": t}} for t in ("ssa", "seacft", "slo", "f")]
    assert run_handler(handler, msgspec.json.encode([fs, anonymous_login, *others])).calls == []


def test_user_deletion_forgets_only_when_the_source_asks() -> None:
    body = msgspec.json.encode(sdu())
    assert run_handler(handler, body).calls == []
    forgotten = run_handler(handler, body, forget_on_user_deleted=True).calls
    assert forgotten == [Forget(user_id="auth0|6182002f34f4dd006b05b5c7")]


def test_redelivery_gives_the_same_delivery_and_event_ids() -> None:
    body = (FIXTURES / "log_stream_batch.jsonl").read_bytes()
    first, again = run_handler(handler, body), run_handler(handler, body)
    assert (first.delivery_id, first.calls) == (again.delivery_id, again.calls)
    # Auth0 may regroup records into other batches: the events stay the same.
    fs, _, s = records()
    regrouped = run_handler(handler, msgspec.json.encode([s, fs])).calls
    assert event_ids(regrouped) == [f"login:auth0:{LOGIN_ID}"]
    assert set(event_ids(regrouped)) <= set(event_ids(first.calls))


def test_samples_translate_the_same_every_time_and_freshen_into_new_records() -> None:
    samples = handler.samples()
    assert set(samples) == {"batch", "ss", "s", "sens", "sdu"}
    for sample in samples.values():
        one = run_handler(handler, sample.body, headers=sample.headers)
        two = run_handler(handler, sample.body, headers=sample.headers)
        assert (one.delivery_id, one.calls) == (two.delivery_id, two.calls)
        fresh = handler.freshen(sample)
        renewed = run_handler(handler, fresh.body, headers=fresh.headers)
        assert renewed.delivery_id != one.delivery_id
        assert len(renewed.calls) == len(one.calls)
        assert not set(event_ids(renewed.calls)) & set(event_ids(one.calls))


def test_options_are_strict() -> None:
    assert Auth0Options().forget_on_user_deleted is False
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"forget_on_user_delete": True}, Auth0Options)


# -- end to end ---------------------------------------------------------------------------


def post(bridge: Served, body: bytes, authorization: str | None = TOKEN) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    return httpx.post(f"{bridge.url}/webhooks/auth0", content=body, headers=headers)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    config = "[sources.auth0]\nforget_on_user_deleted = true\n"
    with served(handler, sink, tmp_path, config=config, secret=f"{OLD_TOKEN}, {TOKEN}") as running:
        yield running


def test_a_log_stream_end_to_end(bridge: Served) -> None:
    lines = (FIXTURES / "log_stream_batch.jsonl").read_bytes()
    assert post(bridge, lines).json() == {"ok": True, "result": "accepted"}
    calls = sorted(bridge.arrived(3), key=lambda c: (c["route"], c.get("event", "")))
    assert calls == [
        {
            "route": "identify",
            "user_id": USER,
            "traits": {"connection": "Username-Password-Authentication", "strategy": "auth0"},
        },
        {
            "route": "track",
            "event": "login",
            "event_id": f"login:auth0:{LOGIN_ID}",
            "timestamp": "2026-11-20T10:16:45.002000Z",
            "user_id": USER,
            "properties": {
                "connection": "Username-Password-Authentication",
                "strategy": "auth0",
                "client_id": "aZ7kQ2nV9xL0pT4rB8wY1cE6",
                "client_name": "Acme Web",
            },
        },
        {
            "route": "track",
            "event": "signup",
            "event_id": SIGNUP,
            "timestamp": "2026-11-20T10:16:30.480000Z",
            "user_id": USER,
            "properties": {
                "connection": "Username-Password-Authentication",
                "strategy": "auth0",
                "client_id": "aZ7kQ2nV9xL0pT4rB8wY1cE6",
                "client_name": "Acme Web",
            },
        },
    ]
    # The same batch again is a redelivery; the same records as an array are a new
    # delivery whose tracks carry event ids the bridge has queued already: it queues only
    # its identify (keyed by its place in the delivery), so no track is sent twice.
    assert post(bridge, lines).json()["result"] == "duplicate"
    array = (FIXTURES / "log_stream_batch.json").read_bytes()
    assert post(bridge, array, authorization=OLD_TOKEN).json()["result"] == "accepted"
    array_id = "sha256:" + hashlib.sha256(array).hexdigest()
    assert translated(bridge.database, array_id) == ("translated", None)
    again = bridge.arrived(4)
    assert [c["route"] for c in again].count("identify") == 2
    tracks = [c for c in again if c["route"] == "track"]
    assert len(tracks) == 2
    stats = bridge.sink.stats()
    assert (stats["unique_event_ids"], stats["duplicates"]) == (2, 0)
    # The token is checked and never stored beside the raw body.
    with sqlite3.connect(bridge.database) as db:
        stored = [row[0] for row in db.execute("SELECT headers FROM inbox")]
    assert stored
    assert all(TOKEN.encode() not in (h or b"") for h in stored)


def test_refusals_a_quarantined_body_and_a_bad_record_end_to_end(bridge: Served) -> None:
    body = (FIXTURES / "log_stream_batch.json").read_bytes()
    assert post(bridge, body, authorization="Bearer wrong").status_code == 401
    missing = post(bridge, body, authorization=None)
    assert missing.status_code == 401
    assert missing.json()["reason"] == "missing Authorization header"
    # A body with no JSON in it is taken (its id is its hash) and quarantined, not sent.
    unreadable = TOKEN.encode() + b" not json"
    assert post(bridge, unreadable).json() == {"ok": True, "result": "accepted"}
    unreadable_id = "sha256:" + hashlib.sha256(unreadable).hexdigest()
    state, reason = translated(bridge.database, unreadable_id)
    assert state == "quarantined"
    assert reason is not None
    assert reason.startswith("payload: ")
    s = records()[2]
    mixed = msgspec.json.encode([{"log_id": "broken", "data": []}, s, sdu()])
    assert post(bridge, mixed).json()["result"] == "accepted"
    calls = sorted(bridge.arrived(2), key=lambda c: c["route"])
    assert [c.get("event", c["route"]) for c in calls] == ["forget", "login"]
    assert calls[0] == {"route": "forget", "user_id": "auth0|6182002f34f4dd006b05b5c7"}
    with sqlite3.connect(bridge.database) as db:
        queued = db.execute(
            "SELECT count(*) FROM outbox JOIN inbox ON inbox.id = outbox.inbox_id"
            " WHERE inbox.provider_event_id = ?",
            (unreadable_id,),
        ).fetchone()[0]
    assert queued == 0


def test_an_unset_token_leaves_the_source_unmounted(sink: RunningSink, tmp_path: Path) -> None:
    with served(handler, sink, tmp_path, secret=None) as running:
        answer = httpx.post(
            f"{running.url}/webhooks/auth0", content=b"[]", headers={"authorization": TEST_SECRET}
        )
        assert answer.status_code == 404


def test_every_sample_sent_as_send_test_does_is_taken(bridge: Served) -> None:
    for event, sample in sorted(handler.samples().items()):
        fresh = handler.freshen(sample)
        headers = {**fresh.headers, **handler.scheme.sign(fresh.body, TOKEN, int(time.time()))}
        answer = httpx.post(f"{bridge.url}/webhooks/auth0", content=fresh.body, headers=headers)
        assert answer.json() == {"ok": True, "result": "accepted"}, event


# A token with characters outside ASCII, one of them "à", whose last UTF-8 byte (0xA0)
# reads as a no-break space in latin-1: a strip() of the header's text would cut it off.
WIDE_TOKEN = "Bearer jeton-secret-à-clé-€-✓-à"


def test_a_non_ascii_token_is_compared_as_the_utf8_bytes_sent() -> None:
    scheme = AuthorizationScheme()
    body = (FIXTURES / "log_stream_batch.json").read_bytes()
    # As the intake reads the header: the UTF-8 bytes sent, decoded as latin-1.
    sent = WIDE_TOKEN.encode().decode("latin-1")
    scheme.verify(request(body, sent), [WIDE_TOKEN], 300)
    scheme.verify(signed_request(handler, body, secret=WIDE_TOKEN), [WIDE_TOKEN], 300)
    # Text that no wire gives (a character past U+00FF) is taken as the text it is.
    scheme.verify(request(body, WIDE_TOKEN), [WIDE_TOKEN], 300)
    for wrong in (
        WIDE_TOKEN.encode("utf-16-le").decode("latin-1"),
        sent[:-1],  # the token less its last byte, 0xA0
        sent + "\xa0",
        "Bearer jeton-secret-a-cle---a",
    ):
        with pytest.raises(SignatureInvalid, match="does not match"):
            scheme.verify(request(body, wrong), [WIDE_TOKEN], 300)
    # Within latin-1, a header's text is the bytes sent: "é" is the one byte 0xE9 there,
    # not the token's two.
    with pytest.raises(SignatureInvalid, match="does not match"):
        scheme.verify(request(body, "Bearer clé"), ["Bearer clé"], 300)


def test_a_non_ascii_token_end_to_end(sink: RunningSink, tmp_path: Path) -> None:
    body = (FIXTURES / "log_stream_batch.json").read_bytes()
    with served(handler, sink, tmp_path, secret=WIDE_TOKEN) as running:
        url = f"{running.url}/webhooks/auth0"

        def send(token: bytes) -> httpx.Response:
            return httpx.post(url, content=body, headers={b"authorization": token})

        assert send(WIDE_TOKEN.encode()).json() == {"ok": True, "result": "accepted"}
        assert send(WIDE_TOKEN.encode("latin-1", "replace")).status_code == 401
        assert send(WIDE_TOKEN.encode()[:-1]).status_code == 401
        assert send(WIDE_TOKEN.encode() + b"\xa0").status_code == 401
        assert len(sink.arrived(3)) == 3
