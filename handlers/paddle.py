"""Paddle Billing: purchases, refunds and subscriptions.

Paddle sends money as integer strings in the currency's minor unit ("65215" is USD
652.15; JPY has no minor unit, so "1200" is 1200 yen): they are read as integers, exactly,
and never pass through a float. Revenue is counted once per transaction: the purchase's
`event_id` is the transaction's id, whichever notification destination or retry brought it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, Final

import msgspec

from bridge import Alias, Identify, Output, PayloadInvalid, SignatureInvalid, Track
from bridge.money import exponent
from bridge.plugin import (
    ApiAccess,
    ListedEvent,
    Sample,
    SignatureScheme,
    SourceOptions,
    WebhookRequest,
)
from handlers import paddle_events

__all__ = ["PaddleHandler", "PaddleScheme", "handler"]

_MAX_TIMESTAMP_DIGITS: Final = 12  # far beyond any real time; keeps int() cheap on garbage
_AMOUNT: Final = re.compile(r"-?[0-9]{1,30}")  # not str.isdigit(), which accepts "²"


class PaddleScheme:
    """`Paddle-Signature: ts=<unix>;h1=<hex>`: the hex HMAC-SHA256 of `{ts}:{raw body}`
    keyed with the notification destination's secret key (`pdl_ntfset_...`, used as is).
    While a secret key is rotated Paddle sends one `h1` per key.

    Paddle's SDKs allow five seconds of drift; the source's `tolerance` is used instead, so
    a delivery held up by a proxy or a retry queue is not refused. `clock` is for tests."""

    headers: tuple[str, ...] = ("paddle-signature",)
    signs_timestamp: bool = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        header = request.headers.get("paddle-signature", "").strip()
        if not header:
            raise SignatureInvalid("missing Paddle-Signature header")
        if not header.isascii():  # a forged header: real ones are ASCII
            raise SignatureInvalid("malformed Paddle-Signature header")
        stamps: list[str] = []
        given: list[bytes] = []
        for part in header.split(";"):
            key, _, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if key == "ts":
                stamps.append(value)
            elif key == "h1" and value:
                given.append(value.lower().encode())
        if len(stamps) != 1:
            raise SignatureInvalid("malformed Paddle-Signature header: one ts expected")
        timestamp = stamps[0]
        if not (timestamp.isdigit() and len(timestamp) <= _MAX_TIMESTAMP_DIGITS):
            raise SignatureInvalid("malformed Paddle-Signature header: ts is not a time")
        # Stale and future times are both refused, so a captured delivery cannot be
        # replayed later, nor a signature be made to stay valid for longer.
        if abs(self._clock() - int(timestamp)) > tolerance:
            raise SignatureInvalid(f"timestamp outside the {tolerance}s tolerance")
        if not given:
            raise SignatureInvalid("no h1 signature in the Paddle-Signature header")
        matched = False
        # Every secret against every h1, without stopping early, so the time taken does
        # not tell which secret or which entry matched.
        for secret in secrets:
            expected = _signature(request.body, secret, timestamp).encode()
            for signature in given:
                matched |= hmac.compare_digest(expected, signature)
        if not matched:
            raise SignatureInvalid("no valid Paddle signature for any configured secret")

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        return {
            "paddle-signature": f"ts={timestamp};h1={_signature(body, secret, str(timestamp))}",
            "content-type": "application/json",
        }


def _signature(body: bytes, secret: str, timestamp: str) -> str:
    return hmac.new(secret.encode(), f"{timestamp}:".encode() + body, hashlib.sha256).hexdigest()


class Totals(msgspec.Struct, frozen=True):
    total: str | None = None
    grand_total: str | None = None  # transactions: the total less credit, what was charged
    currency_code: str | None = None


class Details(msgspec.Struct, frozen=True):
    totals: Totals | None = None


class UnitPrice(msgspec.Struct, frozen=True):
    amount: str | None = None
    currency_code: str | None = None


class BillingCycle(msgspec.Struct, frozen=True):
    interval: str | None = None
    frequency: int | None = None


class Price(msgspec.Struct, frozen=True):
    id: str | None = None
    unit_price: UnitPrice | None = None
    billing_cycle: BillingCycle | None = None


class Item(msgspec.Struct, frozen=True):
    price: Price | None = None
    quantity: int | None = None


class Entity(msgspec.Struct, frozen=True):
    """The fields read from a transaction, a subscription or an adjustment (`data`)."""

    id: str
    status: str | None = None
    origin: str | None = None  # transactions: web, subscription_recurring, ...
    action: str | None = None  # adjustments: refund, credit, chargeback, ...
    type: str | None = None  # adjustments: full or partial
    customer_id: str | None = None
    subscription_id: str | None = None
    transaction_id: str | None = None
    currency_code: str | None = None
    custom_data: dict[str, Any] | None = None
    details: Details | None = None  # transactions
    totals: Totals | None = None  # adjustments
    items: list[Item] | None = None
    billing_cycle: BillingCycle | None = None  # subscriptions


class Notification(msgspec.Struct, frozen=True):
    event_id: str
    event_type: str
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)]
    data: msgspec.Raw  # decoded only for the event types translated
    notification_id: str | None = None  # one per destination; event_id is the event's


class NotificationId(msgspec.Struct, frozen=True):
    """Only the event's id: the delivery id, read without decoding the rest."""

    event_id: str


_decoder: Final = msgspec.json.Decoder(Notification)
_id_decoder: Final = msgspec.json.Decoder(NotificationId)
_entity_decoder: Final = msgspec.json.Decoder(Entity)
#: The event types translated; every other type is acknowledged and ignored unread.
TRANSLATED: Final = frozenset(
    {
        "transaction.completed",
        "subscription.created",
        "subscription.canceled",
        "adjustment.created",
        "adjustment.updated",
    }
)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _user_id(value: Any) -> str | None:
    # custom_data is whatever the integration passed to checkout; numeric user ids are
    # common there, so they are accepted as their decimal text.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def _minor(value: str, field: str) -> int:
    if not _AMOUNT.fullmatch(value):
        raise PayloadInvalid(f"{field} is not an integer amount in minor units")
    return int(value)


class PaddleHandler:
    name = "paddle"
    secret_variable = "PADDLE_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)
    # Typed as the protocol's members, so the handler type-checks as a `Handler`.
    scheme: SignatureScheme = PaddleScheme()
    options_type: type[SourceOptions] = SourceOptions
    headers: tuple[str, ...] = ()  # everything read is in the signed body
    # Backfill and reconcile, from Paddle's event stream (`bridge.plugin.EventLister`).
    api_key_variable = "PADDLE_API_KEY"
    api_base_variable = "PADDLE_API_BASE"

    def check_api_key(self, access: ApiAccess) -> str:
        return paddle_events.check_api_key(access)

    def list_events(
        self, access: ApiAccess, since: float, until: float, after: ListedEvent | None
    ) -> AsyncIterator[ListedEvent]:
        """The events of the types translated, as Paddle's `GET /events` lists them."""
        return paddle_events.list_events(access, TRANSLATED, since, until, after)

    def delivery_id(self, request: WebhookRequest) -> str:
        # The event's id, not `notification_id`: that one differs per destination, so
        # the same event sent to a second destination would not be recognised.
        try:
            return _id_decoder.decode(request.body).event_id
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"no Paddle event_id: {error}") from None

    def parse(self, request: WebhookRequest) -> Notification:
        try:
            return _decoder.decode(request.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not a Paddle notification: {error}") from None

    def samples(self) -> Mapping[str, Sample]:
        folder = resources.files("handlers").joinpath("samples", "paddle")
        return {
            f.name.removesuffix(".json"): Sample(body=f.read_bytes())
            for f in folder.iterdir()
            if f.name.endswith(".json")
        }

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: new event and entity ids and the
        current time, so it is not recognised as a redelivery and shows at the sink."""
        event = msgspec.json.decode(sample.body)
        token = uuid.uuid4().hex[:16]
        event["event_id"] = f"evt_test_{token}"
        event["occurred_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        data = event.get("data") or {}
        if isinstance(data.get("id"), str):
            data["id"] = f"{data['id'].split('_')[0]}_test_{token}"
        return Sample(body=msgspec.json.encode(event), headers=sample.headers)

    def translate(
        self, request: WebhookRequest, payload: Notification, options: SourceOptions
    ) -> list[Output]:
        # Paddle marks no event as a test: the sandbox is a separate account with its own
        # secret key, so it belongs in its own source.
        if payload.event_type not in TRANSLATED:
            return []
        try:
            entity = _entity_decoder.decode(payload.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"unexpected {payload.event_type} data: {error}") from None
        custom = entity.custom_data or {}
        # One visitor per customer: the browser's id when checkout's customData carried it
        # (so web attribution follows the purchase), remembered for the customer's later
        # events, which do not carry it (renewals, refunds).
        customer_key = f"paddle:{entity.customer_id}" if entity.customer_id else None
        browser = _text(custom.get("millimetric_anonymous_id"))
        anonymous_id = browser or customer_key
        prefix: list[Output] = (
            [Alias(alias=customer_key, anonymous_id=browser)] if browser and customer_key else []
        )
        user_id = _user_id(custom.get("user_id"))

        def track(event: str, **properties: Any) -> Track:
            return Track(
                event=event,
                event_id=f"{event}:{entity.id}",
                timestamp=payload.occurred_at,
                anonymous_id=anonymous_id,
                user_id=user_id,
                properties={k: v for k, v in properties.items() if v is not None},
            )

        def identify() -> list[Output]:
            return [Identify(user_id=user_id, anonymous_id=anonymous_id)] if user_id else []

        def mapped() -> list[Output]:
            match payload.event_type:
                case "transaction.completed":
                    totals = (entity.details and entity.details.totals) or Totals()
                    amount = totals.grand_total or totals.total
                    currency = totals.currency_code or entity.currency_code
                    if not amount or not currency:
                        return identify()  # nothing says what was paid: skip, never guess
                    exponent(currency)  # PayloadInvalid unless an ISO 4217 code
                    currency = currency.upper()  # ISO 4217 as Paddle sends it; made sure
                    cents = _minor(amount, "data.details.totals.grand_total")
                    if cents <= 0:
                        return identify()  # e.g. a free trial's first transaction
                    return [
                        track(
                            "purchase",
                            amount_cents=cents,
                            currency=currency,
                            transaction=entity.id,
                            subscription=entity.subscription_id,
                            origin=entity.origin,
                        )
                    ]
                case "subscription.created" | "subscription.canceled":
                    started = payload.event_type.endswith("created")
                    name = "subscription_started" if started else "subscription_canceled"
                    return [track(name, subscription=entity.id, **_plan(entity))]
                case "adjustment.created" | "adjustment.updated":
                    # A refund counts once approved; it may be approved at creation or in
                    # a later update, and both share the adjustment's event_id.
                    if entity.action != "refund" or entity.status != "approved":
                        return []
                    totals = entity.totals or Totals()
                    currency = totals.currency_code or entity.currency_code
                    if not totals.total or not currency:
                        return []  # nothing says what was refunded: skip, never guess
                    exponent(currency)  # PayloadInvalid unless an ISO 4217 code
                    currency = currency.upper()
                    cents = _minor(totals.total, "data.totals.total")
                    if cents <= 0:
                        return []
                    return [
                        track(
                            "refund",
                            amount_cents=cents,
                            currency=currency,
                            adjustment=entity.id,
                            transaction=entity.transaction_id,
                            subscription=entity.subscription_id,
                            fully_refunded={"full": True, "partial": False}.get(entity.type or ""),
                        )
                    ]
            return []

        return [*prefix, *mapped()]


def _plan(entity: Entity) -> dict[str, Any]:
    """Price, interval and quantity of the subscription's first item, and what all its
    items cost per billing cycle at list price (before tax and discounts, without any
    country's price override), when every item states its price in the subscription's
    currency. Revenue itself is counted from transactions, never from this."""
    items = entity.items or []
    first = items[0] if items else None
    price = first.price if first else None
    cycle = entity.billing_cycle or (price.billing_cycle if price else None)
    amount: int | None = 0 if items else None
    for item in items:
        unit = item.price.unit_price if item.price else None
        if (
            amount is None
            or unit is None
            or unit.amount is None
            or (unit.currency_code or entity.currency_code) != entity.currency_code
        ):
            amount = None
            continue
        amount += _minor(unit.amount, "unit_price.amount") * (item.quantity or 1)
    return {
        "price": price.id if price else None,
        "interval": cycle.interval if cycle else None,
        "frequency": cycle.frequency if cycle else None,
        "quantity": first.quantity if first else None,
        "items": len(items),
        "amount_cents": amount,
        "currency": entity.currency_code.upper() if entity.currency_code else None,
        "status": entity.status,
    }


handler: Final = PaddleHandler()
