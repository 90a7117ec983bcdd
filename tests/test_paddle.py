"""Paddle Billing: the signature scheme against signatures made outside this code
(signatures.example.json), what each notification becomes, money read exactly, the handler
contract on its samples, and one end to end run through the real app and the real sink."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
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
from bridge.events import Alias, Identify, Track
from bridge.plugin import Handler, SignatureScheme, WebhookRequest
from bridge.registry import check_handler, load_sources
from bridge.testing import TEST_SECRET, run_handler, signed_request
from handlers import paddle
from handlers.paddle import PaddleScheme, handler
from tests.conftest import RunningSink, ServerThread, translated

FIXTURES = Path(__file__).parent / "fixtures" / "paddle"
EXAMPLE: dict[str, Any] = json.loads((FIXTURES / "signatures.example.json").read_text())
EXAMPLE_SECRET: str = EXAMPLE["secret"]
EXAMPLE_TIME: int = EXAMPLE["ts"]
SECRET = "pdl_ntfset_01jcurrent0000000000000000_currentSecretKeyForTests"
OLD_SECRET = "pdl_ntfset_01jprevious000000000000000_previousSecretKeyForTest"
CUSTOMER = "paddle:ctm_01h8e18bxp9hby49dnm8ewf0m0"

frozen = PaddleScheme(clock=lambda: float(EXAMPLE_TIME))


def fixture(name: str, **changes: Any) -> dict[str, Any]:
    """A notification with `changes` applied to its data (`event_id_` sets the envelope's)."""
    event: dict[str, Any] = msgspec.json.decode((FIXTURES / f"{name}.json").read_bytes())
    for key, value in changes.items():
        if key.endswith("_"):
            event[key.rstrip("_")] = value
        else:
            event["data"][key] = value
    return event


def with_totals(**totals: Any) -> dict[str, Any]:
    event = fixture("transaction.completed")
    event["data"]["details"]["totals"] = totals
    return event


def translate(event: dict[str, Any]) -> list[Any]:
    return run_handler(handler, msgspec.json.encode(event)).calls


def h1(secret: str, timestamp: int, body: bytes) -> str:
    """Computed here from Paddle's documentation, not by the code under test."""
    return hmac.new(secret.encode(), f"{timestamp}:".encode() + body, hashlib.sha256).hexdigest()


def request(header: str | None, body: bytes) -> WebhookRequest:
    headers = {} if header is None else {"paddle-signature": header}
    return WebhookRequest(source="paddle", headers=headers, body=body, received_at=time.time())


# --- the signature scheme --------------------------------------------------------------


def test_keeps_the_protocols() -> None:
    assert check_handler("paddle", handler) is handler
    assert isinstance(handler.scheme, SignatureScheme)
    assert handler.scheme.signs_timestamp


@pytest.mark.parametrize("name", sorted(EXAMPLE["files"]))
def test_example_signatures_verify(name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    signed = request(EXAMPLE["files"][name]["Paddle-Signature"], body)
    frozen.verify(signed, [EXAMPLE_SECRET], 300)
    age = int(time.time()) - EXAMPLE_TIME
    handler.scheme.verify(signed, [EXAMPLE_SECRET], age + 60)
    with pytest.raises(SignatureInvalid, match="tolerance"):
        handler.scheme.verify(signed, [EXAMPLE_SECRET], 300)
    # sign() makes the very same header.
    assert frozen.sign(body, EXAMPLE_SECRET, EXAMPLE_TIME) == {
        "paddle-signature": EXAMPLE["files"][name]["Paddle-Signature"],
        "content-type": "application/json",
    }


def test_rotation_several_h1_and_several_secrets() -> None:
    body = (FIXTURES / "transaction.completed.json").read_bytes()
    real = h1(EXAMPLE_SECRET, EXAMPLE_TIME, body)
    other = h1(SECRET, EXAMPLE_TIME, body)
    for header in (
        f"ts={EXAMPLE_TIME};h1={other};h1={real}",
        f"ts={EXAMPLE_TIME};h1={real};h1={other}",
        f"h1={real}; ts={EXAMPLE_TIME}",
        f"ts={EXAMPLE_TIME};h1={real.upper()}",
    ):
        frozen.verify(request(header, body), [EXAMPLE_SECRET], 300)
    only_other = request(f"ts={EXAMPLE_TIME};h1={other}", body)
    frozen.verify(only_other, [EXAMPLE_SECRET, SECRET], 300)
    with pytest.raises(SignatureInvalid, match="no valid Paddle signature"):
        frozen.verify(only_other, [EXAMPLE_SECRET], 300)


def test_tampered_bodies_are_refused() -> None:
    name = "transaction.completed.json"
    body = (FIXTURES / name).read_bytes()
    header = EXAMPLE["files"][name]["Paddle-Signature"]
    with pytest.raises(SignatureInvalid, match="no valid Paddle signature"):
        frozen.verify(request(header, body.replace(b"65215", b"99999", 1)), [EXAMPLE_SECRET], 300)
    moved = header.replace(f"ts={EXAMPLE_TIME}", f"ts={EXAMPLE_TIME + 1}")
    with pytest.raises(SignatureInvalid, match="no valid Paddle signature"):
        frozen.verify(request(moved, body), [EXAMPLE_SECRET], 300)


@pytest.mark.parametrize("skew", [301, -310, 10**7])
def test_stale_and_future_times_are_refused(skew: int) -> None:
    body = b"{}"
    ts = int(time.time()) - skew
    signed = request(f"ts={ts};h1={h1(SECRET, ts, body)}", body)
    with pytest.raises(SignatureInvalid, match="300s tolerance"):
        handler.scheme.verify(signed, [SECRET], 300)
    if abs(skew) < 600:
        handler.scheme.verify(signed, [SECRET], 600)  # the source's tolerance decides


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing Paddle-Signature"),
        ("", "missing Paddle-Signature"),
        ("garbage", "one ts expected"),
        ("h1=00", "one ts expected"),
        ("ts=1700000000;ts=1700000000;h1=00", "one ts expected"),
        ("ts=;h1=00", "ts is not a time"),
        ("ts=17000000.5;h1=00", "ts is not a time"),
        ("ts=\uff11\uff1700000000;h1=00", "malformed"),  # full-width digits
        ("ts=" + "9" * 5000 + ";h1=00", "ts is not a time"),
        ("ts=1700000000", "no h1"),
        ("ts=1700000000;h1=", "no h1"),
        ("ts=1700000000;h2=abc", "no h1"),
        ("ts=1700000000;h1=\xe9\xe9", "malformed"),
        ("ts=1700000000;h1=zz", "no valid Paddle signature"),
    ],
)
def test_garbage_headers_are_refused(header: str | None, reason: str) -> None:
    with pytest.raises(SignatureInvalid, match=reason) as refused:
        frozen.verify(request(header, b"{}"), [EXAMPLE_SECRET], 300)
    assert EXAMPLE_SECRET not in str(refused.value)


# --- translation -----------------------------------------------------------------------


def test_transaction_completed_is_a_purchase() -> None:
    result = run_handler(handler, (FIXTURES / "transaction.completed.json").read_bytes())
    assert result.delivery_id == "evt_01h8e1jxjnw9ra6zarhnz1a7y1"
    assert result.calls == [
        Track(
            event="purchase",
            event_id="purchase:txn_01h8dzxgkvdwemdhbpcapj2tbj",
            timestamp=datetime(2023, 8, 22, 7, 15, 45, 366122, tzinfo=UTC),
            anonymous_id=CUSTOMER,
            properties={
                "amount_cents": 65215,
                "currency": "USD",
                "transaction": "txn_01h8dzxgkvdwemdhbpcapj2tbj",
                "origin": "web",
            },
        )
    ]


def test_custom_data_names_the_user_and_the_browser() -> None:
    event = fixture(
        "transaction.completed",
        custom_data={"user_id": "user_42", "millimetric_anonymous_id": "browser-9"},
        subscription_id="sub_1",
    )
    alias, purchase = translate(event)
    assert alias == Alias(alias=CUSTOMER, anonymous_id="browser-9")
    assert (purchase.anonymous_id, purchase.user_id) == ("browser-9", "user_42")
    assert purchase.properties["subscription"] == "sub_1"
    (numeric,) = translate(fixture("transaction.completed", custom_data={"user_id": 42}))
    assert numeric.user_id == "42"
    (odd,) = translate(fixture("transaction.completed", custom_data={"user_id": True}))
    assert odd.user_id is None


def test_grand_total_is_what_was_paid_else_total() -> None:
    (paid,) = translate(with_totals(total="65215", grand_total="60215", currency_code="USD"))
    assert paid.properties["amount_cents"] == 60215
    (total,) = translate(with_totals(total="65215", currency_code="EUR"))
    assert (total.properties["amount_cents"], total.properties["currency"]) == (65215, "EUR")
    # No currency in the totals: the transaction's.
    (fallback,) = translate(with_totals(total="100"))
    assert fallback.properties["currency"] == "USD"


@pytest.mark.parametrize(
    ("amount", "currency", "cents"),
    [
        ("1200", "JPY", 1200),  # no minor unit: yen as they are
        ("12345", "KWD", 12345),  # three decimals: 12.345 dinar, in fils
        ("9007199254740993", "USD", 9007199254740993),  # 2^53 + 1: a float would round it
        ("123456789012345678901234567", "USD", 123456789012345678901234567),
    ],
)
def test_money_is_read_exactly_as_minor_units(amount: str, currency: str, cents: int) -> None:
    (purchase,) = translate(with_totals(grand_total=amount, currency_code=currency))
    assert purchase.properties["amount_cents"] == cents
    assert type(purchase.properties["amount_cents"]) is int
    assert purchase.properties["currency"] == currency


@pytest.mark.parametrize("amount", ["652.15", "1e3", "²", " 12", "12 ", "0x10", "1_000", "-"])
def test_amounts_that_are_not_integer_strings_are_payload_invalid(amount: str) -> None:
    with pytest.raises(PayloadInvalid, match="minor units"):
        translate(with_totals(grand_total=amount, currency_code="USD"))


@pytest.mark.parametrize("currency", ["US Dollars", "usdx", "€€€", "U$D"])
def test_a_currency_that_is_not_an_iso_code_is_payload_invalid(currency: str) -> None:
    with pytest.raises(PayloadInvalid, match="ISO 4217"):
        translate(with_totals(grand_total="100", currency_code=currency))
    refund = fixture("adjustment.updated", totals={"total": "100", "currency_code": currency})
    with pytest.raises(PayloadInvalid, match="ISO 4217"):
        translate(refund)


def test_a_transaction_without_an_amount_or_a_free_one_is_not_a_purchase() -> None:
    assert translate(with_totals(grand_total="0", currency_code="USD")) == []
    assert translate(with_totals(currency_code="USD")) == []
    event = with_totals(grand_total="0", currency_code="USD")
    event["data"]["custom_data"] = {"user_id": "user_trial"}
    assert translate(event) == [Identify(user_id="user_trial", anonymous_id=CUSTOMER)]


def test_subscriptions_started_and_canceled() -> None:
    (started,) = translate(fixture("subscription.created", custom_data={"user_id": "user_7"}))
    assert started.event == "subscription_started"
    assert started.event_id == "subscription_started:sub_01h7ht5z5wdg9pz18jx1fagp8k"
    assert started.user_id == "user_7"
    assert started.anonymous_id == "paddle:ctm_01h7hswb86rtps5ggbq7ybydcw"
    assert started.timestamp == datetime(2023, 8, 11, 8, 7, 38, 334150, tzinfo=UTC)
    assert started.properties == {
        "subscription": "sub_01h7ht5z5wdg9pz18jx1fagp8k",
        "status": "active",
        "price": "pri_01gsz8x8sawmvhz1pv30nge1ke",
        "interval": "month",
        "frequency": 1,
        "quantity": 10,
        "items": 2,
        "amount_cents": 3240 * 10 + 10800,
        "currency": "USD",
    }
    (canceled,) = translate(fixture("subscription.canceled"))
    assert canceled.event == "subscription_canceled"
    assert canceled.event_id == "subscription_canceled:sub_01h7ht5z5wdg9pz18jx1fagp8k"
    assert canceled.properties["amount_cents"] == 3240 * 10 + 10800 + 30000


def test_a_subscription_priced_in_another_currency_states_no_amount() -> None:
    event = fixture("subscription.created", currency_code="AUD")
    (started,) = translate(event)
    assert "amount_cents" not in started.properties
    assert started.properties["currency"] == "AUD"


def test_an_approved_refund_is_a_refund_once() -> None:
    assert translate(fixture("adjustment.created")) == []  # pending approval
    (refund,) = translate(fixture("adjustment.updated"))
    assert refund == Track(
        event="refund",
        event_id="refund:adj_01h8c6tbrkpdd7vx61w7b1r0ap",
        timestamp=datetime(2023, 8, 21, 14, 10, 8, 650443, tzinfo=UTC),
        anonymous_id="paddle:ctm_01h8441jn5pcwrfhwh78jqt8hk",
        properties={
            "amount_cents": 100,
            "currency": "USD",
            "adjustment": "adj_01h8c6tbrkpdd7vx61w7b1r0ap",
            "transaction": "txn_01h8bxpvx398a7zbawb77y0kp5",
            "subscription": "sub_01h8bxswamxysj44zt5n48njwh",
        },
    )
    # Approved at creation: the same event_id, so created + updated count once.
    (approved_at_once,) = translate(fixture("adjustment.created", status="approved"))
    assert approved_at_once.event_id == refund.event_id
    assert approved_at_once.properties["fully_refunded"] is False
    (full,) = translate(fixture("adjustment.updated", type="full"))
    assert full.properties["fully_refunded"] is True


@pytest.mark.parametrize(
    "changes",
    [
        {"action": "credit"},
        {"action": "chargeback"},
        {"status": "rejected"},
        {"status": "reversed"},
        {"totals": None},
        {"totals": {"total": "0", "currency_code": "USD"}},
    ],
)
def test_other_adjustments_are_not_refunds(changes: dict[str, Any]) -> None:
    assert translate(fixture("adjustment.updated", **changes)) == []


@pytest.mark.parametrize(
    "kind", ["transaction.paid", "transaction.created", "customer.created", "payout.paid"]
)
def test_other_events_are_acknowledged_and_ignored(kind: str) -> None:
    event = fixture("transaction.completed", event_type_=kind)
    event["data"] = {"anything": "paddle may send"}
    assert translate(event) == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"event_type": "transaction.completed"}',
        b'{"event_id": "evt_1", "event_type": "transaction.completed",'
        b' "occurred_at": "2023-08-22T07:15:45", "data": {"id": "txn_1"}}',  # no zone
        b'{"event_id": "evt_1", "event_type": "transaction.completed",'
        b' "occurred_at": "2023-08-22T07:15:45Z", "data": {"status": "completed"}}',  # no id
        b'{"event_id": "evt_1", "event_type": "transaction.completed",'
        b' "occurred_at": "2023-08-22T07:15:45Z", "data": {"id": "t", "details": 5}}',
    ],
)
def test_unreadable_bodies_are_payload_invalid(body: bytes) -> None:
    with pytest.raises(PayloadInvalid):
        run_handler(handler, body)


def test_freshen_makes_a_new_delivery_about_a_new_transaction() -> None:
    sample = handler.samples()["transaction.completed"]
    fresh = handler.freshen(sample)
    one, two = run_handler(handler, sample.body), run_handler(handler, fresh.body)
    assert one.delivery_id != two.delivery_id
    (purchase,) = two.calls
    assert isinstance(purchase, Track)
    assert (purchase.event_id or "").startswith("purchase:txn_test_")
    assert purchase.timestamp is not None
    assert purchase.timestamp.year >= 2026


# --- the handler contract on this handler's samples (it is not an entry point yet) -----

SAMPLES = sorted(handler.samples())


def test_samples_are_the_fixtures() -> None:
    for name, sample in handler.samples().items():
        assert sample.body == (FIXTURES / f"{name}.json").read_bytes()
        assert not sample.headers


@pytest.mark.parametrize("event", SAMPLES)
def test_contract_samples_translate_the_same_every_time(event: str) -> None:
    body = handler.samples()[event].body
    one, two = run_handler(handler, body), run_handler(handler, body)
    assert one.delivery_id
    assert one.delivery_id == two.delivery_id
    assert one.calls == two.calls


@pytest.mark.parametrize("event", SAMPLES)
def test_contract_refusals_and_rotation(event: str) -> None:
    h: Handler = handler
    body = h.samples()[event].body
    good = signed_request(h, body)
    tampered = WebhookRequest(
        source="paddle",
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


class Bridge:
    def __init__(self, url: str, sink: RunningSink, database: Path) -> None:
        self.url = url
        self.sink = sink
        self.database = database

    def post(
        self,
        event: dict[str, Any] | bytes,
        *,
        secrets: tuple[str, ...] = (SECRET,),
        timestamp: int | None = None,
    ) -> httpx.Response:
        """As Paddle sends it: one h1 per secret key while a key is rotated."""
        body = event if isinstance(event, bytes) else msgspec.json.encode(event)
        ts = timestamp or int(time.time())
        header = f"ts={ts};" + ";".join(f"h1={h1(s, ts, body)}" for s in secrets)
        return httpx.post(
            f"{self.url}/webhooks/paddle",
            content=body,
            headers={"paddle-signature": header, "content-type": "application/json"},
        )

    def arrived(self, count: int, within: float = 10) -> list[dict[str, Any]]:
        return self.sink.arrived(count, within)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Bridge]:
    (tmp_path / "bridge.toml").write_text("")
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        "PADDLE_WEBHOOK_SECRET": f"{OLD_SECRET},{SECRET}",
    }
    sources = load_sources(env, {"paddle": paddle.handler})
    with ServerThread(create_app(load_settings(env), sources=sources)) as server:
        yield Bridge(server.url, sink, tmp_path / "bridge.db")


def test_end_to_end_purchase_renewal_refund(bridge: Bridge) -> None:
    first = fixture("transaction.completed", custom_data={"user_id": "user_42"})
    assert bridge.post(first).json() == {"ok": True, "result": "accepted"}
    # The same event again (a retry, or a second notification destination): stored once.
    assert bridge.post(first, secrets=(OLD_SECRET,)).json()["result"] == "duplicate"
    # A renewal carries no custom_data; the user learned for the customer goes on it.
    renewal = fixture(
        "transaction.completed",
        event_id_="evt_renewal",
        id="txn_renewal",
        origin="subscription_recurring",
    )
    assert bridge.post(renewal, secrets=(SECRET, OLD_SECRET)).status_code == 200
    refund = fixture("adjustment.updated", customer_id="ctm_01h8e18bxp9hby49dnm8ewf0m0")
    assert bridge.post(refund).status_code == 200
    calls = bridge.arrived(4)
    assert [c for c in calls if c["route"] == "identify"] == [
        {"route": "identify", "user_id": "user_42", "anonymous_id": CUSTOMER}
    ]
    tracks = sorted((c for c in calls if c["route"] == "track"), key=lambda c: c["event_id"])
    assert tracks == [
        {
            "route": "track",
            "event": "purchase",
            "event_id": "purchase:txn_01h8dzxgkvdwemdhbpcapj2tbj",
            "timestamp": "2023-08-22T07:15:45.366122Z",
            "anonymous_id": CUSTOMER,
            "user_id": "user_42",
            "properties": {
                "amount_cents": 65215,
                "currency": "USD",
                "transaction": "txn_01h8dzxgkvdwemdhbpcapj2tbj",
                "origin": "web",
            },
        },
        {
            "route": "track",
            "event": "purchase",
            "event_id": "purchase:txn_renewal",
            "timestamp": "2023-08-22T07:15:45.366122Z",
            "anonymous_id": CUSTOMER,
            "user_id": "user_42",
            "properties": {
                "amount_cents": 65215,
                "currency": "USD",
                "transaction": "txn_renewal",
                "origin": "subscription_recurring",
            },
        },
        {
            "route": "track",
            "event": "refund",
            "event_id": "refund:adj_01h8c6tbrkpdd7vx61w7b1r0ap",
            "timestamp": "2023-08-21T14:10:08.650443Z",
            "anonymous_id": CUSTOMER,
            "user_id": "user_42",
            "properties": {
                "amount_cents": 100,
                "currency": "USD",
                "adjustment": "adj_01h8c6tbrkpdd7vx61w7b1r0ap",
                "transaction": "txn_01h8bxpvx398a7zbawb77y0kp5",
                "subscription": "sub_01h8bxswamxysj44zt5n48njwh",
            },
        },
    ]


def test_end_to_end_refusals_store_nothing_and_unreadable_content_is_quarantined(
    bridge: Bridge,
) -> None:
    event = fixture("transaction.completed")
    stale = bridge.post(event, timestamp=int(time.time()) - 301)
    assert stale.status_code == 401
    assert "tolerance" in stale.json()["reason"]
    assert bridge.post(event, timestamp=int(time.time()) + 310).status_code == 401
    assert bridge.post(event, secrets=(EXAMPLE_SECRET,)).status_code == 401  # not configured
    unsigned = httpx.post(f"{bridge.url}/webhooks/paddle", content=msgspec.json.encode(event))
    assert unsigned.json()["reason"] == "missing Paddle-Signature header"
    hostile = httpx.post(
        f"{bridge.url}/webhooks/paddle",
        content=b"{}",
        headers={b"paddle-signature": b"ts=\xb2;h1=\xe9"},
    )
    assert hostile.status_code == 401
    assert bridge.post(b"{not json").status_code == 400  # no event_id to store it under
    # Signed, with an event_id, but an amount it cannot read: taken, then quarantined.
    bad_total = with_totals(grand_total="652.15", currency_code="USD")
    assert bridge.post(bad_total).json() == {"ok": True, "result": "accepted"}
    assert translated(bridge.database, bad_total["event_id"]) == (
        "quarantined",
        "payload: data.details.totals.grand_total is not an integer amount in minor units",
    )
    # A notification the bridge does not translate is acknowledged, so Paddle stops
    # retrying, and becomes no call.
    ignored = fixture(
        "transaction.completed",
        event_type_="transaction.paid",
        event_id_="evt_01h8e1jxjnw9ra6zarhnz1a7y2",
    )
    assert bridge.post(ignored).json() == {"ok": True, "result": "accepted"}
    assert translated(bridge.database, ignored["event_id"]) == ("translated", None)
    with contextlib.closing(sqlite3.connect(bridge.database)) as db:
        stored = db.execute("SELECT provider_event_id FROM inbox ORDER BY id").fetchall()
        queued = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    assert stored == [(bad_total["event_id"],), (ignored["event_id"],)]  # refusals: nothing
    assert queued == 0
    assert httpx.get(f"{bridge.url}/readyz").json()["pending"] == 0
    assert httpx.get(f"{bridge.sink.url}/_sink/stats").json()["received"] == 0
