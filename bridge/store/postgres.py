"""The PostgreSQL outbox store: several bridge instances on one database, one forwarding.

Driver: psycopg 3 with psycopg_pool. It is the maintained successor of psycopg2, async
native, and fully typed, so mypy strict checks every call here without stubs (asyncpg is
faster per round trip but untyped; per webhook the bridge's cost is Python CPU in the
framework, not the driver: see PERF-NOTES).

- Every operation is one transaction on a pooled connection. `accept` of a redelivery
  racing its twin waits on the inbox's unique key and then says `duplicate`; a
  transaction the server rolled back (a deadlock between two accepts that learn the same
  identities) runs again.
- Group commit: deliveries that only read what is known about their users (tracks, such
  as a purchase by a provider's customer, and identifies of a user id: most of them) are
  accepted together, one transaction and a handful of statements for every one waiting,
  each caller answered after that commit; one that links, aliases or forgets is its own.
  The driver's round trips, not the server, were the cost: about 460 us of the event
  loop's CPU per accept one by one. A group the database refuses, or one held up past
  2 s by a row lock (a twin mid-commit elsewhere), is run again one delivery at a time,
  so that delivery fails or waits alone; when the database is out of reach, every
  caller waiting hears it at once.
- Migrations are numbered SQL files, applied in one transaction under an advisory lock,
  so instances starting together apply each once; a database newer than the code is
  refused.
- Leadership: the forwarder holds a session advisory lock on a dedicated connection (not
  from the pool), with TCP keepalives on both ends. The other instances take webhooks
  and try the lock every second. A leader that dies closes its connection, the server
  drops the lock, and another instance leads within a second or two (about 15 s when the
  leader's machine vanishes without closing its socket). The new leader makes the rows
  its predecessor had claimed due again. The leader checks its lock connection every
  second and stops forwarding when it fails (`lost`).
- Claims take rows `FOR UPDATE SKIP LOCKED` and hold them for a lease: a claimed row is
  due again when its lease runs out, whoever claimed it.

Lock keys are derived from the schema the tables live in, so two bridges in two schemas
of one database neither share a leader nor wait for each other's migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Final, TypeVar

import msgspec
import psycopg
import structlog
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap
from psycopg.rows import TupleRow
from psycopg.types.string import StrDumper, StrDumperUnknown, TextLoader
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from bridge.database_url import redacted, scrubbed
from bridge.errors import ConfigError, StoreUnavailable
from bridge.events import Forget, ForgetVisitor, Purge
from bridge.store import (
    BACKLOG_SQL,
    DELIVERED_SQL,
    ERASED_REASON,
    AcceptResult,
    Backlog,
    DeadLetter,
    Delivery,
    OutboxRow,
    OutboxStats,
    Retention,
    Route,
    Selection,
    StoredDelivery,
    Translation,
    backlog_of,
    declared,
    hash_subject,
    links,
    named,
    quarantined_letter,
    route_of,
    settle,
    stored_delivery,
    subject_of,
    visitor_of,
    with_event_id,
)
from bridge.store.identity import (
    Known,
    Plan,
    Planned,
    Row,
    plan,
    plannable,
    quarantined_names,
    segments,
    wanted,
)

__all__ = ["PostgresStore", "redacted"]

T = TypeVar("T")
Cursor = psycopg.AsyncCursor[TupleRow]
Connection = psycopg.AsyncConnection[TupleRow]

log = structlog.get_logger("bridge.store")

#: How long a claim lasts before the row is due again (a crashed send is retried).
LEASE_SECONDS: Final = 900.0
#: Rows a retention pass deletes per transaction, so intake is never stalled for long.
CLEANUP_CHUNK: Final = 5000
#: How often a standby instance tries the leader lock, and the leader checks it still has it.
LEADER_POLL: Final = 1.0
#: A lock check that takes longer than this means the lock connection is gone.
LOCK_CHECK_TIMEOUT: Final = 3.0
#: How long a request waits for a pooled connection before the store counts as unavailable.
POOL_TIMEOUT: Final = 5.0
POOL_MIN: Final = 2
POOL_MAX: Final = 10
#: Most deliveries one group commit takes.
MAX_GROUP: Final = 256
#: How long a group waits for a row lock before its deliveries go one at a time.
GROUP_LOCK_TIMEOUT_MS: Final = 2000
#: A transaction the server rolled back (deadlock, serialization) is run again this often.
TRIES: Final = 3
# -- text PostgreSQL cannot hold --------------------------------------------------------------
#
# PostgreSQL's text cannot contain NUL, and ids come from what visitors control (a cart
# attribute, checkout metadata): a NUL there made the server refuse the delivery, a 503
# the provider retried for ever. Every text value goes through one reversible escape on
# its way in and out, so such an id is stored and compared faithfully, as on SQLite.
# U+FFFF is a noncharacter: no real id uses it, so stored values read the same as before.
_ESCAPE: Final = "\uffff"


def _escaped(text: str) -> str:
    if "\x00" not in text and _ESCAPE not in text:
        return text
    return text.replace(_ESCAPE, _ESCAPE * 2).replace("\x00", _ESCAPE + "0")


def _unescaped(text: str) -> str:
    if _ESCAPE not in text:
        return text
    out, pairs = [], iter(text)
    for char in pairs:
        if char == _ESCAPE:
            char = next(pairs, "")
            out.append("\x00" if char == "0" else char)
        else:
            out.append(char)
    return "".join(out)


class _TextDumper(StrDumper):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(_escaped(obj))


class _StrDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(_escaped(obj))


class _TextLoader(TextLoader):
    def load(self, data: Buffer) -> bytes | str:
        text = super().load(data)  # bytes only from a database in SQL_ASCII
        return _unescaped(text) if isinstance(text, str) else text


_ADAPTERS: Final = AdaptersMap(psycopg.adapters)
for _dumper in (_TextDumper, _StrDumper):  # in psycopg's order: the last is the default
    _ADAPTERS.register_dumper(str, _dumper)
_ADAPTERS.register_loader("text", _TextLoader)

#: libpq options for every connection: fail fast, and notice a dead peer.
CONNECT: Final[dict[str, Any]] = {
    "context": _ADAPTERS,
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "application_name": "millimetric-bridge",
}
#: The server side of the lock connection's keepalives: it drops a vanished leader's lock.
_SERVER_KEEPALIVES: Final = (
    "SELECT set_config('tcp_keepalives_idle', '5', false),"
    " set_config('tcp_keepalives_interval', '2', false),"
    " set_config('tcp_keepalives_count', '3', false)"
)

_encoder: Final = msgspec.json.Encoder()
_forget_decoder: Final = msgspec.json.Decoder(Forget)


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("bridge.store.migrations").joinpath("postgres")
    found = []
    for entry in folder.iterdir():
        number, _, _ = entry.name.partition("_")
        if entry.name.endswith(".sql") and number.isdigit():
            found.append((int(number), entry.read_text()))
    return sorted(found)


def _lock_key(purpose: str, schema: str) -> int:
    digest = hashlib.sha256(f"millimetric-bridge {purpose}\x00{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresStore:
    """`Store` on a PostgreSQL database (the schema its URL's search_path selects)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: AsyncConnectionPool[Connection] | None = None
        #: The advisory lock the forwarding instance holds (pg_locks shows who leads).
        self.leader_key = 0
        self._leader: Connection | None = None  # holds the leader lock while we lead
        self._candidate: Connection | None = None  # tries the lock while we stand by
        self._watch: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._lost.set()  # not leading yet
        self._released = False  # claims of the previous leader released in this term
        #: Simple deliveries waiting for the next group commit, and the task committing.
        self._waiting: list[tuple[Delivery, asyncio.Future[AcceptResult]]] = []
        self._grouping: asyncio.Task[None] | None = None
        self._alone: set[asyncio.Task[None]] = set()  # a failed group's, one at a time
        self._lost_at = -LEADER_POLL * 2  # monotonic time the lock connection last failed

    # -- connections -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`fn(cursor, *args)` in one transaction on a pooled connection."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        for attempt in itertools.count(1):
            try:
                async with self._pool.connection() as conn, conn.cursor() as cursor:
                    return await fn(cursor, *args)
            except psycopg.errors.TransactionRollback as error:
                if attempt >= TRIES:
                    raise StoreUnavailable(f"postgresql: {error}") from error
            except PoolTimeout as error:
                raise StoreUnavailable(
                    f"postgresql: no connection to {redacted(self.url)} within {POOL_TIMEOUT:g}s"
                ) from error
            except psycopg.Error as error:
                raise StoreUnavailable(f"postgresql: {error}") from error
        raise AssertionError("unreachable")  # pragma: no cover

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        # One direct connection first: an unreachable server fails start-up at once, with
        # libpq's reason, instead of after the pool's retries.
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **CONNECT)
            async with conn, conn.cursor() as cursor:
                schema = await _schema(cursor)
                await _migrate(cursor, _lock_key("migrations", schema))
        except psycopg.Error as error:
            raise StoreUnavailable(
                f"postgresql: cannot use {redacted(self.url)}: {scrubbed(str(error), self.url)}"
            ) from None  # the driver's own text may quote pieces of the password
        self.leader_key = _lock_key("forwarder", schema)
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.url,
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            timeout=POOL_TIMEOUT,
            kwargs=CONNECT,
            open=False,
            name="millimetric-bridge",
        )
        try:
            await pool.open(wait=True, timeout=POOL_TIMEOUT)
        except PoolTimeout as error:
            await pool.close()
            raise StoreUnavailable(
                f"postgresql: cannot connect to {redacted(self.url)}: {error}"
            ) from error
        self._pool = pool

    async def close(self) -> None:
        committing = [t for t in (self._grouping, *self._alone) if t is not None]
        if committing:  # answers what is waiting (intake has stopped)
            await asyncio.wait(committing)  # not cancelled with close(), nor raising
        held = (self._leader, self._candidate)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for conn in held:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()  # a closed session holds no lock
        self._leader = self._candidate = None
        self._lost.set()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- leadership ----------------------------------------------------------------------------

    async def recover(self, now: float) -> int:
        if not await self._try_lead():
            return 0  # another instance forwards: its claims are its own
        return await self._release(now)

    async def lead(self) -> int:
        # An instance whose lock connection just failed is the least likely to be healthy:
        # the standbys, polling all along, get the first chance to take over.
        await asyncio.sleep(max(0.0, self._lost_at + 2 * LEADER_POLL - time.monotonic()))
        while not await self._try_lead():  # noqa: ASYNC110 (polling the server's lock)
            await asyncio.sleep(LEADER_POLL)
        return 0 if self._released else await self._release(time.time())

    async def lost(self) -> None:
        await self._lost.wait()

    async def _release(self, now: float) -> int:
        released = await self._run(_release_all_claims, now)
        self._released = True
        return released

    async def _try_lead(self) -> bool:
        if self._leader is not None:
            return True
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            if self._candidate is None or self._candidate.closed:
                self._candidate = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, **CONNECT
                )
                await self._candidate.execute(_SERVER_KEEPALIVES)
            cursor = await self._candidate.execute(
                "SELECT pg_try_advisory_lock(%s)", (self.leader_key,)
            )
            row = await cursor.fetchone()
        except psycopg.Error as error:
            log.warning("leader lock: the database is unreachable; trying again", error=str(error))
            if self._candidate is not None:
                with contextlib.suppress(psycopg.Error):
                    await self._candidate.close()
            self._candidate = None
            return False
        if not row or not row[0]:
            return False
        self._leader, self._candidate = self._candidate, None
        self._released = False
        self._lost = asyncio.Event()
        self._watch = asyncio.create_task(self._keep(self._leader, self._lost), name="leader-lock")
        return True

    async def _keep(self, conn: Connection, lost: asyncio.Event) -> None:
        """Check the lock connection every second; when it fails, leadership is lost."""
        try:
            while True:
                await asyncio.sleep(LEADER_POLL)
                await asyncio.wait_for(conn.execute("SELECT 1"), LOCK_CHECK_TIMEOUT)
        except (psycopg.Error, TimeoutError) as error:
            log.error("leader lock lost with its connection; forwarding stops", error=str(error))
            self._lost_at = time.monotonic()
            with contextlib.suppress(psycopg.Error):
                await conn.close()
        finally:
            if self._leader is conn:
                self._leader = None
            lost.set()

    # -- the Store protocol ----------------------------------------------------------------

    async def erase(self, user_id: str) -> int:
        return await self._run(_erase_linked, hash_subject(user_id), time.time())

    async def accept(self, delivery: Delivery) -> AcceptResult:
        return await self._run(_accept, delivery)

    async def untranslated(self, limit: int) -> list[StoredDelivery]:
        return await self._run(_untranslated, limit)

    async def record(self, translations: Sequence[Translation]) -> None:
        if translations:
            await self._run(_record, translations, time.time())

    async def retranslate(self, selection: Selection) -> int:
        return await self._run(_retranslate, selection)

    async def append(self, delivery: Delivery) -> AcceptResult:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        future: asyncio.Future[AcceptResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((delivery, future))
        if self._grouping is None:
            self._grouping = asyncio.create_task(self._commit_groups())
            self._grouping.add_done_callback(self._grouping_done)
        return await future

    async def _commit_groups(self) -> None:
        """Commit what is waiting, group after group: the deliveries that arrive while one
        group commits make the next."""
        try:
            while self._waiting:
                group = self._waiting[:MAX_GROUP]
                del self._waiting[:MAX_GROUP]
                try:
                    await self._settle_group(group)
                except BaseException:  # cancelled mid-commit: none of its callers waits on
                    for _, future in group:
                        future.cancel()
                    raise
        finally:
            self._grouping = None

    async def _settle_group(
        self, group: list[tuple[Delivery, asyncio.Future[AcceptResult]]]
    ) -> None:
        """Commit one group and answer each of its callers."""
        try:
            outcomes = await self._run(_append_group, [delivery for delivery, _ in group])
        except StoreUnavailable as failure:
            if _unreachable(failure):
                # Every caller waiting hears it now, rather than after a wait of its own.
                for _, future in [*group, *self._waiting]:
                    settle(future, None, StoreUnavailable(str(failure)))
                self._waiting.clear()
                return
            # One at a time, each answered as soon as it is stored: a delivery the
            # database refuses fails alone, and one waiting on a lock held elsewhere (its
            # twin, mid-commit at another instance) holds up no other, nor the next group.
            for delivery, future in group:
                alone = asyncio.create_task(self._accept_alone(delivery, future))
                self._alone.add(alone)
                alone.add_done_callback(self._alone.discard)
            return
        except Exception as error:  # a fault of ours: every caller hears it
            for _, future in group:
                settle(future, None, error)
            return
        for (_, future), outcome in zip(group, outcomes, strict=True):
            settle(future, outcome)

    async def _accept_alone(self, delivery: Delivery, future: asyncio.Future[AcceptResult]) -> None:
        try:
            settle(future, await self._run(_append_one, delivery))
        except Exception as error:
            settle(future, None, error)
        finally:
            future.cancel()  # cancelled itself: its caller waits on no more

    def _grouping_done(self, task: asyncio.Task[None]) -> None:
        """The committing task was cancelled (the loop is shutting down, possibly before it
        ever ran): nobody may wait for ever, and the next accept starts a new one."""
        if self._grouping not in (task, None):
            return  # a newer task commits what is waiting
        if task.cancelled():
            for _, future in self._waiting:
                future.cancel()
            self._waiting.clear()
        self._grouping = None

    async def claim(self, route: Route, limit: int, max_bytes: int, now: float) -> list[OutboxRow]:
        return await self._run(_claim, route, limit, max_bytes, now)

    async def delivered(self, ids: Sequence[int], now: float) -> None:
        if ids:
            await self._run(_delivered, list(ids), now)

    async def retry(self, ids: Sequence[int], next_at: float, *, count_attempt: bool) -> None:
        if ids:
            await self._run(_retry, list(ids), next_at, count_attempt)

    async def dead_letter(self, ids: Sequence[int], reason: str, now: float) -> None:
        if ids:
            await self._run(_dead_letter, list(ids), reason, now)

    async def hasten(self, route: Route, now: float) -> int:
        return await self._run(_execute, _HASTEN, (now, route, now))

    async def backlog(self) -> Backlog:
        return await self._run(_backlog)

    async def stats(self, now: float) -> OutboxStats:
        return await self._run(_stats)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._run(_dead_letters, limit)

    async def replay(self, selection: Selection, now: float) -> int:
        return await self._run(_replay, selection, now)

    async def purge(self, selection: Selection) -> int:
        return await self._run(_purge, selection)

    async def cleanup(self, retention: Retention, now: float) -> dict[str, int]:
        counts = {"delivered": 0, "raw_payloads": 0, "inbox": 0}
        for kind, statement, age in (
            ("delivered", _CLEAN_DELIVERED, retention.delivered),
            ("raw_payloads", _CLEAN_RAW, retention.raw_payloads),
            ("inbox", _CLEAN_INBOX, retention.inbox),
        ):
            while True:  # in chunks, each its own transaction, so intake interleaves
                done = await self._run(_execute, statement, (now - age, CLEANUP_CHUNK))
                counts[kind] += done
                if done < CLEANUP_CHUNK:
                    break
        return counts

    async def set_paused(self, reason: str | None) -> None:
        await self._run(_set_meta, "paused", reason)


# -- the SQL, each function one transaction --------------------------------------------------


async def _one(cur: Cursor, query: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row, or None."""
    await cur.execute(query, params)
    row = await cur.fetchone()
    return row[0] if row else None


async def _schema(cur: Cursor) -> str:
    schema = await _one(cur, "SELECT current_schema()")
    if schema is None:
        raise ConfigError(
            "BRIDGE_DATABASE_URL", "its search_path names no existing schema to create tables in"
        )
    return str(schema)


async def _migrate(cur: Cursor, lock_key: int) -> None:
    await cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
    await cur.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    current = await _one(cur, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    migrations = _migrations()
    latest = migrations[-1][0]
    if current > latest:
        raise ConfigError(
            "BRIDGE_DATABASE_URL",
            f"the database is at schema version {current}, newer than this millimetric-bridge "
            f"knows ({latest}); upgrade the bridge, do not run an older one against it",
        )
    for number, sql in migrations:
        if number > current:
            await cur.execute(sql.encode())  # no parameters: several statements may run
            await cur.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                (number, time.time()),
            )


async def _release_all_claims(cur: Cursor, now: float) -> int:
    """The previous leader is gone: what it had in flight is due again now (Millimetric
    deduplicates those sends by event_id)."""
    await cur.execute(
        "DELETE FROM outbox WHERE state = 'pending' AND claimed AND route != 'forget'"
        " AND subject IN (SELECT subject FROM forgotten)"
    )
    await cur.execute(
        "UPDATE outbox SET claimed = FALSE, next_at = %s WHERE state = 'pending' AND claimed",
        (now,),
    )
    return cur.rowcount


async def _append(cur: Cursor, delivery: Delivery, state: str) -> int | None:
    """The delivery's inbox row; its id, or None for a redelivery."""
    found = await _one(
        cur,
        "INSERT INTO inbox (source, provider_event_id, received_at, raw_body, headers, calls,"
        " state) VALUES (%s, %s, %s, %s, %s, 0, %s)"
        " ON CONFLICT (source, provider_event_id) DO NOTHING RETURNING id",
        (
            delivery.source,
            delivery.provider_event_id,
            delivery.received_at,
            delivery.raw_body,
            _encoder.encode(delivery.headers),
            state,
        ),
    )
    return None if found is None else int(found)


async def _append_one(cur: Cursor, delivery: Delivery) -> AcceptResult:
    return "duplicate" if await _append(cur, delivery, "untranslated") is None else "accepted"


async def _accept(cur: Cursor, delivery: Delivery) -> AcceptResult:
    inbox_id = await _append(cur, delivery, "translated")
    if inbox_id is None:
        return "duplicate"
    planned = Planned(
        inbox_id=inbox_id,
        source=delivery.source,
        provider_event_id=delivery.provider_event_id,
        outputs=delivery.calls,
    )
    if plannable(planned.outputs):
        await _write_plan(cur, [planned], delivery.received_at)
    else:
        await _write_calls(cur, planned, delivery.received_at)
    return "accepted"


async def _untranslated(cur: Cursor, limit: int) -> list[StoredDelivery]:
    # By state, not by a cursor over ids: groups of several instances commit out of id order.
    await cur.execute(
        "SELECT id, source, provider_event_id, received_at, raw_body, headers FROM inbox"
        " WHERE state = 'untranslated' ORDER BY id LIMIT %s",
        (limit,),
    )
    return [stored_delivery(row) for row in await cur.fetchall()]


async def _record(cur: Cursor, translations: Sequence[Translation], now: float) -> None:
    """Mark every delivery of the batch at once (a delivery another translator took in the
    meantime is left to it), then write the calls of those marked translated: planned
    together (`bridge.store.identity`), save that a delivery that erases goes alone, in order."""
    # Pipelined: statements whose results are not read (inserts, updates) go without a
    # round trip each; only the lookups wait for the server.
    async with cur.connection.pipeline():
        await _record_in(cur, translations, now)


async def _record_in(cur: Cursor, translations: Sequence[Translation], now: float) -> None:
    await cur.execute(
        "UPDATE inbox SET state = given.state, reason = given.reason, calls = given.calls"
        " FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::int[])"
        " AS given (id, state, reason, calls)"
        " WHERE inbox.id = given.id AND inbox.state = 'untranslated' RETURNING inbox.id",
        (
            [t.delivery.id for t in translations],
            ["translated" if t.failure is None else "quarantined" for t in translations],
            [t.failure for t in translations],
            [len(t.outputs) for t in translations],
        ),
    )
    claimed = {found for (found,) in await cur.fetchall()}
    for run, alone in segments(translations, claimed):
        await _write_plan(cur, run, now)
        if alone is not None:
            await _write_calls(cur, alone, now)
    if quarantined := quarantined_names(translations, claimed):
        await cur.execute(
            "SELECT subject FROM forgotten WHERE subject = ANY(%s)",
            (sorted(set().union(*quarantined.values())),),
        )
        forgotten = {subject for (subject,) in await cur.fetchall()}
        await _drop_quarantined(cur, [i for i, names in quarantined.items() if names & forgotten])


async def _retranslate(cur: Cursor, selection: Selection) -> int:
    where, params = _deliveries(selection, ["translated", "quarantined"])
    await cur.execute(
        "UPDATE inbox SET state = 'untranslated', reason = NULL WHERE raw_body IS NOT NULL"
        f" AND {where}",
        params,
    )
    return cur.rowcount


def _deliveries(selection: Selection, states: list[str]) -> tuple[str, list[Any]]:
    """The inbox rows a selection names, in `states` (as the SQLite backend's)."""
    clauses = ["state = ANY(%s)"]
    params: list[Any] = [states]
    if selection.ids and not selection.deliveries:
        clauses.append("FALSE")  # calls were named, and no delivery
    if selection.deliveries:
        clauses.append("id = ANY(%s)")
        params.append(list(selection.deliveries))
    if selection.source is not None:
        clauses.append("source = %s")
        params.append(selection.source)
    if selection.since is not None:
        clauses.append("received_at >= %s")
        params.append(selection.since)
    return " AND ".join(clauses), params


async def _write_calls(cur: Cursor, delivery: Planned, now: float) -> None:
    """A delivery that erases, alone (as in the SQLite backend): its links, its erasures
    (`Purge`, `ForgetVisitor`, `Forget`), then its other calls as planned."""
    await _link(cur, [(delivery.inbox_id, links(delivery.outputs))])
    for index, item in enumerate(delivery.outputs):
        forget: Forget | None = None
        if isinstance(item, Purge):
            await _purge_prefixes(cur, delivery.source, item, now)
        elif isinstance(item, ForgetVisitor):
            target = await _target(cur, item.anonymous_id)
            known = await _one(
                cur, "SELECT user_id FROM identities WHERE anonymous_id = %s", (target,)
            )
            if known is not None:
                forget = Forget(user_id=known)
                await _link(cur, [(delivery.inbox_id, {hash_subject(known)})])
            else:  # no user to forget at Millimetric; what is stored about the visitor goes
                visitors = sorted({hash_subject(item.anonymous_id), hash_subject(target)})
                await cur.execute(_DROP_LINKED_RAW, (visitors,))
                await _erase_quarantined(cur, set(visitors))
        elif isinstance(item, Forget):
            forget = item
        if forget is not None:
            await _forget(cur, forget.user_id, declared(delivery.outputs), now)
            _, key = with_event_id(forget, delivery.source, delivery.provider_event_id, index)
            row = Row(inbox_id=delivery.inbox_id, call=forget, event_id=key)
            await _write(cur, Plan(rows=[row]), now)
    await _write_plan(cur, [delivery], now)


def _unreachable(failure: StoreUnavailable) -> bool:
    """Whether the database is out of reach (no connection, or one lost), rather than
    refusing what it was sent: errors the server answers carry an SQLSTATE, and a value
    the driver cannot send is a DataError."""
    cause = failure.__cause__  # PoolTimeout and PoolClosed are OperationalErrors too
    return isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError) and (
        cause.sqlstate is None
    )


async def _append_group(cur: Cursor, deliveries: Sequence[Delivery]) -> list[AcceptResult]:
    """Many deliveries' inbox rows in one statement. They go in key order, so two
    instances' groups take the unique keys in one order and cannot deadlock on them."""
    by_key = sorted(deliveries, key=lambda d: (d.source, d.provider_event_id))
    # A twin's key held by another transaction (another instance mid-commit, or one that
    # vanished) would hold up the whole group: past this, it goes one at a time.
    await cur.execute(f"SET LOCAL lock_timeout = '{GROUP_LOCK_TIMEOUT_MS}ms'")
    await cur.execute(
        "INSERT INTO inbox (source, provider_event_id, received_at, raw_body, headers,"
        " calls, state) SELECT source, provider_event_id, received_at, raw_body, headers, 0,"
        " 'untranslated' FROM unnest(%s::text[], %s::text[], %s::float8[], %s::bytea[],"
        " %s::bytea[]) WITH ORDINALITY AS given (source, provider_event_id, received_at,"
        " raw_body, headers, position) ORDER BY position"
        " ON CONFLICT (source, provider_event_id) DO NOTHING"
        " RETURNING source, provider_event_id",
        (
            [d.source for d in by_key],
            [d.provider_event_id for d in by_key],
            [float(d.received_at) for d in by_key],
            [d.raw_body for d in by_key],
            [_encoder.encode(d.headers) for d in by_key],
        ),
    )
    inserted = {(source, event_id) for source, event_id in await cur.fetchall()}
    results: list[AcceptResult] = []
    for delivery in deliveries:
        key = (delivery.source, delivery.provider_event_id)
        results.append("accepted" if key in inserted else "duplicate")
        inserted.discard(key)  # a twin in the same group: the first is the one inserted
    return results


async def _write_plan(cur: Cursor, run: Sequence[Planned], now: float) -> None:
    """Many deliveries' calls in a few statements (`bridge.store.identity`): what is known of
    their visitors (alias and user) and which of their users are forgotten, read in one
    round trip; then the plan's aliases, identities, links, outbox rows and dropped raw
    bodies, one statement each."""
    if not run:
        return
    visitors, subjects = wanted(run)
    known = Known()
    conn = cur.connection
    async with conn.cursor() as aliased:
        if visitors:
            await aliased.execute(
                "SELECT given, COALESCE(a.anonymous_id, given), i.user_id"
                " FROM unnest(%s::text[]) AS v (given)"
                " LEFT JOIN aliases a ON a.alias = given"
                " LEFT JOIN identities i ON i.anonymous_id = COALESCE(a.anonymous_id, given)",
                (visitors,),
            )
        if subjects:
            await cur.execute("SELECT subject FROM forgotten WHERE subject = ANY(%s)", (subjects,))
        if visitors:  # fetching syncs the pipeline: both queries go in one round trip
            for given, target, user in await aliased.fetchall():
                if target != given:
                    known.targets[given] = target
                if user is not None:
                    known.users[target] = user
        if subjects:
            known.forgotten = {subject for (subject,) in await cur.fetchall()}
    await _write(cur, plan(run, known), now)


async def _write(cur: Cursor, planned: Plan, now: float) -> None:
    if planned.aliases:
        aliases = sorted(planned.aliases.items())
        await cur.execute(
            "INSERT INTO aliases (alias, anonymous_id) SELECT * FROM unnest(%s::text[],"
            " %s::text[]) ON CONFLICT (alias) DO UPDATE SET anonymous_id = excluded.anonymous_id",
            ([alias for alias, _ in aliases], [target for _, target in aliases]),
        )
    if planned.identities:
        learned = sorted(planned.identities.items())
        await cur.execute(
            "INSERT INTO identities (anonymous_id, user_id, subject) SELECT * FROM unnest("
            "%s::text[], %s::text[], %s::text[]) ON CONFLICT (anonymous_id) DO UPDATE"
            " SET user_id = excluded.user_id, subject = excluded.subject",
            (
                [visitor for visitor, _ in learned],
                [user for _, user in learned],
                [hash_subject(user) for _, user in learned],
            ),
        )
    await _link(cur, planned.links)
    if planned.rows:
        await cur.execute(
            # A call already queued or sent under its key is not queued again.
            "INSERT INTO outbox (inbox_id, route, subject, visitor, event_id, body, created_at,"
            " next_at) SELECT inbox_id, route, subject, visitor, event_id, body, %s, %s"
            " FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::bytea[]) WITH ORDINALITY"
            " AS given (inbox_id, route, subject, visitor, event_id, body, position)"
            " ORDER BY position ON CONFLICT DO NOTHING",
            (
                now,
                now,
                [row.inbox_id for row in planned.rows],
                [route_of(row.call) for row in planned.rows],
                [subject_of(row.call) for row in planned.rows],
                [visitor_of(row.call) for row in planned.rows],
                [row.event_id for row in planned.rows],
                [_encoder.encode(row.call) for row in planned.rows],
            ),
        )
    if planned.emptied:
        await cur.execute(
            "UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id = ANY(%s)",
            (planned.emptied,),
        )


async def _target(cur: Cursor, anonymous_id: str) -> str:
    found = await _one(cur, "SELECT anonymous_id FROM aliases WHERE alias = %s", (anonymous_id,))
    return str(found) if found is not None else anonymous_id


async def _link(cur: Cursor, linked: Sequence[tuple[int, set[str]]]) -> None:
    """Record who each delivery is about (`links`), for erasure."""
    pairs = sorted((subject, inbox_id) for inbox_id, subjects in linked for subject in subjects)
    if pairs:
        await cur.execute(
            "INSERT INTO inbox_subjects (subject, inbox_id) SELECT * FROM"
            " unnest(%s::text[], %s::bigint[]) ON CONFLICT DO NOTHING",
            ([subject for subject, _ in pairs], [inbox_id for _, inbox_id in pairs]),
        )


async def _forget(cur: Cursor, user_id: str, beside: list[str], now: float) -> None:
    """Erase at once what is linked to a user, and remember them as forgotten (as in the
    SQLite backend: the visitors learned for them, their aliases and the identifiers
    declared beside the forget are the user's links too); sends in flight stay (the
    forget row waits for them)."""
    subject = hash_subject(user_id)
    await cur.execute(
        "SELECT anonymous_id FROM identities WHERE subject = %s UNION"
        " SELECT alias FROM aliases WHERE anonymous_id IN"
        " (SELECT anonymous_id FROM identities WHERE subject = %s)",
        (subject, subject),
    )
    visitors = [v for (v,) in await cur.fetchall()]
    related = sorted({*beside, *(hash_subject(v) for v in visitors)} - {subject})
    if related:
        await cur.execute(
            "UPDATE outbox SET subject = %s WHERE subject IS NULL AND route != 'forget'"
            " AND visitor = ANY(%s)",
            (subject, related),
        )
        await cur.execute(
            "INSERT INTO inbox_subjects (subject, inbox_id) SELECT DISTINCT %s, inbox_id"
            " FROM inbox_subjects WHERE subject = ANY(%s) ON CONFLICT DO NOTHING",
            (subject, related),
        )
    await cur.execute(
        "INSERT INTO forgotten (subject, at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (subject, now),
    )
    await cur.execute(
        "DELETE FROM aliases WHERE anonymous_id IN"
        " (SELECT anonymous_id FROM identities WHERE subject = %s)",
        (subject,),
    )
    await cur.execute("DELETE FROM identities WHERE subject = %s", (subject,))
    await _erase_linked(cur, subject, now)
    await _erase_quarantined(cur, {subject, *related})


#: The raw payloads of the deliveries linked to any of some subjects.
_DROP_LINKED_RAW: Final = (
    "UPDATE inbox SET raw_body = NULL, headers = NULL WHERE raw_body IS NOT NULL"
    " AND id IN (SELECT inbox_id FROM inbox_subjects WHERE subject = ANY(%s))"
)


async def _erase_linked(cur: Cursor, subject: str, now: float) -> int:
    """Delete the calls about a subject (not forgets, not sends in flight) and drop the
    raw payloads of the deliveries linked to it; how many of both."""
    await cur.execute(
        "DELETE FROM outbox WHERE subject = %s AND route != 'forget'"
        " AND NOT (state = 'pending' AND claimed AND next_at > %s)",
        (subject, now),
    )
    erased = cur.rowcount
    await cur.execute(_DROP_LINKED_RAW, ([subject],))
    return erased + cur.rowcount


async def _erase_quarantined(cur: Cursor, subjects: set[str]) -> None:
    """Erase the quarantined deliveries whose bodies name any of `subjects` (as in the
    SQLite backend: a scan of every quarantined body, on every forget)."""
    await cur.execute(
        "SELECT id, raw_body FROM inbox WHERE state = 'quarantined' AND raw_body IS NOT NULL"
    )
    rows = await cur.fetchall()
    await _drop_quarantined(cur, [i for i, body in rows if named(body) & subjects])


async def _drop_quarantined(cur: Cursor, ids: list[int]) -> None:
    """Quarantined deliveries about a forgotten user: dropped, with their payloads and
    reasons (a reason may quote the payload)."""
    if ids:
        await cur.execute(
            "UPDATE inbox SET state = 'dropped', reason = %s, raw_body = NULL, headers = NULL"
            " WHERE id = ANY(%s)",
            (ERASED_REASON, ids),
        )


def _upto(prefix: str) -> str:
    """Everything from `prefix` up to (not including) this starts with it, compared
    byte-wise (the columns are COLLATE "C"): a range the indexes serve."""
    return prefix + "\U0010ffff"


async def _purge_prefixes(cur: Cursor, source: str, purge: Purge, now: float) -> None:
    """Carry out a `Purge` (as in the SQLite backend)."""
    deliveries = (source, purge.deliveries, _upto(purge.deliveries))
    await cur.execute(
        "DELETE FROM outbox WHERE inbox_id IN (SELECT id FROM inbox WHERE source = %s"
        " AND provider_event_id >= %s AND provider_event_id < %s) AND route != 'forget'"
        " AND NOT (state = 'pending' AND claimed AND next_at > %s)",
        (*deliveries, now),
    )
    await cur.execute(
        "UPDATE inbox SET raw_body = NULL, headers = NULL"
        " WHERE source = %s AND provider_event_id >= %s AND provider_event_id < %s",
        deliveries,
    )
    users = (purge.users, _upto(purge.users))
    await cur.execute(
        "DELETE FROM aliases WHERE anonymous_id IN"
        " (SELECT anonymous_id FROM identities WHERE user_id >= %s AND user_id < %s)",
        users,
    )
    await cur.execute("DELETE FROM identities WHERE user_id >= %s AND user_id < %s", users)


async def _claim(
    cur: Cursor, route: Route, limit: int, max_bytes: int, now: float
) -> list[OutboxRow]:
    if route == "forget":
        # A forget waits until no earlier call about the same user is still pending; rows
        # about a forgotten user that are not in flight are never sent (see SQLite).
        await cur.execute(
            "DELETE FROM outbox WHERE state = 'pending' AND route != 'forget'"
            " AND subject IN (SELECT subject FROM outbox WHERE state = 'pending'"
            "   AND route = 'forget') AND NOT (claimed AND next_at > %s)",
            (now,),
        )
        await cur.execute(
            "SELECT id, body, created_at, attempts FROM outbox AS f"
            " WHERE state = 'pending' AND route = 'forget' AND next_at <= %s"
            " AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.subject = f.subject"
            "   AND o.state = 'pending' AND o.route != 'forget')"
            " ORDER BY next_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, limit),
        )
    else:
        await cur.execute(
            "SELECT id, body, created_at, attempts FROM outbox"
            " WHERE state = 'pending' AND route = %s AND next_at <= %s"
            " ORDER BY next_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
            (route, now, limit),
        )
    rows: list[OutboxRow] = []
    size = 0
    for row_id, body, created_at, attempts in await cur.fetchall():
        size += len(body) + 1
        if rows and size > max_bytes:
            break
        rows.append(
            OutboxRow(
                id=row_id, route=route, body=bytes(body), created_at=created_at, attempts=attempts
            )
        )
    if rows:
        await cur.execute(
            "UPDATE outbox SET claimed = TRUE, next_at = %s WHERE id = ANY(%s)",
            (now + LEASE_SECONDS, [row.id for row in rows]),
        )
    return rows


async def _delivered(cur: Cursor, ids: list[int], now: float) -> None:
    await cur.execute("SELECT body FROM outbox WHERE route = 'forget' AND id = ANY(%s)", (ids,))
    forgets = [bytes(body) for (body,) in await cur.fetchall()]
    await cur.execute(
        "UPDATE outbox SET state = 'delivered', claimed = FALSE, done_at = %s, reason = NULL"
        " WHERE state = 'pending' AND id = ANY(%s)",
        (now, ids),
    )
    for body in forgets:
        # Millimetric has erased the user: the forget row and the sends that were in flight
        # at forget time go too.
        user_id = _forget_decoder.decode(body).user_id
        await cur.execute(
            "DELETE FROM outbox WHERE state != 'pending' AND subject = %s",
            (hash_subject(user_id),),
        )


async def _retry(cur: Cursor, ids: list[int], next_at: float, count_attempt: bool) -> None:
    await cur.execute(
        "UPDATE outbox SET claimed = FALSE, next_at = %s, attempts = attempts + %s"
        " WHERE state = 'pending' AND id = ANY(%s)",
        (next_at, int(count_attempt), ids),
    )
    # A send that failed after its user was forgotten is not tried again.
    await cur.execute(
        "DELETE FROM outbox WHERE route != 'forget' AND id = ANY(%s)"
        " AND subject IN (SELECT subject FROM forgotten)",
        (ids,),
    )


async def _dead_letter(cur: Cursor, ids: list[int], reason: str, now: float) -> None:
    await cur.execute(
        "UPDATE outbox SET state = 'dead', claimed = FALSE, done_at = %s, reason = %s,"
        " attempts = attempts + 1 WHERE state = 'pending' AND id = ANY(%s)",
        (now, reason, ids),
    )


async def _backlog(cur: Cursor) -> Backlog:
    await cur.execute(BACKLOG_SQL)
    return backlog_of(await cur.fetchone() or (0, 0, None, 0, None, 0))


async def _stats(cur: Cursor) -> OutboxStats:
    backlog = await _backlog(cur)
    delivered = await _one(cur, DELIVERED_SQL)
    await cur.execute(
        "SELECT COUNT(*), COUNT(raw_body), (SELECT value FROM meta WHERE key = 'paused') FROM inbox"
    )
    inbox, raw, paused = await cur.fetchone() or (0, 0, None)
    return OutboxStats(
        pending=backlog.pending,
        delivered=delivered,
        dead=backlog.dead,
        oldest_pending_at=backlog.oldest_pending_at,
        inbox=inbox,
        raw_payloads=raw,
        paused=paused,
        untranslated=backlog.untranslated,
        oldest_untranslated_at=backlog.oldest_untranslated_at,
        quarantined=backlog.quarantined,
    )


async def _dead_letters(cur: Cursor, limit: int) -> list[DeadLetter]:
    await cur.execute(
        "SELECT o.id, o.route, i.source, o.event_id, o.reason, o.created_at, o.attempts, o.body"
        " FROM outbox AS o LEFT JOIN inbox AS i ON i.id = o.inbox_id"
        " WHERE o.state = 'dead' ORDER BY o.id LIMIT %s",
        (limit,),
    )
    calls = [
        DeadLetter(
            id=r[0],
            route=r[1],
            source=r[2],
            event_id=r[3],
            reason=r[4] or "",
            created_at=r[5],
            attempts=r[6],
            body=bytes(r[7]),
        )
        for r in await cur.fetchall()
    ]
    await cur.execute(
        "SELECT id, source, provider_event_id, reason, received_at, raw_body FROM inbox"
        " WHERE state = 'quarantined' ORDER BY id LIMIT %s",
        (limit,),
    )
    return [*calls, *map(quarantined_letter, await cur.fetchall())]


def _where(selection: Selection) -> tuple[str, list[Any]]:
    states = "('dead', 'delivered')" if selection.include_delivered else "('dead')"
    clauses: list[str] = [f"state IN {states}"]
    params: list[Any] = []
    if selection.deliveries and not selection.ids:
        clauses.append("FALSE")  # deliveries were named, and no call
    if selection.ids:
        clauses.append("id = ANY(%s)")
        params.append(list(selection.ids))
    if selection.source is not None:
        clauses.append("inbox_id IN (SELECT id FROM inbox WHERE source = %s)")
        params.append(selection.source)
    if selection.since is not None:
        clauses.append("created_at >= %s")
        params.append(selection.since)
    return " AND ".join(clauses), params


async def _replay(cur: Cursor, selection: Selection, now: float) -> int:
    where, params = _where(selection)
    await cur.execute(
        # A replay starts the row's life again: its max age counts from now.
        "UPDATE outbox SET state = 'pending', claimed = FALSE, next_at = %s, attempts = 0,"
        f" created_at = %s, done_at = NULL, reason = NULL WHERE {where}",
        (now, now, *params),
    )
    return cur.rowcount


async def _purge(cur: Cursor, selection: Selection) -> int:
    where, params = _where(msgspec.structs.replace(selection, include_delivered=False))
    await cur.execute(f"DELETE FROM outbox WHERE {where}", params)
    calls = cur.rowcount
    # As on SQLite: a quarantined delivery loses its payload, its inbox row stays.
    where, params = _deliveries(selection, ["quarantined"])
    await cur.execute(
        f"UPDATE inbox SET state = 'dropped', raw_body = NULL, headers = NULL WHERE {where}",
        params,
    )
    return calls + cur.rowcount


_CLEAN_DELIVERED: Final = (
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
    " WHERE state = 'delivered' AND done_at < %s LIMIT %s)"
)
# As on SQLite, retention leaves untranslated and quarantined deliveries alone.
_CLEAN_RAW: Final = (
    "UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id IN (SELECT id FROM inbox"
    " WHERE raw_body IS NOT NULL AND received_at < %s AND state = 'translated' LIMIT %s)"
)
_CLEAN_INBOX: Final = (
    "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE received_at < %s"
    " AND state IN ('translated', 'dropped')"
    " AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.inbox_id = inbox.id) LIMIT %s)"
)


_HASTEN: Final = (
    "UPDATE outbox SET next_at = %s WHERE route = %s AND state = 'pending' AND NOT claimed"
    " AND attempts > 0 AND next_at > %s"
)


async def _execute(cur: Cursor, statement: str, params: tuple[Any, ...]) -> int:
    await cur.execute(statement, params)
    return cur.rowcount


async def _set_meta(cur: Cursor, key: str, value: str | None) -> None:
    if value is None:
        await cur.execute("DELETE FROM meta WHERE key = %s", (key,))
    else:
        await cur.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
