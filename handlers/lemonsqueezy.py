"""Lemon Squeezy: orders, refunds, subscriptions and their renewals.

Lemon Squeezy signs the raw body with the webhook's signing secret (`X-Signature`, hex
HMAC-SHA256) and names the event in the body's `meta.event_name` (and, unsigned, in the
`X-Event-Name` header). Only the signed name is read: Lemon Squeezy always sends it, so a
body without one is refused rather than named by a header anyone could set (a
subscription's body sent as `subscription_cancelled` would end it), and so is a header
naming another event than the body's. Amounts are integer minor units with the order's
`currency`.

Revenue is counted once per payment: a purchase's `event_id` comes from the order (first
payments and one-off sales) or the subscription invoice (renewals), not from the webhook,
and a refund takes its id from the same order or invoice, so revenue nets out. Churn is
counted once per cancellation: each cancellation is named by when it happened, and the
expiry that follows one adds nothing; an expiry without one (failed dunning) is churn.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, Final

import msgspec

from bridge import Alias, Output, PayloadInvalid, Track
from bridge.money import exponent
from bridge.plugin import Sample, SourceOptions, WebhookRequest
from bridge.signatures import HmacScheme

__all__ = ["LemonSqueezyHandler", "LemonSqueezyOptions", "handler"]

ZonedTime = Annotated[datetime, msgspec.Meta(tz=True)]


class LemonSqueezyOptions(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Lemon Squeezy marks test-mode events; `include_test_events` forwards them too."""


class Meta(msgspec.Struct, frozen=True):
    event_name: str | None = None
    test_mode: bool | None = None
    webhook_id: str | None = None
    custom_data: dict[str, Any] | None = None


class Data(msgspec.Struct, frozen=True):
    type: str
    id: str | int
    attributes: msgspec.Raw  # decoded only for the events translated


class Event(msgspec.Struct, frozen=True):
    data: Data
    meta: Meta = Meta()


class Item(msgspec.Struct, frozen=True):
    product_id: int | None = None
    variant_id: int | None = None
    price_id: int | None = None
    quantity: int | None = None


class Attributes(msgspec.Struct, frozen=True):
    """An order's, a subscription's or a subscription invoice's attributes (the fields read;
    names, e-mails and card details are in the payload too and left unread)."""

    store_id: int | None = None
    customer_id: int | None = None
    order_id: int | None = None
    subscription_id: int | None = None
    product_id: int | None = None
    variant_id: int | None = None
    status: str | None = None
    cancelled: bool | None = None  # subscriptions: cancelled (by the customer or the store)
    billing_reason: str | None = None
    currency: str | None = None
    total: int | None = None
    refunded: bool | None = None
    refunded_amount: int | None = None
    refunded_at: ZonedTime | None = None
    first_order_item: Item | None = None
    first_subscription_item: Item | None = None
    ends_at: ZonedTime | None = None
    created_at: ZonedTime | None = None
    updated_at: ZonedTime | None = None
    test_mode: bool | None = None


class Versioned(msgspec.Struct, frozen=True):
    """Any object's version, read for the delivery id whatever the event."""

    updated_at: str | None = None
    created_at: str | None = None


class IdMeta(msgspec.Struct, frozen=True):
    event_name: str | None = None
    webhook_id: str | None = None


class IdEvent(msgspec.Struct, frozen=True):
    """What the delivery id is made of, and nothing else: `Event`'s fields that name the
    event and its object (the attributes are read for their version alone)."""

    data: Data
    meta: IdMeta = IdMeta()


_decoder: Final = msgspec.json.Decoder(Event)
_id_decoder: Final = msgspec.json.Decoder(IdEvent)
_attributes_decoder: Final = msgspec.json.Decoder(Attributes)
_versioned_decoder: Final = msgspec.json.Decoder(Versioned)
#: Invoice billing reasons that are payments no order_created counts: renewals and the
#: prorated charge of a plan change. The first payment ("initial") is its order's.
_INVOICE_REVENUE: Final = frozenset({"renewal", "updated"})
#: The events that carry money, and so need its currency.
_MONEY: Final = frozenset(
    {
        "order_created",
        "order_refunded",
        "subscription_payment_success",
        "subscription_payment_refunded",
    }
)
#: The events translated; every other event is acknowledged and ignored unread.
TRANSLATED: Final = frozenset(
    {
        "order_created",
        "order_refunded",
        "subscription_created",
        "subscription_cancelled",
        "subscription_expired",
        "subscription_payment_success",
        "subscription_payment_refunded",
    }
)


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)  # custom data passed at checkout is often a number
    return value if isinstance(value, str) and value else None


def _event_name(payload: Event) -> str:
    # Checked by `parse`: the signed body's name, the only one read.
    return payload.meta.event_name or ""


class LemonSqueezyHandler:
    name = "lemonsqueezy"
    secret_variable = "LEMONSQUEEZY_WEBHOOK_SECRET"  # noqa: S105 (a variable's name)
    scheme = HmacScheme("x-signature", encoding="hex")
    options_type = LemonSqueezyOptions
    # Only checked against the body's event name (`parse`), never read for meaning.
    headers: tuple[str, ...] = ("x-event-name",)

    def delivery_id(self, request: WebhookRequest) -> str:
        """What the event is and the object's version: the same for a resend of it, new
        for the next change to the object. Not every delivery carries `meta.webhook_id`,
        and whether it names the event or the webhook endpoint is not documented, so it
        only adds to the id, never replaces it."""
        try:
            event = _id_decoder.decode(request.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"no Lemon Squeezy object to name the delivery: {error}") from None
        try:
            found = _versioned_decoder.decode(event.data.attributes)
            version = found.updated_at or found.created_at
        except (msgspec.DecodeError, msgspec.ValidationError):
            version = None
        # No version to tell two events about one object apart: the body's own digest.
        version = version or "sha256-" + hashlib.sha256(request.body).hexdigest()
        # No event name (which `parse` refuses) leaves its part empty: the id still names
        # the delivery, so it is stored, and quarantined when translated. The unsigned
        # X-Event-Name, when sent, names the delivery rather than the body's: a copy
        # relabelled by someone else (which `parse` refuses) must not take the id of the
        # genuine delivery, which would then be a duplicate and never translated.
        named = event.meta.event_name or ""
        header = request.headers.get("x-event-name", "").strip()
        if header and header != named:
            named = f"{header}!{named}"
        parts = [named, event.data.type, str(event.data.id), version]
        if event.meta.webhook_id:
            parts.append(event.meta.webhook_id)
        return ":".join(parts)

    def parse(self, request: WebhookRequest) -> Event:
        try:
            event = _decoder.decode(request.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not a Lemon Squeezy event: {error}") from None
        # The event's meaning comes from the signed body alone. Lemon Squeezy always puts
        # the name there; the unsigned header only repeats it, and one that names another
        # event is a body replayed under a name it was not sent with.
        name = _event_name(event)
        if not name:
            raise PayloadInvalid("no event name in meta.event_name")
        header = request.headers.get("x-event-name", "").strip()
        if header and header != name:
            raise PayloadInvalid(f"X-Event-Name is {header} but the body's event is {name}")
        return event

    def translate(
        self, request: WebhookRequest, payload: Event, options: LemonSqueezyOptions
    ) -> list[Output]:
        name = _event_name(payload)
        if name not in TRANSLATED:
            return []
        try:
            attrs = _attributes_decoder.decode(payload.data.attributes)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"unexpected {name} attributes: {error}") from None
        if (payload.meta.test_mode or attrs.test_mode) and not options.include_test_events:
            return []
        object_id = str(payload.data.id)
        custom = payload.meta.custom_data or {}
        # One visitor per customer: the browser's id when the checkout carried it (so web
        # attribution follows the purchase and the renewals), remembered for the customer.
        customer = f"lemonsqueezy:{attrs.customer_id}" if attrs.customer_id is not None else None
        browser = _text(custom.get("millimetric_anonymous_id"))
        prefix: list[Output] = (
            [Alias(alias=customer, anonymous_id=browser)] if browser and customer else []
        )
        # An amount without its currency cannot be added up: skipped, never guessed.
        currency = _currency(attrs.currency) if name in _MONEY else None

        def track(event: str, event_id: str, when: datetime | None, **props: Any) -> Track:
            return Track(
                event=event,
                event_id=event_id,
                timestamp=when or attrs.updated_at or attrs.created_at,
                anonymous_id=browser or customer,
                user_id=_text(custom.get("user_id")),
                properties={k: v for k, v in props.items() if v is not None},
            )

        item = attrs.first_order_item or attrs.first_subscription_item or Item()
        product = {
            "product_id": attrs.product_id or item.product_id,
            "variant_id": attrs.variant_id or item.variant_id,
        }

        def mapped() -> list[Output]:
            match name:
                case "order_created":
                    if attrs.status != "paid" or not attrs.total or attrs.total <= 0:
                        return []  # pending, failed, or free: no money moved
                    if currency is None:
                        return []
                    return [
                        track(
                            "purchase",
                            f"purchase:lemonsqueezy:order:{object_id}",
                            attrs.created_at,
                            amount_cents=attrs.total,
                            currency=currency,
                            order=object_id,
                            store_id=attrs.store_id,
                            **product,
                        )
                    ]
                case "order_refunded":
                    amount = _refunded(attrs)
                    if amount <= 0 or currency is None:
                        return []
                    return [
                        track(
                            "refund",
                            # Lemon Squeezy reports only the running total refunded, so the
                            # order's first refund event counts and a later one collapses
                            # into it: never subtracted twice (see docs: partial refunds).
                            f"refund:lemonsqueezy:order:{object_id}",
                            attrs.refunded_at,
                            amount_cents=amount,
                            currency=currency,
                            order=object_id,
                            fully_refunded=attrs.total is not None and amount >= attrs.total,
                        )
                    ]
                case "subscription_payment_success":
                    if attrs.status != "paid" or attrs.billing_reason not in _INVOICE_REVENUE:
                        return []
                    if not attrs.total or attrs.total <= 0 or currency is None:
                        return []
                    return [
                        track(
                            "purchase",
                            f"purchase:lemonsqueezy:invoice:{object_id}",
                            attrs.created_at,
                            amount_cents=attrs.total,
                            currency=currency,
                            invoice=object_id,
                            subscription=_text(attrs.subscription_id),
                            billing_reason=attrs.billing_reason,
                        )
                    ]
                case "subscription_payment_refunded":
                    # A renewal's refund, named by its invoice like the renewal's purchase.
                    # The first payment's refund is its order's (order_refunded), as its
                    # purchase is.
                    if attrs.billing_reason not in _INVOICE_REVENUE:
                        return []
                    amount = _refunded(attrs)
                    if amount <= 0 or currency is None:
                        return []
                    return [
                        track(
                            "refund",
                            # As for orders: the invoice's first refund event counts, and a
                            # later one (a running total) collapses into it.
                            f"refund:lemonsqueezy:invoice:{object_id}",
                            attrs.refunded_at,
                            amount_cents=amount,
                            currency=currency,
                            invoice=object_id,
                            subscription=_text(attrs.subscription_id),
                            billing_reason=attrs.billing_reason,
                            fully_refunded=attrs.total is not None and amount >= attrs.total,
                        )
                    ]
                case "subscription_created":
                    return [
                        track(
                            "subscription_started",
                            f"subscription_started:lemonsqueezy:{object_id}",
                            attrs.created_at,
                            subscription=object_id,
                            order=_text(attrs.order_id),
                            status=attrs.status,
                            quantity=item.quantity,
                            **product,
                        )
                    ]
                case "subscription_cancelled" | "subscription_expired":
                    if name == "subscription_expired" and attrs.cancelled:
                        return []  # the end of a cancellation already counted
                    # One churn per cancellation: named by when it happened (a resumed
                    # subscription cancelled again is another), the same on a resend.
                    moment = attrs.updated_at or attrs.ends_at
                    when = f":{moment.astimezone(UTC):%Y%m%dT%H%M%SZ}" if moment else ""
                    return [
                        track(
                            "subscription_canceled",
                            f"subscription_canceled:lemonsqueezy:{object_id}{when}",
                            attrs.updated_at,
                            subscription=object_id,
                            order=_text(attrs.order_id),
                            status=attrs.status,
                            quantity=item.quantity,
                            ends_at=attrs.ends_at.isoformat() if attrs.ends_at else None,
                            **product,
                        )
                    ]
            return []

        return [*prefix, *mapped()]

    def samples(self) -> Mapping[str, Sample]:
        folder = resources.files("handlers").joinpath("samples", "lemonsqueezy")
        samples: dict[str, Sample] = {}
        for f in folder.iterdir():
            if f.name.endswith(".json"):
                event = f.name.removesuffix(".json")
                samples[event] = Sample(body=f.read_bytes(), headers={"x-event-name": event})
        return samples

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: a fresh object id and time, so it
        is neither a redelivery nor the same order again."""
        event = msgspec.json.decode(sample.body)
        now = datetime.fromtimestamp(time.time(), UTC).isoformat().replace("+00:00", "Z")
        event["data"]["id"] = str(uuid.uuid4().int % 10**9)
        event["data"]["attributes"].update(created_at=now, updated_at=now)
        if "webhook_id" in event.get("meta", {}):
            event["meta"]["webhook_id"] = str(uuid.uuid4())
        return Sample(body=msgspec.json.encode(event), headers=sample.headers)


def _currency(code: str | None) -> str | None:
    """The ISO 4217 code, upper-case; None when there is none, PayloadInvalid when it is
    not three letters."""
    if not code:
        return None
    exponent(code)  # refuses anything that is not a currency code
    return code.upper()


def _refunded(attrs: Attributes) -> int:
    """What the order has had refunded: `refunded_amount` where Lemon Squeezy sends it;
    older payloads only say `refunded`, and then the whole total was. Otherwise 0: an
    event that says neither is skipped rather than guessed."""
    if attrs.refunded_amount is not None:
        return attrs.refunded_amount
    if (attrs.refunded or attrs.status == "refunded") and attrs.total:
        return attrs.total
    return 0


handler: Final = LemonSqueezyHandler()
