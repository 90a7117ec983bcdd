"""The relay: `POST /v1/track`, `/v1/identify`, `/v1/batch` and `/v1/forget` on the bridge.

Millimetric's own ingest API (the same bodies, answers and errors, from
`bridge.ingest_api`, which the local sink serves too), for the user's own servers, on the
pipeline as webhook intake is (`bridge.stages.intake`). Mounted only when
`BRIDGE_RELAY_KEYS` is set; clients authenticate with one of those keys.

Before its 202 a request is authenticated, its body read and checked by the event
Structs (a 400 `invalid_payload` names the field), its tracks completed (an event_id and
a timestamp where they name none, so that the answer carries the event_id), and its calls
appended to the inbox as one delivery of source `relay` (`Store.append`: group commit
with whatever else arrives, webhooks included); the 202 follows once that is durable. The
translate stage then turns the delivery into its calls like any other
(`bridge.stages.relay_handler`), and the outbox's rules apply to them: one `event_id`
queued once, what is learned about a visitor, erasure and a forget's order.

A forget does what `millimetric-bridge forget` does, before its 202: what waits for
translation is translated first (`Translator.catch_up`: the calls sent before the forget
reach the outbox, and the visitors they link to the user are known), then the forget is
stored with `Store.accept` (the user's calls not in flight erased, their tombstone
recorded, Millimetric's forget queued after every earlier call about them) and the
erasure reaches the disk (`Store.erase`).

The routes are served at the ASGI level, as intake is: a route middleware reads the body
from `receive` and answers without a `Request` or a handler call. Above
`BRIDGE_RELAY_MAX_PENDING` calls waiting, the relay answers 429 `rate_limited` to tracks,
identifies and batches (a forget and webhook intake never look at it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import secrets
import time
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import msgspec
import structlog
from litestar import Request, post
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send

from bridge import metrics
from bridge.errors import IngestRefused, StoreUnavailable
from bridge.events import Forget, Identify, Track
from bridge.ingest_api import Batch, bearer_key, check_scope, error_body, parse_call
from bridge.logs import info_line
from bridge.registry import RELAY_SOURCE
from bridge.stages.forward import Forwarder

# The intake's raw-serving helpers: the body read under a limit and a deadline, the store
# waited on under a deadline, request ids.
from bridge.stages.intake import (
    ErrorResponse,
    _accept_deadline,
    _body,
    _body_deadline,
    _Deadline,
    _request_id,
)
from bridge.stages.relay_handler import Relayed, encoded
from bridge.stages.translate import Translator
from bridge.store import Delivery, Store

__all__ = ["RELAY_SOURCE", "Relay", "new_event_id", "relay_routes"]

log = structlog.get_logger("bridge.relay")
T = TypeVar("T")

#: How often the relay reads how many calls are waiting (`Store.backlog`, cheap but not free).
BACKLOG_EVERY: Final = 1.0
#: What a client is told to wait when the backlog is at its cap.
FULL_RETRY_AFTER: Final = 5
#: Within this many calls of the cap (or 1% of it), a read of the backlog counts exactly.
EXACT_WITHIN: Final = 2000
#: Longest a forget translates what came before it; past that, the forget is carried out
#: and what is left is reached as it is translated (`Translator.catch_up`).
CATCH_UP_SECONDS: Final = 5.0

_encoder: Final = msgspec.json.Encoder()
_OK: Final = b'{"ok":true}'
_BODY_ERRORS: Final = {413: "payload_too_large", 408: "request_timeout"}

#: Event ids the bridge gives tracks sent without one, and the relay's delivery ids: a
#: random prefix (drawn again in a forked child) and a counter, unique across processes
#: and restarts at no cost per call.
_ids: list[Any] = [secrets.token_hex(8), itertools.count()]


def _new_ids() -> None:
    _ids[:] = [secrets.token_hex(8), itertools.count()]


os.register_at_fork(after_in_child=_new_ids)


def new_event_id() -> str:
    return f"{_ids[0]}{next(_ids[1]):016x}"


class Relay:
    """The keys the relay accepts, its cap on the backlog, and how it stores calls."""

    def __init__(self, keys: Sequence[str], max_pending: int) -> None:
        # Compared as digests: constant time whatever the given key's length.
        self._keys = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.max_pending = max_pending
        # The calls waiting as last read (the outbox's pending rows, and the deliveries
        # waiting for translation at one call each: a relay batch counts its calls once
        # translated, a moment later), and the calls this relay appended since: a cap
        # that holds between two reads. Near the cap, a read waits for the appends under
        # way and holds new ones until it is done (`_held`), so that it knows exactly
        # which of the relay's calls it counted; further off, a read holds nothing up
        # (counting a big backlog takes milliseconds), and the calls appended while it
        # ran may count twice until the next.
        self._waiting = 0
        self._appended = 0  # calls appended by this relay, ever
        self._appended_at_read = 0
        self._in_flight = 0  # appends under way
        self._held: asyncio.Event | None = None  # set once an exact read is done
        self._drained: asyncio.Event | None = None  # set when the appends under way end
        self._read_at = float("-inf")
        self._reading: asyncio.Task[None] | None = None
        self._bound: tuple[Store, Translator, Forwarder] | None = None

    def bind(self, store: Store, translator: Translator, forwarder: Forwarder) -> None:
        """The app's store and stages, from its lifespan (held here: Litestar's `State`
        costs microseconds a lookup, on every call)."""
        self._bound = (store, translator, forwarder)

    @property
    def bound(self) -> tuple[Store, Translator, Forwarder]:
        if self._bound is None:
            raise StoreUnavailable("the relay is not started")
        return self._bound

    def known(self, key: str) -> bool:
        given = hashlib.sha256(key.encode()).digest()
        found = False
        for expected in self._keys:  # every one compared: the time says nothing
            found |= hmac.compare_digest(given, expected)
        return found

    def check_room(self, store: Store) -> None:
        """429 `rate_limited` while `max_pending` calls or more are waiting."""
        now = time.monotonic()
        estimate = self._waiting + self._appended - self._appended_at_read
        if self._reading is None and now - self._read_at >= BACKLOG_EVERY:
            near = estimate >= self.max_pending - max(EXACT_WITHIN, self.max_pending // 100)
            self._reading = asyncio.create_task(self._read_backlog(store, exact=near))
        if estimate >= self.max_pending:
            raise IngestRefused(
                429,
                "rate_limited",
                f"the bridge holds {self.max_pending} or more calls waiting to be sent "
                "(BRIDGE_RELAY_MAX_PENDING); try again later",
                headers={"retry-after": str(FULL_RETRY_AFTER)},
            )

    async def _read_backlog(self, store: Store, *, exact: bool) -> None:
        held = None
        try:
            if exact:
                held = self._held = asyncio.Event()
                while self._in_flight:
                    self._drained = asyncio.Event()
                    await self._drained.wait()
            appended = self._appended
            backlog = await store.backlog()
            self._waiting = backlog.pending + backlog.untranslated
            self._appended_at_read = appended
        except Exception as error:  # the last reading stands; appends meet the fault
            log.warning("relay cannot read the backlog", error=type(error).__name__)
        finally:
            if held is not None:
                self._held = None
                held.set()
            self._read_at = time.monotonic()
            self._reading = None

    async def append(self, store: Store, delivery: Delivery, calls: int) -> None:
        """Append one request's delivery durably; count its `calls` against the cap."""
        while (held := self._held) is not None:
            await held.wait()
        self._in_flight += 1
        try:
            await _stored(store.append(delivery))
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._drained is not None:
                self._drained.set()
        self._appended += calls

    async def forget(self, call: Forget, received_at: float) -> None:
        """As `millimetric-bridge forget` does, once what came before it is translated:
        erased now, to the disk, and Millimetric's forget queued after every earlier call
        about the user."""
        store, translator, forwarder = self.bound
        await _stored(translator.catch_up(CATCH_UP_SECONDS))
        delivery = Delivery(
            source=RELAY_SOURCE,
            provider_event_id=f"relay-{new_event_id()}",
            received_at=received_at,
            calls=[call],
        )
        await _stored(store.accept(delivery))
        await _stored(store.erase(call.user_id))
        forwarder.wake("forget")


async def _stored(work: Awaitable[T]) -> T:
    """What the store answers; an exception outside the error tree becomes
    `StoreUnavailable` naming its type only (its text may quote a call), as at intake."""
    try:
        return await work
    except StoreUnavailable:
        raise
    except Exception as error:
        log.error("relay store failed", error=type(error).__name__)
        raise StoreUnavailable(f"the store failed: {type(error).__name__}") from None


def _prepared(call: Track | Identify | Batch, received_at: float) -> tuple[Relayed, int, bytes]:
    """What to store, how many calls it holds, and the answer's body. A track gets an
    event_id when it has none (returned in the answer) and the time it arrived when it
    names none: sent later, after an outage, it still counts when it happened."""
    now = datetime.fromtimestamp(received_at, UTC)
    if isinstance(call, Track):
        track = _completed(call, now)
        answer = b'{"ok":true,"event_id":' + _encoder.encode(track.event_id) + b"}"
        return Relayed(events=[track]), 1, answer
    if isinstance(call, Batch):
        events = [_completed(event, now) for event in call.events]
        return Relayed(events=events), len(events), b'{"ok":true,"accepted":%d}' % len(events)
    return Relayed(identify=call), 1, _OK


def _completed(track: Track, now: datetime) -> Track:
    # Completed in place: the Track was decoded for this request alone, and what is set
    # needs no check (`structs.replace` would run every check again, 4 us a track).
    if track.event_id is None:
        msgspec.structs.force_setattr(track, "event_id", new_event_id())
    if track.timestamp is None:
        msgspec.structs.force_setattr(track, "timestamp", now)
    return track


class _Answer:
    """An answer as a bare ASGI response, its body built already."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, request_id: str, **headers: str) -> None:
        self.status = status
        self.body = body
        self.headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode("latin-1")),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


async def _relay(
    relay: Relay,
    route: str,
    deadlines: tuple[_Deadline, _Deadline],
    scope: HTTPScope,
    receive: Receive,
    max_body: int,
) -> _Answer:
    started = time.perf_counter()
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed([*scope["headers"]])}
    request_id = _request_id(headers)
    calls = 0

    def done(result: str, reason: str | None, status: int) -> None:
        metrics.relay(route, result, reason or "")
        line = {
            "source": RELAY_SOURCE,
            "route": route,
            "result": result,
            "reason": reason,
            "status": status,
            "calls": calls,
            "ms": round((time.perf_counter() - started) * 1000, 2),
            "request_id": request_id,
        }
        if result == "failed":
            log.error("relay", **line)
        else:  # the canonical line of every relay request, at a few microseconds
            info_line(log, "relay", line)

    store, translator, _ = relay.bound
    body_deadline, accept_deadline = deadlines
    try:
        key = bearer_key(headers.get("authorization"))
        # What the key's kind may not do, before whether it is known: the relay knows only
        # sk_ keys, so a pk_ or rk_ key is refused for what it is, as Millimetric would.
        check_scope(route, key)
        if not relay.known(key):
            raise IngestRefused(401, "invalid_api_key")
        if route != "forget":  # an erasure is never put off: it adds one call, frees more
            relay.check_room(store)
        try:
            body = await body_deadline.run(_body(receive, headers, max_body))
        except HTTPException as error:  # 413 over the size limit, 408 past the deadline
            raise IngestRefused(
                error.status_code,
                _BODY_ERRORS.get(error.status_code, "invalid_request"),
                error.detail,
                headers=dict(error.headers or {}),
            ) from None
        received_at = time.time()
        call = parse_call(route, body)
        stored: Awaitable[None]
        if isinstance(call, Forget):
            calls, answer = 1, _OK
            stored = relay.forget(call, received_at)
        else:
            relayed, calls, answer = _prepared(call, received_at)
            delivery = Delivery(
                source=RELAY_SOURCE,
                provider_event_id=f"relay-{new_event_id()}",
                received_at=received_at,
                raw_body=encoded(relayed),
            )
            stored = relay.append(store, delivery, calls)
        try:
            await accept_deadline.run(stored)
        except StoreUnavailable as error:
            raise IngestRefused(
                503, "store_unavailable", str(error), headers={"retry-after": "5"}
            ) from None
    except IngestRefused as refusal:
        done("rejected", refusal.code, refusal.status)
        return _Answer(
            refusal.status, error_body(refusal.code, refusal.message), request_id, **refusal.headers
        )
    except Exception as error:  # a bug: logged by type here, answered by the last resort
        done("failed", type(error).__name__, 503)
        raise
    if route != "forget":
        translator.wake()
    metrics.relayed(route, calls)
    done("accepted", None, 202)
    return _Answer(202, answer, request_id)


def relay_routes(
    relay: Relay, max_body: int, error_response: ErrorResponse, *, body_timeout: float
) -> list[HTTPRouteHandler]:
    """The four routes, each declared as a Litestar route (routing, OpenAPI, the app's
    middleware) and served by its own middleware at the ASGI level, as intake is."""
    deadlines = (_body_deadline(body_timeout), _accept_deadline())

    def route_handler(route: str, summary: str) -> HTTPRouteHandler:
        def serve_raw(app: ASGIApp) -> ASGIApp:  # `app`: the handler, which it never calls
            async def serve(scope: Scope, receive: Receive, send: Send) -> None:
                http: HTTPScope = scope  # type: ignore[assignment]  # the route takes POST only
                answer: ASGIApp
                try:
                    answer = await _relay(relay, route, deadlines, http, receive, max_body)
                except Exception as error:  # a bug: the app's last resort answers 503
                    request: Request[Any, Any, Any] = Request(scope, receive)
                    answer = error_response(request, error).to_asgi_response(
                        app=None, request=request
                    )
                await answer(scope, receive, send)

            return serve

        async def handler(request: Request[Any, Any, Any]) -> _Answer:
            return await _relay(relay, route, deadlines, request.scope, request.receive, max_body)

        handler.__doc__ = (
            "Millimetric's ingest API, relayed: the same body, answers and errors. 202 once "
            "the call is stored (sent to Millimetric after); 400 invalid_payload; 401 "
            "malformed_api_key or invalid_api_key (a key from BRIDGE_RELAY_KEYS); 403 for a "
            "pk_ key, an rk_ key, or a forget without an sk_ key; 413 body too large; 429 "
            "rate_limited while BRIDGE_RELAY_MAX_PENDING calls wait (never for a forget); "
            "503 the store cannot take it (retry with the same event_id)."
        )
        return post(
            f"/v1/{route}",
            status_code=202,
            summary=summary,
            tags=["relay"],
            middleware=[serve_raw],
            name=f"relay-{route}",
            operation_id=f"relay_{route}",
        )(handler)

    return [
        route_handler("track", "Relay one event"),
        route_handler("identify", "Relay an identify"),
        route_handler("batch", "Relay up to 500 events"),
        route_handler("forget", "Erase a user, here and at Millimetric"),
    ]
