"""Logging, configured here and nowhere else.

JSON lines under `serve` (what Fly and Render collect), a readable console under `dev`.
Every line, ours or a library's through the standard `logging` module, passes
`redact_secrets`, so a key, token or signature never reaches the output even when it ends
up in a message or a traceback by mistake.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import re
import sys
import threading
import time
from typing import IO, Any, Final

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from bridge.ingest_api import KEY_PATTERN

__all__ = ["REDACTED", "configure_logging", "info_line", "redact_secrets"]

REDACTED: Final = "[redacted]"

_SECRET_NAME: Final = re.compile(
    r"(secret|token|signature|authorization|password|passwd|cookie|credential|api_?key|^key$"
    r"|_key$|^hmac)",
    re.IGNORECASE,
)
_SECRET_VALUE: Final = re.compile(
    # A Millimetric key's parts may hold any printable character, so in free text a key runs
    # to the next space: a quote or comma glued to it is hidden with it rather than risk
    # showing the end of a key that holds one.
    rf"\b{KEY_PATTERN}"
    r"|\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{8,}"  # Stripe API keys (backfill)
    r"|\bpdl_(?:live|sdbx|ntfset)_[A-Za-z0-9_]{8,}"  # Paddle API keys and secret keys
    r"|\bwhsec_[A-Za-z0-9+/=_-]+"  # Stripe and Standard Webhooks secrets
    r"|\b[Bb]earer\s+[^\s,;\"']+"  # bearer tokens
    r"|\b(?:v1|h1|sha256|v1a)=[0-9a-fA-F]{16,}"  # hex signatures in signature headers
    r"|\bv1,[A-Za-z0-9+/=]{16,}"  # Standard Webhooks signatures
    # Database URL credentials, to the last "@": an unencoded "/" or "#" may hide in them.
    r"|\bpostgres(?:ql)?://\S*@"
)


_names: dict[str, bool] = {}  # field name: whether it names a secret (a few dozen names)


def _secret_name(name: str) -> bool:
    found = _names.get(name)
    if found is None:
        if len(_names) >= 4096:  # names made up at run time: keep the cache bounded
            _names.clear()
        found = _names[name] = _SECRET_NAME.search(name) is not None
    return found


def _scrub_text(value: str) -> str:
    # Every shape `_SECRET_VALUE` finds holds one of these; most values (sources, results,
    # ids) hold none and skip the regular expression.
    if (
        "k_" in value  # sk_, pk_, rk_
        or "pdl_" in value
        or "whsec_" in value
        or "=" in value
        or "earer" in value
        or "v1," in value
        or "@" in value
    ):
        return _SECRET_VALUE.sub(REDACTED, value)
    return value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if _secret_name(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


#: Types that cannot hold a secret: passed over without a look.
_PLAIN: Final = frozenset({type(None), bool, int, float})


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Blank every field named like a secret, and secret-shaped text inside any other."""
    for name, value in event_dict.items():
        if _secret_name(name):
            event_dict[name] = REDACTED
        elif type(value) is str:
            event_dict[name] = _scrub_text(value)
        elif type(value) not in _PLAIN:  # exact types: a subclass of int may render as text
            event_dict[name] = _scrub(value)
    return event_dict


_second: list[Any] = [None, ""]


def timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """`timestamp` in ISO 8601, UTC, to the microsecond, as structlog's `TimeStamper(fmt=
    "iso", utc=True)` writes it, with the date and time formatted once a second."""
    now = time.time()
    second = int(now)
    if _second[0] != second:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    event_dict["timestamp"] = f"{_second[1]}.{int((now - second) * 1e6):06d}Z"
    return event_dict


def _repr(value: object) -> str:
    return str(_scrub(repr(value)))


_json: Final = msgspec.json.Encoder(enc_hook=_repr)


def render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    """One JSON line, by msgspec (the standard library's encoder costs several times more a
    line). What JSON cannot hold is written as its `repr`, as structlog's `JSONRenderer`
    does, and scrubbed like any text."""
    try:
        return _json.encode(event_dict).decode()
    except (TypeError, ValueError, OverflowError):  # e.g. a key JSON cannot have
        return json.dumps(event_dict, default=_repr)


class _Pending(threading.local):
    """A thread's lines not yet written, and the event loop due to write them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.known = False  # to the writer, which writes what is pending at exit


class LineWriter:
    """structlog's logger: one rendered line to `file` per call, as `WriteLogger`, except
    that the lines logged during one pass of an event loop are written together at its end,
    with one write and one flush (at webhook rates, a flush per line cost more than
    rendering it). Lines logged off a loop are written at once; what is pending at exit
    is written then."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file
        self._pending = _Pending()
        self._lock = threading.Lock()  # one thread's lines at a time
        self._threads: list[_Pending] = []
        atexit.register(self.flush_all)

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([message])
            return
        pending = self._pending
        if not pending.known:
            pending.known = True
            self._threads.append(pending)
        pending.lines.append(message)
        if pending.loop is not loop:  # none scheduled, or on a loop that has stopped since
            pending.loop = loop
            loop.call_soon(self._flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def _flush(self) -> None:
        pending = self._pending
        pending.loop = None
        self._write(pending.lines)

    def _write(self, lines: list[str]) -> None:
        with self._lock:
            if lines:
                self._file.write("\n".join(lines) + "\n")
                lines.clear()
                self._file.flush()

    def flush_all(self) -> None:
        for pending in self._threads:
            self._write(pending.lines)


def _processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamp,
        structlog.processors.format_exc_info,
        redact_secrets,
    ]


#: The writer of JSON lines at info level and the processors it was set up with, once
#: `configure_logging` has: `info_line` writes to it directly while they are in force.
_fast: list[Any] = [None, None]


def info_line(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """One info line per request (the canonical `webhook` line), as `logger.info(event,
    **fields)` writes it under `serve`, for about a third of its cost: the same fields,
    level, timestamp and redaction, rendered and written without structlog's chain (which
    would also merge context variables; none are bound on the request path). Anywhere
    else (`dev`'s console, tests capturing logs, a level above info), through `logger`."""
    writer, processors = _fast
    # Another configuration in force (`structlog.testing.capture_logs`): through it.
    if writer is None or structlog.get_config()["processors"] is not processors:
        logger.info(event, **fields)
        return
    fields["event"], fields["level"] = event, "info"
    writer.msg(render_json(None, "info", redact_secrets(None, "info", timestamp(None, "", fields))))


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Set up structlog and route the standard library's records through the same chain."""
    renderer: Processor = (
        render_json if fmt == "json" else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    writer = LineWriter(sys.stdout)
    processors = [*_processors(), renderer]
    _fast[:] = [writer if fmt == "json" and numeric <= logging.INFO else None, processors]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_processors()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # One canonical line per webhook and per forwarder request replaces these.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
