"""Lemon Squeezy refunds of renewals and the end of subscriptions, through real HTTP into
the sink: a renewal's refund nets out against the renewal's purchase (and the first
payment's refund stays its order's), each cancellation is one churn even after a resume,
and an expiry adds churn only when no cancellation came before it (failed dunning)."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from handlers.lemonsqueezy import handler
from tests.conftest import RunningSink
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "lemonsqueezy"


def fixture(name: str, meta: dict[str, Any] | None = None, **attributes: Any) -> dict[str, Any]:
    """The newest payload of `name` (the synthetic one, with today's meta fields), with
    `meta` and `attributes` changed."""
    path = FIXTURES / f"{name}.SYNTHETIC.json"
    event: dict[str, Any] = copy.deepcopy(msgspec.json.decode(path.read_bytes()))
    event["meta"].update(meta or {})
    event["data"]["attributes"].update(attributes)
    return event


def named(event: dict[str, Any]) -> dict[str, str]:
    return {"x-event-name": event["meta"]["event_name"]}


def post(bridge: Served, *events: dict[str, Any]) -> None:
    for event in events:
        bridge.accepted(event, named(event))


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    with served(handler, sink, tmp_path) as running:
        yield running


def test_a_refunded_renewal_nets_out_against_its_purchase(bridge: Served) -> None:
    renewal = fixture("subscription_payment_success")
    refunded = fixture("subscription_payment_refunded")
    # A prorated plan-change charge, refunded in part; Lemon Squeezy resends the running
    # total when refunding more of it, which never subtracts twice.
    proration = fixture(
        "subscription_payment_success", billing_reason="updated", total=700, currency="EUR"
    )
    proration["data"]["id"] = "1650400"
    partial = fixture(
        "subscription_payment_refunded",
        billing_reason="updated",
        total=700,
        currency="EUR",
        status="partial_refund",
        refunded=False,
        refunded_amount=300,
    )
    partial["data"]["id"] = "1650400"
    more = fixture(
        "subscription_payment_refunded",
        {"webhook_id": "another-delivery"},
        billing_reason="updated",
        total=700,
        currency="EUR",
        refunded_amount=700,
        updated_at="2026-12-15T09:00:00.000000Z",
    )
    more["data"]["id"] = "1650400"
    post(bridge, renewal, refunded, proration, partial, more)
    tracks = bridge.tracks(5)  # two purchases, two refunds, one identify
    found = sorted(
        (t["event_id"], t["properties"]["amount_cents"], t["properties"]["currency"])
        for t in tracks
    )
    assert found == [
        ("purchase:lemonsqueezy:invoice:1650377", 1900, "USD"),
        ("purchase:lemonsqueezy:invoice:1650400", 700, "EUR"),
        ("refund:lemonsqueezy:invoice:1650377", 1900, "USD"),
        ("refund:lemonsqueezy:invoice:1650400", 300, "EUR"),
    ]
    (full,) = [t for t in tracks if t["event_id"] == "refund:lemonsqueezy:invoice:1650377"]
    assert full["timestamp"] == "2026-12-14T11:02:37Z"  # refunded_at
    assert full["user_id"] == "user_318"
    assert full["properties"]["fully_refunded"] is True
    assert full["properties"]["subscription"] == "771204"
    net: dict[str, int] = defaultdict(int)
    for t in tracks:
        net[t["properties"]["invoice"]] += (1 if t["event"] == "purchase" else -1) * t[
            "properties"
        ]["amount_cents"]
    assert net == {"1650377": 0, "1650400": 400}
    assert bridge.queued(more, named(more)) == 0  # collapsed into the first refund


def test_the_first_payments_refund_is_its_orders(bridge: Served) -> None:
    # Lemon Squeezy's own example: the initial invoice refunded. Its purchase was the
    # order's (order_created), so its refund is the order's (order_refunded).
    initial = msgspec.json.decode((FIXTURES / "subscription_payment_refunded.json").read_bytes())
    assert initial["data"]["attributes"]["billing_reason"] == "initial"
    bridge.accepted(initial, named(initial))
    assert bridge.taken(initial, named(initial)) == ("translated", None)
    assert bridge.queued(initial, named(initial)) == 0
    order_refund = fixture("order_refunded")  # the order's refund, for comparison
    bridge.accepted(order_refund, named(order_refund))
    (refund,) = bridge.tracks(2)
    assert refund["event_id"] == "refund:lemonsqueezy:order:4211907"


def test_each_cancellation_is_one_churn_and_its_expiry_adds_none(bridge: Served) -> None:
    first = fixture("subscription_cancelled")
    resent = fixture("subscription_cancelled", {"webhook_id": "a-second-delivery"})
    # Resumed, renewed, then cancelled again: another cancellation.
    again = fixture(
        "subscription_cancelled",
        updated_at="2027-01-20T10:00:00.000000Z",
        ends_at="2027-02-10T16:30:02.000000Z",
    )
    # Resumed and cancelled again within the same period: a cancellation of its own too.
    same_period = fixture("subscription_cancelled", updated_at="2026-11-25T12:00:00.000000Z")
    # The end of the last cancellation: cancelled, so no churn of its own.
    ended = fixture(
        "subscription_expired",
        status="expired",
        cancelled=True,
        ends_at="2027-02-10T16:30:02.000000Z",
        updated_at="2027-02-10T16:30:05.000000Z",
    )
    post(bridge, first, resent, same_period, again, ended)
    tracks = bridge.tracks(4)  # three cancellations and one identify
    assert sorted(t["event_id"] for t in tracks) == [
        "subscription_canceled:lemonsqueezy:771204:20261120T081445Z",
        "subscription_canceled:lemonsqueezy:771204:20261125T120000Z",
        "subscription_canceled:lemonsqueezy:771204:20270120T100000Z",
    ]
    assert {t["event"] for t in tracks} == {"subscription_canceled"}
    assert bridge.queued(resent, named(resent)) == 0  # the same cancellation: same event_id
    assert bridge.taken(ended, named(ended)) == ("translated", None)
    assert bridge.queued(ended, named(ended)) == 0


def test_an_expiry_after_failed_dunning_is_churn(bridge: Served) -> None:
    expired = fixture("subscription_expired")
    assert expired["data"]["attributes"]["cancelled"] is False
    post(bridge, expired)
    (churn,) = bridge.tracks(2)
    assert churn == {
        "route": "track",
        "event": "subscription_canceled",
        "event_id": "subscription_canceled:lemonsqueezy:771204:20261224T163140Z",
        "timestamp": "2026-12-24T16:31:40Z",
        "anonymous_id": "lemonsqueezy:3920442",
        "user_id": "user_318",
        "properties": {
            "subscription": "771204",
            "order": "4211951",
            "status": "expired",
            "quantity": 1,
            "ends_at": "2026-12-24T16:31:40+00:00",
            "product_id": 210560,
            "variant_id": 301893,
        },
    }
    # The same expiry resent is the same churn.
    resent = fixture("subscription_expired", {"webhook_id": "resent"})
    post(bridge, resent)
    assert bridge.taken(resent, named(resent)) == ("translated", None)
    assert bridge.queued(resent, named(resent)) == 0
