"""Stripe: purchases, refunds, subscriptions and customers.

Revenue is counted once per payment: the purchase's `event_id` comes from the payment (the
invoice, or the payment intent), not from the webhook, so Checkout's event and the
invoice's event for the same payment collapse into one purchase at Millimetric.

Every amount goes through `amount_in_minor_units`: Stripe counts some currencies in other
decimals than ISO 4217 does (ISK and UGX with two, MGA with none), and Millimetric's
`amount_cents` is the ISO minor unit. Payloads of every API version are read: from
2025-03-31 (basil) an invoice names its subscription under `parent.subscription_details`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final

import msgspec
from msgspec import UNSET, UnsetType

from bridge import About, Alias, Forget, ForgetVisitor, Identify, Output, PayloadInvalid, Track
from bridge.money import rescale_minor_units
from bridge.plugin import ApiAccess, ListedEvent, Sample, SourceOptions, WebhookRequest
from bridge.signatures import StripeScheme
from handlers import stripe_events

__all__ = ["StripeHandler", "StripeOptions", "amount_in_minor_units", "handler", "stripe_decimals"]

Expandable = str | dict[str, Any] | None

#: The first API version whose payment intents no longer name their invoice (and whose
#: invoices name their subscription under `parent`): 2025-03-31.basil.
BASIL: Final = "2025-03-31"
_API_VERSION: Final = re.compile(r"\d{4}-\d{2}-\d{2}(?:\.[a-z]+)?")

# Stripe's decimals per currency, from docs.stripe.com/currencies: its zero-decimal list and
# its three-decimal list; every other currency is two-decimal in Stripe's API. That includes
# the page's special cases: ISK and UGX, which Stripe keeps two-decimal for backwards
# compatibility though they are zero-decimal in ISO 4217 (an ISK amount of 100 is 1 króna,
# and Stripe takes only multiples of 100), and HUF and TWD, two-decimal in both. UGX is
# also in the page's zero-decimal list; its special case and Stripe's API, which refuses
# UGX amounts not divisible by 100, say two.
# fmt: off
_STRIPE_ZERO_DECIMAL: Final = frozenset({
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "VND", "VUV", "XAF",
    "XOF", "XPF",
})
# fmt: on
_STRIPE_THREE_DECIMAL: Final = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})


def stripe_decimals(currency: str) -> int:
    """How many decimals of the major unit Stripe's integer amounts in `currency` count."""
    code = currency.upper()
    if code in _STRIPE_ZERO_DECIMAL:
        return 0
    return 3 if code in _STRIPE_THREE_DECIMAL else 2


def amount_in_minor_units(amount: int, currency: str | None) -> tuple[int, str]:
    """A Stripe amount and its currency as Millimetric's `amount_cents` (the ISO 4217
    minor unit) and upper-case `currency`: 500000 ISK is 5000, 5000 MGA is 500000, 1999 USD
    stays 1999. PayloadInvalid for an amount without a currency, a code that is not one, or
    an amount that is not a whole number of the currency's minor units (never rounded)."""
    if not currency:
        raise PayloadInvalid("an amount without its currency")
    code = currency.upper()
    return rescale_minor_units(amount, code, stripe_decimals(code)), code


class StripeOptions(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    purchases_from_payment_intents: bool = False  # for integrations with neither Checkout
    forget_on_customer_deleted: bool = False  # nor invoices; and erasure on deletion
    # The API version of the source's webhook endpoint; needed with
    # purchases_from_payment_intents, which is only safe before BASIL.
    api_version: str | None = None

    def __post_init__(self) -> None:
        # A ValueError here is start-up's one line (bridge.toml [sources.NAME]: ...).
        if self.api_version is not None and not _API_VERSION.fullmatch(self.api_version):
            raise ValueError(
                f"api_version {self.api_version!r} is not a Stripe API version "
                "(like 2024-06-20 or 2025-03-31.basil)"
            )
        if not self.purchases_from_payment_intents:
            return
        if self.api_version is None:
            raise ValueError(
                "purchases_from_payment_intents needs api_version, the API version of the "
                "Stripe webhook endpoint: from 2025-03-31 a payment intent no longer names "
                "its invoice, and an invoice's payment would count twice"
            )
        if self.api_version >= BASIL:
            raise ValueError(
                f"purchases_from_payment_intents cannot be used with API version "
                f"{self.api_version}: from 2025-03-31 a payment intent no longer names its "
                "invoice, and an invoice's payment would count twice; count purchases from "
                "Checkout and invoices instead"
            )


class Price(msgspec.Struct, frozen=True):
    id: str | None = None
    unit_amount: int | None = None
    amount: int | None = None  # plans and old prices
    currency: str | None = None
    interval: str | None = None  # plans and old prices
    recurring: dict[str, Any] | None = None


class Item(msgspec.Struct, frozen=True):
    price: Price | None = None
    plan: Price | None = None
    quantity: int | None = None


class Items(msgspec.Struct, frozen=True):
    data: list[Item] = []


class SubscriptionDetails(msgspec.Struct, frozen=True):
    subscription: Expandable = None
    metadata: dict[str, Any] | None = None  # the subscription's, when the invoice was made


class InvoiceParent(msgspec.Struct, frozen=True):
    """What made an invoice (API versions from 2025-03-31)."""

    subscription_details: SubscriptionDetails | None = None


class Refund(msgspec.Struct, frozen=True):
    amount: int = 0
    created: int = 0


class Refunds(msgspec.Struct, frozen=True):
    data: list[Refund] = []


class StripeObject(msgspec.Struct, frozen=True):
    id: str | None = None
    mode: str | None = None
    payment_status: str | None = None
    status: str | None = None
    amount: int | None = None
    amount_total: int | None = None
    amount_paid: int | None = None
    amount_received: int | None = None
    amount_refunded: int | None = None
    currency: str | None = None
    customer: Expandable = None
    client_reference_id: str | None = None
    metadata: dict[str, Any] | None = None
    # UNSET: the payload has no such field (a payment intent from API version 2025-03-31
    # on), which is not the same as null (one that pays no invoice).
    invoice: Expandable | UnsetType = UNSET
    payment_intent: Expandable = None
    subscription: Expandable = None  # invoices before 2025-03-31
    subscription_details: SubscriptionDetails | None = None  # invoices before 2025-03-31
    parent: InvoiceParent | None = None  # invoices from 2025-03-31
    billing_reason: str | None = None
    items: Items | None = None
    plan: Price | None = None
    quantity: int | None = None
    refunds: Refunds | None = None


class Data(msgspec.Struct, frozen=True):
    object: msgspec.Raw  # decoded only for the event types translated
    previous_attributes: dict[str, Any] | None = None


class Event(msgspec.Struct, frozen=True):
    id: str
    type: str
    created: int
    data: Data
    livemode: bool = False
    api_version: str | None = None


class EventId(msgspec.Struct, frozen=True):
    """Only the event's id: the delivery id, read without decoding the rest."""

    id: str


_decoder: Final = msgspec.json.Decoder(Event)
_id_decoder: Final = msgspec.json.Decoder(EventId)
_object_decoder: Final = msgspec.json.Decoder(StripeObject)
#: The event types translated; every other type is acknowledged and ignored unread.
TRANSLATED: Final = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "invoice.paid",
        "payment_intent.succeeded",
        "charge.refunded",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.created",
        "customer.updated",
        "customer.deleted",
    }
)


#: Subscription statuses of a subscription that has started: paid, or in its trial.
#: `incomplete` (the first payment failed or awaits the customer) has not; from there it
#: becomes `active` once paid, or `incomplete_expired` (terminal) 23 hours later.
_STARTED: Final = frozenset({"active", "trialing"})
_NEVER_STARTED: Final = frozenset({"incomplete", "incomplete_expired"})


def _id(value: Expandable | UnsetType) -> str | None:
    if isinstance(value, UnsetType):
        return None
    if isinstance(value, dict):
        found = value.get("id")
        return found if isinstance(found, str) else None
    return value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class StripeHandler:
    name = "stripe"
    secret_variable = "STRIPE_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)
    scheme = StripeScheme()
    options_type = StripeOptions
    headers: tuple[str, ...] = ()  # everything read is in the signed body
    # Backfill and reconcile, from Stripe's Events API (`bridge.plugin.EventLister`).
    api_key_variable = "STRIPE_API_KEY"
    api_base_variable = "STRIPE_API_BASE"

    def check_api_key(self, access: ApiAccess) -> str:
        return stripe_events.check_api_key(access)

    def list_events(
        self, access: ApiAccess, since: float, until: float, after: ListedEvent | None
    ) -> AsyncIterator[ListedEvent]:
        """The events of the types translated, as Stripe's Events API lists them."""
        return stripe_events.list_events(access, TRANSLATED, since, until, after)

    def delivery_id(self, request: WebhookRequest) -> str:
        try:
            return _id_decoder.decode(request.body).id
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"no Stripe event id: {error}") from None

    def parse(self, request: WebhookRequest) -> Event:
        try:
            return _decoder.decode(request.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not a Stripe event: {error}") from None

    def samples(self) -> Mapping[str, Sample]:
        folder = resources.files("handlers").joinpath("samples", "stripe")
        return {
            f.name.removesuffix(".json"): Sample(body=f.read_bytes())
            for f in folder.iterdir()
            if f.name.endswith(".json")
        }

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: fresh ids and time, and a Checkout
        sample becomes a paid one-off payment, so a purchase shows at the sink."""
        event = msgspec.json.decode(sample.body)
        token = uuid.uuid4().hex[:16]
        event["id"], event["created"] = f"evt_test_{token}", int(time.time())
        obj = event["data"]["object"]
        kind = obj.get("object")
        if kind == "checkout.session":
            obj.update(mode="payment", payment_status="paid", payment_intent=f"pi_test_{token}")
        elif kind in ("invoice", "charge", "payment_intent", "subscription"):
            obj["id"] = f"{obj['id'].split('_')[0]}_test_{token}"
        return Sample(body=msgspec.json.encode(event), headers=sample.headers)

    def translate(
        self, request: WebhookRequest, payload: Event, options: StripeOptions
    ) -> list[Output]:
        if payload.type not in TRANSLATED or (
            not payload.livemode and not options.include_test_events
        ):
            return []
        try:
            obj = _object_decoder.decode(payload.data.object)
            when = datetime.fromtimestamp(payload.created, UTC)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"unexpected {payload.type} object: {error}") from None
        except (ValueError, OverflowError, OSError):
            raise PayloadInvalid("created is not a usable time") from None
        # An invoice carries its subscription's metadata beside its own (the user and the
        # browser a renewal is about); the object's own metadata wins.
        details = _subscription_details(obj)
        metadata = {**((details.metadata if details else None) or {}), **(obj.metadata or {})}
        customer = (
            obj.id
            if payload.type.startswith("customer.")
            and not payload.type.startswith("customer.subscription")
            else _id(obj.customer)
        )
        # One visitor per customer: the browser's id when the payload carries it (so web
        # attribution follows the purchase), remembered for the customer's later events.
        customer_key = f"stripe:{customer}" if customer else None
        browser = _text(metadata.get("millimetric_anonymous_id"))
        anonymous_id = browser or customer_key
        prefix: list[Output] = (
            [Alias(alias=customer_key, anonymous_id=browser)] if browser and customer_key else []
        )
        if customer_key:
            # Whatever the delivery becomes, it holds the customer's data: a forget of the
            # user learned for the customer (or beside its deletion) must reach it.
            prefix.append(About(identifier=customer_key))
        user_id = _text(obj.client_reference_id) or _text(metadata.get("user_id"))

        def track(event: str, event_id: str | None, **properties: Any) -> Track:
            return Track(
                event=event,
                event_id=event_id,
                timestamp=when,
                anonymous_id=anonymous_id,
                user_id=user_id,
                properties={k: v for k, v in properties.items() if v is not None},
            )

        def money(amount: int) -> dict[str, Any]:
            minor, currency = amount_in_minor_units(amount, obj.currency)
            return {"amount_cents": minor, "currency": currency}

        def mapped() -> list[Output]:
            match payload.type:
                case "checkout.session.completed" | "checkout.session.async_payment_succeeded":
                    if obj.payment_status != "paid" or not obj.amount_total:
                        return self._identify(user_id, anonymous_id)  # e.g. a free trial
                    if obj.mode == "payment":
                        # With invoice creation on, the invoice's own invoice.paid names the
                        # same payment: take the invoice's id so the two collapse.
                        payment = _id(obj.invoice) or _id(obj.payment_intent) or obj.id
                    elif obj.mode == "subscription" and _id(obj.invoice):
                        payment = _id(obj.invoice)
                    else:  # a subscription's first payment: counted from its invoice.paid
                        return self._identify(user_id, anonymous_id)
                    return [
                        track(
                            "purchase",
                            f"purchase:{payment}",
                            **money(obj.amount_total),
                            checkout_session=obj.id,
                            subscription=_id(obj.subscription),
                        )
                    ]
                case "invoice.paid":
                    if not obj.amount_paid or obj.amount_paid <= 0:
                        return []
                    return [
                        track(
                            "purchase",
                            f"purchase:{obj.id}",
                            **money(obj.amount_paid),
                            invoice=obj.id,
                            subscription=_id(details.subscription if details else None),
                            billing_reason=obj.billing_reason,
                        )
                    ]
                case "payment_intent.succeeded":
                    if not options.purchases_from_payment_intents or _id(obj.invoice):
                        return []
                    _require_invoice_field(payload, obj)
                    amount = obj.amount_received or obj.amount
                    if not amount:
                        return []
                    return [
                        track(
                            "purchase",
                            f"purchase:{obj.id}",
                            **money(amount),
                            payment_intent=obj.id,
                        )
                    ]
                case "charge.refunded":
                    total = obj.amount_refunded or 0
                    amount = _refunded_now(obj, payload.data.previous_attributes)
                    if amount <= 0:
                        return []
                    return [
                        track(
                            "refund",
                            f"refund:{obj.id}:{total}",
                            **money(amount),
                            charge=obj.id,
                            payment_intent=_id(obj.payment_intent),
                            fully_refunded=(obj.amount is not None and total >= obj.amount),
                        )
                    ]
                case "customer.subscription.created" | "customer.subscription.updated":
                    previous = (payload.data.previous_attributes or {}).get("status")
                    if obj.status not in _STARTED or (
                        # An update starts a subscription only when it leaves `incomplete`
                        # (its first payment made); any other change is not a start.
                        payload.type.endswith("updated") and previous not in _NEVER_STARTED
                    ):
                        return []
                    name = "subscription_started"
                    return [track(name, f"{name}:{obj.id}", subscription=obj.id, **_plan(obj))]
                case "customer.subscription.deleted":
                    previous = (payload.data.previous_attributes or {}).get("status")
                    if obj.status in _NEVER_STARTED or previous in _NEVER_STARTED:
                        return []  # it never started: no churn
                    name = "subscription_canceled"
                    return [track(name, f"{name}:{obj.id}", subscription=obj.id, **_plan(obj))]
                case "customer.created" | "customer.updated":
                    return self._identify(user_id, anonymous_id)
                case "customer.deleted":
                    if not options.forget_on_customer_deleted:
                        return []
                    if user_id:
                        return [Forget(user_id=user_id)]
                    # The user the bridge learned for this customer, e.g. from Checkout.
                    return [ForgetVisitor(anonymous_id=anonymous_id)] if anonymous_id else []
            return []

        return [*prefix, *mapped()]

    @staticmethod
    def _identify(user_id: str | None, anonymous_id: str | None) -> list[Output]:
        if not user_id:
            return []
        return [Identify(user_id=user_id, anonymous_id=anonymous_id)]


def _subscription_details(obj: StripeObject) -> SubscriptionDetails | None:
    """An invoice's subscription and that subscription's metadata: under `parent` from API
    version 2025-03-31, else the older top-level fields."""
    newer = obj.parent.subscription_details if obj.parent else None
    if newer is not None and (newer.subscription or newer.metadata):
        return newer
    if obj.subscription or obj.subscription_details:
        older = obj.subscription_details or SubscriptionDetails()
        return SubscriptionDetails(subscription=obj.subscription, metadata=older.metadata)
    return newer


def _require_invoice_field(event: Event, obj: StripeObject) -> None:
    """A payment intent counted as a purchase must be able to say it pays no invoice (else
    the invoice's payment counts twice). From 2025-03-31 it has no `invoice` field at all:
    that delivery is quarantined, saying why, rather than counted or dropped unseen."""
    newer = event.api_version is not None and event.api_version >= BASIL
    if newer or isinstance(obj.invoice, UnsetType):
        version = event.api_version or "without an invoice field"
        raise PayloadInvalid(
            f"payment_intent.succeeded of API version {version} does not say whether it "
            "pays an invoice (payment intents no longer name theirs from 2025-03-31): "
            "purchases_from_payment_intents needs an endpoint on an older version"
        )


def _refunded_now(obj: StripeObject, previous: Mapping[str, Any] | None) -> int:
    """What this event refunded: the change in amount_refunded, else the newest refund.
    Never the cumulative total: after a partial refund that would count it twice."""
    total = obj.amount_refunded or 0
    if previous and isinstance(previous.get("amount_refunded"), int):
        return total - int(previous["amount_refunded"])
    if obj.refunds and obj.refunds.data:
        return max(obj.refunds.data, key=lambda r: r.created).amount
    return 0  # nothing says what this event refunded: skip rather than guess


def _plan(obj: StripeObject) -> dict[str, Any]:
    """The subscription's status, and its first item's price, interval, quantity and list
    price per interval (not revenue: the invoices are)."""
    item = obj.items.data[0] if obj.items and obj.items.data else None
    price = (item.price or item.plan) if item else obj.plan
    if price is None:
        return {"status": obj.status}
    quantity = (item.quantity if item else obj.quantity) or 1
    unit = price.unit_amount if price.unit_amount is not None else price.amount
    interval = (price.recurring or {}).get("interval") or price.interval
    found: dict[str, Any] = {
        "status": obj.status,
        "price": price.id,
        "interval": interval,
        "quantity": quantity,
        "currency": price.currency.upper() if price.currency else None,
    }
    if unit is not None:
        found["amount_cents"], found["currency"] = amount_in_minor_units(
            unit * quantity, price.currency
        )
    return found


handler: Final = StripeHandler()
