"""The relay: `POST /v1/track`, `/v1/identify`, `/v1/batch` and `/v1/forget` on the bridge.

Millimetric's own ingest API (the same bodies, answers and errors, from
`bridge.ingest_api`, which the local sink serves too), for the user's own servers: a call
is stored in the outbox before its 202, then forwarded like a webhook's calls (batched,
within the rate limits, retried through outages). Mounted only when `BRIDGE_RELAY_KEYS`
is set; clients authenticate with one of those keys.

A call is stored as a delivery of source `relay` with its calls already made, as the
operator's forget is (`Store.accept`), so the outbox's rules apply to it as to any other:
one `event_id` queued once, what is learned about a visitor, erasure and a forget's
order. Calls arriving together are stored together (group commit): while one group is
committed the next gathers, and each caller is answered once its own group is durable. A
forget goes alone, after every call taken before it, then erases as `millimetric-bridge
forget` does.

The routes are served at the ASGI level, as intake is (`bridge.stages.intake`): a route
middleware reads the body from `receive` and answers without a `Request` or a handler
call. Above `BRIDGE_RELAY_MAX_PENDING` calls waiting to be sent, the relay answers 429
`rate_limited` (webhook intake never looks at it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import structlog
from litestar import Request, post
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send

from bridge import metrics
from bridge.errors import IngestRefused, StoreUnavailable
from bridge.events import Call, Forget, Identify, Output, Track
from bridge.ingest_api import Batch, bearer_key, check_scope, error_body, parse_call
from bridge.logs import info_line
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
from bridge.store import Delivery, Route, Store, settle

__all__ = ["RELAY_SOURCE", "Relay", "relay_routes"]

log = structlog.get_logger("bridge.relay")

#: The source of the deliveries the relay stores.
RELAY_SOURCE: Final = "relay"
#: How often the relay reads how many calls are waiting (`Store.backlog`, cheap but not free).
BACKLOG_EVERY: Final = 1.0
#: What a client is told to wait when the backlog is at its cap.
FULL_RETRY_AFTER: Final = 5
#: Most calls one group commit stores (whole requests: a batch is never split).
MAX_GROUP_CALLS: Final = 2000

_encoder: Final = msgspec.json.Encoder()
_OK: Final = b'{"ok":true}'
_BODY_ERRORS: Final = {413: "payload_too_large", 408: "request_timeout"}

#: Event ids the bridge gives tracks sent without one: a random prefix (drawn again in a
#: forked child) and a counter, unique across processes and restarts at no cost per call.
_ids: list[Any] = [secrets.token_hex(8), itertools.count()]


def _new_ids() -> None:
    _ids[:] = [secrets.token_hex(8), itertools.count()]


os.register_at_fork(after_in_child=_new_ids)


def new_event_id() -> str:
    return f"{_ids[0]}{next(_ids[1]):016x}"


class _Taken:
    """One request's calls, waiting for their group's commit."""

    __slots__ = ("calls", "forget", "future", "routes")

    def __init__(self, calls: list[Call], routes: set[Route], future: asyncio.Future[None]) -> None:
        self.calls = calls
        self.routes = routes
        self.future = future
        self.forget = calls[0].user_id if isinstance(calls[0], Forget) else None


class Relay:
    """The keys the relay accepts, its cap on the backlog, and its group commit."""

    def __init__(self, keys: Sequence[str], max_pending: int) -> None:
        # Compared as digests: constant time whatever the given key's length.
        self._keys = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.max_pending = max_pending
        self._waiting: list[_Taken] = []
        self._committing: asyncio.Task[None] | None = None
        # The backlog as last read, and the calls stored since: a cap that holds between
        # two reads. Near the cap, a read and a group's commit take turns (`_turn`), so
        # that the read knows exactly which of the relay's calls it counted; further off,
        # a read does not hold commits up (counting a big backlog takes milliseconds), and
        # the calls committed while it ran may count twice until the next.
        self._turn = asyncio.Lock()
        self._pending = 0
        self._stored = 0  # calls stored by this relay, ever
        self._stored_at_read = 0
        self._read_at = float("-inf")
        self._reading: asyncio.Task[None] | None = None
        self._bound: tuple[Store, Forwarder] | None = None

    def bind(self, store: Store, forwarder: Forwarder) -> None:
        """The app's store and forwarder, from its lifespan (held here: Litestar's `State`
        costs microseconds a lookup, on every call)."""
        self._bound = (store, forwarder)

    @property
    def bound(self) -> tuple[Store, Forwarder]:
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
        """429 `rate_limited` while `max_pending` calls or more are waiting to be sent."""
        now = time.monotonic()
        estimate = self._pending + self._stored - self._stored_at_read
        if self._reading is None and now - self._read_at >= BACKLOG_EVERY:
            near = estimate >= self.max_pending - max(MAX_GROUP_CALLS, self.max_pending // 100)
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
        try:
            if exact:
                async with self._turn:
                    backlog = await store.backlog()
                    stored = self._stored
            else:
                stored = self._stored
                backlog = await store.backlog()
            self._pending, self._stored_at_read = backlog.pending, stored
        except Exception as error:  # the last reading stands; accepts meet the fault
            log.warning("relay cannot read the backlog", error=type(error).__name__)
        finally:
            self._read_at = time.monotonic()
            self._reading = None

    async def take(self, store: Store, calls: list[Call], routes: set[Route]) -> None:
        """Store `calls` durably (with whatever arrives meanwhile); raise what the store
        raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Taken(calls, routes, future))
        if self._committing is None:
            self._committing = asyncio.create_task(self._commit(store))
        await future

    async def _commit(self, store: Store) -> None:
        """Commit what is waiting, group after group, in arrival order."""
        try:
            while self._waiting:
                count, end = 0, 0
                while end < len(self._waiting) and (
                    end == 0 or count + len(self._waiting[end].calls) <= MAX_GROUP_CALLS
                ):
                    count += len(self._waiting[end].calls)
                    end += 1
                group = self._waiting[:end]
                del self._waiting[:end]
                # Those answered already (past their deadline: 503) are not stored late.
                run: list[_Taken] = []
                for taken in group:
                    if taken.future.done():
                        continue
                    if taken.forget is None:
                        run.append(taken)
                        continue
                    await self._store_in_turn(store, run)
                    await self._store_in_turn(store, [taken])  # alone, after what came first
                    run = []
                await self._store_in_turn(store, run)
        finally:
            self._committing = None

    async def _store_in_turn(self, store: Store, run: list[_Taken]) -> None:
        async with self._turn:
            await self._store(store, run)

    async def _store(self, store: Store, run: list[_Taken]) -> None:
        run = [taken for taken in run if not taken.future.done()]
        if not run:
            return
        calls: list[Output] = [call for taken in run for call in taken.calls]
        delivery = Delivery(
            source=RELAY_SOURCE,
            provider_event_id=f"relay-{new_event_id()}",
            received_at=time.time(),
            calls=calls,
        )
        try:
            await store.accept(delivery)
            if run[0].forget is not None:
                # As `millimetric-bridge forget` does: erased now, to the disk.
                await store.erase(run[0].forget)
        except Exception as error:
            if len(run) == 1:
                if not isinstance(error, StoreUnavailable):
                    # A store raising outside the tree cannot take it now; as at intake, its
                    # type is told, never its text (it may quote a call).
                    log.error("relay store failed", error=type(error).__name__)
                    error = StoreUnavailable(f"the store failed: {type(error).__name__}")
                settle(run[0].future, None, error)
                return
            # One at a time: a call the store refuses fails alone.
            for taken in run:
                await self._store(store, [taken])
            return
        self._stored += len(calls)
        for taken in run:
            settle(taken.future, None)


def _prepared(
    route: str, call: Track | Identify | Batch | Forget, received_at: float
) -> tuple[list[Call], set[Route], bytes]:
    """The calls to store and the answer's body. A track gets an event_id when it has none
    (returned in the answer) and the time it arrived when it names none: sent later, after
    an outage, it still counts when it happened."""
    now = datetime.fromtimestamp(received_at, UTC)
    if isinstance(call, Track):
        track = _completed(call, now)
        answer = b'{"ok":true,"event_id":' + _encoder.encode(track.event_id) + b"}"
        return [track], _track_routes(track), answer
    if isinstance(call, Batch):
        events: list[Call] = [_completed(event, now) for event in call.events]
        routes: set[Route] = {"track"}
        for event in call.events:
            routes |= _track_routes(event)
        return events, routes, b'{"ok":true,"accepted":%d}' % len(events)
    if isinstance(call, Identify):
        return [call], {"identify"}, _OK
    return [call], {"forget"}, _OK


def _completed(track: Track, now: datetime) -> Track:
    if track.event_id is not None and track.timestamp is not None:
        return track
    return msgspec.structs.replace(
        track, event_id=track.event_id or new_event_id(), timestamp=track.timestamp or now
    )


def _track_routes(track: Track) -> set[Route]:
    # A track naming both ids may teach the bridge the link: an identify is queued first.
    return {"track", "identify"} if track.anonymous_id and track.user_id else {"track"}


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
    calls: list[Call] = []

    def done(result: str, reason: str | None, status: int) -> None:
        metrics.relay(route, result, reason or "")
        line = {
            "source": RELAY_SOURCE,
            "route": route,
            "result": result,
            "reason": reason,
            "status": status,
            "calls": len(calls),
            "ms": round((time.perf_counter() - started) * 1000, 2),
            "request_id": request_id,
        }
        if result == "failed":
            log.error("relay", **line)
        else:  # the canonical line of every relay request, at a few microseconds
            info_line(log, "relay", line)

    store, forwarder = relay.bound
    body_deadline, accept_deadline = deadlines
    try:
        key = bearer_key(headers.get("authorization"))
        # What the key's kind may not do, before whether it is known: the relay knows only
        # sk_ keys, so a pk_ or rk_ key is refused for what it is, as Millimetric would.
        check_scope(route, key)
        if not relay.known(key):
            raise IngestRefused(401, "invalid_api_key")
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
        calls, routes, answer = _prepared(route, parse_call(route, body), received_at)
        try:
            await accept_deadline.run(relay.take(store, calls, routes))
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
    for woken in routes:
        forwarder.wake(woken)
    metrics.relayed(route, len(calls))
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
            "rate_limited while BRIDGE_RELAY_MAX_PENDING calls wait; 503 the store cannot "
            "take it (retry with the same event_id)."
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
