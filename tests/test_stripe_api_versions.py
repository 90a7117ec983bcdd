"""Stripe's API versions, the newest (dahlia) and those before 2025-03-31 (basil), through
real HTTP into the sink: an invoice names its subscription and that subscription's metadata
under `parent` from basil on, and the older fields are still read; payment intents are
counted only where they can say they pay no invoice, and the combination that would count
an invoice twice is refused at start-up; a subscription that never started is neither
started nor canceled."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from bridge.cli import main
from bridge.errors import ConfigError
from bridge.registry import load_sources
from handlers.stripe import StripeOptions, handler
from tests.conftest import RunningSink
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "stripe"
DAHLIA = "2026-03-25.dahlia"


def event(name: str, *, id_: str, version: str | None = None, **changes: Any) -> dict[str, Any]:
    """A recorded event, live, under a new id (and API version), with `changes` to its
    data.object (and `previous_attributes` to its data)."""
    found: dict[str, Any] = msgspec.json.decode((FIXTURES / f"{name}.json").read_bytes())
    found["id"], found["livemode"] = id_, True
    if version is not None:
        found["api_version"] = version
    if "previous_attributes" in changes:
        found["data"]["previous_attributes"] = changes.pop("previous_attributes")
    found["data"]["object"].update(changes)
    return found


def older_invoice(id_: str, invoice: str, **changes: Any) -> dict[str, Any]:
    """An invoice as API versions before basil send it: the subscription at the top."""
    return event("invoice.paid", id_=id_, version="2024-06-20", id=invoice, parent=None, **changes)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    with served(handler, sink, tmp_path) as running:
        yield running


# -- invoices name their subscription under `parent` from basil on -----------------------


def test_a_dahlia_renewal_carries_its_subscription_and_the_user_its_metadata_names(
    bridge: Served,
) -> None:
    renewal = event("invoice.paid.dahlia", id_="evt_dahlia_renewal")
    assert renewal["api_version"] == DAHLIA
    bridge.accepted(renewal)
    calls = bridge.arrived(2)
    (purchase,) = [c for c in calls if c["route"] == "track"]
    assert purchase == {
        "route": "track",
        "event": "purchase",
        "event_id": "purchase:in_1Pgc6tB7WZ01zgkWu9fdqL6I",
        "timestamp": "2026-03-25T10:00:00Z",
        "anonymous_id": "browser-dahlia",
        "user_id": "user_dahlia",
        "properties": {
            "amount_cents": 1000,
            "currency": "USD",
            "invoice": "in_1Pgc6tB7WZ01zgkWu9fdqL6I",
            "subscription": "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw",
            "billing_reason": "subscription_cycle",
        },
    }
    assert [c for c in calls if c["route"] == "identify"] == [
        {"route": "identify", "user_id": "user_dahlia", "anonymous_id": "browser-dahlia"}
    ]


def test_older_versions_still_name_the_subscription_at_the_top(bridge: Served) -> None:
    older = older_invoice(
        "evt_acacia",
        "in_old",
        subscription="sub_old",
        subscription_details={"metadata": {"user_id": "user_old"}},
        customer="cus_old",
    )
    # The basil object the shared fixture holds: `parent` null, no subscription anywhere.
    one_off = event("invoice.paid", id_="evt_basil_one_off", id="in_one_off", customer="cus_b")
    # A basil invoice of a quote: a parent, but no subscription in it.
    quote = event(
        "invoice.paid.dahlia",
        id_="evt_quote",
        id="in_quote",
        customer="cus_q",
        parent={"type": "quote_details", "quote_details": {"quote": "qt_1"}},
    )
    for delivery in (older, one_off, quote):
        bridge.accepted(delivery)
    tracks = {c["event_id"]: c for c in bridge.tracks(4)}
    assert tracks["purchase:in_old"]["properties"]["subscription"] == "sub_old"
    assert tracks["purchase:in_old"]["user_id"] == "user_old"
    assert "subscription" not in tracks["purchase:in_one_off"]["properties"]
    assert "subscription" not in tracks["purchase:in_quote"]["properties"]
    assert tracks["purchase:in_quote"].get("user_id") is None


def test_the_invoices_own_metadata_wins_over_its_subscriptions(bridge: Served) -> None:
    renewal = event("invoice.paid.dahlia", id_="evt_own_metadata", metadata={"user_id": "user_own"})
    bridge.accepted(renewal)
    (purchase,) = bridge.tracks(2)
    assert purchase["user_id"] == "user_own"
    assert purchase["anonymous_id"] == "browser-dahlia"  # the subscription's, not overridden


def test_a_renewal_after_the_first_payment_reaches_the_user_learned_from_checkout(
    bridge: Served,
) -> None:
    """A basil subscription's later invoices may carry no metadata at all: the customer's
    user, learned once, is still on them."""
    checkout = event(
        "checkout.session.completed",
        id_="evt_first",
        version=DAHLIA,
        invoice="in_first",
        customer="cus_sub",
        client_reference_id="user_sub",
    )
    renewal = event(
        "invoice.paid.dahlia",
        id_="evt_second",
        id="in_second",
        customer="cus_sub",
        parent={
            "type": "subscription_details",
            "subscription_details": {"subscription": "sub_x", "metadata": {}},
        },
    )
    bridge.accepted(checkout)
    bridge.accepted(renewal)
    tracks = bridge.tracks(3)
    assert {(t["event_id"], t["user_id"]) for t in tracks} == {
        ("purchase:in_first", "user_sub"),
        ("purchase:in_second", "user_sub"),
    }


# -- payment intents: counted only where they can say they pay no invoice -----------------


def test_payment_intents_with_an_old_endpoint_count_and_new_ones_are_quarantined(
    sink: RunningSink, tmp_path: Path
) -> None:
    config = '[sources.stripe]\npurchases_from_payment_intents = true\napi_version = "2024-06-20"\n'
    with served(handler, sink, tmp_path, config=config) as bridge:
        alone = event("payment_intent.succeeded", id_="evt_pi_alone", id="pi_alone", invoice=None)
        of_invoice = event(
            "payment_intent.succeeded", id_="evt_pi_inv", id="pi_inv", invoice="in_paid"
        )
        # The endpoint was upgraded after start-up: its payment intents no longer say.
        dahlia = event("payment_intent.succeeded.dahlia", id_="evt_pi_dahlia")
        relabelled = event(
            "payment_intent.succeeded.dahlia", id_="evt_pi_old", version="2024-06-20"
        )
        basil_null = event(
            "payment_intent.succeeded",
            id_="evt_pi_basil",
            version="2025-03-31.basil",
            id="pi_basil",
            invoice=None,
        )
        for delivery in (alone, of_invoice, dahlia, relabelled, basil_null):
            bridge.accepted(delivery)
        (purchase,) = bridge.tracks(1)
        assert purchase["event_id"] == "purchase:pi_alone"
        assert purchase["properties"]["amount_cents"] == 2000
        assert bridge.taken(of_invoice) == ("translated", None)  # left to invoice.paid
        assert bridge.queued(of_invoice) == 0
        for quarantined in (dahlia, relabelled, basil_null):
            state, reason = bridge.taken(quarantined)
            assert state == "quarantined", quarantined["id"]
            assert reason is not None
            assert "does not say whether it pays an invoice" in reason
            assert bridge.queued(quarantined) == 0
        time.sleep(0.3)
        assert len(bridge.tracks(1)) == 1


def test_payment_intents_are_not_read_unless_the_source_asks(bridge: Served) -> None:
    dahlia = event("payment_intent.succeeded.dahlia", id_="evt_pi_off")
    bridge.accepted(dahlia)
    assert bridge.taken(dahlia) == ("translated", None)
    assert bridge.queued(dahlia) == 0


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ("purchases_from_payment_intents = true\n", "purchases_from_payment_intents needs"),
        (
            'purchases_from_payment_intents = true\napi_version = "2025-03-31.basil"\n',
            "cannot be used with API version 2025-03-31.basil",
        ),
        (
            f'purchases_from_payment_intents = true\napi_version = "{DAHLIA}"\n',
            f"cannot be used with API version {DAHLIA}",
        ),
        ('api_version = "basil"\n', "is not a Stripe API version"),
    ],
)
def test_the_unsafe_combination_stops_start_up_with_one_line(
    tmp_path: Path, options: str, says: str
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(f"[sources.stripe]\n{options}")
    env = {"BRIDGE_CONFIG": str(config), "STRIPE_WEBHOOK_SECRET": "whsec_x"}
    with pytest.raises(ConfigError, match=says) as refused:
        load_sources(env, {"stripe": handler})
    assert refused.value.variable == "bridge.toml [sources.stripe]"
    result = CliRunner().invoke(
        main,
        ["serve"],
        env={
            **env,
            "MILLIMETRIC_KEY": "sk_live_abc123_def456",
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        },
    )
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("millimetric-bridge: bridge.toml [sources.stripe]: ")
    assert says in line


def test_an_old_endpoint_with_payment_intents_starts() -> None:
    options = StripeOptions(purchases_from_payment_intents=True, api_version="2024-06-20")
    assert options.api_version == "2024-06-20"
    assert StripeOptions(api_version=DAHLIA).purchases_from_payment_intents is False


# -- subscriptions that never started -----------------------------------------------------


def test_a_subscription_started_when_its_first_payment_is_made(bridge: Served) -> None:
    incomplete = event("customer.subscription.created.dahlia", id_="evt_sub_incomplete")
    assert incomplete["data"]["object"]["status"] == "incomplete"
    activated = event(
        "customer.subscription.created.dahlia",
        id_="evt_sub_active",
        status="active",
        previous_attributes={"status": "incomplete"},
    )
    activated["type"] = "customer.subscription.updated"
    bridge.accepted(incomplete)
    assert bridge.taken(incomplete) == ("translated", None)
    assert bridge.queued(incomplete) == 0
    bridge.accepted(activated)
    (started,) = bridge.tracks(1)
    assert started["event"] == "subscription_started"
    assert started["event_id"] == "subscription_started:sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"
    assert started["properties"] == {
        "subscription": "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw",
        "status": "active",
        "price": "price_1PgafmB7WZ01zgkW6dKueIc5",
        "interval": "month",
        "quantity": 1,
        "amount_cents": 2000,
        "currency": "USD",
    }


def test_only_active_and_trialing_subscriptions_are_started(bridge: Served) -> None:
    created = {
        status: event(
            "customer.subscription.created",
            id_=f"evt_c_{status}",
            id=f"sub_{status}",
            status=status,
        )
        for status in ("active", "trialing", "incomplete", "incomplete_expired")
    }
    updates = {
        # (from, to): only leaving `incomplete` for a paid or trial status is a start
        ("trialing", "active"): "sub_trial_over",
        ("active", "past_due"): "sub_past_due",
        ("past_due", "active"): "sub_recovered",
        ("paused", "active"): "sub_resumed",
        ("incomplete", "incomplete_expired"): "sub_expired",
        ("incomplete", "trialing"): "sub_trial_started",
    }
    for delivery in created.values():
        bridge.accepted(delivery)
    for (before, after), subscription in updates.items():
        update = event(
            "customer.subscription.created",
            id_=f"evt_u_{subscription}",
            id=subscription,
            status=after,
            previous_attributes={"status": before},
        )
        update["type"] = "customer.subscription.updated"
        bridge.accepted(update)
    started = {(c["event_id"], c["properties"]["status"]) for c in bridge.tracks(3)}
    assert started == {
        ("subscription_started:sub_active", "active"),
        ("subscription_started:sub_trialing", "trialing"),
        ("subscription_started:sub_trial_started", "trialing"),
    }


def test_the_end_of_a_subscription_that_never_started_is_no_churn(bridge: Served) -> None:
    expired = event(
        "customer.subscription.deleted",
        id_="evt_d_expired",
        id="sub_never",
        status="incomplete_expired",
    )
    canceled_while_incomplete = event(
        "customer.subscription.deleted",
        id_="evt_d_incomplete",
        id="sub_never_paid",
        previous_attributes={"status": "incomplete"},
    )
    churned = event("customer.subscription.deleted", id_="evt_d_churned", id="sub_paid")
    for delivery in (expired, canceled_while_incomplete, churned):
        bridge.accepted(delivery)
    (canceled,) = bridge.tracks(1)
    assert (canceled["event"], canceled["event_id"]) == (
        "subscription_canceled",
        "subscription_canceled:sub_paid",
    )
    assert canceled["properties"]["status"] == "canceled"
    for delivery in (expired, canceled_while_incomplete):
        assert bridge.taken(delivery) == ("translated", None)
        assert bridge.queued(delivery) == 0
