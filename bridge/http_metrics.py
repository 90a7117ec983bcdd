"""Per-route HTTP series (`bridge_http_*`), as Litestar's Prometheus plugin names them.

The plugin's middleware builds a `Request`, a label dict and three `labels()` lookups on
every request, and each prometheus_client update takes a lock; at webhook rates that cost
more than verifying the signature. This middleware keeps the same series and labels
(method, path template, status code, app name) in plain counters that a collector turns
into Prometheus samples when `/metrics` is scraped. Requests are counted by the one event
loop that serves them, so the counters need no lock.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from typing import Final

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["HttpMetrics"]

APP_NAME: Final = "millimetric_bridge"
#: Not counted: the scraper's own requests and the platform's liveness probes.
EXCLUDED: Final = frozenset({"/metrics", "/healthz"})
LABELS: Final = ["method", "path", "status_code", "app_name"]
BUCKETS: Final = Histogram.DEFAULT_BUCKETS  # the plugin's, ending in +Inf
#: Bucket bounds as Prometheus writes them ("0.005", "1.0", "+Inf").
_LE: Final = [floatToGoString(bound) for bound in BUCKETS]  # type: ignore[no-untyped-call]


class _Route:
    """One (method, path template, status): a count, a sum and per-bucket counts."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * len(BUCKETS)


_done: Final[dict[tuple[str, str, int], _Route]] = {}
_running: Final[dict[tuple[str, str], int]] = {}


class HttpMetrics:
    """ASGI middleware: count and time each request by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"] in EXCLUDED:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        key = (method, scope.get("path_template") or scope["path"])
        started = time.perf_counter()
        # The status sent, read from the response as it goes out. Should an exception pass
        # through here unanswered (Litestar answers a route's own exceptions inside its
        # middleware, and the intake answers its refusals itself, so only a middleware's
        # bug does), it is counted as the server error it is, never as a 200.
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        _running[key] = _running.get(key, 0) + 1
        try:
            await self.app(scope, receive, counted)
        finally:
            _running[key] -= 1
            elapsed = time.perf_counter() - started
            route = _done.get((*key, status))
            if route is None:
                route = _done[(*key, status)] = _Route()
            route.count += 1
            route.total += elapsed
            route.buckets[bisect.bisect_left(BUCKETS, elapsed)] += 1


class _Collector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily("bridge_http_requests", "Total requests", labels=LABELS)
        errors = CounterMetricFamily(
            "bridge_http_requests_error", "Total errors in requests", labels=LABELS
        )
        durations = HistogramMetricFamily(
            "bridge_http_request_duration_seconds", "Request duration, in seconds", labels=LABELS
        )
        running = GaugeMetricFamily(
            "bridge_http_requests_in_progress",
            "Total requests currently in progress",
            labels=LABELS,
        )
        for (method, path, status), route in list(_done.items()):
            labels = [method, path, str(status), APP_NAME]
            requests.add_metric(labels, route.count)
            if status >= 500:
                errors.add_metric(labels, route.count)
            cumulative, buckets = 0, []
            for bound, count in zip(_LE, list(route.buckets), strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            durations.add_metric(labels, buckets, route.total)
        for (method, path), count in list(_running.items()):
            running.add_metric([method, path, "200", APP_NAME], count)
        yield from (requests, errors, durations, running)


REGISTRY.register(_Collector())
