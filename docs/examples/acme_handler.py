"""A complete handler for a made-up provider, "Acme Pay", in one file.

Acme signs each delivery with `X-Acme-Signature: <hex HMAC-SHA256 of the body>` and sends
`{"id": "evt_1", "type": "payment.succeeded", "created": 1700000000,
  "payment": {"id": "pay_1", "amount": 1999, "currency": "eur", "user": "u_1"}}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import msgspec

from bridge import Call, PayloadInvalid, Track
from bridge.plugin import Sample, SourceOptions, WebhookRequest
from bridge.signatures import HmacScheme


class Payment(msgspec.Struct, frozen=True):
    id: str
    amount: int  # minor units, as Acme sends them
    currency: str
    user: str | None = None


class AcmeEvent(msgspec.Struct, frozen=True):  # only the fields we read; others are ignored
    id: str
    type: str
    created: int
    payment: Payment | None = None


class AcmeEventId(msgspec.Struct, frozen=True):  # the delivery id, and nothing else
    id: str


class AcmeOptions(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    count_zero_payments: bool = False  # an option users can set in bridge.toml


_decoder = msgspec.json.Decoder(AcmeEvent)  # built once
_id_decoder = msgspec.json.Decoder(AcmeEventId)

SAMPLE = (
    b'{"id":"evt_1","type":"payment.succeeded","created":1700000000,'
    b'"payment":{"id":"pay_1","amount":1999,"currency":"eur","user":"u_1"}}'
)


class AcmeHandler:
    name = "acme"
    secret_variable = "ACME_WEBHOOK_SECRET"  # noqa: S105 (a variable's name)
    scheme = HmacScheme("x-acme-signature", encoding="hex")
    options_type = AcmeOptions
    # The headers read besides the signature's (a topic, say): none, all is in the body.
    headers: tuple[str, ...] = ()

    def delivery_id(self, request: WebhookRequest) -> str:
        # Read before the 200, without the full parse: a body that parse refuses later is
        # still stored (and quarantined) under its id.
        try:
            return _id_decoder.decode(request.body).id
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"no Acme event id: {error}") from None

    def parse(self, request: WebhookRequest) -> AcmeEvent:
        try:
            return _decoder.decode(request.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not an Acme event: {error}") from None

    def translate(
        self, request: WebhookRequest, payload: AcmeEvent, options: AcmeOptions
    ) -> list[Call]:
        payment = payload.payment
        if payload.type != "payment.succeeded" or payment is None:
            return []  # acknowledged, counted, not forwarded
        if payment.amount == 0 and not options.count_zero_payments:
            return []
        return [
            Track(
                event="purchase",
                event_id=f"purchase:{payment.id}",  # from the payment: overlapping events collapse
                timestamp=datetime.fromtimestamp(payload.created, UTC),
                user_id=payment.user,
                properties={"amount_cents": payment.amount, "currency": payment.currency},
            )
        ]

    def samples(self) -> Mapping[str, Sample]:
        return {"payment.succeeded": Sample(body=SAMPLE)}


handler = AcmeHandler()
