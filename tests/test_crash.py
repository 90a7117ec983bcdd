"""A real `serve` process killed in the middle of forwarding, then restarted; and a clean
SIGTERM shutdown. Every event arrives; a resend after a crash is one Millimetric
deduplicates by event_id, so none counts twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bridge.events import Track
from bridge.store import Delivery, open_store
from tests.conftest import RunningSink, free_port

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"


def seed(db: Path, n: int) -> set[str]:
    async def go() -> None:
        store = open_store(f"sqlite:///{db}")
        await store.open()
        now = time.time()
        await asyncio.gather(
            *(
                store.accept(
                    Delivery(
                        source="test",
                        provider_event_id=f"e{i}",
                        received_at=now,
                        calls=[Track(event="purchase", event_id=f"e{i}")],
                    )
                )
                for i in range(n)
            )
        )
        await store.close()

    asyncio.run(go())
    return {f"e{i}" for i in range(n)}


def start(db: Path, sink: RunningSink) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{db}",
        "PORT": str(free_port()),
        "BRIDGE_HOST": "127.0.0.1",
    }
    return subprocess.Popen(
        [SCRIPT, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def sink_stats(sink: RunningSink) -> dict[str, int]:
    return httpx.get(f"{sink.url}/_sink/stats").json()  # type: ignore[no-any-return]


def wait_for(check: object, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def test_killed_mid_forward_then_restarted(sink: RunningSink, tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    expected = seed(db, 6000)
    httpx.post(f"{sink.url}/_sink/knobs", json={"latency_ms": 250}).raise_for_status()
    kills = 0
    for target in (1000, 2500, 4000):
        proc = start(db, sink)
        wait_for(lambda t=target: sink_stats(sink)["unique_event_ids"] >= t, within=30)
        time.sleep(0.1)  # a batch is in flight: the sink answers after 250 ms
        proc.kill()
        proc.wait(10)
        kills += 1
    proc = start(db, sink)
    try:
        wait_for(lambda: sink_stats(sink)["unique_event_ids"] >= len(expected), within=60)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    received = httpx.get(f"{sink.url}/_sink/events", params={"limit": 10000}).json()["events"]
    ids = [e["body"]["event_id"] for e in received]
    assert kills == 3
    assert sorted(ids) == sorted(expected)  # every event, each stored once by event_id


def test_sigterm_finishes_the_send_in_flight(sink: RunningSink, tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    seed(db, 5000)
    httpx.post(f"{sink.url}/_sink/knobs", json={"latency_ms": 1500}).raise_for_status()
    proc = start(db, sink)
    wait_for(lambda: httpx.get(f"{sink.url}/_sink/stats").status_code == 200, within=5)
    time.sleep(1.2)  # the first batch is on its way, its answer 1.5 s out
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)
    assert code == 0
    delivered = sink_stats(sink)["unique_event_ids"]
    # The batches in flight (at most 4 at once) were answered and counted; none started after.
    assert delivered in (500, 1000, 1500, 2000)

    async def pending() -> int:
        store = open_store(f"sqlite:///{db}")
        await store.open()
        try:
            return (await store.stats(time.time())).pending
        finally:
            await store.close()

    assert asyncio.run(pending()) == 5000 - delivered  # the rest waits for the next start
