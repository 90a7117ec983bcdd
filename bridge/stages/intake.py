"""`POST /webhooks/{source}`: verify, read the delivery id, store durably, then answer.

The raw bytes are verified before anything parses them; nothing else runs before the
answer. A 200 means the verified delivery is committed, untranslated: the translate stage
(`bridge.stages.translate`) runs its handler after, and quarantines what the handler cannot
translate instead of refusing it to the provider. Every refusal raises from the error
tree, and the app maps it to a status in one place (`bridge.app`), which the intake's raw
route calls itself, so that what it answers passes through the app's middleware (the HTTP
metrics see the status actually sent).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import msgspec
import structlog
from litestar import Litestar, Request, post
from litestar.exceptions import ClientException, HTTPException, NotFoundException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Response
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send

from bridge import metrics
from bridge.errors import (
    BridgeError,
    EventInvalid,
    HandlerFailed,
    PayloadInvalid,
    SignatureInvalid,
    StoreUnavailable,
)
from bridge.logs import info_line
from bridge.plugin import WebhookRequest
from bridge.registry import Source
from bridge.stages.translate import Translator
from bridge.store import Delivery, Store

__all__ = ["BODY_TIMEOUT", "intake_route"]

log = structlog.get_logger("bridge.intake")

T = TypeVar("T")
#: The app's one mapping of an exception to its answer (`bridge.app.error_response`).
ErrorResponse = Callable[[Request[Any, Any, Any], Exception], Response[Any]]

#: Longest a delivery waits for the store before the provider is told to retry (503).
#: A store that hangs (a stalled disk, a lock held by a stuck transaction) would otherwise
#: hold every request and its connection for as long as it hangs. A delivery committed
#: after its 503 is stored all the same: the provider's retry is then a duplicate.
ACCEPT_TIMEOUT: Final = 10.0
#: Longest the whole body may take to arrive once the headers have. A client that sends
#: its headers and then trickles the body, or never finishes it, would otherwise hold a
#: request, its connection and its buffer for as long as it likes; it is answered 408 and
#: the connection closed. Providers send a webhook's body in one go, in milliseconds.
BODY_TIMEOUT: Final = 30.0
#: How often requests waiting on a deadline are checked against it.
_SWEEP_EVERY: Final = 0.25


class Answer(msgspec.Struct, frozen=True):
    """What a stored delivery is answered with."""

    ok: bool
    result: str


class _Answered:
    """The 200 as a bare ASGI response: its body is prebuilt, so a delivery costs no
    response encoding or header merging (Litestar's `Response` does both on every call)."""

    __slots__ = ("body", "request_id")

    def __init__(self, body: bytes, request_id: str) -> None:
        self.body = body
        self.request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(self.body)),
                    (b"x-request-id", self.request_id.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


class _Waiter:
    __slots__ = ("due", "expired", "task")

    def __init__(self, due: float, task: asyncio.Task[Any]) -> None:
        self.due = due
        self.task: asyncio.Task[Any] | None = task  # None once the store has answered
        self.expired = False


class _Deadline:
    """Holds awaited work to `timeout`, with one timer for every request waiting rather
    than one each: `asyncio.timeout` around each accept cost about 5 us of CPU a delivery
    (7% of intake, measured A/B with bench/intake.py's load). Tasks past their due time
    are cancelled, as `asyncio.timeout` does, and their cancellation becomes `expired()`'s
    error. One per route and limit, so one per event loop; every wait on one has the same
    timeout, so the waiting are in order of due time."""

    __slots__ = ("_expired", "_loop", "_waiting", "timeout")

    def __init__(self, timeout: float, expired: Callable[[float], Exception]) -> None:
        self.timeout = timeout
        self._expired = expired  # the error for a wait cut off at `timeout`
        self._waiting: deque[_Waiter] = deque()  # in order of arrival, so of due time
        self._loop: asyncio.AbstractEventLoop | None = None  # where a sweep is scheduled

    async def run(self, work: Awaitable[T]) -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # a request is always served by a task
        cancelling = task.cancelling()
        if self._loop is not loop:  # no sweep scheduled here yet
            if self._loop is not None and self._loop.is_running():
                return await work  # served from two loops at once
            self._waiting = deque()  # a loop gone with its sweep: what it left is moot
            self._loop = loop
            loop.call_later(_SWEEP_EVERY, self._sweep, loop)
        waiter = _Waiter(loop.time() + self.timeout, task)
        self._waiting.append(waiter)
        try:
            return await work
        except asyncio.CancelledError:
            if waiter.expired and task.uncancel() <= cancelling:
                raise self._expired(self.timeout) from None
            raise
        finally:
            waiter.task = None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # left on a loop that stopped, and runs again
            return
        waiting = self._waiting
        now = loop.time()
        while waiting and (waiting[0].task is None or waiting[0].due <= now):
            waiter = waiting.popleft()
            if waiter.task is not None:
                waiter.expired = True
                waiter.task.cancel()
        if waiting:
            loop.call_later(_SWEEP_EVERY, self._sweep, loop)
        else:
            self._loop = None


def _accept_deadline() -> _Deadline:
    """`store.accept` held to ACCEPT_TIMEOUT: past it, 503 and the provider retries."""
    return _Deadline(
        ACCEPT_TIMEOUT,
        lambda timeout: StoreUnavailable(f"the store did not answer within {timeout:g}s"),
    )


def _body_deadline(timeout: float) -> _Deadline:
    """The body's arrival held to `timeout`: past it, 408, and `Connection: close` makes
    the server drop the connection rather than read the rest as a next request."""
    return _Deadline(
        timeout,
        lambda timeout: ClientException(
            f"the body did not arrive within {timeout:g}s",
            status_code=408,
            headers={"connection": "close"},
        ),
    )


_PATH: Final = "/webhooks/{source:str}"
_TEMPLATE: Final = "/webhooks/{source}"  # the route as Litestar names it (`path_template`)
_BODIES: Final = {
    result: msgspec.json.encode(Answer(ok=True, result=result))
    for result in ("accepted", "duplicate")
}


def intake_route(
    sources: Mapping[str, Source],
    max_body: int,
    error_response: ErrorResponse,
    *,
    body_timeout: float = BODY_TIMEOUT,
) -> HTTPRouteHandler:
    """`POST /webhooks/{source}`, declared as a Litestar route (routing, path parameter,
    OpenAPI, the app's middleware and exception handlers) and served at the ASGI level by
    its own middleware, which answers without calling the handler.

    A handler call builds a `Request`, resolves its parameters through a signature model
    and turns what it returns into a response; measured with bench/intake.py, that is half
    of what a bare Litestar POST costs, and a delivery needs none of it. The handler does
    the same work by the same code, should the middleware ever be taken off. Errors raise
    from the error tree either way, and `error_response` (the app's exception handler)
    answers them.
    """
    mounted = {name: s for name, s in sources.items() if s.configured}
    deadlines = (_body_deadline(body_timeout), _accept_deadline())

    def serve_raw(app: ASGIApp) -> ASGIApp:  # `app`: the handler, which it never calls
        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            http: HTTPScope = scope  # type: ignore[assignment]  # the route takes POST only
            answer: ASGIApp
            try:
                answer = await _intake(mounted, deadlines, http, receive, max_body)
            except Exception as error:
                # Answered here rather than raised: Litestar's exception handler for a
                # route sits inside the route's middleware, so what this middleware raises
                # would be answered outside the app's middleware too, and the HTTP metrics
                # would count every refusal as the 200 they never saw sent.
                request: Request[Any, Any, Any] = Request(scope, receive)
                answer = error_response(request, error).to_asgi_response(app=None, request=request)
            await answer(scope, receive, send)

        return serve

    @post(
        _PATH,
        status_code=200,
        summary="Receive a provider webhook",
        responses={200: ResponseSpec(Answer, description="Stored (or stored before)")},
        middleware=[serve_raw],
    )
    async def webhook(request: Request[Any, Any, Any]) -> _Answered:
        """Verify and durably store one delivery; its handler translates it after the 200
        (what it cannot translate is quarantined, never refused). 200 once stored
        (`accepted`, or `duplicate` for a redelivery); 401 bad or missing signature; 400
        only when not even the delivery's id can be read; 404 unknown or unconfigured
        source; 408 body too slow; 413 too large; 503 when the store cannot take it (the
        provider retries)."""
        return await _intake(mounted, deadlines, request.scope, request.receive, max_body)

    return webhook


async def _intake(
    mounted: Mapping[str, Source],
    deadlines: tuple[_Deadline, _Deadline],
    scope: HTTPScope,
    receive: Receive,
    max_body: int,
) -> _Answered:
    source: str = scope["path_params"]["source"]
    # Header names arrive lower-case (ASGI); the first of repeated ones wins, as with
    # Litestar's `Headers`.
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed([*scope["headers"]])}
    request_id = _request_id(headers)
    app = Litestar.from_scope(scope)
    result = await _receive(
        mounted.get(source), source, app, deadlines, receive, headers, request_id, max_body
    )
    return _Answered(_BODIES[result], request_id)


#: New request ids: unique within the process (a counter) and across processes (a random
#: prefix, drawn again in a forked child), at no cost per request, unlike `uuid4` (a
#: system call each).
_ids: list[Any] = [secrets.token_hex(8), itertools.count()]


def _new_ids() -> None:
    _ids[:] = [secrets.token_hex(8), itertools.count()]


os.register_at_fork(after_in_child=_new_ids)


def _request_id(headers: Mapping[str, str]) -> str:
    """The platform's request id (Fly, Render, a proxy) when it is sane, else a new one."""
    given = headers.get("fly-request-id") or headers.get("x-request-id") or ""
    if 0 < len(given) <= 64 and given.isascii() and given.replace("-", "").isalnum():
        return given
    return f"{_ids[0]}{next(_ids[1]):016x}"


async def _body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The raw body; 413 past `limit`, announced or streamed, 400 for a bad
    Content-Length, as Litestar's `Request.body()` answers."""
    announced = headers.get("content-length")
    if announced is not None:
        try:
            size = int(announced)
        except ValueError:
            raise ClientException(f"Invalid content-length: {announced!r}") from None
        if size > limit:
            raise RequestEntityTooLarge
    chunks: list[bytes] = []
    received = 0
    while True:
        event = await receive()
        if event["type"] == "http.request":
            chunk = event["body"]
            if chunk:
                received += len(chunk)
                if received > limit:
                    raise RequestEntityTooLarge
                chunks.append(chunk)
            if not event.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif event["type"] == "http.disconnect":
            # Nobody is left to read the answer; a 4xx keeps it out of the server errors.
            raise ClientException("client disconnected before the body was complete")


async def _receive(
    found: Source | None,
    source: str,
    app: Litestar,
    deadlines: tuple[_Deadline, _Deadline],
    receive: Receive,
    headers: dict[str, str],
    request_id: str,
    max_body: int,
) -> str:
    started = time.perf_counter()

    def done(result: str, reason: str = "", **fields: Any) -> None:
        metrics.webhook(source if found else "unknown", result, reason)
        line = {
            "source": source,
            "result": result,
            "reason": reason or None,
            "ms": round((time.perf_counter() - started) * 1000, 2),
            "request_id": request_id,
            **fields,
        }
        if result == "failed":
            log.error("webhook", **line)
        else:  # the canonical line of every delivery: written at a few microseconds
            info_line(log, "webhook", line)

    if found is None:
        done("rejected", "unknown_source")
        raise NotFoundException("no configured source by that name")
    body_deadline, accept_deadline = deadlines
    try:
        body = await body_deadline.run(_body(receive, headers, max_body))
    except HTTPException as error:  # 413 over the size limit, 408 past the body deadline
        done("rejected", _BODY_REASONS.get(error.status_code, "body"))
        raise
    incoming = WebhookRequest(source=source, headers=headers, body=body, received_at=time.time())
    handler = found.handler
    store: Store = app.state.store
    stage = "verify"  # where an unexpected exception came from, for its log line
    try:
        handler.scheme.verify(incoming, found.secrets, found.options.tolerance)
        stage = "delivery_id"
        delivery_id = handler.delivery_id(incoming)
        stage = "store"
        delivery = Delivery(
            source=source,
            provider_event_id=delivery_id,
            received_at=incoming.received_at,
            raw_body=body,
            # What translation may read again from the store (never a bearer token).
            headers={h: headers[h] for h in found.kept_headers if h in headers},
        )
        result = await accept_deadline.run(store.append(delivery))
    except BridgeError as error:
        done("rejected", _REASONS.get(type(error), type(error).__name__))
        raise
    except RecursionError:  # msgspec's answer to JSON nested past its depth limit
        done("rejected", "payload")
        raise PayloadInvalid("the JSON body nests too deeply") from None
    except Exception as error:
        # A bug, most likely in the handler's code (its scheme or delivery_id), not in
        # the delivery. 503 rather than 400: the provider retries, so
        # once the handler is fixed the delivery arrives again and nothing is lost; a 4xx
        # would blame the sender. The log line and the message name the exception's type
        # only: its text and traceback may quote the payload or a secret.
        failed = type(error).__name__
        metrics.unexpected(_TEMPLATE, failed)
        if stage == "store":  # a store that raised outside the tree cannot take it now
            done("failed", "store_failed", error=failed)
            raise StoreUnavailable(f"the store failed: {failed}") from None
        done("failed", "handler_failed", stage=stage, error=failed)
        raise HandlerFailed(error) from None
    if result == "accepted":
        translator: Translator = app.state.translator
        translator.wake()
    done(result, delivery=delivery_id)
    return result


_BODY_REASONS: Final = {413: "too_large", 408: "body_timeout"}
_REASONS: Final[dict[type[BridgeError], str]] = {
    SignatureInvalid: "signature",
    PayloadInvalid: "payload",
    EventInvalid: "payload",
    StoreUnavailable: "store_unavailable",
}
