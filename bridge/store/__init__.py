"""The outbox store: what it promises, in domain terms, and how a backend is chosen.

The three stages share only the store. Intake `append`s a verified delivery to the inbox
(untranslated; deliveries arriving together share a commit). The translate stage takes
the `untranslated` ones in arrival order and `record`s what their handlers made of them:
the outbox rows of their calls and each delivery translated (or quarantined), in one
transaction. The forwarder then claims rows, sends them and reports back (delivered,
retry, dead letter). What a batch writes is decided once, in pure code, for both backends
(`bridge.store.identity`); each backend (`sqlite:///`, `postgresql://`) supplies only its
statements; the contract tests run against each.

One forwarder at a time per store, however many processes share it: a forwarder first
`lead`s (SQLite: the process that opened the file for forwarding; PostgreSQL: the instance
holding the leader lock, the others stand by and take webhooks) and stops forwarding when
`lost` returns.

Erasure lives here too, because only the store knows what it holds. Every delivery is
linked to who it is about (`links`: hashes of the users, visitors and declared
identifiers its calls name). Accepting a `Forget` gathers the user's links (the user, the
visitors learned for them and their aliases, the identifiers declared beside the forget),
deletes the calls about them that are not in flight, drops the raw payloads of every
linked delivery, records a tombstone (a hash, never the id) so that nothing about them is
stored again, and makes the forget row claimable only once no earlier call for that user
is still on its way. Nothing is found by searching bodies: a substring of one user's id
is part of other users' data. Erasures and the writes that queue or return calls about
someone take turns (`operations._erasure_lock`): on PostgreSQL, where several instances
write at once, neither may miss what the other commits.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, Protocol, TypeVar

import msgspec

from bridge.errors import ConfigError
from bridge.events import About, Alias, Call, Forget, ForgetVisitor, Identify, Output, Track
from bridge.store.views import DeliveryDetail, DeliveryRow, Rates, Result, SourceActivity

__all__ = [
    "BACKLOG_SQL",
    "DELIVERED_SQL",
    "ERASED_REASON",
    "ROUTES",
    "AcceptResult",
    "Backlog",
    "DeadLetter",
    "Delivery",
    "OutboxRow",
    "OutboxStats",
    "Retention",
    "Route",
    "Selection",
    "Store",
    "StoredDelivery",
    "Translation",
    "backlog_of",
    "declared",
    "derived_event_id",
    "hash_subject",
    "links",
    "named",
    "open_store",
    "quarantined_letter",
    "reconcile_key",
    "route_of",
    "settle",
    "stored_delivery",
    "subject_of",
    "visitor_of",
    "with_event_id",
]

T = TypeVar("T")
Route = Literal["track", "identify", "forget"]
ROUTES: Final[tuple[Route, ...]] = ("track", "identify", "forget")
AcceptResult = Literal["accepted", "duplicate"]


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One verified provider webhook as intake stores it (`append`), or a delivery the
    bridge makes itself with its calls (`accept`: an operator's forget)."""

    source: str
    provider_event_id: str
    received_at: float
    raw_body: bytes | None = None
    headers: dict[str, str] = {}  # what translation reads (`kept_headers`), never a secret
    calls: list[Output] = []  # `accept` only: what it becomes


class OutboxRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    route: Route
    body: bytes  # the call as compact JSON, exactly as sent
    created_at: float
    attempts: int


class StoredDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery as the inbox keeps it, for the translate stage."""

    id: int
    source: str
    provider_event_id: str
    received_at: float
    raw_body: bytes | None  # None: erased before it was translated (a purge)
    headers: dict[str, str]


class Translation(msgspec.Struct, frozen=True, kw_only=True):
    """What the translate stage made of a stored delivery: its calls and instructions, or
    why its handler could not translate it (the delivery is then quarantined)."""

    delivery: StoredDelivery
    outputs: list[Output] = []
    failure: str | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A call Millimetric refused or that failed for too long (`kind` "call"), or a
    delivery its handler could not translate, quarantined (`kind` "delivery": `route` is
    None, `id` is the inbox's, `body` the raw payload)."""

    id: int
    route: Route | None
    source: str | None
    event_id: str | None
    reason: str
    created_at: float
    attempts: int
    body: bytes
    kind: Literal["call", "delivery"] = "call"
    provider_event_id: str | None = None


class Backlog(msgspec.Struct, frozen=True, kw_only=True):
    """What the health check and the gauges watch, read from partial indexes: its cost
    follows the pending and dead rows, not the delivered rows and payloads kept."""

    pending: int
    dead: int
    oldest_pending_at: float | None
    untranslated: int = 0  # deliveries stored, waiting for the translate stage
    oldest_untranslated_at: float | None = None
    quarantined: int = 0  # deliveries their handler could not translate


#: The backlog's counts, each read from a partial index alone (on SQLite, `dead` reaches
#: `outbox_done` only when the query repeats its `state != 'pending'`).
BACKLOG_SQL: Final = (
    "SELECT (SELECT COUNT(*) FROM outbox WHERE state = 'pending'),"
    " (SELECT COUNT(*) FROM outbox WHERE state != 'pending' AND state = 'dead'),"
    " (SELECT created_at FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 1),"
    " (SELECT COUNT(*) FROM inbox WHERE state = 'untranslated'),"
    " (SELECT received_at FROM inbox WHERE state = 'untranslated' ORDER BY id LIMIT 1),"
    " (SELECT COUNT(*) FROM inbox WHERE state = 'quarantined')"
)


def stored_delivery(row: Sequence[Any]) -> StoredDelivery:
    """A row of `id, source, provider_event_id, received_at, raw_body, headers`."""
    return StoredDelivery(
        id=row[0],
        source=row[1],
        provider_event_id=row[2],
        received_at=row[3],
        raw_body=None if row[4] is None else bytes(row[4]),
        headers=_headers.decode(row[5]) if row[5] else {},
    )


def quarantined_letter(row: Sequence[Any]) -> DeadLetter:
    """A row of `id, source, provider_event_id, reason, received_at, raw_body`."""
    return DeadLetter(
        kind="delivery",
        id=row[0],
        route=None,
        source=row[1],
        provider_event_id=row[2],
        event_id=None,
        reason=row[3] or "",
        created_at=row[4],
        attempts=1,
        body=b"" if row[5] is None else bytes(row[5]),
    )


_headers: Final = msgspec.json.Decoder(dict[str, str])


def backlog_of(row: Sequence[Any]) -> Backlog:
    pending, dead, oldest, untranslated, oldest_untranslated, quarantined = row
    return Backlog(
        pending=pending,
        dead=dead,
        oldest_pending_at=oldest,
        untranslated=untranslated,
        oldest_untranslated_at=oldest_untranslated,
        quarantined=quarantined,
    )


#: `stats` adds the delivered rows to the backlog, through the same index as `dead`.
DELIVERED_SQL: Final = (
    "SELECT COUNT(*) FROM outbox WHERE state != 'pending' AND state = 'delivered'"
)


class OutboxStats(msgspec.Struct, frozen=True, kw_only=True):
    pending: int
    delivered: int
    dead: int
    oldest_pending_at: float | None
    inbox: int
    raw_payloads: int
    paused: str | None  # why forwarding is paused, as the forwarder last said
    untranslated: int = 0
    oldest_untranslated_at: float | None = None
    quarantined: int = 0


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """Which rows `replay`, `purge` or `retranslate` act on; empty means every dead letter
    and quarantined delivery (every stored delivery, for `retranslate`). `ids` name calls
    (outbox rows), `deliveries` stored deliveries (inbox rows); naming either limits the
    selection to what it names."""

    ids: Sequence[int] = ()
    deliveries: Sequence[int] = ()
    source: str | None = None
    since: float | None = None
    include_delivered: bool = False


class Retention(msgspec.Struct, frozen=True, kw_only=True):
    """How long things are kept, in seconds."""

    delivered: float = 7 * 86400
    raw_payloads: float = 7 * 86400
    inbox: float = 30 * 86400  # redeliveries are recognised this long (providers retry for days)


class Store(Protocol):
    """The domain operations the bridge needs from a durable store."""

    async def open(self) -> None:
        """Connect and apply migrations; refuse a database newer than the code."""

    async def close(self) -> None: ...

    async def recover(self, now: float) -> int:
        """At start-up, before the forwarder: make rows claimed by a forwarder that is gone
        due again; return how many. SQLite takes its one-forwarder lock here (a second
        process on the file fails); PostgreSQL tries the leader lock once and releases
        claims only if it got it (another instance may be forwarding)."""

    async def lead(self) -> int:
        """Wait until this instance is the store's one forwarder; then make rows claimed by
        a forwarder that is gone due again, and return how many. SQLite leads at once
        (`recover` took the lock)."""

    async def lost(self) -> None:
        """Return once this instance is no longer the one forwarder (the connection holding
        its leader lock failed); never, for SQLite."""

    async def erase(self, user_id: str) -> int:
        """Delete the calls about a forgotten user (except sends in flight) and the raw
        payloads of the deliveries linked to them; the forwarder runs it before and after
        sending the forget, for what was in flight when the forget was accepted. Return
        how many were erased."""

    async def append(self, delivery: Delivery) -> AcceptResult:
        """Store a verified delivery durably, untranslated (its `calls` are ignored); a
        second delivery with the same source and provider event id adds nothing and says
        `duplicate`. Deliveries appended together share a commit."""

    async def untranslated(self, limit: int) -> list[StoredDelivery]:
        """The oldest deliveries waiting for the translate stage, in arrival order."""

    async def record(self, translations: Sequence[Translation]) -> None:
        """In one transaction: each delivery's calls written and its instructions carried
        out, or the delivery quarantined with its failure; a delivery already translated
        (by another instance, or twice in one batch) is left as it is."""

    async def retranslate(self, selection: Selection) -> int:
        """Make selected stored deliveries (translated or quarantined, raw body kept)
        untranslated again, so that the stage runs their handler once more; how many."""

    async def accept(self, delivery: Delivery) -> AcceptResult:
        """`append` and `record` of a delivery and its calls in one transaction (for calls
        the bridge makes itself, such as an operator's forget)."""

    async def claim(self, route: Route, limit: int, max_bytes: int, now: float) -> list[OutboxRow]:
        """Take due rows of `route` in order, at most `limit` and `max_bytes` of bodies
        (a single larger row is still returned alone)."""

    async def delivered(self, ids: Sequence[int], now: float) -> None: ...

    async def retry(self, ids: Sequence[int], next_at: float, *, count_attempt: bool) -> None:
        """Release claimed rows to be tried again at `next_at`."""

    async def dead_letter(self, ids: Sequence[int], reason: str, now: float) -> None: ...

    async def hasten(self, route: Route, now: float) -> int:
        """Make the route's unclaimed pending rows that wait on a retry due `now`; how many."""
        ...

    async def backlog(self) -> Backlog:
        """For /readyz and the gauges: cheap at any table size, and never holding up intake.
        Raises `StoreUnavailable` when the store cannot take a delivery now."""
        ...

    async def stats(self, now: float) -> OutboxStats:
        """Everything counted, for operators: scans whole tables, so it may take seconds on
        a big store (without holding up intake)."""
        ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    async def replay(self, selection: Selection, now: float) -> int:
        """Make the selected rows pending again, due now; return how many."""

    async def purge(self, selection: Selection) -> int:
        """Delete the selected dead letters; return how many."""

    async def cleanup(self, retention: Retention, now: float) -> dict[str, int]:
        """Drop what retention allows; return counts by kind."""

    async def set_paused(self, reason: str | None) -> None: ...

    async def received(self, source: str, delivery_ids: Sequence[str]) -> set[str]:
        """Which of `delivery_ids` the inbox holds for `source` (kept for
        `Retention.inbox`): the events a backfill skips."""
        ...

    async def first_received(self, source: str) -> float | None:
        """When the oldest delivery of `source` that the inbox holds arrived; None if none."""
        ...

    async def reconciled_until(self, source: str) -> float | None:
        """The end of the last window of events the periodic reconcile of `source` listed
        in full (its checkpoint); None before the first."""
        ...

    async def set_reconciled_until(self, source: str, until: float) -> None: ...

    # The console's reads (`bridge.store.views`).

    async def deliveries(
        self,
        *,
        source: str | None = None,
        result: Result | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[DeliveryRow]:
        """The newest deliveries first (of `source`, with `result`), those older than the
        delivery `before` when paging on."""
        ...

    async def delivery(self, inbox_id: int) -> DeliveryDetail | None:
        """A delivery, its kept headers and the calls it became; None if not stored."""
        ...

    async def raw_body(self, inbox_id: int) -> bytes | None:
        """A delivery's raw body while it is kept."""
        ...

    async def activity(self, sources: Sequence[str], now: float) -> list[SourceActivity]:
        """Each source's latest delivery and its counts over the last hour and day."""
        ...

    async def rates(self, since: float, step: float, buckets: int) -> Rates:
        """Deliveries stored and calls delivered or dead, a bucket of `step` seconds."""
        ...


def reconcile_key(source: str) -> str:
    """The `meta` key of a source's reconcile checkpoint."""
    return f"reconciled_until:{source}"


def route_of(call: Call) -> Route:
    if isinstance(call, Track):
        return "track"
    if isinstance(call, Identify):
        return "identify"
    return "forget"


def subject_of(call: Call) -> str | None:
    """Who a call is about, as a hash: tombstones and purges match on it without storing
    a forgotten user's id."""
    user_id = call.user_id
    return hash_subject(user_id) if user_id else None


def hash_subject(user_id: str) -> str:
    return hashlib.sha256(b"millimetric-bridge subject\x00" + user_id.encode()).hexdigest()[:40]


def visitor_of(call: Call) -> str | None:
    """The visitor a call is about, as a hash: a forget of the user learned for that
    visitor reaches the call even when it names no user."""
    anonymous_id = call.anonymous_id if isinstance(call, Track | Identify) else None
    return hash_subject(anonymous_id) if anonymous_id else None


def links(outputs: Iterable[Output | None]) -> set[str]:
    """Who a delivery is about, as hashes: every user, visitor and declared identifier its
    calls and instructions name. Erasure finds a user's deliveries through these links,
    never by searching their bodies (a substring matches other users' data)."""
    found: set[str] = set()
    for item in outputs:
        if isinstance(item, Track | Identify):
            ids: tuple[str | None, ...] = (item.user_id, item.anonymous_id)
        elif isinstance(item, Forget):
            ids = (item.user_id,)
        elif isinstance(item, Alias):
            ids = (item.alias, item.anonymous_id)
        elif isinstance(item, ForgetVisitor):
            ids = (item.anonymous_id,)
        elif isinstance(item, About):
            ids = (item.identifier,)
        else:  # a Purge names prefixes, not anyone; None: an instruction carried out
            ids = ()
        found.update(hash_subject(i) for i in ids if i)
    return found


#: What a forget sets as the reason of a quarantined delivery it erased (the old reason
#: goes too: an exception's message may quote the payload).
ERASED_REASON: Final = "erased: its payload named a forgotten user"


def named(raw_body: bytes) -> set[str]:
    """Who a quarantined delivery may be about, as hashes: its handler could not say, so
    erasure reads what the body names. Every whole string value of its JSON (never a part
    of one, nor a number: `"pending_webhooks": 1` is nobody); of a body that is not JSON,
    every run of word characters, `.`, `@`, `+` and `-` (an email, an id)."""
    try:
        document = msgspec.json.decode(raw_body)
    except (msgspec.DecodeError, RecursionError):
        return {hash_subject(w.decode(errors="replace")) for w in _WORDS.findall(raw_body)}
    found: set[str] = set()
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if value:
                found.add(hash_subject(value))
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


_WORDS: Final = re.compile(rb"[\w.@+-]+")


def declared(outputs: Iterable[Output]) -> list[str]:
    """The identifiers a delivery names in `About`s, as hashes: beside a `Forget`, they
    are the forgotten user's too (a Stripe customer deleted, whose own deliveries may
    never have named the app's user id)."""
    return sorted({hash_subject(o.identifier) for o in outputs if isinstance(o, About)})


def derived_event_id(source: str, provider_event_id: str, index: int) -> str:
    """A stable event_id for a call its handler did not name: the same delivery always
    yields the same ids, so a redelivery or replay cannot count twice."""
    digest = hashlib.sha256(f"{source}\x00{provider_event_id}\x00{index}".encode())
    return digest.hexdigest()[:32]


def settle(future: asyncio.Future[T], result: T | None, error: BaseException | None = None) -> None:
    """Answer a caller waiting on `future` with `error`, else `result`."""
    if future.done():  # the caller went away (client disconnected); the work still happened
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]  # None only beside an error


def with_event_id(
    call: Call, source: str, provider_event_id: str, index: int
) -> tuple[Call, str | None]:
    """The call as stored, and its key (unique in the outbox): a track's own event_id, else
    one derived from its place in the delivery; other calls are keyed by that place alone,
    so that translating a delivery again queues nothing twice."""
    if not isinstance(call, Track):
        return call, derived_event_id(source, provider_event_id, index)
    if call.event_id is None:
        event_id = derived_event_id(source, provider_event_id, index)
        call = msgspec.structs.replace(call, event_id=event_id)
    return call, call.event_id


def open_store(database_url: str, *, sqlite_synchronous: str = "FULL") -> Store:
    """The backend for a `BRIDGE_DATABASE_URL` (not yet opened)."""
    if database_url.startswith("sqlite:///"):
        from bridge.store.sqlite import SQLiteStore

        return SQLiteStore(database_url.removeprefix("sqlite:///"), synchronous=sqlite_synchronous)
    if database_url.startswith(("postgresql://", "postgres://")):
        from bridge.store.postgres import PostgresStore

        return PostgresStore(database_url)
    raise ConfigError("BRIDGE_DATABASE_URL", "must be sqlite:///PATH or postgresql://...")
