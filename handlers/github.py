"""GitHub: Sponsors and Marketplace purchases.

GitHub signs the raw body with the webhook's secret (`X-Hub-Signature-256: sha256=<hex>`),
names the event in `X-GitHub-Event`, and gives each event a GUID in `X-GitHub-Delivery`
that a redelivery keeps, so that GUID is both the delivery id and the purchase's event_id.

GitHub's webhooks say what a tier or plan costs, not what was charged (GitHub prorates to
the payer's billing date and may bill yearly): `amount_cents` is the list price of what was
bought, in US cents, GitHub's only currency.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

import msgspec

from bridge import Output, PayloadInvalid, Track
from bridge.plugin import Sample, SourceOptions, WebhookRequest
from bridge.signatures import HmacScheme

__all__ = ["GitHubDelivery", "GitHubHandler", "GitHubOptions", "handler"]

ZonedTime = Annotated[datetime, msgspec.Meta(tz=True)]


class GitHubOptions(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """GitHub has no test mode and this handler no options beyond every source's."""


class Account(msgspec.Struct, frozen=True):
    id: int | None = None
    type: str | None = None  # "User" or "Organization"


class Tier(msgspec.Struct, frozen=True):
    node_id: str | None = None
    name: str | None = None
    monthly_price_in_cents: int | None = None
    is_one_time: bool = False
    is_custom_amount: bool | None = None


class Sponsorship(msgspec.Struct, frozen=True):
    node_id: str | None = None
    created_at: ZonedTime | None = None
    sponsor: Account | None = None
    tier: Tier | None = None
    privacy_level: str | None = None


class SponsorshipEvent(msgspec.Struct, frozen=True):
    action: str
    sponsorship: Sponsorship


class Plan(msgspec.Struct, frozen=True):
    id: int | None = None
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
    action: str | None = None


class GitHubDelivery(msgspec.Struct, frozen=True):
    """The event name and GUID from the headers, and the JSON payload (undecoded)."""

    event: str
    delivery: str
    payload: bytes


_envelope_decoder: Final = msgspec.json.Decoder(Envelope)
_sponsorship_decoder: Final = msgspec.json.Decoder(SponsorshipEvent)
_marketplace_decoder: Final = msgspec.json.Decoder(MarketplacePurchaseEvent)

#: The events translated; every other event (ping included) is acknowledged and ignored.
TRANSLATED: Final = frozenset({"sponsorship", "marketplace_purchase"})


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

    def parse(self, request: WebhookRequest) -> GitHubDelivery:
        event = request.headers.get("x-github-event", "").strip()
        delivery = request.headers.get("x-github-delivery", "").strip()
        if not event:
            raise PayloadInvalid("missing X-GitHub-Event header")
        # The GUID becomes `purchase:github:<guid>`; the cap keeps that a valid event_id.
        if not delivery or len(delivery) > 100:
            raise PayloadInvalid("missing or malformed X-GitHub-Delivery header")
        payload = _json_payload(request)
        try:
            _envelope_decoder.decode(payload)  # an object, whatever the event: else 400
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not a GitHub event: {error}") from None
        return GitHubDelivery(event=event, delivery=delivery, payload=payload)

    def delivery_id(self, request: WebhookRequest, payload: GitHubDelivery) -> str:
        return payload.delivery

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
        """A new delivery from a sample, for `send-test`: a fresh GUID, which is also what
        the purchase's event_id comes from."""
        return Sample(
            body=sample.body, headers={**sample.headers, "x-github-delivery": str(uuid.uuid4())}
        )


def _track(
    payload: GitHubDelivery, when: datetime | None, account: Account | None, **properties: Any
) -> Track:
    return Track(
        event="purchase",
        event_id=f"purchase:github:{payload.delivery}",  # redeliveries keep the GUID
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
    return [
        _track(
            payload,
            event.sponsorship.created_at,
            event.sponsorship.sponsor,
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
    return [
        _track(
            payload,
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
