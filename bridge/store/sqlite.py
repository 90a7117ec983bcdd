"""The SQLite outbox store: one writer thread, group commit, WAL, `synchronous=FULL`.

One dedicated thread owns the connection and serialises every operation (SQLite has one
writer anyway, and committing off the event loop keeps intake responsive); it runs the
store's operations (`bridge.store.operations`, their statements in `queries/sqlite.sql`).
Deliveries appended concurrently are committed together: the thread takes every `append`
waiting in its queue, runs them in one transaction (a failing one alone rolled back, in
its own savepoint) and commits them with one fsync. Each caller is answered only after
that commit, so durability per delivery is the same as a commit each, at a fraction of
the cost.

The statements of a group run on the event loop of its callers while the thread waits,
and the thread commits (`_on_their_loops` says why); everything else runs on the thread,
save reads, which run on a read-only connection beside it (`_read`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import msgspec
import structlog

from bridge.errors import ConfigError, StoreRefused, StoreUnavailable
from bridge.store import AcceptResult, Delivery, settle
from bridge.store.base import SQLStore
from bridge.store.sql import Op, Step, drive, load

__all__ = ["SQLiteStore"]

T = TypeVar("T")
log = structlog.get_logger("bridge.store")
SYNCHRONOUS: Final = ("FULL", "NORMAL", "EXTRA")

#: How long the writer thread waits for another process's write lock.
BUSY_TIMEOUT_MS: Final = 5000
#: Most deliveries one group commit takes; bounds how long one transaction holds the lock.
MAX_GROUP: Final = 512

_QUERIES: Final = load("sqlite")
_APPEND: Final = _QUERIES["append"]
_encoder: Final = msgspec.json.Encoder()


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
    if isinstance(error, sqlite3.Error):
        return _unavailable(error)
    return error


def _unavailable(error: sqlite3.Error) -> StoreUnavailable:
    """What SQLite refuses for the values it was given (too big, a constraint) is
    `StoreRefused`; anything else (locked, I/O, a full disk) passes."""
    refused = isinstance(error, sqlite3.DataError | sqlite3.IntegrityError)
    return (StoreRefused if refused else StoreUnavailable)(f"sqlite: {error}")


class SQLiteStore(SQLStore):
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
            raise _unavailable(error) from error

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
        return await self._release_claims(now)

    async def lead(self) -> int:
        # `recover` took the file lock: this process is the one forwarder already.
        return 0

    async def lost(self) -> None:
        await asyncio.Event().wait()  # the file lock lasts as long as the process

    async def append(self, delivery: Delivery) -> AcceptResult:
        return await self._submit(_appended, (delivery,), grouped=True)

    async def _transact(self, operation: Callable[..., Op[T]], *args: Any, read: bool = False) -> T:
        if read:
            return await self._read(_steps, operation, args)
        return await self._call(_steps, operation, args)

    async def _erased(self) -> None:
        """A checkpoint, awaited, so that the caller's answer means gone: the WAL's old
        frames still hold what was just erased. Its failure is logged, not the caller's
        (the erasure itself is committed; the next checkpoint writes out what is left)."""
        checkpoint = self._submit(_checkpoint, ())
        checkpoint.add_done_callback(_checkpoint_failed)
        await asyncio.wait([checkpoint])


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


def _steps(conn: sqlite3.Connection, operation: Callable[..., Op[T]], args: tuple[Any, ...]) -> T:
    """Run an operation's statements on `conn` (`bridge.store.sql`)."""

    def run(step: Step) -> Any:
        sql = _QUERIES[step.query]
        if step.kind == "write":
            conn.executemany(sql, step.params)
            return None
        params = step.params
        if "?*" in sql:  # a list parameter, first, spread; any others after it
            listed, *others = params
            sql = sql.replace("?*", ",".join(["(?)"] * len(listed)))
            params = [*listed, *others]
        cursor = conn.execute(sql, _bound(params))
        return cursor.fetchall() if step.kind == "rows" else cursor.rowcount

    return drive(operation(*args), run)


def _bound(params: Any) -> Any:
    """A list parameter as JSON text, which the statement reads with `json_each`."""
    if isinstance(params, dict):
        return {k: _listed(v) for k, v in params.items()}
    return [_listed(v) for v in params]


def _listed(value: Any) -> Any:
    return _encoder.encode(value).decode() if isinstance(value, list) else value


def _appended(conn: sqlite3.Connection, delivery: Delivery) -> AcceptResult:
    """Intake's append, the hot path: one statement, run in a group on the event loop."""
    inserted = conn.execute(
        _APPEND,
        (
            delivery.source,
            delivery.provider_event_id,
            delivery.received_at,
            delivery.raw_body,
            _encoder.encode(delivery.headers),
            "untranslated",
        ),
    ).rowcount
    return "accepted" if inserted else "duplicate"
