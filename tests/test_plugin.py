"""The plugin protocol's helpers: which headers are stored with a delivery."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from bridge.plugin import WebhookRequest, kept_headers
from bridge.registry import load_handlers
from handlers.stripe import handler as stripe

HANDLERS = load_handlers()


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("stripe", ("stripe-signature",)),
        ("paddle", ("paddle-signature",)),
        (
            "clerk",
            (
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
                "svix-id",
                "svix-timestamp",
                "svix-signature",
            ),
        ),
        ("lemonsqueezy", ("x-signature", "x-event-name")),
        ("github", ("x-hub-signature-256", "x-github-event", "x-github-delivery", "content-type")),
        (
            "shopify",
            (
                "x-shopify-hmac-sha256",
                "x-shopify-topic",
                "x-shopify-shop-domain",
                "x-shopify-event-id",
                "x-shopify-webhook-id",
            ),
        ),
        # Auth0's token is the secret itself: nothing of it is stored with the body.
        ("auth0", ()),
    ],
)
def test_what_each_built_in_handler_keeps(name: str, kept: tuple[str, ...]) -> None:
    assert kept_headers(HANDLERS[name]) == kept


class TokenScheme:
    """A scheme that authenticates the sender with a token and signs nothing."""

    headers = ("authorization",)
    signs_timestamp = False
    signs_body = False

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        pass

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        return {"authorization": secret}


class Plugin:
    def __init__(self, scheme: Any, headers: tuple[str, ...]) -> None:
        self.scheme = scheme
        self.headers = headers


def test_a_token_schemes_headers_are_never_kept() -> None:
    # Even when the scheme lists its header (to say what it reads): a token proves who
    # sent the delivery, and there is nothing to verify again from the store.
    assert kept_headers(Plugin(TokenScheme(), ("x-topic",))) == ("x-topic",)  # type: ignore[arg-type]


def test_kept_headers_are_the_schemes_then_the_handlers_once_each() -> None:
    plugin = Plugin(stripe.scheme, ("x-topic", "stripe-signature", "x-shop"))
    assert kept_headers(plugin) == ("stripe-signature", "x-topic", "x-shop")  # type: ignore[arg-type]
