"""The SQLite outbox store: one writer thread, group commit, WAL, `synchronous=FULL`.

One dedicated thread owns the connection and serialises every operation (SQLite has one
writer anyway, and committing off the event loop keeps intake responsive). Deliveries
accepted concurrently are committed together: the thread takes every `accept` waiting in
its queue, runs them in one transaction (a failing one alone rolled back, in its own
savepoint) and commits them with one fsync. Each caller is answered only after that
commit, so durability per delivery is the same as a commit each, at a fraction of the
cost.

The statements of a group run on the event loop of its callers while the thread waits,
and the thread commits (`_on_their_loops` says why); everything else runs on the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import msgspec
import structlog

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
    Planned,
    Row,
    plan,
    plannable,
    quarantined_names,
    segments,
    wanted,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")
log = structlog.get_logger("bridge.store")
SYNCHRONOUS: Final = ("FULL", "NORMAL", "EXTRA")

#: How long the writer thread waits for another process's write lock.
BUSY_TIMEOUT_MS: Final = 5000
#: How long a claim lasts before the row is due again (a crashed send is retried).
LEASE_SECONDS: Final = 900.0
#: Most deliveries one group commit takes; bounds how long one transaction holds the lock.
MAX_GROUP: Final = 512
#: Rows a retention pass deletes per transaction, so intake is never stalled for long.
CLEANUP_CHUNK: Final = 5000

_encoder: Final = msgspec.json.Encoder()
_forget_decoder: Final = msgspec.json.Decoder(Forget)


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("bridge.store.migrations").joinpath("sqlite")
    found = []
    for entry in folder.iterdir():
        number, _, _ = entry.name.partition("_")
        if entry.name.endswith(".sql") and number.isdigit():
            found.append((int(number), entry.read_text()))
    return sorted(found)


class _Op:
    __slots__ = ("args", "fn", "future", "grouped", "loop")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        grouped: bool,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.args = args
        self.grouped = grouped
        self.loop = loop
        self.future = future


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Move the WAL into the database file and truncate it: after an erasure its old
    frames would still hold the erased rows. SQLite reports a checkpoint that readers
    kept from finishing without raising; here it is an error."""
    (busy, _, _) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:  # a reader (another process, or `_read`) held on past the busy timeout
        raise StoreUnavailable("sqlite: the WAL checkpoint could not finish (a reader held it)")


def _apply(conn: sqlite3.Connection, ops: Sequence[_Op]) -> list[tuple[Any, BaseException | None]]:
    """Run `ops` inside the open transaction so that a failing one fails alone.

    Optimistically all in one savepoint; only when one of them raises are they run again,
    each in its own savepoint (two statements more per op, on every op, otherwise)."""
    if len(ops) > 1:
        conn.execute("SAVEPOINT ops")
        try:
            outcomes: list[tuple[Any, BaseException | None]] = [
                (op.fn(conn, *op.args), None) for op in ops
            ]
        except Exception:  # each op runs again below, and a failing one fails alone
            conn.execute("ROLLBACK TO ops")
        else:
            conn.execute("RELEASE ops")
            return outcomes
        conn.execute("RELEASE ops")
    outcomes = []
    for op in ops:
        conn.execute("SAVEPOINT op")
        try:
            outcomes.append((op.fn(conn, *op.args), None))
            conn.execute("RELEASE op")
        except Exception as failure:  # handed to its caller alone
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            outcomes.append((None, _as_unavailable(failure)))
    return outcomes


def _begin_at_once(conn: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE unless another process holds the write lock (an `outbox` command):
    the event loop must not sit in SQLite's busy wait. False: the writer thread waits."""
    if conn.in_transaction:
        return True
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return True


class _Handoff:
    """Grouped ops run on their caller's event loop while the writer thread waits, so
    exactly one of the two runs them: whichever claims them first."""

    __slots__ = ("claimed", "done", "error", "lock", "outcomes")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.claimed = False
        self.done = threading.Event()
        self.outcomes: list[tuple[Any, BaseException | None]] | None = None
        self.error: BaseException | None = None

    def claim(self) -> bool:
        with self.lock:
            taken, self.claimed = self.claimed, True
            return not taken


def _on_their_loops(
    conn: sqlite3.Connection, ops: Sequence[_Op]
) -> list[tuple[Any, BaseException | None]]:
    """Begin a group's transaction and run its statements on the event loop of its
    callers; the writer thread then commits.

    Python's sqlite3 releases the GIL around every statement. Run from the writer thread
    while the event loop is busy, each release is a GIL handoff between the two threads,
    and the handoffs (a few per delivery) cost the loop more than the statements. On the
    loop the statements contend with nobody; the writer thread keeps what blocks (waiting
    for another process's write lock, the fsync of COMMIT) off the loop. Measured with
    bench/intake.py against the same group run on the writer thread: 0.37-0.41 of bare
    Litestar against 0.34-0.35, p99 76-87 ms against 97-104."""
    outcomes: list[tuple[Any, BaseException | None]] = []
    start = 0
    while start < len(ops):  # usually one loop; in order, one run of same-loop ops at a time
        end = start + 1
        while end < len(ops) and ops[end].loop is ops[start].loop:
            end += 1
        outcomes.extend(_on_loop(conn, ops[start:end]))
        start = end
    return outcomes


def _on_loop(
    conn: sqlite3.Connection, ops: Sequence[_Op]
) -> list[tuple[Any, BaseException | None]]:
    loop = ops[0].loop
    handoff = _Handoff()

    def run() -> None:
        if handoff.claim():
            try:
                if _begin_at_once(conn):
                    handoff.outcomes = _apply(conn, ops)
            except BaseException as error:  # the transaction's failure: the writer's to tell
                handoff.error = error
            finally:
                handoff.done.set()

    def here() -> list[tuple[Any, BaseException | None]]:
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        return _apply(conn, ops)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # the loop is closed: nobody awaits these, but the work is due
        return here()
    while not handoff.done.wait(0.05):
        if not loop.is_running() and handoff.claim():  # stopped: it may never run `run`
            return here()
    if handoff.error is not None:
        raise handoff.error
    return here() if handoff.outcomes is None else handoff.outcomes


def _checkpoint_failed(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (error := done.exception()) is not None:
        # The erasure itself is committed; the next checkpoint writes out what is left.
        log.error("checkpoint after an erasure failed", error=str(error))


def _settle_all(settled: list[tuple[asyncio.Future[Any], Any, Any]]) -> None:
    for future, result, error in settled:
        settle(future, result, error)


def _as_unavailable(error: BaseException) -> BaseException:
    if isinstance(error, sqlite3.OperationalError | sqlite3.DatabaseError):
        return StoreUnavailable(f"sqlite: {error}")
    return error


class SQLiteStore:
    """`Store` on one SQLite file."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ConfigError("BRIDGE_SQLITE_SYNCHRONOUS", f"must be one of {SYNCHRONOUS}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock: IO[str] | None = None

    # -- the writer thread -----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Deleted rows are zeroed, not left in free pages: erasure must reach the disk.
        conn.execute("PRAGMA secure_delete=ON")
        return conn

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                break
            ops = [op]
            while len(ops) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish what was queued first, then stop
                    break
                ops.append(nxt)
            start = 0
            while start < len(ops):
                end = start + 1
                if ops[start].grouped:
                    while end < len(ops) and ops[end].grouped:
                        end += 1
                self._run(conn, ops[start:end])
                start = end
        conn.close()

    def _run(self, conn: sqlite3.Connection, ops: Sequence[_Op]) -> None:
        """Run `ops` in one transaction, each in a savepoint so one failure is its own."""
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            if ops[0].fn is _checkpoint:  # cannot run inside a transaction; never grouped
                _checkpoint(conn)
                outcomes.append((None, None))
            else:
                if ops[0].grouped:
                    outcomes = _on_their_loops(conn, ops)
                else:
                    conn.execute("BEGIN IMMEDIATE")
                    outcomes = _apply(conn, ops)
                conn.execute("COMMIT")
        except Exception as failure:  # the transaction failed: every caller in it is told
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            outcomes = [(None, _as_unavailable(failure))] * len(ops)
        answers: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, Any]]] = {}
        for op, (result, error) in zip(ops, outcomes, strict=True):
            answers.setdefault(op.loop, []).append((op.future, result, error))
        for loop, settled in answers.items():  # one wake-up a loop, not one an op
            # RuntimeError: the loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_all, settled)

    async def _call(self, fn: Callable[..., T], *args: Any, grouped: bool = False) -> T:
        return await self._submit(fn, args, grouped=grouped)

    def _submit(
        self, fn: Callable[..., T], args: tuple[Any, ...], *, grouped: bool = False
    ) -> asyncio.Future[T]:
        """Queue `fn(conn, *args)` for the writer thread, which runs queued ops in order
        (whether or not anyone still awaits them)."""
        if self._thread is None:
            raise StoreUnavailable("the store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn, args, grouped, loop, future))
        return future

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` in one read transaction on a read-only connection of its own,
        in a worker thread. In WAL mode it reads while the writer commits: on the writer
        thread, counting a big outbox held up every delivery behind it (40-120 ms at 35-50k
        pending rows, measured under bench/intake.py). Only a TRUNCATE checkpoint (after an
        erasure or a purge) waits for such a read, up to the busy timeout; past that the
        erasure is tried again (`_checkpoint`)."""
        if self._thread is None:
            raise StoreUnavailable("the store is not open")
        return await asyncio.to_thread(self._read_now, fn, args)

    def _read_now(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
            try:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                conn.execute("BEGIN")  # one snapshot for every statement of `fn`
                return fn(conn, *args)
            finally:
                conn.close()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            return
        try:
            conn = await asyncio.to_thread(self._connect)
        except (sqlite3.Error, OSError) as error:  # OSError: its directory cannot be made
            raise StoreUnavailable(f"sqlite: cannot open {self.path}: {error}") from error
        self._thread = threading.Thread(
            target=self._serve, args=(conn,), name="sqlite-store", daemon=True
        )
        self._thread.start()
        try:
            await self._call(_migrate)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join)

    # -- the Store protocol ----------------------------------------------------------------

    async def recover(self, now: float) -> int:
        # One forwarder per database file: a second `serve` would resend what the first
        # has in flight, and a forget could overtake it.
        lock_path = self.path.with_name(self.path.name + ".forwarder.lock")
        lock = lock_path.open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StoreUnavailable(
                f"another millimetric-bridge process is forwarding from {self.path}"
            ) from None
        self._lock = lock
        return await self._call(_release_all_claims, now)

    async def lead(self) -> int:
        # `recover` took the file lock: this process is the one forwarder already.
        return 0

    async def lost(self) -> None:
        await asyncio.Event().wait()  # the file lock lasts as long as the process

    async def erase(self, user_id: str) -> int:
        erased = await self._call(_erase_linked, hash_subject(user_id), time.time())
        await self._call(_checkpoint)
        return erased

    async def append(self, delivery: Delivery) -> AcceptResult:
        return await self._submit(_appended, (delivery,), grouped=True)

    async def untranslated(self, limit: int) -> list[StoredDelivery]:
        return await self._read(_untranslated, limit)

    async def record(self, translations: Sequence[Translation]) -> None:
        if await self._call(_record, translations, time.time()):
            await asyncio.wait([self._checkpoint_soon()])

    async def retranslate(self, selection: Selection) -> int:
        return await self._call(_retranslate, selection)

    async def accept(self, delivery: Delivery) -> AcceptResult:
        accepted = self._submit(_accept, (delivery,), grouped=True)
        if not any(isinstance(c, Purge) for c in delivery.calls):
            return await accepted
        # Queued behind the accept now, so it runs even if the caller goes away.
        checkpoint = self._checkpoint_soon()
        result = await accepted
        await asyncio.wait([checkpoint])
        return result

    def _checkpoint_soon(self) -> asyncio.Future[None]:
        """A checkpoint queued for the writer: the WAL's old frames still hold what was just
        erased (as after `erase`). Awaited by the caller, so that its answer means gone;
        its failure is logged, not the caller's (the erasure itself is committed)."""
        checkpoint = self._submit(_checkpoint, ())
        checkpoint.add_done_callback(_checkpoint_failed)
        return checkpoint

    async def claim(self, route: Route, limit: int, max_bytes: int, now: float) -> list[OutboxRow]:
        return await self._call(_claim, route, limit, max_bytes, now)

    async def delivered(self, ids: Sequence[int], now: float) -> None:
        await self._call(_delivered, list(ids), now)

    async def retry(self, ids: Sequence[int], next_at: float, *, count_attempt: bool) -> None:
        await self._call(_retry, list(ids), next_at, count_attempt)

    async def dead_letter(self, ids: Sequence[int], reason: str, now: float) -> None:
        await self._call(_dead_letter, list(ids), reason, now)

    async def hasten(self, route: Route, now: float) -> int:
        return await self._call(_execute, _HASTEN, (now, route, now))

    async def backlog(self) -> Backlog:
        # The write lock taken and let go at once: the store takes deliveries (the writer
        # is not stuck, and no other process holds the lock past the busy timeout).
        await self._call(_nothing)
        return await self._read(_backlog)

    async def stats(self, now: float) -> OutboxStats:
        return await self._read(_stats)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._read(_dead_letters, limit)

    async def replay(self, selection: Selection, now: float) -> int:
        return await self._call(_replay, selection, now)

    async def purge(self, selection: Selection) -> int:
        return await self._call(_purge, selection)

    async def cleanup(self, retention: Retention, now: float) -> dict[str, int]:
        counts = {"delivered": 0, "raw_payloads": 0, "inbox": 0}
        for kind, statement, age in (
            ("delivered", _CLEAN_DELIVERED, retention.delivered),
            ("raw_payloads", _CLEAN_RAW, retention.raw_payloads),
            ("inbox", _CLEAN_INBOX, retention.inbox),
        ):
            while True:  # in chunks, each its own transaction, so intake interleaves
                done = await self._call(_execute, statement, (now - age, CLEANUP_CHUNK))
                counts[kind] += done
                if done < CLEANUP_CHUNK:
                    break
        return counts

    async def set_paused(self, reason: str | None) -> None:
        await self._call(_set_meta, "paused", reason)


# -- the SQL, run on the writer thread -------------------------------------------------------


def _migrate(conn: sqlite3.Connection) -> None:
    migrations = _migrations()
    latest = migrations[-1][0]
    (current,) = conn.execute("PRAGMA user_version").fetchone()
    if current > latest:
        raise ConfigError(
            "BRIDGE_DATABASE_URL",
            f"the database is at schema version {current}, newer than this millimetric-bridge "
            f"knows ({latest}); upgrade the bridge, do not run an older one against it",
        )
    for number, sql in migrations:
        if number > current:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    statements, pending = [], ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    if pending.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in pending.splitlines()
    ):
        raise ValueError(f"unterminated SQL in migration: {pending[:80]!r}")
    return statements


def _release_all_claims(conn: sqlite3.Connection, now: float) -> int:
    """The forwarder of a previous process is gone: what it had in flight is due again now
    (Millimetric deduplicates those sends by event_id)."""
    conn.execute(
        "DELETE FROM outbox WHERE state = 'pending' AND claimed = 1 AND route != 'forget'"
        " AND subject IN (SELECT subject FROM forgotten)"
    )
    return conn.execute(
        "UPDATE outbox SET claimed = 0, next_at = ? WHERE state = 'pending' AND claimed = 1",
        (now,),
    ).rowcount


def _append(
    conn: sqlite3.Connection, delivery: Delivery, state: str = "untranslated"
) -> int | None:
    """The delivery's inbox row; its id, or None for a redelivery."""
    cursor = conn.execute(
        "INSERT INTO inbox (source, provider_event_id, received_at, raw_body, headers, calls,"
        " state) VALUES (?, ?, ?, ?, ?, 0, ?) ON CONFLICT (source, provider_event_id) DO NOTHING",
        (
            delivery.source,
            delivery.provider_event_id,
            delivery.received_at,
            delivery.raw_body,
            _encoder.encode(delivery.headers),
            state,
        ),
    )
    return cursor.lastrowid if cursor.rowcount else None


def _appended(conn: sqlite3.Connection, delivery: Delivery) -> AcceptResult:
    return "duplicate" if _append(conn, delivery) is None else "accepted"


def _accept(conn: sqlite3.Connection, delivery: Delivery) -> AcceptResult:
    inbox_id = _append(conn, delivery, "translated")
    if inbox_id is None:
        return "duplicate"
    planned = Planned(
        inbox_id=inbox_id,
        source=delivery.source,
        provider_event_id=delivery.provider_event_id,
        outputs=delivery.calls,
    )
    if plannable(planned.outputs):
        _write_plan(conn, [planned], delivery.received_at)
    else:
        _write_calls(conn, planned, delivery.received_at)
    return "accepted"


def _record(conn: sqlite3.Connection, translations: Sequence[Translation], now: float) -> bool:
    """Whether anything stored was erased (a forget, a purge, or a delivery about a
    forgotten user): the WAL's old frames still hold it."""
    claimed = {
        translation.delivery.id
        for translation in translations
        if conn.execute(
            "UPDATE inbox SET state = ?, reason = ?, calls = ?"
            " WHERE id = ? AND state = 'untranslated'",
            (
                "translated" if translation.failure is None else "quarantined",
                translation.failure,
                len(translation.outputs),
                translation.delivery.id,
            ),
        ).rowcount
    }
    erased = False
    for run, alone in segments(translations, claimed):
        erased = _write_plan(conn, run, now) or erased
        if alone is not None:
            erased = _write_calls(conn, alone, now) or erased
    quarantined = quarantined_names(translations, claimed)
    everyone = sorted(set().union(*quarantined.values()))
    forgotten: set[str] = set()
    for chunk in _chunks(everyone):
        forgotten.update(
            subject
            for (subject,) in conn.execute(
                f"SELECT subject FROM forgotten WHERE subject IN ({_marks(chunk)})", chunk
            )
        )
    about = [inbox_id for inbox_id, names in quarantined.items() if names & forgotten]
    return _drop_quarantined(conn, about) or erased


def _write_calls(conn: sqlite3.Connection, delivery: Planned, now: float) -> bool:
    """A delivery that erases, alone: its links, its erasures (`Purge`, `ForgetVisitor`,
    `Forget`), then its other calls as planned; whether anything stored was erased."""
    _link(conn, [(delivery.inbox_id, links(delivery.outputs))])
    erased = False
    for index, item in enumerate(delivery.outputs):
        forget: Forget | None = None
        if isinstance(item, Purge):
            _purge_prefixes(conn, delivery.source, item, now)
        elif isinstance(item, ForgetVisitor):
            target = _target(conn, item.anonymous_id)
            known = conn.execute(
                "SELECT user_id FROM identities WHERE anonymous_id = ?", (target,)
            ).fetchone()
            if known:
                forget = Forget(user_id=known[0])
                _link(conn, [(delivery.inbox_id, {hash_subject(known[0])})])
            else:  # no user to forget at Millimetric; what is stored about the visitor goes
                visitors = {hash_subject(v) for v in (item.anonymous_id, target)}
                for visitor in visitors:
                    conn.execute(_DROP_LINKED_RAW, (visitor,))
                _erase_quarantined(conn, visitors)
        elif isinstance(item, Forget):
            forget = item
        else:
            continue
        erased = True
        if forget is not None:
            _forget(conn, forget.user_id, declared(delivery.outputs), now)
            _, key = with_event_id(forget, delivery.source, delivery.provider_event_id, index)
            _queue(conn, [Row(inbox_id=delivery.inbox_id, call=forget, event_id=key)], now)
    return _write_plan(conn, [delivery], now) or erased


def _write_plan(conn: sqlite3.Connection, run: Sequence[Planned], now: float) -> bool:
    """Many deliveries' calls (`bridge.store.identity`): what is known of their visitors and
    users read in a few statements, the plan written in a few more; whether a delivery's
    raw body was dropped (about a forgotten user)."""
    if not run:
        return False
    visitors, subjects = wanted(run)
    known = Known()
    for chunk in _chunks(visitors):
        known.targets.update(
            conn.execute(
                f"SELECT alias, anonymous_id FROM aliases WHERE alias IN ({_marks(chunk)})", chunk
            ).fetchall()
        )
    for chunk in _chunks(sorted({*visitors, *known.targets.values()})):
        known.users.update(
            conn.execute(
                "SELECT anonymous_id, user_id FROM identities"
                f" WHERE anonymous_id IN ({_marks(chunk)})",
                chunk,
            ).fetchall()
        )
    for chunk in _chunks(subjects):
        known.forgotten.update(
            subject
            for (subject,) in conn.execute(
                f"SELECT subject FROM forgotten WHERE subject IN ({_marks(chunk)})", chunk
            )
        )
    planned = plan(run, known)
    conn.executemany(
        "INSERT INTO aliases (alias, anonymous_id) VALUES (?, ?)"
        " ON CONFLICT (alias) DO UPDATE SET anonymous_id = excluded.anonymous_id",
        sorted(planned.aliases.items()),
    )
    conn.executemany(
        "INSERT INTO identities (anonymous_id, user_id, subject) VALUES (?, ?, ?)"
        " ON CONFLICT (anonymous_id) DO UPDATE SET user_id = excluded.user_id,"
        " subject = excluded.subject",
        [
            (visitor, user, hash_subject(user))
            for visitor, user in sorted(planned.identities.items())
        ],
    )
    _link(conn, planned.links)
    _queue(conn, planned.rows, now)
    conn.executemany(
        "UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id = ?",
        [(inbox_id,) for inbox_id in planned.emptied],
    )
    return bool(planned.emptied)


def _queue(conn: sqlite3.Connection, rows: Sequence[Row], now: float) -> None:
    conn.executemany(
        # A call already queued or sent under its key is not queued again.
        "INSERT INTO outbox (inbox_id, route, subject, visitor, event_id, body, created_at,"
        " next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [
            (
                row.inbox_id,
                route_of(row.call),
                subject_of(row.call),
                visitor_of(row.call),
                row.event_id,
                _encoder.encode(row.call),
                now,
                now,
            )
            for row in rows
        ],
    )


def _link(conn: sqlite3.Connection, linked: Sequence[tuple[int, set[str]]]) -> None:
    """Record who each delivery is about (`links`), for erasure."""
    conn.executemany(
        "INSERT OR IGNORE INTO inbox_subjects (subject, inbox_id) VALUES (?, ?)",
        [(subject, inbox_id) for inbox_id, subjects in linked for subject in subjects],
    )


def _chunks(values: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


def _target(conn: sqlite3.Connection, anonymous_id: str) -> str:
    row = conn.execute(
        "SELECT anonymous_id FROM aliases WHERE alias = ?", (anonymous_id,)
    ).fetchone()
    return str(row[0]) if row else anonymous_id


def _forget(conn: sqlite3.Connection, user_id: str, beside: list[str], now: float) -> None:
    """Erase at once what is linked to a user, and remember them as forgotten.

    The user's links are their own id, the visitors learned for them and those visitors'
    aliases, and the identifiers declared beside the forget (`beside`). Calls about the
    visitors become calls about the user (so the forget waits for those in flight, and
    `erase` finds them later), deliveries linked to any of them become linked to the user,
    then everything linked to the user goes. Sends in flight stay: the forget row waits
    for them, and `erase` removes them once they are sent."""
    subject = hash_subject(user_id)
    visitors = [
        v
        for (v,) in conn.execute(
            "SELECT anonymous_id FROM identities WHERE subject = ?", (subject,)
        )
    ]
    aliases = [
        a
        for (a,) in conn.execute(
            f"SELECT alias FROM aliases WHERE anonymous_id IN ({_marks(visitors)})", visitors
        )
    ]
    related = sorted({*beside, *(hash_subject(v) for v in [*visitors, *aliases])} - {subject})
    if related:
        conn.execute(
            f"UPDATE outbox SET subject = ? WHERE subject IS NULL AND route != 'forget'"
            f" AND visitor IN ({_marks(related)})",
            (subject, *related),
        )
        conn.execute(
            f"INSERT OR IGNORE INTO inbox_subjects (subject, inbox_id) SELECT ?, inbox_id"
            f" FROM inbox_subjects WHERE subject IN ({_marks(related)})",
            (subject, *related),
        )
    conn.execute(
        "INSERT INTO forgotten (subject, at) VALUES (?, ?) ON CONFLICT DO NOTHING", (subject, now)
    )
    conn.execute(
        "DELETE FROM aliases WHERE anonymous_id IN"
        " (SELECT anonymous_id FROM identities WHERE subject = ?)",
        (subject,),
    )
    conn.execute("DELETE FROM identities WHERE subject = ?", (subject,))
    _erase_linked(conn, subject, now)
    _erase_quarantined(conn, {subject, *related})


#: The raw payloads of the deliveries linked to a subject.
_DROP_LINKED_RAW: Final = (
    "UPDATE inbox SET raw_body = NULL, headers = NULL WHERE raw_body IS NOT NULL"
    " AND id IN (SELECT inbox_id FROM inbox_subjects WHERE subject = ?)"
)


def _erase_linked(conn: sqlite3.Connection, subject: str, now: float) -> int:
    """Delete the calls about a subject (not forgets, not sends in flight) and drop the
    raw payloads of the deliveries linked to it; how many of both."""
    rows = conn.execute(
        "DELETE FROM outbox WHERE subject = ? AND route != 'forget'"
        " AND NOT (state = 'pending' AND claimed = 1 AND next_at > ?)",
        (subject, now),
    ).rowcount
    return rows + conn.execute(_DROP_LINKED_RAW, (subject,)).rowcount


def _erase_quarantined(conn: sqlite3.Connection, subjects: set[str]) -> bool:
    """Erase the quarantined deliveries whose bodies name any of `subjects` (`named`):
    nothing links them to anyone, their handler could not say whom they are about. A scan
    of every quarantined body, on every forget: quarantine is the exception, and a
    forget is rare."""
    rows = conn.execute(
        "SELECT id, raw_body FROM inbox WHERE state = 'quarantined' AND raw_body IS NOT NULL"
    ).fetchall()
    return _drop_quarantined(conn, [i for i, body in rows if named(body) & subjects])


def _drop_quarantined(conn: sqlite3.Connection, ids: Sequence[int]) -> bool:
    """Quarantined deliveries about a forgotten user: dropped, with their payloads and
    reasons (a reason may quote the payload)."""
    conn.executemany(
        "UPDATE inbox SET state = 'dropped', reason = ?, raw_body = NULL, headers = NULL"
        " WHERE id = ?",
        [(ERASED_REASON, inbox_id) for inbox_id in ids],
    )
    return bool(ids)


# Everything from `prefix` up to (not including) `_upto(prefix)` starts with it: a range
# the (source, provider_event_id) index serves, where LIKE would need escaping and a scan.
def _upto(prefix: str) -> str:
    return prefix + "\U0010ffff"


def _purge_prefixes(conn: sqlite3.Connection, source: str, purge: Purge, now: float) -> None:
    """Carry out a `Purge`: the source's matching deliveries lose their raw payloads and
    calls (forgets and sends in flight excepted); learned identities of matching users go."""
    deliveries = (source, purge.deliveries, _upto(purge.deliveries))
    conn.execute(
        "DELETE FROM outbox WHERE inbox_id IN (SELECT id FROM inbox WHERE source = ?"
        " AND provider_event_id >= ? AND provider_event_id < ?) AND route != 'forget'"
        " AND NOT (state = 'pending' AND claimed = 1 AND next_at > ?)",
        (*deliveries, now),
    )
    conn.execute(
        "UPDATE inbox SET raw_body = NULL, headers = NULL"
        " WHERE source = ? AND provider_event_id >= ? AND provider_event_id < ?",
        deliveries,
    )
    users = (purge.users, _upto(purge.users))
    conn.execute(
        "DELETE FROM aliases WHERE anonymous_id IN"
        " (SELECT anonymous_id FROM identities WHERE user_id >= ? AND user_id < ?)",
        users,
    )
    conn.execute("DELETE FROM identities WHERE user_id >= ? AND user_id < ?", users)


def _claim(
    conn: sqlite3.Connection, route: Route, limit: int, max_bytes: int, now: float
) -> list[OutboxRow]:
    if route == "forget":
        # A forget waits until no earlier call about the same user is still pending.
        # Rows about a forgotten user that are not in flight (a send that was released or
        # whose lease ran out) are never sent: drop them, then take the forgets that no
        # send in flight for the same user could be overtaken by.
        conn.execute(
            "DELETE FROM outbox WHERE state = 'pending' AND route != 'forget'"
            " AND subject IN (SELECT subject FROM outbox WHERE state = 'pending'"
            "   AND route = 'forget') AND NOT (claimed = 1 AND next_at > ?)",
            (now,),
        )
        query = (
            "SELECT id, body, created_at, attempts FROM outbox AS f"
            " WHERE state = 'pending' AND route = 'forget' AND next_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.subject = f.subject"
            "   AND o.state = 'pending' AND o.route != 'forget')"
            " ORDER BY next_at, id LIMIT ?"
        )
        params: tuple[Any, ...] = (now, limit)
    else:
        query = (
            "SELECT id, body, created_at, attempts FROM outbox"
            " WHERE state = 'pending' AND route = ? AND next_at <= ?"
            " ORDER BY next_at, id LIMIT ?"
        )
        params = (route, now, limit)
    rows: list[OutboxRow] = []
    size = 0
    for row_id, body, created_at, attempts in conn.execute(query, params):
        size += len(body) + 1
        if rows and size > max_bytes:
            break
        rows.append(
            OutboxRow(id=row_id, route=route, body=body, created_at=created_at, attempts=attempts)
        )
    if rows:
        conn.executemany(
            "UPDATE outbox SET claimed = 1, next_at = ? WHERE id = ?",
            [(now + LEASE_SECONDS, row.id) for row in rows],
        )
    return rows


def _delivered(conn: sqlite3.Connection, ids: list[int], now: float) -> None:
    forgets = [
        body
        for (body,) in conn.execute(
            f"SELECT body FROM outbox WHERE route = 'forget' AND id IN ({_marks(ids)})", ids
        )
    ]
    conn.execute(
        f"UPDATE outbox SET state = 'delivered', claimed = 0, done_at = ?, reason = NULL"
        f" WHERE state = 'pending' AND id IN ({_marks(ids)})",
        (now, *ids),
    )
    for body in forgets:
        # Millimetric has erased the user: the forget row and the sends that were in flight
        # at forget time go too (the forwarder then runs `erase` for the raw payloads of
        # the deliveries those sends came from).
        user_id = _forget_decoder.decode(body).user_id
        conn.execute(
            "DELETE FROM outbox WHERE state != 'pending' AND subject = ?", (hash_subject(user_id),)
        )


def _retry(conn: sqlite3.Connection, ids: list[int], next_at: float, count_attempt: bool) -> None:
    conn.execute(
        f"UPDATE outbox SET claimed = 0, next_at = ?, attempts = attempts + ?"
        f" WHERE state = 'pending' AND id IN ({_marks(ids)})",
        (next_at, int(count_attempt), *ids),
    )
    # A send that failed after its user was forgotten is not tried again.
    conn.execute(
        f"DELETE FROM outbox WHERE route != 'forget' AND id IN ({_marks(ids)})"
        " AND subject IN (SELECT subject FROM forgotten)",
        ids,
    )


_HASTEN: Final = (
    "UPDATE outbox SET next_at = ? WHERE route = ? AND state = 'pending' AND claimed = 0"
    " AND attempts > 0 AND next_at > ?"
)


def _dead_letter(conn: sqlite3.Connection, ids: list[int], reason: str, now: float) -> None:
    conn.execute(
        f"UPDATE outbox SET state = 'dead', claimed = 0, done_at = ?, reason = ?,"
        f" attempts = attempts + 1 WHERE state = 'pending' AND id IN ({_marks(ids)})",
        (now, reason, *ids),
    )


def _nothing(_conn: sqlite3.Connection) -> None:
    pass


def _backlog(conn: sqlite3.Connection) -> Backlog:
    return backlog_of(conn.execute(BACKLOG_SQL).fetchone())


def _untranslated(conn: sqlite3.Connection, limit: int) -> list[StoredDelivery]:
    return [
        stored_delivery(row)
        for row in conn.execute(
            "SELECT id, source, provider_event_id, received_at, raw_body, headers FROM inbox"
            " WHERE state = 'untranslated' ORDER BY id LIMIT ?",
            (limit,),
        )
    ]


def _retranslate(conn: sqlite3.Connection, selection: Selection) -> int:
    where, params = _deliveries(selection, ("translated", "quarantined"))
    return conn.execute(
        f"UPDATE inbox SET state = 'untranslated', reason = NULL WHERE raw_body IS NOT NULL"
        f" AND {where}",
        params,
    ).rowcount


def _deliveries(selection: Selection, states: Sequence[str]) -> tuple[str, list[Any]]:
    """The inbox rows a selection names, in `states`."""
    clauses = [f"state IN ({_marks(states)})"]
    params: list[Any] = list(states)
    if selection.ids and not selection.deliveries:
        clauses.append("0")  # calls were named, and no delivery
    if selection.deliveries:
        clauses.append(f"id IN ({_marks(selection.deliveries)})")
        params.extend(selection.deliveries)
    if selection.source is not None:
        clauses.append("source = ?")
        params.append(selection.source)
    if selection.since is not None:
        clauses.append("received_at >= ?")
        params.append(selection.since)
    return " AND ".join(clauses), params


def _stats(conn: sqlite3.Connection) -> OutboxStats:
    backlog = _backlog(conn)
    (delivered,) = conn.execute(DELIVERED_SQL).fetchone()
    (inbox,) = conn.execute("SELECT COUNT(*) FROM inbox").fetchone()
    (raw,) = conn.execute("SELECT COUNT(*) FROM inbox WHERE raw_body IS NOT NULL").fetchone()
    paused = conn.execute("SELECT value FROM meta WHERE key = 'paused'").fetchone()
    return OutboxStats(
        pending=backlog.pending,
        delivered=delivered,
        dead=backlog.dead,
        oldest_pending_at=backlog.oldest_pending_at,
        inbox=inbox,
        raw_payloads=raw,
        paused=paused[0] if paused else None,
        untranslated=backlog.untranslated,
        oldest_untranslated_at=backlog.oldest_untranslated_at,
        quarantined=backlog.quarantined,
    )


def _dead_letters(conn: sqlite3.Connection, limit: int) -> list[DeadLetter]:
    rows = conn.execute(
        "SELECT o.id, o.route, i.source, o.event_id, o.reason, o.created_at, o.attempts, o.body"
        " FROM outbox AS o LEFT JOIN inbox AS i ON i.id = o.inbox_id"
        " WHERE o.state = 'dead' ORDER BY o.id LIMIT ?",
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
            body=r[7],
        )
        for r in rows
    ]
    quarantined = conn.execute(
        "SELECT id, source, provider_event_id, reason, received_at, raw_body FROM inbox"
        " WHERE state = 'quarantined' ORDER BY id LIMIT ?",
        (limit,),
    )
    return [*calls, *map(quarantined_letter, quarantined)]


def _where(selection: Selection) -> tuple[str, list[Any]]:
    states = "('dead', 'delivered')" if selection.include_delivered else "('dead')"
    clauses: list[str] = [f"state IN {states}"]
    params: list[Any] = []
    if selection.deliveries and not selection.ids:
        clauses.append("0")  # deliveries were named, and no call
    if selection.ids:
        clauses.append(f"id IN ({_marks(selection.ids)})")
        params.extend(selection.ids)
    if selection.source is not None:
        clauses.append("inbox_id IN (SELECT id FROM inbox WHERE source = ?)")
        params.append(selection.source)
    if selection.since is not None:
        clauses.append("created_at >= ?")
        params.append(selection.since)
    return " AND ".join(clauses), params


def _replay(conn: sqlite3.Connection, selection: Selection, now: float) -> int:
    where, params = _where(selection)
    return conn.execute(
        # A replay starts the row's life again: its max age counts from now.
        "UPDATE outbox SET state = 'pending', claimed = 0, next_at = ?, attempts = 0,"
        f" created_at = ?, done_at = NULL, reason = NULL WHERE {where}",
        (now, now, *params),
    ).rowcount


def _purge(conn: sqlite3.Connection, selection: Selection) -> int:
    where, params = _where(msgspec.structs.replace(selection, include_delivered=False))
    calls = conn.execute(f"DELETE FROM outbox WHERE {where}", params).rowcount
    # Quarantined deliveries lose their raw payload; the inbox row stays, so that a
    # redelivery of one is still recognised.
    where, params = _deliveries(selection, ("quarantined",))
    return (
        calls
        + conn.execute(
            f"UPDATE inbox SET state = 'dropped', raw_body = NULL, headers = NULL WHERE {where}",
            params,
        ).rowcount
    )


_CLEAN_DELIVERED: Final = (
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
    " WHERE state = 'delivered' AND done_at < ? LIMIT ?)"
)
# Retention leaves untranslated and quarantined deliveries alone: their raw payload is all
# there is of them until they are translated or purged.
_CLEAN_RAW: Final = (
    "UPDATE inbox SET raw_body = NULL, headers = NULL WHERE id IN (SELECT id FROM inbox"
    " WHERE raw_body IS NOT NULL AND received_at < ? AND state = 'translated' LIMIT ?)"
)
_CLEAN_INBOX: Final = (
    "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE received_at < ?"
    " AND state IN ('translated', 'dropped')"
    " AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.inbox_id = inbox.id) LIMIT ?)"
)


def _execute(conn: sqlite3.Connection, statement: str, params: tuple[Any, ...]) -> int:
    return conn.execute(statement, params).rowcount


def _set_meta(conn: sqlite3.Connection, key: str, value: str | None) -> None:
    if value is None:
        conn.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _marks(ids: Sequence[object]) -> str:
    return ",".join("?" * len(ids))
