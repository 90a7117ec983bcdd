#!/usr/bin/env python3
"""A burst of verified deliveries through the pipeline: stored as intake stores them
(untranslated), then translated and forwarded into the local sink at the published rate
limits; print how fast the translate stage took the backlog, the forwarding rate while
it lasted and the bridge's peak memory.

    .venv/bin/python bench/forward.py                      # 1,000 then 100,000 events
    .venv/bin/python bench/forward.py --events 1000000     # a million-event backlog
    .venv/bin/python bench/forward.py --database-url postgresql://postgres@127.0.0.1/test

With a PostgreSQL URL each run gets a fresh schema in that database, dropped afterwards.

Each delivery is a signed Stripe checkout (a paid one-off purchase by one of 5,000 users),
stored raw as intake would. The translate rate is the backlog over the time until
`/readyz` reports none untranslated. Millimetric's ceiling is 2,500 events/s (5 batches/s
of 500); the warm forwarding rate is measured between 20% and 95% delivered, so neither
start-up nor the sink's initial burst counts. Peak RSS is the bridge process's VmHWM from
/proc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402 (after the path is set)

from bridge.store import Delivery, open_store  # noqa: E402

CHECKOUT = ROOT / "tests" / "fixtures" / "stripe" / "checkout.session.completed.json"

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"
CEILING = 2500.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def database(base_url: str | None, workdir: Path, n: int) -> Iterator[str]:
    """A URL for an empty store: a SQLite file in `workdir`, or a fresh PostgreSQL schema."""
    if base_url is None:
        yield f"sqlite:///{workdir}/bench-{n}.db"
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def checkout(template: dict[str, Any], i: int) -> bytes:
    obj = {
        **template["data"]["object"],
        "id": f"cs_bench_{i}",
        "mode": "payment",
        "payment_status": "paid",
        "payment_intent": f"pi_bench_{i}",
        "invoice": None,
        "customer": None,
        "client_reference_id": f"user_{i % 5000}",
    }
    return msgspec.json.encode({**template, "id": f"evt_bench_{i}", "data": {"object": obj}})


async def fill(url: str, n: int) -> None:
    """`n` deliveries as intake leaves them: verified, stored, untranslated."""
    template = msgspec.json.decode(CHECKOUT.read_bytes()) | {"livemode": True}
    store = open_store(url)
    await store.open()
    now = time.time()
    chunk = 2000
    for start in range(0, n, chunk):
        await asyncio.gather(
            *(
                store.append(
                    Delivery(
                        source="stripe",
                        provider_event_id=f"evt_bench_{i}",
                        received_at=now,
                        raw_body=checkout(template, i),
                    )
                )
                for i in range(start, min(n, start + chunk))
            )
        )
    await store.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(
    url: str, secret: str
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], int, int]:
    """The local sink (listening once this returns) and a `serve` bridge forwarding to it,
    Stripe at `secret`; with their ports."""
    sink_port, port = free_port(), free_port()
    sink = subprocess.Popen(
        [SCRIPT, "sink", "--port", str(sink_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": f"http://127.0.0.1:{sink_port}",
        "BRIDGE_DATABASE_URL": url,
        "PORT": str(port),
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_LOG_LEVEL": "warning",
        "STRIPE_WEBHOOK_SECRET": secret,
    }
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{sink_port}/_sink/stats")
            break
        except httpx.TransportError:
            time.sleep(0.05)
    bridge = subprocess.Popen([SCRIPT, "serve"], env=env, stdout=subprocess.DEVNULL)
    return sink, bridge, sink_port, port


def run(n: int, url: str) -> dict[str, float]:
    started = time.monotonic()
    asyncio.run(fill(url, n))
    fill_s = time.monotonic() - started
    sink, bridge, sink_port, port = start(url, "whsec_bench")
    stats_url = f"http://127.0.0.1:{sink_port}/_sink/stats"
    marks: dict[float, float] = {}
    began = time.monotonic()
    translated_s = float("nan")
    listening: float | None = None
    try:
        while True:
            if translated_s != translated_s:  # nan: the backlog is not translated yet
                try:
                    ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
                    listening = listening or time.monotonic()
                    if ready.get("untranslated") == 0:
                        translated_s = time.monotonic() - listening
                except (httpx.TransportError, ValueError):
                    pass  # not listening yet
            stats = httpx.get(stats_url).json()
            done = stats["unique_event_ids"]
            now = time.monotonic()
            for share in (0.2, 0.95):
                if share not in marks and done >= share * n:
                    marks[share] = now
            if done >= n:
                break
            if now - began > 3600:
                raise SystemExit("drain took over an hour")
            time.sleep(0.05)
        total_s = time.monotonic() - began
        rss = peak_rss_mb(bridge.pid)
    finally:
        bridge.terminate()
        bridge.wait(30)
        sink.terminate()
        sink.wait(30)
    answers = stats["answers"]
    warm = (0.75 * n) / (marks[0.95] - marks[0.2]) if n >= 10_000 else n / total_s
    return {
        "events": n,
        "fill_s": fill_s,
        "drain_s": total_s,
        "translate_rate": n / translated_s,
        "warm_rate": warm,
        "fraction": warm / CEILING,
        "peak_rss_mb": rss,
        "http_429": sum(v for k, v in answers.items() if k.endswith(" 429")),
        "duplicates": stats["duplicates"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events",
        type=int,
        action="append",
        help="deliveries in the burst (repeatable) [1000 and 100000]",
    )
    parser.add_argument(
        "--database-url",
        help="a postgresql:// database to run on (a fresh schema in it) [a SQLite file]",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    try:
        print(
            f"{'events':>9} {'fill s':>7} {'translated/s':>13} {'drain s':>8} {'ev/s warm':>10}"
            f" {'of 2500':>8} {'peak RSS':>9} {'429s':>5} {'dups':>5}"
        )
        for n in args.events or [1000, 100_000]:
            with database(args.database_url, workdir, n) as url:
                r = run(n, url)
            print(
                f"{r['events']:>9,.0f} {r['fill_s']:>7.1f} {r['translate_rate']:>13,.0f}"
                f" {r['drain_s']:>8.1f}"
                f" {r['warm_rate']:>10,.0f} {r['fraction']:>8.3f}"
                f" {r['peak_rss_mb']:>7.1f}MB {r['http_429']:>5.0f} {r['duplicates']:>5.0f}",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
