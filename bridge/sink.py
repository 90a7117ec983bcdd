"""A local stand-in for the Millimetric ingest API, strict about its contract.

Dev mode, the tests and the benchmarks talk to it. It checks keys the way Millimetric does
(401 `malformed_api_key` / `invalid_api_key`, 403 `origin_not_allowed` for a `pk_` key,
403 `forget_requires_secret_key`), validates each route's body with the same Structs the
bridge sends (400 `invalid_payload` naming the field), enforces 500 events / 256 KB per
batch, the published per-key rate limits (429 with `Retry-After`) and idempotency on
`event_id`.

Beyond the contract, under `/_sink/`: what it received (`events`), counters (`stats`),
fault knobs (`knobs`: fail for the first N seconds, error rate, added latency, dropped
connections, limits off, the Retry-After of a 429, the accepted keys) and `reset`. Those
two change the sink, so they refuse what a web page could send them from another site
(see `_foreign`). A `rk_` key, read-only at Millimetric, gets 403 `read_only_key` on
ingest routes: the contract names no code for that case.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from bridge.errors import IngestRefused
from bridge.events import Track
from bridge.ingest_api import ROUTES, Batch, bearer_key, check_scope, error_body, parse_call
from bridge.ratelimit import BATCH_LIMIT, TRACK_LIMIT, RateLimit, TokenBucket

__all__ = ["DEV_KEY", "SinkKnobs", "SinkState", "create_sink_app"]

#: The key dev mode uses; the sink knows it (and its browser and read-only siblings).
DEV_KEY: Final = "sk_dev_local_bridge"
DEV_KEYS: Final = (DEV_KEY, "pk_dev_local_bridge", "rk_dev_local_bridge")

_LIMITS: Final[dict[str, RateLimit]] = {"track": TRACK_LIMIT, "batch": BATCH_LIMIT}
_encoder: Final = msgspec.json.Encoder()


class SinkKnobs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults to inject. Posting a partial object to `/_sink/knobs` changes only what it names."""

    fail_for_seconds: float = 0.0  # answer `fail_status` until this many seconds after set
    fail_status: int = 503
    error_rate: float = 0.0  # share of requests answered 500, at random
    latency_ms: float = 0.0  # added to every ingest answer
    drop_rate: float = 0.0  # share of ingest requests handled, then cut off with no answer
    limits: bool = True  # enforce the published rate limits
    # The Retry-After of every 429, as written ("7", an HTTP date, anything a server might
    # send); None: the wait the rate limit computes, or 1 for a 429 from `fail_status`.
    retry_after: str | None = None
    keys: list[str] = msgspec.field(default_factory=lambda: list(DEV_KEYS))


class Received(msgspec.Struct, frozen=True):
    seq: int
    route: str
    arrived: float  # when the request came in
    at: float  # when it was accepted (after any added latency)
    body: msgspec.Raw  # one call as compact JSON; kept raw so a big backlog stays small


class SinkState:
    """What the sink has received and how it is set to misbehave."""

    def __init__(self, knobs: SinkKnobs | None = None) -> None:
        self.received: list[Received] = []
        self.seen_event_ids: set[str] = set()
        self.answers: Counter[str] = Counter()  # "route status" -> count
        self.duplicates = 0
        self.in_flight = 0  # ingest requests arrived and not yet answered
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.knobs = SinkKnobs()
        self.fail_until = 0.0
        self.set_knobs(knobs or SinkKnobs())

    def set_knobs(self, knobs: SinkKnobs, *, restart_failure: bool = True) -> None:
        """Apply `knobs`; the failure window starts now unless `restart_failure` is off."""
        self.knobs = knobs
        if restart_failure:
            self.fail_until = time.monotonic() + knobs.fail_for_seconds
        self.buckets.clear()

    def reset(self) -> None:
        self.received.clear()
        self.seen_event_ids.clear()
        self.answers.clear()
        self.duplicates = 0
        self.buckets.clear()

    def record(self, route: str, body: bytes, arrived: float) -> None:
        self.received.append(
            Received(len(self.received), route, arrived, time.time(), msgspec.Raw(body))
        )

    def accept_event(self, event: Track, arrived: float) -> str | None:
        """Store one track event unless its event_id was seen; return its id, None if seen."""
        event_id = event.event_id or uuid.uuid4().hex
        if event_id in self.seen_event_ids:
            self.duplicates += 1
            return None
        self.seen_event_ids.add(event_id)
        body = _encoder.encode(
            event if event.event_id else msgspec.structs.replace(event, event_id=event_id)
        )
        self.record("track", body, arrived)
        return event_id


def _error(status: int, code: str, message: str = "", **headers: str) -> Response[bytes]:
    return Response(
        error_body(code, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _refused(refusal: IngestRefused) -> Response[bytes]:
    return _error(refusal.status, refusal.code, refusal.message, **refusal.headers)


def _ok(**fields: Any) -> Response[bytes]:
    return Response(
        _encoder.encode({"ok": True, **fields}), status_code=202, media_type="application/json"
    )


def _check_key(state: SinkState, route: str, authorization: str | None) -> str:
    """The caller's key, as Millimetric checks it: its format, that it is known, then what
    its kind may call (`IngestRefused` otherwise)."""
    key = bearer_key(authorization)
    if key not in state.knobs.keys:
        raise IngestRefused(401, "invalid_api_key")
    check_scope(route, key)
    return key


def _check_rate(state: SinkState, route: str, key: str) -> Response[bytes] | None:
    limit = _LIMITS.get(route)
    if limit is None or not state.knobs.limits:
        return None
    bucket = state.buckets.get((key, route))
    if bucket is None:
        bucket = state.buckets[(key, route)] = TokenBucket(limit)
    wait = bucket.try_take()
    if wait == 0.0:
        return None
    return _error(
        429,
        "rate_limited",
        f"{route}: {limit.rate:g}/s, burst {limit.burst:g}",
        **{"retry-after": state.knobs.retry_after or str(max(1, math.ceil(wait)))},
    )


async def _ingest(state: SinkState, route: str, request: Request[Any, Any, Any]) -> Response[bytes]:
    arrived = time.time()
    knobs = state.knobs
    if knobs.latency_ms:
        await asyncio.sleep(knobs.latency_ms / 1000)
    if time.monotonic() < state.fail_until:
        wait = {"retry-after": knobs.retry_after or "1"} if knobs.fail_status == 429 else {}
        return _error(knobs.fail_status, "unavailable", "sink fault: failing on purpose", **wait)
    if knobs.error_rate and random.random() < knobs.error_rate:  # noqa: S311 (a fault knob)
        return _error(500, "internal_error", "sink fault: random error")
    try:
        key = _check_key(state, route, request.headers.get("authorization"))
    except IngestRefused as refusal:
        return _refused(refusal)
    limited = _check_rate(state, route, key)
    if limited is not None:
        return limited
    body = await request.body()
    try:
        call = parse_call(route, body)
    except IngestRefused as refusal:
        return _refused(refusal)
    if isinstance(call, Batch):
        accepted = sum(state.accept_event(e, arrived) is not None for e in call.events)
        return _ok(accepted=accepted, duplicates=len(call.events) - accepted)
    if isinstance(call, Track):
        event_id = state.accept_event(call, arrived) or call.event_id
        return _ok(event_id=event_id)
    state.record(route, body, arrived)
    return _ok()


def _foreign(request: Request[Any, Any, Any], *, json_body: bool) -> Response[bytes] | None:
    """A refusal for a request that a page on another site could have made, None for
    one from a script or a tool. The sink listens on loopback, which a browser visiting
    any site can reach: without this, a form posted from that site would revoke keys or
    start an outage. A browser says where the page came from in `Origin` (403 when that is
    not the sink itself), and it cannot send `application/json` to another origin without
    asking first, which the sink never allows (415 for any other body type)."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
        return _error(403, "cross_site", "the sink takes changes from scripts, not web pages")
    if json_body and request.content_type[0].lower() != "application/json":
        return _error(415, "unsupported_media_type", "send the knobs as application/json")
    return None


async def _cut_off() -> AsyncIterator[bytes]:
    """A body that fails before its first byte: uvicorn closes the connection, so the
    client sees it dropped, as when a proxy in between gives up."""
    raise ConnectionAbortedError("sink fault: connection dropped on purpose")
    yield b""  # pragma: no cover (makes this an async generator)


def create_sink_app(state: SinkState | None = None) -> Litestar:
    """The sink as an ASGI app; pass `state` to look at it from a test in the same process."""
    sink = state or SinkState()

    @post("/v1/{route:str}")
    async def ingest(
        route: FromPath[str], request: Request[Any, Any, Any]
    ) -> Response[bytes] | Stream:
        if route not in ROUTES:
            return _error(404, "not_found")
        sink.in_flight += 1
        try:
            response = await _ingest(sink, route, request)
        finally:
            sink.in_flight -= 1
        if sink.knobs.drop_rate and random.random() < sink.knobs.drop_rate:  # noqa: S311
            # Handled (events may be stored), but the answer is lost on the way back.
            sink.answers[f"{route} dropped"] += 1
            return Stream(_cut_off())
        sink.answers[f"{route} {response.status_code}"] += 1
        return response

    @get("/_sink/events")
    async def events(
        route: FromQuery[str | None] = None,
        after: FromQuery[int] = -1,
        limit: FromQuery[int] = 1000,
    ) -> Response[bytes]:
        """What was accepted, in order: `after` a seq, at most `limit`, optionally one route."""
        picked = [r for r in sink.received[after + 1 :] if route is None or r.route == route]
        return Response(_encoder.encode({"events": picked[:limit]}), media_type="application/json")

    @get("/_sink/stats")
    async def stats() -> dict[str, Any]:
        return {
            "received": len(sink.received),
            "unique_event_ids": len(sink.seen_event_ids),
            "duplicates": sink.duplicates,
            "answers": dict(sink.answers),
            "in_flight": sink.in_flight,
        }

    @get("/_sink/knobs")
    async def get_knobs() -> SinkKnobs:
        return sink.knobs

    @post("/_sink/knobs", status_code=200)
    async def set_knobs(request: Request[Any, Any, Any]) -> Response[bytes]:
        refused = _foreign(request, json_body=True)
        if refused is not None:
            return refused
        try:
            changes = msgspec.json.decode(await request.body(), type=dict[str, Any])
            knobs = msgspec.convert({**msgspec.to_builtins(sink.knobs), **changes}, SinkKnobs)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(400, "invalid_knobs", str(exc))
        sink.set_knobs(knobs, restart_failure="fail_for_seconds" in changes)
        return Response(_encoder.encode(knobs), media_type="application/json")

    @post("/_sink/reset", status_code=200)
    async def reset(request: Request[Any, Any, Any]) -> Response[bytes]:
        refused = _foreign(request, json_body=False)
        if refused is not None:
            return refused
        sink.reset()
        return Response(_encoder.encode({"ok": True}), media_type="application/json")

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app = Litestar(
        route_handlers=[ingest, events, stats, get_knobs, set_knobs, reset, healthz],
        openapi_config=None,
        logging_config=None,
    )
    app.state.sink = sink
    return app
