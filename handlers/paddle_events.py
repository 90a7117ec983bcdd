"""Paddle Billing's event stream (`GET /events`) for backfill and reconcile.

Paddle keeps 90 days of events and lists them by id (`order_by=id[DESC]`, newest first,
`after` the last id of a page, `per_page` up to 200, `meta.pagination.has_more`); an
event there is the notification a webhook would carry, less its `notification_id`, so
its JSON is stored as the delivery's body and its `event_id` is the delivery id, as for a
webhook. The list filters neither by time nor by type: the bridge walks it from the
newest event down to `since` (ids follow creation, and `occurred_at` is checked; it stops
once events are an hour older than `since`) and keeps the types the handler translates.
Sandbox or live follows the key: a `pdl_sdbx_` key goes to Paddle's sandbox.

No Python SDK is used: Paddle's own (`paddle-python-sdk`) is synchronous and would be a
dependency for one paged GET, which httpx does here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection
from datetime import datetime
from typing import Annotated, Final

import httpx
import msgspec

from bridge import ConfigError, ProviderError
from bridge.plugin import ApiAccess, ListedEvent

__all__ = ["LIVE", "PAGE", "SANDBOX", "check_api_key", "list_events"]

LIVE: Final = "https://api.paddle.com"
SANDBOX: Final = "https://sandbox-api.paddle.com"
#: Events a request: Paddle's largest page for events.
PAGE: Final = 200
TIMEOUT: Final = 30.0
#: How far past `since` the walk goes before it stops: an event's id follows when Paddle
#: created it, its `occurred_at` when it happened, which may be a little earlier.
MARGIN: Final = 3600.0
_KEY: Final = re.compile(r"^pdl_(live|sdbx)_apikey_[A-Za-z0-9_]+$")
_LEGACY_KEY: Final = re.compile(r"^[A-Za-z0-9]{40,64}$")  # before May 2025: 50 characters


def check_api_key(access: ApiAccess) -> str:
    """What the key lists, or a `ConfigError` naming its variable (never the key)."""
    key = access.key
    if key.startswith("pdl_ntfset_"):
        raise ConfigError(
            access.variable,
            "is a notification destination's secret key (pdl_ntfset_), not an API key; "
            "create an API key with the Events read permission",
        )
    if key.startswith(("live_", "test_")):
        raise ConfigError(
            access.variable,
            "is a client-side token, which cannot read events; create an API key with the "
            "Events read permission",
        )
    if _KEY.match(key):
        return "sandbox events" if key.startswith("pdl_sdbx_") else "live events"
    if _LEGACY_KEY.match(key):
        return "events"
    raise ConfigError(
        access.variable, "is not a Paddle API key (pdl_live_apikey_... or pdl_sdbx_apikey_...)"
    )


class _Pagination(msgspec.Struct, frozen=True):
    has_more: bool = False


class _Meta(msgspec.Struct, frozen=True):
    pagination: _Pagination = _Pagination()


class _Page(msgspec.Struct, frozen=True):
    data: list[msgspec.Raw]
    meta: _Meta = _Meta()


class _Head(msgspec.Struct, frozen=True):
    event_id: str
    event_type: str
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)]


_page_decoder: Final = msgspec.json.Decoder(_Page)
_head_decoder: Final = msgspec.json.Decoder(_Head)


def _base(access: ApiAccess) -> str:
    if access.base:
        return access.base
    return SANDBOX if access.key.startswith("pdl_sdbx_") else LIVE


async def list_events(
    access: ApiAccess,
    types: Collection[str],
    since: float,
    until: float,
    after: ListedEvent | None,
) -> AsyncIterator[ListedEvent]:
    """Events of `types` that occurred in [since, until), newest first, after `after`."""
    headers = {"authorization": f"Bearer {access.key}", "paddle-version": "1"}
    params = {"order_by": "id[DESC]", "per_page": str(PAGE)}
    if after is not None:
        params["after"] = after.delivery_id
    async with httpx.AsyncClient(base_url=_base(access), headers=headers, timeout=TIMEOUT) as http:
        while True:
            page = await _page(http, access, params)
            heads = [_head(raw) for raw in page.data]
            for head, raw in zip(heads, page.data, strict=True):
                occurred = head.occurred_at.timestamp()
                if occurred < since - MARGIN:
                    return  # everything after this is older still
                if since <= occurred < until and head.event_type in types:
                    yield ListedEvent(
                        delivery_id=head.event_id,
                        type=head.event_type,
                        created=occurred,
                        body=bytes(raw),
                    )
            if not page.meta.pagination.has_more or not heads:
                return
            params["after"] = heads[-1].event_id


async def _page(http: httpx.AsyncClient, access: ApiAccess, params: dict[str, str]) -> _Page:
    try:
        answer = await http.get("/events", params=params)
    except httpx.TransportError:
        # Its text may name the proxy's URL; the kind of failure is enough.
        raise ProviderError(
            "Paddle unreachable: a timeout or a connection error", retryable=True
        ) from None
    status = answer.status_code
    if status == 401:
        raise ConfigError(access.variable, "Paddle refused the key (401): revoked or mistyped")
    if status == 403:
        raise ConfigError(
            access.variable, "the key may not read events (403): give it the Events read permission"
        )
    if status == 429 or status >= 500:
        raise ProviderError(
            f"Paddle answered {status}", retryable=True, retry_after=_retry_after(answer)
        )
    if status != 200:
        raise ProviderError(f"Paddle answered {status}: {_detail(answer)}")
    try:
        return _page_decoder.decode(answer.content)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise ProviderError(f"Paddle's answer is not a list of events: {error}") from None


def _head(raw: msgspec.Raw) -> _Head:
    try:
        return _head_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise ProviderError(f"Paddle listed an event the bridge cannot read: {error}") from None


class _Error(msgspec.Struct, frozen=True):
    detail: str = ""


class _Refusal(msgspec.Struct, frozen=True):
    error: _Error = _Error()


def _detail(answer: httpx.Response) -> str:
    try:
        return msgspec.json.decode(answer.content, type=_Refusal).error.detail[:200]
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "no readable error"


def _retry_after(answer: httpx.Response) -> float | None:
    try:
        return max(0.0, float(answer.headers.get("retry-after", "")))
    except ValueError:
        return None
