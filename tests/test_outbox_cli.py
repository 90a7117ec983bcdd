"""`outbox status / dead / replay / purge` and `forget`, on a real database file."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bridge.cli import main
from bridge.events import Track
from bridge.store import Delivery, open_store


def run(db: Path, *args: str, stdin: str | None = None) -> str:
    result = CliRunner().invoke(
        main, list(args), input=stdin, env={"BRIDGE_DATABASE_URL": f"sqlite:///{db}"}
    )
    assert result.exit_code == 0, result.output
    return result.output


def seed(db: Path, dead: int, pending: int) -> None:
    async def go() -> None:
        store = open_store(f"sqlite:///{db}")
        await store.open()
        now = time.time()
        for i in range(dead + pending):
            await store.accept(
                Delivery(
                    source="stripe" if i % 2 else "shopify",
                    provider_event_id=f"e{i}",
                    received_at=now,
                    raw_body=b"{}",
                    calls=[Track(event="purchase", event_id=f"e{i}", user_id=f"u{i}")],
                )
            )
        rows = await store.claim("track", dead, 1 << 20, now)
        await store.dead_letter([r.id for r in rows], "400 invalid_payload: bad", now)
        await store.set_paused("401 invalid_api_key")
        await store.close()

    asyncio.run(go())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.db"
    seed(path, dead=4, pending=2)
    return path


def test_status(db: Path) -> None:
    out = run(db, "outbox", "status")
    assert "pending      2" in out
    assert "dead         4" in out
    assert "PAUSED: 401 invalid_api_key" in out


def test_dead_lists_reasons(db: Path) -> None:
    out = run(db, "outbox", "dead")
    assert out.count("400 invalid_payload: bad") == 4
    assert "shopify" in out
    assert "stripe" in out


def test_replay_by_id_source_and_all(db: Path) -> None:
    assert run(db, "outbox", "replay", "--id", "1").startswith("1 rows are pending again")
    assert run(db, "outbox", "replay", "--source", "stripe").startswith("2 rows")
    assert run(db, "outbox", "replay", "--all").startswith("1 rows")
    assert "dead         0" in run(db, "outbox", "status")


def test_replay_since(db: Path) -> None:
    assert run(db, "outbox", "replay", "--since", "2026-01-01T00:00:00Z").startswith("4 rows")
    result = CliRunner().invoke(
        main,
        ["outbox", "replay", "--since", "yesterday"],
        env={"BRIDGE_DATABASE_URL": f"sqlite:///{db}"},
    )
    assert result.exit_code == 2
    assert "duration like 2h" in result.output


def test_replay_and_purge_need_a_selection(db: Path) -> None:
    result = CliRunner().invoke(
        main, ["outbox", "replay"], env={"BRIDGE_DATABASE_URL": f"sqlite:///{db}"}
    )
    assert result.exit_code == 2
    assert "say which rows" in result.output


def test_purge_asks_then_deletes(db: Path) -> None:
    assert "4 dead letters deleted" in run(db, "outbox", "purge", "--all", stdin="y\n")
    assert "no dead letters" in run(db, "outbox", "dead")


def test_forget_purges_at_once_and_queues_the_call(db: Path) -> None:
    out = run(db, "forget", "u5")
    assert "forget is queued" in out
    status = run(db, "outbox", "status")
    assert "pending      2" in status  # u5's purchase went, the forget came


def test_a_broken_database_url_is_one_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["outbox", "status"], env={"BRIDGE_DATABASE_URL": "mysql://x"}
    )
    assert result.exit_code == 2  # bad configuration, as for serve
    assert result.output.splitlines() == [
        "millimetric-bridge: BRIDGE_DATABASE_URL: must be sqlite:///PATH or postgresql://..."
    ]
