"""GitHub: Sponsors and Marketplace purchases.

GitHub signs the raw body with the webhook's secret (`X-Hub-Signature-256: sha256=<hex>`),
names the event in `X-GitHub-Event`, and gives each event a GUID in `X-GitHub-Delivery`
that a redelivery keeps. Neither header is signed, so neither decides what is counted:

- the GUID is the delivery id (it only recognises redeliveries), while a purchase's
  `event_id` comes from the signed body (the sponsorship and when it was created, or the
  account, plan and effective date of a Marketplace purchase), so the same body sent again
  under a fresh GUID is the same purchase;
- a translated event's body carries its own object (`sponsorship`, `marketplace_purchase`),
  and the event header must name that object: a body under another event is refused.

GitHub's webhooks say what a tier or plan costs, not what was charged (GitHub prorates to
the payer's billing date and may bill yearly): `amount_cents` is the list price of what was
bought, in US cents, GitHub's only currency.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

import msgspec

from bridge import Output, PayloadInvalid, Track
from bridge.plugin import Sample, SourceOptions, WebhookRequest
from bridge.signatures import HmacScheme

__all__ = ["GitHubDelivery", "GitHubHandler", "GitHubOptions", "handler"]

ZonedTime = Annotated[datetime, msgspec.Meta(tz=True)]
# Bounds that keep the event ids built from these within the 128 characters allowed.
Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class GitHubOptions(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """GitHub has no test mode and this handler no options beyond every source's."""


class Account(msgspec.Struct, frozen=True):
    id: Id | None = None
    type: str | None = None  # "User" or "Organization"


class Tier(msgspec.Struct, frozen=True):
    node_id: str | None = None
    name: str | None = None
    monthly_price_in_cents: int | None = None
    is_one_time: bool = False
    is_custom_amount: bool | None = None


class Sponsorship(msgspec.Struct, frozen=True):
    node_id: NodeId | None = None
    created_at: ZonedTime | None = None
    sponsor: Account | None = None
    tier: Tier | None = None
    privacy_level: str | None = None


class SponsorshipEvent(msgspec.Struct, frozen=True):
    action: str
    sponsorship: Sponsorship


class Plan(msgspec.Struct, frozen=True):
    id: Id | None = None
    name: str | None = None
    monthly_price_in_cents: int | None = None
    yearly_price_in_cents: int | None = None
    price_model: str | None = None  # "flat-rate", "per-unit" or "free" (or FLAT_RATE ...)
    unit_name: str | None = None


class MarketplacePurchase(msgspec.Struct, frozen=True):
    account: Account | None = None
    billing_cycle: str | None = None  # "monthly" or "yearly"
    unit_count: int | None = None
    on_free_trial: bool | None = None
    plan: Plan | None = None


class MarketplacePurchaseEvent(msgspec.Struct, frozen=True):
    action: str
    marketplace_purchase: MarketplacePurchase
    effective_date: ZonedTime | None = None


class Envelope(msgspec.Struct, frozen=True):
    """What any event's payload is read for first: that it is an object, and which of the
    translated events' objects it carries (an absent one is an empty Raw)."""

    action: str | None = None
    sponsorship: msgspec.Raw = msgspec.Raw()
    marketplace_purchase: msgspec.Raw = msgspec.Raw()


class GitHubDelivery(msgspec.Struct, frozen=True):
    """The event name and GUID from the headers (the event checked against the body), and
    the JSON payload (undecoded)."""

    event: str
    delivery: str
    payload: bytes


_envelope_decoder: Final = msgspec.json.Decoder(Envelope)
_sponsorship_decoder: Final = msgspec.json.Decoder(SponsorshipEvent)
_marketplace_decoder: Final = msgspec.json.Decoder(MarketplacePurchaseEvent)

#: The events translated; every other event (ping included) is acknowledged and ignored.
TRANSLATED: Final = frozenset({"sponsorship", "marketplace_purchase"})


def _guid(request: WebhookRequest) -> str:
    """The delivery's GUID (`X-GitHub-Delivery`), the same on every redelivery."""
    delivery = request.headers.get("x-github-delivery", "").strip()
    # A GUID is 36 characters: the cap keeps an unsigned header from making a huge id.
    if not delivery or len(delivery) > 100:
        raise PayloadInvalid("missing or malformed X-GitHub-Delivery header")
    return delivery


def _json_payload(request: WebhookRequest) -> bytes:
    """The JSON payload: the body, or its `payload` field when the webhook was set up with
    the form content type (the signature covers the body either way)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return request.body
    try:
        fields = parse_qs(request.body.decode("utf-8"), strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise PayloadInvalid("form body is not readable") from None
    if len(fields.get("payload", [])) != 1:
        raise PayloadInvalid("form body has no single payload field")
    return fields["payload"][0].encode("utf-8")


class GitHubHandler:
    name = "github"
    secret_variable = "GITHUB_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)
    scheme = HmacScheme("x-hub-signature-256", encoding="hex", prefix="sha256=")
    options_type = GitHubOptions
    # `content-type` says whether the body is JSON or a form (`_json_payload`).
    headers: tuple[str, ...] = ("x-github-event", "x-github-delivery", "content-type")

    def delivery_id(self, request: WebhookRequest) -> str:
        return _guid(request)

    def parse(self, request: WebhookRequest) -> GitHubDelivery:
        event = request.headers.get("x-github-event", "").strip()
        if not event:
            raise PayloadInvalid("missing X-GitHub-Event header")
        delivery = _guid(request)
        payload = _json_payload(request)
        try:
            envelope = _envelope_decoder.decode(payload)  # an object, whatever the event
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not a GitHub event: {error}") from None
        # The event header is not signed: the object the signed body carries says which
        # translated event it is, and the header must agree (a sponsorship body sent as a
        # marketplace_purchase, or as a ping to hide it, is refused).
        carried = sorted(name for name in TRANSLATED if len(getattr(envelope, name)))
        if len(carried) > 1:
            raise PayloadInvalid("the body carries both a sponsorship and a marketplace_purchase")
        if (carried or event in TRANSLATED) and carried != [event]:
            found = f"a {carried[0]}" if carried else f"no {event}"
            raise PayloadInvalid(f"X-GitHub-Event is {event} but the body carries {found}")
        return GitHubDelivery(event=event, delivery=delivery, payload=payload)

    def translate(
        self, request: WebhookRequest, payload: GitHubDelivery, options: GitHubOptions
    ) -> list[Output]:
        if payload.event not in TRANSLATED:
            return []  # ping, and everything else GitHub may send
        try:
            if payload.event == "sponsorship":
                return _sponsorship(payload, _sponsorship_decoder.decode(payload.payload))
            return _marketplace(payload, _marketplace_decoder.decode(payload.payload))
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"unexpected {payload.event} payload: {error}") from None

    def samples(self) -> Mapping[str, Sample]:
        folder = resources.files("handlers").joinpath("samples", "github")
        samples: dict[str, Sample] = {}
        for f in folder.iterdir():
            if not f.name.endswith(".json"):
                continue
            event = f.name.removesuffix(".json")
            # A fixed GUID per sample: sending one twice is a redelivery, as at GitHub.
            guid = uuid.uuid5(uuid.NAMESPACE_URL, f"millimetric-bridge:github:{event}")
            headers = {"x-github-event": event, "x-github-delivery": str(guid)}
            samples[event] = Sample(body=f.read_bytes(), headers=headers)
        return samples

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: a fresh GUID, and a purchase made
        now (a new sponsorship, a Marketplace purchase effective now), since the event_id
        comes from the body."""
        headers = {**sample.headers, "x-github-delivery": str(uuid.uuid4())}
        event = msgspec.json.decode(sample.body)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        if isinstance(event.get("sponsorship"), dict):
            event["sponsorship"].update(node_id=f"S_test_{uuid.uuid4().hex[:16]}", created_at=now)
        elif isinstance(event.get("marketplace_purchase"), dict):
            event["effective_date"] = now
        else:
            return Sample(body=sample.body, headers=headers)
        return Sample(body=msgspec.json.encode(event), headers=headers)


def _event_id(payload: GitHubDelivery, *parts: object) -> str:
    """The purchase's event_id, from what identifies it in the signed body: never the
    GUID, which is an unsigned header (a captured body re-sent under a fresh GUID would
    count again). A body without those parts is named by its SHA-256, the same for every
    copy of it."""
    if parts and all(part is not None for part in parts):
        return "purchase:github:" + ":".join(map(str, parts))
    return "purchase:github:sha256:" + hashlib.sha256(payload.payload).hexdigest()[:32]


def _epoch(moment: datetime | None) -> int | None:
    # Whole seconds since the epoch: the same instant whatever offset the body wrote.
    return None if moment is None else int(moment.timestamp())


def _track(
    event_id: str, when: datetime | None, account: Account | None, **properties: Any
) -> Track:
    return Track(
        event="purchase",
        event_id=event_id,
        timestamp=when,
        # One visitor per GitHub account, by its numeric id (logins can be renamed);
        # no logins or e-mails, and private sponsors stay private.
        anonymous_id=f"github:{account.id}" if account and account.id is not None else None,
        properties={k: v for k, v in properties.items() if v is not None},
    )


def _sponsorship(payload: GitHubDelivery, event: SponsorshipEvent) -> list[Output]:
    # Only a new sponsorship is a purchase. GitHub sends no event per monthly charge, and
    # a tier change says nothing of what (prorated) amount it charged, so it is not guessed.
    tier = event.sponsorship.tier
    if event.action != "created" or tier is None:
        return []
    amount = tier.monthly_price_in_cents
    if amount is None or amount <= 0:
        return []
    sponsorship = event.sponsorship
    # One sponsorship is created once: its node id and creation time name the purchase.
    event_id = _event_id(
        payload, "sponsorship", sponsorship.node_id, _epoch(sponsorship.created_at)
    )
    return [
        _track(
            event_id,
            sponsorship.created_at,
            sponsorship.sponsor,
            amount_cents=amount,
            currency="USD",
            product="github_sponsors",
            sponsorship=event.sponsorship.node_id,
            tier=tier.name,
            tier_id=tier.node_id,
            one_time=tier.is_one_time,
            interval=None if tier.is_one_time else "month",
        )
    ]


def _marketplace(payload: GitHubDelivery, event: MarketplacePurchaseEvent) -> list[Output]:
    purchase = event.marketplace_purchase
    plan = purchase.plan
    # A free trial charges nothing now, and GitHub sends no event when it converts, so a
    # trial is not counted as revenue; plan changes and cancellations are ignored too.
    if event.action != "purchased" or plan is None or purchase.on_free_trial:
        return []
    cycle = (purchase.billing_cycle or "").lower()
    prices = {"monthly": plan.monthly_price_in_cents, "yearly": plan.yearly_price_in_cents}
    price = prices.get(cycle)
    model = (plan.price_model or "").lower().replace("_", "-")
    if price is None or model == "free":
        return []  # an unknown billing cycle: skipped rather than guessed
    units = purchase.unit_count or 1
    amount = price * units if model == "per-unit" else price
    if amount <= 0:
        return []
    # Marketplace purchases have no id of their own: the account buying the plan, and the
    # date the purchase took effect, name it (a later purchase of the plan has its own).
    account = purchase.account.id if purchase.account else None
    event_id = _event_id(payload, "marketplace", account, plan.id, _epoch(event.effective_date))
    return [
        _track(
            event_id,
            event.effective_date,
            purchase.account,
            amount_cents=amount,
            currency="USD",
            product="github_marketplace",
            plan=plan.name,
            plan_id=plan.id,
            billing_cycle=cycle,
            unit_count=purchase.unit_count if model == "per-unit" else None,
            account_type=purchase.account.type if purchase.account else None,
        )
    ]


handler: Final = GitHubHandler()
