"""Standard Webhooks (https://www.standardwebhooks.com), the scheme Svix signs with for
Clerk, Resend, Replicate and many others: any handler can use `StandardWebhooksScheme`.

A delivery carries `webhook-id`, `webhook-timestamp` and `webhook-signature` (or the same
three as `svix-*`). The signature header holds space-separated `v1,<base64>` entries, more
than one while a secret is rotated; each is the HMAC-SHA256 of `{id}.{timestamp}.{body}`
keyed with the base64-decoded part of the `whsec_...` secret.

Written here rather than taken from the `standardwebhooks` package: that package checks
one secret and a fixed five-minute tolerance, and raises its own errors; the bridge needs
several secrets (rotation), the source's tolerance and `SignatureInvalid` with a short
reason, which leaves little of the library to use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from bridge.errors import SignatureInvalid
from bridge.plugin import WebhookRequest

__all__ = ["StandardWebhooksScheme", "decode_secret", "message_id"]

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (a prefix, not a secret)
# The header families, in the order they are looked for: the standard's names, then the
# names Svix used first (Clerk and older Svix senders still send these).
_FAMILIES: Final = ("webhook", "svix")
_MAX_TIMESTAMP_DIGITS: Final = 12  # far beyond any real time; keeps int() cheap on garbage


def decode_secret(secret: str) -> bytes | None:
    """The HMAC key of a `whsec_<base64>` secret (the prefix is optional), or None when it
    is not base64. Padding may be left off, as some dashboards show secrets without it."""
    text = secret.strip().removeprefix(SECRET_PREFIX)
    if not text or not text.isascii():
        return None
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key or None


def _family(headers: Mapping[str, str]) -> str:
    """`webhook` or `svix`: the family whose signature header is present. The three
    headers are read from one family, so a mix of two senders' headers never verifies."""
    for family in _FAMILIES:
        if f"{family}-signature" in headers:
            return family
    return _FAMILIES[0]


def message_id(headers: Mapping[str, str]) -> str | None:
    """The delivery's message id (`webhook-id`, or `svix-id`): the same on every retry of
    one message, so it is what a handler on this scheme dedupes on. Headers lower-case.

    Read exactly as `verify` signs it (stripped, from the same family): the id is part of
    the signed content, so it cannot be changed without a new signature, and padding it
    with spaces must not make a captured message a new delivery."""
    return headers.get(f"{_family(headers)}-id", "").strip() or None


class StandardWebhooksScheme:
    """Verifies and signs Standard Webhooks deliveries (symmetric `v1` signatures).

    `clock` is for tests that replay a recorded delivery at its own time."""

    headers: tuple[str, ...] = (
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
    )
    signs_timestamp: bool = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        headers = request.headers
        family = _family(headers)
        found: dict[str, str] = {}
        for part in ("id", "timestamp", "signature"):
            name = f"{family}-{part}"
            value = headers.get(name, "").strip()
            if not value:
                raise SignatureInvalid(f"missing {name} header")
            if not value.isascii():  # a forged header: real ids, times and signatures are ASCII
                raise SignatureInvalid(f"malformed {name} header")
            found[part] = value
        timestamp = found["timestamp"]
        if not (timestamp.isdigit() and len(timestamp) <= _MAX_TIMESTAMP_DIGITS):
            raise SignatureInvalid(f"malformed {family}-timestamp header")
        # Stale and future times are both refused, so a captured delivery cannot be
        # replayed later, nor a signature be made to stay valid for longer.
        if abs(self._clock() - int(timestamp)) > tolerance:
            raise SignatureInvalid(f"timestamp outside the {tolerance}s tolerance")
        given = _signatures(found["signature"])
        if not given:
            raise SignatureInvalid(f"no v1 signature in the {family}-signature header")
        keys = [key for key in map(decode_secret, secrets) if key is not None]
        if not keys:
            raise SignatureInvalid("no configured secret is a whsec_ base64 secret")
        content = _signed_content(found["id"], timestamp, request.body)
        matched = False
        # Every secret against every entry, without stopping early, so the time taken
        # does not tell which secret or which entry matched.
        for key in keys:
            expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())
            for signature in given:
                matched |= hmac.compare_digest(expected, signature)
        if not matched:
            raise SignatureInvalid("no valid signature for any configured secret")

    def sign(
        self, body: bytes, secret: str, timestamp: int, *, msg_id: str | None = None
    ) -> dict[str, str]:
        """Headers that make `body` a valid delivery. The message id defaults to one
        derived from the body, so signing the same body again is a redelivery of the same
        message (as a provider's retry would be) and a changed body is a new message."""
        key = decode_secret(secret)
        if key is None:
            raise ValueError("the secret is not a Standard Webhooks secret (whsec_ + base64)")
        msg_id = msg_id or "msg_" + hashlib.sha256(body).hexdigest()[:32]
        mac = hmac.new(key, _signed_content(msg_id, str(timestamp), body), hashlib.sha256)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
            "content-type": "application/json",
        }


def _signed_content(msg_id: str, timestamp: str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def _signatures(header: str) -> list[bytes]:
    """The `v1` signatures in the header, as sent. Other versions (`v1a` is Ed25519) are
    skipped: another entry may still match. They are compared as base64 text, as the
    reference libraries do, so only the canonical encoding of the right MAC matches."""
    found = []
    for entry in header.split():
        version, _, value = entry.partition(",")
        if version == "v1" and value:
            found.append(value.encode())
    return found
