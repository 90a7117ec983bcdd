"""The server's guard against slow, idle and too many clients.

uvicorn bounds what one connection may buffer and closes a keep-alive connection left
idle after a response (`timeout_keep_alive`), but it starts no clock before a first
response: a client that connects and sends nothing, or trickles its headers a byte at a
time, holds its connection for good, and nothing bounds how many it holds. Its
`limit_concurrency` answers 503 only once a request's headers are in, so it never sees
those clients at all. `guarded_protocol` is uvicorn's own httptools protocol (what
`uvicorn[standard]` serves with) with a few hooks added:

- a header deadline, from the connection's opening (or the first byte after an idle
  keep-alive) to the end of the request's headers;
- a body backstop: a connection whose request body is still arriving `BODY_GRACE` after
  the body deadline is closed. The webhook and relay routes answer 408 at the deadline
  itself; the backstop is for a route that never reads its body;
- a cap on open connections: past it, a new connection is closed as soon as it is
  accepted, before it costs a parser or a buffer, and one line says so per episode.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Final

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bridge.metrics import CONNECTIONS_CLOSED

__all__ = ["BODY_GRACE", "guarded_protocol", "raise_file_limit"]

log = structlog.get_logger("bridge.connections")

#: How long past the body deadline a connection may still be sending its body: long
#: enough for the app's own 408 to go out first (its deadlines are checked every 0.25 s).
BODY_GRACE: Final = 2.0
#: File descriptors beyond the connections: the listening socket, the store, the
#: forwarder's connections to Millimetric, logs.
_FILE_HEADROOM: Final = 256


class _Cap:
    """Open connections against `limit`. An episode starts at the first refusal and ends
    once the count is back under nine tenths of the cap, so a flood that holds the count
    at the cap logs twice, not once a connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.low_water = limit - max(1, limit // 10)
        self.refused = 0  # in the current episode

    def admit(self, open_now: int) -> bool:
        if open_now < self.limit:
            return True
        if not self.refused:
            log.warning(
                "connection cap reached: refusing new connections",
                max_connections=self.limit,
                hint="raise BRIDGE_MAX_CONNECTIONS if this is real traffic",
            )
        self.refused += 1
        CONNECTIONS_CLOSED.labels("cap").inc()
        return False

    def released(self, open_now: int) -> None:
        if self.refused and open_now <= self.low_water:
            log.info(
                "connection cap cleared: accepting again",
                open_connections=open_now,
                refused=self.refused,
            )
            self.refused = 0


def guarded_protocol(
    *, header_timeout: float, body_timeout: float, max_connections: int
) -> type[asyncio.Protocol]:
    """A protocol class for `uvicorn.Config(http=...)`, with one cap for the server it
    serves: build one per server."""
    cap = _Cap(max_connections)
    body_backstop = body_timeout + BODY_GRACE

    class GuardedProtocol(HttpToolsProtocol):
        _refused = False
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if not cap.admit(len(self.connections)):
                self._refused = True
                transport.close()
                return
            super().connection_made(transport)
            self._arm(header_timeout, "header_timeout")

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)
            cap.released(len(self.connections))

        def data_received(self, data: bytes) -> None:
            if self.timeout_keep_alive_task is not None and self._deadline is None:
                # A byte after an idle keep-alive: whatever it starts has the header
                # deadline (even bytes the parser skips, such as blank lines).
                self._arm(header_timeout, "header_timeout")
            super().data_received(data)

        def on_message_begin(self) -> None:
            if self._deadline is None:  # a pipelined request, behind one being answered
                self._arm(header_timeout, "header_timeout")
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._arm(body_backstop, "body_timeout")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _arm(self, timeout: float, reason: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expired, reason)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, reason: str) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                CONNECTIONS_CLOSED.labels(reason).inc()
                self.transport.close()

    return GuardedProtocol


def raise_file_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: with the process's limit under the cap, new
    connections fail at accept (which the server logs for every one) before the cap is
    reached. Raise the soft limit as far as the hard one allows, and say so if short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _FILE_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if raised > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        log.warning(
            "the open-file limit is below the connection cap: lower BRIDGE_MAX_CONNECTIONS "
            "or raise the limit (ulimit -n)",
            max_connections=max_connections,
            open_files=raised,
        )
