"""Lemon Squeezy: the recorded signature verifies, orders, refunds, subscriptions and
renewals become the expected calls (integer minor units, never floats), test mode stays
out unless asked for, and the end-to-end path through the real app and the real sink."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from bridge.errors import PayloadInvalid, SignatureInvalid
from bridge.events import Alias, Track
from bridge.plugin import WebhookRequest
from bridge.testing import run_handler, signed_request
from handlers.lemonsqueezy import handler
from tests.conftest import RunningSink, translated
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "lemonsqueezy"
SECRET = "ls-signing-secret-current"
OLD_SECRET = "ls-signing-secret-previous"


def fixture(name: str, meta: dict[str, Any] | None = None, **attributes: Any) -> dict[str, Any]:
    """A recorded event with `meta` merged into its meta and `attributes` into its data."""
    path = FIXTURES / f"{name}.json"
    if not path.exists():
        path = FIXTURES / f"{name}.SYNTHETIC.json"
    event: dict[str, Any] = msgspec.json.decode(path.read_bytes())
    event["meta"].update(meta or {})
    event["data"]["attributes"].update(attributes)
    return event


def run(event: dict[str, Any], **options: Any) -> list[Any]:
    return run_handler(handler, msgspec.json.encode(event), **options).calls


# -- signatures ---------------------------------------------------------------------------


def test_the_recorded_signature_verifies_and_a_tampered_body_does_not() -> None:
    signatures = json.loads((FIXTURES / "signatures.example.json").read_text())
    for name, headers in signatures["files"].items():
        body = (FIXTURES / name).read_bytes()
        signed = {"x-signature": headers["X-Signature"], "x-event-name": headers["X-Event-Name"]}
        good = WebhookRequest(source="lemonsqueezy", headers=signed, body=body, received_at=0)
        handler.scheme.verify(good, [signatures["secret"]], 300)
        handler.scheme.verify(good, ["other", signatures["secret"]], 300)  # rotation
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(good, ["test_signing_secret2"], 300)
        tampered = WebhookRequest(
            source="lemonsqueezy",
            headers=signed,
            body=body.replace(b"5899", b"9999", 1),
            received_at=0,
        )
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(tampered, [signatures["secret"]], 300)
        missing = WebhookRequest(source="lemonsqueezy", headers={}, body=body, received_at=0)
        with pytest.raises(SignatureInvalid, match="missing x-signature"):
            handler.scheme.verify(missing, [signatures["secret"]], 300)


# -- translation ----------------------------------------------------------------------------


def test_an_order_is_a_purchase_in_integer_minor_units() -> None:
    translated = run_handler(handler, (FIXTURES / "order_created.json").read_bytes())
    (purchase,) = translated.calls
    assert isinstance(purchase, Track)
    assert purchase.event == "purchase"
    assert purchase.event_id == "purchase:lemonsqueezy:order:1"
    assert purchase.timestamp is not None
    assert purchase.timestamp.isoformat() == "2023-01-17T12:26:23+00:00"
    assert purchase.anonymous_id == "lemonsqueezy:1"
    assert purchase.user_id is None  # this older payload has no custom data
    assert purchase.properties == {
        "amount_cents": 5899,
        "currency": "USD",
        "order": "1",
        "store_id": 1,
        "product_id": 1,
        "variant_id": 1,
    }
    assert type(purchase.properties["amount_cents"]) is int
    # Its meta has only event_name: the id is what the event is and the object's version.
    assert translated.delivery_id == "order_created:orders:1:2023-01-17T12:26:23.000000Z"


def test_the_checkouts_user_and_browser_come_along() -> None:
    event = fixture(
        "order_created",
        meta={"custom_data": {"user_id": 42, "millimetric_anonymous_id": "browser-7"}},
    )
    alias, purchase = run(event)
    assert alias == Alias(alias="lemonsqueezy:1", anonymous_id="browser-7")
    assert (purchase.user_id, purchase.anonymous_id) == ("42", "browser-7")
    odd = fixture("order_created", meta={"custom_data": {"user_id": True}})
    assert run(odd)[0].user_id is None


def test_orders_that_moved_no_money_are_not_purchases() -> None:
    for status in ("pending", "failed", "refunded"):
        assert run(fixture("order_created", status=status)) == []
    assert run(fixture("order_created", total=0)) == []


def test_money_always_carries_an_iso_currency_code() -> None:
    # An amount without its currency cannot be added up: skipped rather than sent bare.
    for name in ("order_created", "order_refunded", "subscription_payment_success"):
        assert len(run(fixture(name))) == 1
        for currency in (None, ""):
            assert run(fixture(name, currency=currency)) == []
    (purchase,) = run(fixture("order_created", currency="eur"))
    assert purchase.properties["currency"] == "EUR"
    for wrong in ("US Dollars", "€", 840):
        with pytest.raises(PayloadInvalid):
            run(fixture("order_created", currency=wrong))


def test_test_mode_stays_out_unless_the_source_includes_it() -> None:
    live_options = handler.options_type(include_test_events=False)
    for event in (
        fixture("order_created", meta={"test_mode": True}),
        fixture("order_created", test_mode=True),
    ):
        assert run(event, options=live_options) == []
        assert len(run(event, include_test_events=True)) == 1
    assert len(run(fixture("order_created"), options=live_options)) == 1


def test_a_refund_counts_once_per_order() -> None:
    (refund,) = run(fixture("order_refunded"))
    assert refund.event == "refund"
    assert refund.event_id == "refund:lemonsqueezy:order:4211907"
    assert refund.timestamp.isoformat() == "2026-11-12T09:41:07+00:00"
    assert refund.user_id == "user_318"
    assert refund.properties == {
        "amount_cents": 5831,
        "currency": "EUR",
        "order": "4211907",
        "fully_refunded": True,
    }
    (partial,) = run(
        fixture("order_refunded", status="partial_refund", refunded=False, refunded_amount=1000)
    )
    assert partial.properties["amount_cents"] == 1000
    assert partial.properties["fully_refunded"] is False
    assert partial.event_id == refund.event_id  # a later refund never subtracts twice
    older = fixture("order_refunded", refunded_amount=None)
    del older["data"]["attributes"]["refunded_amount"]
    assert run(older)[0].properties["amount_cents"] == 5831  # `refunded: true`: the total
    silent = fixture("order_refunded", refunded=False, status="paid")
    del silent["data"]["attributes"]["refunded_amount"]
    assert run(silent) == []  # says neither: skipped rather than guessed


def test_subscriptions_start_and_cancel() -> None:
    (started,) = run(fixture("subscription_created"))
    assert (started.event, started.event_id) == (
        "subscription_started",
        "subscription_started:lemonsqueezy:771204",
    )
    assert started.timestamp.isoformat() == "2026-11-10T16:30:02+00:00"
    assert started.properties == {
        "subscription": "771204",
        "order": "4211951",
        "status": "active",
        "quantity": 1,
        "product_id": 210560,
        "variant_id": 301893,
    }
    (canceled,) = run(fixture("subscription_cancelled"))
    assert (canceled.event, canceled.event_id) == (
        "subscription_canceled",
        "subscription_canceled:lemonsqueezy:771204:20261120T081445Z",  # when it happened
    )
    assert canceled.timestamp.isoformat() == "2026-11-20T08:14:45+00:00"
    assert canceled.properties["ends_at"] == "2026-12-10T16:30:02+00:00"
    assert started.anonymous_id == canceled.anonymous_id == "lemonsqueezy:3920442"


def test_renewals_are_purchases_and_the_first_payment_is_its_orders() -> None:
    (renewal,) = run(fixture("subscription_payment_success"))
    assert renewal.event_id == "purchase:lemonsqueezy:invoice:1650377"
    assert renewal.properties == {
        "amount_cents": 1900,
        "currency": "USD",
        "invoice": "1650377",
        "subscription": "771204",
        "billing_reason": "renewal",
    }
    (proration,) = run(fixture("subscription_payment_success", billing_reason="updated"))
    assert proration.properties["billing_reason"] == "updated"
    assert run(fixture("subscription_payment_success", billing_reason="initial")) == []
    assert run(fixture("subscription_payment_success", status="pending")) == []


def test_other_events_are_acknowledged_unread() -> None:
    for name in ("subscription_updated", "license_key_created", "affiliate_activated"):
        event = {"meta": {"event_name": name}, "data": {"type": "x", "id": 1, "attributes": []}}
        assert run(event) == []


def test_the_event_name_comes_from_the_signed_body_only() -> None:
    body = fixture("order_created")
    del body["meta"]["event_name"]
    encoded = msgspec.json.encode(body)
    # The header is not signed: it never names a body that does not name itself.
    for headers in ({"x-event-name": "order_created"}, {}):
        with pytest.raises(PayloadInvalid, match="no event name"):
            handler.parse(signed_request(handler, encoded, headers=headers))
    # Nor does it rename one: a refund re-sent as order_created is refused, also when
    # translated from the stored delivery (the header is one the bridge keeps).
    refund = msgspec.json.encode(fixture("order_refunded"))
    with pytest.raises(PayloadInvalid, match="X-Event-Name is order_created"):
        run_handler(handler, refund, headers={"x-event-name": "order_created"})
    # Without the header, or with the body's own name, it is read.
    (call,) = run_handler(handler, refund).calls
    assert call.event == "refund"
    assert run_handler(handler, refund, headers={"x-event-name": "order_refunded"}).calls


def test_delivery_ids_are_stable_per_version_and_use_webhook_id_when_present() -> None:
    body = msgspec.json.encode(fixture("subscription_created"))
    one, again = run_handler(handler, body), run_handler(handler, body)
    assert (
        one.delivery_id
        == again.delivery_id
        == (
            "subscription_created:subscriptions:771204:2026-11-10T16:30:05.000000Z:"
            "0d6e2f3c-8a41-4c1b-b7e2-2f9a5c7d1e34"
        )
    )
    changed = fixture("subscription_created", updated_at="2026-11-10T16:31:00.000000Z")
    assert run_handler(handler, msgspec.json.encode(changed)).delivery_id != one.delivery_id
    # Two events about one object at one moment are two deliveries.
    cancelled = fixture("subscription_cancelled", updated_at="2026-11-10T16:30:05.000000Z")
    cancelled["meta"]["webhook_id"] = "0d6e2f3c-8a41-4c1b-b7e2-2f9a5c7d1e34"
    assert run_handler(handler, msgspec.json.encode(cancelled)).delivery_id != one.delivery_id


def test_malformed_payloads_are_refused() -> None:
    for body in (b"not json", b"[]", b'{"meta": {"event_name": "order_created"}}'):
        with pytest.raises(PayloadInvalid):
            handler.parse(signed_request(handler, body))
    wrong = fixture("order_created", total="58.99")
    request = signed_request(handler, msgspec.json.encode(wrong))
    with pytest.raises(PayloadInvalid, match="unexpected order_created attributes"):
        handler.translate(request, handler.parse(request), handler.options_type())


def test_samples_translate_the_same_every_time_and_freshen_into_new_deliveries() -> None:
    samples = handler.samples()
    assert set(samples) == {
        "order_created",
        "order_refunded",
        "subscription_created",
        "subscription_cancelled",
        "subscription_expired",
        "subscription_payment_success",
        "subscription_payment_refunded",
    }
    for event, sample in samples.items():
        assert sample.headers == {"x-event-name": event}
        one = run_handler(handler, sample.body, headers=sample.headers)
        two = run_handler(handler, sample.body, headers=sample.headers)
        assert (one.delivery_id, one.calls) == (two.delivery_id, two.calls)
        assert one.calls, event
        fresh = handler.freshen(sample)
        renewed = run_handler(handler, fresh.body, headers=fresh.headers)
        assert renewed.delivery_id != one.delivery_id
        assert len(renewed.calls) == len(one.calls)


# -- end to end ---------------------------------------------------------------------------


def post(
    bridge: Served,
    event: dict[str, Any] | bytes,
    secret: str = SECRET,
    source: str = "lemonsqueezy",
) -> httpx.Response:
    body = event if isinstance(event, bytes) else msgspec.json.encode(event)
    headers = handler.scheme.sign(body, secret, 0)
    if isinstance(event, dict):
        headers["x-event-name"] = event["meta"].get("event_name", "")
    return httpx.post(f"{bridge.url}/webhooks/{source}", content=body, headers=headers)


def taken(
    bridge: Served,
    body: bytes,
    source: str = "lemonsqueezy",
    headers: dict[str, str] | None = None,
) -> tuple[str, str | None, int]:
    """Once translated: the stored delivery's state, quarantine reason and the number of
    calls its translation queued."""
    delivery = handler.delivery_id(signed_request(handler, body, headers=headers))
    state, reason = translated(bridge.database, delivery)
    return state, reason, bridge.queued_for(delivery, source)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    config = '[sources.lemonsqueezy-test]\nhandler = "lemonsqueezy"\ninclude_test_events = true\n'
    with served(
        handler,
        sink,
        tmp_path,
        config=config,
        secret=f"{OLD_SECRET},{SECRET}",
        env={"LEMONSQUEEZY_TEST_WEBHOOK_SECRET": SECRET},
    ) as running:
        yield running


def test_orders_and_renewals_end_to_end(bridge: Served) -> None:
    order = fixture("order_created", meta={"custom_data": {"user_id": "user_318"}})
    order["data"]["attributes"]["customer_id"] = 3920442
    assert post(bridge, order).json() == {"ok": True, "result": "accepted"}
    assert post(bridge, order).json() == {"ok": True, "result": "duplicate"}
    calls = sorted(bridge.arrived(2), key=lambda c: c["route"])
    assert calls == [
        {"route": "identify", "user_id": "user_318", "anonymous_id": "lemonsqueezy:3920442"},
        {
            "route": "track",
            "event": "purchase",
            "event_id": "purchase:lemonsqueezy:order:1",
            "timestamp": "2023-01-17T12:26:23Z",
            "anonymous_id": "lemonsqueezy:3920442",
            "user_id": "user_318",
            "properties": {
                "amount_cents": 5899,
                "currency": "USD",
                "order": "1",
                "store_id": 1,
                "product_id": 1,
                "variant_id": 1,
            },
        },
    ]
    # A renewal without custom data still carries the user learned for the customer.
    renewal = fixture("subscription_payment_success", meta={"custom_data": None})
    assert post(bridge, renewal, secret=OLD_SECRET).json()["result"] == "accepted"
    latest = bridge.arrived(3)[-1]
    assert (latest["event_id"], latest["user_id"], latest["properties"]["amount_cents"]) == (
        "purchase:lemonsqueezy:invoice:1650377",
        "user_318",
        1900,
    )


def test_test_mode_and_refusals_end_to_end(bridge: Served) -> None:
    test_order = fixture("order_created", meta={"test_mode": True})
    assert post(bridge, test_order).json() == {"ok": True, "result": "accepted"}
    # Without include_test_events the test-mode order is taken and becomes no call.
    assert taken(bridge, msgspec.json.encode(test_order)) == ("translated", None, 0)
    answer = post(bridge, test_order, source="lemonsqueezy-test")
    assert answer.json() == {"ok": True, "result": "accepted"}
    assert post(bridge, test_order, secret="wrong").status_code == 401
    body = msgspec.json.encode(test_order)
    unsigned = httpx.post(f"{bridge.url}/webhooks/lemonsqueezy", content=body)
    assert unsigned.status_code == 401
    assert post(bridge, b"{not json").status_code == 400
    calls = bridge.arrived(1)
    assert [c["event_id"] for c in calls] == ["purchase:lemonsqueezy:order:1"]


def test_a_body_resent_under_another_event_name_is_quarantined_end_to_end(
    bridge: Served,
) -> None:
    """X-Event-Name is not signed: the signed meta.event_name alone names the event, and a
    captured body re-sent under another name is taken but quarantined: it sends nothing."""
    subscription = fixture("subscription_created")
    body = msgspec.json.encode(subscription)
    url = f"{bridge.url}/webhooks/lemonsqueezy"
    for name in ("subscription_cancelled", "order_created", "order_refunded"):
        headers = {**handler.scheme.sign(body, SECRET, 0), "x-event-name": name}
        answer = httpx.post(url, content=body, headers=headers)
        assert answer.status_code == 200, name
        assert answer.json()["ok"] is True
    # A body that names no event is quarantined whatever the header says.
    del subscription["meta"]["event_name"]
    nameless = msgspec.json.encode(subscription)
    headers = {**handler.scheme.sign(nameless, SECRET, 0), "x-event-name": "subscription_created"}
    answer = httpx.post(url, content=nameless, headers=headers)
    assert answer.json() == {"ok": True, "result": "accepted"}
    nameless_taken = ("quarantined", "payload: no event name in meta.event_name", 0)
    assert taken(bridge, nameless, headers={"x-event-name": "subscription_created"}) == (
        nameless_taken
    )
    # Translated in arrival order: every re-sent copy stored before it is quarantined too.
    with contextlib.closing(sqlite3.connect(bridge.database)) as db:
        copies = db.execute("SELECT state, reason FROM inbox WHERE raw_body = ?", (body,))
        found = copies.fetchall()
    assert found
    for state, reason in found:
        assert state == "quarantined"
        assert reason is not None
        assert re.fullmatch(
            r"payload: X-Event-Name is \w+ but the body's event is subscription_created", reason
        )
    time.sleep(0.3)
    assert bridge.sink.stats()["received"] == 0
    # The body as sent, with its own name, is taken: the relabelled copies that came first
    # did not take its delivery id.
    assert post(bridge, fixture("subscription_created")).json()["result"] == "accepted"
    calls = bridge.arrived(2)
    assert sorted(c["route"] for c in calls) == ["identify", "track"]
    assert [c["event"] for c in calls if c["route"] == "track"] == ["subscription_started"]


def test_every_sample_sent_as_send_test_does_is_taken(bridge: Served) -> None:
    for event, sample in sorted(handler.samples().items()):
        fresh = handler.freshen(sample)
        headers = {**fresh.headers, **handler.scheme.sign(fresh.body, SECRET, int(time.time()))}
        url = f"{bridge.url}/webhooks/lemonsqueezy"
        answer = httpx.post(url, content=fresh.body, headers=headers)
        assert answer.json() == {"ok": True, "result": "accepted"}, event
        state, reason, _ = taken(bridge, fresh.body)
        assert (state, reason) == ("translated", None), event


def test_an_object_without_a_version_is_told_apart_by_its_body() -> None:
    one = {
        "meta": {"event_name": "order_created"},
        "data": {
            "type": "orders",
            "id": "9",
            "attributes": {"status": "paid", "total": 100, "currency": "EUR"},
        },
    }
    two = {**one, "data": {**one["data"], "attributes": {"status": "paid", "total": 200}}}
    first = run_handler(handler, msgspec.json.encode(one)).delivery_id
    assert first.startswith("order_created:orders:9:sha256-")
    assert first != run_handler(handler, msgspec.json.encode(two)).delivery_id
    assert first == run_handler(handler, msgspec.json.encode(one)).delivery_id
