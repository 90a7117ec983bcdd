"""A NUL in a value a visitor controls (checkout metadata, a cart attribute), end to end:
PostgreSQL's text cannot hold it, and such a delivery was once a 503 that the provider
retried for ever while /readyz said ready. It is stored and sent as it came."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from bridge.app import create_app
from bridge.config import load_settings
from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, ServerThread

SECRET = "whsec_nul_secret"
CHECKOUT = Path(__file__).parent / "fixtures" / "stripe" / "checkout.session.completed.json"

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def bridge(sink: RunningSink, database_url: str) -> Iterator[ServerThread]:
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
    }
    with ServerThread(create_app(load_settings(env))) as server:
        yield server


def checkout(n: str, user: str, browser: str) -> bytes:
    event = msgspec.json.decode(CHECKOUT.read_bytes())
    event["id"] = f"evt_nul_{n}"
    event["livemode"] = True
    event["data"]["object"].update(
        id=f"cs_nul_{n}",
        mode="payment",
        payment_status="paid",
        payment_intent=f"pi_nul_{n}",
        client_reference_id=user,
        customer=f"cus_nul_{n}",
        metadata={"millimetric_anonymous_id": browser, "note": "a\x00b"},
    )
    return msgspec.json.encode(event)


def test_a_nul_in_visitor_ids_is_stored_and_sent_as_it_came(
    bridge: ServerThread, sink: RunningSink
) -> None:
    for n, (user, browser) in enumerate([("usr\x00one", "brow\x00ser"), ("usr_two", "\x00")]):
        body = checkout(str(n), user, browser)
        answer = httpx.post(
            f"{bridge.url}/webhooks/stripe", content=body, headers=sign(stripe, body, SECRET)
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == "accepted"
    arrived = sink.arrived(4)  # an identify and a purchase each
    purchases = [e for e in arrived if e.get("event") == "purchase"]
    assert sorted((p["user_id"], p["anonymous_id"]) for p in purchases) == [
        ("usr\x00one", "brow\x00ser"),
        ("usr_two", "\x00"),
    ]
    assert httpx.get(f"{bridge.url}/readyz").status_code == 200
