"""The console's sign-in: a signed session cookie, CSRF tokens, and the wrong-token throttle.

Both keys are derived from `BRIDGE_ADMIN_TOKEN` (HMAC-SHA256 of the token over a label),
so rotating the token signs everyone out and voids every form in flight. The cookies are
written here rather than by Litestar's session and CSRF middleware: those fix `Secure` in
their configuration, and the console sets it per request (behind Fly's or Render's proxy,
the bridge itself is spoken to over plain HTTP), and a session here holds nothing but
when it began.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "Keys",
    "Throttle",
    "client_hash",
    "client_of",
    "cookie",
    "over_https",
]

SESSION_COOKIE: Final = "bridge_console"
CSRF_COOKIE: Final = "bridge_console_csrf"
#: How long a sign-in lasts.
SESSION_SECONDS: Final = 12 * 3600
PATH: Final = "/console"


class Keys:
    """The session and CSRF keys of one admin token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._session = hmac.new(self._token, b"console-session", hashlib.sha256).digest()
        self._csrf = hmac.new(self._token, b"console-csrf", hashlib.sha256).digest()

    def is_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def session(self, now: float) -> str:
        """A new session's cookie value: when it began, a nonce, and their signature."""
        begun = f"{int(now)}.{secrets.token_urlsafe(16)}"
        return f"{begun}.{self._sign(self._session, begun)}"

    def signed_in(self, value: str | None, now: float) -> bool:
        """Whether a cookie value is a session of this token, begun less than
        `SESSION_SECONDS` ago."""
        begun, _, signature = (value or "").rpartition(".")
        if not begun or not hmac.compare_digest(signature, self._sign(self._session, begun)):
            return False
        started = begun.partition(".")[0]
        return started.isdigit() and 0 <= now - int(started) < SESSION_SECONDS

    def csrf_token(self, nonce: str) -> str:
        """The token a form carries for the CSRF cookie holding `nonce`."""
        return self._sign(self._csrf, nonce)

    def csrf_ok(self, nonce: str | None, token: str | None) -> bool:
        return bool(nonce and token) and hmac.compare_digest(
            str(token), self.csrf_token(str(nonce))
        )

    @staticmethod
    def _sign(key: bytes, text: str) -> str:
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def over_https(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """Whether the browser spoke HTTPS: to the bridge itself, or to the proxy in front of
    it (Fly's and Render's set `X-Forwarded-Proto`). A client that claims HTTPS over plain
    HTTP only gets cookies its own browser then keeps to HTTPS."""
    if connection.scope.get("scheme") == "https":
        return True
    forwarded = connection.headers.get("x-forwarded-proto", "")
    return forwarded.split(",")[0].strip().lower() == "https"


def client_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who is signing in, for the throttle: the peer's address, or, when the peer is a
    proxy on a private network (Fly's, Render's), the address that proxy appended last to
    `X-Forwarded-For`. A client on the internet cannot choose its key by sending that
    header itself."""
    peer = connection.client.host if connection.client else "unknown"
    forwarded = connection.headers.get("x-forwarded-for", "")
    if forwarded:
        try:
            proxied = ipaddress.ip_address(peer).is_private
        except ValueError:
            proxied = False
        if proxied:
            return forwarded.rsplit(",", 1)[-1].strip() or peer
    return peer


def cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> Cookie:
    return Cookie(
        key=name,
        value=value,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=secure,
        max_age=max_age,
    )


class Throttle:
    """Wrong tokens from one client: the first `free` are only refused; after them, the
    client must wait before its next try, twice as long each time (up to `longest`
    seconds), and a try made sooner is refused unread. A right token clears its record."""

    def __init__(self, free: int = 5, longest: float = 900.0, clients: int = 10_000) -> None:
        self.free = free
        self.longest = longest
        self.clients = clients  # at most this many remembered, the oldest forgotten first
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def wait(self, client: str, now: float) -> float:
        """Seconds before `client` may try again (0: now)."""
        _, until = self._failures.get(client, (0, 0.0))
        return max(0.0, until - now)

    def failed(self, client: str, now: float) -> int:
        """Record a wrong token; how many in a row from this client."""
        count = self._failures.pop(client, (0, 0.0))[0] + 1
        pause = min(2.0 ** (count - self.free), self.longest) if count >= self.free else 0.0
        self._failures[client] = (count, now + pause)
        while len(self._failures) > self.clients:
            self._failures.popitem(last=False)
        return count

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


def client_hash(client: str) -> str:
    """A client's address as the log shows it: enough to tell repeated tries apart."""
    return hashlib.sha256(b"console client\x00" + client.encode()).hexdigest()[:12]
