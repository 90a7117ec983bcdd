"""Stripe amounts become ISO 4217 minor units through one helper, on every path: Stripe's
own decimals (docs.stripe.com/currencies: zero-decimal, three-decimal, and the special
cases ISK and UGX kept two-decimal) against the ISO exponents of `bridge.money`; what does
not divide evenly is quarantined, never rounded. End to end through real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import PayloadInvalid
from bridge.money import EXPONENTS, exponent, rescale_minor_units
from handlers.stripe import amount_in_minor_units, handler, stripe_decimals
from tests.conftest import RunningSink
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "stripe"

# Stripe's lists, written out again from docs.stripe.com/currencies.
# fmt: off
STRIPE_ZERO_DECIMAL = frozenset({
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
})
# fmt: on
STRIPE_THREE_DECIMAL = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})
# "Special cases": zero-decimal in fact, two-decimal in Stripe's API (multiples of 100).
STRIPE_TWO_DECIMAL_SPECIAL = frozenset({"ISK", "UGX"})


def test_the_table_is_stripes_page() -> None:
    for code in STRIPE_ZERO_DECIMAL - STRIPE_TWO_DECIMAL_SPECIAL:
        assert stripe_decimals(code) == 0, code
        assert stripe_decimals(code.lower()) == 0, code
    for code in STRIPE_THREE_DECIMAL:
        assert stripe_decimals(code) == 3, code
    for code in (*STRIPE_TWO_DECIMAL_SPECIAL, "HUF", "TWD", "USD", "EUR", "IDR"):
        assert stripe_decimals(code) == 2, code


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        (1999, "usd", (1999, "USD")),
        (500000, "isk", (5000, "ISK")),  # 5,000 kr: Stripe counts ISK in hundredths
        (100, "isk", (1, "ISK")),  # "an ISK amount of 100 represents 1 króna"
        (380000, "ugx", (3800, "UGX")),
        (500, "jpy", (500, "JPY")),  # zero-decimal in both
        (5000, "mga", (500000, "MGA")),  # zero-decimal at Stripe, two in ISO 4217
        (5120, "kwd", (5120, "KWD")),  # three-decimal in both
        (1045, "huf", (1045, "HUF")),  # two-decimal in Stripe's API and in ISO 4217
        (80045, "twd", (80045, "TWD")),
        (0, "isk", (0, "ISK")),
        (-500, "isk", (-5, "ISK")),
    ],
)
def test_amounts_in_iso_minor_units(amount: int, currency: str, expected: tuple[int, str]) -> None:
    assert amount_in_minor_units(amount, currency) == expected


@pytest.mark.parametrize(
    ("amount", "currency", "says"),
    [
        (12345, "isk", "not a whole amount of ISK"),  # fractional króna: never rounded
        (150, "ugx", "not a whole amount of UGX"),
        (1999, None, "without its currency"),
        (1999, "", "without its currency"),
        (1999, "dollars", "not an ISO 4217 currency code"),
        (True, "usd", "not an integer amount"),
        (19.99, "usd", "not an integer amount"),
    ],
)
def test_what_cannot_be_converted_exactly_is_refused(amount: Any, currency: Any, says: str) -> None:
    with pytest.raises(PayloadInvalid, match=says):
        amount_in_minor_units(amount, currency)


@given(st.integers(min_value=-(10**15), max_value=10**15), st.sampled_from(sorted(EXPONENTS)))
def test_rescaling_is_exact_both_ways(minor: int, currency: str) -> None:
    """Any whole amount of minor units, counted in more or fewer decimals, comes back."""
    places = exponent(currency)
    for digits in range(5):
        counted = minor * 10 ** (digits - places) if digits >= places else None
        if counted is not None:
            assert rescale_minor_units(counted, currency, digits) == minor
    assert rescale_minor_units(minor, currency, places) == minor


# -- end to end: every path of the handler -----------------------------------------------


def event(name: str, *, id_: str, **changes: Any) -> dict[str, Any]:
    """A recorded event, live, under a new id, with `changes` to its data.object (and
    `previous_attributes` to its data)."""
    found: dict[str, Any] = msgspec.json.decode((FIXTURES / f"{name}.json").read_bytes())
    found["id"], found["livemode"] = id_, True
    if "previous_attributes" in changes:
        found["data"]["previous_attributes"] = changes.pop("previous_attributes")
    found["data"]["object"].update(changes)
    return found


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    config = '[sources.stripe]\npurchases_from_payment_intents = true\napi_version = "2024-06-20"\n'
    with served(handler, sink, tmp_path, config=config) as running:
        yield running


def test_every_stripe_path_sends_iso_minor_units(bridge: Served) -> None:
    checkout = event(
        "checkout.session.completed",
        id_="evt_isk_checkout",
        mode="payment",
        payment_intent="pi_isk",
        currency="isk",
        amount_total=500000,  # 5,000 kr
    )
    invoice = event(
        "invoice.paid",
        id_="evt_isk_invoice",
        id="in_isk",
        currency="isk",
        amount_paid=1250000,
        subscription="sub_isk",
    )
    intent = event(
        "payment_intent.succeeded",
        id_="evt_mga_intent",
        id="pi_mga",
        currency="mga",
        amount=40000,
        amount_received=40000,  # 40,000 Ar: Stripe counts MGA in whole ariary
        invoice=None,
    )
    refund = event(
        "charge.refunded",
        id_="evt_ugx_refund",
        id="ch_ugx",
        currency="ugx",
        amount=380000,
        amount_refunded=100000,
        previous_attributes={"amount_refunded": 0},
    )
    started = event("customer.subscription.created", id_="evt_isk_sub", id="sub_isk")
    item = started["data"]["object"]["items"]["data"][0]
    item["price"].update(currency="isk", amount=99000)  # 990 kr a month, twice
    for delivery in (checkout, invoice, intent, refund, started):
        bridge.accepted(delivery)
    money = {
        c["event_id"]: (c["properties"]["amount_cents"], c["properties"]["currency"])
        for c in bridge.tracks(5)
    }
    assert money == {
        "purchase:pi_isk": (5000, "ISK"),
        "purchase:in_isk": (12500, "ISK"),
        "purchase:pi_mga": (4000000, "MGA"),
        "refund:ch_ugx:100000": (1000, "UGX"),
        "subscription_started:sub_isk": (1980, "ISK"),
    }


def test_currencies_whose_decimals_agree_pass_through(bridge: Served) -> None:
    for code, amount in (("usd", 1999), ("jpy", 500), ("kwd", 5120), ("huf", 1045)):
        bridge.accepted(
            event(
                "checkout.session.completed",
                id_=f"evt_{code}",
                mode="payment",
                payment_intent=f"pi_{code}",
                currency=code,
                amount_total=amount,
            )
        )
    money = {
        (c["properties"]["amount_cents"], c["properties"]["currency"]) for c in bridge.tracks(4)
    }
    assert money == {(1999, "USD"), (500, "JPY"), (5120, "KWD"), (1045, "HUF")}


def test_an_amount_that_is_not_whole_minor_units_is_quarantined_and_sends_nothing(
    bridge: Served,
) -> None:
    fractional = event(
        "invoice.paid", id_="evt_isk_fraction", id="in_frac", currency="isk", amount_paid=12345
    )
    bridge.accepted(fractional)  # validly signed: taken, never refused for its content
    state, reason = bridge.taken(fractional)
    assert state == "quarantined"
    assert reason is not None
    assert "not a whole amount of ISK" in reason
    assert bridge.queued(fractional) == 0
    no_currency = event(
        "checkout.session.completed",
        id_="evt_no_currency",
        mode="payment",
        payment_intent="pi_none",
        currency=None,
    )
    bridge.accepted(no_currency)
    state, reason = bridge.taken(no_currency)
    assert (state, reason) == ("quarantined", "payload: an amount without its currency")
    # A good delivery after them still goes through.
    good = event("invoice.paid", id_="evt_isk_good", id="in_good", currency="isk", amount_paid=100)
    bridge.accepted(good)
    (purchase,) = bridge.tracks(1)
    assert (purchase["event_id"], purchase["properties"]["amount_cents"]) == ("purchase:in_good", 1)
    time.sleep(0.3)
    assert len(bridge.arrived(1)) == 1
