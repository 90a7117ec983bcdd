"""`millimetric-bridge backfill SOURCE`: append the events a provider lists that the bridge
never received (`bridge.backfill`), beside a running bridge or without one."""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from typing import IO, Final

import click

from bridge.backfill import Progress, Tally, Target, api_variables, backfill, target_of
from bridge.config import Settings, load_settings
from bridge.errors import ConfigError, ProviderError
from bridge.outbox_cli import parse_since, with_store
from bridge.plugin import ListedEvent, event_lister
from bridge.registry import Source, load_handlers, load_sources, load_templates
from bridge.startup import refuse
from bridge.store import Store

__all__ = ["Display", "backfill_command"]

#: Seconds between the plain progress lines written when the output is not a terminal.
LINE_EVERY: Final = 5.0
#: Redraws of the terminal's progress line a second, at most.
_REDRAWS: Final = 10.0
#: A `--since` this far past what the inbox remembers is still taken (as "30d" for 30 days
#: of retention), from the start of what it remembers.
_SLACK: Final = 3600.0


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )


class Display(Progress):
    """Progress on `stream`: one line redrawn in place on a terminal, a plain line every
    `LINE_EVERY` seconds otherwise; with `dry_run`, what would be queued on `out`."""

    def __init__(self, stream: IO[str], out: IO[str], *, dry_run: bool) -> None:
        self.stream = stream
        self.out = out
        self.dry_run = dry_run
        self.tty = stream.isatty()
        self.tally = Tally()
        self._shown = 0.0  # monotonic time of the last line
        self._drawn = False

    def line(self, tally: Tally) -> str:
        queued = "would queue" if self.dry_run else "queued"
        return (
            f"listed {tally.listed:,}  already received {tally.received:,}  "
            f"{queued} {tally.queued:,}  {tally.rate:,.0f} events/s  {_clock(tally.elapsed)}"
        )

    def batch(self, tally: Tally) -> None:
        self.tally = tally
        now = time.monotonic()
        if self.tty and now - self._shown >= 1 / _REDRAWS:
            self._draw(tally)
        elif not self.tty and now - self._shown >= LINE_EVERY:
            self.stream.write(f"backfill: {self.line(tally)}\n")
            self.stream.flush()
        else:
            return
        self._shown = now

    def missing(self, event: ListedEvent) -> None:
        if self.dry_run:
            self._clear()
            self.out.write(
                f"would queue  {event.type:40} {event.delivery_id}  {_when(event.created)}\n"
            )
            self.out.flush()

    def retrying(self, error: ProviderError, wait: float) -> None:
        self._clear()
        self.stream.write(f"backfill: {error.reason}; trying again in {wait:.1f}s\n")
        self.stream.flush()

    def finish(self) -> None:
        """The progress line gives way to the summary."""
        self._clear()

    def _draw(self, tally: Tally) -> None:
        self.stream.write(f"\r\x1b[2K{self.line(tally)}")  # the line, cleared, redrawn
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False


def _source(sources: dict[str, Source], name: str) -> Source:
    found = sources.get(name)
    listing = sorted(n for n, s in sources.items() if event_lister(s.handler) is not None)
    if found is None:
        raise click.BadParameter(
            f"no source {name!r}; sources with an event list: {', '.join(listing) or 'none'}",
            param_hint="SOURCE",
        )
    if event_lister(found.handler) is None:
        raise click.BadParameter(
            f"{name!r} (handler {found.handler.name}) has no event list to backfill from; "
            f"sources with one: {', '.join(listing) or 'none'}",
            param_hint="SOURCE",
        )
    return found


def _target(source: Source) -> Target:
    try:
        target = target_of(source, os.environ)
    except ConfigError as error:
        refuse(error)
    if target is None:
        lister = event_lister(source.handler)
        assert lister is not None  # `_source` checked
        variable, _ = api_variables(source, lister)
        refuse(ConfigError(variable, "not set: backfill needs an API key that reads events"))
    return target


def _window(settings: Settings, since: float, until: float | None) -> tuple[float, float]:
    now = time.time()
    until = now if until is None else min(until, now)
    if since >= until:
        raise click.BadParameter("must be before --until (and before now)", param_hint="--since")
    remembered = settings.forwarder.retention.inbox
    if since < now - remembered - _SLACK:
        raise click.BadParameter(
            f"reaches back further than the inbox remembers deliveries "
            f"({remembered / 86400:g} days, BRIDGE_INBOX_RETENTION_DAYS): events received "
            "before then would be queued again",
            param_hint="--since",
        )
    return max(since, now - remembered), until


@click.command("backfill")
@click.argument("source")
@click.option(
    "--since", required=True, callback=parse_since, help="From: 7d, 12h, or an ISO 8601 time."
)
@click.option("--until", callback=parse_since, help="To (default: now): 1h, or a time.")
@click.option("--dry-run", is_flag=True, help="Print what would be queued; store nothing.")
def backfill_command(source: str, since: float, until: float | None, dry_run: bool) -> None:
    """List SOURCE's events from its provider's API and append those the bridge never
    received, as deliveries of SOURCE; the running bridge translates and forwards them,
    and a webhook of one of them that arrives later is a duplicate.

    Needs the source's API key: STRIPE_API_KEY for `stripe` (a restricted key with Read
    access to Events is enough), PADDLE_API_KEY for `paddle`; another source reads
    <SOURCE>_API_KEY. STRIPE_API_BASE (PADDLE_API_BASE, ...) points the client elsewhere.
    A key of the wrong kind, or one the provider refuses, is exit code 2.
    """
    try:
        settings = load_settings(os.environ, require_key=False)
        sources = load_sources(os.environ, load_handlers(), templates=load_templates())
    except ConfigError as error:
        refuse(error)
    target = _target(_source(sources, source))
    since, until = _window(settings, since, until)
    display = Display(sys.stderr, sys.stdout, dry_run=dry_run)
    run = "dry run: nothing is stored" if dry_run else "appending what the inbox lacks"
    click.echo(
        f"backfill {source}: {target.lists} created {_when(since)} to {_when(until)} ({run})",
        err=True,
    )

    async def work(store: Store) -> Tally:
        try:
            return await backfill(store, target, since, until, dry_run=dry_run, progress=display)
        finally:
            display.finish()  # whatever is printed next starts on a line of its own

    try:
        tally = with_store(work)
    except ProviderError as error:
        done = display.tally
        raise click.ClickException(
            f"{error.reason}; listed {done.listed:,}, queued {done.queued:,} before it failed; "
            "run it again: what is queued is skipped"
        ) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted; queued {display.tally.queued:,} so far", err=True)
        sys.exit(130)
    queued = "would queue" if dry_run else "queued"
    after = "" if dry_run or not tally.queued else "; the running bridge translates them"
    click.echo(
        f"backfill {source}: listed {tally.listed:,}, already received {tally.received:,}, "
        f"{queued} {tally.queued:,} in {tally.elapsed:.1f}s ({tally.rate:,.0f} events/s){after}"
    )
