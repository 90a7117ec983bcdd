"""The rules of a mapped source: each `on."<event type>"` table of `bridge.toml`, checked
and compiled at start-up, and the calls it makes of a delivery.

A table names, for each field of a `track`, `identify` or `forget`, the expression that
reads it (`bridge.expressions`). What is read is made exact by `handlers.mapped_values`.
Where a required value is missing, or a value cannot be what its field needs (a currency
the bridge does not know, a time without a zone), `PayloadInvalid` names the key and the
expression, and the translate stage quarantines the delivery with that reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from bridge.errors import ConfigError, PayloadInvalid
from bridge.events import NAME_MAX_CHARS, Forget, Identify, Output, Track
from bridge.expressions import Expression, ExpressionInvalid
from bridge.money import CURRENCIES
from handlers import mapped_values as values

__all__ = [
    "EventMapping",
    "IdentifyMapping",
    "Rule",
    "Value",
    "compiled_value",
    "rule",
    "toml_key",
]

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
# Headers that carry credentials: never kept with a stored delivery, so never read.
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})
# The Track fields that are plain text read from the delivery.
_TRACK_TEXT: Final = ("user_id", "anonymous_id", "session_id", "url", "path", "referrer")


class IdentifyMapping(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    user_id: str
    anonymous_id: str | None = None
    traits: dict[str, str] = {}


class EventMapping(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `on."<event type>"` table: the calls one event type becomes."""

    track: str | None = None  # the event's name, as written (not an expression)
    event_id: str | None = None
    timestamp: str | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    session_id: str | None = None
    url: str | None = None
    path: str | None = None
    referrer: str | None = None
    amount: str | None = None
    amount_units: str | None = None  # "major" or "minor"
    currency: str | None = None
    properties: dict[str, str] = {}
    identify: IdentifyMapping | None = None
    forget: str | None = None  # the user to erase


def toml_key(*parts: str) -> str:
    """A key in the source's table as TOML writes it: `on."payment.succeeded".amount`."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def _expression(key: str, value: str | None) -> Expression | None:
    if value is None:
        return None
    try:
        expression = Expression(value)
    except ExpressionInvalid as error:
        raise ConfigError(key, str(error)) from None
    if expression.header in _SECRET_HEADERS:
        raise ConfigError(key, f"{expression.header} carries credentials and is never read")
    return expression


@dataclass(frozen=True)
class Value:
    """One value an `on` table reads: its key (for reasons) and its expression."""

    key: str  # where it is in the source's table: on."payment.succeeded".user_id
    name: str  # the field, property or trait it fills: user_id
    expression: Expression

    def read(self, headers: Mapping[str, str], body: Any) -> Any:
        try:
            return self.expression.search(headers, body)
        except PayloadInvalid as error:
            raise PayloadInvalid(f"{self.key}: {error}") from None

    def text(self, headers: Mapping[str, str], body: Any) -> str | None:
        return values.text(self.key, self.expression, self.read(headers, body))

    def required_text(self, headers: Mapping[str, str], body: Any) -> str:
        found = values.required(self.key, self.expression, self.text(headers, body))
        return str(found)


def compiled_value(where: tuple[str, ...], expression: str | None) -> Value | None:
    key = toml_key(*where)
    compiled = _expression(key, expression)
    return None if compiled is None else Value(key, where[-1], compiled)


@dataclass(frozen=True)
class _Money:
    amount: Value
    units: str
    currency: Value


@dataclass(frozen=True)
class _Identify:
    user_id: Value
    anonymous_id: Value | None
    traits: tuple[Value, ...]


@dataclass(frozen=True)
class Rule:
    """One `on` table, compiled: the calls one event type becomes."""

    track: str | None
    event_id: Value | None
    timestamp: Value | None
    fields: tuple[Value, ...]  # the Track's text fields (user_id, anonymous_id, ...)
    money: _Money | None
    properties: tuple[Value, ...]
    identify: _Identify | None
    forget: Value | None

    def values(self) -> list[Value]:
        found = [self.event_id, self.timestamp, self.forget, *self.fields, *self.properties]
        if self.money is not None:
            found += [self.money.amount, self.money.currency]
        if self.identify is not None:
            found += [self.identify.user_id, self.identify.anonymous_id, *self.identify.traits]
        return [v for v in found if v is not None]

    def outputs(self, headers: Mapping[str, str], body: Any) -> list[Output]:
        if self.forget is not None:
            return [Forget(user_id=self.forget.required_text(headers, body))]
        calls: list[Output] = []
        if self.identify is not None:
            calls.append(self._identify(self.identify, headers, body))
        if self.track is not None:
            calls.append(self._track(self.track, headers, body))
        return calls

    @staticmethod
    def _identify(identify: _Identify, headers: Mapping[str, str], body: Any) -> Identify:
        anonymous = identify.anonymous_id
        return Identify(
            user_id=identify.user_id.required_text(headers, body),
            anonymous_id=anonymous.text(headers, body) if anonymous is not None else None,
            traits=_free(identify.traits, headers, body),
        )

    def _track(self, event: str, headers: Mapping[str, str], body: Any) -> Track:
        properties = _free(self.properties, headers, body)
        if self.money is not None:
            amount = self.money.amount.read(headers, body)
            if amount is not None:  # no amount: neither amount_cents nor currency
                currency = self.money.currency
                code = values.currency(
                    currency.key, currency.expression, currency.read(headers, body)
                )
                properties["amount_cents"] = values.minor_units(
                    self.money.amount.key,
                    self.money.amount.expression,
                    amount,
                    self.money.units,
                    code,
                )
                properties["currency"] = code
        when = self.timestamp
        text = {f.name: f.text(headers, body) for f in self.fields}
        return Track(
            event=event,
            event_id=self.event_id.required_text(headers, body) if self.event_id else None,
            timestamp=(
                values.timestamp(when.key, when.expression, when.read(headers, body))
                if when is not None
                else None
            ),
            user_id=text.get("user_id"),
            anonymous_id=text.get("anonymous_id"),
            session_id=text.get("session_id"),
            url=text.get("url"),
            path=text.get("path"),
            referrer=text.get("referrer"),
            properties=properties,
        )


def _free(read: Sequence[Value], headers: Mapping[str, str], body: Any) -> dict[str, Any]:
    """Properties or traits: each as sent (exact), and left out where there is none."""
    found = {v.name: values.plain(v.read(headers, body)) for v in read}
    return {k: v for k, v in found.items() if v is not None}


def rule(event_type: str, table: dict[str, Any]) -> Rule:
    """An `on` table, checked and compiled; ConfigError naming the key otherwise."""
    where = ("on", event_type)
    try:
        entry = msgspec.convert(table, EventMapping)
    except msgspec.ValidationError as error:
        message, found, path = str(error).rpartition(" - at `$")
        if not found:
            raise ConfigError(toml_key(*where), str(error)) from None
        raise ConfigError(f"{toml_key(*where)}{path.removesuffix('`')}", message) from None
    track = entry.track
    describes_track = [
        k
        for k in ("event_id", "timestamp", *_TRACK_TEXT, "amount", "currency", "properties")
        if getattr(entry, k)
    ]
    if track is None and describes_track:
        raise ConfigError(
            toml_key(*where, "track"),
            f"missing: {describes_track[0]} describes a track, which needs an event name",
        )
    if track is not None and not (track.strip() and len(track) <= NAME_MAX_CHARS):
        raise ConfigError(
            toml_key(*where, "track"), f"an event name is 1-{NAME_MAX_CHARS} characters"
        )
    if entry.forget is not None and (track is not None or entry.identify is not None):
        raise ConfigError(
            toml_key(*where, "forget"), "a forget is the delivery's only call: no track or identify"
        )
    return Rule(
        track=track,
        event_id=compiled_value((*where, "event_id"), entry.event_id),
        timestamp=compiled_value((*where, "timestamp"), entry.timestamp),
        fields=tuple(
            v
            for k in _TRACK_TEXT
            if (v := compiled_value((*where, k), getattr(entry, k))) is not None
        ),
        money=_money(where, entry),
        properties=_free_values((*where, "properties"), entry.properties, reserved=entry.amount),
        identify=_identify((*where, "identify"), entry.identify),
        forget=compiled_value((*where, "forget"), entry.forget),
    )


def _free_values(
    where: tuple[str, ...], table: Mapping[str, str], *, reserved: str | None = None
) -> tuple[Value, ...]:
    found = []
    for name, expression in table.items():
        if not name:
            raise ConfigError(toml_key(*where), "a name must not be empty")
        if reserved is not None and name in ("amount_cents", "currency"):
            raise ConfigError(toml_key(*where, name), "already set from amount and currency")
        value = compiled_value((*where, name), expression)
        if value is not None:
            found.append(value)
    return tuple(found)


def _money(where: tuple[str, ...], entry: EventMapping) -> _Money | None:
    if entry.amount is None:
        for key in ("amount_units", "currency"):
            if getattr(entry, key) is not None:
                raise ConfigError(toml_key(*where, key), "only with amount")
        return None
    if entry.amount_units not in ("major", "minor"):
        raise ConfigError(
            toml_key(*where, "amount_units"),
            "say whether amount is in major units (a decimal: 19.99) or minor (cents: 1999):"
            ' "major" or "minor"',
        )
    if entry.currency is None:
        raise ConfigError(toml_key(*where, "currency"), "missing: amount needs its currency")
    amount = compiled_value((*where, "amount"), entry.amount)
    currency = compiled_value((*where, "currency"), entry.currency)
    if amount is None or currency is None:  # cannot happen: both were given
        raise ConfigError(toml_key(*where, "amount"), "amount and currency are both needed")
    fixed = currency.expression.literal
    if fixed is not None and not (isinstance(fixed, str) and fixed.upper() in CURRENCIES):
        raise ConfigError(currency.key, f"{fixed!r} is not an ISO 4217 currency the bridge knows")
    return _Money(amount=amount, units=entry.amount_units, currency=currency)


def _identify(where: tuple[str, ...], identify: IdentifyMapping | None) -> _Identify | None:
    if identify is None:
        return None
    user_id = compiled_value((*where, "user_id"), identify.user_id)
    if user_id is None:  # cannot happen: msgspec requires it
        raise ConfigError(toml_key(*where, "user_id"), "missing")
    return _Identify(
        user_id=user_id,
        anonymous_id=compiled_value((*where, "anonymous_id"), identify.anonymous_id),
        traits=_free_values((*where, "traits"), identify.traits),
    )
