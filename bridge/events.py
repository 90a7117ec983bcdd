"""The Millimetric calls the bridge sends: `Track`, `Identify`, `Forget`.

The Structs enforce the ingest API's field reference whether they are built in Python (by a
handler) or decoded from JSON (by the local sink): a violation raises `EventInvalid`
naming the field and the limit. Fields the server derives itself (`source`, `country`,
`ip_hash`, ...) do not exist on these types, so they can never be sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

import msgspec

from bridge.errors import EventInvalid

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_EVENTS",
    "NAME_MAX_CHARS",
    "PROPERTIES_MAX_BYTES",
    "SERVER_DERIVED_FIELDS",
    "About",
    "Alias",
    "Call",
    "Forget",
    "ForgetVisitor",
    "Identify",
    "Output",
    "Track",
    "encode",
]

NAME_MAX_CHARS: Final = 128
PROPERTIES_MAX_BYTES: Final = 8 * 1024
BATCH_MAX_EVENTS: Final = 500
BATCH_MAX_BYTES: Final = 256 * 1024

#: What Millimetric derives on its side; sending any of them is an invalid payload.
SERVER_DERIVED_FIELDS: Final = frozenset(
    {
        "source",
        "medium",
        "campaign",
        "source_confidence",
        "source_rule_id",
        "country",
        "device_type",
        "browser",
        "os",
        "ip_hash",
    }
)

_encoder: Final = msgspec.json.Encoder()

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX_CHARS)]
ZonedTime = Annotated[datetime, msgspec.Meta(tz=True)]


def _check_name(field: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise EventInvalid(field, "must be a string")
    if not 1 <= len(value) <= NAME_MAX_CHARS:
        raise EventInvalid(field, f"must be 1-{NAME_MAX_CHARS} characters, got {len(value)}")


def _check_str(field: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise EventInvalid(field, "must be a string")


def _check_id(field: str, value: object) -> None:
    """An id that erasure and linking key on: a blank one would name everybody."""
    _check_str(field, value, optional=False)
    if isinstance(value, str) and not value.strip():
        raise EventInvalid(field, "must not be empty or blank")


def _check_time(field: str, value: object) -> None:
    if value is None:
        return
    offset = value.utcoffset() if isinstance(value, datetime) else None
    if offset is None:
        raise EventInvalid(field, "must be an ISO 8601 time with a zone")
    if offset.total_seconds() % 60:
        # ISO 8601 offsets carry minutes; encoding would silently move the instant.
        raise EventInvalid(field, "zone offset must be whole minutes")


def _check_json_object(field: str, value: object, max_bytes: int | None) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise EventInvalid(field, "must be a JSON object with string keys")
    try:
        size = len(_encoder.encode(value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise EventInvalid(field, f"must be JSON-serialisable ({exc})") from None
    if max_bytes is not None and size > max_bytes:
        raise EventInvalid(field, f"must be at most {max_bytes} bytes as compact JSON, got {size}")


class Track(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """One analytics event (`POST /v1/track`, or one entry of `/v1/batch`)."""

    event: Name
    event_id: Name | None = None
    timestamp: ZonedTime | None = None
    anonymous_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    url: str | None = None
    path: str | None = None
    referrer: str | None = None
    properties: dict[str, Any] = {}

    def __post_init__(self) -> None:
        _check_name("event", self.event, optional=False)
        _check_name("event_id", self.event_id, optional=True)
        _check_time("timestamp", self.timestamp)
        for field in ("anonymous_id", "user_id", "session_id", "url", "path", "referrer"):
            _check_str(field, getattr(self, field))
        _check_json_object("properties", self.properties, PROPERTIES_MAX_BYTES)


class Identify(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Links an anonymous visitor to a known user and sets traits (`POST /v1/identify`)."""

    user_id: str
    anonymous_id: str | None = None
    traits: dict[str, Any] = {}

    def __post_init__(self) -> None:
        _check_str("user_id", self.user_id, optional=False)
        _check_str("anonymous_id", self.anonymous_id)
        _check_json_object("traits", self.traits, None)


class Forget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Erases everything Millimetric holds about a user (`POST /v1/forget`)."""

    user_id: str

    def __post_init__(self) -> None:
        _check_id("user_id", self.user_id)


Call = Track | Identify | Forget


class Alias(msgspec.Struct, frozen=True, kw_only=True):
    """Not sent to Millimetric: tells the bridge that `alias` and `anonymous_id` are one
    visitor, so calls using either carry `anonymous_id` (a Stripe customer and the browser
    that paid), now and in later deliveries."""

    alias: str
    anonymous_id: str


class ForgetVisitor(msgspec.Struct, frozen=True, kw_only=True):
    """Not sent as such: becomes a `Forget` of the user the bridge has learned for this
    anonymous id, if it has learned one."""

    anonymous_id: str

    def __post_init__(self) -> None:
        _check_id("anonymous_id", self.anonymous_id)


class About(msgspec.Struct, frozen=True, kw_only=True):
    """Not sent to Millimetric: names a provider's own identifier that this delivery is
    about (a Shopify customer, a Stripe customer), so that erasure finds the delivery.

    A `Forget` erases every stored delivery linked to the forgotten user: those whose
    calls name the user or one of the visitors learned for them, and those that name, in
    an `About`, an identifier that the delivery carrying the `Forget` names in an `About`
    of its own. A delivery that becomes no call (an order not yet paid) can still hold
    personal data in its raw payload: naming its customer here lets a later `Forget`
    reach it."""

    identifier: str

    def __post_init__(self) -> None:
        _check_id("identifier", self.identifier)


class Purge(msgspec.Struct, frozen=True, kw_only=True):
    """Not sent to Millimetric: erases what the bridge holds from this source's earlier
    deliveries whose id starts with `deliveries` (raw payloads, and calls waiting or
    delivered; a send in flight finishes), and what it learned about users whose id starts
    with `users` (Shopify's shop/redact, for every customer of one shop). Nothing is
    tombstoned: the same prefix may come back (the shop reinstalls the app)."""

    deliveries: str
    users: str

    def __post_init__(self) -> None:
        for field in ("deliveries", "users"):
            if not getattr(self, field):
                raise EventInvalid(field, "a prefix must not be empty (it would purge all)")


#: What a handler's translate returns: calls, and instructions to the bridge.
Output = Call | Alias | ForgetVisitor | Purge | About


def encode(call: Call | msgspec.Struct | dict[str, Any]) -> bytes:
    """Compact JSON, exactly as it goes on the wire."""
    return _encoder.encode(call)
