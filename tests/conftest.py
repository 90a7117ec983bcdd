"""Shared fixtures: real servers on loopback ports, never fakes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
import uvicorn

from bridge.sink import SinkState, create_sink_app
from bridge.store import Store, open_store
from bridge.store.postgres import PostgresStore, redacted
from bridge.store.sqlite import SQLiteStore

#: The server PostgreSQL tests run on; each test gets a schema of its own in it.
POSTGRES_URL = os.environ.get(
    "BRIDGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under BRIDGE_REQUIRE_POSTGRES=1 (CI) a PostgreSQL test that skips, for any reason,
    fails: CI must have run it for real."""
    report = yield
    if (
        report.skipped
        and item.get_closest_marker("postgres") is not None
        and os.environ.get("BRIDGE_REQUIRE_POSTGRES") == "1"
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"a PostgreSQL test skipped under BRIDGE_REQUIRE_POSTGRES=1: {report.longrepr}"
        )
    return report


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def subscription_event(
    n: str, *, customer: str = "cus_test", metadata: dict[str, str] | None = None, **extra: Any
) -> bytes:
    """A live Stripe event, unsigned, that becomes exactly one call: the track
    `subscription_started:sub_<n>` (event `evt_<n>`); `metadata` goes on the subscription,
    `extra` adds top-level fields."""
    subscription: dict[str, Any] = {
        "id": f"sub_{n}",
        "object": "subscription",
        "customer": customer,
        "status": "active",
    }
    if metadata is not None:
        subscription["metadata"] = metadata
    return msgspec.json.encode(
        {
            "id": f"evt_{n}",
            "object": "event",
            "type": "customer.subscription.created",
            "livemode": True,
            "created": int(time.time()),
            "data": {"object": subscription},
            **extra,
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """A uvicorn server for an ASGI app, in a thread of this process, on a free port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="on",
            )
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()  # for tests that reach into the app
        await self.server.serve()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ServeProcess:
    """A `millimetric-bridge serve` process: its port, URL, process and log file."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = proc
        self.log = log

    def logged(self, event: str) -> int:
        """How many of its log lines are `event`."""
        lines = [msgspec.json.decode(line) for line in self.log.read_bytes().splitlines()]
        return sum(1 for line in lines if line.get("event") == event)


@contextlib.contextmanager
def serve_process(sink: RunningSink, db: Path, secret: str, **env: str) -> Iterator[ServeProcess]:
    """A real `serve` process on the SQLite file `db`, Stripe signed with `secret`,
    forwarding to `sink`, once it answers /healthz; stopped with SIGTERM, as a platform
    stops it. Its output goes to a log file beside `db`."""
    port = free_port()
    log = db.parent / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [Path(sys.executable).parent / "millimetric-bridge", "serve"],
            env={
                **os.environ,
                "MILLIMETRIC_KEY": "sk_dev_local_bridge",
                "MILLIMETRIC_HOST": sink.url,
                "BRIDGE_DATABASE_URL": f"sqlite:///{db}",
                "STRIPE_WEBHOOK_SECRET": secret,
                "PORT": str(port),
                "BRIDGE_HOST": "127.0.0.1",
                **env,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ServeProcess(port, proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"serve exited at start-up: {log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve did not answer /healthz"
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


class RunningSink:
    def __init__(self, url: str, state: SinkState) -> None:
        self.url = url
        self.state = state

    def events(self) -> list[dict[str, Any]]:
        """The calls the sink holds now, in order, each with its route."""
        events = httpx.get(f"{self.url}/_sink/events").json()["events"]
        return [{"route": e["route"], **e["body"]} for e in events]

    def stats(self) -> dict[str, Any]:
        found: dict[str, Any] = httpx.get(f"{self.url}/_sink/stats").json()
        return found

    def arrived(self, count: int, within: float = 10) -> list[dict[str, Any]]:
        """Wait until the sink holds `count` calls, then return them in order (with their
        route), once anything more would have shown."""
        deadline = time.monotonic() + within
        while len(events := self.events()) < count:
            assert time.monotonic() < deadline, f"{len(events)} of {count} calls arrived"
            time.sleep(0.05)
        time.sleep(0.3)  # anything more would show now
        return self.events()


@pytest.fixture
def sink() -> Iterator[RunningSink]:
    """The real local Millimetric sink, served over HTTP on a free loopback port."""
    state = SinkState()
    with ServerThread(create_sink_app(state)) as server:
        yield RunningSink(server.url, state)


@functools.cache
def _postgres_problem() -> str | None:
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return None
    except psycopg.Error as error:
        return f"PostgreSQL is not reachable at {redacted(POSTGRES_URL)}: {error}".strip()


def postgres_url() -> str:
    """The test server's URL. With none reachable, the test skips, saying why; under
    BRIDGE_REQUIRE_POSTGRES=1 (CI) it fails instead."""
    problem = _postgres_problem()
    if problem is None:
        return POSTGRES_URL
    hint = " (start one, or point BRIDGE_TEST_POSTGRES_URL at one)"
    if os.environ.get("BRIDGE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{problem}{hint}; BRIDGE_REQUIRE_POSTGRES=1 needs it", pytrace=False)
    pytest.skip(f"{problem}{hint}")


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A database URL whose tables go to a fresh schema, dropped afterwards."""
    base = postgres_url()
    schema = f"bridge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


#: `python -c _LOCKER DB_PATH`: another process holding the SQLite write lock; it prints
#: "locked" once it does, and lets go when its standard input closes.
_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def write_lock_held(db: Path) -> Iterator[None]:
    """Another process holds the SQLite write lock on `db` (as an `outbox` command does
    while it works) until the block ends."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert locker.stdout is not None
        assert locker.stdout.readline() == b"locked\n"
        yield
    finally:
        locker.communicate(b"", timeout=10)


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A `BRIDGE_DATABASE_URL` for an empty store: a temporary SQLite file, or a fresh
    schema on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bridge.db"
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A real, opened store of each backend."""
    opened = open_store(database_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def table_rows(store: Store, query: str) -> list[tuple[Any, ...]]:
    """Rows straight from the store's database, past the Store API (to check erasure)."""
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as db:
            return db.execute(query).fetchall()
    assert isinstance(store, PostgresStore)
    async with await psycopg.AsyncConnection.connect(store.url) as conn:
        cursor = await conn.execute(query.encode())
        return await cursor.fetchall()


def translated(
    database: Path, provider_event_id: str, within: float = 10
) -> tuple[str, str | None]:
    """Wait until the translate stage has taken a stored delivery (SQLite file): its state
    (`translated` or `quarantined`) and the quarantine's reason."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            found = db.execute(
                "SELECT state, reason FROM inbox WHERE provider_event_id = ?",
                (provider_event_id,),
            ).fetchone()
        if found is not None and found[0] != "untranslated":
            return str(found[0]), found[1]
        assert time.monotonic() < deadline, f"{provider_event_id} not translated in time"
        time.sleep(0.02)
