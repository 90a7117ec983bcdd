"""Shopify: a purchase and its refunds are counted in one currency, the one the buyer paid
in, so that on a multi-currency order (a USD shop, an order paid in EUR) a full refund
cancels the purchase and partial refunds add up to it. Through real HTTP into the sink,
from Shopify's 2026-04 examples made multi-currency."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from handlers.shopify import handler
from tests.conftest import RunningSink
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "shopify"
SHOP = "example.myshopify.com"
ORDER = msgspec.json.decode((FIXTURES / "orders_paid.json").read_bytes())
REFUND = msgspec.json.decode((FIXTURES / "refunds_create.json").read_bytes())


def money(shop: tuple[str, str], buyer: tuple[str, str]) -> dict[str, Any]:
    return {
        "shop_money": {"amount": shop[0], "currency_code": shop[1]},
        "presentment_money": {"amount": buyer[0], "currency_code": buyer[1]},
    }


def order(order_id: int, shop: tuple[str, str], buyer: tuple[str, str]) -> dict[str, Any]:
    """Shopify's example order, paid, its total `shop` in the shop's currency and `buyer`
    in the buyer's."""
    body: dict[str, Any] = copy.deepcopy(ORDER)
    body.update(
        id=order_id,
        test=False,
        financial_status="paid",
        currency=shop[1],
        presentment_currency=buyer[1],
        total_price=shop[0],
        total_price_set=money(shop, buyer),
    )
    return body


def refund(
    refund_id: int,
    order_id: int,
    given_back: Sequence[tuple[str, str | None]],
    lines: Sequence[tuple[tuple[str, str], tuple[str, str]]],
    *,
    shipping: Sequence[tuple[tuple[str, str], tuple[str, str]]] = (),
) -> dict[str, Any]:
    """Shopify's example refund: its transactions give back `given_back` (amount and
    currency, which Shopify may omit), for `lines` (and `shipping`) in shop and buyer money."""
    body: dict[str, Any] = copy.deepcopy(REFUND)
    template = body["transactions"][0]
    body.update(
        id=refund_id,
        order_id=order_id,
        transactions=[
            {**template, "amount": amount, "currency": currency} for amount, currency in given_back
        ],
        refund_line_items=[
            {**body["refund_line_items"][0], "subtotal_set": money(shop, buyer)}
            for shop, buyer in lines
        ],
        refund_shipping_lines=[{"subtotal_amount_set": money(s, b)} for s, b in shipping],
        total_duties_set=None,
    )
    return body


def headers(topic: str, delivery: str) -> dict[str, str]:
    return {
        "x-shopify-topic": topic,
        "x-shopify-shop-domain": SHOP,
        "x-shopify-webhook-id": delivery,
        "x-shopify-api-version": "2026-04",
    }


def net(calls: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """What each order comes to in each currency: its purchase less its refunds."""
    found: dict[tuple[str, str], int] = defaultdict(int)
    for call in calls:
        sign = {"purchase": 1, "refund": -1}[call["event"]]
        key = (call["properties"]["order_id"], call["properties"]["currency"])
        found[key] += sign * call["properties"]["amount_cents"]
    return dict(found)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    with served(handler, sink, tmp_path) as running:
        yield running


def test_a_full_refund_of_a_usd_shops_order_paid_in_eur_cancels_the_purchase(
    bridge: Served,
) -> None:
    paid = order(1001, ("108.00", "USD"), ("100.00", "EUR"))
    full = refund(2001, 1001, [("100.00", "EUR")], [(("108.00", "USD"), ("100.00", "EUR"))])
    bridge.accepted(paid, headers("orders/paid", "p1"))
    bridge.accepted(full, headers("refunds/create", "r1"))
    tracks = bridge.tracks(2)  # the purchase, the refund
    assert sorted((t["event"], t["properties"]["amount_cents"]) for t in tracks) == [
        ("purchase", 10000),
        ("refund", 10000),
    ]
    assert {t["properties"]["currency"] for t in tracks} == {"EUR"}
    assert net(tracks) == {("1001", "EUR"): 0}


def test_partial_refunds_of_multi_currency_orders_add_up_to_the_purchase(
    bridge: Served,
) -> None:
    eur = order(1002, ("108.00", "USD"), ("100.00", "EUR"))
    first = refund(2002, 1002, [("30.00", "EUR")], [(("32.40", "USD"), ("30.00", "EUR"))])
    # The rest, in two transactions that do not say their currency (Shopify's example
    # omits it): the refund's own buyer money names it.
    rest = refund(
        2003,
        1002,
        [("60.00", None), ("10.00", None)],
        [(("64.80", "USD"), ("60.00", "EUR"))],
        shipping=[(("10.80", "USD"), ("10.00", "EUR"))],
    )
    # A EUR shop, an order paid in yen (no minor unit), refunded in part.
    yen = order(1003, ("9.15", "EUR"), ("1500", "JPY"))
    yen_part = refund(2004, 1003, [("500", "JPY")], [(("3.05", "EUR"), ("500", "JPY"))])
    # A shipping refund alone, its transaction without a currency: the shipping line's.
    shipping_only = refund(
        2005, 1003, [("100", None)], [], shipping=[(("0.61", "EUR"), ("100", "JPY"))]
    )
    deliveries = [
        (eur, "orders/paid", "p2"),
        (first, "refunds/create", "r2"),
        (rest, "refunds/create", "r3"),
        (yen, "orders/paid", "p3"),
        (yen_part, "refunds/create", "r4"),
        (shipping_only, "refunds/create", "r5"),
    ]
    for body, topic, delivery in deliveries:
        bridge.accepted(body, headers(topic, delivery))
    tracks = bridge.tracks(6)  # two purchases, four refunds
    assert sorted(
        (t["event_id"], t["properties"]["amount_cents"], t["properties"]["currency"])
        for t in tracks
    ) == [
        ("purchase:shopify:1002", 10000, "EUR"),
        ("purchase:shopify:1003", 1500, "JPY"),
        ("refund:shopify:2002", 3000, "EUR"),
        ("refund:shopify:2003", 7000, "EUR"),
        ("refund:shopify:2004", 500, "JPY"),
        ("refund:shopify:2005", 100, "JPY"),
    ]
    assert net(tracks) == {("1002", "EUR"): 0, ("1003", "JPY"): 900}


def test_a_single_currency_order_is_unchanged(bridge: Served) -> None:
    usd = order(1004, ("404.95", "USD"), ("404.95", "USD"))
    back = refund(2006, 1004, [("404.95", "USD")], [(("404.95", "USD"), ("404.95", "USD"))])
    bridge.accepted(usd, headers("orders/paid", "p4"))
    bridge.accepted(back, headers("refunds/create", "r6"))
    assert net(bridge.tracks(2)) == {("1004", "USD"): 0}


def test_an_order_whose_buyer_money_is_unknown_is_quarantined(bridge: Served) -> None:
    """A total in the shop's currency only, for an order paid in another: counting it would
    leave its refunds in another currency, so it is quarantined and nothing is sent."""
    unknown = order(1005, ("108.00", "USD"), ("100.00", "EUR"))
    unknown["total_price_set"] = {"shop_money": unknown["total_price_set"]["shop_money"]}
    bridge.accepted(unknown, headers("orders/paid", "p5"))
    state, reason = bridge.taken(unknown, headers("orders/paid", "p5"))
    assert state == "quarantined"
    assert reason is not None
    assert "buyer paid in EUR" in reason
    assert bridge.queued(unknown, headers("orders/paid", "p5")) == 0
