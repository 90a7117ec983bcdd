"""Shopify: signatures made by Shopify's own test helper verify, every topic translates as
documented, ids above 2**53 survive exactly, and end to end through the real app and the
real sink an order counts its revenue once and a redact forgets the customer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from bridge.errors import PayloadInvalid, SignatureInvalid
from bridge.events import About, Forget, Identify, Purge, Track
from bridge.plugin import Sample, WebhookRequest
from bridge.registry import check_handler
from bridge.store import Delivery, open_store
from bridge.testing import TEST_SECRET, Translated, run_handler, signed_request
from handlers.shopify import handler
from tests.conftest import RunningSink, translated
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "shopify"
SIGNATURES = json.loads((FIXTURES / "signatures.example.json").read_text())
SHOP = "example.myshopify.com"
OTHER_SHOP = "other-shop.myshopify.com"  # another shop with the same app (and secret)
SECRET = "shopify_client_secret_current"
OLD_SECRET = "shopify_client_secret_previous"
# The exact ids behind the fixtures' rounded ones (from their admin_graphql_api_id).
ORDER_ID = 820982911946154508
CUSTOMER_ID = 115310627314723954
REFUND_ID = 890088186047892319
USER = f"shopify:{SHOP}:{CUSTOMER_ID}"


# Shopify's published privacy examples leave the shop as a placeholder; a real delivery
# names the shop it is sent for, as the X-Shopify-Shop-Domain header does.
PLACEHOLDER_SHOP = "{shop}.myshopify.com"


def fixture(name: str, **changes: Any) -> dict[str, Any]:
    """A recorded payload with `changes` applied at the top level (and the privacy
    examples' placeholder shop filled in with SHOP)."""
    body: dict[str, Any] = msgspec.json.decode((FIXTURES / f"{name}.json").read_bytes())
    if body.get("shop_domain") == PLACEHOLDER_SHOP:
        body["shop_domain"] = SHOP
    return {**body, **changes}


def order(**changes: Any) -> dict[str, Any]:
    """A live order with exact ids, a campaign landing page and the browser's id."""
    body = fixture(
        "orders_paid",
        id=ORDER_ID,
        test=False,
        financial_status="paid",  # Shopify's example (for both order topics) says "voided"
        landing_site="/products/lounger?utm_source=newsletter&utm_campaign=spring",
        referring_site="https://www.google.com/",
        note_attributes=[
            {"name": "gift_note", "value": "happy birthday"},
            {"name": "millimetric_anonymous_id", "value": "browser-123"},
        ],
    )
    body["customer"] = {**body["customer"], "id": CUSTOMER_ID}
    return {**body, **changes}


def headers(
    topic: str, delivery: str = "d1", event: str | None = None, shop: str = SHOP
) -> dict[str, str]:
    found = {
        "x-shopify-topic": topic,
        "x-shopify-shop-domain": shop,
        "x-shopify-webhook-id": f"webhook-{delivery}",
    }
    if event is not None:
        found["x-shopify-event-id"] = event
    return found


def outputs(topic: str, body: dict[str, Any] | bytes, **options: Any) -> list[Any]:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return run_handler(handler, raw, headers=headers(topic), **options).calls


def run(topic: str, body: dict[str, Any] | bytes, **options: Any) -> list[Any]:
    """What the delivery becomes, less the customer it names for erasure (`about`)."""
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return sent(run_handler(handler, raw, headers=headers(topic), **options))


def sent(translated: Translated) -> list[Any]:
    return [o for o in translated.calls if not isinstance(o, About)]


def about(topic: str, body: dict[str, Any] | bytes, **options: Any) -> list[str]:
    return [o.identifier for o in outputs(topic, body, **options) if isinstance(o, About)]


def request(body: bytes, found: dict[str, str]) -> WebhookRequest:
    return WebhookRequest(
        source="shopify",
        headers={k.lower(): v for k, v in found.items()},
        body=body,
        received_at=time.time(),
    )


# -- signatures --------------------------------------------------------------------------


def test_signatures_made_by_shopifys_helper_verify_and_tampered_ones_do_not() -> None:
    secret = SIGNATURES["secret"]
    assert len(SIGNATURES["files"]) == 7
    for name, recorded in SIGNATURES["files"].items():
        body = (FIXTURES / name).read_bytes()
        delivery = request(body, recorded)
        handler.scheme.verify(delivery, [secret], 300)
        handler.scheme.verify(delivery, ["another secret", secret], 300)  # rotation
        # Our own signing agrees with Shopify's helper byte for byte.
        signature = handler.scheme.sign(body, secret, 0)["x-shopify-hmac-sha256"]
        assert signature == recorded["X-Shopify-Hmac-Sha256"]
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(delivery, ["another secret"], 300)
        tampered = request(body.replace(b"}", b" }", 1), recorded)
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(tampered, [secret], 300)
        flipped = request(body, {**recorded, "X-Shopify-Hmac-Sha256": signature[::-1]})
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(flipped, [secret], 300)
        unsigned = request(body, {k: v for k, v in recorded.items() if "Hmac" not in k})
        with pytest.raises(SignatureInvalid, match="missing"):
            handler.scheme.verify(unsigned, [secret], 300)
        # And the verified body, with its recorded headers, is read; the privacy
        # examples name the placeholder shop, which is not the header's: refused.
        if PLACEHOLDER_SHOP.encode() in body:
            with pytest.raises(PayloadInvalid, match="not the body's shop_domain"):
                handler.parse(delivery)
            continue
        parsed = handler.parse(delivery)
        assert parsed.topic == recorded["X-Shopify-Topic"]
        assert parsed.shop == SHOP


# -- ids above 2**53 -----------------------------------------------------------------------


def test_ids_above_2_53_survive_exactly() -> None:
    assert float(ORDER_ID) != ORDER_ID  # a double could not hold these ids
    raw = (FIXTURES / "orders_paid.json").read_bytes()
    raw = raw.replace(b"820982911946154500", str(ORDER_ID).encode())
    raw = raw.replace(b"115310627314723950", str(CUSTOMER_ID).encode())
    raw = raw.replace(b'"test": true', b'"test": false')
    raw = raw.replace(b'"financial_status": "voided"', b'"financial_status": "paid"')
    (purchase,) = run("orders/paid", raw, include_test_events=False)
    assert purchase.event_id == f"purchase:shopify:{ORDER_ID}"
    assert purchase.properties["order_id"] == str(ORDER_ID)
    assert purchase.user_id == USER
    refund = (FIXTURES / "refunds_create.json").read_bytes()
    refund = refund.replace(b"890088186047892400", str(REFUND_ID).encode())
    refund = refund.replace(b"820982911946154500", str(ORDER_ID).encode())
    (call,) = run("refunds/create", refund)
    assert call.event_id == f"refund:shopify:{REFUND_ID}"
    assert (call.properties["refund_id"], call.properties["order_id"]) == (
        str(REFUND_ID),
        str(ORDER_ID),
    )
    # And exactly as it goes on the wire: JSON text, not a rounded number.
    assert f'"order_id":"{ORDER_ID}"'.encode() in msgspec.json.encode(purchase)


def test_an_id_sent_as_a_float_is_refused_not_rounded() -> None:
    with pytest.raises(PayloadInvalid):
        run("orders/paid", msgspec.json.encode(order()).replace(str(ORDER_ID).encode(), b"8.2e17"))


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_time_with_no_utc_instant_is_payload_invalid_not_an_overflow(moment: str) -> None:
    # Read as a zoned time, but outside what a datetime holds once moved to UTC.
    with pytest.raises(PayloadInvalid):
        run("orders/paid", order(processed_at=moment))
    with pytest.raises(PayloadInvalid):
        run("refunds/create", fixture("refunds_create", processed_at=moment))
    with pytest.raises(PayloadInvalid):
        run("customers/create", fixture("customers_create", created_at=moment))


# -- orders --------------------------------------------------------------------------------


def test_orders_paid_is_a_purchase_with_attribution() -> None:
    (purchase,) = run("orders/paid", order())
    assert purchase == Track(
        event="purchase",
        event_id=f"purchase:shopify:{ORDER_ID}",
        timestamp=datetime(2022, 1, 1, 0, 0, tzinfo=UTC),  # processed_at, -05:00
        anonymous_id="browser-123",
        user_id=USER,
        url=f"https://{SHOP}/products/lounger?utm_source=newsletter&utm_campaign=spring",
        referrer="https://www.google.com/",
        properties={
            "amount_cents": 40495,  # total_price_set.presentment_money "404.95"
            "currency": "USD",
            "order_id": str(ORDER_ID),
            "order_name": "#9999",
            "shop": SHOP,
        },
    )


def test_orders_create_is_an_order_placed_that_never_collapses_into_the_purchase() -> None:
    (placed,) = run("orders/create", order(created_at="2021-12-30T10:00:00+01:00"))
    (purchase,) = run("orders/paid", order())
    assert placed.event == "order_placed"
    assert placed.event_id == f"order_placed:shopify:{ORDER_ID}"
    assert placed.event_id != purchase.event_id
    assert placed.timestamp == datetime(2021, 12, 30, 9, 0, tzinfo=UTC)
    assert (placed.anonymous_id, placed.user_id, placed.url) == (
        purchase.anonymous_id,
        purchase.user_id,
        purchase.url,
    )
    assert placed.properties == purchase.properties


def test_the_buyers_money_is_counted_in_its_currencys_minor_unit() -> None:
    def total(shop: tuple[str, str], presentment: tuple[str, str]) -> dict[str, Any]:
        return {
            "shop_money": {"amount": shop[0], "currency_code": shop[1]},
            "presentment_money": {"amount": presentment[0], "currency_code": presentment[1]},
        }

    # The presentment money: what the buyer paid, in the currency refunds give back in.
    cases = [
        (total(("9.15", "EUR"), ("1500", "JPY")), (1500, "JPY")),
        (total(("9.15", "EUR"), ("1500.00", "JPY")), (1500, "JPY")),
        (total(("40.10", "USD"), ("12.345", "KWD")), (12345, "KWD")),
        (total(("0.27", "EUR"), ("0.29", "USD")), (29, "USD")),
    ]
    for money, expected in cases:
        (purchase,) = run("orders/paid", order(total_price_set=money))
        assert (purchase.properties["amount_cents"], purchase.properties["currency"]) == expected
    # Without presentment money, the shop's amount is the buyer's when both are one currency;
    # API versions without the _set fields: total_price is in the shop's currency.
    shop_only = {"shop_money": {"amount": "19.99", "currency_code": "EUR"}}
    (call,) = run("orders/paid", order(total_price_set=shop_only, presentment_currency="EUR"))
    assert (call.properties["amount_cents"], call.properties["currency"]) == (1999, "EUR")
    old = order(
        total_price_set=None, total_price="19.99", currency="EUR", presentment_currency=None
    )
    (call,) = run("orders/paid", old)
    assert (call.properties["amount_cents"], call.properties["currency"]) == (1999, "EUR")
    # A shop-currency total of an order paid in another currency is not the buyer's money.
    with pytest.raises(PayloadInvalid, match="buyer paid in USD"):
        run("orders/paid", order(total_price_set=shop_only, presentment_currency="USD"))


@pytest.mark.parametrize(
    "money",
    [
        {"amount": "404.955", "currency_code": "USD"},  # more decimals than USD has
        {"amount": "1500.5", "currency_code": "JPY"},
        {"amount": 404.95, "currency_code": "USD"},  # a float, never accepted as money
        {"amount": "lots", "currency_code": "USD"},
        {"amount": "404.95", "currency_code": "dollars"},
    ],
)
def test_amounts_that_are_not_exact_money_are_refused(money: dict[str, Any]) -> None:
    with pytest.raises(PayloadInvalid):
        run("orders/paid", order(total_price_set={"presentment_money": money}))


def test_test_orders_stay_out_unless_the_source_includes_them() -> None:
    assert run("orders/paid", order(test=True), include_test_events=False) == []
    assert run("orders/create", order(test=True), include_test_events=False) == []
    assert len(run("orders/paid", order(test=True), include_test_events=True)) == 1
    assert len(run("orders/paid", order(test=False), include_test_events=False)) == 1


def test_a_free_order_is_placed_but_is_no_purchase() -> None:
    free = order(total_price_set={"shop_money": {"amount": "0.00", "currency_code": "USD"}})
    assert run("orders/paid", free) == []
    (placed,) = run("orders/create", free)
    assert placed.properties["amount_cents"] == 0


def test_identity_and_attribution_variants() -> None:
    hidden = [{"name": "_millimetric_anonymous_id", "value": " browser-9 "}]
    (call,) = run("orders/paid", order(note_attributes=hidden, customer=None))
    assert (call.anonymous_id, call.user_id) == ("browser-9", None)  # a guest without record
    bare = order(note_attributes=None, landing_site=None, referring_site="")
    (call,) = run("orders/paid", bare)
    assert (call.anonymous_id, call.user_id, call.url, call.referrer) == (None, USER, None, None)
    for landing, url in [
        ("products/a?gclid=1", f"https://{SHOP}/products/a?gclid=1"),
        ("https://shop.example/?fbclid=2", "https://shop.example/?fbclid=2"),
    ]:
        (call,) = run("orders/paid", order(landing_site=landing))
        assert call.url == url


# -- refunds, customers, privacy -----------------------------------------------------------


def refund(**changes: Any) -> dict[str, Any]:
    return fixture("refunds_create", id=REFUND_ID, order_id=ORDER_ID, **changes)


def transaction(amount: str, **changes: Any) -> dict[str, Any]:
    return {"kind": "refund", "status": "success", "amount": amount, "currency": "EUR", **changes}


def test_refunds_create_is_a_refund_of_what_its_transactions_gave_back() -> None:
    (call,) = run("refunds/create", refund())
    assert call == Track(
        event="refund",
        event_id=f"refund:shopify:{REFUND_ID}",
        timestamp=datetime(2022, 1, 1, 0, 0, tzinfo=UTC),
        properties={
            # 75.00 + 10.00; the transactions omit their currency: the refund's presentment one
            "amount_cents": 8500,
            "currency": "USD",
            "refund_id": str(REFUND_ID),
            "order_id": str(ORDER_ID),
            "shop": SHOP,
        },
    )
    mixed = [
        transaction("12.50"),
        transaction("1.00", status="failure"),
        transaction("2.00", kind="capture"),
        transaction("3.00", test=True),
    ]
    (call,) = run("refunds/create", refund(transactions=mixed), include_test_events=False)
    assert (call.properties["amount_cents"], call.properties["currency"]) == (1250, "EUR")
    (call,) = run("refunds/create", refund(transactions=mixed), include_test_events=True)
    assert call.properties["amount_cents"] == 1550


def test_refunds_that_move_no_money_or_do_not_say_the_currency_are_skipped() -> None:
    assert run("refunds/create", refund(transactions=[])) == []  # a restock only
    assert run("refunds/create", refund(transactions=[transaction("0.00")])) == []
    two = [transaction("1.00"), transaction("1.00", currency="USD")]
    assert run("refunds/create", refund(transactions=two)) == []
    unknown = [transaction("1.00", currency=None)]
    bare = refund(transactions=unknown, refund_line_items=[], total_duties_set=None)
    assert run("refunds/create", bare) == []


@pytest.mark.parametrize("topic", ["customers/create", "customers/update"])
def test_customers_become_identify_without_contact_details(topic: str) -> None:
    body = fixture("customers_create", id=706405506930370084)
    assert run(topic, body) == [
        Identify(
            user_id=f"shopify:{SHOP}:706405506930370084",
            traits={
                "shop": SHOP,
                "shopify_customer_id": "706405506930370084",
                "customer_since": "2022-01-01T00:00:00+00:00",
            },
        )
    ]


def test_privacy_topics() -> None:
    assert run("customers/redact", fixture("customers_redact")) == [
        Forget(user_id=f"shopify:{SHOP}:191167")  # the same user id as the orders carry
    ]
    redact = fixture("customers_redact", customer={"id": CUSTOMER_ID})
    assert run("customers/redact", redact) == [Forget(user_id=USER)]
    assert run("customers/redact", fixture("customers_redact", customer=None)) == []
    # Acknowledged: recorded in the inbox and the log for the operator.
    assert run("customers/data_request", fixture("customers_data_request")) == []


def test_every_delivery_about_a_customer_names_them_for_erasure() -> None:
    """customers/redact forgets `shopify:<shop>:<id>`, a string no Shopify body holds: the
    orders (paid or not, test or not) and data requests that carry the customer's e-mail,
    name and address are reached through the customer they name."""
    for topic in ("orders/paid", "orders/create"):
        for variant in (order(), order(test=True), order(financial_status="pending")):
            assert about(topic, variant, include_test_events=False) == [USER], (topic, variant)
    assert about("orders/paid", order(customer=None)) == []
    request = fixture("customers_data_request", customer={"id": CUSTOMER_ID})
    assert about("customers/data_request", request) == [USER]
    assert about("refunds/create", refund()) == []  # a refund names no customer
    # The shop's deliveries and customers, by the prefixes their ids start with.
    assert run("shop/redact", fixture("shop_redact")) == [
        Purge(deliveries=f"{SHOP}:", users=f"shopify:{SHOP}:")
    ]


def test_other_topics_are_acknowledged_unread_but_must_be_json_objects() -> None:
    assert run("products/update", {"id": 1, "title": "x"}) == []
    with pytest.raises(PayloadInvalid):
        run("products/update", b"[1, 2]")
    with pytest.raises(PayloadInvalid):
        run("orders/paid", b"{not json")
    with pytest.raises(PayloadInvalid):
        run("orders/paid", {"no": "id"})


# -- the signed body decides, not the headers ------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "name"),
    [
        ("customers/redact", "orders_paid"),  # an order replayed as a customer's erasure
        ("customers/create", "orders_paid"),
        ("refunds/create", "orders_paid"),
        ("shop/redact", "orders_paid"),
        ("orders/paid", "customers_create"),  # a customer replayed as a purchase
        ("orders/create", "refunds_create"),
        ("orders/paid", "refunds_create"),
        ("customers/update", "refunds_create"),
        ("customers/redact", "customers_data_request"),  # a data request as an erasure
        ("customers/data_request", "customers_redact"),
        ("shop/redact", "customers_redact"),  # one customer's erasure as the whole shop's
        ("shop/redact", "customers_data_request"),
        ("customers/redact", "shop_redact"),
        ("orders/paid", "shop_redact"),
    ],
)
def test_a_body_of_another_kind_than_its_topic_is_refused(topic: str, name: str) -> None:
    with pytest.raises(PayloadInvalid, match=f"X-Shopify-Topic is {topic} but the body is"):
        run(topic, fixture(name))


@pytest.mark.parametrize(
    ("topic", "name"),
    [
        ("customers/redact", "customers_redact"),
        ("customers/data_request", "customers_data_request"),
        ("shop/redact", "shop_redact"),
    ],
)
def test_the_privacy_topics_act_on_the_shop_their_body_names(topic: str, name: str) -> None:
    body = msgspec.json.encode(fixture(name))  # shop_domain: SHOP
    with pytest.raises(PayloadInvalid, match="X-Shopify-Shop-Domain is not the body's"):
        run_handler(handler, body, headers=headers(topic, shop=OTHER_SHOP))
    with pytest.raises(PayloadInvalid, match="no shop_domain in the body"):
        run(topic, fixture(name, shop_domain=None))
    # The same domain in other letters is the same shop.
    loud = msgspec.json.encode(fixture(name, shop_domain="Example.MyShopify.COM"))
    assert sent(run_handler(handler, loud, headers=headers(topic))) == run(topic, fixture(name))
    # Another shop's own request, with its own header, acts on that shop.
    other = msgspec.json.encode(fixture(name, shop_domain=OTHER_SHOP))
    calls = run_handler(handler, other, headers=headers(topic, shop=OTHER_SHOP)).calls
    assert all(OTHER_SHOP in repr(call) and SHOP not in repr(call) for call in calls)


def test_a_purchase_needs_the_order_itself_to_say_it_was_paid() -> None:
    # Statuses under which no payment was taken: not a purchase, whatever the topic.
    for status in ("pending", "authorized", "partially_paid", "voided", "expired", None):
        assert run("orders/paid", order(financial_status=status)) == [], status
        (placed,) = run("orders/create", order(financial_status=status))
        assert placed.event == "order_placed"
    # Paid, and paid then refunded (the refund is its own event): the purchase.
    for status in ("paid", "partially_refunded", "refunded"):
        (purchase,) = run("orders/paid", order(financial_status=status))
        assert (purchase.event, purchase.event_id) == ("purchase", f"purchase:shopify:{ORDER_ID}")


def test_ids_come_from_the_body_and_the_shop_header_only_names_the_shop() -> None:
    """An order names no shop, so the header still says whose customer it is (see the
    docs: only a shop sharing the app's secret can be named); every id is the body's."""
    body = msgspec.json.encode(order())
    (here,) = sent(run_handler(handler, body, headers=headers("orders/paid")))
    moved = {
        **headers("orders/paid", delivery="fresh", shop=OTHER_SHOP),
        "x-shopify-event-id": "e9",
    }
    (there,) = sent(run_handler(handler, body, headers=moved))
    assert here.event_id == there.event_id == f"purchase:shopify:{ORDER_ID}"
    assert (here.user_id, there.user_id) == (USER, f"shopify:{OTHER_SHOP}:{CUSTOMER_ID}")
    assert here.properties["order_id"] == there.properties["order_id"] == str(ORDER_ID)


# -- delivery ids and headers --------------------------------------------------------------


def test_the_delivery_id_is_the_event_id_else_the_webhook_id_within_the_topic() -> None:
    body = msgspec.json.encode(order())
    both = {**headers("orders/paid"), "x-shopify-event-id": "evt-1"}
    assert run_handler(handler, body, headers=both).delivery_id == f"{SHOP}:orders/paid:evt-1"
    assert run_handler(handler, body, headers=headers("orders/paid")).delivery_id == (
        f"{SHOP}:orders/paid:webhook-d1"
    )
    # One merchant action can fire several topics under one event id: kept apart.
    other = {**both, "x-shopify-topic": "orders/create"}
    assert run_handler(handler, body, headers=other).delivery_id == f"{SHOP}:orders/create:evt-1"
    # The event id alone is enough, at the intake and when translated from the store.
    alone = {k: v for k, v in both.items() if k != "x-shopify-webhook-id"}
    assert run_handler(handler, body, headers=alone).delivery_id == f"{SHOP}:orders/paid:evt-1"


@pytest.mark.parametrize(
    ("drop", "change", "message"),
    [
        ("x-shopify-webhook-id", {}, "X-Shopify-Event-Id and X-Shopify-Webhook-Id"),
        ("x-shopify-topic", {}, "X-Shopify-Topic"),
        ("x-shopify-shop-domain", {}, "X-Shopify-Shop-Domain"),
        ("", {"x-shopify-shop-domain": "evil.example/path"}, "X-Shopify-Shop-Domain"),
        ("", {"x-shopify-webhook-id": "x" * 300}, "longer than"),
    ],
)
def test_missing_or_malformed_headers_are_invalid(
    drop: str, change: dict[str, str], message: str
) -> None:
    body = msgspec.json.encode(order())
    signed = signed_request(handler, body, headers={**headers("orders/paid"), **change})
    delivery = request(body, {k: v for k, v in signed.headers.items() if k != drop})
    with pytest.raises(PayloadInvalid, match=message):
        handler.parse(delivery)
    with pytest.raises(PayloadInvalid, match=message):  # not even the delivery id is read
        handler.delivery_id(delivery)


def test_the_shop_domain_is_read_in_lower_case() -> None:
    body = msgspec.json.encode(order())
    loud = {**headers("orders/paid"), "x-shopify-shop-domain": "Example.MyShopify.com"}
    (call,) = sent(run_handler(handler, body, headers=loud))
    assert call.user_id == USER


# -- the handler as a plugin ---------------------------------------------------------------


def test_it_keeps_the_handler_protocol_and_its_samples_translate() -> None:
    check_handler("shopify", handler)
    samples = handler.samples()
    assert sorted(samples) == sorted(
        [
            "orders/create",
            "orders/paid",
            "refunds/create",
            "customers/create",
            "customers/redact",
            "customers/data_request",
            "shop/redact",
        ]
    )
    events = {}
    for topic, sample in samples.items():
        assert sample.headers["x-shopify-topic"] == topic
        assert sample.headers["x-shopify-shop-domain"] == SHOP
        first = run_handler(handler, sample.body, headers=sample.headers)
        again = run_handler(handler, sample.body, headers=sample.headers)
        assert first.delivery_id == again.delivery_id  # a redelivery is recognisable
        assert first.calls == again.calls  # and becomes the same calls
        events[topic] = [getattr(c, "event", type(c).__name__) for c in sent(first)]
    assert events == {
        "orders/create": ["order_placed"],
        "orders/paid": ["purchase"],
        "refunds/create": ["refund"],
        "customers/create": ["Identify"],
        "customers/redact": ["Forget"],
        "customers/data_request": [],
        "shop/redact": ["Purge"],
    }
    # The shipped samples are Shopify's published examples, byte for byte, but for the
    # privacy examples' placeholder shop (the samples' shop, as a real delivery names
    # its own) and orders/paid's financial status (the example, shared with
    # orders/create, is a voided order, which would be no purchase).
    for topic, sample in samples.items():
        published = (FIXTURES / f"{topic.replace('/', '_')}.json").read_bytes()
        published = published.replace(PLACEHOLDER_SHOP.encode(), SHOP.encode())
        if topic == "orders/paid":
            published = published.replace(b'"voided"', b'"paid"')
        assert sample.body == published


def test_freshen_makes_a_new_delivery_of_a_new_order() -> None:
    sample = handler.samples()["orders/paid"]
    fresh = handler.freshen(sample)
    again = handler.freshen(sample)
    assert fresh.headers["x-shopify-webhook-id"] != again.headers["x-shopify-webhook-id"]
    (purchase,) = sent(run_handler(handler, fresh.body, headers=fresh.headers))
    order_id = int(purchase.properties["order_id"])
    assert order_id > 2**53
    assert purchase.event_id == f"purchase:shopify:{order_id}"
    redact = handler.freshen(handler.samples()["customers/redact"])
    assert isinstance(redact, Sample)
    assert redact.body == handler.samples()["customers/redact"].body


# -- end to end: the real app, the real sink ----------------------------------------------


def post(
    bridge: Served,
    topic: str,
    body: dict[str, Any] | bytes,
    delivery: str,
    *,
    event: str | None = None,
    secret: str = SECRET,
    shop: str = SHOP,
) -> httpx.Response:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    # Signed here as Shopify does it, not with the handler's own scheme.
    mac = hmac.new(secret.encode(), raw, hashlib.sha256).digest()
    sent = {
        **headers(topic, delivery, event, shop),
        "x-shopify-hmac-sha256": base64.b64encode(mac).decode(),
        "x-shopify-api-version": "2026-04",
        "content-type": "application/json",
    }
    return httpx.post(f"{bridge.url}/webhooks/shopify", content=raw, headers=sent)


def taken(
    bridge: Served, topic: str, delivery: str, *, event: str | None = None, shop: str = SHOP
) -> tuple[str, str | None]:
    """Once the translate stage has taken a delivery sent with `post`: its state
    (`translated` or `quarantined`) and the quarantine's reason."""
    return translated(bridge.database, stored_id(topic, delivery, event, shop))


def calls_of(
    bridge: Served, topic: str, delivery: str, *, event: str | None = None, shop: str = SHOP
) -> int:
    """The outbox rows a delivery sent with `post` became, whatever their state."""
    return bridge.queued_for(stored_id(topic, delivery, event, shop))


def stored_deliveries(bridge: Served) -> list[tuple[str, bool]]:
    """The stored deliveries' ids, and whether each still has its raw body."""
    with closing(sqlite3.connect(f"file:{bridge.database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT provider_event_id, raw_body IS NOT NULL FROM inbox")
        return sorted((str(found), bool(kept)) for found, kept in rows)


def stored_id(topic: str, delivery: str, event: str | None = None, shop: str = SHOP) -> str:
    """The delivery id the handler reads from `post`'s headers."""
    return f"{shop}:{topic}:{event or f'webhook-{delivery}'}"


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    # Defaults: test orders stay out. Not registered as an entry point yet: the source is
    # given to the app explicitly.
    with served(handler, sink, tmp_path, secret=f"{OLD_SECRET}, {SECRET}") as running:
        yield running


def test_one_order_is_one_purchase_and_one_order_placed_then_redact_forgets(
    bridge: Served,
) -> None:
    assert post(bridge, "orders/create", order(), "c1").json() == {
        "ok": True,
        "result": "accepted",
    }
    assert post(bridge, "orders/paid", order(), "p1", event="e-paid").json()["result"] == (
        "accepted"
    )
    # Shopify retries the same delivery: recognised, not stored twice.
    assert post(bridge, "orders/paid", order(), "p1", event="e-paid").json()["result"] == (
        "duplicate"
    )
    calls = bridge.arrived(3)
    tracks = sorted((c for c in calls if c["route"] == "track"), key=lambda c: c["event"])
    assert [(t["event"], t["event_id"]) for t in tracks] == [
        ("order_placed", f"order_placed:shopify:{ORDER_ID}"),
        ("purchase", f"purchase:shopify:{ORDER_ID}"),
    ]
    purchase = tracks[1]
    assert purchase == {
        "route": "track",
        "event": "purchase",
        "event_id": f"purchase:shopify:{ORDER_ID}",
        "timestamp": "2022-01-01T00:00:00Z",
        "anonymous_id": "browser-123",
        "user_id": USER,
        "url": f"https://{SHOP}/products/lounger?utm_source=newsletter&utm_campaign=spring",
        "referrer": "https://www.google.com/",
        "properties": {
            "amount_cents": 40495,
            "currency": "USD",
            "order_id": str(ORDER_ID),
            "order_name": "#9999",
            "shop": SHOP,
        },
    }
    # The browser and the customer are linked once.
    assert [c for c in calls if c["route"] == "identify"] == [
        {"route": "identify", "user_id": USER, "anonymous_id": "browser-123"}
    ]
    assert len(calls) == 3

    # The same order under a new delivery (say a second subscription) still counts once:
    # its purchase has the same event_id, so no second call is even queued.
    assert post(bridge, "orders/paid", order(), "p2", event="e-other").json()["result"] == (
        "accepted"
    )
    assert taken(bridge, "orders/paid", "p2", event="e-other") == ("translated", None)
    assert calls_of(bridge, "orders/paid", "p2", event="e-other") == 0
    time.sleep(0.5)  # anything sent would have arrived by now
    sent = [c["event"] for c in bridge.sink.events() if c["route"] == "track"]
    assert sent.count("purchase") == 1
    assert bridge.sink.stats()["duplicates"] == 0

    redact = fixture("customers_redact", customer={"id": CUSTOMER_ID, "email": "j@example.com"})
    assert post(bridge, "customers/redact", redact, "r1").json()["result"] == "accepted"
    assert bridge.arrived(4)[-1] == {"route": "forget", "user_id": USER}
    # Nothing about the forgotten customer is forwarded afterwards.
    later = order(id=ORDER_ID + 1)
    assert post(bridge, "orders/paid", later, "p3").json()["result"] == "accepted"
    assert taken(bridge, "orders/paid", "p3")[0] == "translated"
    time.sleep(0.5)  # anything sent would have arrived by now
    assert len(bridge.sink.events()) == 4


def test_a_captured_body_under_another_topic_or_shop_is_quarantined_and_sends_nothing(
    bridge: Served,
) -> None:
    """The reproductions: one signed body, re-sent with other headers, became a purchase,
    a customer's erasure or a redact of another shop. Each is now stored (validly signed,
    it is never refused for its content) and quarantined by its handler, purges nothing,
    and sends nothing."""
    paid = order()
    assert post(bridge, "orders/paid", paid, "p1").json()["result"] == "accepted"
    assert post(bridge, "orders/paid", paid, "p1", shop=OTHER_SHOP).json()["result"] == (
        "accepted"  # that shop's customer: what an order's unsigned shop header can do
    )
    stored = stored_deliveries(bridge)
    data_request = fixture("customers_data_request", customer={"id": CUSTOMER_ID})
    others_redact = fixture("customers_redact", shop_domain=OTHER_SHOP, customer={"id": 7})
    others_uninstall = fixture("shop_redact", shop_domain=OTHER_SHOP)
    replays = [
        ("customers/redact", paid, SHOP),  # the order as its customer's erasure
        ("customers/create", paid, SHOP),
        ("refunds/create", paid, SHOP),
        ("shop/redact", paid, SHOP),  # the order as the shop's redact
        ("orders/paid", fixture("customers_create", id=CUSTOMER_ID), SHOP),
        ("customers/redact", data_request, SHOP),  # a data request as an erasure
        ("customers/redact", others_redact, SHOP),  # another shop's erasure, for this shop
        ("shop/redact", others_uninstall, SHOP),  # another shop's redact, for this shop
        ("shop/redact", fixture("shop_redact"), OTHER_SHOP),  # this shop's, for another
    ]
    for n, (topic, body, shop) in enumerate(replays):
        answer = post(bridge, topic, body, f"replay-{n}", shop=shop)
        assert answer.status_code == 200, (topic, shop)
        assert answer.json() == {"ok": True, "result": "accepted"}
    for n, (topic, _, shop) in enumerate(replays):
        state, reason = taken(bridge, topic, f"replay-{n}", shop=shop)
        assert state == "quarantined", (topic, shop)
        assert reason is not None, (topic, shop)
        assert reason.startswith("payload: "), (topic, shop, reason)
        assert calls_of(bridge, topic, f"replay-{n}", shop=shop) == 0, (topic, shop)
    # Nothing purged: the genuine deliveries are there with their raw bodies, beside the
    # quarantined ones (kept whole, to translate again once understood).
    inbox = stored_deliveries(bridge)
    assert set(stored) <= set(inbox)
    assert len(inbox) == len(stored) + len(replays)
    assert all(kept for _, kept in inbox)
    assert taken(bridge, "orders/paid", "p1") == ("translated", None)
    assert taken(bridge, "orders/paid", "p1", shop=OTHER_SHOP) == ("translated", None)

    # An unpaid order's body re-sent as orders/paid is taken, but is no purchase.
    pending = order(id=ORDER_ID + 1, financial_status="pending")
    assert post(bridge, "orders/create", pending, "c2").json()["result"] == "accepted"
    assert post(bridge, "orders/paid", pending, "p2").json()["result"] == "accepted"
    assert taken(bridge, "orders/paid", "p2") == ("translated", None)
    assert calls_of(bridge, "orders/paid", "p2") == 0

    calls = bridge.arrived(4)  # the purchase, the order placed, and their identifies
    assert not [c for c in calls if c["route"] == "forget"]
    tracks = [(c["event"], c["event_id"]) for c in calls if c["route"] == "track"]
    assert sorted(tracks) == [
        ("order_placed", f"order_placed:shopify:{ORDER_ID + 1}"),
        ("purchase", f"purchase:shopify:{ORDER_ID}"),
    ]
    # The order's shop header still names whose customer it is (docs/handlers.md).
    identified = {c["user_id"] for c in calls if c["route"] == "identify"}
    assert identified == {USER, f"shopify:{OTHER_SHOP}:{CUSTOMER_ID}"}
    # The other shop's copy of the purchase has the same event_id: not queued again, so
    # not sent again, and never revenue twice.
    assert calls_of(bridge, "orders/paid", "p1", shop=OTHER_SHOP) == 1  # its identify alone
    sent = [c["event"] for c in bridge.sink.events() if c["route"] == "track"]
    assert sent.count("purchase") == 1
    assert bridge.sink.stats()["duplicates"] == 0


def test_shopifys_own_signed_examples_through_the_app(bridge: Served) -> None:
    """The recorded bytes and headers, with their client secret: every one is taken, the
    test orders knowingly become nothing, the privacy examples (whose body names a
    placeholder shop) are quarantined, a tampered body refused."""
    answers = {}
    outcomes = {}
    for name, recorded in SIGNATURES["files"].items():
        body = (FIXTURES / name).read_bytes()
        sent = {**recorded, "X-Shopify-Webhook-Id": f"recorded-{name}"}
        answer = httpx.post(f"{bridge.url}/webhooks/shopify", content=body, headers=sent)
        assert answer.status_code == 401  # the bridge has another secret
        # The same bytes signed with the bridge's (old, still accepted) secret.
        mac = hmac.new(OLD_SECRET.encode(), body, hashlib.sha256).digest()
        sent["X-Shopify-Hmac-Sha256"] = base64.b64encode(mac).decode()
        answer = httpx.post(f"{bridge.url}/webhooks/shopify", content=body, headers=sent)
        found = answer.json()
        topic = recorded["X-Shopify-Topic"]
        answers[topic] = found.get("result") or found["error"]
        delivery = handler.delivery_id(request(body, sent))
        state, reason = translated(bridge.database, delivery)
        outcomes[topic] = (state, reason and reason.partition(": ")[0], bridge.queued_for(delivery))
        tampered = body.replace(b"john@example.com", b"jane@example.com")
        if tampered != body:
            refused = httpx.post(f"{bridge.url}/webhooks/shopify", content=tampered, headers=sent)
            assert refused.status_code == 401
    assert answers == {topic: "accepted" for topic in outcomes}  # verified: all taken
    assert outcomes == {
        # test orders, and the source does not include them: translated to no call
        "orders/create": ("translated", None, 0),
        "orders/paid": ("translated", None, 0),
        "refunds/create": ("translated", None, 1),
        "customers/create": ("translated", None, 1),
        # The privacy examples name the placeholder "{shop}.myshopify.com", not the
        # recorded header's shop: the signed body and the header disagree, so quarantined.
        "customers/redact": ("quarantined", "payload", 0),
        "customers/data_request": ("quarantined", "payload", 0),
        "shop/redact": ("quarantined", "payload", 0),
    }
    routes = sorted(c["route"] for c in bridge.arrived(2))
    assert routes == ["identify", "track"]


def test_a_delivery_is_stored_with_the_headers_its_translation_reads(bridge: Served) -> None:
    # Translation runs from the store: the signature and the headers the handler lists
    # are kept beside the raw body, and nothing else the request carried.
    assert post(bridge, "orders/paid", order(), "kept", event="evt-kept").status_code == 200
    with closing(sqlite3.connect(f"file:{bridge.database}?mode=ro", uri=True)) as db:
        (stored,) = [json.loads(row) for (row,) in db.execute("SELECT headers FROM inbox")]
    assert set(stored) == {
        "x-shopify-hmac-sha256",
        "x-shopify-topic",
        "x-shopify-shop-domain",
        "x-shopify-event-id",
        "x-shopify-webhook-id",
    }
    assert stored["x-shopify-event-id"] == "evt-kept"


def test_malformed_deliveries_are_quarantined_and_unsigned_ones_refused(bridge: Served) -> None:
    # Signed, so taken (the delivery id is in the headers): their handler cannot read
    # them, so they are quarantined and nothing of them is queued or sent.
    assert post(bridge, "orders/paid", b"{not json", "m1").json()["result"] == "accepted"
    no_money = order(total_price_set={"shop_money": {"amount": "1.005", "currency_code": "USD"}})
    answer = post(bridge, "orders/paid", no_money, "m2")
    assert answer.status_code == 200
    assert answer.json()["result"] == "accepted"
    for delivery in ("m1", "m2"):
        state, reason = taken(bridge, "orders/paid", delivery)
        assert state == "quarantined", delivery
        assert reason is not None
        assert reason.startswith("payload: "), reason
        assert calls_of(bridge, "orders/paid", delivery) == 0
    unsigned = httpx.post(
        f"{bridge.url}/webhooks/shopify",
        content=msgspec.json.encode(order()),
        headers=headers("orders/paid"),
    )
    assert unsigned.status_code == 401
    assert post(bridge, "orders/paid", order(), "m3", secret="not the secret").status_code == 401
    assert [found for found, _ in stored_deliveries(bridge)] == [
        stored_id("orders/paid", "m1"),
        stored_id("orders/paid", "m2"),
    ]
    assert httpx.get(f"{bridge.url}/readyz").json()["pending"] == 0
    assert bridge.sink.stats()["received"] == 0


def test_the_test_secret_signs_samples_for_run_handler() -> None:
    """bridge.testing's secret works with this scheme too (what the contract test uses):
    the header is Shopify's HMAC of the body with it, and the sample translates."""
    sample = handler.samples()["orders/paid"]
    signed = signed_request(handler, sample.body, headers=sample.headers)
    mac = hmac.new(TEST_SECRET.encode(), sample.body, hashlib.sha256).digest()
    assert signed.headers["x-shopify-hmac-sha256"] == base64.b64encode(mac).decode()
    handler.scheme.verify(signed, [TEST_SECRET], 300)
    with pytest.raises(SignatureInvalid):
        handler.scheme.verify(signed, ["another secret"], 300)
    calls = run_handler(handler, sample.body, headers=sample.headers).calls
    assert [c.event for c in calls if isinstance(c, Track)] == ["purchase"]


# -- shop/redact ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shop_redact_purges_that_shop_and_nothing_else(tmp_path: Path) -> None:
    """Orders of two shops, one delivered and one waiting each; the first shop's redact
    leaves no raw payload, call or learned identity of it in the SQLite file."""
    other = "other-shop.myshopify.com"
    # Shopify's ids are global: the other shop's orders are others (and so are their
    # event_ids, of which the outbox holds one row each).
    first = {SHOP: ORDER_ID, other: ORDER_ID + 10}
    store = open_store(f"sqlite:///{tmp_path}/bridge.db")
    await store.open()

    async def deliver(topic: str, body: dict[str, Any], delivery: str, shop: str) -> None:
        raw = msgspec.json.encode(body)
        found = run_handler(handler, raw, headers=headers(topic, delivery, shop=shop))
        delivered = Delivery(
            source="shopify",
            provider_event_id=found.delivery_id,
            received_at=time.time(),
            raw_body=raw,
            calls=found.calls,
        )
        assert await store.accept(delivered) == "accepted"

    try:
        for shop in (SHOP, other):
            await deliver("orders/paid", order(id=first[shop]), "sent", shop)
        sent = await store.claim("track", 100, 1 << 20, time.time())
        await store.delivered([row.id for row in sent], time.time())
        for shop in (SHOP, other):
            await deliver("orders/paid", order(id=first[shop] + 1), "waiting", shop)
        await deliver("shop/redact", fixture("shop_redact", shop_domain=SHOP), "redact", SHOP)
    finally:
        await store.close()

    with sqlite3.connect(tmp_path / "bridge.db") as db:
        dump = "\n".join(db.iterdump())
        raw = [row for (row,) in db.execute("SELECT raw_body FROM inbox") if row is not None]
        calls = [msgspec.json.decode(b) for (b,) in db.execute("SELECT body FROM outbox")]
    assert SHOP not in dump.replace(f"'shopify','{SHOP}:", "")  # only the inbox's own ids
    assert str(CUSTOMER_ID) in dump  # the other shop's customer is still there
    assert raw
    assert all(other.encode() in body or b"browser-123" in body for body in raw)
    # The other shop keeps both its orders, the delivered one and the waiting one.
    orders = [c["properties"]["order_id"] for c in calls if c.get("event") == "purchase"]
    assert sorted(orders) == [str(first[other]), str(first[other] + 1)]
    assert all(c["user_id"] == f"shopify:{other}:{CUSTOMER_ID}" for c in calls)


def test_customers_redact_erases_every_order_of_the_customer_paid_or_not(
    bridge: Served,
) -> None:
    """The forget is of `shopify:<shop>:<id>`, which no order body holds; an unpaid order
    becomes no call at all. Both raw payloads hold the customer's e-mail and address."""
    mine = {"id": CUSTOMER_ID, "email": "redact.me@example.org"}
    theirs = {"id": CUSTOMER_ID + 1, "email": "keep.me@example.org"}
    pending = order(id=ORDER_ID + 1, financial_status="pending", customer=mine)
    assert post(bridge, "orders/create", order(customer=mine), "c1").status_code == 200
    assert post(bridge, "orders/paid", pending, "p0").json()["result"] == "accepted"
    assert post(bridge, "orders/paid", order(customer=mine), "p1").status_code == 200
    other = post(bridge, "orders/paid", order(id=ORDER_ID + 2, customer=theirs), "p2")
    assert other.json()["result"] == "accepted"
    assert [kept for _, kept in stored_deliveries(bridge)] == [True] * 4
    redact = fixture("customers_redact", customer={"id": CUSTOMER_ID})
    assert post(bridge, "customers/redact", redact, "r1").status_code == 200
    assert taken(bridge, "orders/paid", "p0") == ("translated", None)
    assert calls_of(bridge, "orders/paid", "p0") == 0  # no call at all
    assert taken(bridge, "customers/redact", "r1") == ("translated", None)
    with closing(sqlite3.connect(f"file:{bridge.database}?mode=ro", uri=True)) as db:
        raw = [body for (body,) in db.execute("SELECT raw_body FROM inbox") if body]
    assert len(raw) == 1
    assert b"keep.me@example.org" in raw[0]
