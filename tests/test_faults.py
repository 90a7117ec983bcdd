"""Faults on both sides of the bridge, served for real.

Millimetric misbehaving (5xx, a 429 storm, slow answers, dropped connections): intake keeps
answering 200 quickly while the outbox grows, and everything drains afterwards, each event
counted once. The store failing (full disk, locked by another process, on a disk gone
read-only): intake answers 503 so the provider retries, never a 200 for what was not
stored, and recovers once the fault clears.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import resource
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from bridge.app import create_app
from bridge.client import build_http_client
from bridge.config import load_settings
from bridge.errors import StoreUnavailable
from bridge.stages import intake
from bridge.stages.forward import ForwarderConfig
from bridge.store import Delivery
from bridge.store import sqlite as sqlite_store
from bridge.store.sqlite import SQLiteStore
from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import (
    RunningSink,
    ServerThread,
    serve_process,
    subscription_event,
    write_lock_held,
)

SECRET = "whsec_faults_secret"


def delivery(n: str, pad: int = 0) -> bytes:
    """A live Stripe delivery that becomes one track call, `subscription_started:sub_<n>`."""
    return subscription_event(n, customer="cus_f", metadata={"pad": "x" * pad} if pad else None)


def post(url: str, body: bytes, timeout: float = 10) -> httpx.Response:
    return httpx.post(
        f"{url}/webhooks/stripe",
        content=body,
        headers=sign(stripe, body, SECRET),
        timeout=timeout,
    )


def wait_for(check: Callable[[], Any], within: float = 20) -> Any:
    deadline = time.monotonic() + within
    while not (found := check()):
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)
    return found


def settings(sink: RunningSink, tmp_path: Path, **forwarder: Any) -> Any:
    base = load_settings(
        {
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
            "STRIPE_WEBHOOK_SECRET": SECRET,
        }
    )
    return msgspec.structs.replace(base, forwarder=ForwarderConfig(**forwarder))


def sink_event_ids(sink: RunningSink) -> list[str]:
    return [msgspec.json.decode(r.body)["event_id"] for r in sink.state.received]


# -- Millimetric faults ----------------------------------------------------------------------

FAULTS = {
    "5xx": {"fail_for_seconds": 0.7, "fail_status": 503},
    "429 storm": {"fail_for_seconds": 0.7, "fail_status": 429},
    "slow answers past the client timeout": {"latency_ms": 700},
    "dropped connections": {"drop_rate": 0.6},
}
FAULT_ANSWERS = {
    "5xx": "batch 503",
    "429 storm": "batch 429",
    "dropped connections": "batch dropped",
}
CALM = {"fail_for_seconds": 0, "latency_ms": 0, "drop_rate": 0, "error_rate": 0}


@pytest.fixture
def quick_bridge(sink: RunningSink, tmp_path: Path) -> Iterator[ServerThread]:
    """Short backoffs and a 0.5 s client timeout, so faults play out in seconds."""
    http = build_http_client(timeout=0.5, connect_timeout=0.5)
    config = settings(sink, tmp_path, backoff_base=0.05, backoff_cap=0.3, linger=0.02)
    with ServerThread(create_app(config, http=http)) as server:
        yield server
        assert server.loop is not None  # the client lives on the server's loop
        asyncio.run_coroutine_threadsafe(http.aclose(), server.loop).result(10)


def timeouts(server: ServerThread) -> float:
    """Sends to Millimetric that timed out, from the bridge's /metrics."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{server.url}/metrics").text.splitlines()
        if line.startswith("bridge_millimetric_answers_total{") and 'status="timeout"' in line
    )


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_intake_stays_fast_through_a_millimetric_fault_and_all_drains(
    quick_bridge: ServerThread, sink: RunningSink, fault: str
) -> None:
    timed_out_before = timeouts(quick_bridge)
    httpx.post(f"{sink.url}/_sink/knobs", json=FAULTS[fault]).raise_for_status()
    sent = [f"{fault[:3]}{i}" for i in range(40)]
    slowest = 0.0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for body in sent[:20]:  # the first half one by one, timing each answer
            started = time.perf_counter()
            assert post(quick_bridge.url, delivery(body)).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
        answers = list(pool.map(lambda n: post(quick_bridge.url, delivery(n)), sent[20:]))
    assert {a.status_code for a in answers} == {200}
    assert slowest < 0.5  # intake does not wait on Millimetric
    httpx.post(f"{sink.url}/_sink/knobs", json=CALM).raise_for_status()

    expected = {f"subscription_started:sub_{n}" for n in sent}
    wait_for(lambda: expected <= sink.state.seen_event_ids)
    ids = sink_event_ids(sink)
    assert sorted(ids) == sorted(expected)  # each counted once; resends were deduplicated
    if fault in FAULT_ANSWERS:  # the fault was met, not dodged
        assert sink.state.answers[FAULT_ANSWERS[fault]] >= 1
    else:  # the forwarder's sends timed out (and were sent again)
        assert timeouts(quick_bridge) > timed_out_before


def test_sink_drop_rate_cuts_the_connection_after_handling(sink: RunningSink) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json={"drop_rate": 1.0}).raise_for_status()
    body = {"events": [{"event": "x", "event_id": "dropped-1"}]}
    auth = {"authorization": "Bearer sk_dev_local_bridge"}
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{sink.url}/v1/batch", json=body, headers=auth)
    assert sink.state.seen_event_ids == {"dropped-1"}  # handled; only the answer was lost
    assert sink.state.answers["batch dropped"] == 1
    httpx.post(f"{sink.url}/_sink/knobs", json={"drop_rate": 0}).raise_for_status()
    assert httpx.post(f"{sink.url}/v1/batch", json=body, headers=auth).json()["duplicates"] == 1


# -- store faults ----------------------------------------------------------------------------


def on_store_connection(app: Any, server: ServerThread, statement: str) -> Any:
    """Run one statement on the store's own connection, on its writer thread: how a test
    makes that connection meet a full disk or give up on a lock sooner."""
    store: SQLiteStore = app.state.store
    assert server.loop is not None

    def run(conn: Any) -> Any:
        return conn.execute(statement).fetchone()

    return asyncio.run_coroutine_threadsafe(store._call(run), server.loop).result(10)


def stored_inbox(db: Path) -> set[str]:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT provider_event_id FROM inbox")}
    finally:
        conn.close()


def test_a_full_disk_gives_503_never_200_and_recovers(sink: RunningSink, tmp_path: Path) -> None:
    app = create_app(settings(sink, tmp_path))
    with ServerThread(app) as server:
        assert post(server.url, delivery("before")).status_code == 200
        (pages,) = on_store_connection(app, server, "PRAGMA page_count")
        on_store_connection(app, server, f"PRAGMA max_page_count={pages}")  # no room to grow
        answers = [post(server.url, delivery(f"full{i}", pad=3000)) for i in range(20)]
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {200, 503}  # what still fit in free pages, then refusals
        refused = next(a for a in answers if a.status_code == 503)
        assert refused.headers["retry-after"]
        assert refused.json()["error"] == "store_unavailable"
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # no crash
        on_store_connection(app, server, "PRAGMA max_page_count=1073741823")
        # The provider retries the refused ones: now each is stored, once (none was
        # half-stored before); the ones already stored are recognised.
        again = [post(server.url, delivery(f"full{i}", pad=3000)) for i in range(20)]
        assert [r.json()["result"] for r in again] == [
            "duplicate" if s == 200 else "accepted" for s in statuses
        ]
        wait_for(lambda: len(sink.state.seen_event_ids) == 21)
    assert stored_inbox(tmp_path / "bridge.db") == {"evt_before"} | {
        f"evt_full{i}" for i in range(20)
    }


def test_a_database_locked_by_another_process_gives_503_then_recovers(
    sink: RunningSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Give up on the lock after 0.3 s rather than 5 s, so the test takes a second.
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 300, raising=False)
    db = tmp_path / "bridge.db"
    app = create_app(settings(sink, tmp_path))
    with ServerThread(app) as server:
        assert post(server.url, delivery("unlocked")).status_code == 200
        on_store_connection(app, server, "PRAGMA busy_timeout=300")
        with write_lock_held(db):
            refused = post(server.url, delivery("locked"))
            assert refused.status_code == 503
            assert "locked" in refused.json()["reason"]
            assert httpx.get(f"{server.url}/readyz").status_code == 503
        assert post(server.url, delivery("locked")).json()["result"] == "accepted"
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        wait_for(lambda: len(sink.state.seen_event_ids) == 2)  # the forwarder lived through it
    assert stored_inbox(db) == {"evt_unlocked", "evt_locked"}


def test_a_store_slower_than_the_deadline_gives_503_and_the_retry_is_a_duplicate(
    sink: RunningSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock is held for longer than the deadline but less than the writer's busy
    # timeout: the delivery is answered 503 in time, then stored once the lock goes.
    monkeypatch.setattr(intake, "ACCEPT_TIMEOUT", 0.5)
    db = tmp_path / "bridge.db"
    app = create_app(settings(sink, tmp_path))
    with ServerThread(app) as server:
        with write_lock_held(db):
            started = time.monotonic()
            late = post(server.url, delivery("late"))
            assert time.monotonic() - started < 3
            assert late.status_code == 503
            assert late.json()["reason"] == "the store did not answer within 0.5s"
        wait_for(lambda: stored_inbox(db) == {"evt_late"})
        assert post(server.url, delivery("late")).json()["result"] == "duplicate"
        wait_for(lambda: sink_event_ids(sink) == ["subscription_started:sub_late"])


@pytest.mark.anyio
async def test_the_deadline_tells_its_own_expiry_from_a_cancelled_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request cancelled while it waits (the server shutting down) stays cancelled; one
    # that outwaits the deadline is StoreUnavailable (503); one answered in time is left be.
    monkeypatch.setattr(intake, "ACCEPT_TIMEOUT", 0.5)
    store = SQLiteStore(tmp_path / "bridge.db")
    await store.open()
    try:
        with write_lock_held(tmp_path / "bridge.db"):
            deadline = intake._accept_deadline()
            cancelled = asyncio.create_task(deadline.run(store.accept(stored("evt_cancelled"))))
            await asyncio.sleep(0.1)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5s"):
                await deadline.run(store.accept(stored("evt_expired")))
            current = asyncio.current_task()
            assert current is not None
            assert current.cancelling() == 0  # the expiry's cancellation taken back
        # Answered in time, a request lives on past the deadline without being cancelled.
        assert await deadline.run(store.accept(stored("evt_in_time"))) == "accepted"
        await asyncio.sleep(0.5 + 2 * intake._SWEEP_EVERY)
    finally:
        await store.close()


def stored(event_id: str) -> Delivery:
    return Delivery(source="stripe", provider_event_id=event_id, received_at=time.time())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, when this machine lets us mount one (root in a container does).
    Under BRIDGE_REQUIRE_TMPFS=1 (CI, which runs as root) a failed mount fails the test
    rather than skipping it; without privileges, the RLIMIT_FSIZE test above still runs."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
        )
        problem = made.stderr.decode().strip() if made.returncode else ""
    except OSError as error:  # no mount command at all
        problem = str(error)
    if problem:
        if os.environ.get("BRIDGE_REQUIRE_TMPFS") == "1":
            pytest.fail(f"cannot mount a tmpfs, BRIDGE_REQUIRE_TMPFS=1: {problem}", pytrace=False)
        pytest.skip(f"cannot mount a tmpfs here: {problem}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(fd: int) -> OSError:
    """Write until the disk is full; the error that said so."""
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as error:
        return error
    raise AssertionError("the disk never filled")


def test_a_real_full_disk_gives_503_then_recovers(sink: RunningSink, small_disk: Path) -> None:
    app = create_app(settings(sink, small_disk))
    with ServerThread(app) as server:
        assert post(server.url, delivery("roomy")).status_code == 200
        filler = small_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            full = fill(fd)
        finally:
            os.close(fd)
        assert full.errno == errno.ENOSPC
        answers = [post(server.url, delivery(f"fill{i}", pad=50_000)) for i in range(10)]
        statuses = [a.status_code for a in answers]
        assert 503 in statuses
        assert set(statuses) <= {200, 503}
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        filler.unlink()  # space again: the provider's retries are stored, once
        again = [post(server.url, delivery(f"fill{i}", pad=50_000)) for i in range(10)]
        assert [a.json()["result"] for a in again] == [
            "duplicate" if s == 200 else "accepted" for s in statuses
        ]
        wait_for(lambda: len(sink.state.seen_event_ids) == 11)
    assert stored_inbox(small_disk / "bridge.db") == {"evt_roomy"} | {
        f"evt_fill{i}" for i in range(10)
    }


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="prlimit(2) is Linux's")
def test_files_that_cannot_grow_give_503_then_recover(sink: RunningSink, tmp_path: Path) -> None:
    """The disk refusing the store's writes, without privileges: the `serve` process's
    files may not grow past 32 KiB (RLIMIT_FSIZE, set on it from outside with prlimit), so
    every write past that fails (EFBIG) as it would on a full disk. Deliveries are
    answered 503, never 200; the limit lifted, the provider's retries are stored once."""
    db = tmp_path / "bridge.db"
    with serve_process(sink, db, SECRET) as server:
        proc, url = server.proc, server.url
        assert post(url, delivery("roomy")).status_code == 200
        _, hard = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (32 * 1024, hard))
        try:
            refused = [post(url, delivery(f"big{i}", pad=50_000)) for i in range(5)]
            assert [a.status_code for a in refused] == [503] * 5, refused[0].text
            assert refused[0].json()["error"] == "store_unavailable"
            assert httpx.get(f"{url}/healthz").status_code == 200  # no crash
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        again = [post(url, delivery(f"big{i}", pad=50_000)) for i in range(5)]
        assert [a.json()["result"] for a in again] == ["accepted"] * 5
        wait_for(lambda: len(sink.state.seen_event_ids) == 6)
    assert stored_inbox(db) == {"evt_roomy"} | {f"evt_big{i}" for i in range(5)}


@pytest.mark.anyio
async def test_a_database_path_that_cannot_exist_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    store = SQLiteStore(tmp_path / "a-file" / "data" / "bridge.db")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await store.open()
