"""The store's operations, written once for every backend.

Each is a generator of named statements (`bridge.store.sql`), run in one transaction by a
driver (`bridge.store.sqlite`, `bridge.store.postgres`): what to write and in which order
is decided here, what the statements look like in each dialect is in `queries/`. The
pure decisions of a translated batch (aliases, identities, links, tombstones) are in
`bridge.store.identity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from bridge.events import Forget, ForgetVisitor, Purge
from bridge.store import (
    ERASED_REASON,
    AcceptResult,
    Backlog,
    DeadLetter,
    Delivery,
    OutboxRow,
    OutboxStats,
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
from bridge.store.sql import Op, count, rows, write
from bridge.store.views import CallView, DeliveryDetail, DeliveryRow, Rates, Result, SourceActivity

__all__ = [
    "CLEANUP_CHUNK",
    "LEASE_SECONDS",
    "accept",
    "activity",
    "append",
    "backlog",
    "claim",
    "clean",
    "dead_letter",
    "dead_letters",
    "delivered",
    "deliveries",
    "delivery",
    "erase",
    "first_received",
    "hasten",
    "meta",
    "nothing",
    "purge",
    "rates",
    "raw_body",
    "received",
    "record",
    "release_all_claims",
    "replay",
    "retranslate",
    "retry",
    "set_meta",
    "stats",
    "untranslated",
]

#: How long a claimed row is the claimer's: past it, the row is due again, whoever took it.
LEASE_SECONDS: Final = 900.0
#: Rows retention drops a transaction (so that intake interleaves with a big cleanup).
CLEANUP_CHUNK: Final = 5000

_encoder: Final = msgspec.json.Encoder()
_forget_decoder: Final = msgspec.json.Decoder(Forget)
_headers_decoder: Final = msgspec.json.Decoder(dict[str, str])


# -- intake and the translate stage ------------------------------------------------------------


def append(delivery: Delivery, state: str = "untranslated") -> Op[int | None]:
    """The delivery's inbox row; its id, or None for a redelivery. (Intake's own append,
    the hot path, is each driver's: the same statement without the second.)"""
    key = (delivery.source, delivery.provider_event_id)
    headers = _encoder.encode(delivery.headers)
    if not (
        yield from count("append", *key, delivery.received_at, delivery.raw_body, headers, state)
    ):
        return None
    ((inbox_id,),) = yield from rows("inbox_id", *key)
    return int(inbox_id)


def accept(delivery: Delivery) -> Op[AcceptResult]:
    """A delivery the bridge made itself, stored with its calls (`Store.accept`)."""
    yield from _erasure_lock(erases=not plannable(delivery.calls))
    inbox_id = yield from append(delivery, "translated")
    if inbox_id is None:
        return "duplicate"
    planned = Planned(
        inbox_id=inbox_id,
        source=delivery.source,
        provider_event_id=delivery.provider_event_id,
        outputs=delivery.calls,
    )
    if plannable(planned.outputs):
        yield from _write_plan([planned], delivery.received_at)
    else:
        yield from _write_calls(planned, delivery.received_at)
    return "accepted"


def untranslated(limit: int) -> Op[list[StoredDelivery]]:
    return [stored_delivery(row) for row in (yield from rows("untranslated", limit))]


def record(translations: Sequence[Translation], now: float) -> Op[bool]:
    """Mark the batch's deliveries that are still untranslated (one another translator took
    meanwhile is left to it), then write the calls of those translated: planned together,
    save that a delivery that erases goes alone, in order. Whether anything stored was
    erased (the WAL's old frames may still hold it)."""
    yield from _erasure_lock(erases=not all(plannable(t.outputs) for t in translations))
    found = yield from rows("lock_untranslated", [t.delivery.id for t in translations])
    claimed = {int(inbox_id) for (inbox_id,) in found}
    yield from write(
        "mark",
        [
            (
                "translated" if t.failure is None else "quarantined",
                t.failure,
                len(t.outputs),
                t.delivery.id,
            )
            for t in translations
            if t.delivery.id in claimed
        ],
    )
    erased = False
    for run, alone in segments(translations, claimed):
        erased = (yield from _write_plan(run, now)) or erased
        if alone is not None:
            erased = (yield from _write_calls(alone, now)) or erased
    quarantined = quarantined_names(translations, claimed)
    if quarantined:
        forgotten = yield from _forgotten_among(sorted(set().union(*quarantined.values())))
        about = [inbox_id for inbox_id, names in quarantined.items() if names & forgotten]
        erased = (yield from _drop_quarantined(about)) or erased
    return erased


def retranslate(selection: Selection) -> Op[int]:
    return (yield from count("retranslate", **_deliveries(selection)))


def _write_plan(run: Sequence[Planned], now: float) -> Op[bool]:
    """Many deliveries' calls (`bridge.store.identity`): what is known of their visitors and
    users read in two statements, the plan written in a few more; whether a delivery's raw
    body was dropped (about a forgotten user)."""
    if not run:
        return False
    visitors, subjects = wanted(run)
    known = Known()
    if visitors:
        for given, target, user in (yield from rows("known_visitors", visitors)):
            if target != given:
                known.targets[given] = target
            if user is not None:
                known.users[target] = user
    if subjects:
        known.forgotten = yield from _forgotten_among(subjects)
    planned = plan(run, known)
    yield from write("upsert_aliases", sorted(planned.aliases.items()))
    yield from write(
        "upsert_identities",
        [(v, user, hash_subject(user)) for v, user in sorted(planned.identities.items())],
    )
    yield from _link(planned.links)
    yield from _queue(planned.rows, now)
    yield from write("drop_raw", [(inbox_id,) for inbox_id in planned.emptied])
    return bool(planned.emptied)


def _write_calls(delivery: Planned, now: float) -> Op[bool]:
    """A delivery that erases, alone: its links, its erasures (`Purge`, `ForgetVisitor`,
    `Forget`), then its other calls as planned; whether anything stored was erased."""
    yield from _link([(delivery.inbox_id, links(delivery.outputs))])
    erased = False
    for index, item in enumerate(delivery.outputs):
        forget: Forget | None = None
        if isinstance(item, Purge):
            yield from _purge_prefixes(delivery.source, item, now)
        elif isinstance(item, ForgetVisitor):
            target = yield from _target(item.anonymous_id)
            known = yield from rows("user_of_visitor", target)
            if known:
                forget = Forget(user_id=known[0][0])
                yield from _link([(delivery.inbox_id, {hash_subject(known[0][0])})])
            else:  # no user to forget at Millimetric; what is stored about the visitor goes
                visitors = {hash_subject(item.anonymous_id), hash_subject(target)}
                yield from count("drop_linked_raw", sorted(visitors))
                yield from _erase_quarantined(visitors)
        elif isinstance(item, Forget):
            forget = item
        else:
            continue
        erased = True
        if forget is not None:
            yield from _forget(forget.user_id, declared(delivery.outputs), now)
            _, key = with_event_id(forget, delivery.source, delivery.provider_event_id, index)
            yield from _queue([Row(inbox_id=delivery.inbox_id, call=forget, event_id=key)], now)
    return (yield from _write_plan([delivery], now)) or erased


def _queue(queued: Sequence[Row], now: float) -> Op[None]:
    yield from write(
        "queue",
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
            for row in queued
        ],
    )


def _link(linked: Sequence[tuple[int, set[str]]]) -> Op[None]:
    """Record who each delivery is about (`links`), for erasure. In key order, so that two
    transactions take the keys in one order."""
    pairs = sorted((subject, inbox_id) for inbox_id, subjects in linked for subject in subjects)
    yield from write("link", pairs)


def _target(anonymous_id: str) -> Op[str]:
    found = yield from rows("alias_target", anonymous_id)
    return str(found[0][0]) if found else anonymous_id


def _forgotten_among(subjects: list[str]) -> Op[set[str]]:
    return {subject for (subject,) in (yield from rows("forgotten_among", subjects))}


# -- erasure ---------------------------------------------------------------------------------


def _erasure_lock(*, erases: bool) -> Op[None]:
    """Taken first, until commit, by what erases (alone) and by what writes or returns
    calls about someone (shared: these do not wait for one another). Otherwise, on
    PostgreSQL, each reads before the other commits: a forget misses a batch's new calls
    or a send returned to the queue, the batch or the return misses the forget, and a
    call about a forgotten user is left to be sent. Taken before any row is locked, so
    that it cannot join a deadlock. (SQLite runs one write transaction at a time.)"""
    if erases:
        yield from rows("erasure_lock")
    else:
        yield from rows("erasure_lock_shared")


def _forget(user_id: str, beside: list[str], now: float) -> Op[None]:
    """Erase at once what is linked to a user, and remember them as forgotten.

    The user's links are their own id, the visitors learned for them and those visitors'
    aliases, and the identifiers declared beside the forget (`beside`). Calls about the
    visitors become calls about the user (so the forget waits for those in flight, and
    `erase` finds them later), deliveries linked to any of them become linked to the user,
    then everything linked to the user goes, and the quarantined deliveries that name any
    of them. Sends in flight stay: the forget row waits for them, `erase` removes them once
    they are sent, and a failed one is dropped when it returns. The caller took
    `_erasure_lock` alone, first in the transaction."""
    subject = hash_subject(user_id)
    visitors = [v for (v,) in (yield from rows("visitors_of", subject, subject))]
    related = sorted({*beside, *(hash_subject(v) for v in visitors)} - {subject})
    if related:
        yield from count("calls_of_visitors_to_user", subject, related)
        yield from count("links_of_visitors_to_user", subject, related)
    yield from count("remember_forgotten", subject, now)
    yield from count("forget_aliases", subject)
    yield from count("forget_identities", subject)
    yield from erase(subject, now)
    yield from _erase_quarantined({subject, *related})


def erase(subject: str, now: float) -> Op[int]:
    """Delete the calls about a subject (not forgets, not sends in flight) and drop the raw
    payloads of the deliveries linked to it; how many of both."""
    calls = yield from count("erase_calls", subject, now)
    return calls + (yield from count("drop_linked_raw", [subject]))


def _erase_quarantined(subjects: set[str]) -> Op[bool]:
    """Erase the quarantined deliveries whose bodies name any of `subjects` (`named`):
    nothing links them to anyone, their handler could not say whom they are about. A scan
    of every quarantined body, on every forget: quarantine is the exception, and a forget
    is rare."""
    found = yield from rows("quarantined_bodies")
    return (yield from _drop_quarantined([i for i, body in found if named(bytes(body)) & subjects]))


def _drop_quarantined(ids: Sequence[int]) -> Op[bool]:
    """Quarantined deliveries about a forgotten user: dropped, with their payloads and
    reasons (a reason may quote the payload)."""
    yield from write("drop_quarantined", [(ERASED_REASON, inbox_id) for inbox_id in ids])
    return bool(ids)


def _upto(prefix: str) -> str:
    """Everything from `prefix` up to (not including) this starts with it: a range the
    indexes serve, where LIKE would need escaping and a scan."""
    return prefix + "\U0010ffff"


def _purge_prefixes(source: str, purge: Purge, now: float) -> Op[None]:
    """Carry out a `Purge`: the source's matching deliveries lose their raw payloads and
    calls (forgets and sends in flight excepted); learned identities of matching users go."""
    deliveries = (source, purge.deliveries, _upto(purge.deliveries))
    yield from count("purge_prefix_calls", *deliveries, now)
    yield from count("purge_prefix_raw", *deliveries)
    users = (purge.users, _upto(purge.users))
    yield from count("purge_prefix_aliases", *users)
    yield from count("purge_prefix_identities", *users)


# -- the forwarder ---------------------------------------------------------------------------


def release_all_claims(now: float) -> Op[int]:
    """The forwarder that held these claims is gone: what it had in flight is due again now
    (Millimetric deduplicates those sends by event_id), save calls about a forgotten user."""
    yield from _erasure_lock(erases=False)
    yield from count("drop_forgotten_claims")
    return (yield from count("release_claims", now))


def claim(route: Route, limit: int, max_bytes: int, now: float) -> Op[list[OutboxRow]]:
    if route == "forget":
        # Rows about a forgotten user that are not in flight (a send that was released or
        # whose lease ran out) are never sent: drop them, then take the forgets that no
        # send in flight for the same user could be overtaken by.
        yield from count("drop_overtaken", now)
        found = yield from rows("claim_forgets", now, limit)
    else:
        found = yield from rows("claim", route, now, limit)
    claimed: list[OutboxRow] = []
    size = 0
    for row_id, body, created_at, attempts in found:
        size += len(body) + 1
        if claimed and size > max_bytes:
            break
        claimed.append(
            OutboxRow(
                id=row_id, route=route, body=bytes(body), created_at=created_at, attempts=attempts
            )
        )
    yield from write("lease", [(now + LEASE_SECONDS, row.id) for row in claimed])
    return claimed


def delivered(ids: list[int], now: float) -> Op[None]:
    forgets = [bytes(body) for (body,) in (yield from rows("forget_bodies", ids))]
    yield from count("mark_delivered", now, ids)
    for body in forgets:
        # Millimetric has erased the user: the forget row and the sends that were in flight
        # at forget time go too (the forwarder then runs `erase` for the raw payloads of
        # the deliveries those sends came from).
        user_id = _forget_decoder.decode(body).user_id
        yield from count("drop_sent_about", hash_subject(user_id))


def retry(ids: list[int], next_at: float, count_attempt: bool) -> Op[None]:
    yield from _erasure_lock(erases=False)
    yield from count("retry", next_at, int(count_attempt), ids)
    # A send that failed after its user was forgotten is not tried again.
    yield from count("drop_forgotten_retries", ids)


def dead_letter(ids: list[int], reason: str, now: float) -> Op[None]:
    yield from count("dead_letter", now, reason, ids)


def hasten(route: Route, now: float) -> Op[int]:
    return (yield from count("hasten", now, route, now))


# -- operators -------------------------------------------------------------------------------


def nothing() -> Op[None]:
    """A transaction that does nothing: whether the store takes a write now."""
    return None
    yield  # a generator all the same


def backlog() -> Op[Backlog]:
    (found,) = yield from rows("backlog")
    return backlog_of(found)


def stats() -> Op[OutboxStats]:
    known = yield from backlog()
    ((delivered_count, inbox, raw, paused),) = yield from rows("counts")
    return OutboxStats(
        pending=known.pending,
        delivered=delivered_count,
        dead=known.dead,
        oldest_pending_at=known.oldest_pending_at,
        inbox=inbox,
        raw_payloads=raw,
        paused=paused,
        untranslated=known.untranslated,
        oldest_untranslated_at=known.oldest_untranslated_at,
        quarantined=known.quarantined,
    )


def dead_letters(limit: int) -> Op[list[DeadLetter]]:
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
        for r in (yield from rows("dead_calls", limit))
    ]
    quarantined = yield from rows("quarantined_letters", limit)
    return [*calls, *map(quarantined_letter, quarantined)]


def replay(selection: Selection, now: float) -> Op[int]:
    return (yield from count("replay", now=now, **_calls(selection)))


def purge(selection: Selection) -> Op[int]:
    """The selected dead letters deleted, and the selected quarantined deliveries dropped."""
    calls = yield from count(
        "purge_calls", **_calls(msgspec.structs.replace(selection, include_delivered=False))
    )
    return calls + (yield from count("purge_deliveries", **_deliveries(selection)))


def clean(query: str, before: float) -> Op[int]:
    """One chunk of what retention drops (`clean_delivered`, `clean_raw`, `clean_inbox`)."""
    return (yield from count(query, before, CLEANUP_CHUNK))


def meta(key: str) -> Op[str | None]:
    found = yield from rows("meta", key)
    return None if not found or found[0][0] is None else str(found[0][0])


def received(source: str, delivery_ids: list[str]) -> Op[set[str]]:
    """Which of these delivery ids of `source` the inbox holds: what a backfill skips."""
    found: set[str] = set()
    for start in range(0, len(delivery_ids), 500):  # well under SQLite's variable limit
        chunk = delivery_ids[start : start + 500]
        found.update(str(r[0]) for r in (yield from rows("received", chunk, source)))
    return found


def first_received(source: str) -> Op[float | None]:
    ((first,),) = yield from rows("first_received", source)
    return None if first is None else float(first)


def set_meta(key: str, value: str | None) -> Op[None]:
    if value is None:
        yield from count("unset_meta", key)
    else:
        yield from count("set_meta", key, value)


def _calls(selection: Selection) -> dict[str, Any]:
    """The outbox rows a selection names: dead letters (and delivered calls, if it says)."""
    return {
        "delivered": selection.include_delivered,
        "none": bool(selection.deliveries) and not selection.ids,  # only deliveries named
        "ids": list(selection.ids) or None,
        "source": selection.source,
        "since": selection.since,
    }


def _deliveries(selection: Selection) -> dict[str, Any]:
    """The inbox rows a selection names."""
    return {
        "none": bool(selection.ids) and not selection.deliveries,  # only calls named
        "deliveries": list(selection.deliveries) or None,
        "source": selection.source,
        "since": selection.since,
    }


# -- the console's reads ---------------------------------------------------------------------


def deliveries(
    source: str | None, result: Result | None, before: int | None, limit: int
) -> Op[list[DeliveryRow]]:
    """The newest deliveries (of one source, with one result), older than the delivery
    `before` when paging on."""
    params = {
        "source": source,
        "state": None if result in (None, "dead") else result,
        "dead": result == "dead",
        "before": before,
        "limit": limit,
    }
    if source:
        found = yield from rows("source_deliveries", **params)
    else:
        found = yield from rows("deliveries", **params)
    return [
        DeliveryRow(
            id=r[0],
            source=r[1],
            provider_event_id=r[2],
            received_at=r[3],
            state=r[4],
            calls=r[5],
            pending=r[6],
            delivered=r[7],
            dead=r[8],
        )
        for r in found
    ]


def delivery(inbox_id: int) -> Op[DeliveryDetail | None]:
    """One delivery with its kept headers and the calls it became."""
    found = yield from rows("delivery", inbox_id)
    if not found:
        return None
    ((_, source, provider_event_id, received_at, state, reason, headers, raw_size),) = found
    calls = [
        CallView(
            id=c[0],
            route=c[1],
            state=c[2],
            event_id=c[3],
            attempts=c[4],
            created_at=c[5],
            done_at=c[6],
            reason=c[7],
            in_flight=bool(c[8]),
            next_at=c[9],
            body=bytes(c[10]),
        )
        for c in (yield from rows("delivery_calls", inbox_id))
    ]
    return DeliveryDetail(
        id=inbox_id,
        source=source,
        provider_event_id=provider_event_id,
        received_at=received_at,
        state=state,
        reason=reason,
        headers=_headers_decoder.decode(headers) if headers else {},
        raw_kept=raw_size is not None,
        raw_size=raw_size or 0,
        calls=calls,
    )


def raw_body(inbox_id: int) -> Op[bytes | None]:
    """A delivery's raw body while it is kept; None once retention or a forget dropped it."""
    found = yield from rows("raw_body", inbox_id)
    return None if not found or found[0][0] is None else bytes(found[0][0])


def activity(sources: list[str], now: float) -> Op[list[SourceActivity]]:
    """Each source's latest delivery and its counts over the last hour and day."""
    found = []
    for source in sources:
        ((last, hour, day, failed_hour, failed_day),) = yield from rows(
            "source_activity", source=source, hour=now - 3600, day=now - 86400
        )
        found.append(
            SourceActivity(
                source=source,
                last_received_at=last,
                hour=hour,
                day=day,
                failed_hour=failed_hour,
                failed_day=failed_day,
            )
        )
    return found


def rates(since: float, step: float, buckets: int) -> Op[Rates]:
    """Deliveries stored, calls delivered and calls dead, a bucket of `step` seconds each."""

    def counted(found: list[tuple[Any, ...]]) -> list[int]:
        counts = [0] * buckets
        for bucket, n in found:
            if 0 <= bucket < buckets:
                counts[int(bucket)] += n
        return counts

    return Rates(
        since=since,
        step=step,
        received=counted((yield from rows("rate_received", since=since, step=step))),
        delivered=counted((yield from rows("rate_delivered", since=since, step=step))),
        dead=counted((yield from rows("rate_dead", since=since, step=step))),
    )
