"""The bridge's own Prometheus series, beside the per-route HTTP series of Litestar's
Prometheus plugin. Process-wide, like prometheus_client's registry. Labels never carry a
payload value: sources are configured names (`unknown` otherwise), routes and statuses
are from small fixed sets."""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import Counter, Gauge

__all__ = [
    "ANSWERS",
    "CONNECTIONS_CLOSED",
    "CONSOLE_REFUSED",
    "CONSOLE_SIGN_INS",
    "DEAD_LETTERS",
    "FORWARDED",
    "LEADER",
    "OUTBOX_DEAD",
    "OUTBOX_OLDEST_AGE",
    "OUTBOX_PENDING",
    "PAUSED",
    "QUARANTINED",
    "RECONCILED",
    "RECONCILE_FAILURES",
    "RELAYED",
    "RELAY_REQUESTS",
    "RETRY_WAIT",
    "TRANSLATED",
    "TRANSLATE_FAILURES",
    "UNEXPECTED",
    "UNTRANSLATED",
    "UNTRANSLATED_OLDEST_AGE",
    "WEBHOOKS",
    "relay",
    "relayed",
    "unexpected",
    "webhook",
]

WEBHOOKS: Final = Counter(
    "bridge_webhooks",
    "Webhook deliveries at intake by source and result (accepted, duplicate, rejected, failed).",
    ["source", "result", "reason"],
)
RELAY_REQUESTS: Final = Counter(
    "bridge_relay_requests",
    "Requests to the relay's /v1/* routes by route and result (accepted, rejected, failed), "
    "with the error code of a refusal as the reason.",
    ["route", "result", "reason"],
)
RELAYED: Final = Counter(
    "bridge_relayed_calls",
    "Calls the relay stored, by the route they came in on (a batch's events under batch).",
    ["route"],
)
CONNECTIONS_CLOSED: Final = Counter(
    "bridge_connections_closed",
    "Client connections the server closed on its own, by reason (cap: refused at the "
    "connection cap; header_timeout, body_timeout: a client too slow to send its request).",
    ["reason"],
)
UNEXPECTED: Final = Counter(
    "bridge_unexpected_errors",
    "Exceptions no code expected (a bug), answered 503 by the last resort, by route template "
    "and exception type.",
    ["path", "error"],
)
FORWARDED: Final = Counter(
    "bridge_forwarded_calls", "Calls Millimetric accepted, by route.", ["route"]
)
ANSWERS: Final = Counter(
    "bridge_millimetric_answers",
    "Millimetric answers by route and status (or timeout / connection).",
    ["route", "status"],
)
RETRY_WAIT: Final = Counter(
    "bridge_retry_wait_seconds",
    "Seconds rows were set to wait before a retry, by cause (rate_limited, backoff).",
    ["cause"],
)
DEAD_LETTERS: Final = Counter("bridge_dead_letters", "Calls moved to dead letters.", ["route"])
LEADER: Final = Gauge(
    "bridge_forwarder_leader",
    "1 while this instance is the one forwarding from the store; 0 while it stands by.",
)
PAUSED: Final = Gauge("bridge_forwarder_paused", "1 while forwarding is paused on a refused key.")
OUTBOX_PENDING: Final = Gauge("bridge_outbox_pending", "Calls waiting to be sent.")
OUTBOX_DEAD: Final = Gauge("bridge_outbox_dead", "Calls in dead letters.")
OUTBOX_OLDEST_AGE: Final = Gauge(
    "bridge_outbox_oldest_pending_seconds", "Age of the oldest pending call (0 when none)."
)


TRANSLATED: Final = Counter(
    "bridge_translated_deliveries", "Stored deliveries the translate stage translated.", ["source"]
)
TRANSLATE_FAILURES: Final = Counter(
    "bridge_translate_failures",
    "Stored deliveries their handler could not translate (quarantined), by source and reason "
    "(payload, event, handler, source, store).",
    ["source", "reason"],
)
UNTRANSLATED: Final = Gauge("bridge_inbox_untranslated", "Deliveries waiting to be translated.")
UNTRANSLATED_OLDEST_AGE: Final = Gauge(
    "bridge_inbox_oldest_untranslated_seconds",
    "Age of the oldest delivery waiting to be translated (0 when none).",
)
QUARANTINED: Final = Gauge(
    "bridge_inbox_quarantined", "Deliveries their handler could not translate, kept."
)

RECONCILED: Final = Counter(
    "bridge_reconciled",
    "Events a provider's event list showed that its webhooks never brought, appended by the "
    "periodic reconcile, by source: above zero, webhooks were missed.",
    ["source"],
)
RECONCILE_FAILURES: Final = Counter(
    "bridge_reconcile_failures",
    "Reconcile rounds that did not finish, by source and reason (key: the provider refused "
    "the API key; provider: its API failed; store; error: a bug).",
    ["source", "reason"],
)

CONSOLE_SIGN_INS: Final = Counter(
    "bridge_console_sign_ins",
    "Sign-ins to the console, by result (ok; refused: a wrong token; throttled: refused "
    "unread, after repeated wrong tokens from the same client).",
    ["result"],
)
CONSOLE_REFUSED: Final = Counter(
    "bridge_console_refused",
    "Console forms refused, by reason (csrf: no valid CSRF token; origin: posted from "
    "another site).",
    ["reason"],
)


_webhooks: Final[dict[tuple[str, str, str], Any]] = {}


def webhook(source: str, result: str, reason: str) -> None:
    """Count one delivery in `WEBHOOKS`. The labelled child is looked up once per
    combination (a few dozen): `labels()` on every request costs more than the count."""
    key = (source, result, reason)
    child = _webhooks.get(key)
    if child is None:
        child = _webhooks[key] = WEBHOOKS.labels(source, result, reason)
    child.inc()


def unexpected(path: str, error: str) -> None:
    """Count one exception that reached the last resort: `path` is a route template, never
    the path as requested, and `error` the exception's type name, never its message."""
    UNEXPECTED.labels(path, error).inc()


_relay: Final[dict[tuple[str, str, str], Any]] = {}
_relayed: Final[dict[str, Any]] = {}


def relay(route: str, result: str, reason: str) -> None:
    """Count one relay request in `RELAY_REQUESTS` (children looked up once, as `webhook`)."""
    key = (route, result, reason)
    child = _relay.get(key)
    if child is None:
        child = _relay[key] = RELAY_REQUESTS.labels(route, result, reason)
    child.inc()


def relayed(route: str, calls: int) -> None:
    """Count the calls one relay request stored in `RELAYED`."""
    child = _relayed.get(route)
    if child is None:
        child = _relayed[route] = RELAYED.labels(route)
    child.inc(calls)
