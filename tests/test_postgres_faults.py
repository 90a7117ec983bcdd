"""PostgreSQL failing under a bridge that is taking webhooks, for real.

- The server restarted (a clean fast shutdown, and an immediate one: a crash) while signed
  deliveries stream into a real `serve` process: every delivery acknowledged with a 200
  reaches the sink once, and the bridge takes deliveries and forwards again by itself.
  The restart runs on a private PostgreSQL server of this test's own (initdb into a
  temporary directory), so that tests using the shared one are not disturbed.
- A lock on the inbox held past the store's lock timeout: 503, then the provider's retry
  succeeds and the delivery arrives once.
- The connection pool exhausted: 503 at the pool's timeout, never a hang; then success.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from bench import chaos
from bridge.app import create_app
from bridge.config import load_settings
from bridge.stages import intake
from bridge.store import postgres
from bridge.store.postgres import PostgresStore
from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, ServerThread, free_port, postgres_schema, subscription_event

pytestmark = pytest.mark.postgres

SECRET = "whsec_postgres_faults_secret"


# -- a private PostgreSQL server -------------------------------------------------------------


def _binaries() -> Path | None:
    """The newest PostgreSQL server binaries installed (Debian keeps them off the PATH)."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class PrivateServer:
    """A PostgreSQL server in a directory of its own, on a free port, that the test may
    stop and start. initdb and the server refuse to run as root: as root, they run as the
    `postgres` user (else `nobody`) in a directory that user owns."""

    def __init__(self, binaries: Path, folder: Path) -> None:
        self.binaries = binaries
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(folder, self.user)

    def run(self, program: str, *args: str) -> None:
        command = [str(self.binaries / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{program} {' '.join(args)}: {done.stdout}{done.stderr}"

    def create(self) -> None:
        self.run(
            "initdb",
            *("-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"),
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                "max_connections = 50\n"
                "shared_buffers = 16MB\n"
                "fsync = off\n"  # the OS survives, so a crash of the server loses nothing
            )

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "start")

    def stop(self, mode: str) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def private_postgres() -> Iterator[PrivateServer]:
    """A PostgreSQL server of this test's own; skips (fails under BRIDGE_REQUIRE_POSTGRES=1)
    when the server binaries are not installed."""
    binaries = _binaries()
    if binaries is None:
        pytest.skip("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's tmp_path when root: the server's user must reach its directory.
    folder = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
    server = PrivateServer(binaries, folder)
    try:
        server.create()
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            with contextlib.suppress(AssertionError):
                server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


# -- the server restarted under load ---------------------------------------------------------


async def until(check: Callable[[], bool], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_postgres_restart_under_load_every_acknowledged_delivery_arrives_once(
    private_postgres: PrivateServer, tmp_path: Path, mode: str
) -> None:
    sink = chaos.Sink()
    bridge = chaos.Bridge(private_postgres.url, sink, tmp_path / "bridge.log")
    sender = chaos.Sender(bridge)
    refused_before_restart = 0
    acknowledged_at_restart = 0

    def refused() -> int:
        return sum(n for status, n in sender.statuses.items() if status != "200")

    async def restart() -> None:
        nonlocal refused_before_restart, acknowledged_at_restart
        await until(lambda: len(sender.acknowledged) >= 50)  # under load
        refused_before_restart = refused()
        await asyncio.to_thread(private_postgres.stop, mode)
        await until(lambda: refused() > refused_before_restart)  # the outage was met
        await asyncio.to_thread(private_postgres.start)
        acknowledged_at_restart = len(sender.acknowledged)

    async def under_load() -> None:
        restarting = asyncio.create_task(restart())
        while not restarting.done():
            await sender.stream(0.5, rate=100)
        await restarting
        await sender.stream(1.0, rate=100)  # and after: taken again

    try:
        bridge.start()
        sink.knobs(latency_ms=50)  # batches in flight when the server goes
        chaos.run_async(under_load())
        arrived, _ = chaos.drain(sink, sender, within=60)
        assert bridge.stop() == 0
    finally:
        if bridge.proc is not None and bridge.proc.poll() is None:
            bridge.kill()
        sink.stop()
    assert refused_before_restart == 0  # every refusal came with the outage
    assert sender.gave_up == 0
    assert len(sender.acknowledged) > acknowledged_at_restart  # taken again after it
    expected = {chaos.event_id_of(sender.run, n) for n in sender.acknowledged}
    assert sorted(arrived) == sorted(expected)  # each acknowledged one, once
    print(f"\nrestart -m {mode}: {len(expected)} acknowledged, answers {dict(sender.statuses)}")


# -- a lock held, the pool exhausted (the shared test server, a schema of its own) -----------


def delivery(n: str) -> tuple[bytes, dict[str, str]]:
    """A live Stripe delivery, signed, that becomes `subscription_started:sub_<n>`."""
    body = subscription_event(n, customer="cus_pg")
    return body, sign(stripe, body, SECRET)


def post(url: str, n: str) -> httpx.Response:
    body, headers = delivery(n)
    return httpx.post(f"{url}/webhooks/stripe", content=body, headers=headers, timeout=30)


@contextlib.contextmanager
def served_on_postgres(sink: RunningSink) -> Iterator[tuple[ServerThread, str, PostgresStore]]:
    """The app served on a fresh schema of the test server: the server, the schema's
    database URL and the app's store (opened on the server's loop)."""
    with postgres_schema() as url:
        settings = load_settings(
            {
                "MILLIMETRIC_KEY": "sk_dev_local_bridge",
                "MILLIMETRIC_HOST": sink.url,
                "BRIDGE_DATABASE_URL": url,
                "STRIPE_WEBHOOK_SECRET": SECRET,
            }
        )
        app = create_app(settings)
        with ServerThread(app) as server:
            yield server, url, app.state.store


def arrived_once(sink: RunningSink, event_ids: set[str]) -> None:
    """Wait until the sink holds `event_ids`, then check it holds them once and no other."""
    calls = sink.arrived(len(event_ids))
    assert sorted(call["event_id"] for call in calls) == sorted(event_ids)


def lock_waiters(conn: psycopg.Connection[Any]) -> int:
    """Backends waiting for a lock on the inbox table."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'inbox'::regclass"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_lock_held_past_the_lock_timeout_gives_503_then_the_retry_succeeds(
    sink: RunningSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A group of deliveries waits GROUP_LOCK_TIMEOUT_MS (2 s) for a lock, then each waits
    # alone; the accept deadline (10 s; 3 s here) answers 503 meanwhile. The group's wait is
    # 0.5 s here, so that the groups the deliveries arrive in have all gone alone by then.
    monkeypatch.setattr(intake, "ACCEPT_TIMEOUT", 3.0)
    monkeypatch.setattr(postgres, "GROUP_LOCK_TIMEOUT_MS", 500)
    with served_on_postgres(sink) as (server, url, _):
        assert post(server.url, "pg_before_lock").json()["result"] == "accepted"
        waiting = [f"pg_l{i}" for i in range(postgres.POOL_MAX + 2)]
        with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as watcher:
            locker.execute("LOCK TABLE inbox IN EXCLUSIVE MODE")  # no insert gets in
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(len(waiting)) as pool:
                posted = [pool.submit(post, server.url, n) for n in waiting]
                # Past the group's lock timeout the deliveries wait alone, but never on every
                # pooled connection (a group may wait beside them): the store still answers
                # the rest of the bridge meanwhile.
                deadline = time.monotonic() + 30
                while lock_waiters(watcher) < postgres.ALONE_AT_ONCE:
                    assert time.monotonic() < deadline, "nothing waits alone on the lock"
                    time.sleep(0.05)
                assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
                most = 0
                while not all(answer.done() for answer in posted):
                    most = max(most, lock_waiters(watcher))
                    time.sleep(0.05)
                assert most <= postgres.ALONE_AT_ONCE + 1
                answers = [answer.result() for answer in posted]
            took = time.monotonic() - started
            assert [a.status_code for a in answers] == [503] * len(waiting)
            for answer in answers:
                assert answer.json()["reason"] == "the store did not answer within 3s"
                assert answer.headers["retry-after"]
            assert took >= intake.ACCEPT_TIMEOUT - 0.1
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            locker.rollback()
        # The provider retries: stored once (a delivery that went on waiting after its 503
        # may have been committed first; the retry is then its duplicate).
        for n in waiting:
            assert post(server.url, n).json()["result"] in ("accepted", "duplicate")
        arrived_once(
            sink,
            {f"subscription_started:sub_{n}" for n in ("pg_before_lock", *waiting)},
        )


def test_an_exhausted_pool_gives_503_at_its_timeout_never_a_hang(
    sink: RunningSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool's wait (5 s; 1 s here) is shorter than the accept deadline (10 s): the
    # answer says it was the pool.
    monkeypatch.setattr(postgres, "POOL_TIMEOUT", 1.0)
    assert postgres.POOL_TIMEOUT < intake.ACCEPT_TIMEOUT
    with served_on_postgres(sink) as (server, _, store):
        assert post(server.url, "pg_before_pool").json()["result"] == "accepted"
        assert server.loop is not None
        assert store._pool is not None
        pool = store._pool

        async def take_all() -> list[Any]:
            return [await pool.getconn() for _ in range(postgres.POOL_MAX)]

        held = asyncio.run_coroutine_threadsafe(take_all(), server.loop).result(30)
        try:
            started = time.monotonic()
            refused = post(server.url, "pg_p0")
            took = time.monotonic() - started
            assert refused.status_code == 503
            assert refused.json()["error"] == "store_unavailable"
            assert "no connection to" in refused.json()["reason"]
            assert refused.json()["reason"].endswith("within 1s")
            assert refused.headers["retry-after"]
            assert took >= postgres.POOL_TIMEOUT - 0.1
        finally:

            async def give_back() -> None:
                for conn in held:
                    await pool.putconn(conn)

            asyncio.run_coroutine_threadsafe(give_back(), server.loop).result(30)
        assert post(server.url, "pg_p0").json()["result"] == "accepted"  # the retry
        arrived_once(
            sink, {"subscription_started:sub_pg_before_pool", "subscription_started:sub_pg_p0"}
        )
