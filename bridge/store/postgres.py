"""The PostgreSQL outbox store: several bridge instances on one database, one forwarding.

Driver: psycopg 3 with psycopg_pool. It is the maintained successor of psycopg2, async
native, and fully typed, so mypy strict checks every call here without stubs (asyncpg is
faster per round trip but untyped; per webhook the bridge's cost is Python CPU in the
framework, not the driver: see PERF-NOTES).

- Every operation (`bridge.store.operations`, its statements in `queries/postgres.sql`)
  is one transaction on a pooled connection; a transaction the server rolled back (a
  deadlock, a serialization failure) runs again.
- Group commit for intake: the deliveries waiting are appended together, one statement
  and one commit for all of them, each caller answered after that commit. The driver's
  round trips, not the server, were the cost of one at a time. A group the database
  refuses, or one held up past 2 s by a row lock (a twin mid-commit at another instance),
  is run again one delivery at a time, so that delivery fails or waits alone (half the
  pool at most, each no longer than its caller waits, so the forwarder and /readyz keep
  theirs); when the database is out of reach, every caller waiting hears it at once.
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
from bridge.errors import ConfigError, StoreRefused, StoreUnavailable
from bridge.store import AcceptResult, Delivery, settle
from bridge.store import operations as ops
from bridge.store.base import SQLStore
from bridge.store.sql import Op, Step, drive_async, load

__all__ = ["PostgresStore", "redacted"]

T = TypeVar("T")
Cursor = psycopg.AsyncCursor[TupleRow]
Connection = psycopg.AsyncConnection[TupleRow]

log = structlog.get_logger("bridge.store")

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
#: How long a delivery appended alone waits for a row lock: as long as its caller waits
#: (intake answers 503 at 10 s and the provider retries), and no longer, so that it does
#: not hold a pooled connection after nobody waits on it.
ALONE_LOCK_TIMEOUT_MS: Final = 10_000
#: Most deliveries appended alone at once: each may wait on a lock for a pooled connection,
#: and the forwarder, the translate stage and /readyz need the rest.
ALONE_AT_ONCE: Final = POOL_MAX // 2
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

_QUERIES: Final = load("postgres")
_encoder: Final = msgspec.json.Encoder()


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


class PostgresStore(SQLStore):
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
        self._alone_slots = asyncio.Semaphore(ALONE_AT_ONCE)
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
                kind = StoreRefused if _refusal(error) else StoreUnavailable
                raise kind(f"postgresql: {error}") from error
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
        released = await self._release_claims(now)
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

    async def _transact(self, operation: Callable[..., Op[T]], *args: Any, read: bool = False) -> T:
        return await self._run(_steps, operation, args)

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
            async with self._alone_slots:
                if future.done():  # its caller was answered 503 meanwhile and will retry
                    return
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


async def _steps(cur: Cursor, operation: Callable[..., Op[T]], args: tuple[Any, ...]) -> T:
    """Run an operation's statements on `cur` (`bridge.store.sql`)."""

    async def run(step: Step) -> Any:
        sql = _QUERIES[step.query]
        if step.kind == "write":  # one array a column
            await cur.execute(sql, [list(column) for column in zip(*step.params, strict=True)])
            return None
        await cur.execute(sql, step.params)
        return await cur.fetchall() if step.kind == "rows" else cur.rowcount

    return await drive_async(operation(*args), run)


async def _append_one(cur: Cursor, delivery: Delivery) -> AcceptResult:
    await cur.execute(f"SET LOCAL lock_timeout = '{ALONE_LOCK_TIMEOUT_MS}ms'")
    return "duplicate" if await _steps(cur, ops.append, (delivery,)) is None else "accepted"


#: SQLSTATE classes of a refusal of what was sent: data exception, integrity constraint
#: violation, program limit exceeded. Others (a lost connection, a shutdown, a lock or
#: resource running out) pass.
_REFUSALS: Final = ("22", "23", "54")


def _refusal(error: psycopg.Error) -> bool:
    """Whether the server, or the driver before it (a value it cannot send), refused what
    it was given, rather than failing to take it now."""
    if error.sqlstate is None:
        return isinstance(error, psycopg.DataError)
    return error.sqlstate[:2] in _REFUSALS


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
