"""Erasure, checked on disk: after a forget, no table, no column and no byte of the SQLite
file or its WAL names the user, and nothing about them is forwarded again, even when a
later webhook mentions them."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from bridge.app import create_app
from bridge.cli import main as cli_main
from bridge.config import load_settings
from bridge.events import Purge, Track
from bridge.store import Delivery, Store
from bridge.store import sqlite as sqlite_store
from bridge.store.sqlite import SQLiteStore
from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, ServerThread, translated

SECRET = "whsec_erasure_secret"
TOKEN = "erasure-admin-token-0123456789"
RELAY_KEY = "sk_erasure_relay_key"
CHECKOUT = Path(__file__).parent / "fixtures" / "stripe" / "checkout.session.completed.json"


def checkout(n: str, user: str, email: str) -> bytes:
    event = msgspec.json.decode(CHECKOUT.read_bytes())
    event["id"] = f"evt_erasure_{n}"
    event["livemode"] = True
    event["data"]["object"].update(
        id=f"cs_{n}",
        mode="payment",
        payment_status="paid",
        payment_intent=f"pi_{n}",
        client_reference_id=user,
        customer=f"cus_{n}",
        customer_email=email,
        metadata={"note": f"bought by {user}"},
    )
    event["data"]["object"]["customer_details"]["email"] = email
    return msgspec.json.encode(event)


INVOICE = Path(__file__).parent / "fixtures" / "stripe" / "invoice.paid.json"


def invoice(n: str, customer: str, email: str) -> bytes:
    """A renewal's invoice: it names the Stripe customer and their e-mail, never the app's
    user id."""
    event = msgspec.json.decode(INVOICE.read_bytes())
    event["id"] = f"evt_erasure_{n}"
    event["livemode"] = True
    event["data"]["object"].update(
        id=f"in_{n}", customer=customer, customer_email=email, customer_name=f"Name {n}"
    )
    return msgspec.json.encode(event)


def customer_deleted(n: str, customer: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": f"evt_erasure_{n}",
            "object": "event",
            "type": "customer.deleted",
            "livemode": True,
            "created": int(time.time()),
            "data": {"object": {"id": customer, "object": "customer"}},
        }
    )


def post(server: ServerThread, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}/webhooks/stripe", content=body, headers=sign(stripe, body, SECRET)
    )


def wait_for(check: Callable[[], Any], within: float = 15) -> Any:
    deadline = time.monotonic() + within
    while not (found := check()):
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)
    return found


def sink_bodies(sink: RunningSink) -> list[bytes]:
    return [msgspec.json.encode(r.body) for r in sink.state.received]


def mentions_in_rows(db: Path, needle: str) -> list[str]:
    """Every table, every column, every row: where `needle` appears (text or blob)."""
    conn = sqlite3.connect(db)
    try:
        found = []
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            for row in conn.execute(f"SELECT * FROM {table}"):  # noqa: S608 (names from the file)
                for column, value in zip(columns, row, strict=True):
                    raw = value.encode() if isinstance(value, str) else value
                    if isinstance(raw, bytes) and needle.encode() in raw:
                        found.append(f"{table}.{column}")
        return found
    finally:
        conn.close()


def mentions_on_disk(db: Path, needle: str) -> list[str]:
    """The raw bytes of the database, its WAL and shared memory: deleted content that
    SQLite left in free pages or old WAL frames counts as still stored."""
    return [
        path.name
        for path in db.parent.glob(db.name + "*")
        if path.is_file() and needle.encode() in path.read_bytes()
    ]


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[ServerThread]:
    (tmp_path / "bridge.toml").write_text("[sources.stripe]\nforget_on_customer_deleted = true\n")
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "BRIDGE_ADMIN_TOKEN": TOKEN,
        "BRIDGE_RELAY_KEYS": RELAY_KEY,
    }
    with ServerThread(create_app(load_settings(env))) as server:
        yield server


def forget_by_admin(server: ServerThread, user: str, _n: str) -> None:
    answer = httpx.post(
        f"{server.url}/admin/forget",
        json={"user_id": user},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 202


def forget_by_cli(server: ServerThread, user: str, _n: str) -> None:
    db = Path(server.server.config.app.state.settings.sqlite_path)
    result = CliRunner().invoke(
        cli_main, ["forget", user], env={"BRIDGE_DATABASE_URL": f"sqlite:///{db}"}
    )
    assert result.exit_code == 0, result.output


def forget_by_relay(server: ServerThread, user: str, _n: str) -> None:
    answer = httpx.post(
        f"{server.url}/v1/forget",
        json={"user_id": user},
        headers={"authorization": f"Bearer {RELAY_KEY}"},
    )
    assert answer.json() == {"ok": True}


def forget_by_customer_deleted(server: ServerThread, _user: str, n: str) -> None:
    assert post(server, customer_deleted(f"{n}_deleted", f"cus_{n}")).status_code == 200


@pytest.mark.parametrize(
    "forget",
    [forget_by_admin, forget_by_cli, forget_by_relay, forget_by_customer_deleted],
    ids=lambda f: f.__name__,
)
def test_forget_leaves_no_trace_on_disk_and_nothing_more_is_sent(
    bridge: ServerThread, sink: RunningSink, tmp_path: Path, forget: Callable[..., None]
) -> None:
    db = tmp_path / "bridge.db"
    user, email = "usr_ErAsE9", "erase.me@example.org"
    renewal_email = "renewal.only@example.org"  # in the invoice alone, beside no user id
    # Two purchases by the user (one sent before the forget, one pending at forget time
    # while Millimetric is down), a renewal invoice of their Stripe customer that never
    # names the app's user id, and one purchase by someone else, who must be kept.
    assert post(bridge, checkout("a1", user, email)).status_code == 200
    wait_for(lambda: any(user.encode() in b for b in sink_bodies(sink)))
    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_for_seconds": 1.0}).raise_for_status()
    assert post(bridge, checkout("a2", user, email)).status_code == 200
    assert post(bridge, invoice("a1r", "cus_a1", renewal_email)).status_code == 200
    assert mentions_in_rows(db, renewal_email)
    assert post(bridge, checkout("k1", "usr_keep", "keep@example.org")).status_code == 200

    forget(bridge, user, "a1")

    wait_for(lambda: sink.state.answers["forget 202"] == 1)
    forgot_at = len(sink.state.received)
    # A later webhook about the user is taken (the provider must not retry it) but kept
    # nowhere and sent nowhere; one about someone else, after it, shows the pipe is open.
    assert post(bridge, checkout("a3", user, email)).status_code == 200
    assert post(bridge, checkout("k2", "usr_keep2", "keep2@example.org")).status_code == 200
    wait_for(lambda: any(b"usr_keep2" in b for b in sink_bodies(sink)))

    after = sink_bodies(sink)[forgot_at:]
    assert not [b for b in after if user.encode() in b or email.encode() in b]
    assert any(b"usr_keep" in b for b in sink_bodies(sink))
    gone = (user, email, renewal_email)
    wait_for(lambda: not any(mentions_in_rows(db, needle) for needle in gone))
    assert mentions_in_rows(db, "usr_keep2")  # the scan does find what is kept
    # The late delivery was stored raw before its translation found the user forgotten;
    # the translate stage then erased it, WAL included.
    wait_for(lambda: not any(mentions_on_disk(db, needle) for needle in gone))


def pending_bodies(db: Path) -> list[bytes]:
    with sqlite3.connect(db) as conn:
        return [b for (b,) in conn.execute("SELECT body FROM outbox WHERE state = 'pending'")]


def test_forgetting_a_short_id_keeps_other_users_calls_and_payloads(
    bridge: ServerThread, sink: RunningSink, tmp_path: Path
) -> None:
    """`forget 1` once took pending calls from 4 to 1: every body holding `"quantity":1`
    or a `1` between punctuation was taken for the user's."""
    db = tmp_path / "bridge.db"
    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_for_seconds": 30.0}).raise_for_status()
    for n, user in (("s1", "1"), ("s2", "usr_2"), ("s3", "usr_3"), ("s4", "usr_4")):
        assert post(bridge, checkout(n, user, f"{n}@example.org")).status_code == 200
        assert translated(db, f"evt_erasure_{n}") == ("translated", None)

    def users() -> list[str]:  # each purchase is an identify and a track
        return sorted(msgspec.json.decode(b)["user_id"] for b in pending_bodies(db))

    assert users() == ["1", "1", "usr_2", "usr_2", "usr_3", "usr_3", "usr_4", "usr_4"]
    forget_by_cli(bridge, "1", "")
    assert users() == ["1", "usr_2", "usr_2", "usr_3", "usr_3", "usr_4", "usr_4"]  # 1: forget
    for n in ("s2", "s3", "s4"):  # their raw payloads too
        assert mentions_in_rows(db, f"{n}@example.org") == ["inbox.raw_body"]
    assert mentions_in_rows(db, "s1@example.org") == []


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_a_blank_user_id_is_refused_and_erases_nothing(
    bridge: ServerThread, sink: RunningSink, tmp_path: Path, blank: str
) -> None:
    """An unset shell variable (`forget "$USER"`) once erased every raw payload."""
    db = tmp_path / "bridge.db"
    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_for_seconds": 30.0}).raise_for_status()
    assert post(bridge, checkout("b1", "usr_b1", "b1@example.org")).status_code == 200
    assert translated(db, "evt_erasure_b1") == ("translated", None)
    before = (pending_bodies(db), mentions_in_rows(db, "b1@example.org"))
    result = CliRunner().invoke(
        cli_main, ["forget", blank], env={"BRIDGE_DATABASE_URL": f"sqlite:///{db}"}
    )
    assert result.exit_code == 2
    assert "must not be empty or blank" in result.output
    answer = httpx.post(
        f"{bridge.url}/admin/forget",
        json={"user_id": blank},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 400
    assert (pending_bodies(db), mentions_in_rows(db, "b1@example.org")) == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM forgotten").fetchone() == (0,)


MARKER = "shop-owner-note-5521"
SHOP_REDACT = Purge(deliveries="shop1.myshopify.com:", users="shopify:shop1.myshopify.com:")


async def shop_orders_then_redact(store: SQLiteStore, redact_id: str = "1") -> None:
    for n in range(3):
        await store.accept(
            Delivery(
                source="shopify",
                provider_event_id=f"shop1.myshopify.com:orders/paid:{redact_id}-{n}",
                received_at=time.time(),
                raw_body=msgspec.json.encode({"id": n, "note": MARKER}),
                calls=[Track(event="purchase", user_id="shopify:shop1.myshopify.com:9")],
            )
        )
    assert mentions_on_disk(store.path, MARKER)  # what the purge has to remove
    redact = Delivery(
        source="shopify",
        provider_event_id=f"shop1.myshopify.com:shop/redact:{redact_id}",
        received_at=time.time(),
        calls=[SHOP_REDACT],
    )
    assert await store.accept(redact) == "accepted"


@pytest.mark.anyio
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_purge_leaves_no_trace_of_its_deliveries_on_disk(store: Store) -> None:
    """Shopify's shop/redact becomes a `Purge`: the shop's raw payloads must be gone from
    the file and from the WAL's old frames too, not only from the rows."""
    assert isinstance(store, SQLiteStore)
    await shop_orders_then_redact(store)
    assert mentions_in_rows(store.path, MARKER) == []
    assert mentions_on_disk(store.path, MARKER) == []


@pytest.mark.anyio
async def test_a_purge_blocked_by_a_reader_is_logged_and_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader in another process (an `outbox` command) can keep the WAL from being
    truncated: the purge is still stored, the failure is logged, and the next one finishes
    the job."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)
    store = SQLiteStore(tmp_path / "bridge.db")
    await store.open()
    try:
        reader = sqlite3.connect(store.path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM inbox").fetchone()  # holds its snapshot
        with capture_logs() as lines:
            await shop_orders_then_redact(store)
        assert [line["event"] for line in lines] == ["checkpoint after an erasure failed"]
        assert mentions_in_rows(store.path, MARKER) == []
        assert mentions_on_disk(store.path, MARKER) == ["bridge.db-wal"]
        reader.close()
        await shop_orders_then_redact(store, redact_id="2")
        assert mentions_on_disk(store.path, MARKER) == []
    finally:
        await store.close()
