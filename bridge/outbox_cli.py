"""`millimetric-bridge outbox ...` and `millimetric-bridge forget`: operate the outbox from
a shell, beside a running bridge or without one (SQLite allows one more connection)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from bridge.config import load_settings, parse_duration
from bridge.database_url import scrubbed
from bridge.errors import ConfigError, EventInvalid, StoreUnavailable
from bridge.events import Forget
from bridge.startup import open_outbox, refuse
from bridge.store import Delivery, Selection, Store, open_store

__all__ = ["forget", "outbox", "parse_since", "with_store"]

T = TypeVar("T")


def with_store(work: Callable[[Store], Awaitable[T]]) -> T:
    """`work` on the opened outbox. Configuration, the store's included, is refused as
    `serve` refuses it (one line, exit code 2); a failure of the work itself is exit 1."""
    try:
        settings = load_settings(os.environ, require_key=False)
        store = open_store(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    except ConfigError as error:
        refuse(error)

    async def run() -> T:
        await open_outbox(store, settings.database_url)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except ConfigError as error:
        refuse(error)
    except StoreUnavailable as error:
        message = scrubbed(str(error), settings.database_url)
        raise click.ClickException(message) from None


def parse_since(_ctx: Any, _param: Any, value: str | None) -> float | None:
    """`--since 2h` (a duration back from now) or an ISO 8601 time with a zone."""
    if value is None:
        return None
    if (seconds := parse_duration(value)) is not None:
        return time.time() - seconds
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use a duration like 2h or 3d, or an ISO 8601 time") from None
    if when.tzinfo is None:
        raise click.BadParameter("give the time with a zone, e.g. 2026-11-28T10:00:00Z")
    return when.timestamp()


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _selection(
    ids: tuple[int, ...],
    source: str | None,
    since: float | None,
    every: bool,
    include_delivered: bool = False,
    deliveries: tuple[int, ...] = (),
) -> Selection:
    if not (ids or deliveries or source or since is not None or every):
        raise click.UsageError("say which rows: --id, --delivery, --source, --since, or --all")
    return Selection(
        ids=ids,
        deliveries=deliveries,
        source=source,
        since=since,
        include_delivered=include_delivered,
    )


_select = [
    click.option("--id", "ids", type=int, multiple=True, help="An outbox row id (repeatable)."),
    click.option("--source", help="Rows from one source, e.g. stripe."),
    click.option("--since", callback=parse_since, help="Rows created since: 2h, 3d or a time."),
    click.option("--all", "every", is_flag=True, help="Every dead letter."),
]
_delivery = click.option(
    "--delivery",
    "deliveries",
    type=int,
    multiple=True,
    help="A quarantined delivery's id, as `outbox dead` lists it (repeatable).",
)


def _selecting(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_select):
        command = option(command)
    return command


@click.group()
def outbox() -> None:
    """Look at and operate the outbox (BRIDGE_DATABASE_URL)."""


@outbox.command()
def status() -> None:
    """Counts by state, the age of the oldest pending call, and whether forwarding is
    paused."""
    now = time.time()
    stats = with_store(lambda store: store.stats(now))
    oldest = _age(now - stats.oldest_pending_at) if stats.oldest_pending_at else "-"
    waiting = stats.oldest_untranslated_at
    click.echo(
        f"untranslated {stats.untranslated} (oldest {_age(now - waiting) if waiting else '-'})\n"
        f"quarantined  {stats.quarantined}\n"
        f"pending      {stats.pending}\n"
        f"delivered    {stats.delivered}\n"
        f"dead         {stats.dead}\n"
        f"oldest       {oldest}\n"
        f"inbox        {stats.inbox} deliveries, {stats.raw_payloads} raw payloads kept\n"
        f"forwarding   {'PAUSED: ' + stats.paused if stats.paused else 'not paused'}"
    )


@outbox.command()
@click.option("--limit", default=100, show_default=True, help="At most this many.")
def dead(limit: int) -> None:
    """Dead letters with Millimetric's reason (replay them once the cause is fixed), and
    deliveries their handler could not translate, quarantined with the reason (retranslate
    them once the handler or its options are fixed)."""
    letters = with_store(lambda store: store.dead_letters(limit))
    if not letters:
        click.echo("no dead letters, no quarantined deliveries")
    for d in letters:
        if d.kind == "delivery":
            click.echo(
                f"{d.id:>8}  {'delivery':8} {d.source or '-':12} "
                f"{d.provider_event_id or '-':34} quarantined  {d.reason}"
            )
            continue
        click.echo(
            f"{d.id:>8}  {d.route or '-':8} {d.source or '-':12} {d.event_id or '-':34} "
            f"attempts={d.attempts}  {d.reason}"
        )


@outbox.command()
@_selecting
@click.option(
    "--include-delivered",
    is_flag=True,
    help="Also resend delivered rows (Millimetric deduplicates by event_id).",
)
def replay(
    ids: tuple[int, ...],
    source: str | None,
    since: float | None,
    every: bool,
    include_delivered: bool,
) -> None:
    """Send selected dead letters (or delivered rows) again."""
    selection = _selection(ids, source, since, every, include_delivered)
    count = with_store(lambda store: store.replay(selection, time.time()))
    click.echo(f"{count} rows are pending again; the running bridge sends them")


@outbox.command()
@_selecting
@_delivery
@click.confirmation_option(prompt="Delete these dead letters for good?")
def purge(
    ids: tuple[int, ...],
    source: str | None,
    since: float | None,
    every: bool,
    deliveries: tuple[int, ...],
) -> None:
    """Delete selected dead letters, and the raw payloads of selected quarantined
    deliveries, for good."""
    selection = _selection(ids, source, since, every, deliveries=deliveries)
    count = with_store(lambda store: store.purge(selection))
    click.echo(f"{count} dead letters deleted")


@outbox.command()
@click.option("--id", "ids", type=int, multiple=True, help="A stored delivery's id (repeatable).")
@click.option("--source", help="Deliveries of one source, e.g. stripe.")
@click.option("--since", callback=parse_since, help="Deliveries received since: 2h, 3d, a time.")
@click.option("--all", "every", is_flag=True, help="Every stored delivery whose body is kept.")
def retranslate(ids: tuple[int, ...], source: str | None, since: float | None, every: bool) -> None:
    """Run the current handler and bridge.toml options again over stored deliveries.

    Quarantined deliveries, and translated ones whose raw body is still kept
    (BRIDGE_RAW_RETENTION_DAYS), go through the translate stage again; only calls not
    already queued or sent are queued. This is how to recover after fixing a handler or
    turning an option on (such as include_test_events).
    """
    if not (ids or source or since is not None or every):
        raise click.UsageError("say which deliveries: --id, --source, --since, or --all")
    selection = Selection(deliveries=ids, source=source, since=since)
    count = with_store(lambda store: store.retranslate(selection))
    click.echo(
        f"{count} deliveries are waiting for translation; the running bridge translates them"
    )


@click.command()
@click.argument("user_id")
def forget(user_id: str) -> None:
    """Erase USER_ID: purge the local data now, then send Millimetric's forget.

    Pending calls about the user (or a visitor learned for them) and the stored raw
    payloads of every delivery linked to them are deleted at once; the running bridge
    sends `forget` once no earlier call about the user is in flight, and nothing about the
    user is stored or forwarded afterwards.
    """
    try:
        call = Forget(user_id=user_id)
    except EventInvalid as error:  # an unset shell variable must not erase everybody
        raise click.BadParameter(str(error), param_hint="USER_ID") from None
    delivery = Delivery(
        source="cli",
        provider_event_id=f"forget-{uuid.uuid4()}",
        received_at=time.time(),
        calls=[call],
    )

    async def purge_now(store: Store) -> None:
        await store.accept(delivery)
        await store.erase(user_id)

    with_store(purge_now)
    click.echo("local data purged; forget is queued and the running bridge sends it")
