"""Metrics, the admin API, the OpenAPI schema and the canonical log lines."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import stripe
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from bridge.app import create_app
from bridge.config import load_settings
from tests.conftest import RunningSink, ServerThread

SECRET = "whsec_operations_secret"
TOKEN = "admin-token-0123456789"
FIXTURE = Path(__file__).parent / "fixtures" / "stripe" / "checkout.session.completed.json"


def signed_checkout() -> tuple[bytes, dict[str, str]]:
    event = msgspec.json.decode(FIXTURE.read_bytes())
    event["data"]["object"].update(
        mode="payment", payment_intent="pi_ops", client_reference_id="user_ops"
    )
    body = msgspec.json.encode(event)
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
    return body, {"stripe-signature": header, "x-request-id": "req-123"}


def serve(sink: RunningSink, tmp_path: Path, **extra: str) -> ServerThread:
    (tmp_path / "bridge.toml").write_text("[sources.stripe]\ninclude_test_events = true\n")
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        "STRIPE_WEBHOOK_SECRET": SECRET,
        **extra,
    }
    return ServerThread(create_app(load_settings(env)))


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[ServerThread]:
    with serve(sink, tmp_path, BRIDGE_ADMIN_TOKEN=TOKEN) as server:
        yield server


def metric(text: str, line_start: str) -> float:
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    ]
    return sum(values)


def test_metrics_show_webhooks_answers_and_the_outbox(bridge: ServerThread) -> None:
    before = httpx.get(f"{bridge.url}/metrics").text
    body, headers = signed_checkout()
    assert (
        httpx.post(f"{bridge.url}/webhooks/stripe", content=body, headers=headers).status_code
        == 200
    )
    httpx.post(f"{bridge.url}/webhooks/stripe", content=body, headers={"stripe-signature": "x"})
    httpx.post(f"{bridge.url}/webhooks/nope", content=b"{}")
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{bridge.url}/metrics").text
        if metric(text, 'bridge_forwarded_calls_total{route="track"}') > metric(
            before, 'bridge_forwarded_calls_total{route="track"}'
        ):
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    accepted = 'bridge_webhooks_total{reason="",result="accepted",source="stripe"}'
    assert metric(text, accepted) == metric(before, accepted) + 1
    rejected = 'bridge_webhooks_total{reason="signature",result="rejected",source="stripe"}'
    assert metric(text, rejected) == metric(before, rejected) + 1
    assert (
        metric(
            text,
            'bridge_webhooks_total{reason="unknown_source",result="rejected",source="unknown"}',
        )
        >= 1
    )
    assert 'bridge_millimetric_answers_total{route="/v1/batch",status="202"}' in text
    for series in (
        "bridge_outbox_pending",
        "bridge_outbox_oldest_pending_seconds",
        "bridge_forwarder_paused",
        "bridge_dead_letters_total",
        "bridge_retry_wait_seconds_total",
        "bridge_http_requests_total",
    ):
        assert series in text
    assert SECRET not in text
    assert "user_ops" not in text


def test_admin_api_needs_the_token(bridge: ServerThread) -> None:
    url = f"{bridge.url}/admin/outbox"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    answer = httpx.get(url, headers={"authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert set(answer.json()) >= {"pending", "dead", "paused", "oldest_pending_age"}


def test_admin_dead_replay_and_forget(bridge: ServerThread) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{bridge.url}/admin/dead", headers=auth).json() == []
    refused = httpx.post(f"{bridge.url}/admin/replay", headers=auth, json={})
    assert refused.status_code == 400
    assert httpx.post(f"{bridge.url}/admin/replay", headers=auth, json={"all": True}).json() == {
        "count": 0
    }
    forget = httpx.post(f"{bridge.url}/admin/forget", headers=auth, json={"user_id": "u1"})
    assert forget.status_code == 202
    assert (
        httpx.post(f"{bridge.url}/admin/forget", headers=auth, json={"user_id": ""}).status_code
        == 400
    )


def test_admin_api_is_off_without_a_token(sink: RunningSink, tmp_path: Path) -> None:
    with serve(sink, tmp_path) as server:
        assert httpx.get(f"{server.url}/admin/outbox").status_code == 404
        schema = httpx.get(f"{server.url}/schema/openapi.json").json()
        assert not any(p.startswith("/admin") for p in schema["paths"])


def test_openapi_documents_the_admin_api_and_intake(bridge: ServerThread) -> None:
    schema = httpx.get(f"{bridge.url}/schema/openapi.json").json()
    assert {
        "/admin/outbox",
        "/admin/dead",
        "/admin/replay",
        "/admin/forget",
        "/webhooks/{source}",
        "/healthz",
        "/readyz",
    } <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"


def test_one_log_line_per_webhook_with_no_secret_or_payload_value(bridge: ServerThread) -> None:
    body, headers = signed_checkout()
    with capture_logs(processors=[merge_contextvars]) as lines:
        answer = httpx.post(f"{bridge.url}/webhooks/stripe", content=body, headers=headers)
        httpx.post(
            f"{bridge.url}/webhooks/stripe",
            content=body,
            headers={
                "stripe-signature": headers["stripe-signature"] + "0",
                "x-request-id": "req-124",
            },
        )
        time.sleep(0.5)  # the forwarder's line too
    assert answer.headers["x-request-id"] == "req-123"
    webhook_lines = [line for line in lines if line["event"] == "webhook"]
    assert [(line["result"], line["request_id"]) for line in webhook_lines] == [
        ("accepted", "req-123"),
        ("rejected", "req-124"),
    ]
    forward_lines = [line for line in lines if line["event"] == "forward"]
    assert forward_lines
    assert all(len(line["request_id"]) == 32 for line in forward_lines)
    dumped = json.dumps(lines, default=str)
    for value in (
        SECRET,
        headers["stripe-signature"],
        "sk_dev_local_bridge",
        "user_ops",
        "chris@gorails.com",
        "cus_M5wW9RPFk9xNZ5",
        "pi_ops",
    ):
        assert value not in dumped
