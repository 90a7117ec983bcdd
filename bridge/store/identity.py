"""What a batch of translated deliveries writes, decided in pure code: the outbox rows of
their calls, what the bridge learns about who a visitor is, and the links erasure follows.

A store loads what is known about the batch's visitors and users in a few statements
(`wanted` says what to look up), `plan` decides, in the batch's order, with what the
batch itself teaches overlaid on what was loaded, and the store writes the `Plan` in a
few more statements: a constant number of statements a batch, whatever its size. The
rules are those of a delivery stored alone:

- an anonymous id goes through the aliases learned so far (`Alias`: a Stripe customer
  stands for the browser that paid);
- a call about a forgotten user is neither stored nor sent, and its delivery's raw body
  is not kept;
- a call that carries both ids teaches the link: it is remembered, and sent once as an
  identify before the call, unless the delivery identifies the pair itself; a track of a
  visitor whose user is known carries that user; an identify without traits of a link
  already known is not sent again.

Deliveries that erase (`Forget`, `ForgetVisitor`, `Purge`) are not planned: the store
carries them out one at a time, between plans (`plannable`).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence

import msgspec

from bridge.events import Alias, Call, Forget, ForgetVisitor, Identify, Output, Purge, Track
from bridge.store import Translation, links, named, subject_of, with_event_id

__all__ = [
    "Known",
    "Plan",
    "Planned",
    "Row",
    "plan",
    "plannable",
    "quarantined_names",
    "segments",
    "wanted",
]


class Planned(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery of the batch: its inbox row and what its handler made of it."""

    inbox_id: int
    source: str
    provider_event_id: str
    outputs: Sequence[Output]


class Known(msgspec.Struct, kw_only=True):
    """What the store holds about the batch's visitors and users."""

    targets: dict[str, str] = {}  # an alias: the anonymous id it stands for
    users: dict[str, str] = {}  # an anonymous id: the user learned for it
    forgotten: set[str] = set()  # subjects (hashes) of forgotten users


class Row(msgspec.Struct, frozen=True, kw_only=True):
    inbox_id: int
    call: Call
    event_id: str | None  # its key in the outbox; None: not keyed (a learned identify)


class Plan(msgspec.Struct, kw_only=True):
    """What to write, in this order: aliases and identities (upserts, the last word for a
    key wins), links, outbox rows (in order), raw bodies to drop."""

    aliases: dict[str, str] = {}
    identities: dict[str, str] = {}  # anonymous id: user id
    links: list[tuple[int, set[str]]] = []
    rows: list[Row] = []
    emptied: list[int] = []


def plannable(outputs: Iterable[Output]) -> bool:
    """Whether a delivery can be planned with others: it erases nothing."""
    return not any(isinstance(o, Forget | ForgetVisitor | Purge) for o in outputs)


def segments(
    translations: Iterable[Translation], claimed: Container[int]
) -> Iterator[tuple[list[Planned], Planned | None]]:
    """A batch's translated deliveries (those this transaction `claimed`), in order: runs
    to plan together, each followed by the delivery that erases and goes alone (None
    after the last run)."""
    run: list[Planned] = []
    for translation in translations:
        stored = translation.delivery
        if translation.failure is not None or stored.id not in claimed:
            continue
        planned = Planned(
            inbox_id=stored.id,
            source=stored.source,
            provider_event_id=stored.provider_event_id,
            outputs=translation.outputs,
        )
        if plannable(planned.outputs):
            run.append(planned)
            continue
        yield run, planned
        run = []
    yield run, None


def quarantined_names(
    translations: Iterable[Translation], claimed: Container[int]
) -> dict[int, set[str]]:
    """The deliveries of a batch quarantined now (those this transaction `claimed`), with
    whom their bodies name (`named`): one that names a forgotten user is erased at once,
    as a translated delivery about them would be."""
    return {
        t.delivery.id: named(t.delivery.raw_body)
        for t in translations
        if t.failure is not None and t.delivery.id in claimed and t.delivery.raw_body is not None
    }


def wanted(batch: Sequence[Planned]) -> tuple[list[str], list[str]]:
    """The anonymous ids and user subjects whose aliases, users and tombstones `plan` reads."""
    visitors: set[str] = set()
    subjects: set[str] = set()
    for delivery in batch:
        for item in delivery.outputs:
            if isinstance(item, Alias):
                visitors.update((item.alias, item.anonymous_id))
            elif isinstance(item, Track | Identify):
                if item.anonymous_id:
                    visitors.add(item.anonymous_id)
                if (subject := subject_of(item)) is not None:
                    subjects.add(subject)
    return sorted(visitors), sorted(subjects)


def plan(batch: Sequence[Planned], known: Known) -> Plan:
    """The writes of `batch` (every delivery `plannable`), given what was `known` before it."""
    out = Plan()
    targets, users = dict(known.targets), dict(known.users)  # overlaid as the batch teaches

    def target(anonymous_id: str) -> str:
        return targets.get(anonymous_id, anonymous_id)

    for delivery in batch:
        resolved: list[Call | None] = []
        for item in delivery.outputs:
            if isinstance(item, Alias):
                to = target(item.anonymous_id)
                if to != item.alias:
                    targets[item.alias] = out.aliases[item.alias] = to
                resolved.append(None)
            elif isinstance(item, Track | Identify):
                visitor = item.anonymous_id and target(item.anonymous_id)
                same = visitor == item.anonymous_id
                resolved.append(
                    item if same else msgspec.structs.replace(item, anonymous_id=visitor)
                )
            else:  # About: a link, and nothing more
                resolved.append(None)
        out.links.append((delivery.inbox_id, links([*delivery.outputs, *resolved])))
        identified = {(c.anonymous_id, c.user_id) for c in resolved if isinstance(c, Identify)}
        for index, given in enumerate(resolved):
            if not isinstance(given, Track | Identify):
                continue
            if (subject := subject_of(given)) is not None and subject in known.forgotten:
                out.emptied.append(delivery.inbox_id)  # never stored, never sent, nor kept
                continue
            call, link = _identity(given, users)
            if link is not None:
                anonymous_id, user_id = link
                users[anonymous_id] = out.identities[anonymous_id] = user_id
                if link not in identified:  # sent first, once, unless the delivery does
                    identified.add(link)
                    learned = Identify(user_id=user_id, anonymous_id=anonymous_id)
                    out.rows.append(Row(inbox_id=delivery.inbox_id, call=learned, event_id=None))
            if call is None:
                continue
            call, key = with_event_id(call, delivery.source, delivery.provider_event_id, index)
            out.rows.append(Row(inbox_id=delivery.inbox_id, call=call, event_id=key))
    return out


def _identity(
    call: Track | Identify, users: dict[str, str]
) -> tuple[Call | None, tuple[str, str] | None]:
    """The call with what is known about its visitor (None: not to be sent), and the link
    (anonymous id, user id) it teaches, if it is new."""
    if not call.anonymous_id:
        return call, None
    known = users.get(call.anonymous_id)
    if isinstance(call, Identify) and not call.traits and known == call.user_id:
        return None, None  # the link is known and was sent: identify once
    if call.user_id is None:
        if known is not None and isinstance(call, Track):
            return msgspec.structs.replace(call, user_id=known), None
        return call, None
    if known == call.user_id:
        return call, None
    return call, (call.anonymous_id, call.user_id)
