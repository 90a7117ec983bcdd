"""The Millimetric ingest client.

Every answer is classified into one `Outcome`, so the forwarder decides what to do from a
type, never from a status code:

- `Accepted`: 2xx.
- `Invalid`: 400/413/422: the payload itself is wrong; sending it again cannot help.
- `AuthProblem`: 401/403: the key is wrong or lacks a right; not the event's fault.
- `RateLimited`: 429, with the wait Millimetric asked for (`Retry-After`).
- `Retryable`: 5xx, other statuses, timeouts and connection errors.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Sequence
from datetime import UTC
from typing import Final

import httpx
import msgspec

from bridge.events import Forget, Identify, Track, encode

__all__ = [
    "Accepted",
    "AuthProblem",
    "Invalid",
    "MillimetricClient",
    "Outcome",
    "RateLimited",
    "Retryable",
    "batch_body",
    "build_http_client",
    "parse_retry_after",
]

#: When a 429 comes without a usable Retry-After.
DEFAULT_RETRY_AFTER: Final = 1.0
#: The longest wait a Retry-After can impose; past that it is taken for a server mistake.
MAX_RETRY_AFTER: Final = 3600.0
_REASON_MAX: Final = 1000
_INVALID_STATUSES: Final = frozenset({400, 413, 422})


class Accepted(msgspec.Struct, frozen=True):
    status: int


class Invalid(msgspec.Struct, frozen=True):
    status: int
    reason: str


class AuthProblem(msgspec.Struct, frozen=True):
    status: int
    reason: str


class RateLimited(msgspec.Struct, frozen=True):
    retry_after: float


class Retryable(msgspec.Struct, frozen=True):
    reason: str
    status: int | None = None


Outcome = Accepted | Invalid | AuthProblem | RateLimited | Retryable


def build_http_client(
    *,
    timeout: float = 10.0,
    connect_timeout: float = 5.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The one AsyncClient the app shares, with explicit timeouts and a bounded pool."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        transport=transport,
        headers={"user-agent": "millimetric-bridge"},
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date."""
    if not value:
        return DEFAULT_RETRY_AFTER
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return (
            min(MAX_RETRY_AFTER, max(0.0, seconds))
            if math.isfinite(seconds)
            else (DEFAULT_RETRY_AFTER)
        )
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - current))


def _reason(response: httpx.Response) -> str:
    """Millimetric's own words about a refusal, bounded for storage."""
    text = response.text
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and "error" in body:
        text = str(body["error"])
        if body.get("message"):
            text = f"{text}: {body['message']}"
    return f"{response.status_code} {text}"[:_REASON_MAX]


def classify(response: httpx.Response) -> Outcome:
    status = response.status_code
    if 200 <= status < 300:
        return Accepted(status)
    if status in _INVALID_STATUSES:
        return Invalid(status, _reason(response))
    if status in (401, 403):
        return AuthProblem(status, _reason(response))
    if status == 429:
        return RateLimited(parse_retry_after(response.headers.get("retry-after")))
    return Retryable(_reason(response), status)


def batch_body(encoded_events: Sequence[bytes]) -> bytes:
    """A `/v1/batch` body from events that are already compact JSON."""
    return b'{"events":[' + b",".join(encoded_events) + b"]}"


class MillimetricClient:
    """Talks to the ingest API over one injected `httpx.AsyncClient`."""

    def __init__(self, http: httpx.AsyncClient, *, key: str, host: str) -> None:
        self._http = http
        self._host = host.rstrip("/")
        self._headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    async def post(self, route: str, body: bytes) -> Outcome:
        """POST an encoded body to `route` (e.g. `/v1/batch`) and classify the answer."""
        try:
            response = await self._http.post(
                self._host + route, content=body, headers=self._headers
            )
        except httpx.TimeoutException as exc:
            return Retryable(f"timeout: {type(exc).__name__}")
        except httpx.TransportError as exc:
            return Retryable(f"connection: {type(exc).__name__}: {exc}"[:_REASON_MAX])
        try:
            return classify(response)
        finally:
            # httpx 0.28 ties a response and its stream in a reference cycle
            # (encode/httpx#3733), which keeps the request and its body (a batch: up to
            # 256 KB) until the cyclic collector runs; `serve` runs it rarely. The body is
            # read by now: a spent stream in its place breaks the cycle.
            response.stream = httpx.ByteStream(b"")

    async def track(self, event: Track) -> Outcome:
        return await self.post("/v1/track", encode(event))

    async def identify(self, call: Identify) -> Outcome:
        return await self.post("/v1/identify", encode(call))

    async def batch(self, events: Sequence[Track]) -> Outcome:
        return await self.post("/v1/batch", batch_body([encode(e) for e in events]))

    async def forget(self, call: Forget) -> Outcome:
        return await self.post("/v1/forget", encode(call))
