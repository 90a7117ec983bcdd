"""One contract every registered handler keeps: its recorded samples verify and
translate into valid calls; a tampered body, a wrong secret and (where the scheme signs a
time) a stale timestamp are refused; any of several secrets is accepted (rotation)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bridge.errors import SignatureInvalid
from bridge.events import About, Alias, Forget, ForgetVisitor, Identify, Purge, Track
from bridge.plugin import Handler
from bridge.registry import load_handlers
from bridge.testing import TEST_SECRET, run_handler, signed_request

HANDLERS = load_handlers()
SAMPLES = [(h, event) for h in HANDLERS.values() for event in sorted(h.samples())]
# Schemes that sign a time refuse stale ones; the others dedupe replays by delivery id.
TIMED_SAMPLES = [(h, event) for h, event in SAMPLES if h.scheme.signs_timestamp]
DOCS = (Path(__file__).parent.parent / "docs" / "handlers.md").read_text()


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
    with pytest.raises(SignatureInvalid):
        handler.scheme.verify(request, ["whsec_b3RoZXIgc2VjcmV0"], 300)
    handler.scheme.verify(request, ["whsec_b3RoZXIgc2VjcmV0", TEST_SECRET], 300)  # rotation


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
