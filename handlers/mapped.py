"""Mapped sources: a provider without code, declared in `bridge.toml`.

    [sources.acme]
    handler = "mapped"
    signature = { scheme = "hmac-sha256", header = "X-Acme-Signature", prefix = "sha256=" }
    delivery_id = "id"
    event_type = "type"

    [sources.acme.on."payment.succeeded"]
    track = "purchase"
    event_id = "join(':', ['purchase', payment.id])"
    amount = "payment.amount"
    amount_units = "major"
    currency = "payment.currency"

`template` is registered as the `mapped` handler. Each source that names it gets a
handler of its own, built once at start-up: the signature scheme is one of the bridge's
own (`HmacScheme`, `StandardWebhooksScheme`, the token check of the Auth0 handler), every
expression is compiled and checked (`bridge.expressions`), and anything that cannot work
stops start-up naming the key. The `on` tables are rules (`handlers.mapped_rules`) that
read values exactly (`handlers.mapped_values`): ids as sent, money by the currency's
exponent, never through a binary float.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from bridge.errors import ConfigError, PayloadInvalid
from bridge.events import Output
from bridge.expressions import ExpressionInvalid, decode, encode, header_name
from bridge.plugin import Handler, Sample, SignatureScheme, SourceOptions, WebhookRequest
from bridge.signatures import HmacScheme
from bridge.standard_webhooks import StandardWebhooksScheme, message_id
from handlers.auth0 import AuthorizationScheme
from handlers.mapped_rules import Rule, Value, compiled_value, rule, toml_key

__all__ = [
    "BearerScheme",
    "MappedHandler",
    "MappedOptions",
    "MappedTemplate",
    "SignatureOptions",
    "template",
]

SCHEMES: Final = ("hmac-sha256", "standard-webhooks", "bearer")
CATCH_ALL: Final = "*"
#: Longest delivery id taken from a body or a header: it is a key of the store.
DELIVERY_ID_MAX: Final = 256


class SignatureOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scheme: str
    header: str | None = None  # hmac-sha256: the header holding the signature
    encoding: str | None = None  # hmac-sha256: "hex" (default) or "base64"
    prefix: str | None = None  # hmac-sha256: before the signature; bearer: "Bearer "


class MappedOptions(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A mapped source's table in `bridge.toml`."""

    signature: SignatureOptions
    delivery_id: str | None = None  # standard-webhooks: the webhook-id header by default
    event_type: str | None = None
    test_event: str | None = None  # true for a test event (ignored unless included)
    samples: str | None = None  # a folder of <event type>.json, beside bridge.toml
    on: dict[str, Any]  # each a table, converted by `rule` to name the event type in errors


class BearerScheme:
    """`Authorization: Bearer <token>`: Auth0's token check (the whole header compared in
    constant time with each configured token) with the scheme word put before each
    token. Nothing signs the body (`signs_body = False`), so nothing of it is kept."""

    headers: tuple[str, ...] = ()
    signs_timestamp = False
    signs_body = False

    def __init__(self, prefix: str = "Bearer ") -> None:
        self.prefix = prefix
        self._token = AuthorizationScheme()

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        tokens = [self.prefix + s.strip() for s in secrets if s.strip()]
        self._token.verify(request, tokens, tolerance)

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        return self._token.sign(body, self.prefix + secret.strip(), timestamp)


def _scheme(options: SignatureOptions) -> SignatureScheme:
    used = {k for k in ("header", "encoding", "prefix") if getattr(options, k) is not None}
    if options.scheme == "hmac-sha256":
        if options.header is None:
            raise ConfigError("signature.header", "hmac-sha256 needs the header it is sent in")
        try:
            header = header_name(options.header)
        except ExpressionInvalid as error:
            raise ConfigError("signature.header", str(error)) from None
        encoding = options.encoding or "hex"
        if encoding not in ("hex", "base64"):
            raise ConfigError("signature.encoding", f"{encoding!r} is neither hex nor base64")
        return HmacScheme(
            header, encoding="hex" if encoding == "hex" else "base64", prefix=options.prefix or ""
        )
    if options.scheme == "standard-webhooks":
        if used:
            raise ConfigError(f"signature.{min(used)}", "standard-webhooks takes no such option")
        return StandardWebhooksScheme()
    if options.scheme == "bearer":
        if used - {"prefix"}:
            raise ConfigError(
                f"signature.{min(used - {'prefix'})}", "bearer reads Authorization only"
            )
        return BearerScheme("Bearer " if options.prefix is None else options.prefix)
    raise ConfigError(
        "signature.scheme", f"unknown scheme {options.scheme!r}: one of {', '.join(SCHEMES)}"
    )


class MappedHandler:
    """One mapped source's handler, built by `template.configure`."""

    name = "mapped"
    options_type: type[SourceOptions] = MappedOptions

    def __init__(
        self,
        *,
        source: str,
        secret_variable: str,
        scheme: SignatureScheme,
        delivery: Value | None,
        event_type: Value | None,
        test_event: Value | None,
        on: Mapping[str, Rule],
        samples: Path | None,
    ) -> None:
        self.source = source
        self.secret_variable = secret_variable
        self.scheme = scheme
        self._delivery = delivery
        self._event_type = event_type
        self._test_event = test_event
        self._on = dict(on)
        self._samples = samples
        read = [delivery, event_type, test_event, *(v for m in on.values() for v in m.values())]
        # The headers `header:` expressions read are kept with each delivery, for
        # translation to read them again from the store.
        self.headers: tuple[str, ...] = tuple(
            dict.fromkeys(v.expression.header for v in read if v and v.expression.header)
        )

    def __repr__(self) -> str:
        return f"MappedHandler({self.source!r})"

    def describe(self) -> str:
        """For `millimetric-bridge handlers`: the event types mapped."""
        return "on: " + ", ".join(sorted(self._on, key=lambda e: (e == CATCH_ALL, e)))

    def delivery_id(self, request: WebhookRequest) -> str:
        if self._delivery is None:  # standard-webhooks: the signed message id
            found = message_id(request.headers)
            if found is None:
                raise PayloadInvalid("no webhook-id header")
            return found
        body = None if self._delivery.expression.header else decode(request.body)
        found = self._delivery.required_text(request.headers, body)
        if len(found) > DELIVERY_ID_MAX:
            raise PayloadInvalid(f"delivery_id: longer than {DELIVERY_ID_MAX} characters")
        return found

    def parse(self, request: WebhookRequest) -> Any:
        return decode(request.body)

    def translate(
        self, request: WebhookRequest, payload: Any, options: MappedOptions
    ) -> list[Output]:
        headers = request.headers
        test = self._test_event
        if (
            test is not None
            and not options.include_test_events
            and test.read(headers, payload) is True
        ):
            return []
        event_type = self._event_type.required_text(headers, payload) if self._event_type else None
        mapping = self._on.get(event_type) if event_type is not None else None
        if mapping is None:
            mapping = self._on.get(CATCH_ALL)
        if mapping is None:
            return []  # an event type nobody mapped: acknowledged and ignored
        return mapping.outputs(headers, payload)

    def samples(self) -> Mapping[str, Sample]:
        """One sample per file of the `samples` folder: `<event type>.json`."""
        if self._samples is None:
            return {}
        found = {}
        for path in sorted(self._samples.glob("*.json")):
            event = path.name.removesuffix(".json")
            headers = {}
            if self._event_type is not None and self._event_type.expression.header:
                headers[self._event_type.expression.header] = event
            if self._delivery is not None and self._delivery.expression.header:
                # A fixed id per sample: sending one twice is a redelivery.
                guid = uuid.uuid5(uuid.NAMESPACE_URL, f"millimetric-bridge:{self.source}:{event}")
                headers[self._delivery.expression.header] = str(guid)
            found[event] = Sample(body=path.read_bytes(), headers=headers)
        return found

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: every value the delivery id and
        the event ids are read from gets a fresh suffix, so the bridge takes it for a new
        delivery and Millimetric for new events."""
        token = secrets.token_hex(4)
        headers = dict(sample.headers)
        read = [self._delivery] + [m.event_id for m in self._on.values()]
        paths = set()
        for value in read:
            if value is None:
                continue
            if value.expression.header:
                headers[value.expression.header] = f"{uuid.uuid4()}"
            paths.update(value.expression.paths())
        try:
            body = decode(sample.body)
        except PayloadInvalid:
            return Sample(body=sample.body, headers=headers)
        for path in sorted(paths):
            _renew(body, path, token)
        return Sample(body=encode(body), headers=headers)


def _renew(body: Any, path: tuple[str, ...], token: str) -> None:
    """The value at `path`, made new: a string gets `-<token>`, an integer new digits."""
    *parents, last = path
    for name in parents:
        body = body.get(name) if isinstance(body, dict) else None
    if not isinstance(body, dict):
        return
    value = body.get(last)
    if isinstance(value, str):
        body[last] = f"{value}-{token}"
    elif isinstance(value, int) and not isinstance(value, bool):
        body[last] = value * 10**6 + secrets.randbelow(10**6)


class MappedTemplate:
    """The `mapped` handler template: a source's table becomes a `MappedHandler`."""

    name = "mapped"
    options_type = MappedOptions

    def configure(
        self, source: str, options: MappedOptions, *, secret_variable: str, folder: Path
    ) -> Handler:
        scheme = _scheme(options.signature)
        delivery = compiled_value(("delivery_id",), options.delivery_id)
        if delivery is None and not isinstance(scheme, StandardWebhooksScheme):
            raise ConfigError(
                "delivery_id",
                "missing: the body field (or header:NAME) that names each delivery, the same"
                " on every retry",
            )
        if not options.on:
            raise ConfigError("on", 'no event type is mapped: add [sources.NAME.on."<type>"]')
        on = {}
        for name, table in options.on.items():
            if not name:
                raise ConfigError("on", "an event type must not be empty")
            if not isinstance(table, dict):
                raise ConfigError(toml_key("on", name), "must be a table of what it becomes")
            on[name] = rule(name, table)
        event_type = compiled_value(("event_type",), options.event_type)
        if event_type is None and set(on) != {CATCH_ALL}:
            raise ConfigError(
                "event_type", "missing: where the event type is, to choose among the on tables"
            )
        samples = None
        if options.samples is not None:
            samples = folder / options.samples
            if not samples.is_dir():
                raise ConfigError("samples", f"{samples} is not a folder")
        return MappedHandler(
            source=source,
            secret_variable=secret_variable,
            scheme=scheme,
            delivery=delivery,
            event_type=event_type,
            test_event=compiled_value(("test_event",), options.test_event),
            on=on,
            samples=samples,
        )


template: Final = MappedTemplate()
