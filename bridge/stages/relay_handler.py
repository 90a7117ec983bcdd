"""The relay's deliveries as the inbox keeps them, and the handler that translates them.

The relay (`bridge.stages.relay`) checks a request's calls and completes its tracks (an
event_id, a timestamp) before its 202, then appends them as one delivery of source
`relay` whose raw body is those calls re-encoded by msgspec, compact and canonical
(`Relayed`): a track or a batch as the body of a `/v1/batch`, an identify under
`identify`. The translate stage takes that delivery like any other, through the handler
here, whose `translate` gives the stored calls back; the outbox's rules (one event_id
queued once, what is learned about a visitor, erasure) then apply as to a webhook's calls.

The handler is the translate stage's alone (`with_relay`): nothing mounts it at
`/webhooks/relay`, and no configured source may take the name (`bridge.registry`), so
only the relay appends `relay` deliveries. What it stored passed the same Structs, so
translating it cannot fail on its content; should it fail all the same (a bug, a change
of the Structs), the delivery is quarantined and listed like any other, and `outbox
retranslate` takes it again once fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from bridge.errors import PayloadInvalid, SignatureInvalid
from bridge.events import Identify, Output, Track
from bridge.plugin import Sample, SignatureScheme, SourceOptions, WebhookRequest
from bridge.registry import RELAY_SOURCE, Source

__all__ = ["RELAY", "RelayHandler", "Relayed", "encoded", "with_relay"]


class Relayed(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """The raw body of a relay delivery: one request's calls, checked and completed."""

    events: list[Track] = []  # /v1/track (one) or /v1/batch, in the order sent
    identify: Identify | None = None  # /v1/identify


_decoder: Final = msgspec.json.Decoder(Relayed)
_encoder: Final = msgspec.json.Encoder()


def encoded(calls: Relayed) -> bytes:
    return _encoder.encode(calls)


class _Unsigned:
    """Relay deliveries carry no signature: the relay checked the client's key before it
    appended them, and no route takes a `relay` delivery from outside."""

    headers: tuple[str, ...] = ()
    signs_timestamp = False
    signs_body = False

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        raise SignatureInvalid("relay deliveries come through /v1/* only")

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        raise SignatureInvalid("relay deliveries are not signed")


class RelayHandler:
    """The `relay` source's handler: a stored `Relayed` back into its calls."""

    name = RELAY_SOURCE
    secret_variable = "BRIDGE_RELAY_KEYS"  # noqa: S105 (a variable's name, not a secret)
    scheme: SignatureScheme = _Unsigned()
    options_type = SourceOptions
    headers: tuple[str, ...] = ()

    def delivery_id(self, request: WebhookRequest) -> str:
        raise PayloadInvalid("the relay names its deliveries itself")

    def parse(self, request: WebhookRequest) -> Relayed:
        try:
            return _decoder.decode(request.body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise PayloadInvalid(f"not a relay delivery: {error}") from None

    def translate(self, request: WebhookRequest, payload: Any, options: Any) -> list[Output]:
        relayed: Relayed = payload
        calls: list[Output] = list(relayed.events)
        if relayed.identify is not None:
            calls.append(relayed.identify)
        return calls

    def samples(self) -> Mapping[str, Sample]:
        return {}


#: The `relay` source, as the translate stage finds it.
RELAY: Final = Source(
    name=RELAY_SOURCE,
    handler=RelayHandler(),
    secret_variable=RelayHandler.secret_variable,
    secrets=(),
    options=SourceOptions(),
)


def with_relay(sources: Mapping[str, Source]) -> dict[str, Source]:
    """The sources the translate stage reads deliveries of: the configured ones and the
    relay's, whether or not the relay is on now (what it stored before is still sent)."""
    return {**sources, RELAY_SOURCE: RELAY}
