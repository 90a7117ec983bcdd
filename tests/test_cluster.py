"""Scale-out: three real `serve` processes on one PostgreSQL database take signed Stripe
webhooks spread over all of them; the one forwarding is killed with SIGKILL mid-stream.
Another takes over within seconds, and every accepted event reaches the sink once by
event_id (Millimetric deduplicates a resend), with no 429 from the sink: one forwarder
paces for the whole cluster."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, free_port, postgres_schema

pytestmark = pytest.mark.postgres

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"
SECRET = "whsec_cluster_secret"
CHECKOUT = Path(__file__).parent / "fixtures" / "stripe" / "checkout.session.completed.json"
WEBHOOKS = 1500


class Bridge:
    def __init__(self, url: str, sink: RunningSink, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": url,
            "BRIDGE_CONFIG": str(config),
            "STRIPE_WEBHOOK_SECRET": SECRET,
            "PORT": str(self.port),
            "BRIDGE_HOST": "127.0.0.1",
            "BRIDGE_LOG_LEVEL": "warning",
        }
        self.proc = subprocess.Popen(
            [SCRIPT, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def forwarding(self) -> str | None:
        try:
            answer = httpx.get(f"{self.url}/readyz", timeout=2)
        except httpx.TransportError:
            return None
        return str(answer.json().get("forwarding")) if answer.status_code == 200 else None


@pytest.fixture
def cluster(sink: RunningSink, tmp_path: Path) -> Iterator[list[Bridge]]:
    config = tmp_path / "bridge.toml"
    config.write_text("[sources.stripe]\ninclude_test_events = true\n")
    with postgres_schema() as url:
        bridges = [Bridge(url, sink, config) for _ in range(3)]
        try:
            wait_for(lambda: all(b.forwarding() for b in bridges), within=20)
            yield bridges
        finally:
            for bridge in bridges:
                if bridge.proc.poll() is None:
                    bridge.proc.send_signal(signal.SIGTERM)
            for bridge in bridges:
                bridge.proc.wait(20)


def wait_for(check: Callable[[], bool], within: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, "not reached in time"
        time.sleep(0.05)
    return time.monotonic() - started


def checkout(n: int) -> tuple[bytes, str]:
    """A signed-to-be Stripe checkout and the event_id of the purchase it becomes."""
    event = msgspec.json.decode(CHECKOUT.read_bytes())
    event["id"] = f"evt_cluster_{n}"
    event["data"]["object"].update(
        mode="payment", payment_intent=f"pi_cluster_{n}", client_reference_id="user_cluster"
    )
    return msgspec.json.encode(event), f"purchase:pi_cluster_{n}"


def test_three_instances_one_forwarder_and_failover(
    cluster: list[Bridge], sink: RunningSink
) -> None:
    started = time.monotonic()
    # Each batch takes a while to be answered, so the leader always has sends in flight.
    httpx.post(f"{sink.url}/_sink/knobs", json={"latency_ms": 150}).raise_for_status()
    roles = [b.forwarding() for b in cluster]
    assert sorted(roles, key=str) == ["leader", "standby", "standby"]
    leader = cluster[roles.index("leader")]
    alive = list(cluster)
    accepted: set[str] = set()
    after_kill: list[str] = []
    killed = threading.Event()
    lock = threading.Lock()

    def deliver(n: int) -> None:
        """Post one webhook as a provider would: an instance that gives no answer (or a
        503) gets the same delivery again, at another instance."""
        body, event_id = checkout(n)
        for attempt in range(30):
            target = alive[(n + attempt) % len(alive)]
            try:
                answer = client.post(
                    f"{target.url}/webhooks/stripe",
                    content=body,
                    headers=sign(stripe, body, SECRET),
                )
            except httpx.TransportError:
                continue
            if answer.status_code == 200:
                assert answer.json()["result"] in ("accepted", "duplicate")
                with lock:
                    accepted.add(event_id)
                    if killed.is_set():
                        after_kill.append(event_id)
                return
            assert answer.status_code == 503, answer.text
            time.sleep(0.1)
        raise AssertionError(f"delivery {n} was never accepted")

    with httpx.Client(timeout=5) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        posted = [pool.submit(deliver, n) for n in range(WEBHOOKS)]
        # Mid-stream: the leader has forwarded some and has a batch in flight.
        wait_for(lambda: unique_ids(sink) >= 300, within=20)
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(5)
        killed.set()
        alive.remove(leader)
        # Another instance leads within seconds, while the webhooks keep coming.
        failover = wait_for(lambda: "leader" in [b.forwarding() for b in alive], within=10)
        for future in posted:
            future.result()
        posting = time.monotonic() - started

    assert len(accepted) == WEBHOOKS
    assert len(after_kill) > 100  # the stream went on through the failover
    wait_for(lambda: unique_ids(sink) >= len(accepted), within=30)
    events = httpx.get(
        f"{sink.url}/_sink/events", params={"route": "track", "limit": 10 * WEBHOOKS}
    ).json()["events"]
    delivered = {e["body"]["event_id"] for e in events}
    assert delivered == accepted  # every accepted event, nothing else
    answers = httpx.get(f"{sink.url}/_sink/stats").json()["answers"]
    assert sum(v for k, v in answers.items() if k.endswith(" 429")) == 0, answers
    assert sorted(str(b.forwarding()) for b in alive) == ["leader", "standby"]
    print(
        f"\ncluster: {WEBHOOKS} webhooks ({len(after_kill)} after the kill) posted in"
        f" {posting:.1f}s, failover seen {failover:.1f}s after the kill,"
        f" {time.monotonic() - started:.1f}s in all"
    )


def unique_ids(sink: RunningSink) -> int:
    return int(httpx.get(f"{sink.url}/_sink/stats").json()["unique_event_ids"])
