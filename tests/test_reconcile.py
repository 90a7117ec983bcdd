"""The periodic reconcile in a running bridge and `millimetric-bridge backfill`, on SQLite
and PostgreSQL: a local stand-in of Stripe's events list over real HTTP, the real `stripe`
package, the real sink."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner

from bridge.app import create_app
from bridge.backfill import RetryPolicy, targets
from bridge.cli import main
from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.registry import load_sources
from bridge.stages.reconcile import ReconcileConfig
from bridge.store import Delivery, open_store
from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, ServerThread
from tests.provider_apis import STRIPE_LIVE_KEY, StripeEvents, stripe_purchase

SECRET = "whsec_reconcile_secret"
CONFIG = ReconcileConfig(every=3600, overlap=600, settle=300, retry=RetryPolicy(base=0.01))

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)


class StandIn:
    def __init__(self, app: StripeEvents, url: str, config: Path) -> None:
        self.app = app
        self.url = url
        self.config = config


@pytest.fixture
def stripe_api(tmp_path: Path) -> Iterator[StandIn]:
    app = StripeEvents()
    with ServerThread(app) as server:
        yield StandIn(app, server.url, tmp_path / "bridge.toml")


def environment(sink: RunningSink, database_url: str, stand_in: StandIn) -> dict[str, str]:
    stand_in.config.write_text("")  # no bridge.toml of the working directory
    return {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_API_KEY": STRIPE_LIVE_KEY,
        "STRIPE_API_BASE": stand_in.url,
        "BRIDGE_CONFIG": str(stand_in.config),
    }


def start(env: dict[str, str], config: ReconcileConfig = CONFIG) -> ServerThread:
    settings = msgspec.structs.replace(load_settings(env), reconcile=config)
    sources = load_sources(env, {"stripe": stripe})
    return ServerThread(create_app(settings, sources=sources, reconciled=targets(sources, env)))


def post(server: ServerThread, event: dict[str, Any]) -> str:
    body = msgspec.json.encode(event)
    answer = httpx.post(
        f"{server.url}/webhooks/stripe", content=body, headers=sign(stripe, body, SECRET)
    )
    assert answer.status_code == 200, answer.text
    result: str = answer.json()["result"]
    return result


def purchases(sink: RunningSink, count: int, within: float = 15) -> list[str]:
    """The purchases' event ids at the sink, once there are `count` (and a moment more)."""
    deadline = time.monotonic() + within
    while True:
        events = httpx.get(f"{sink.url}/_sink/events").json()["events"]
        found = [e["body"]["event_id"] for e in events if e["body"].get("event") == "purchase"]
        if len(found) >= count:
            time.sleep(0.5)  # anything more would show now
            events = httpx.get(f"{sink.url}/_sink/events").json()["events"]
            return [e["body"]["event_id"] for e in events if e["body"].get("event") == "purchase"]
        assert time.monotonic() < deadline, f"{len(found)} of {count} purchases arrived"
        time.sleep(0.05)


def metric(server: ServerThread, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


RECONCILED = 'bridge_reconciled_total{source="stripe"}'


def checkpoint(database_url: str) -> float | None:
    async def read() -> float | None:
        store = open_store(database_url)
        await store.open()
        try:
            return await store.reconciled_until("stripe")
        finally:
            await store.close()

    return asyncio.run(read())


def until_checkpoint(database_url: str, beyond: float = 0.0, within: float = 15) -> float:
    deadline = time.monotonic() + within
    while (found := checkpoint(database_url)) is None or found <= beyond:
        assert time.monotonic() < deadline, "the reconcile stored no checkpoint in time"
        time.sleep(0.1)
    return found


def received_webhook(database_url: str, event: dict[str, Any], at: float) -> None:
    """The inbox holds a webhook of `event`, received at `at` (as intake stores it)."""

    async def append() -> None:
        store = open_store(database_url)
        await store.open()
        try:
            delivery = Delivery(
                source="stripe",
                provider_event_id=event["id"],
                received_at=at,
                raw_body=msgspec.json.encode(event),
            )
            assert await store.append(delivery) == "accepted"
        finally:
            await store.close()

    asyncio.run(append())


def test_a_webhook_of_a_backfilled_event_is_a_duplicate_and_counts_once(
    sink: RunningSink, database_url: str, stripe_api: StandIn
) -> None:
    now = int(time.time())
    events = [stripe_purchase(i, now - 600 + i, prefix="evt_bf") for i in range(3)]
    stripe_api.app.add(events)
    env = environment(sink, database_url, stripe_api)
    with start(env, msgspec.structs.replace(CONFIG, every=0)) as server:
        assert post(server, events[0]) == "accepted"  # its webhook came: skipped below
        result = CliRunner().invoke(main, ["backfill", "stripe", "--since", "1h"], env=env)
        assert result.exit_code == 0, result.output
        assert "listed 3, already received 1, queued 2 in" in result.stdout
        assert "live-mode events created" in result.stderr
        assert sorted(purchases(sink, 3)) == [f"purchase:pi_evt_bf_{i}" for i in range(3)]
        # Webhooks of the backfilled events, coming late: duplicates, nothing sent again.
        assert [post(server, event) for event in events] == ["duplicate"] * 3
        assert len(purchases(sink, 3)) == 3


def test_the_reconcile_appends_what_was_missed_and_its_checkpoint_survives_a_restart(
    sink: RunningSink, database_url: str, stripe_api: StandIn
) -> None:
    now = time.time()
    webhook = stripe_purchase(0, int(now - 7300), prefix="evt_rc")
    received_webhook(database_url, webhook, at=now - 7200)  # before the outage
    missed = [stripe_purchase(i, int(now - 5000 + i), prefix="evt_rc") for i in range(1, 4)]
    stripe_api.app.add([webhook, *missed])
    env = environment(sink, database_url, stripe_api)
    with start(env) as server:
        first = until_checkpoint(database_url)
        # The first round reaches back to the oldest delivery held (less the overlap).
        listed_from = int(stripe_api.app.requests[0]["created[gte]"])
        assert abs(listed_from - (now - 7200 - 600)) <= 1
        assert abs(int(stripe_api.app.requests[0]["created[lt]"]) - (now - 300)) <= 5
        assert sorted(purchases(sink, 4)) == [f"purchase:pi_evt_rc_{i}" for i in range(4)]
        assert metric(server, RECONCILED) >= 3
    assert first == pytest.approx(now - 300, abs=5)

    # Shown late by Stripe: created before the checkpoint, within the overlap.
    late = stripe_purchase(9, int(first - 120), prefix="evt_rc")
    stripe_api.app.add([late])
    stripe_api.app.requests.clear()
    with start(env) as server:
        second = until_checkpoint(database_url, beyond=first)
        # From the stored checkpoint (less the overlap), not from 30 days or the inbox.
        assert int(stripe_api.app.requests[0]["created[gte]"]) == math.floor(first - 600)
        assert "purchase:pi_evt_rc_9" in purchases(sink, 5)
        assert len(purchases(sink, 5)) == 5
    assert second > first


def test_a_failing_stripe_api_leaves_intake_and_forwarding_alone(
    sink: RunningSink, database_url: str, stripe_api: StandIn
) -> None:
    now = time.time()
    received_webhook(database_url, stripe_purchase(0, int(now - 4000), prefix="evt_f"), now - 3600)
    stripe_api.app.fail(*[503] * 1000)
    env = environment(sink, database_url, stripe_api)
    failures = 'bridge_reconcile_failures_total{reason="provider",source="stripe"}'
    slow = msgspec.structs.replace(CONFIG, retry=RetryPolicy(base=0.3, cap=0.5, tries=4))
    with start(env, slow) as server:
        before = metric(server, failures)
        for i in range(1, 4):  # while the reconcile retries
            assert post(server, stripe_purchase(i, int(time.time()), prefix="evt_f")) == "accepted"
        assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
        arrived = purchases(sink, 4)
        assert sorted(arrived) == [f"purchase:pi_evt_f_{i}" for i in range(4)]
        deadline = time.monotonic() + 15
        while metric(server, failures) == before:
            assert time.monotonic() < deadline, "the failed round was not counted"
            time.sleep(0.1)
        assert len(stripe_api.app.requests) == 5  # a try and four more
        assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
    assert checkpoint(database_url) is None  # the window is listed again next time


def test_the_command_line_refuses_what_cannot_work(
    sink: RunningSink, database_url: str, stripe_api: StandIn
) -> None:
    env = environment(sink, database_url, stripe_api)

    def run(*args: str, **changes: str) -> Any:
        return CliRunner().invoke(main, ["backfill", *args], env={**env, **changes})

    for key, says in [
        ("pk_live_abc", "STRIPE_API_KEY: is a publishable pk_ key"),
        ("rk_live_unknown0000", "STRIPE_API_KEY: Stripe refused the key (401)"),
        ("rk_test_noeventsaccess0123", "STRIPE_API_KEY: the key may not read events (403)"),
        ("", "STRIPE_API_KEY: not set"),
    ]:
        result = run("stripe", "--since", "1d", STRIPE_API_KEY=key)
        assert result.exit_code == 2, result.output
        assert says in result.stderr
        assert not key or key not in result.output
    for args, says in [
        (("shopify", "--since", "1d"), "has no event list to backfill from"),
        (("nope", "--since", "1d"), "no source 'nope'"),
        (("stripe", "--since", "40d"), "further than the inbox remembers"),
        (("stripe", "--since", "1h", "--until", "2h"), "must be before --until"),
        (("stripe", "--since", "yesterday"), "a duration like 2h"),
    ]:
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert says in result.output


def test_a_dry_run_prints_what_it_would_queue(
    sink: RunningSink, database_url: str, stripe_api: StandIn
) -> None:
    now = int(time.time())
    stripe_api.app.add([stripe_purchase(i, now - 100 + i, prefix="evt_dry") for i in range(2)])
    env = environment(sink, database_url, stripe_api)
    result = CliRunner().invoke(main, ["backfill", "stripe", "--since", "1h", "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "would",
        "queue",
        "checkout.session.completed",
        "evt_dry_1",
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 99)),
    ]
    assert lines[1].split()[3] == "evt_dry_0"
    assert lines[2].startswith("backfill stripe: listed 2, already received 0, would queue 2")
    assert "(dry run: nothing is stored)" in result.stderr
    assert "backfill: listed 2  already received 0  would queue 2" in result.stderr  # not a tty
    assert checkpoint(database_url) is None
    again = CliRunner().invoke(main, ["backfill", "stripe", "--since", "1h"], env=env)
    assert "queued 2 in" in again.stdout  # the dry run stored nothing


def test_serve_refuses_a_key_of_the_wrong_kind_and_a_bad_interval(
    sink: RunningSink, database_url: str, stripe_api: StandIn
) -> None:
    env = environment(sink, database_url, stripe_api)
    for changes, says in [
        ({"STRIPE_API_KEY": "pk_live_abc"}, "STRIPE_API_KEY: is a publishable pk_ key"),
        ({"BRIDGE_RECONCILE_EVERY": "15"}, "BRIDGE_RECONCILE_EVERY: must be a duration like 15m"),
        ({"BRIDGE_RECONCILE_EVERY": "10s"}, "BRIDGE_RECONCILE_EVERY: must be at least 1m"),
    ]:
        result = CliRunner().invoke(main, ["serve"], env={**env, **changes})
        assert result.exit_code == 2, result.output
        assert says in result.stderr
    settings = load_settings({**env, "BRIDGE_RECONCILE_EVERY": "0"})
    assert settings.reconcile.every == 0
    assert load_settings({**env, "BRIDGE_RECONCILE_EVERY": "2h"}).reconcile.every == 7200
    assert load_settings(env).reconcile.every == 900
    with pytest.raises(ConfigError):
        load_settings({**env, "BRIDGE_RECONCILE_EVERY": "soon"})
