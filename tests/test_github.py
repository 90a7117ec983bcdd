"""GitHub: signatures made by @octokit/webhooks-methods verify, Sponsors and Marketplace
purchases become `purchase` with their list price in US cents, ping and everything else is
acknowledged, and the end-to-end path through the real app and the real sink."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec
import pytest

from bridge.errors import PayloadInvalid, SignatureInvalid
from bridge.events import Track
from bridge.plugin import WebhookRequest
from bridge.testing import run_handler, signed_request
from handlers.github import handler
from tests.conftest import RunningSink, translated
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "github"
SECRET = "gh-webhook-secret-current"
OLD_SECRET = "gh-webhook-secret-previous"
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
# The purchases' event ids, from their signed bodies: the sponsorship's node id and the
# second it was created (2026-11-02T14:05:31Z); the account, plan and effective date
# (2026-11-03) of the Marketplace purchase. Never the delivery GUID.
SPONSORSHIP_EVENT = "purchase:github:sponsorship:S_kwHOAVNkMs4AAqFz:1793628331"
MARKETPLACE_EVENT = "purchase:github:marketplace:90311524:7310:1793664000"


def fixture(name: str) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode((FIXTURES / name).read_bytes())
    return decoded


def sponsorship(action: str = "created", **tier: Any) -> bytes:
    event = fixture("sponsorship_created.SYNTHETIC.json")
    event["action"] = action
    event["sponsorship"]["tier"].update(tier)
    return msgspec.json.encode(event)


def marketplace(action: str = "purchased", **changes: Any) -> bytes:
    event = fixture("marketplace_purchase_purchased.SYNTHETIC.json")
    event["action"] = action
    purchase = event["marketplace_purchase"]
    for key, value in changes.items():
        if key in purchase["plan"]:
            purchase["plan"][key] = value
        else:
            purchase[key] = value
    return msgspec.json.encode(event)


def run(event: str, body: bytes, delivery: str = DELIVERY) -> list[Any]:
    headers = {"x-github-event": event, "x-github-delivery": delivery}
    return run_handler(handler, body, headers=headers).calls


# -- signatures ---------------------------------------------------------------------------


def test_octokit_signed_fixtures_verify_and_tampered_ones_do_not() -> None:
    signatures = json.loads((FIXTURES / "signatures.example.json").read_text())
    for name, headers in signatures["files"].items():
        body = (FIXTURES / name).read_bytes()
        signed = {"x-hub-signature-256": headers["X-Hub-Signature-256"]}
        good = WebhookRequest(source="github", headers=signed, body=body, received_at=0)
        handler.scheme.verify(good, [signatures["secret"]], 300)
        handler.scheme.verify(good, ["another secret", signatures["secret"]], 300)  # rotation
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(good, ["It's a Secret to Everybody!"], 300)
        tampered = WebhookRequest(
            source="github", headers=signed, body=body.replace(b"}", b" }", 1), received_at=0
        )
        with pytest.raises(SignatureInvalid):
            handler.scheme.verify(tampered, [signatures["secret"]], 300)
        # The legacy SHA-1 header alone is not enough.
        legacy = WebhookRequest(
            source="github",
            headers={"x-hub-signature": headers["X-Hub-Signature"]},
            body=body,
            received_at=0,
        )
        with pytest.raises(SignatureInvalid, match="missing x-hub-signature-256"):
            handler.scheme.verify(legacy, [signatures["secret"]], 300)


def test_our_signatures_are_githubs() -> None:
    body = (FIXTURES / "ping.json").read_bytes()
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert handler.scheme.sign(body, SECRET, 0)["x-hub-signature-256"] == expected


# -- translation ----------------------------------------------------------------------------


def test_ping_and_other_events_are_acknowledged_and_ignored() -> None:
    for event, name in (
        ("ping", "ping.json"),
        ("push", "push_with-new-branch.json"),
        ("star", "star_created.json"),
    ):
        translated = run_handler(
            handler,
            (FIXTURES / name).read_bytes(),
            headers={"x-github-event": event, "x-github-delivery": DELIVERY},
        )
        assert translated.calls == []
        assert translated.delivery_id == DELIVERY


def test_a_new_sponsorship_is_a_purchase_at_its_tier_price() -> None:
    (purchase,) = run("sponsorship", sponsorship())
    assert isinstance(purchase, Track)
    assert purchase.event == "purchase"
    assert purchase.event_id == SPONSORSHIP_EVENT
    assert purchase.timestamp is not None
    assert purchase.timestamp.isoformat() == "2026-11-02T14:05:31+00:00"
    assert purchase.anonymous_id == "github:48211093"
    assert purchase.user_id is None
    assert purchase.properties == {
        "amount_cents": 1500,
        "currency": "USD",
        "product": "github_sponsors",
        "sponsorship": "S_kwHOAVNkMs4AAqFz",
        "tier": "$15 a month",
        "tier_id": "ST_kwDOAVNkMs4AAfxq",
        "one_time": False,
        "interval": "month",
    }
    assert isinstance(purchase.properties["amount_cents"], int)
    # The user documentation names the currency as it is sent.
    docs = (Path(__file__).parent.parent / "docs" / "handlers.md").read_text()
    section = docs.split("\n## GitHub\n")[1].split("\n## ")[0]
    assert f"`currency` `{purchase.properties['currency']}`" in section


def test_a_one_time_sponsorship_has_no_interval() -> None:
    (purchase,) = run("sponsorship", sponsorship(is_one_time=True, monthly_price_in_cents=2500))
    assert purchase.properties["amount_cents"] == 2500
    assert purchase.properties["one_time"] is True
    assert "interval" not in purchase.properties


def test_sponsorship_changes_and_free_tiers_are_not_purchases() -> None:
    for action in (
        "cancelled",
        "edited",
        "tier_changed",
        "pending_tier_change",
        "pending_cancellation",
    ):
        assert run("sponsorship", sponsorship(action)) == []
    assert run("sponsorship", sponsorship(monthly_price_in_cents=0)) == []
    no_tier = fixture("sponsorship_created.SYNTHETIC.json")
    del no_tier["sponsorship"]["tier"]
    assert run("sponsorship", msgspec.json.encode(no_tier)) == []


def test_a_private_sponsor_is_sent_by_numeric_id_only() -> None:
    event = fixture("sponsorship_created.SYNTHETIC.json")
    event["sponsorship"]["privacy_level"] = "private"
    (purchase,) = run("sponsorship", msgspec.json.encode(event))
    assert b"sam-patel" not in msgspec.json.encode(purchase)


def test_a_marketplace_purchase_is_its_plan_price_per_cycle_and_unit() -> None:
    (purchase,) = run("marketplace_purchase", marketplace())
    assert purchase.event_id == MARKETPLACE_EVENT
    assert purchase.anonymous_id == "github:90311524"
    assert purchase.timestamp.isoformat() == "2026-11-03T00:00:00+00:00"
    assert purchase.properties == {
        "amount_cents": 4800,  # 12 seats at 400 cents
        "currency": "USD",
        "product": "github_marketplace",
        "plan": "Team",
        "plan_id": 7310,
        "billing_cycle": "monthly",
        "unit_count": 12,
        "account_type": "Organization",
    }
    wire = msgspec.json.encode(purchase)
    assert b"example.org" not in wire  # billing and sender e-mails stay out
    (yearly,) = run("marketplace_purchase", marketplace(billing_cycle="yearly"))
    assert yearly.properties["amount_cents"] == 48000
    (flat,) = run("marketplace_purchase", marketplace(price_model="flat-rate"))
    assert flat.properties["amount_cents"] == 400
    assert "unit_count" not in flat.properties
    (octokit_style,) = run("marketplace_purchase", marketplace(price_model="per-unit"))
    assert octokit_style.properties["amount_cents"] == 4800


def test_trials_free_plans_and_other_marketplace_actions_are_not_purchases() -> None:
    assert run("marketplace_purchase", marketplace(on_free_trial=True)) == []
    assert run("marketplace_purchase", marketplace(price_model="FREE")) == []
    assert run("marketplace_purchase", marketplace(monthly_price_in_cents=0)) == []
    assert run("marketplace_purchase", marketplace(billing_cycle="weekly")) == []
    for action in ("changed", "cancelled", "pending_change", "pending_change_cancelled"):
        assert run("marketplace_purchase", marketplace(action)) == []


def test_the_delivery_guid_is_the_dedupe_key_and_required() -> None:
    body = sponsorship()
    one = run_handler(
        handler, body, headers={"x-github-event": "sponsorship", "x-github-delivery": DELIVERY}
    )
    again = run_handler(
        handler, body, headers={"x-github-event": "sponsorship", "x-github-delivery": DELIVERY}
    )
    assert (
        (one.delivery_id, one.calls)
        == (again.delivery_id, again.calls)
        == (
            DELIVERY,
            one.calls,
        )
    )
    for headers, reason in (
        ({"x-github-event": "sponsorship"}, "X-GitHub-Delivery"),
        ({"x-github-event": "sponsorship", "x-github-delivery": "x" * 101}, "X-GitHub-Delivery"),
        ({"x-github-delivery": DELIVERY}, "X-GitHub-Event"),
    ):
        with pytest.raises(PayloadInvalid, match=reason):
            handler.parse(signed_request(handler, body, headers=headers))


def test_a_purchases_event_id_comes_from_the_signed_body_not_the_guid() -> None:
    """X-GitHub-Delivery is not signed: the same body under a fresh GUID is a new delivery
    but the same purchase."""
    for event, body, expected in (
        ("sponsorship", sponsorship(), SPONSORSHIP_EVENT),
        ("marketplace_purchase", marketplace(), MARKETPLACE_EVENT),
    ):
        first = run_handler(
            handler, body, headers={"x-github-event": event, "x-github-delivery": DELIVERY}
        )
        fresh = str(uuid.uuid4())
        again = run_handler(
            handler, body, headers={"x-github-event": event, "x-github-delivery": fresh}
        )
        assert (first.delivery_id, again.delivery_id) == (DELIVERY, fresh)
        assert [c.event_id for c in first.calls] == [c.event_id for c in again.calls] == [expected]
        # Sent form-encoded, the same payload is the same purchase too.
        form = urlencode({"payload": body.decode()}).encode()
        headers = {
            "x-github-event": event,
            "x-github-delivery": fresh,
            "content-type": "application/x-www-form-urlencoded",
        }
        assert [c.event_id for c in run_handler(handler, form, headers=headers).calls] == [expected]


def test_another_sponsorship_or_purchase_is_another_event() -> None:
    def event_id(event: str, body: dict[str, Any]) -> str:
        (call,) = run(event, msgspec.json.encode(body))
        assert isinstance(call, Track)
        assert call.event_id is not None
        return call.event_id

    base = fixture("sponsorship_created.SYNTHETIC.json")
    other = fixture("sponsorship_created.SYNTHETIC.json")
    other["sponsorship"]["node_id"] = "S_kwHOAVNkMs4AAqG0"
    later = fixture("sponsorship_created.SYNTHETIC.json")
    later["sponsorship"]["created_at"] = "2027-01-02T14:05:31+00:00"
    # The same instant written with another offset is the same sponsorship.
    shifted = fixture("sponsorship_created.SYNTHETIC.json")
    shifted["sponsorship"]["created_at"] = "2026-11-02T15:05:31+01:00"
    ids = [event_id("sponsorship", b) for b in (base, other, later, shifted)]
    assert ids[0] == ids[3] == SPONSORSHIP_EVENT
    assert len(set(ids)) == 3
    purchase = fixture("marketplace_purchase_purchased.SYNTHETIC.json")
    renewed = fixture("marketplace_purchase_purchased.SYNTHETIC.json")
    renewed["effective_date"] = "2027-11-03T00:00:00+00:00"
    upgraded = fixture("marketplace_purchase_purchased.SYNTHETIC.json")
    upgraded["marketplace_purchase"]["plan"]["id"] = 7311
    ids = [event_id("marketplace_purchase", b) for b in (purchase, renewed, upgraded)]
    assert ids[0] == MARKETPLACE_EVENT
    assert len(set(ids)) == 3


def test_a_body_without_its_ids_is_named_by_its_digest() -> None:
    anonymous = fixture("sponsorship_created.SYNTHETIC.json")
    del anonymous["sponsorship"]["node_id"]
    body = msgspec.json.encode(anonymous)
    (one,) = run("sponsorship", body)
    (two,) = run("sponsorship", body, delivery=str(uuid.uuid4()))
    digest = hashlib.sha256(body).hexdigest()[:32]
    assert one.event_id == two.event_id == f"purchase:github:sha256:{digest}"
    undated = fixture("marketplace_purchase_purchased.SYNTHETIC.json")
    del undated["effective_date"]
    (purchase,) = run("marketplace_purchase", msgspec.json.encode(undated))
    assert purchase.event_id is not None
    assert purchase.event_id.startswith("purchase:github:sha256:")
    # Ids that would not fit an event_id are refused rather than cut.
    long = fixture("sponsorship_created.SYNTHETIC.json")
    long["sponsorship"]["node_id"] = "S" * 65
    with pytest.raises(PayloadInvalid, match="unexpected sponsorship payload"):
        run("sponsorship", msgspec.json.encode(long))


@pytest.mark.parametrize(
    ("event", "body", "message"),
    [
        ("marketplace_purchase", "sponsorship_created.SYNTHETIC.json", "carries a sponsorship"),
        ("ping", "sponsorship_created.SYNTHETIC.json", "carries a sponsorship"),
        ("push", "sponsorship_created.SYNTHETIC.json", "carries a sponsorship"),
        (
            "sponsorship",
            "marketplace_purchase_purchased.SYNTHETIC.json",
            "carries a marketplace_purchase",
        ),
        ("sponsorship", "ping.json", "carries no sponsorship"),
        ("marketplace_purchase", "star_created.json", "carries no marketplace_purchase"),
    ],
)
def test_the_event_header_must_name_what_the_signed_body_carries(
    event: str, body: str, message: str
) -> None:
    raw = (FIXTURES / body).read_bytes()
    with pytest.raises(PayloadInvalid, match=f"X-GitHub-Event is {event} but the body {message}"):
        handler.parse(
            signed_request(
                handler, raw, headers={"x-github-event": event, "x-github-delivery": DELIVERY}
            )
        )


def test_a_body_carrying_both_purchases_is_refused() -> None:
    both = fixture("sponsorship_created.SYNTHETIC.json")
    both["marketplace_purchase"] = fixture("marketplace_purchase_purchased.SYNTHETIC.json")[
        "marketplace_purchase"
    ]
    for event in ("sponsorship", "marketplace_purchase", "ping"):
        with pytest.raises(PayloadInvalid, match="both"):
            run(event, msgspec.json.encode(both))


def test_malformed_payloads_are_refused() -> None:
    headers = {"x-github-event": "sponsorship", "x-github-delivery": DELIVERY}
    for body in (b"not json", b"[1, 2]", b'{"action": 5}'):
        with pytest.raises(PayloadInvalid):
            handler.parse(signed_request(handler, body, headers=headers))
    wrong = msgspec.json.encode({"action": "created", "sponsorship": {"tier": "gold"}})
    request = signed_request(handler, wrong, headers=headers)
    with pytest.raises(PayloadInvalid, match="unexpected sponsorship payload"):
        handler.translate(request, handler.parse(request), handler.options_type())


def test_form_encoded_deliveries_are_read() -> None:
    body = urlencode({"payload": sponsorship().decode()}).encode()
    headers = {
        "x-github-event": "sponsorship",
        "x-github-delivery": DELIVERY,
        "content-type": "application/x-www-form-urlencoded",
    }
    (purchase,) = run_handler(handler, body, headers=headers).calls
    assert purchase.properties["amount_cents"] == 1500
    for bad in (b"other=1", b"payload=1&payload=2", b"\xff"):
        with pytest.raises(PayloadInvalid):
            handler.parse(signed_request(handler, bad, headers=headers))


def test_samples_translate_the_same_every_time_and_freshen_into_new_deliveries() -> None:
    samples = handler.samples()
    assert set(samples) == {"ping", "sponsorship", "marketplace_purchase"}
    for event, sample in samples.items():
        assert sample.headers["x-github-event"] == event
        one = run_handler(handler, sample.body, headers=sample.headers)
        two = run_handler(handler, sample.body, headers=sample.headers)
        assert (one.delivery_id, one.calls) == (two.delivery_id, two.calls)
        fresh = handler.freshen(sample)
        assert fresh.headers["x-github-delivery"] != sample.headers["x-github-delivery"]
        renewed = run_handler(handler, fresh.body, headers=fresh.headers)
        assert renewed.delivery_id != one.delivery_id
        # A new purchase too (its event_id is the body's), so send-test shows at the sink.
        assert len(renewed.calls) == len(one.calls)
        assert not {c.event_id for c in renewed.calls} & {c.event_id for c in one.calls}
    assert run_handler(handler, samples["ping"].body, headers=samples["ping"].headers).calls == []


# -- end to end ---------------------------------------------------------------------------


def post(
    bridge: Served, event: str, body: bytes, delivery: str | None = None, secret: str = SECRET
) -> httpx.Response:
    headers = {
        "x-github-event": event,
        "x-github-delivery": delivery or str(uuid.uuid4()),
        **handler.scheme.sign(body, secret, 0),
    }
    return httpx.post(f"{bridge.url}/webhooks/github", content=body, headers=headers)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    with served(handler, sink, tmp_path, secret=f"{OLD_SECRET},{SECRET}") as running:
        yield running


def test_sponsors_and_marketplace_end_to_end(bridge: Served) -> None:
    ping = (FIXTURES / "ping.json").read_bytes()
    pinged = str(uuid.uuid4())
    assert post(bridge, "ping", ping, delivery=pinged).json() == {"ok": True, "result": "accepted"}
    assert translated(bridge.database, pinged) == ("translated", None)
    assert bridge.queued_for(pinged) == 0  # a ping becomes no call
    assert post(bridge, "sponsorship", sponsorship(), delivery=DELIVERY).json() == {
        "ok": True,
        "result": "accepted",
    }
    assert post(bridge, "sponsorship", sponsorship(), delivery=DELIVERY).json() == {
        "ok": True,
        "result": "duplicate",
    }
    other = "0b0e4d3c-cc78-11e3-81ab-4c9367dc0958"
    answer = post(bridge, "marketplace_purchase", marketplace(), delivery=other, secret=OLD_SECRET)
    assert answer.json()["result"] == "accepted"
    calls = sorted(bridge.arrived(2), key=lambda c: c["event_id"])
    assert calls == [
        {
            "route": "track",
            "event": "purchase",
            "event_id": MARKETPLACE_EVENT,
            "timestamp": "2026-11-03T00:00:00Z",
            "anonymous_id": "github:90311524",
            "properties": {
                "amount_cents": 4800,
                "currency": "USD",
                "product": "github_marketplace",
                "plan": "Team",
                "plan_id": 7310,
                "billing_cycle": "monthly",
                "unit_count": 12,
                "account_type": "Organization",
            },
        },
        {
            "route": "track",
            "event": "purchase",
            "event_id": SPONSORSHIP_EVENT,
            "timestamp": "2026-11-02T14:05:31Z",
            "anonymous_id": "github:48211093",
            "properties": {
                "amount_cents": 1500,
                "currency": "USD",
                "product": "github_sponsors",
                "sponsorship": "S_kwHOAVNkMs4AAqFz",
                "tier": "$15 a month",
                "tier_id": "ST_kwDOAVNkMs4AAfxq",
                "one_time": False,
                "interval": "month",
            },
        },
    ]
    assert bridge.sink.stats()["received"] == 2


def test_a_body_resent_under_a_fresh_guid_counts_once_end_to_end(bridge: Served) -> None:
    """The reproduction: a captured signed purchase re-sent with a new X-GitHub-Delivery
    is a new delivery, but its purchase has the same event_id: no second event (the bridge
    does not even queue it again)."""
    for event, body in (("sponsorship", sponsorship()), ("marketplace_purchase", marketplace())):
        first, copy = str(uuid.uuid4()), str(uuid.uuid4())
        assert post(bridge, event, body, delivery=first).json()["result"] == "accepted"
        assert post(bridge, event, body, delivery=copy).json()["result"] == "accepted"
        assert translated(bridge.database, first) == ("translated", None)
        assert translated(bridge.database, copy) == ("translated", None)
        assert (bridge.queued_for(first), bridge.queued_for(copy)) == (1, 0), event
    calls = bridge.arrived(2)
    assert sorted(c["event_id"] for c in calls) == [MARKETPLACE_EVENT, SPONSORSHIP_EVENT]
    stats = bridge.sink.stats()
    assert (stats["received"], stats["duplicates"]) == (2, 0)
    # Under another event's name the same body is quarantined and nothing more is sent.
    for event, body, carried in (
        ("marketplace_purchase", sponsorship(), "a sponsorship"),
        ("ping", sponsorship(), "a sponsorship"),
        ("sponsorship", marketplace(), "a marketplace_purchase"),
    ):
        renamed = str(uuid.uuid4())
        answer = post(bridge, event, body, delivery=renamed)
        assert answer.json() == {"ok": True, "result": "accepted"}, event
        assert translated(bridge.database, renamed) == (
            "quarantined",
            f"payload: X-GitHub-Event is {event} but the body carries {carried}",
        )
        assert bridge.queued_for(renamed) == 0
    time.sleep(0.3)
    assert bridge.sink.stats()["received"] == 2


def test_refusals_and_a_quarantined_body_end_to_end(bridge: Served) -> None:
    body = sponsorship()
    assert post(bridge, "sponsorship", body, secret="wrong").status_code == 401
    unsigned = httpx.post(
        f"{bridge.url}/webhooks/github",
        content=body,
        headers={"x-github-event": "sponsorship", "x-github-delivery": DELIVERY},
    )
    assert unsigned.status_code == 401
    assert unsigned.json()["reason"] == "missing x-hub-signature-256 header"
    no_guid = httpx.post(
        f"{bridge.url}/webhooks/github",
        content=body,
        headers={"x-github-event": "sponsorship", **handler.scheme.sign(body, SECRET, 0)},
    )
    assert no_guid.status_code == 400
    # Signed, with a GUID, but not JSON: taken, then quarantined, never sent.
    unreadable = str(uuid.uuid4())
    answer = post(bridge, "sponsorship", b"{not json", delivery=unreadable)
    assert answer.json() == {"ok": True, "result": "accepted"}
    state, reason = translated(bridge.database, unreadable)
    assert state == "quarantined"
    assert reason is not None
    assert reason.startswith("payload: not a GitHub event")
    assert bridge.queued_for(unreadable) == 0
    with contextlib.closing(sqlite3.connect(bridge.database)) as db:
        stored = db.execute("SELECT provider_event_id FROM inbox").fetchall()
    assert stored == [(unreadable,)]  # the refusals stored nothing
    time.sleep(0.3)
    assert bridge.sink.stats()["received"] == 0


def test_every_sample_sent_as_send_test_does_is_taken(bridge: Served) -> None:
    for event, sample in sorted(handler.samples().items()):
        fresh = handler.freshen(sample)
        headers = {**fresh.headers, **handler.scheme.sign(fresh.body, SECRET, int(time.time()))}
        answer = httpx.post(f"{bridge.url}/webhooks/github", content=fresh.body, headers=headers)
        assert answer.json() == {"ok": True, "result": "accepted"}, event
        delivery = fresh.headers["x-github-delivery"]
        assert translated(bridge.database, delivery) == ("translated", None), event
        assert bridge.queued_for(delivery) == (0 if event == "ping" else 1), event
