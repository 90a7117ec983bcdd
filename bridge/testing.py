"""Helpers for testing handlers, ours and third-party ones alike.

    from bridge.testing import run_handler, signed_request

    calls = run_handler(handler, body)                     # what a delivery becomes
    request = signed_request(handler, body, secret="...")  # a request that verifies
    later = stored_request(handler, request)               # as translation will see it

`run_handler` goes through the same steps as the bridge: the intake's (verify with a fresh
signature, delivery id), then translation's, from the request as it is rebuilt from the
store (parse and translate seeing only the kept headers), and validates every call
against the ingest limits.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from bridge.events import Output
from bridge.plugin import Handler, SourceOptions, WebhookRequest, kept_headers

__all__ = [
    "TEST_SECRET",
    "Translated",
    "run_handler",
    "sign",
    "signed_request",
    "stored_request",
]

TEST_SECRET = "whsec_dGVzdCBzZWNyZXQgZm9yIGhhbmRsZXIgdGVzdHM="  # noqa: S105 (a test fixture)


def sign(
    handler: Handler, body: bytes, secret: str = TEST_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    """Headers that make `body` a validly signed delivery for this handler's scheme."""
    return handler.scheme.sign(body, secret, int(time.time()) if timestamp is None else timestamp)


def signed_request(
    handler: Handler,
    body: bytes,
    *,
    secret: str = TEST_SECRET,
    timestamp: int | None = None,
    headers: Mapping[str, str] | None = None,
    source: str | None = None,
) -> WebhookRequest:
    """A request as the intake builds it, signed for `handler`; `headers` add to (or
    override) the signature headers, e.g. a provider's topic header. Values are sent as
    UTF-8 and read as the intake reads them (latin-1, see `WebhookRequest`)."""
    all_headers = {**sign(handler, body, secret, timestamp), **(headers or {})}
    return WebhookRequest(
        source=source or handler.name,
        headers={k.lower(): v.encode().decode("latin-1") for k, v in all_headers.items()},
        body=body,
        received_at=time.time(),
    )


def stored_request(handler: Handler, request: WebhookRequest) -> WebhookRequest:
    """`request` as translation sees it, rebuilt from the store after the intake answered:
    the same body, source and arrival time, and only the headers the bridge keeps for
    `handler` (`bridge.plugin.kept_headers`). A handler that reads a header it does not
    list in `headers` finds it missing here, as it would in production."""
    kept = kept_headers(handler)
    return WebhookRequest(
        source=request.source,
        headers={h: v for h, v in request.headers.items() if h in kept},
        body=request.body,
        received_at=request.received_at,
    )


class Translated:
    """What one delivery became: the provider's delivery id and the calls."""

    def __init__(self, delivery_id: str, calls: list[Output]) -> None:
        self.delivery_id = delivery_id
        self.calls = calls

    def __repr__(self) -> str:
        return f"Translated({self.delivery_id!r}, {self.calls!r})"


def run_handler(
    handler: Handler,
    body: bytes,
    *,
    options: SourceOptions | None = None,
    headers: Mapping[str, str] | None = None,
    **option_values: Any,
) -> Translated:
    """Verify one body and read its delivery id as the intake would, then parse and
    translate it from the stored request as translation would; test-mode events are
    included unless the options say otherwise."""
    if options is None:
        option_values.setdefault("include_test_events", True)
        options = handler.options_type(**option_values)
    request = signed_request(handler, body, headers=headers)
    handler.scheme.verify(request, [TEST_SECRET], options.tolerance)
    delivery_id = handler.delivery_id(request)
    stored = stored_request(handler, request)
    return Translated(delivery_id, handler.translate(stored, handler.parse(stored), options))
