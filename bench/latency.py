#!/usr/bin/env python3
"""Delivery latency at light load: signed Stripe purchases posted one at a time at a steady
rate, each timed from its 200 to its arrival at the local sink (through the translate
stage and the forwarder).

    .venv/bin/python bench/latency.py [--rate 20] [--seconds 30] [--database-url URL]

Prints the 50th, 99th percentile and worst latency, and the share within 300 ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import forward  # noqa: E402 (after the path is set; bench/forward.py)

from bridge.testing import sign  # noqa: E402
from handlers.stripe import handler as stripe  # noqa: E402

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"
CHECKOUT = ROOT / "tests" / "fixtures" / "stripe" / "checkout.session.completed.json"
SECRET = "whsec_latency_bench"


def wait_listening(url: str) -> None:
    for _ in range(200):
        try:
            httpx.get(url)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="deliveries per second [20]")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--database-url", help="default: a SQLite file in a temp directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bridge-latency-"))
    url = args.database_url or f"sqlite:///{work}/bridge.db"
    sink, bridge, sink_port, port = forward.start(url, SECRET)
    template = msgspec.json.decode(CHECKOUT.read_bytes()) | {"livemode": True}
    answered: dict[str, float] = {}
    try:
        wait_listening(f"http://127.0.0.1:{sink_port}/_sink/stats")
        wait_listening(f"http://127.0.0.1:{port}/healthz")
        count = int(args.rate * args.seconds)
        start = time.time()
        with httpx.Client() as client:
            for i in range(count):
                time.sleep(max(0.0, start + i / args.rate - time.time()))
                obj = template["data"]["object"] | {
                    "id": f"cs_lat_{i}",
                    "mode": "payment",
                    "payment_status": "paid",
                    "payment_intent": f"pi_lat_{i}",
                    "invoice": None,
                    "customer": None,
                    "client_reference_id": f"user_{i}",
                }
                body = msgspec.json.encode(
                    template | {"id": f"evt_lat_{i}", "data": {"object": obj}}
                )
                answer = client.post(
                    f"http://127.0.0.1:{port}/webhooks/stripe",
                    content=body,
                    headers=sign(stripe, body, SECRET),
                )
                answer.raise_for_status()
                answered[f"purchase:pi_lat_{i}"] = time.time()
        deadline = time.time() + 30
        arrived: dict[str, float] = {}
        while len(arrived) < count and time.time() < deadline:
            events = httpx.get(
                f"http://127.0.0.1:{sink_port}/_sink/events", params={"limit": 100_000}
            ).json()["events"]
            arrived = {
                e["body"]["event_id"]: e["arrived"] for e in events if "event_id" in e["body"]
            }
            time.sleep(0.2)
    finally:
        bridge.terminate()
        bridge.wait(30)
        sink.terminate()
        sink.wait(30)
    latencies = sorted(arrived[k] - answered[k] for k in answered if k in arrived)
    if len(latencies) < len(answered):
        print(f"{len(answered) - len(latencies)} of {len(answered)} never arrived")
    if not latencies:
        raise SystemExit("nothing arrived")

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    within = sum(1 for x in latencies if x <= 0.3) / len(answered)
    print(
        f"{len(latencies)} deliveries at {args.rate:g}/s: p50 {pct(0.5):.0f} ms,"
        f" p99 {pct(0.99):.0f} ms, worst {latencies[-1] * 1000:.0f} ms;"
        f" {within:.1%} within 300 ms"
    )


if __name__ == "__main__":
    main()
