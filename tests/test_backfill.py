"""Backfill from Stripe's Events API, against a local stand-in of `GET /v1/events` served
over real HTTP, through the real `stripe` package, into a real store of each backend."""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bridge.backfill import Progress, RetryPolicy, Tally, Target, backfill, targets
from bridge.backfill_cli import Display
from bridge.errors import ConfigError, ProviderError
from bridge.events import Track
from bridge.plugin import ListedEvent
from bridge.registry import check_handler, load_sources
from bridge.stages.reconcile import ReconcileConfig, Reconciler
from bridge.stages.translate import translate_one
from bridge.store import Delivery, Store
from bridge.testing import signed_request
from handlers.paddle import handler as paddle
from handlers.stripe import TRANSLATED, StripeHandler
from handlers.stripe import handler as stripe
from tests.conftest import ServerThread
from tests.provider_apis import (
    PADDLE_KEY,
    PADDLE_KEY_WITHOUT_EVENTS,
    STRIPE_KEY,
    STRIPE_KEY_WITHOUT_EVENTS,
    STRIPE_LIVE_KEY,
    PaddleEvents,
    StripeEvents,
    paddle_purchase,
    stripe_event,
    stripe_purchase,
)

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(base=0.01, cap=0.05, tries=3)


class StandIn:
    def __init__(self, app: StripeEvents, url: str) -> None:
        self.app = app
        self.url = url

    def target(self, key: str = STRIPE_LIVE_KEY, **env: str) -> Target:
        environment = {"STRIPE_API_KEY": key, "STRIPE_API_BASE": self.url, **env}
        (found,) = targets(load_sources(environment, {"stripe": stripe}), environment)
        return found


@pytest.fixture
def stripe_api() -> Iterator[StandIn]:
    app = StripeEvents()
    with ServerThread(app) as server:
        yield StandIn(app, server.url)


class Seen(Progress):
    def __init__(self) -> None:
        self.missing_events: list[ListedEvent] = []
        self.retries: list[str] = []

    def missing(self, event: ListedEvent) -> None:
        self.missing_events.append(event)

    def retrying(self, error: ProviderError, wait: float) -> None:
        self.retries.append(error.reason)


async def test_pages_through_the_list_and_queues_what_the_inbox_lacks_once(
    store: Store, stripe_api: StandIn
) -> None:
    now = int(time.time())
    events = [stripe_purchase(i, now - 1000 + i) for i in range(250)]
    stripe_api.app.add(events)
    stripe_api.app.add(
        [stripe_event(f"evt_charge_{i}", "charge.succeeded", now - 10) for i in range(5)]
    )
    target = stripe_api.target()

    first = await backfill(store, target, now - 3600, now + 1)
    assert (first.listed, first.received, first.queued) == (250, 0, 250)
    # Newest first, a page of 100 at a time: each next page starts after the last event of
    # the one before, until Stripe says there is no more.
    pages = stripe_api.app.requests
    assert [p.get("starting_after") for p in pages] == [None, "evt_150", "evt_50"]
    assert {p["limit"] for p in pages} == {"100"}
    assert {v for k, v in pages[0].items() if k.startswith("types[")} == TRANSLATED
    assert (pages[0]["created[gte]"], pages[0]["created[lt]"]) == (str(now - 3600), str(now + 1))
    # Each stored as Stripe sent it: the delivery id is the event's id, as for a webhook.
    stored = {d.provider_event_id: d for d in await store.untranslated(1000)}
    assert stored.keys() == {e["id"] for e in events}
    assert stored["evt_7"].raw_body == msgspec.json.encode(events[7])
    assert {d.source for d in stored.values()} == {"stripe"}

    again = await backfill(store, target, now - 3600, now + 1)
    assert (again.listed, again.received, again.queued) == (250, 250, 0)
    assert len(await store.untranslated(1000)) == 250


async def test_events_already_received_are_skipped(store: Store, stripe_api: StandIn) -> None:
    now = int(time.time())
    events = [stripe_purchase(i, now - 100 + i) for i in range(30)]
    stripe_api.app.add(events)
    for event in events[::3]:  # their webhooks arrived, as intake stores them
        webhook = Delivery(
            source="stripe",
            provider_event_id=event["id"],
            received_at=now - 50,
            raw_body=b'{"as": "the webhook"}',
        )
        assert await store.append(webhook) == "accepted"
    seen = Seen()
    tally = await backfill(store, stripe_api.target(), now - 3600, now + 1, progress=seen)
    assert (tally.listed, tally.received, tally.queued) == (30, 10, 20)
    assert {e.delivery_id for e in seen.missing_events} == {e["id"] for e in events} - {
        e["id"] for e in events[::3]
    }
    stored = {d.provider_event_id: d.raw_body for d in await store.untranslated(100)}
    assert stored["evt_0"] == b'{"as": "the webhook"}'  # the webhook's own, untouched


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_a_failure_that_passes_is_retried_after_the_last_event_taken(
    store: Store, stripe_api: StandIn, status: int
) -> None:
    now = int(time.time())
    stripe_api.app.add([stripe_purchase(i, now - 1000 + i) for i in range(250)])
    stripe_api.app.fail(status, skip=1)  # the second page's first try
    seen = Seen()
    tally = await backfill(
        store, stripe_api.target(), now - 3600, now + 1, progress=seen, retry=FAST
    )
    assert (tally.listed, tally.queued, tally.retries) == (250, 250, 1)
    assert [p.get("starting_after") for p in stripe_api.app.requests] == [
        None,
        "evt_150",  # answered `status`
        "evt_150",  # the same page again
        "evt_50",
    ]
    assert len(seen.retries) == 1
    assert str(status) in seen.retries[0]
    assert len(await store.untranslated(1000)) == 250


async def test_a_failure_that_lasts_stops_the_backfill_and_keeps_what_was_queued(
    store: Store, stripe_api: StandIn
) -> None:
    now = int(time.time())
    stripe_api.app.add([stripe_purchase(i, now - 1000 + i) for i in range(250)])
    stripe_api.app.fail(*[503] * 10, skip=1)
    with pytest.raises(ProviderError) as failed:
        await backfill(store, stripe_api.target(), now - 3600, now + 1, retry=FAST)
    assert failed.value.retryable
    assert len(stripe_api.app.requests) == 1 + 4  # the first page, then 1 + 3 tries
    assert len(await store.untranslated(1000)) == 100  # the first page stays queued


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("rk_live_notknownatall000", "Stripe refused the key (401)"),
        (STRIPE_KEY_WITHOUT_EVENTS, "may not read events (403)"),
    ],
)
async def test_a_key_stripe_refuses_is_a_config_error_naming_the_variable(
    store: Store, stripe_api: StandIn, key: str, says: str
) -> None:
    stripe_api.app.add([stripe_purchase(1, int(time.time()) - 10)])
    with pytest.raises(ConfigError) as refused:
        await backfill(store, stripe_api.target(key), 0, time.time(), retry=FAST)
    assert refused.value.variable == "STRIPE_API_KEY"
    assert says in refused.value.reason
    assert key not in str(refused.value)
    assert len(stripe_api.app.requests) == 1  # never retried


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("pk_live_abc123", "publishable pk_ key"),
        ("whsec_abc123", "webhook signing secret"),
        ("sk_live_abc-!", "not a Stripe secret or restricted key"),
        ("mk_live_abc", "not a Stripe secret or restricted key"),
    ],
)
def test_a_key_of_the_wrong_kind_is_refused_before_any_request(key: str, says: str) -> None:
    env = {"STRIPE_API_KEY": key}
    with pytest.raises(ConfigError) as refused:
        targets(load_sources(env, {"stripe": stripe}), env)
    assert refused.value.variable == "STRIPE_API_KEY"
    assert says in refused.value.reason
    assert key not in str(refused.value)


def test_which_sources_are_targets_and_which_variables_they_read(tmp_path: Any) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[sources.stripe-eu]\nhandler = "stripe"\n')
    env = {
        "BRIDGE_CONFIG": str(config),
        "STRIPE_EU_API_KEY": STRIPE_KEY,
        "STRIPE_EU_API_BASE": "http://127.0.0.1:9/",
    }
    sources = load_sources(env, {"stripe": stripe})
    (eu,) = targets(sources, env)  # `stripe` has no key set: not listed
    assert eu.source.name == "stripe-eu"
    assert (eu.access.variable, eu.access.base) == ("STRIPE_EU_API_KEY", "http://127.0.0.1:9")
    assert eu.lists == "test-mode events"
    assert STRIPE_KEY not in repr(eu)  # a target in a traceback shows no key
    env["STRIPE_EU_API_BASE"] = "not a url"
    with pytest.raises(ConfigError, match="STRIPE_EU_API_BASE"):
        targets(sources, env)


async def test_a_test_key_lists_test_events_which_the_handler_takes_by_its_option(
    store: Store, stripe_api: StandIn, tmp_path: Any
) -> None:
    now = int(time.time())
    stripe_api.app.add(
        [
            stripe_purchase(1, now - 10, livemode=True, prefix="evt_live"),
            stripe_purchase(2, now - 10, livemode=False, prefix="evt_test"),
        ]
    )
    target = stripe_api.target(STRIPE_KEY)
    assert target.lists == "test-mode events"
    tally = await backfill(store, target, now - 60, now + 1)
    assert tally.queued == 1
    (stored,) = await store.untranslated(10)
    assert stored.provider_event_id == "evt_test_2"
    # Translated as any webhook of a test-mode event: nothing, unless the source takes them.
    assert translate_one(stored, load_sources({}, {"stripe": stripe})).outputs == []
    config = tmp_path / "bridge.toml"
    config.write_text("[sources.stripe]\ninclude_test_events = true\n")
    taking = load_sources({"BRIDGE_CONFIG": str(config)}, {"stripe": stripe})
    calls = [o for o in translate_one(stored, taking).outputs if isinstance(o, Track)]
    assert [c.event_id for c in calls] == ["purchase:pi_evt_test_2"]


async def test_a_dry_run_says_what_it_would_queue_and_stores_nothing(
    store: Store, stripe_api: StandIn
) -> None:
    now = int(time.time())
    stripe_api.app.add([stripe_purchase(i, now - 100 + i) for i in range(5)])
    seen = Seen()
    tally = await backfill(
        store, stripe_api.target(), now - 3600, now + 1, dry_run=True, progress=seen
    )
    assert tally.queued == 5
    assert [(e.delivery_id, e.type, e.created) for e in seen.missing_events] == [
        (f"evt_{i}", "checkout.session.completed", float(now - 100 + i)) for i in range(4, -1, -1)
    ]
    assert await store.untranslated(10) == []


async def test_appends_from_a_backfill_and_a_webhook_at_once_store_one(
    store: Store, stripe_api: StandIn
) -> None:
    """A webhook that arrives between the inbox check and the append is a duplicate of the
    backfill's (or the other way round): one delivery is stored, and counted once."""
    now = int(time.time())
    events = [stripe_purchase(i, now - 100 + i) for i in range(100)]
    stripe_api.app.add(events)

    async def webhooks() -> None:
        for event in events:
            await store.append(
                Delivery(
                    source="stripe",
                    provider_event_id=event["id"],
                    received_at=time.time(),
                    raw_body=msgspec.json.encode(event),
                )
            )
            await asyncio.sleep(0)

    tally, _ = await asyncio.gather(
        backfill(store, stripe_api.target(), now - 3600, now + 1), webhooks()
    )
    assert tally.listed == tally.received + tally.queued == 100
    assert len(await store.untranslated(1000)) == 100


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_progress_is_one_line_redrawn_then_cleared() -> None:
    screen, out = Terminal(), io.StringIO()
    display = Display(screen, out, dry_run=False)
    display.batch(Tally(listed=100, received=40, queued=60))
    display.batch(Tally(listed=200, received=40, queued=160))  # within a tenth of a second
    time.sleep(0.11)
    display.batch(Tally(listed=300, received=40, queued=260))
    display.finish()
    drawn = screen.getvalue().split("\r\x1b[2K")
    assert [d.split("  ")[:3] for d in drawn if d] == [
        ["listed 100", "already received 40", "queued 60"],
        ["listed 300", "already received 40", "queued 260"],
    ]
    assert screen.getvalue().endswith("\r\x1b[2K")  # cleared for the summary
    assert "\n" not in screen.getvalue()
    assert out.getvalue() == ""


def test_off_a_terminal_the_progress_is_a_plain_line_now_and_then() -> None:
    log, out = io.StringIO(), io.StringIO()
    display = Display(log, out, dry_run=True)
    for n in range(1, 4):
        display.batch(Tally(listed=100 * n))
    assert log.getvalue().count("\n") == 1  # then one every LINE_EVERY seconds
    assert log.getvalue().startswith("backfill: listed 100  already received 0  would queue 0")
    assert "\r" not in log.getvalue()


def test_a_handler_offering_list_events_must_keep_the_whole_protocol() -> None:
    class Partial(StripeHandler):
        name = "partial"
        api_base_variable = "partial api base"

    with pytest.raises(ConfigError, match="api_base_variable 'partial api base' is not an env"):
        check_handler("partial", Partial())

    class Bare(StripeHandler):
        name = "bare"
        check_api_key = None  # type: ignore[assignment]

    with pytest.raises(ConfigError, match="check_api_key is not callable"):
        check_handler("bare", Bare())
    assert check_handler("stripe", stripe) is stripe


class PaddleStandIn:
    def __init__(self, app: PaddleEvents, url: str) -> None:
        self.app = app
        self.url = url

    def target(self, key: str = PADDLE_KEY) -> Target:
        env = {"PADDLE_API_KEY": key, "PADDLE_API_BASE": self.url}
        (found,) = targets(load_sources(env, {"paddle": paddle}), env)
        return found


@pytest.fixture
def paddle_api() -> Iterator[PaddleStandIn]:
    app = PaddleEvents()
    with ServerThread(app) as server:
        yield PaddleStandIn(app, server.url)


async def test_paddle_events_are_walked_newest_first_down_to_the_window(
    store: Store, paddle_api: PaddleStandIn
) -> None:
    now = float(int(time.time()))  # whole seconds: exact through `occurred_at`
    events = [paddle_purchase(i, now - 9000 + 20 * i) for i in range(450)]
    paddle_api.app.add(events)
    paddle_api.app.add(
        [paddle_purchase(1000 + i, now - 3000, "customer.updated") for i in range(5)]
    )
    target = paddle_api.target()
    assert target.lists == "live events"
    tally = await backfill(store, target, now - 5000, now - 1000)
    # Only those that occurred in the window, of the types translated.
    assert (tally.listed, tally.queued) == (200, 200)
    stored = {d.provider_event_id: d for d in await store.untranslated(1000)}
    assert stored.keys() == {e["event_id"] for e in events[200:400]}
    assert stored[events[300]["event_id"]].raw_body == msgspec.json.encode(events[300])
    # A page of 200 at a time from the newest, each after the last id of the one before;
    # the walk stops an hour past the window's start, not at the end of the stream.
    requests = paddle_api.app.requests
    assert [(r["order_by"], r["per_page"]) for r in requests] == [("id[DESC]", "200")] * 3
    assert [r.get("after") for r in requests] == [None, f"evt_{255:026d}", f"evt_{55:026d}"]
    again = await backfill(store, target, now - 5000, now - 1000)
    assert (again.listed, again.received, again.queued) == (200, 200, 0)


async def test_paddle_429_is_retried_and_a_later_webhook_is_a_duplicate(
    store: Store, paddle_api: PaddleStandIn
) -> None:
    now = time.time()
    events = [paddle_purchase(i, now - 1000 + i) for i in range(250)]
    paddle_api.app.add(events)
    paddle_api.app.fail(429, skip=1)
    tally = await backfill(store, paddle_api.target(), now - 3600, now + 1, retry=FAST)
    assert (tally.queued, tally.retries) == (250, 1)
    assert [r.get("after") for r in paddle_api.app.requests] == [
        None,
        f"evt_{50:026d}",
        f"evt_{50:026d}",
    ]
    # The webhook of one of them, as Paddle delivers it (with its notification id).
    webhook = msgspec.json.encode({**events[7], "notification_id": "ntf_standin_7"})
    request = signed_request(paddle, webhook)
    delivery = Delivery(
        source="paddle",
        provider_event_id=paddle.delivery_id(request),
        received_at=time.time(),
        raw_body=webhook,
    )
    assert await store.append(delivery) == "duplicate"


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("pdl_ntfset_01abc_secret", "notification destination's secret key"),
        ("live_7d279f61a3499fed520f7cd8c08", "client-side token"),
        ("not a key", "is not a Paddle API key"),
    ],
)
def test_a_paddle_key_of_the_wrong_kind_is_refused(key: str, says: str) -> None:
    env = {"PADDLE_API_KEY": key}
    with pytest.raises(ConfigError) as refused:
        targets(load_sources(env, {"paddle": paddle}), env)
    assert (refused.value.variable, key in str(refused.value)) == ("PADDLE_API_KEY", False)
    assert says in refused.value.reason
    sandbox = {"PADDLE_API_KEY": "pdl_sdbx_apikey_01abc_secret"}
    (target,) = targets(load_sources(sandbox, {"paddle": paddle}), sandbox)
    assert target.lists == "sandbox events"


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("pdl_live_apikey_01unknown_secret", "Paddle refused the key (401)"),
        (PADDLE_KEY_WITHOUT_EVENTS, "may not read events (403)"),
    ],
)
async def test_a_key_paddle_refuses_is_a_config_error(
    store: Store, paddle_api: PaddleStandIn, key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        await backfill(store, paddle_api.target(key), 0, time.time(), retry=FAST)
    assert refused.value.variable == "PADDLE_API_KEY"
    assert says in refused.value.reason


def reconciled() -> float:
    return REGISTRY.get_sample_value("bridge_reconciled_total", {"source": "stripe"}) or 0.0


async def test_a_round_for_a_source_never_received_starts_its_checkpoint_now(
    store: Store, stripe_api: StandIn
) -> None:
    now = time.time()
    target = stripe_api.target()
    reconciler = Reconciler(store, [target], ReconcileConfig(settle=300), clock=lambda: now)
    assert await reconciler.round(target) is None
    assert await store.reconciled_until("stripe") == now - 300
    assert stripe_api.app.requests == []  # nothing listed: nothing of it was ever received


async def test_a_round_lists_no_further_back_than_the_inbox_remembers(
    store: Store, stripe_api: StandIn
) -> None:
    now = time.time()
    stripe_api.app.add([stripe_purchase(i, int(now - 86400 * (i + 1) + 60)) for i in range(10)])
    await store.set_reconciled_until("stripe", now - 40 * 86400)  # down for 40 days
    target = stripe_api.target()
    reconciler = Reconciler(store, [target], inbox_retention=7 * 86400, clock=lambda: now)
    before = reconciled()
    tally = await reconciler.round(target)
    assert tally is not None
    assert int(stripe_api.app.requests[0]["created[gte]"]) == math.floor(now - 7 * 86400)
    assert tally.queued == 7  # created up to 7 days ago; older ones the inbox has forgotten
    assert reconciled() == before + 7
    assert await store.reconciled_until("stripe") == now - ReconcileConfig().settle


async def test_a_round_that_fails_keeps_its_checkpoint_and_is_counted(
    store: Store, stripe_api: StandIn
) -> None:
    now = time.time()
    await store.set_reconciled_until("stripe", now - 3600)
    target = stripe_api.target("rk_live_revokedkey00000")
    reconciler = Reconciler(store, [target], clock=lambda: now)
    labels = {"source": "stripe", "reason": "key"}
    before = REGISTRY.get_sample_value("bridge_reconcile_failures_total", labels) or 0.0
    with capture_logs() as logs:
        assert await reconciler.round(target) is None
    assert REGISTRY.get_sample_value("bridge_reconcile_failures_total", labels) == before + 1
    assert await store.reconciled_until("stripe") == now - 3600
    (failed,) = [line for line in logs if line["event"].startswith("reconcile failed")]
    assert "Stripe refused the key (401)" in failed["reason"]
    assert "rk_live_revokedkey00000" not in str(logs)
