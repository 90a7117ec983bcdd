"""`POST /webhooks/{source}`: verify, translate, store durably, then answer.

The raw bytes are verified before anything parses them. A 200 means the delivery (or the
decision to ignore it) is committed; every refusal raises from the error tree, and the
app maps it to a status in one place (`bridge.app`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog
from litestar import Request, Response, post
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from bridge.errors import BridgeError
from bridge.events import Forget, Identify, Track
from bridge.forwarder import Forwarder
from bridge.plugin import WebhookRequest
from bridge.registry import Source
from bridge.store import Delivery, Store, route_of

__all__ = ["intake_route"]

log = structlog.get_logger("bridge.intake")


def intake_route(sources: Mapping[str, Source]) -> HTTPRouteHandler:
    mounted = {name: s for name, s in sources.items() if s.configured}

    @post("/webhooks/{source:str}", status_code=200, summary="Receive a provider webhook")
    async def webhook(source: FromPath[str], request: Request[Any, Any, Any]) -> Response[Any]:
        """Verify, translate and durably store one delivery. 200 once stored (or knowingly
        ignored); 401 bad signature; 400 malformed body; 404 unknown source; 413 too large;
        503 when the store cannot take it."""
        started = time.perf_counter()
        found = mounted.get(source)
        if found is None:
            raise NotFoundException(f"no configured source {source!r}")
        incoming = WebhookRequest(
            source=source,
            headers=dict(request.headers),
            body=await request.body(),
            received_at=time.time(),
        )
        handler = found.handler
        store: Store = request.app.state.store
        try:
            handler.scheme.verify(incoming, found.secrets, found.options.tolerance)
            payload = handler.parse(incoming)
            delivery_id = handler.delivery_id(incoming, payload)
            calls = handler.translate(incoming, payload, found.options)
            result = await store.accept(
                Delivery(
                    source=source,
                    provider_event_id=delivery_id,
                    received_at=incoming.received_at,
                    raw_body=incoming.body,
                    calls=calls,
                    headers={
                        h: incoming.headers[h]
                        for h in handler.scheme.headers
                        if h in incoming.headers
                    },
                )
            )
        except BridgeError as error:
            log.info(
                "webhook",
                source=source,
                result="rejected",
                reason=type(error).__name__,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            raise
        outcome = "ignored" if result == "accepted" and not calls else result
        if outcome == "accepted":
            forwarder: Forwarder = request.app.state.forwarder
            for route in {route_of(c) for c in calls if isinstance(c, Track | Identify | Forget)}:
                forwarder.wake(route)
        log.info(
            "webhook",
            source=source,
            delivery=delivery_id,
            result=outcome,
            calls=len(calls),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return Response({"ok": True, "result": outcome})

    return webhook
