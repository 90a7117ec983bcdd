"""Signature schemes handlers can use: Stripe's (as the `stripe` package checks it) and a plain
HMAC of the raw body (Shopify, GitHub, Lemon Squeezy and many more).

Every scheme accepts a list of secrets, so a secret can be rotated without downtime, and
compares in constant time. Reasons are short and never echo a secret or a signature.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Sequence
from typing import Literal

import stripe

from bridge.errors import SignatureInvalid
from bridge.plugin import WebhookRequest

__all__ = ["HmacScheme", "StripeScheme"]


class StripeScheme:
    """`Stripe-Signature: t=...,v1=...`, verified as the `stripe` package verifies it."""

    headers = ("stripe-signature",)
    signs_timestamp = True

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        header = request.headers.get("stripe-signature")
        if not header:
            raise SignatureInvalid("missing Stripe-Signature header")
        try:
            request.body.decode("utf-8")  # stripe signs (and reads) the body as text
        except UnicodeDecodeError:
            raise SignatureInvalid(
                "body is not UTF-8, so it cannot carry a valid signature"
            ) from None
        if not header.isascii():  # a forged header; a comparison of text would raise on it
            raise SignatureInvalid("malformed Stripe-Signature header")
        parsed = _stripe_header(header)
        if parsed is None:
            raise SignatureInvalid("malformed Stripe-Signature header")
        # One reading of the header for every check: the time judged here is the time
        # signed, whatever its spelling (`t=+N`, `t=1_000`, the first of several `t=`).
        timestamp, signatures = parsed
        # stripe checks only that the time is not too old; a time far ahead is refused too,
        # so a signature cannot be made to stay valid for longer than the tolerance.
        if timestamp > time.time() + tolerance:
            raise SignatureInvalid(f"timestamp ahead of the {tolerance}s tolerance")
        signed = b"%d.%s" % (timestamp, request.body)
        stale = False
        for secret in secrets:
            if not secret.strip(" \t\r\n\f\v"):
                continue
            expected = hmac.digest(secret.encode("utf-8"), signed, "sha256").hex().encode()
            if any(hmac.compare_digest(expected, given) for given in signatures):
                if tolerance and timestamp < time.time() - tolerance:
                    stale = True
                    continue
                return
        if stale:
            raise SignatureInvalid(f"timestamp outside the {tolerance}s tolerance")
        raise SignatureInvalid("no valid Stripe signature for any configured secret")

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        header = stripe.WebhookSignature.generate_signature_header(
            body.decode("utf-8"), secret, timestamp
        )
        return {"stripe-signature": header, "content-type": "application/json"}


def _stripe_header(header: str) -> tuple[int, list[bytes]] | None:
    """The signed time and the `v1` signatures, read as the `stripe` package reads them
    (`stripe.WebhookSignature._get_timestamp_and_signatures`: the first `t`, through
    `int()`, so `+N`, `1_000` and surrounding spaces are the times N and 1000), for the
    checks `verify` repeats at a fraction of the cost (one HMAC over the raw bytes, no
    decoded copy of the body); None where stripe would refuse the header. A time of
    thousands of digits is refused here too: `int()` raises ValueError past Python's
    4,300-digit limit, which also bounds what a forged header costs to read."""
    items = [item.split("=", 2) for item in header.split(",")]
    try:
        # Every `t` read, then the first taken, as stripe does: a later bare `t` (no `=`)
        # makes stripe refuse the header, and so it does here.
        timestamp = int([item[1] for item in items if item[0] == "t"][0])  # noqa: RUF015 (all read)
        signatures = [item[1].encode() for item in items if item[0] == "v1"]
    except (IndexError, ValueError):
        return None
    return (timestamp, signatures) if signatures else None


class HmacScheme:
    """An HMAC of the raw body in one header, hex or base64, with an optional prefix
    (`sha256=` for GitHub). No timestamp is signed, so replays are caught by the
    provider's delivery id instead."""

    signs_timestamp = False

    def __init__(
        self,
        header: str,
        *,
        encoding: Literal["hex", "base64"] = "hex",
        prefix: str = "",
        digest: str = "sha256",
    ) -> None:
        self.header = header.lower()
        self.headers: tuple[str, ...] = (self.header,)
        self.encoding = encoding
        self.prefix = prefix
        self.digest = digest

    def _signature(self, body: bytes, secret: str) -> str:
        mac = hmac.new(secret.encode(), body, self.digest).digest()
        text = mac.hex() if self.encoding == "hex" else base64.b64encode(mac).decode()
        return self.prefix + text

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        given = request.headers.get(self.header)
        if not given:
            raise SignatureInvalid(f"missing {self.header} header")
        matched = False
        for secret in secrets:  # check every secret, so timing does not tell which matched
            matched |= hmac.compare_digest(
                self._signature(request.body, secret).encode(), given.strip().encode()
            )
        if not matched:
            raise SignatureInvalid(f"{self.header} does not match any configured secret")

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        return {self.header: self._signature(body, secret), "content-type": "application/json"}
