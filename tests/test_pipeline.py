"""The pipeline through real HTTP, on SQLite and PostgreSQL: intake stores and answers,
the translate stage runs the handler after; what a handler cannot translate is quarantined,
listed, and sent once retranslated; one payment named by two events is one call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from bridge.app import create_app
from bridge.config import load_settings
from bridge.errors import StoreRefused, StoreUnavailable
from bridge.events import Output
from bridge.plugin import WebhookRequest
from bridge.registry import load_sources
from bridge.stages.translate import Translator, TranslatorConfig
from bridge.store import Delivery, Translation, open_store
from bridge.testing import sign
from handlers.stripe import StripeHandler, StripeOptions
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, ServerThread

SECRET = "whsec_pipeline_secret"
TOKEN = "pipeline-admin-token-0123456789"
FIXTURES = Path(__file__).parent / "fixtures" / "stripe"
AUTH = {"authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)


class FlakyStripe(StripeHandler):
    """A plugin with a bug: its translate raises until `fixed` is set (a new release)."""

    name = "flaky"
    secret_variable = "FLAKY_WEBHOOK_SECRET"
    fixed = False

    def translate(
        self, request: WebhookRequest, payload: Any, options: StripeOptions
    ) -> list[Output]:
        if not self.fixed:
            raise RuntimeError("a bug in the plugin")
        return super().translate(request, payload, options)


class Bridge:
    def __init__(self, server: ServerThread, sink: RunningSink) -> None:
        self.url = server.url
        self.sink = sink

    def post(self, event: dict[str, Any], source: str = "stripe") -> httpx.Response:
        body = msgspec.json.encode(event)
        headers = sign(stripe, body, SECRET)
        return httpx.post(f"{self.url}/webhooks/{source}", content=body, headers=headers)

    def admin(self, path: str, **body: Any) -> Any:
        if body:
            answer = httpx.post(f"{self.url}/admin/{path}", json=body, headers=AUTH)
        else:
            answer = httpx.get(f"{self.url}/admin/{path}", headers=AUTH)
        answer.raise_for_status()
        return answer.json()

    def quarantined(self, within: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while not (found := [d for d in self.admin("dead") if d["kind"] == "delivery"]):
            assert time.monotonic() < deadline, "nothing quarantined in time"
            time.sleep(0.05)
        return found

    def purchases(self) -> list[dict[str, Any]]:
        events = httpx.get(f"{self.sink.url}/_sink/events").json()["events"]
        return [e["body"] for e in events if e["body"].get("event") == "purchase"]

    def settled(self, within: float = 10) -> None:
        """Until nothing waits for translation or forwarding (and a moment more)."""
        deadline = time.monotonic() + within
        while (status := self.admin("outbox"))["untranslated"] or status["pending"]:
            assert time.monotonic() < deadline, f"not settled: {status}"
            time.sleep(0.05)
        time.sleep(0.3)


def start(sink: RunningSink, database_url: str, tmp_path: Path, toml: str = "") -> ServerThread:
    (tmp_path / "bridge.toml").write_text(toml)
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": database_url,
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "FLAKY_WEBHOOK_SECRET": SECRET,
        "BRIDGE_ADMIN_TOKEN": TOKEN,
    }
    sources = load_sources(env, {"stripe": stripe, "flaky": FlakyStripe()})
    return ServerThread(create_app(load_settings(env), sources=sources))


@pytest.fixture
def bridge(sink: RunningSink, database_url: str, tmp_path: Path) -> Iterator[Bridge]:
    with start(sink, database_url, tmp_path) as server:
        yield Bridge(server, sink)


def event(name: str, n: str, *, live: bool = True, **changes: Any) -> dict[str, Any]:
    found: dict[str, Any] = msgspec.json.decode((FIXTURES / f"{name}.json").read_bytes())
    found["id"], found["livemode"], found["created"] = f"evt_pipe_{n}", live, int(time.time())
    found["data"]["object"].update(changes)
    return found


def paid_checkout(n: str, *, live: bool = True, **changes: Any) -> dict[str, Any]:
    return event(
        "checkout.session.completed",
        n,
        live=live,
        **{
            "id": f"cs_{n}",
            "mode": "payment",
            "payment_status": "paid",
            "payment_intent": f"pi_{n}",
            "invoice": None,
            "client_reference_id": f"usr_{n}",
            **changes,
        },
    )


def failures(bridge: Bridge) -> float:
    """`bridge_translate_failures_total` for Stripe payloads (process-wide: compare)."""
    wanted = 'bridge_translate_failures_total{reason="payload",source="stripe"} '
    for line in httpx.get(f"{bridge.url}/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.removeprefix(wanted))
    return 0.0


def test_an_untranslatable_delivery_is_quarantined_and_holds_back_nothing(
    bridge: Bridge,
) -> None:
    counted = failures(bridge)
    broken = event("invoice.paid", "broken")
    broken["data"]["object"] = "not an invoice"
    answer = bridge.post(broken)
    assert answer.status_code == 200, answer.text  # genuine: stored, never refused
    assert answer.json() == {"ok": True, "result": "accepted"}
    assert bridge.post(paid_checkout("after")).status_code == 200
    (letter,) = bridge.quarantined()
    assert letter["source"] == "stripe"
    assert letter["provider_event_id"] == "evt_pipe_broken"
    assert letter["reason"].startswith("payload: unexpected invoice.paid object")
    bridge.settled()
    assert [p["event_id"] for p in bridge.purchases()] == ["purchase:pi_after"]
    status = bridge.admin("outbox")
    assert (status["quarantined"], status["untranslated"]) == (1, 0)
    assert failures(bridge) == counted + 1


def test_a_plugin_that_raises_is_quarantined_then_sent_once_retranslated(
    bridge: Bridge,
) -> None:
    FlakyStripe.fixed = False
    try:
        assert bridge.post(paid_checkout("flaky"), source="flaky").status_code == 200
        (letter,) = bridge.quarantined()
        assert letter["reason"] == "handler: RuntimeError: a bug in the plugin"
        FlakyStripe.fixed = True  # the plugin's fix is deployed
        assert bridge.admin("retranslate", ids=[letter["id"]]) == {"count": 1}
        bridge.settled()
        assert [p["event_id"] for p in bridge.purchases()] == ["purchase:pi_flaky"]
        assert [d for d in bridge.admin("dead") if d["kind"] == "delivery"] == []
        # Translated again: nothing is queued twice.
        assert bridge.admin("retranslate", source="flaky", all=True) == {"count": 1}
        bridge.settled()
        assert len(bridge.purchases()) == 1
    finally:
        FlakyStripe.fixed = False


def test_a_forget_erases_the_quarantined_deliveries_that_name_the_user(bridge: Bridge) -> None:
    """Erasure wins over quarantine: a delivery its handler could not translate is linked
    to nobody, so a forget reads it, and erases it when it names the user."""
    FlakyStripe.fixed = False
    try:
        for n in ("gdpr", "other"):
            assert bridge.post(paid_checkout(n), source="flaky").status_code == 200
        deadline = time.monotonic() + 10
        while len(bridge.quarantined()) < 2:
            assert time.monotonic() < deadline, "not both quarantined in time"
            time.sleep(0.05)
        bridge.admin("forget", user_id="usr_gdpr")
        (letter,) = bridge.quarantined()
        assert letter["provider_event_id"] == "evt_pipe_other"
        FlakyStripe.fixed = True
        assert bridge.admin("retranslate", source="flaky", all=True) == {"count": 1}
        bridge.settled()
        assert [p["event_id"] for p in bridge.purchases()] == ["purchase:pi_other"]
    finally:
        FlakyStripe.fixed = False


def test_an_option_turned_on_later_is_picked_up_by_retranslate(
    sink: RunningSink, database_url: str, tmp_path: Path
) -> None:
    """Test-mode events are left out by default; after `include_test_events = true` and a
    restart, retranslating sends the ones already stored, once."""
    with start(sink, database_url, tmp_path) as server:
        bridge = Bridge(server, sink)
        assert bridge.post(paid_checkout("testmode", live=False)).status_code == 200
        bridge.settled()
        assert bridge.purchases() == []
    toml = "[sources.stripe]\ninclude_test_events = true\n"
    with start(sink, database_url, tmp_path, toml) as server:
        bridge = Bridge(server, sink)
        assert bridge.admin("retranslate", source="stripe") == {"count": 1}
        bridge.settled()
        assert [p["event_id"] for p in bridge.purchases()] == ["purchase:pi_testmode"]
        assert bridge.admin("retranslate", all=True) == {"count": 1}
        bridge.settled()
        assert len(bridge.purchases()) == 1


def test_two_events_of_one_subscription_payment_are_one_call_at_the_sink(
    bridge: Bridge, sink: RunningSink
) -> None:
    """Checkout's event and the invoice's event both name the first payment of a
    subscription: one purchase reaches Millimetric, not two deduplicated there."""
    checkout = paid_checkout("sub", mode="subscription", invoice="in_pipe_1")
    invoice = event("invoice.paid", "inv", id="in_pipe_1", amount_paid=1900)
    assert bridge.post(checkout).status_code == 200
    assert bridge.post(invoice).status_code == 200
    bridge.settled()
    assert [p["event_id"] for p in bridge.purchases()] == ["purchase:in_pipe_1"]
    stats = httpx.get(f"{sink.url}/_sink/stats").json()
    assert stats["received"] == stats["unique_event_ids"] + 1  # the identify has no event_id


@pytest.mark.anyio
async def test_a_delivery_the_store_refuses_is_quarantined_and_holds_back_nothing(
    database_url: str,
) -> None:
    """What a delivery became cannot be written (the store refuses it): the others of its
    batch are recorded, it is quarantined with the store's reason; a store that is down
    refuses everything, and the batch waits for it; one that goes down (or comes back)
    while the batch goes one at a time quarantines nothing."""
    store = open_store(database_url)
    await store.open()
    real = store.record
    down = False
    outage_for = 0  # the next calls that meet an outage

    async def refusing(translations: Sequence[Translation]) -> None:
        nonlocal outage_for
        poisoned = any(
            t.delivery.provider_event_id == "poison" and t.failure is None for t in translations
        )
        if down or outage_for:
            outage_for = max(0, outage_for - 1)
            raise StoreUnavailable("the server closed the connection")
        if poisoned:
            raise StoreRefused("refused")
        await real(translations)

    store.record = refusing  # type: ignore[method-assign]
    try:
        for name in ("before", "poison", "after"):
            await store.append(
                Delivery(
                    source="stripe",
                    provider_event_id=name,
                    received_at=time.time(),
                    raw_body=msgspec.json.encode(paid_checkout(name)),
                )
            )
        sources = load_sources({"STRIPE_WEBHOOK_SECRET": SECRET}, {"stripe": stripe})
        translator = Translator(store, sources)
        down = True
        with pytest.raises(StoreUnavailable):
            await translator.step()
        assert (await store.backlog()).untranslated == 3  # waits for the store
        down = False
        outage_for = 2  # the batch, then its first delivery alone: down, then back
        with pytest.raises(StoreUnavailable):
            await translator.step()
        assert await store.dead_letters() == []  # an outage quarantines nothing
        assert (await store.backlog()).untranslated == 3
        assert await translator.step() == 3
        (letter,) = await store.dead_letters()
        assert (letter.kind, letter.provider_event_id) == ("delivery", "poison")
        assert letter.reason == "store: refused"
        rows = await store.claim("track", 10, 1 << 20, time.time())
        assert sorted(msgspec.json.decode(r.body)["event_id"] for r in rows) == [
            "purchase:pi_after",
            "purchase:pi_before",
        ]
    finally:
        await store.close()


@pytest.mark.anyio
async def test_the_stage_waits_out_a_short_burst_and_keeps_up_with_a_long_one(
    database_url: str,
) -> None:
    store = open_store(database_url)
    await store.open()
    try:
        await asyncio.gather(
            *(
                store.append(
                    Delivery(
                        source="stripe",
                        provider_event_id=f"burst_{i}",
                        received_at=time.time(),
                        raw_body=msgspec.json.encode(paid_checkout(f"burst_{i}")),
                    )
                )
                for i in range(1500)
            )
        )
        sources = load_sources({"STRIPE_WEBHOOK_SECRET": SECRET}, {"stripe": stripe})
        config = TranslatorConfig(batch=100, max_defer=0.3, busy_probe=0.02)
        translator = Translator(store, sources, config)
        stopping = asyncio.Event()

        async def burst(seconds: float, *, until_drained: bool = False) -> bool:
            """Intake storing 2,000 deliveries a second, paced by the clock (sleep's
            granularity is coarse on a busy machine); with `until_drained`, it stops as soon
            as the backlog is empty and says whether it got there."""
            started = time.monotonic()
            woken, looked = 0, started
            while (now := time.monotonic()) < started + seconds:
                while woken < (now - started) * 2000:
                    translator.wake()
                    woken += 1
                if until_drained and now - looked >= 0.1:
                    looked = now
                    if (await store.backlog()).untranslated == 0:
                        return True
                await asyncio.sleep(0.0005)
            return False

        started = asyncio.create_task(burst(0.2))
        await asyncio.sleep(0.02)
        running = asyncio.create_task(translator.run(stopping))
        await started
        assert (await store.backlog()).untranslated == 1500  # waited while it was short
        # A burst that outlasts the wait does not hold translation off: batches go, each
        # after a look at intake, and the backlog empties while the burst goes on. (Bounded
        # generously: what is checked is that it drains during the burst, not how fast.)
        drained = await burst(60, until_drained=True)
        stopping.set()
        await running
        assert drained
    finally:
        await store.close()
