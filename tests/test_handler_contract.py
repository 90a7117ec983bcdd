"""One contract every registered handler keeps: its recorded samples verify and
translate into valid calls; the delivery id is read from the request alone; translation
from the stored request (the body and the kept headers) gives the same calls as from the
request as it arrived; a tampered body, a wrong secret and (where the scheme signs a time)
a stale timestamp are refused; any of several secrets is accepted (rotation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import SignatureInvalid
from bridge.events import About, Alias, Forget, ForgetVisitor, Identify, Purge, Track
from bridge.plugin import Handler, kept_headers
from bridge.registry import load_handlers
from bridge.testing import TEST_SECRET, run_handler, signed_request, stored_request

HANDLERS = load_handlers()
SAMPLES = [(h, event) for h in HANDLERS.values() for event in sorted(h.samples())]
# Schemes that sign a time refuse stale ones; the others dedupe replays by delivery id.
TIMED_SAMPLES = [(h, event) for h, event in SAMPLES if h.scheme.signs_timestamp]
DOCS = (Path(__file__).parent.parent / "docs" / "handlers.md").read_text()
#: The built-in samples' delivery ids, as they were when `delivery_id` still took the
#: parsed payload. A stored delivery is recognised by its id, so an id that changed would
#: make the first redelivery after an upgrade a new delivery.
RECORDED_IDS: dict[str, dict[str, str]] = {
    "auth0": {
        "batch": "sha256:6afcdd86d26a64246d558b1fb6d528b5d33196746f97004d2204c6769c8894d6",
        "s": "sha256:f55642dc16498ed393acaa666eddc3e86a3cb4d00954f49155da9cff55c946ce",
        "sdu": "sha256:1a3a1a74bf6db0b673c9c38b7297cbf54c8506cf1b2fa504bc972d072e2cea48",
        "sens": "sha256:46dcfb362aa61641afd42041701f2db2b2143ad265032eff03968d239651dc85",
        "ss": "sha256:26e7cd9b287779b236edeac908aa30752677e8ec6b09d185ae35af19b74f50f9",
    },
    "clerk": {
        "session.created": "msg_e0084894f568160a9b20588d877f6a10",
        "user.created": "msg_d0e25584241d6d2a2c41275c446c7a6b",
        "user.deleted": "msg_af4d3657ad43f16402e18557aed43281",
    },
    "github": {
        "marketplace_purchase": "d20d5317-1c0a-56f1-80aa-f4f688a6cc3c",
        "ping": "5a5ff531-cc4c-505c-a6ef-668b51c1575d",
        "sponsorship": "ab1d2188-746f-5180-94ce-d79c112d21ce",
    },
    "lemonsqueezy": {
        "order_created": "order_created:orders:1:2023-01-17T12:26:23.000000Z",
        "order_refunded": (
            "order_refunded:orders:4211907:2026-11-12T09:41:07.000000Z:"
            "5b1e7c1a-6f0d-4a3e-9a55-0c2d8e6f4b21"
        ),
        "subscription_cancelled": (
            "subscription_cancelled:subscriptions:771204:"
            "2026-11-20T08:14:45.000000Z:7f3a9b2e-1d5c-4e8f-a6b0-3c2e1d9f8a57"
        ),
        "subscription_created": (
            "subscription_created:subscriptions:771204:2026-11-10T16:30:05.000000Z:"
            "0d6e2f3c-8a41-4c1b-b7e2-2f9a5c7d1e34"
        ),
        "subscription_payment_success": (
            "subscription_payment_success:subscription-invoices:1650377:"
            "2026-12-10T16:30:12.000000Z:2c8d4e6f-9b1a-4d3c-8e5f-6a7b8c9d0e1f"
        ),
        "subscription_payment_refunded": (
            "subscription_payment_refunded:subscription-invoices:1650377:"
            "2026-12-14T11:02:37.000000Z:5b1e7c2a-3f4d-4a8b-9c6e-1d2f3a4b5c6d"
        ),
        "subscription_expired": (
            "subscription_expired:subscriptions:771204:"
            "2026-12-24T16:31:40.000000Z:9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
        ),
    },
    "paddle": {
        "adjustment.created": "evt_01h8c6tc8aa58zqj6h8a13r103",
        "adjustment.updated": "evt_01h8c6wz4ac017hxdehrgdvpz4",
        "subscription.canceled": "evt_01h7jk37p1ezj1k5b4kt83t35j",
        "subscription.created": "evt_01h7ht60jy5hpdv5x8tfsaxje4",
        "transaction.completed": "evt_01h8e1jxjnw9ra6zarhnz1a7y1",
    },
    "shopify": {
        "customers/create": "example.myshopify.com:customers/create:sample-customers-create",
        "customers/data_request": (
            "example.myshopify.com:customers/data_request:sample-customers-data_request"
        ),
        "customers/redact": "example.myshopify.com:customers/redact:sample-customers-redact",
        "orders/create": "example.myshopify.com:orders/create:sample-orders-create",
        "orders/paid": "example.myshopify.com:orders/paid:sample-orders-paid",
        "refunds/create": "example.myshopify.com:refunds/create:sample-refunds-create",
        "shop/redact": "example.myshopify.com:shop/redact:sample-shop-redact",
    },
    "stripe": {
        "charge.refunded": "evt_test_charge_refunded_0001",
        "checkout.session.completed": "evt_test_checkout_session_completed_0001",
        "customer.created": "evt_test_customer_created_0001",
        "customer.deleted": "evt_test_customer_deleted_0001",
        "customer.subscription.created": "evt_test_customer_subscription_created_0001",
        "customer.subscription.deleted": "evt_test_customer_subscription_deleted_0001",
        "invoice.paid": "evt_test_invoice_paid_0001",
        "payment_intent.succeeded": "evt_test_payment_intent_succeeded_0001",
    },
}


def ids(value: object) -> str:
    return value.name if isinstance(value, Handler) else str(value)


def test_the_built_in_handlers_are_registered() -> None:
    assert "stripe" in HANDLERS


@pytest.mark.parametrize("handler", HANDLERS.values(), ids=ids)
def test_every_handler_is_documented_and_has_samples(handler: Handler) -> None:
    headings = {
        line[3:].replace(" ", "").lower() for line in DOCS.splitlines() if line.startswith("## ")
    }
    assert handler.name in headings, f"docs/handlers.md has no section for {handler.name}"
    assert handler.samples(), "a handler ships samples for send-test and this test"


@pytest.mark.parametrize(("handler", "event"), SAMPLES, ids=ids)
def test_samples_verify_and_translate_into_valid_calls(handler: Handler, event: str) -> None:
    sample = handler.samples()[event]
    translated = run_handler(handler, sample.body, headers=sample.headers)
    assert isinstance(translated.delivery_id, str)
    assert translated.delivery_id
    assert all(
        isinstance(c, Track | Identify | Forget | Alias | ForgetVisitor | Purge | About)
        for c in translated.calls
    )
    again = run_handler(handler, sample.body, headers=sample.headers)
    assert again.delivery_id == translated.delivery_id  # a redelivery is recognisable
    assert again.calls == translated.calls  # and becomes the same calls


@pytest.mark.parametrize(("handler", "event"), SAMPLES, ids=ids)
def test_the_delivery_id_is_read_from_the_request_alone(
    handler: Handler, event: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The intake reads the id before anything parses the body: a body that `parse` or
    # `translate` refuses is still stored, and quarantined, under its id.
    sample = handler.samples()[event]
    request = signed_request(handler, sample.body, headers=sample.headers)

    def unused(*args: Any) -> Any:
        raise AssertionError("delivery_id parsed or translated the delivery")

    with monkeypatch.context() as patch:
        for method in ("parse", "translate"):
            patch.setattr(handler, method, unused)
        delivery_id = handler.delivery_id(request)
    assert delivery_id == run_handler(handler, sample.body, headers=sample.headers).delivery_id
    if event in RECORDED_IDS.get(handler.name, {}):  # a built-in sample: the id it always had
        assert delivery_id == RECORDED_IDS[handler.name][event]


def test_every_built_in_sample_has_its_recorded_id() -> None:
    built_in = {(h.name, e) for h, e in SAMPLES if h.__module__.startswith("handlers.")}
    assert built_in == {(name, event) for name, ids in RECORDED_IDS.items() for event in ids}


@pytest.mark.parametrize(("handler", "event"), SAMPLES, ids=ids)
def test_translation_from_the_kept_headers_gives_the_same_calls(
    handler: Handler, event: str
) -> None:
    # Translation runs after the 200, from the stored body and the headers stored with it
    # (`kept_headers`): a handler must list in `headers` every header it reads.
    sample = handler.samples()[event]
    arrived = signed_request(handler, sample.body, headers=sample.headers)
    stored = stored_request(handler, arrived)
    assert set(stored.headers) == set(arrived.headers) & set(kept_headers(handler))
    options = handler.options_type(include_test_events=True)
    calls = handler.translate(arrived, handler.parse(arrived), options)
    assert handler.translate(stored, handler.parse(stored), options) == calls


@pytest.mark.parametrize(("handler", "event"), SAMPLES, ids=ids)
def test_tampered_bodies_and_wrong_secrets_are_refused(handler: Handler, event: str) -> None:
    sample = handler.samples()[event]
    body = sample.body
    request = signed_request(handler, body, headers=sample.headers)
    tampered = signed_request(handler, body, headers=sample.headers)
    tampered = type(tampered)(
        source=tampered.source,
        headers=tampered.headers,
        body=body.replace(b"}", b" }", 1),
        received_at=time.time(),
    )
    if getattr(handler.scheme, "signs_body", True):  # a bearer token (Auth0) signs nothing
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(tampered, [TEST_SECRET], 300)
    others = ["whsec_b3RoZXIgc2VjcmV0", "whsec_dGhpcmQgc2VjcmV0"]
    with pytest.raises(SignatureInvalid):
        handler.scheme.verify(request, others, 300)
    # Rotation: the right secret is found first, in the middle and last of those listed.
    for place in range(len(others) + 1):
        secrets = [*others[:place], TEST_SECRET, *others[place:]]
        handler.scheme.verify(request, secrets, 300)


@pytest.mark.parametrize(("handler", "event"), TIMED_SAMPLES, ids=ids)
def test_stale_timestamps_are_refused(handler: Handler, event: str) -> None:
    sample = handler.samples()[event]
    body, headers = sample.body, sample.headers
    stale = signed_request(handler, body, timestamp=int(time.time()) - 301, headers=headers)
    with pytest.raises(SignatureInvalid, match="tolerance"):
        handler.scheme.verify(stale, [TEST_SECRET], 300)
    future = signed_request(handler, body, timestamp=int(time.time()) + 310, headers=headers)
    with pytest.raises(SignatureInvalid):
        handler.scheme.verify(future, [TEST_SECRET], 300)
