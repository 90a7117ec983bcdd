#!/usr/bin/env python3
"""Chaos: a real `millimetric-bridge serve` under crashes, Millimetric faults and hostile
input, with signed Stripe deliveries streaming in the whole time; prints what survived.

    .venv/bin/python bench/chaos.py                          # a few minutes, SQLite
    .venv/bin/python bench/chaos.py --kills 50 --outage-seconds 600 --fault-seconds 120
    .venv/bin/python bench/chaos.py --database-url postgresql://127.0.0.1:5432/test

With PostgreSQL the run gets a fresh schema of its own (dropped afterwards) unless the URL
already sets `options=`.

Phases, one bridge database and one local sink throughout:

1. crashes: SIGKILL the bridge every `--kill-every` seconds (`--kills` times) while
   deliveries stream in; the sender retries every delivery that got no 200, as a provider
   would; the sink answers slowly so batches are in flight when the process dies;
2. Millimetric faults: a 5xx outage (`--outage-seconds`), then a 429 storm, slow answers
   and dropped connections (`--fault-seconds` each): intake must keep answering 200
   quickly while the outbox grows, and the backlog must drain once the fault clears;
   then another process holds an exclusive lock on the store (`--lock-seconds`): intake
   must answer 503 or nothing, never a 200 for what it could not store;
3. hostile input: forged, replayed, stale and future signatures, truncated, oversized
   and malformed bodies, header injection (`--hostile` rounds), slow clients holding
   connections (are others still served? does the server close them?), and the
   bridge's memory after many oversized and slow bodies.

Then everything drains. Figures: deliveries acknowledged, lost (acknowledged but never at
the sink; must be 0), duplicated at the sink (an event counted twice; must be 0), resends
the sink deduplicated by event_id (expected after a crash), kills survived, hostile
inputs tried and how many got a 5xx (must be 0). Exit status 1 if a must-be-0 is not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.testing import sign  # noqa: E402 (after the path is set)
from handlers.stripe import handler as stripe  # noqa: E402

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"
SECRET = "whsec_chaos_bench_secret"
ADMIN_TOKEN = "chaos-admin-token-0123456789"
KEY = "sk_dev_local_bridge"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subscription_created(run: str, n: int) -> bytes:
    """One live Stripe delivery that becomes exactly one track call, with event_id
    `subscription_started:sub_<run>_<n>`."""
    return msgspec.json.encode(
        {
            "id": f"evt_{run}_{n}",
            "object": "event",
            "type": "customer.subscription.created",
            "livemode": True,
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": f"sub_{run}_{n}",
                    "object": "subscription",
                    "customer": "cus_x",
                    "status": "active",  # a subscription started (not `incomplete`)
                }
            },
        }
    )


def event_id_of(run: str, n: int) -> str:
    return f"subscription_started:sub_{run}_{n}"


def signed(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    return {**sign(stripe, body, SECRET, timestamp), "content-type": "application/json"}


# -- the processes ---------------------------------------------------------------------------


def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached within {within:.0f}s")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Sink:
    """`millimetric-bridge sink` in its own process, read through `/_sink/`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [SCRIPT, "sink", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: answers(f"{self.url}/healthz"), 15, "sink start")

    def knobs(self, **changes: Any) -> None:
        httpx.post(f"{self.url}/_sink/knobs", json=changes).raise_for_status()

    def calm(self) -> None:
        self.knobs(fail_for_seconds=0, error_rate=0, latency_ms=0, drop_rate=0)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_sink/stats").json()  # type: ignore[no-any-return]

    def track_event_ids(self) -> list[str]:
        found = httpx.get(
            f"{self.url}/_sink/events", params={"route": "track", "limit": 10**7}, timeout=60
        ).json()["events"]
        return [e["body"]["event_id"] for e in found]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Bridge:
    """`millimetric-bridge serve` as a process that can be killed and started again on
    the same port, as a platform restarts a crashed machine."""

    def __init__(self, database_url: str, sink: Sink, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "MILLIMETRIC_KEY": KEY,
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": database_url,
            "BRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
            "STRIPE_WEBHOOK_SECRET": SECRET,
            "PORT": str(self.port),
            "BRIDGE_HOST": "127.0.0.1",
            "BRIDGE_LOG_LEVEL": "warning",
            **env,
        }
        self.log = log.open("ab")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SCRIPT, "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.starts += 1
        wait_until(self._ready, 30, "bridge start")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"bridge exited with {self.proc.returncode}; see {self.log.name}")
        return answers(f"{self.url}/healthz")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log.close()
        return code

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def outbox(self) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.url}/admin/outbox", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        return answer.json()  # type: ignore[no-any-return]


# -- the sender: a provider that retries until it gets a 200 ----------------------------------


@dataclass
class Sender:
    bridge: Bridge
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    acknowledged: set[int] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, of 200 answers
    numbers: Iterator[int] = field(default_factory=itertools.count)
    gave_up: int = 0

    async def deliver(self, http: httpx.AsyncClient, n: int) -> None:
        body = subscription_created(self.run, n)
        for attempt in range(10_000):
            started = time.perf_counter()
            try:
                # Signed afresh each time, as providers do on every attempt.
                answer = await http.post(
                    f"{self.bridge.url}/webhooks/stripe", content=body, headers=signed(body)
                )
            except httpx.HTTPError:
                self.statuses["no answer"] += 1
            else:
                self.statuses[str(answer.status_code)] += 1
                if answer.status_code == 200:
                    self.latencies.append(time.perf_counter() - started)
                    self.acknowledged.add(n)
                    return
                if answer.status_code < 500:
                    self.gave_up += 1  # a provider would not retry a 4xx forever either
                    return
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 5)) * random.random())
        self.gave_up += 1

    async def stream(self, seconds: float, rate: float, concurrency: int = 32) -> None:
        """Start `rate` deliveries a second for `seconds`; wait until each is answered."""
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=10, limits=limits) as http:
            tasks: set[asyncio.Task[None]] = set()
            gate = asyncio.Semaphore(concurrency * 4)
            started = time.monotonic()
            sent = 0
            while (now := time.monotonic()) - started < seconds:
                due = int((now - started) * rate) - sent
                for _ in range(max(0, due)):
                    await gate.acquire()
                    task = asyncio.create_task(self.deliver(http, next(self.numbers)))
                    task.add_done_callback(lambda _t: gate.release())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                await asyncio.sleep(0.01)
            while tasks:
                await asyncio.gather(*list(tasks))

    def intake_figures(self, since: int = 0) -> str:
        lat = sorted(self.latencies[since:])
        if not lat:
            return "no 200 answers"
        p50 = statistics.median(lat) * 1000
        p99 = lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0] * 1000
        top = lat[-1] * 1000
        return f"{len(lat)} answered 200: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {top:.0f} ms"


def run_async(work: Awaitable[Any]) -> Any:
    async def go() -> Any:
        return await work

    return asyncio.run(go())


# -- phase 1: crashes ------------------------------------------------------------------------


def crashes(
    bridge: Bridge, sender: Sender, sink: Sink, kills: int, every: float, rate: float
) -> int:
    """Stream deliveries; SIGKILL the bridge every `every` seconds (jittered) and start it
    again on the same port. The sender keeps retrying through the gaps."""
    sink.knobs(latency_ms=150)  # batches are in flight when the process dies
    done = 0

    async def killer() -> None:
        nonlocal done
        for _ in range(kills):
            await asyncio.sleep(every * random.uniform(0.6, 1.4))
            await asyncio.to_thread(bridge.kill)
            done += 1
            await asyncio.to_thread(bridge.start)

    async def both() -> None:
        killing = asyncio.create_task(killer())
        while not killing.done():
            await sender.stream(min(every, 2.0), rate)
        await killing

    run_async(both())
    sink.calm()
    return done


# -- phase 2: Millimetric faults -------------------------------------------------------------


FAULTS: dict[str, dict[str, Any]] = {
    "5xx outage": {"fail_status": 503},
    "429 storm": {"fail_status": 429},
    "slow answers (12 s, past the client's 10 s timeout)": {"latency_ms": 12_000},
    "dropped connections (half the answers lost)": {"drop_rate": 0.5},
}


def faults(
    bridge: Bridge, sender: Sender, sink: Sink, seconds: float, outage: float, rate: float
) -> list[str]:
    """Each fault for `seconds` (the 5xx outage for `outage`) while deliveries stream in;
    then calm, and the time until everything acknowledged so far is at the sink."""
    lines = []
    for name, knobs in FAULTS.items():
        lasts = outage if name == "5xx outage" else seconds
        if "fail_status" in knobs:
            knobs = {**knobs, "fail_for_seconds": lasts}
        sink.knobs(**knobs)
        before = len(sender.latencies)
        peak = 0

        async def watch(stop: asyncio.Event) -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, (await asyncio.to_thread(bridge.outbox))["pending"])
                await asyncio.sleep(0.5)

        async def go(lasts: float = lasts) -> None:
            stop = asyncio.Event()
            watching = asyncio.create_task(watch(stop))
            await sender.stream(lasts, rate)
            stop.set()
            await watching

        run_async(go())
        sink.calm()
        _, recovered = drain(sink, sender, within=900)
        lines.append(
            f"  {name}, {lasts:.0f}s: intake {sender.intake_figures(before)}; outbox peak "
            f"{peak} pending; all at the sink {recovered:.1f}s after it cleared "
            f"(load average {os.getloadavg()[0]:.1f})"
        )
    return lines


# -- phase 2b: the store locked by another process -------------------------------------------

LOCKERS = {
    "sqlite": (
        "import sqlite3, sys, time\n"
        "conn = sqlite3.connect(sys.argv[1].removeprefix('sqlite:///'), isolation_level=None)\n"
        "conn.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "conn.execute('ROLLBACK')\n"
    ),
    "postgresql": (
        "import psycopg, sys, time\n"
        "with psycopg.connect(sys.argv[1]) as conn:\n"
        "    conn.execute('LOCK TABLE inbox, outbox IN ACCESS EXCLUSIVE MODE')\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(float(sys.argv[2]))\n"
        "    conn.rollback()\n"
    ),
}


def store_locked(
    bridge: Bridge, sender: Sender, sink: Sink, database_url: str, seconds: float, rate: float
) -> str:
    """Another process holds an exclusive lock on the store for `seconds` while deliveries
    stream in: each must be answered 503 (or not at all, and retried), never 200 unstored."""
    backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    before = Counter(sender.statuses)
    latencies = len(sender.latencies)
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKERS[backend], database_url, str(seconds)],
        stdout=subprocess.PIPE,
    )
    assert locker.stdout is not None
    assert locker.stdout.readline() == b"locked\n", "the locker did not get its lock"
    run_async(sender.stream(seconds, rate))
    locker.wait(30)
    _, recovered = drain(sink, sender, within=600)
    seen = sender.statuses - before
    return (
        f"  store locked by another process, {seconds:.0f}s: answers {dict(sorted(seen.items()))}"
        f" (retried until 200); intake {sender.intake_figures(latencies)}; all at the sink "
        f"{recovered:.1f}s after the lock went"
    )


# -- phase 3: hostile input ------------------------------------------------------------------


def hostile_requests(run: str, n: int) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(what, path, headers, body) for one round: none of them may get a 5xx."""
    good = subscription_created(f"{run}h", n)
    now = int(time.time())
    valid = signed(good)
    deep = b'{"id":"evt_deep","type":"invoice.paid","data":' * 20_000
    cases: list[tuple[str, str, dict[str, str], bytes]] = [
        ("no signature", "/webhooks/stripe", {}, good),
        (
            "forged signature",
            "/webhooks/stripe",
            {"stripe-signature": f"t={now},v1={'ab' * 32}"},
            good,
        ),
        ("wrong secret", "/webhooks/stripe", sign(stripe, good, "whsec_wrong", now), good),
        ("stale timestamp", "/webhooks/stripe", signed(good, now - 3600), good),
        ("future timestamp", "/webhooks/stripe", signed(good, now + 3600), good),
        ("signature for another body", "/webhooks/stripe", valid, good.replace(b"sub_", b"sUb_")),
        ("truncated body", "/webhooks/stripe", valid, good[: len(good) // 2]),
        ("signed truncated body", "/webhooks/stripe", signed(good[:40]), good[:40]),
        ("oversized body", "/webhooks/stripe", signed(b"x"), b"{" + b" " * (2 << 20) + b"}"),
        ("wrong content type", "/webhooks/stripe", {**valid, "content-type": "text/xml"}, good),
        (
            "multipart",
            "/webhooks/stripe",
            {**valid, "content-type": "multipart/form-data; boundary=x"},
            good,
        ),
        (
            "invalid UTF-8",
            "/webhooks/stripe",
            {"stripe-signature": f"t={now},v1={'cd' * 32}"},
            b'{"id":"\xff\xfe"}',
        ),
        ("deeply nested JSON", "/webhooks/stripe", signed(deep), deep),
        (
            "huge number",
            "/webhooks/stripe",
            signed(b'{"id":"evt_n","created":' + b"9" * 4000 + b"}"),
            b'{"id":"evt_n","created":' + b"9" * 4000 + b"}",
        ),
        (
            "float overflow",
            "/webhooks/stripe",
            signed(b'{"id":"evt_f","created":1e999}'),
            b'{"id":"evt_f","created":1e999}',
        ),
        (
            "duplicate keys",
            "/webhooks/stripe",
            signed(good[:-1] + b',"id":"evt_other"}'),
            good[:-1] + b',"id":"evt_other"}',
        ),
        (
            "NUL bytes",
            "/webhooks/stripe",
            signed(b'{"id":"a\\u0000b","type":"x\x00"}'),
            b'{"id":"a\\u0000b","type":"x\x00"}',
        ),
        ("empty body", "/webhooks/stripe", signed(b""), b""),
        ("JSON array", "/webhooks/stripe", signed(b"[1,2]"), b"[1,2]"),
        (
            "many signatures",
            "/webhooks/stripe",
            {"stripe-signature": f"t={now}," + ",".join(f"v1={i:064x}" for i in range(2000))},
            good,
        ),
        ("huge header", "/webhooks/stripe", {**valid, "x-pad": "a" * 60_000}, good),
        ("unknown source", "/webhooks/nope", valid, good),
        ("path traversal", "/webhooks/..%2F..%2Fadmin%2Foutbox", valid, good),
        ("unicode source", "/webhooks/str%C3%AFpe", valid, good),
        (
            "admin without token",
            "/admin/forget",
            {"content-type": "application/json"},
            b'{"user_id":"x"}',
        ),
        ("admin with a wrong token", "/admin/replay", {"authorization": "Bearer nope"}, b"{}"),
    ]
    return cases


_HEAD = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
RAW_HOSTILE: list[tuple[str, bytes]] = [
    (
        "header injection (CR LF in a value)",
        _HEAD + b"Stripe-Signature: t=1,v1=00\r\nInjected: yes\r\nContent-Length: 2\r\n\r\n{}",
    ),
    ("bare LF header", b"POST /webhooks/stripe HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}"),
    ("obs-fold header", _HEAD + b"X-A: 1\r\n b\r\nContent-Length: 2\r\n\r\n{}"),
    ("conflicting lengths", _HEAD + b"Content-Length: 2\r\nContent-Length: 9\r\n\r\n{}"),
    (
        "smuggling TE+CL",
        _HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    ("non-ASCII header", _HEAD + b"Stripe-Signature: \xff\xfe\r\nContent-Length: 2\r\n\r\n{}"),
    ("negative length", _HEAD + b"Content-Length: -1\r\n\r\n{}"),
    ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n"),
]


def raw_status(port: int, request: bytes) -> int | None:
    """Send bytes as they are; the status line's code, or None if the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        try:
            head = s.recv(64)
        except (TimeoutError, ConnectionResetError):
            return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def hostile(bridge: Bridge, run: str, rounds: int) -> tuple[int, int, Counter[str]]:
    tried = fives = 0
    by_status: Counter[str] = Counter()
    first_round: list[str] = []
    with httpx.Client(timeout=10) as http:
        for n in range(rounds):
            for what, path, headers, body in hostile_requests(run, n):
                try:
                    status = http.post(bridge.url + path, content=body, headers=headers).status_code
                except httpx.HTTPError as error:  # a refusal by closing is not a 5xx
                    status = 0
                    by_status[f"closed ({type(error).__name__})"] += 1
                tried += 1
                fives += status >= 500
                by_status[str(status)] += 1
                if n == 0:
                    first_round.append(f"{what} {status}")
                if status >= 500:
                    print(f"  5xx on {what}: {status}")
            for what, request in RAW_HOSTILE:
                status = raw_status(bridge.port, request)
                tried += 1
                by_status[str(status) if status else "closed"] += 1
                if n == 0:
                    first_round.append(f"{what} {status or 'closed'}")
                if status and status >= 500:
                    fives += 1
                    print(f"  5xx on {what}: {status}")
    print("  hostile inputs, first round: " + "; ".join(first_round))
    return tried, fives, by_status


def slow_clients(bridge: Bridge, sender: Sender, count: int, hold: float) -> str:
    """Slowloris: `count` connections trickling headers a byte a second. Are other clients
    served meanwhile, and how many slow ones did the server close within `hold` s?"""
    conns = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", bridge.port))
        s.sendall(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n")
        conns.append(s)
    before = len(sender.latencies)
    closed = 0

    async def trickle() -> None:
        nonlocal closed
        started = time.monotonic()
        alive = list(conns)
        while alive and time.monotonic() - started < hold:
            for s in list(alive):
                try:
                    s.sendall(b"X")
                except OSError:
                    alive.remove(s)
                    closed += 1
            await asyncio.sleep(1)

    async def go() -> None:
        await asyncio.gather(trickle(), sender.stream(min(hold, 5.0), 50))

    run_async(go())
    for s in conns:
        s.close()
    return (
        f"  slow clients: {count} trickling headers for {hold:.0f}s, {closed} closed by the "
        f"server; meanwhile {sender.intake_figures(before)}"
    )


def memory(bridge: Bridge, count: int) -> str:
    """RSS before and after `count` oversized bodies (streamed, no length) and `count` slow
    bodies abandoned half way."""
    before = bridge.rss_kib()

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b" " * 65536  # 4 MiB in all, over the 1 MiB limit

    async def oversized(http: httpx.AsyncClient) -> None:
        async def body() -> Any:
            for chunk in chunks():
                yield chunk

        with contextlib.suppress(httpx.HTTPError):
            await http.post(f"{bridge.url}/webhooks/stripe", content=body(), headers=signed(b"{}"))

    async def abandoned() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n"
            + b" " * 400_000
        )
        await writer.drain()
        writer.close()

    async def go() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            for start in range(0, count, 50):
                batch = range(start, min(count, start + 50))
                await asyncio.gather(*(oversized(http) for _ in batch))
                await asyncio.gather(*(abandoned() for _ in batch))

    run_async(go())
    after = bridge.rss_kib()

    async def held() -> int:
        """`count` bodies of 900 KB (under the limit) sent but for their last byte, all
        held open at once: the server buffers each until it is complete."""
        writers = []
        for _ in range(count):
            _, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(
                b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 900001\r\n\r\n"
                + b" " * 900_000
            )
            await writer.drain()
            writers.append(writer)
        await asyncio.sleep(1)
        peak = bridge.rss_kib()
        for writer in writers:
            writer.close()
        return peak

    rounds = []
    for _ in range(3):  # the same again: memory is reused, not grown each time
        peak = run_async(held())
        time.sleep(1)
        rounds.append(f"{peak / 1024:.0f} -> {bridge.rss_kib() / 1024:.0f}")
    return (
        f"  memory: RSS {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after {count} "
        f"bodies of 4 MiB and {count} abandoned half way; with {count} bodies of 900 KB held "
        f"one byte short, then closed, three times: {', '.join(rounds)} MiB"
    )


# -- the run ---------------------------------------------------------------------------------


def drain(sink: Sink, sender: Sender, within: float) -> tuple[list[str], float]:
    expected = {event_id_of(sender.run, n) for n in sender.acknowledged}
    started = time.monotonic()
    deadline = started + within
    while True:
        ids = [i for i in sink.track_event_ids() if sender.run in i]
        if expected <= set(ids) or time.monotonic() > deadline:
            return ids, time.monotonic() - started
        time.sleep(0.5)


def postgres_schema(url: str) -> tuple[str, str]:
    import psycopg

    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    joiner = "&" if "?" in url else "?"
    return schema, f"{url}{joiner}options=-csearch_path%3D{schema}"


def drop_postgres_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: a SQLite file in a temp directory")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs in phase 1 [10]")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills [3]")
    parser.add_argument("--rate", type=float, default=100.0, help="deliveries per second [100]")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="the 5xx outage [30]")
    parser.add_argument("--fault-seconds", type=float, default=15.0, help="other faults [15]")
    parser.add_argument("--hostile", type=int, default=5, help="rounds of hostile input [5]")
    parser.add_argument("--slow-clients", type=int, default=200, help="slowloris sockets [200]")
    parser.add_argument("--bodies", type=int, default=200, help="oversized bodies for RSS [200]")
    parser.add_argument(
        "--lock-seconds", type=float, default=12.0, help="store locked by another process [12]"
    )
    parser.add_argument(
        "--skip", action="append", default=[], choices=["crashes", "faults", "store", "hostile"]
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    database_url = args.database_url or f"sqlite:///{tmp}/bridge.db"
    backend = database_url.split(":", 1)[0]
    schema = None
    if backend.startswith("postgres") and "options=" not in database_url:
        # A schema of its own: the run starts empty, and locking its tables stops nobody else.
        schema, database_url = postgres_schema(database_url)
    sink = Sink()
    bridge = Bridge(database_url, sink, tmp / "bridge.log")
    sender = Sender(bridge)
    report: list[str] = []
    kills = tried = fives = 0
    try:
        bridge.start()
        if "crashes" not in args.skip:
            t = time.monotonic()
            kills = crashes(bridge, sender, sink, args.kills, args.kill_every, args.rate)
            report.append(
                f"  crashes: {kills} SIGKILLs in {time.monotonic() - t:.0f}s, "
                f"{sender.statuses['no answer']} attempts got no answer (retried)"
            )
        if "faults" not in args.skip:
            report += faults(
                bridge, sender, sink, args.fault_seconds, args.outage_seconds, args.rate
            )
        if "store" not in args.skip:
            report.append(
                store_locked(bridge, sender, sink, database_url, args.lock_seconds, args.rate)
            )
        if "hostile" not in args.skip:
            tried, fives, by_status = hostile(bridge, sender.run, args.hostile)
            report.append(f"  hostile answers: {dict(sorted(by_status.items()))}")
            report.append(slow_clients(bridge, sender, args.slow_clients, 15))
            report.append(memory(bridge, args.bodies))
        ids, _ = drain(sink, sender, within=300)
        stats = sink.stats()
        code = bridge.stop()
    finally:
        if bridge.proc and bridge.proc.poll() is None:
            bridge.kill()
        sink.stop()
        if schema is not None:
            drop_postgres_schema(args.database_url, schema)
    expected = {event_id_of(sender.run, n) for n in sender.acknowledged}
    counted = Counter(ids)
    lost = len(expected - set(ids))
    duplicated = sum(c - 1 for c in counted.values() if c > 1)
    print(f"millimetric-bridge chaos run, {backend} ({database_url})")
    print("\n".join(report))
    print(f"  bridge starts {bridge.starts}; the last stop (SIGTERM) exited with {code}")
    print(f"deliveries acknowledged:        {len(sender.acknowledged)}")
    print(f"lost:                           {lost}")
    print(f"duplicated at the sink:         {duplicated}")
    print(f"resends deduplicated by sink:   {stats['duplicates']}")
    print(f"kills survived:                 {kills}")
    print(f"hostile inputs tried:           {tried}")
    print(f"hostile inputs answered 5xx:    {fives}")
    print(f"deliveries given up (4xx):      {sender.gave_up}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if lost or duplicated or fives or sender.gave_up or code else 0


if __name__ == "__main__":
    sys.exit(main())
