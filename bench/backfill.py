#!/usr/bin/env python3
"""`millimetric-bridge backfill stripe` over events listed by a local stand-in of Stripe's
`GET /v1/events` (real HTTP, the real `stripe` package): events a second and the command's
peak memory for each count of events (flat in the count: a page at a time), then a second
run over the same events, which must queue nothing.

    .venv/bin/python bench/backfill.py                      # 2,000 then 10,000 events
    .venv/bin/python bench/backfill.py --events 50000
    .venv/bin/python bench/backfill.py --database-url postgresql://postgres@127.0.0.1/test

The stand-in serves from a thread of this process; the command runs as its own process
(`millimetric-bridge backfill`), whose peak RSS is its VmHWM, read from /proc every 20 ms
while it runs (the kernel's `ru_maxrss` would count the pages of this process, stand-in
and all, that the child held between its fork and its exec). Each count gets a fresh
SQLite file (or PostgreSQL schema).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.store import open_store  # noqa: E402 (after the path is set)
from tests.conftest import ServerThread  # noqa: E402
from tests.provider_apis import STRIPE_LIVE_KEY, StripeEvents, stripe_purchase  # noqa: E402

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"
SUMMARY = re.compile(
    r"listed ([\d,]+), already received ([\d,]+), queued ([\d,]+) in ([\d.]+)s"
    r" \(([\d,]+) events/s\)"
)


@contextmanager
def database(base_url: str | None, workdir: Path, n: int) -> Iterator[str]:
    """A URL for an empty store: a SQLite file in `workdir`, or a fresh PostgreSQL schema."""
    if base_url is None:
        yield f"sqlite:///{workdir}/backfill-{n}.db"
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def run(url: str, api: str, workdir: Path) -> tuple[list[int], float, float, float]:
    """One `backfill stripe --since 1d`: (listed, received, queued), its own events/s, the
    wall time of the process, and its peak RSS in MB."""
    (workdir / "bridge.toml").write_text("")
    env = {
        **os.environ,
        "BRIDGE_DATABASE_URL": url,
        "BRIDGE_CONFIG": str(workdir / "bridge.toml"),
        "STRIPE_API_KEY": STRIPE_LIVE_KEY,
        "STRIPE_API_BASE": api,
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [SCRIPT, "backfill", "stripe", "--since", "1d"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    peak = [0]
    watcher = threading.Thread(target=watch, args=(process, peak))
    watcher.start()
    out, _ = process.communicate()
    wall = time.perf_counter() - started
    watcher.join()
    found = SUMMARY.search(out.decode())
    if process.returncode != 0 or found is None:
        raise SystemExit(f"backfill failed ({process.returncode}): {out.decode()}")
    counts = [int(found.group(i).replace(",", "")) for i in (1, 2, 3)]
    return counts, float(found.group(5).replace(",", "")), wall, peak[0] / 1024


def watch(process: subprocess.Popen[bytes], peak: list[int]) -> None:
    """The process's VmHWM (kB) into `peak[0]`, until it exits."""
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:  # it exited between the two looks
            return
        time.sleep(0.02)


def inbox(url: str) -> int:
    async def count() -> int:
        store = open_store(url)
        await store.open()
        try:
            return (await store.stats(time.time())).inbox
        finally:
            await store.close()

    return asyncio.run(count())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--database-url", help="a PostgreSQL URL (default: SQLite files)")
    args = parser.parse_args()
    print(
        f"{'events':>8} {'events/s':>9} {'wall s':>7} {'peak RSS':>9} {'in inbox':>9}"
        f"   second run: {'listed':>7} {'received':>9} {'queued':>7} {'events/s':>9}"
    )
    now = int(time.time())
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        for n in args.events:
            # Spread over the last 20 hours, so the list filters by `created` as it would.
            events = StripeEvents(
                stripe_purchase(i, now - 72000 + i * 72000 // n) for i in range(n)
            )
            with ServerThread(events) as api, database(args.database_url, workdir, n) as url:
                (listed, _, queued), rate, wall, rss = run(url, api.url, workdir)
                assert listed == queued == n, (listed, queued)
                held = inbox(url)
                (again, received, requeued), rate2, _, _ = run(url, api.url, workdir)
                assert (again, received, requeued) == (n, n, 0), (again, received, requeued)
                print(
                    f"{n:>8,} {rate:>9,.0f} {wall:>7.1f} {rss:>6.1f} MB {held:>9,}"
                    f"   {'':>12}{again:>7,} {received:>9,} {requeued:>7,} {rate2:>9,.0f}"
                )


if __name__ == "__main__":
    main()
