"""Local stand-ins of providers' event list APIs, served over real HTTP (`ServerThread`).

`StripeEvents` answers `GET /v1/events` as Stripe does: newest first, `limit` (at most
100) a page, `starting_after` the cursor, `has_more`, filtered by `types[N]` and
`created[gte|gt|lt|lte]`; `Authorization: Bearer <key>` checked (401 for an unknown key,
403 for one without access to events), and as at Stripe a `_test_` key lists the
test-mode events (`livemode: false`), a `_live_` key the others. `faults` holds statuses
to answer, one a request, before answering normally again; `requests` records each
request's query.

`PaddleEvents` answers Paddle Billing's `GET /events` the same way: `order_by=id[DESC]`
(or `[ASC]`), `after` the cursor, `per_page` (at most 200), `meta.pagination.has_more`,
no filter by time or type; `Authorization: Bearer <key>`, 401 and 403 likewise.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import msgspec

FIXTURES = Path(__file__).parent / "fixtures" / "stripe"
PADDLE_FIXTURES = Path(__file__).parent / "fixtures" / "paddle"
PADDLE_KEY = "pdl_live_apikey_01standinkey000000000000000_standinsecret"
PADDLE_KEY_WITHOUT_EVENTS = "pdl_live_apikey_01noevents00000000000000000_standinsecret"
STRIPE_KEY = "rk_test_standinkey0123456789"
STRIPE_LIVE_KEY = "rk_live_standinkey0123456789"
#: A restricted key without access to events: 403.
STRIPE_KEY_WITHOUT_EVENTS = "rk_test_noeventsaccess0123"

_CHECKOUT: dict[str, Any] = msgspec.json.decode(
    (FIXTURES / "checkout.session.completed.json").read_bytes()
)


def stripe_purchase(
    i: int, created: int, *, livemode: bool = True, prefix: str = "evt"
) -> dict[str, Any]:
    """A Stripe `checkout.session.completed` event of a paid one-off payment (its own
    payment intent, so each is one purchase), `id` `{prefix}_{i}`."""
    obj = {
        **_CHECKOUT["data"]["object"],
        "id": f"cs_{prefix}_{i}",
        "mode": "payment",
        "payment_status": "paid",
        "payment_intent": f"pi_{prefix}_{i}",
        "invoice": None,
        "customer": f"cus_{prefix}_{i % 50}",
        "client_reference_id": f"user_{i % 50}",
        "amount_total": 1000 + i,
    }
    return {
        **_CHECKOUT,
        "id": f"{prefix}_{i}",
        "created": created,
        "livemode": livemode,
        "data": {"object": obj},
    }


def stripe_event(event_id: str, event_type: str, created: int, **obj: Any) -> dict[str, Any]:
    """An event of any type around a small object (for the type filter)."""
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": created,
        "livemode": True,
        "pending_webhooks": 0,
        "type": event_type,
        "data": {"object": {"id": f"obj_{event_id}", "object": "thing", **obj}},
    }


class _Listed(msgspec.Struct, frozen=True):
    id: str
    type: str
    created: int
    livemode: bool
    body: bytes  # the event's JSON, as the page carries it


class StripeEvents:
    """The stand-in ASGI app. Thread-safe: tests change it while a server serves it."""

    def __init__(
        self,
        events: Iterable[Mapping[str, Any]] = (),
        *,
        keys: Iterable[str] = (STRIPE_KEY, STRIPE_LIVE_KEY),
        keys_without_events: Iterable[str] = (STRIPE_KEY_WITHOUT_EVENTS,),
    ) -> None:
        self.keys = set(keys)
        self.keys_without_events = set(keys_without_events)
        self.faults: deque[int | None] = deque()  # None: answer that request normally
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._events: list[_Listed] = []  # newest first
        self._position: dict[str, int] = {}
        self.add(events)

    def add(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Events Stripe now holds (they list newest first, the later added first among
        those created in the same second)."""
        listed = [
            _Listed(
                id=e["id"],
                type=e["type"],
                created=e["created"],
                livemode=e.get("livemode", False),
                body=msgspec.json.encode(e),
            )
            for e in events
        ]
        with self._lock:
            merged = [*reversed(listed), *self._events]
            merged.sort(key=lambda e: e.created, reverse=True)  # stable: ties keep that order
            self._events = merged
            self._position = {e.id: i for i, e in enumerate(merged)}

    def fail(self, *statuses: int, skip: int = 0) -> None:
        """Answer `skip` more requests normally, then the next ones with these statuses,
        one each."""
        with self._lock:
            self.faults.extend([None] * skip)
            self.faults.extend(statuses)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await _serve(scope, receive, send, self._answer)

    def _answer(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(query)
            if method != "GET" or path != "/v1/events":
                return _error(404, "invalid_request_error", f"Unrecognized request URL ({path})")
            key = headers.get("authorization", "").removeprefix("Bearer ")
            if key in self.keys_without_events:
                return _error(403, "invalid_request_error", "The provided key does not have access")
            if key not in self.keys:
                return _error(401, "invalid_request_error", "Invalid API Key provided")
            status = self.faults.popleft() if self.faults else None
            if status is not None:
                return _error(status, "api_error", f"stand-in fault {status}")
            return self._page(query, livemode="_live_" in key)

    def _page(self, query: dict[str, str], *, livemode: bool) -> tuple[int, bytes]:
        types = {v for k, v in query.items() if k.startswith("types[")}
        bounds = {k: int(v) for k, v in query.items() if k.startswith("created[")}
        limit = min(100, int(query.get("limit", "10")))
        start = 0
        if "starting_after" in query:
            found = self._position.get(query["starting_after"])
            if found is None:
                return _error(400, "invalid_request_error", "No such event")
            start = found + 1
        page: list[bytes] = []
        more = False
        for event in self._events[start:]:
            if event.livemode != livemode or not _matches(event, types, bounds):
                continue
            if len(page) == limit:
                more = True
                break
            page.append(event.body)
        head = b'{"object":"list","url":"/v1/events","has_more":%s,"data":[' % (
            b"true" if more else b"false"
        )
        return 200, head + b",".join(page) + b"]}"


Answerer = Callable[[str, str, dict[str, str], dict[str, str]], tuple[int, bytes]]


async def _serve(scope: Any, receive: Any, send: Any, answer: Answerer) -> None:
    """ASGI around `answer(method, path, query, headers) -> (status, JSON body)`."""
    if scope["type"] == "lifespan":
        while True:
            message = (await receive())["type"]  # startup, then shutdown
            await send({"type": f"{message}.complete"})
            if message == "lifespan.shutdown":
                return
    query = dict(parse_qsl(scope["query_string"].decode(), keep_blank_values=True))
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    status, body = answer(scope["method"], scope["path"], query, headers)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _matches(event: _Listed, types: set[str], bounds: Mapping[str, int]) -> bool:
    if types and event.type not in types:
        return False
    created = event.created
    return not (
        ("created[gte]" in bounds and created < bounds["created[gte]"])
        or ("created[gt]" in bounds and created <= bounds["created[gt]"])
        or ("created[lt]" in bounds and created >= bounds["created[lt]"])
        or ("created[lte]" in bounds and created > bounds["created[lte]"])
    )


def _error(status: int, kind: str, message: str) -> tuple[int, bytes]:
    return status, msgspec.json.encode({"error": {"type": kind, "message": message}})


_TRANSACTION: dict[str, Any] = msgspec.json.decode(
    (PADDLE_FIXTURES / "transaction.completed.json").read_bytes()
)


def paddle_purchase(
    i: int, occurred: float, event_type: str = "transaction.completed"
) -> dict[str, Any]:
    """A Paddle `transaction.completed` event as the event stream lists it (no
    `notification_id`): its own transaction, `event_id` sortable in creation order."""
    when = datetime.fromtimestamp(occurred, UTC).isoformat().replace("+00:00", "Z")
    event = {k: v for k, v in _TRANSACTION.items() if k != "notification_id"}
    return {
        **event,
        "event_id": f"evt_{i:026d}",
        "event_type": event_type,
        "occurred_at": when,
        "data": {**_TRANSACTION["data"], "id": f"txn_standin_{i}"},
    }


class PaddleEvents:
    """The stand-in ASGI app of Paddle's event stream."""

    def __init__(
        self,
        events: Iterable[Mapping[str, Any]] = (),
        *,
        keys: Iterable[str] = (PADDLE_KEY,),
        keys_without_events: Iterable[str] = (PADDLE_KEY_WITHOUT_EVENTS,),
    ) -> None:
        self.keys = set(keys)
        self.keys_without_events = set(keys_without_events)
        self.faults: deque[int | None] = deque()
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._events: list[tuple[str, bytes]] = []  # (event_id, JSON), ascending ids
        self.add(events)

    def add(self, events: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            self._events.extend((e["event_id"], msgspec.json.encode(e)) for e in events)
            self._events.sort()

    def fail(self, *statuses: int, skip: int = 0) -> None:
        with self._lock:
            self.faults.extend([None] * skip)
            self.faults.extend(statuses)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await _serve(scope, receive, send, self._answer)

    def _answer(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(query)
            if method != "GET" or path != "/events":
                return _paddle_error(404, "not_found")
            key = headers.get("authorization", "").removeprefix("Bearer ")
            if key in self.keys_without_events:
                return _paddle_error(403, "forbidden")
            if key not in self.keys:
                return _paddle_error(401, "authentication_malformed")
            status = self.faults.popleft() if self.faults else None
            if status is not None:
                return _paddle_error(status, "stand_in_fault")
            ordered = self._events if query.get("order_by") == "id[ASC]" else self._events[::-1]
            if "after" in query:
                ids = [event_id for event_id, _ in ordered]
                ordered = ordered[ids.index(query["after"]) + 1 :]
            size = min(200, int(query.get("per_page", "50")))
            page = [body for _, body in ordered[:size]]
            more = len(ordered) > size
            body = (
                b'{"data":[%s],"meta":{"request_id":"standin","pagination":{"per_page":%d,'
                b'"next":"","has_more":%s,"estimated_total":%d}}}'
                % (
                    b",".join(page),
                    size,
                    b"true" if more else b"false",
                    len(self._events),
                )
            )
            return 200, body


def _paddle_error(status: int, code: str) -> tuple[int, bytes]:
    return status, msgspec.json.encode(
        {"error": {"type": "request_error", "code": code, "detail": f"stand-in: {code}"}}
    )
