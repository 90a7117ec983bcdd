"""The app's health routes, served for real, with the store and forwarder in its lifespan;
its one error mapping, whose last resort answers a bug 503 (logged and counted by type);
a handler's bug in translation, which quarantines the delivery (logged and counted by
kind); and the HTTP metrics, which count every answer under the status sent."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from bridge.app import create_app
from bridge.config import load_settings
from bridge.events import Output
from bridge.plugin import Sample, SignatureScheme, WebhookRequest
from bridge.registry import load_handlers, load_sources
from bridge.sink import SinkState, create_sink_app
from bridge.testing import TEST_SECRET, sign
from tests.conftest import RunningSink, ServerThread, subscription_event, translated


def test_healthz_and_readyz(sink: RunningSink, tmp_path: Path) -> None:
    settings = load_settings(
        {
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        }
    )
    with ServerThread(create_app(settings)) as server:
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        assert ready.json()["forwarding"] == "leader"  # SQLite: the one process forwards


def test_readyz_is_degraded_while_the_key_is_refused(sink: RunningSink, tmp_path: Path) -> None:
    from bridge.stages.forward import Forwarder

    httpx.post(f"{sink.url}/_sink/knobs", json={"keys": []}).raise_for_status()
    settings = load_settings(
        {
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        }
    )
    app = create_app(settings)
    with ServerThread(app) as server:
        forwarder: Forwarder = app.state.forwarder
        # The CLI's forget queues a call; the forwarder meets the refused key with it.
        from click.testing import CliRunner

        from bridge.cli import main

        CliRunner().invoke(
            main, ["forget", "u1"], env={"BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db"}
        )
        deadline = time.monotonic() + 10
        while forwarder.paused is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "degraded"
        assert "invalid_api_key" in ready["reasons"][0]
        assert ready["pending"] == 1


# -- the last resort and the status the HTTP metrics record ----------------------------------

MARKER = "PAYLOAD_MARKER_5e1b"  # in what a broken handler raises; must never be shown
STRIPE = load_handlers()["stripe"]


def explode(at: str) -> None:
    """A plugin's bug, raised where the test arms it: an exception from outside the error
    tree whose text quotes the payload."""
    if BROKEN.armed == at:
        raise KeyError(f"{MARKER} in the delivery")


class BrokenScheme:
    headers = STRIPE.scheme.headers
    signs_timestamp = True

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        explode("verify")
        STRIPE.scheme.verify(request, secrets, tolerance)

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        return STRIPE.scheme.sign(body, secret, timestamp)


class BrokenHandler:
    """Stripe's handler, with a bug that goes off at the stage it is armed for."""

    name = "broken"
    secret_variable = "BROKEN_WEBHOOK_SECRET"
    options_type = STRIPE.options_type
    scheme: SignatureScheme = BrokenScheme()
    headers = STRIPE.headers
    armed: str | None = None

    def parse(self, request: WebhookRequest) -> Any:
        explode("parse")
        return STRIPE.parse(request)

    def delivery_id(self, request: WebhookRequest) -> str:
        explode("delivery_id")
        return STRIPE.delivery_id(request)

    def translate(self, request: WebhookRequest, payload: Any, options: Any) -> list[Output]:
        explode("translate")
        return STRIPE.translate(request, payload, options)

    def samples(self) -> Mapping[str, Sample]:
        return STRIPE.samples()


BROKEN = BrokenHandler()


class Broken:
    def __init__(self, url: str, app: Litestar, database: Path) -> None:
        self.url = url
        self.app = app
        self.database = database


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broken]:
    """A bridge with a source whose handler can be made to fail, a 1 KiB body limit and a
    half-second body deadline."""
    tmp = tmp_path_factory.mktemp("broken")
    with ServerThread(create_sink_app(SinkState())) as sink:
        env = {
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp}/bridge.db",
            "BRIDGE_MAX_BODY_BYTES": "1024",
            "BRIDGE_BODY_TIMEOUT_SECONDS": "0.5",
            "STRIPE_WEBHOOK_SECRET": TEST_SECRET,
            "BROKEN_WEBHOOK_SECRET": TEST_SECRET,
        }
        sources = load_sources(env, {"stripe": STRIPE, "broken": BROKEN})
        app = create_app(load_settings(env), sources=sources)
        with ServerThread(app) as server:
            yield Broken(server.url, app, tmp / "bridge.db")


def event(n: str) -> bytes:
    return subscription_event(n, customer="cus_b")


def samples(url: str) -> dict[tuple[str, ...], float]:
    """Every sample on /metrics, by name and label values."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def grew(before: dict[tuple[str, ...], float], after: dict[tuple[str, ...], float]) -> set[Any]:
    return {k for k, v in after.items() if v > before.get(k, 0.0)}


def http_requests(status: int) -> tuple[str, ...]:
    return (
        "bridge_http_requests_total",
        "app_name=millimetric_bridge",
        "method=POST",
        "path=/webhooks/{source}",
        f"status_code={status}",
    )


@pytest.mark.parametrize("stage", ["verify", "delivery_id"])
def test_a_handler_that_raises_before_the_delivery_is_stored_is_503_logged_and_counted_by_type(
    broken: Broken, stage: str
) -> None:
    # A bug in a plugin's scheme or delivery_id (all the intake runs) must not be a bare
    # 500 with nothing said: 503, so that the provider retries and nothing is lost once it
    # is fixed, one log line and a metric naming the exception's type, and never its text,
    # which here quotes the payload.
    body = event(f"broken-{stage}")
    BROKEN.armed = stage
    try:
        before = samples(broken.url)
        with capture_logs() as lines:
            answer = httpx.post(
                f"{broken.url}/webhooks/broken", content=body, headers=sign(BROKEN, body)
            )
        after = samples(broken.url)
    finally:
        BROKEN.armed = None
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    assert answer.json() == {
        "ok": False,
        "error": "handler_failed",
        "reason": "handler failed: KeyError",
    }
    (line,) = [line for line in lines if line["event"] == "webhook"]
    assert line["log_level"] == "error"
    assert (line["result"], line["reason"], line["stage"], line["error"]) == (
        "failed",
        "handler_failed",
        stage,
        "KeyError",
    )
    assert MARKER not in json.dumps(lines, default=str)
    assert grew(before, after) >= {
        (
            "bridge_webhooks_total",
            "reason=handler_failed",
            "result=failed",
            "source=broken",
        ),
        ("bridge_unexpected_errors_total", "error=KeyError", "path=/webhooks/{source}"),
        http_requests(503),
    }
    # Fixed, the provider's retry of the same delivery is taken.
    retried = httpx.post(f"{broken.url}/webhooks/broken", content=body, headers=sign(BROKEN, body))
    assert retried.json() == {"ok": True, "result": "accepted"}
    # Translated before the next test arms the handler again (the bridge is the module's).
    assert translated(broken.database, f"evt_broken-{stage}") == ("translated", None)


def inbox_id(database: Path, provider_event_id: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        (found,) = db.execute(
            "SELECT id FROM inbox WHERE provider_event_id = ?", (provider_event_id,)
        ).fetchone()
    return int(found)


def outbox_rows(database: Path, provider_event_id: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM outbox JOIN inbox ON inbox.id = outbox.inbox_id"
            " WHERE inbox.provider_event_id = ?",
            (provider_event_id,),
        ).fetchone()
    return int(count)


@pytest.mark.parametrize("stage", ["parse", "translate"])
def test_a_handler_that_raises_in_translation_quarantines_logged_and_counted_by_kind(
    broken: Broken, stage: str
) -> None:
    # The intake no longer runs parse or translate: the verified delivery is taken, and
    # the bug goes off in the translate stage, which quarantines the delivery with the
    # exception's type (and text, stored for the operator) instead of losing it or holding
    # up the deliveries after it. One log line and a metric say the kind ("handler"),
    # never the text, which here quotes the payload.
    body = event(f"broken-{stage}")
    delivery = f"evt_broken-{stage}"
    BROKEN.armed = stage
    try:
        before = samples(broken.url)
        with capture_logs() as lines:
            answer = httpx.post(
                f"{broken.url}/webhooks/broken", content=body, headers=sign(BROKEN, body)
            )
            state, reason = translated(broken.database, delivery)
        after = samples(broken.url)
    finally:
        BROKEN.armed = None
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ok": True, "result": "accepted"}
    assert state == "quarantined"
    assert reason is not None
    assert reason.startswith("handler: KeyError"), reason
    assert MARKER in reason  # kept for the operator (`outbox dead`), shown nowhere else
    assert outbox_rows(broken.database, delivery) == 0
    (line,) = [line for line in lines if line["event"] == "delivery quarantined"]
    assert line["log_level"] == "warning"
    assert (line["source"], line["delivery"], line["reason"]) == ("broken", delivery, "handler")
    assert MARKER not in json.dumps(lines, default=str) + answer.text
    assert MARKER not in httpx.get(f"{broken.url}/metrics").text
    assert grew(before, after) >= {
        ("bridge_translate_failures_total", "reason=handler", "source=broken"),
        http_requests(200),
    }
    # Fixed, the stored delivery is translated again and its call queued.
    from click.testing import CliRunner

    from bridge.cli import main

    done = CliRunner().invoke(
        main,
        ["outbox", "retranslate", "--id", str(inbox_id(broken.database, delivery))],
        env={"BRIDGE_DATABASE_URL": f"sqlite:///{broken.database}"},
    )
    assert done.exit_code == 0, done.output
    assert translated(broken.database, delivery) == ("translated", None)
    assert outbox_rows(broken.database, delivery) == 1


def test_a_store_that_raises_outside_the_error_tree_is_503(
    broken: Broken, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = broken.app.state.store

    async def append(delivery: Any) -> Any:
        raise sqlite3.InterfaceError(MARKER)

    monkeypatch.setattr(store, "append", append)
    body = event("store-raises")
    with capture_logs() as lines:
        answer = httpx.post(
            f"{broken.url}/webhooks/stripe", content=body, headers=sign(STRIPE, body)
        )
    assert answer.status_code == 503
    assert answer.json()["reason"] == "the store failed: InterfaceError"
    (line,) = [line for line in lines if line["event"] == "webhook"]
    assert (line["result"], line["reason"], line["error"]) == (
        "failed",
        "store_failed",
        "InterfaceError",
    )
    assert MARKER not in json.dumps(lines, default=str) + answer.text


def test_an_exception_on_any_route_is_503_logged_and_counted_never_a_bare_500(
    broken: Broken, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = broken.app.state.store

    async def backlog() -> Any:
        raise ZeroDivisionError(MARKER)

    monkeypatch.setattr(store, "backlog", backlog)
    before = samples(broken.url)
    with capture_logs() as lines:
        answer = httpx.get(f"{broken.url}/readyz")
    assert answer.status_code == 503
    assert answer.json() == {
        "ok": False,
        "error": "internal_error",
        "reason": "unexpected ZeroDivisionError",
    }
    assert answer.headers["retry-after"] == "5"
    (line,) = [line for line in lines if line["event"] == "unexpected_error"]
    assert line["path"] == "/readyz"
    assert line["error"] == "ZeroDivisionError"
    assert line["log_level"] == "error"
    assert MARKER not in json.dumps(lines, default=str) + answer.text
    assert grew(before, samples(broken.url)) >= {
        ("bridge_unexpected_errors_total", "error=ZeroDivisionError", "path=/readyz"),
        (
            "bridge_http_requests_total",
            "app_name=millimetric_bridge",
            "method=GET",
            "path=/readyz",
            "status_code=503",
        ),
    }


def test_http_metrics_count_each_refusal_under_the_status_sent(broken: Broken) -> None:
    # The intake answers at the ASGI level; its refusals were once counted as 200s, so an
    # alert on the status series never fired.
    body = event("metrics")
    cases = [
        (401, "/webhooks/stripe", body, {"stripe-signature": "t=1,v1=00"}),
        (404, "/webhooks/nope", body, sign(STRIPE, body)),
        (413, "/webhooks/stripe", b" " * 2048, sign(STRIPE, b"{}")),
        (400, "/webhooks/stripe", b"[]", sign(STRIPE, b"[]")),
    ]
    for status, path, sent, headers in cases:
        before = samples(broken.url)
        answer = httpx.post(f"{broken.url}{path}", content=sent, headers=headers)
        assert answer.status_code == status, answer.text
        counted = grew(before, samples(broken.url))
        assert http_requests(status) in counted, status
        assert http_requests(200) not in counted, status
    BROKEN.armed = "delivery_id"  # a bug the intake meets (translation's come after a 200)
    try:
        before = samples(broken.url)
        answer = httpx.post(
            f"{broken.url}/webhooks/broken", content=body, headers=sign(BROKEN, body)
        )
    finally:
        BROKEN.armed = None
    assert answer.status_code == 503
    counted = grew(before, samples(broken.url))
    assert http_requests(503) in counted
    assert ("bridge_http_requests_error_total", *http_requests(503)[1:]) in counted
    assert http_requests(200) not in counted
    before = samples(broken.url)
    assert httpx.post(f"{broken.url}/webhooks/stripe", content=body, headers=sign(STRIPE, body))
    assert http_requests(200) in grew(before, samples(broken.url))
