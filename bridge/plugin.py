"""The handler plugin protocol: everything a provider integration implements.

A handler is one object, usually one module in `handlers/` or in a third-party package,
registered under the entry-point group `millimetric_bridge.handlers`::

    [project.entry-points."millimetric_bridge.handlers"]
    acme = "acme_bridge:handler"

It says how deliveries are signed (`scheme`), which id the provider gave the delivery
(`delivery_id`), which other headers it reads (`headers`), how to read the verified body
(`parse`), and what Millimetric calls it becomes (`translate`). The bridge does everything
else: size limits, verification with every configured secret, deduplication, durable
storage, forwarding.

Delivery runs in two stages. The intake verifies a request, reads its delivery id and
stores the raw body with the headers `kept_headers` names, then answers 200; translation
runs later, from the store, on a request rebuilt from that body and those headers alone.
So `delivery_id` reads the request without parsing it, and `parse` and `translate` may
read only the headers that `scheme.headers` and `headers` list.

A `HandlerTemplate`, registered the same way, is a handler that each source builds from
its own table in `bridge.toml` (the built-in `mapped` handler: a provider without code).
It has no source of its own; a source names it with `handler = "<name>"`.

A handler whose provider lists its past events through an API may also keep
`EventLister`: `millimetric-bridge backfill SOURCE` and the periodic reconcile of `serve`
then append the events its webhooks never brought, as deliveries of the source whose
delivery id is the one a webhook of the same event carries, so that either way round the
second is a duplicate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable

import msgspec

from bridge.events import Output

__all__ = [
    "ApiAccess",
    "EventLister",
    "Handler",
    "HandlerTemplate",
    "ListedEvent",
    "Sample",
    "SignatureScheme",
    "SourceOptions",
    "WebhookRequest",
    "event_lister",
    "kept_headers",
]


class WebhookRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery as it arrived: header names are lower-case, the body untouched.

    Header values are the bytes sent, decoded as latin-1 (as ASGI servers and Litestar
    decode them): `value.encode("latin-1")` gives the bytes back, and a non-ASCII value
    sent as UTF-8 reads as its UTF-8 bytes, one character each."""

    source: str
    headers: Mapping[str, str]
    body: bytes
    received_at: float  # unix seconds


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """A recorded delivery: its body and the headers, other than the signature, that the
    handler reads (a topic, a shop domain, a delivery id)."""

    body: bytes
    headers: Mapping[str, str] = {}


class SourceOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options every source has; a handler extends this with its own (in `bridge.toml`)."""

    # Seconds a signed timestamp may be off, where the scheme signs one. Never 0: stripe
    # reads 0 as "no limit", which would accept a replay of any old delivery.
    tolerance: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 300
    include_test_events: bool = False  # forward the provider's test-mode events too


@runtime_checkable
class SignatureScheme(Protocol):
    """How a provider signs deliveries. `verify` tries every secret (rotation) and raises
    `SignatureInvalid` with a short reason; comparisons are constant-time.

    A scheme that authenticates the sender but not the body (a bearer token, as Auth0's log
    streams send) says so with a class attribute `signs_body = False`."""

    # What to keep to verify the delivery again later (none is kept for a scheme that does
    # not sign the body: see `kept_headers`).
    headers: tuple[str, ...]
    signs_timestamp: bool

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None: ...

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        """Headers that make `body` a valid delivery (for tests and `send-test`)."""
        ...


@runtime_checkable
class Handler(Protocol):
    """A provider integration."""

    name: str  # the default source name and URL: /webhooks/<name>
    secret_variable: str  # the environment variable holding the default source's secrets
    scheme: SignatureScheme
    options_type: type[SourceOptions]
    # The request headers (lower-case) the handler reads besides the scheme's: only these
    # and the scheme's are stored with a delivery, so a header that `parse` or `translate`
    # reads but that is not listed is missing when the delivery is translated from the
    # store. Never a header that carries a secret (the registry refuses `authorization`
    # and cookies).
    headers: tuple[str, ...]

    def delivery_id(self, request: WebhookRequest) -> str:
        """The provider's own id for this delivery (redeliveries carry the same one), read
        from the verified request alone: a header, or a decode of just the body's id field,
        never the full parse, so that a body `parse` refuses is still stored (and
        quarantined) rather than refused. `PayloadInvalid` only when not even the id can
        be read."""
        ...

    def parse(self, request: WebhookRequest) -> Any:
        """Decode the verified body into what `translate` needs; `PayloadInvalid` if it
        cannot be read."""
        ...

    def translate(self, request: WebhookRequest, payload: Any, options: Any) -> list[Output]:
        """The Millimetric calls this delivery becomes (and `Alias`, `ForgetVisitor`, `Purge`
        instructions); `[]` acknowledges and ignores it."""
        ...

    def samples(self) -> Mapping[str, Sample]:
        """Recorded samples by event type, for `send-test` and the contract test."""
        ...


class ListedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event from a provider's event list, as the bridge appends it to the inbox: the
    delivery a webhook of the same event would have been."""

    delivery_id: str  # what `Handler.delivery_id` reads from a webhook of this event
    type: str  # the provider's event type (what `backfill --dry-run` prints)
    created: float  # unix seconds: when the provider created the event
    body: bytes  # a webhook body of this event: what `parse` reads
    headers: Mapping[str, str] = {}  # of the handler's `headers`, those a webhook would carry


@dataclass(frozen=True)
class ApiAccess:
    """How to reach a provider's API for one source: the key (kept out of `repr`, so out of
    tracebacks and logs), the variable it was read from (what a `ConfigError` names) and a
    base URL (None: the provider's own)."""

    variable: str
    key: str = field(repr=False)
    base: str | None = None


@runtime_checkable
class EventLister(Protocol):
    """Optional, beside `Handler`: the provider's API lists its past events.

    The bridge pages through them, appends each one the inbox does not hold (by source and
    delivery id) and lets the translate stage take it like any webhook. Listing is
    read-only at the provider; the key needs only read access to events."""

    # The default source's variables; another source on the handler reads
    # <SOURCE>_API_KEY and <SOURCE>_API_BASE.
    api_key_variable: str
    api_base_variable: str

    def check_api_key(self, access: ApiAccess) -> str:
        """Before any request: what the key lists, in a few words for the operator (e.g.
        "test-mode events"); `ConfigError(access.variable, why)` for a key that cannot
        list events (a publishable key, a webhook secret pasted by mistake)."""
        ...

    def list_events(
        self, access: ApiAccess, since: float, until: float, after: ListedEvent | None
    ) -> AsyncIterator[ListedEvent]:
        """The events created in [since, until) (unix seconds) that `translate` may turn into
        calls (other types may be left out), in the provider's own order, after the event
        `after` when it is given. Raise `ConfigError(access.variable, why)` when the
        provider refuses the key, and `ProviderError(retryable=True)` for what passes (a
        429, a 5xx, the network): the bridge waits, then lists again after the last event
        it was given."""
        ...


def event_lister(handler: Handler) -> EventLister | None:
    """The handler as an `EventLister`, if it is one."""
    return handler if isinstance(handler, EventLister) else None


@runtime_checkable
class HandlerTemplate(Protocol):
    """A handler built per source from that source's options (`bridge.toml`)."""

    name: str  # what a source's `handler = "..."` names
    options_type: type[SourceOptions]  # the source's table, checked by msgspec first

    def configure(
        self, source: str, options: Any, *, secret_variable: str, folder: Path
    ) -> Handler:
        """The handler for one source, from its converted `options`; `folder` is where
        `bridge.toml` is, for paths in it. Raises `ConfigError(key, problem)`, naming
        the key in the source's table, for anything that cannot work: at start-up, never
        on the first delivery."""
        ...


def kept_headers(handler: Handler) -> tuple[str, ...]:
    """The request headers stored with each delivery, in order and once each: those the
    scheme verifies with, then those the handler reads (`handler.headers`).

    A scheme that does not sign the body (`signs_body = False`, a bearer token such as
    Auth0's `Authorization`) contributes none: its header is the secret itself, and it
    only authenticated the sender, so there is nothing to verify again later and nothing
    of it belongs in the store."""
    signed = handler.scheme.headers if getattr(handler.scheme, "signs_body", True) else ()
    return tuple(dict.fromkeys((*signed, *handler.headers)))
