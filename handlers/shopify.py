"""Shopify: orders, refunds, customers and the mandatory privacy topics.

Shopify signs only the body (`X-Shopify-Hmac-Sha256`, base64 HMAC-SHA256 with the app's
client secret); the topic, the shop and the delivery ids come in headers, which anyone
holding one captured delivery can change. So the signed body decides wherever it can:

- every `event_id` and user id is built from ids in the body (the order's, the refund's,
  the customer's, which Shopify allocates globally), so a body replayed under other
  headers still collapses into the event it already counted;
- the body's shape must be the topic's (an order under `orders/*`, a privacy request of
  the right kind under each privacy topic), else the delivery is refused: an order body
  cannot become an erasure, nor a data request a `customers/redact`;
- a purchase needs the body's `financial_status` to say the order was paid, whatever
  the topic says;
- the privacy topics carry `shop_domain` in the body: it is the shop they act on, and
  a header naming another shop is refused.

What a header still decides is listed in docs/handlers.md: which shop an order, refund
or customer body belongs to (those bodies name no shop), and the delivery id.

Revenue is counted once per order: `orders/paid` is the `purchase`, `orders/create` is an
`order_placed` that carries the same total but is not revenue, and both take their
`event_id` from the order, so redeliveries and a second subscription to a topic collapse.
Purchases and refunds are counted in the currency the buyer paid in (the presentment
currency, which on a multi-currency order is not the shop's), so a refund nets out.

Identity: a Shopify customer is a known user of the shop, so every call about one carries
`user_id` `shopify:<shop domain>:<customer id>` (orders, identify, and the forget that
`customers/redact` becomes; calls carrying that user id are what the local purge finds).
The browser's id, when the storefront put `millimetric_anonymous_id` into the cart's
attributes, is the `anonymous_id` of the order, so the bridge links visitor and customer
once and web attribution follows the purchase.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final

import msgspec

from bridge import About, Forget, Identify, Output, PayloadInvalid, Purge, Track
from bridge.money import to_minor_units
from bridge.plugin import Sample, SourceOptions, WebhookRequest
from bridge.signatures import HmacScheme

__all__ = ["ShopifyDelivery", "ShopifyHandler", "handler", "user_id_for"]

# -- the parts of Shopify's payloads that are read; unknown fields are always ignored -------


class Money(msgspec.Struct, frozen=True):
    amount: str  # a decimal string in major units: "404.95"
    currency_code: str


class MoneySet(msgspec.Struct, frozen=True):
    shop_money: Money | None = None
    presentment_money: Money | None = None


class Customer(msgspec.Struct, frozen=True):
    id: int  # a Python int: exact above 2**53, where a float would round
    created_at: datetime | None = None


class NoteAttribute(msgspec.Struct, frozen=True):
    name: str | None = None
    value: Any = None


class Order(msgspec.Struct, frozen=True):
    id: int
    name: str | None = None  # "#1001", what the merchant sees
    test: bool | None = None
    financial_status: str | None = None  # "paid", "pending", "authorized", "voided", ...
    created_at: datetime | None = None
    processed_at: datetime | None = None
    currency: str | None = None  # the shop's currency, that of total_price
    presentment_currency: str | None = None  # the buyer's, that of the payment
    total_price: str | None = None
    total_price_set: MoneySet | None = None
    landing_site: str | None = None
    referring_site: str | None = None
    note_attributes: list[NoteAttribute] | None = None
    customer: Customer | None = None


class Transaction(msgspec.Struct, frozen=True):
    kind: str | None = None
    status: str | None = None
    amount: str | None = None
    currency: str | None = None
    test: bool | None = None


class RefundLineItem(msgspec.Struct, frozen=True):
    subtotal_set: MoneySet | None = None


class RefundShippingLine(msgspec.Struct, frozen=True):
    subtotal_amount_set: MoneySet | None = None


class OrderAdjustment(msgspec.Struct, frozen=True):
    amount_set: MoneySet | None = None


class Refund(msgspec.Struct, frozen=True):
    id: int
    order_id: int | None = None
    created_at: datetime | None = None
    processed_at: datetime | None = None
    transactions: list[Transaction] | None = None
    refund_line_items: list[RefundLineItem] | None = None
    refund_shipping_lines: list[RefundShippingLine] | None = None
    order_adjustments: list[OrderAdjustment] | None = None
    total_duties_set: MoneySet | None = None


class PrivacyCustomer(msgspec.Struct, frozen=True):
    id: int | None = None


class PrivacyRequest(msgspec.Struct, frozen=True):
    """customers/redact, customers/data_request and shop/redact."""

    shop_domain: str | None = None
    customer: PrivacyCustomer | None = None


Body = Order | Refund | Customer | PrivacyRequest


class ShopifyDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """One verified delivery: what the headers say, and the body read for its topic."""

    topic: str
    # The shop's permanent myshopify.com domain, lower-case: the body's `shop_domain` for
    # the privacy topics (the header must agree), the header's for bodies that name none.
    shop: str
    body: Body | None  # None: a topic that is not translated


# Decoders built once, one per shape; a topic not listed is checked to be a JSON object
# and otherwise left unread.
_order: Final = msgspec.json.Decoder(Order)
_customer: Final = msgspec.json.Decoder(Customer)
_privacy: Final = msgspec.json.Decoder(PrivacyRequest)
_DECODERS: Final[Mapping[str, msgspec.json.Decoder[Any]]] = {
    "orders/create": _order,
    "orders/paid": _order,
    "refunds/create": msgspec.json.Decoder(Refund),
    "customers/create": _customer,
    "customers/update": _customer,
    "customers/redact": _privacy,
    "customers/data_request": _privacy,
    "shop/redact": _privacy,
}
# Every body is first read as an object's top-level keys, its values left unparsed: that
# checks it is a JSON object and tells which shape it has.
_keys: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])

#: What each translated topic's body is; `_shape` says what a body is.
_SHAPES: Final[Mapping[str, str]] = {
    "orders/create": "order",
    "orders/paid": "order",
    "refunds/create": "refund",
    "customers/create": "customer",
    "customers/update": "customer",
    "customers/redact": "customers/redact",
    "customers/data_request": "customers/data_request",
    "shop/redact": "shop/redact",
}
#: An order's financial statuses once its payment was taken (a refund after it does not
#: undo the purchase; refunds/create counts the refund). Every other status (pending,
#: authorized, partially_paid, voided, expired) took no payment.
_PAID: Final = frozenset({"paid", "partially_refunded", "refunded"})

#: The recorded samples, by topic; file names cannot hold the topic's "/".
SAMPLE_TOPICS: Final = (
    "orders/create",
    "orders/paid",
    "refunds/create",
    "customers/create",
    "customers/redact",
    "customers/data_request",
    "shop/redact",
)
SAMPLE_SHOP: Final = "example.myshopify.com"

# Cart attributes whose name starts with "_" are hidden from the buyer at checkout, so a
# storefront may well use that form.
_ANONYMOUS_ATTRIBUTES: Final = frozenset({"millimetric_anonymous_id", "_millimetric_anonymous_id"})
_SHOP: Final = re.compile(r"[a-z0-9][a-z0-9.-]{0,254}")
_HEADER_MAX: Final = 255


def user_id_for(shop: str, customer_id: int) -> str:
    """The Millimetric `user_id` of a Shopify customer (storefronts identify with the same
    string to join their visitors to the customer)."""
    return f"{_users_of(shop)}{customer_id}"


def _users_of(shop: str) -> str:
    """What the user id of every customer of `shop` starts with."""
    return f"shopify:{shop}:"


def _header(request: WebhookRequest, name: str) -> str | None:
    value = request.headers.get(name, "").strip()
    if len(value) > _HEADER_MAX:
        raise PayloadInvalid(f"{name} is longer than {_HEADER_MAX} characters")
    return value or None


def _delivery_headers(request: WebhookRequest) -> tuple[str, str, str]:
    """The shop (lower-case), the topic and the event's id, from the headers; each is
    required, and `PayloadInvalid` names the one missing."""
    topic = _header(request, "x-shopify-topic")
    shop = (_header(request, "x-shopify-shop-domain") or "").lower()
    # X-Shopify-Event-Id is shared by the deliveries of one event (retries, and one per
    # subscription to a topic); the webhook id is the older per-delivery id. One merchant
    # action may fire several topics, so the topic is part of the delivery id.
    event = _header(request, "x-shopify-event-id") or _header(request, "x-shopify-webhook-id")
    if topic is None:
        raise PayloadInvalid("missing X-Shopify-Topic header")
    # The shop leads the delivery id, which shop/redact erases by prefix: it must be a
    # domain, so that nothing but the shop stands before the first ":".
    if not _SHOP.fullmatch(shop):
        raise PayloadInvalid("missing or malformed X-Shopify-Shop-Domain header")
    if event is None:
        raise PayloadInvalid("missing X-Shopify-Event-Id and X-Shopify-Webhook-Id headers")
    return shop, topic, event


def _shape(keys: Collection[str]) -> str:
    """Which of Shopify's bodies this is, by the top-level keys each one always has and
    the others never do (Shopify's documented payloads; unknown keys do not matter)."""
    if "shop_domain" in keys:  # only the privacy requests name the shop
        if "data_request" in keys or "orders_requested" in keys:
            return "customers/data_request"
        return "customers/redact" if "customer" in keys else "shop/redact"
    if "refund_line_items" in keys or "order_id" in keys:
        return "refund"
    if "line_items" in keys or "financial_status" in keys:
        return "order"
    return "customer"


def _body_shop(request: PrivacyRequest, header: str) -> str:
    """The shop a privacy request acts on: its signed `shop_domain`, which the unsigned
    header must repeat (else a captured request could redact another shop)."""
    shop = (request.shop_domain or "").strip().lower()
    if not shop:
        raise PayloadInvalid("no shop_domain in the body")
    # The header was checked to be a well-formed domain, so an equal body is one too.
    if shop != header:
        raise PayloadInvalid("X-Shopify-Shop-Domain is not the body's shop_domain")
    return shop


def _utc(moment: datetime | None) -> datetime | None:
    # A time without a zone is no instant: leave it to the server's clock rather than guess.
    if moment is None or moment.utcoffset() is None:
        return None
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # "0001-01-01T00:00:00+01:00" has no UTC instant in a datetime
        raise PayloadInvalid("a time in the body is out of range in UTC") from None


def _text(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


class ShopifyHandler:
    name = "shopify"
    secret_variable = "SHOPIFY_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)
    scheme = HmacScheme("x-shopify-hmac-sha256", encoding="base64")
    options_type = SourceOptions
    headers: tuple[str, ...] = (
        "x-shopify-topic",
        "x-shopify-shop-domain",
        "x-shopify-event-id",
        "x-shopify-webhook-id",
    )

    def delivery_id(self, request: WebhookRequest) -> str:
        # The shop leads the id, so that shop/redact can find every delivery of its shop.
        # A privacy request's shop is its body's `shop_domain`, which `parse` requires the
        # header to repeat: the header's shop is that shop whenever the delivery is read.
        return ":".join(_delivery_headers(request))

    def parse(self, request: WebhookRequest) -> ShopifyDelivery:
        shop, topic, _ = _delivery_headers(request)
        decoder = _DECODERS.get(topic)
        try:
            keys = _keys.decode(request.body).keys()
            # The topic is not signed: a body of another kind under it is refused, so a
            # captured order, data request or customer cannot be replayed as another.
            expected = _SHAPES.get(topic)
            if expected is not None and (found := _shape(keys)) != expected:
                raise PayloadInvalid(f"X-Shopify-Topic is {topic} but the body is a {found}")
            body = decoder.decode(request.body) if decoder else None
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not a Shopify {topic} body: {error}") from None
        if isinstance(body, PrivacyRequest):
            shop = _body_shop(body, shop)
        return ShopifyDelivery(topic=topic, shop=shop, body=body)

    def translate(
        self, request: WebhookRequest, payload: ShopifyDelivery, options: SourceOptions
    ) -> list[Output]:
        topic, shop, body = payload.topic, payload.shop, payload.body
        if isinstance(body, Order):
            # Named whatever the order becomes (an unpaid or test order becomes no call):
            # its raw payload holds the customer's e-mail, name and address, which their
            # customers/redact must reach.
            about = [About(identifier=user_id_for(shop, body.customer.id))] if body.customer else []
            return [*about, *_order_calls(topic, shop, body, options)]
        if isinstance(body, Refund):
            return _refund_calls(shop, body, options)
        if isinstance(body, Customer):  # customers/create, customers/update
            traits: dict[str, Any] = {"shop": shop, "shopify_customer_id": str(body.id)}
            created = _utc(body.created_at)
            if created is not None:
                traits["customer_since"] = created.isoformat()
            return [Identify(user_id=user_id_for(shop, body.id), traits=traits)]
        # The privacy topics' shop is the body's shop_domain (parse refused any other
        # header) and their body's shape is the topic's, so the body decides both.
        if isinstance(body, PrivacyRequest) and topic == "customers/redact":
            customer = body.customer.id if body.customer else None
            return [] if customer is None else [Forget(user_id=user_id_for(shop, customer))]
        if isinstance(body, PrivacyRequest) and topic == "shop/redact":
            # The app was uninstalled 48 hours ago: drop the shop's data.
            return [Purge(deliveries=f"{shop}:", users=_users_of(shop))]
        # customers/data_request: acknowledged; the inbox keeps it and the intake logs it
        # as an ignored delivery, for the operator to answer (a later customers/redact
        # erases it). Every other topic: ignored.
        customer = body.customer.id if isinstance(body, PrivacyRequest) and body.customer else None
        return [] if customer is None else [About(identifier=user_id_for(shop, customer))]

    def samples(self) -> Mapping[str, Sample]:
        folder = resources.files("handlers").joinpath("samples", "shopify")
        return {
            topic: Sample(
                body=folder.joinpath(f"{topic.replace('/', '_')}.json").read_bytes(),
                headers={
                    "x-shopify-topic": topic,
                    "x-shopify-shop-domain": SAMPLE_SHOP,
                    "x-shopify-webhook-id": f"sample-{topic.replace('/', '-')}",
                },
            )
            for topic in SAMPLE_TOPICS
        }

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: a fresh webhook id and, for orders
        and refunds, a fresh id above 2**53 (as real ones are) and the current time."""
        headers = {**sample.headers, "x-shopify-webhook-id": str(uuid.uuid4())}
        if sample.headers.get("x-shopify-topic") not in (
            "orders/create",
            "orders/paid",
            "refunds/create",
        ):
            return Sample(body=sample.body, headers=headers)
        body = msgspec.json.decode(sample.body)
        body["id"] = 2**53 + (uuid.uuid4().int >> 68)
        body["created_at"] = body["processed_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        return Sample(body=msgspec.json.encode(body), headers=headers)


def _order_calls(topic: str, shop: str, order: Order, options: SourceOptions) -> list[Output]:
    if order.test and not options.include_test_events:
        return []
    paid = topic == "orders/paid"
    # The topic is not signed, the body is: an order is a purchase only when its own
    # financial status says the payment was taken, so an unpaid order's body replayed
    # as orders/paid counts nothing. A paid order's body under either order topic is
    # still about that one order, and each event counts it once by its id.
    if paid and order.financial_status not in _PAID:
        return []
    total = _order_total(order)
    if paid and not (total and total[0] > 0):
        return []  # no amount to count (a free order is still an order_placed)
    name = "purchase" if paid else "order_placed"
    # The purchase dates from when Shopify processed the order (the date its own reports
    # use); the order_placed from its creation.
    when = (order.processed_at or order.created_at) if paid else order.created_at
    properties: dict[str, Any] = {"order_id": str(order.id), "order_name": order.name, "shop": shop}
    if total:
        properties["amount_cents"], properties["currency"] = total
    return [
        Track(
            event=name,
            event_id=f"{name}:shopify:{order.id}",
            timestamp=_utc(when),
            anonymous_id=_browser_id(order.note_attributes or ()),
            user_id=user_id_for(shop, order.customer.id) if order.customer else None,
            url=_landing_url(shop, _text(order.landing_site)),
            referrer=_text(order.referring_site),
            properties={k: v for k, v in properties.items() if v is not None},
        )
    ]


def _order_total(order: Order) -> tuple[int, str] | None:
    """The order's total in the currency the buyer paid in (its presentment currency), in
    minor units: the currency its refunds' transactions give money back in, so that a
    refund nets out against its purchase whatever the shop's own currency."""
    sets = order.total_price_set
    if sets is not None and sets.presentment_money is not None:
        money = sets.presentment_money
        return to_minor_units(money.amount, money.currency_code), money.currency_code.upper()
    # Payloads without presentment money (versions without the _set fields): the shop's
    # amount is the buyer's only when the order was in the shop's currency.
    if sets is not None and sets.shop_money is not None:
        amount, currency = sets.shop_money.amount, sets.shop_money.currency_code
    elif order.total_price is not None and order.currency:
        amount, currency = order.total_price, order.currency
    else:
        return None
    paid_in = (order.presentment_currency or currency).upper()
    if paid_in != currency.upper():
        raise PayloadInvalid(
            f"the order's total is given in the shop's {currency.upper()} only, and the "
            f"buyer paid in {paid_in}: its refunds could not net out against it"
        )
    return to_minor_units(amount, currency), currency.upper()


def _refund_calls(shop: str, refund: Refund, options: SourceOptions) -> list[Output]:
    # What the refund's transactions gave back, not what its line items are worth (a
    # merchant may refund less, or more for shipping). Transactions move money in the
    # currency the customer paid in, that of the purchase (`_order_total`): the refund's
    # presentment currency when they omit it.
    fallback = _presentment_currency(refund)
    moved = [
        (t.amount, (t.currency or fallback or "").upper())
        for t in refund.transactions or ()
        if t.kind == "refund"
        and t.status == "success"
        and t.amount is not None
        and (options.include_test_events or not t.test)
    ]
    currencies = {currency for _, currency in moved}
    if len(currencies) != 1 or "" in currencies:
        return []  # nothing moved, or it does not say in which currency: skip, never guess
    (currency,) = currencies
    amount = sum(to_minor_units(value, currency) for value, _ in moved)
    if amount <= 0:
        return []
    properties = {
        "amount_cents": amount,
        "currency": currency,
        "refund_id": str(refund.id),
        "order_id": None if refund.order_id is None else str(refund.order_id),
        "shop": shop,
    }
    return [
        Track(
            event="refund",
            event_id=f"refund:shopify:{refund.id}",
            timestamp=_utc(refund.processed_at or refund.created_at),
            properties={k: v for k, v in properties.items() if v is not None},
        )
    ]


def _presentment_currency(refund: Refund) -> str | None:
    """The currency the buyer paid in, as the refund's own amounts name it."""
    sets = [
        *(item.subtotal_set for item in refund.refund_line_items or ()),
        *(line.subtotal_amount_set for line in refund.refund_shipping_lines or ()),
        *(adjustment.amount_set for adjustment in refund.order_adjustments or ()),
    ]
    for money_set in (*sets, refund.total_duties_set):
        if money_set and money_set.presentment_money:
            return money_set.presentment_money.currency_code
    return None


def _browser_id(attributes: Iterable[NoteAttribute]) -> str | None:
    for attribute in attributes:
        if attribute.name in _ANONYMOUS_ATTRIBUTES and (found := _text(attribute.value)):
            return found
    return None


def _landing_url(shop: str, landing_site: str | None) -> str | None:
    """Shopify's landing_site is the path (and query, with any UTM tags) the visit began
    on; Millimetric's classifier wants an absolute URL."""
    if landing_site is None:
        return None
    if landing_site.startswith(("https://", "http://")):
        return landing_site
    return f"https://{shop}{'' if landing_site.startswith('/') else '/'}{landing_site}"


handler: Final = ShopifyHandler()
