"""`POST /webhooks/{source}`: verify, translate, store durably, then answer.

The raw bytes are verified before anything parses them. A 200 means the delivery (or the
decision to ignore it) is committed; every refusal raises from the error tree, and the
app maps it to a status in one place (`bridge.app`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

import structlog
from litestar import Request, Response, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from bridge import metrics
from bridge.errors import (
    BridgeError,
    EventInvalid,
    PayloadInvalid,
    SignatureInvalid,
    StoreUnavailable,
)
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
        request_id = _request_id(request)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            response = await _receive(mounted.get(source), source, request)
        response.headers["x-request-id"] = request_id
        return response

    return webhook


def _request_id(request: Request[Any, Any, Any]) -> str:
    """The platform's request id (Fly, Render, a proxy) when it is sane, else a new one."""
    given = request.headers.get("fly-request-id") or request.headers.get("x-request-id") or ""
    if 0 < len(given) <= 64 and given.isascii() and given.replace("-", "").isalnum():
        return given
    return uuid.uuid4().hex


async def _receive(
    found: Source | None, source: str, request: Request[Any, Any, Any]
) -> Response[Any]:
    started = time.perf_counter()

    def done(result: str, reason: str = "", **fields: Any) -> None:
        metrics.WEBHOOKS.labels(source if found else "unknown", result, reason).inc()
        log.info(
            "webhook",
            source=source,
            result=result,
            reason=reason or None,
            ms=round((time.perf_counter() - started) * 1000, 2),
            **fields,
        )

    if found is None:
        done("rejected", "unknown_source")
        raise NotFoundException("no configured source by that name")
    try:
        body = await request.body()
    except HTTPException as error:  # 413 from the body-size limit
        done("rejected", "too_large" if error.status_code == 413 else "body")
        raise
    incoming = WebhookRequest(
        source=source, headers=dict(request.headers), body=body, received_at=time.time()
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
                raw_body=body,
                calls=calls,
                headers={
                    h: incoming.headers[h] for h in handler.scheme.headers if h in incoming.headers
                },
            )
        )
    except BridgeError as error:
        done("rejected", _REASONS.get(type(error), type(error).__name__))
        raise
    except RecursionError:  # msgspec's answer to JSON nested past its depth limit
        done("rejected", "payload")
        raise PayloadInvalid("the JSON body nests too deeply") from None
    sent = [c for c in calls if isinstance(c, Track | Identify | Forget)]
    # Ignored: nothing to send and nothing for the store to do (a Purge is not ignored).
    outcome = "ignored" if result == "accepted" and not calls else result
    if outcome == "accepted":
        forwarder: Forwarder = request.app.state.forwarder
        for route in {route_of(c) for c in sent}:
            forwarder.wake(route)
    done(outcome, delivery=delivery_id, calls=len(sent))
    return Response({"ok": True, "result": outcome})


_REASONS: Final[dict[type[BridgeError], str]] = {
    SignatureInvalid: "signature",
    PayloadInvalid: "payload",
    EventInvalid: "payload",
    StoreUnavailable: "store_unavailable",
}
