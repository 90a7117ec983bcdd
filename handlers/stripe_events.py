"""Stripe's Events API for backfill and reconcile, through the `stripe` package.

`GET /v1/events` keeps 30 days of events, newest first, listed a page at a time through
the package's client (`starting_after` the last event of a page, while `has_more`). Each
event is the object a webhook endpoint would have been sent, so its JSON is stored as the
delivery's body and its id is the delivery id, as for a webhook. Test or live mode
follows the key: an `sk_test_`/`rk_test_` key lists test-mode events.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Collection
from typing import Final

import msgspec
import stripe
from stripe.params import EventListParams

from bridge import ConfigError, ProviderError
from bridge.plugin import ApiAccess, ListedEvent

__all__ = ["PAGE", "check_api_key", "list_events"]

#: Events a request: Stripe's largest page.
PAGE: Final = 100
#: Seconds a request may take before it counts as failed (and is tried again).
TIMEOUT: Final = 30.0
_KEY: Final = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9]+$")
_encoder: Final = msgspec.json.Encoder()


def check_api_key(access: ApiAccess) -> str:
    """What the key lists, or a `ConfigError` naming its variable (never the key)."""
    key = access.key
    if key.startswith("pk_"):
        raise ConfigError(
            access.variable,
            "is a publishable pk_ key, which cannot read events; create a restricted key "
            "(rk_) with Read access to Events",
        )
    if key.startswith("whsec_"):
        raise ConfigError(
            access.variable,
            "is a webhook signing secret (whsec_), not an API key; create a restricted key "
            "(rk_) with Read access to Events",
        )
    if not _KEY.match(key):
        raise ConfigError(
            access.variable,
            "is not a Stripe secret or restricted key (sk_live_..., rk_live_..., or _test_)",
        )
    return "test-mode events" if key[3:8] == "test_" else "live-mode events"


class _Page(msgspec.Struct, frozen=True):
    data: list[msgspec.Raw]
    has_more: bool = False


class _Head(msgspec.Struct, frozen=True):
    """What is read of each event: the rest stays as Stripe sent it."""

    id: str
    type: str
    created: int


_page_decoder: Final = msgspec.json.Decoder(_Page)
_head_decoder: Final = msgspec.json.Decoder(_Head)


async def list_events(
    access: ApiAccess,
    types: Collection[str],
    since: float,
    until: float,
    after: ListedEvent | None,
) -> AsyncIterator[ListedEvent]:
    """Events of `types` created in [since, until), newest first, after `after`.

    The package's client makes each request (the key, the API version, Stripe's errors as
    its exceptions) and the pages are walked as its auto-pager walks them (`starting_after`
    the last event, while `has_more`), but each page is read raw: the package's objects
    cost 0.9 ms an event (profiled), which would hold the serving event loop, and intake
    with it, for about 90 ms a page; and the raw JSON is what a webhook of the event
    carries."""
    http = stripe.HTTPXClient(timeout=TIMEOUT)
    client = stripe.StripeClient(
        access.key,
        base_addresses={"api": access.base} if access.base else None,
        http_client=http,
        max_network_retries=0,  # the bridge retries, after the last event it was given
    )
    params: EventListParams = {
        "types": sorted(types),  # at most 20: Stripe's limit
        "created": {"gte": math.floor(since), "lt": math.floor(until)},
        "limit": PAGE,
    }
    if after is not None:
        params["starting_after"] = after.delivery_id
    try:
        while True:
            response: stripe.StripeResponse = await client.raw_request_async(
                "get", "/v1/events", **params
            )
            try:
                page = _page_decoder.decode(response.body)
                heads = [_head_decoder.decode(raw) for raw in page.data]
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                raise ProviderError(f"Stripe's answer is not a list of events: {error}") from None
            for head, raw in zip(heads, page.data, strict=True):
                yield ListedEvent(
                    delivery_id=head.id,
                    type=head.type,
                    created=float(head.created),
                    body=bytes(raw),
                )
            if not page.has_more or not heads:
                return
            params["starting_after"] = heads[-1].id
    except stripe.AuthenticationError:
        raise ConfigError(
            access.variable, "Stripe refused the key (401): revoked, mistyped or not this account's"
        ) from None
    except stripe.PermissionError:
        raise ConfigError(
            access.variable,
            "the key may not read events (403): give the restricted key Read access to Events",
        ) from None
    except stripe.RateLimitError as error:
        raise ProviderError(
            "Stripe: 429 too many requests", retryable=True, retry_after=_retry_after(error)
        ) from None
    except stripe.APIConnectionError:
        # Its message quotes the network error, which may name the proxy's URL.
        raise ProviderError(
            "Stripe unreachable: a timeout or a connection error", retryable=True
        ) from None
    except stripe.StripeError as error:
        status = error.http_status
        raise ProviderError(
            f"Stripe answered {status or 'an unreadable response'}: {_first_line(error)}",
            retryable=status is None or status >= 500,
            retry_after=_retry_after(error),
        ) from None
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]  # the package's own, unannotated


def _retry_after(error: stripe.StripeError) -> float | None:
    value = (error.headers or {}).get("retry-after", "")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _first_line(error: stripe.StripeError) -> str:
    # Stripe's messages name parameters, never the key in full (it shows a masked one).
    return (error.user_message or type(error).__name__).splitlines()[0][:200]
