"""Backfill: append to the inbox the events a provider lists that its webhooks never brought.

A webhook endpoint that was down, misconfigured or not yet deployed misses events for
good once the provider stops retrying. A handler that keeps `bridge.plugin.EventLister`
lists them from the provider's API; each event the inbox does not hold (by source and
delivery id) is appended as a delivery of its source, the delivery id a webhook of it
carries, so the translate stage takes it like any webhook and a webhook of it that
arrives later is a duplicate. `millimetric-bridge backfill SOURCE` runs it over a window
the operator chooses; the periodic reconcile of `serve` (`bridge.stages.reconcile`) over
the window since its checkpoint.

A listing that fails on something that passes (a 429, a 5xx, the network) waits, backing
off, and lists again after the last event taken; what was appended stays appended.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from bridge.errors import ConfigError, ProviderError
from bridge.plugin import ApiAccess, EventLister, ListedEvent, event_lister
from bridge.registry import Source
from bridge.store import Delivery, Store

__all__ = [
    "Progress",
    "RetryPolicy",
    "Tally",
    "Target",
    "api_variables",
    "backfill",
    "target_of",
    "targets",
]

#: Events checked against the inbox, and appended, together: one query and one group
#: commit for as many as one Stripe page holds.
BATCH: Final = 100


@dataclass(frozen=True)
class Target:
    """A source whose provider lists its events, and how to reach the provider's API."""

    source: Source
    lister: EventLister
    access: ApiAccess
    lists: str  # what the key lists, in the lister's words ("test-mode events")


def api_variables(source: Source, lister: EventLister) -> tuple[str, str]:
    """The variables of the source's API key and base URL: the handler's for its default
    source, `<SOURCE>_API_KEY` and `<SOURCE>_API_BASE` for another (`stripe-eu`:
    `STRIPE_EU_API_KEY`), as the webhook secrets are named."""
    if source.name == source.handler.name:
        return lister.api_key_variable, lister.api_base_variable
    stem = re.sub(r"[^A-Z0-9]", "_", source.name.upper())
    return f"{stem}_API_KEY", f"{stem}_API_BASE"


def target_of(source: Source, env: Mapping[str, str]) -> Target | None:
    """The source as a backfill target: None when its handler lists no events or its key
    is not set; a `ConfigError` naming the variable for a key of the wrong kind or a base
    URL that is not one."""
    # Imported here: bridge.config imports the stages, which import this module.
    from bridge.config import check_url

    lister = event_lister(source.handler)
    if lister is None:
        return None
    key_variable, base_variable = api_variables(source, lister)
    key = env.get(key_variable, "").strip()
    if not key:
        return None
    base = env.get(base_variable, "").strip()
    access = ApiAccess(
        variable=key_variable, key=key, base=check_url(base_variable, base) if base else None
    )
    lists = lister.check_api_key(access)
    return Target(source=source, lister=lister, access=access, lists=lists)


def targets(sources: Mapping[str, Source], env: Mapping[str, str]) -> list[Target]:
    """Every source whose provider lists events and whose API key is set."""
    return [t for s in sources.values() if (t := target_of(s, env)) is not None]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Waits between tries of a listing that failed on something that passes: doubling
    from `base` up to `cap` seconds (jittered; never shorter than a `Retry-After`), at
    most `tries` times in a row without an event taken."""

    base: float = 0.5
    cap: float = 60.0
    tries: int = 8

    def wait(self, failures: int, retry_after: float | None) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(failures - 1, 30))
        jittered = random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not a secret)
        return max(jittered, retry_after or 0.0)


@dataclass
class Tally:
    """What a backfill found: events listed, those the inbox already held, those queued
    (appended; with `dry_run`, those that would be)."""

    listed: int = 0
    received: int = 0
    queued: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Events listed a second."""
        return self.listed / max(self.elapsed, 1e-6)


class Progress:
    """What a backfill reports as it goes; the command line shows it, the reconcile logs
    it. Every method does nothing here."""

    def batch(self, tally: Tally) -> None:
        """A batch of listed events was checked (and its missing ones appended)."""

    def missing(self, event: ListedEvent) -> None:
        """An event the inbox did not hold: appended (with `dry_run`: would be)."""

    def retrying(self, error: ProviderError, wait: float) -> None:
        """The listing failed on something that passes; it goes on after `wait` seconds."""


async def backfill(
    store: Store,
    target: Target,
    since: float,
    until: float,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    retry: RetryPolicy | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Tally:
    """List the target's events created in [since, until) and append each one the inbox
    does not hold; with `dry_run`, only say which (`progress.missing`) and store nothing.

    Raises `ConfigError` (naming the key's variable) when the provider refuses the key,
    `ProviderError` when the listing fails for good (or `retry.tries` times in a row), and
    `StoreUnavailable` from the store: what was appended by then stays appended."""
    progress = progress or Progress()
    retry = retry or RetryPolicy()
    tally = Tally()
    after: ListedEvent | None = None  # the last event taken: a retry lists after it
    failures = 0
    while True:
        listing = target.lister.list_events(target.access, since, until, after)
        try:
            batch: list[ListedEvent] = []
            async for event in listing:
                batch.append(event)
                if len(batch) >= BATCH:
                    await _take(store, target, batch, tally, dry_run, progress)
                    after, batch, failures = batch[-1], [], 0
            if batch:
                await _take(store, target, batch, tally, dry_run, progress)
            return tally
        except ConfigError as error:  # the key: named by the source's variable, always
            raise ConfigError(target.access.variable, error.reason) from None
        except ProviderError as error:
            failures += 1
            if not error.retryable or failures > retry.tries:
                raise
            wait = retry.wait(failures, error.retry_after)
            tally.retries += 1
            progress.retrying(error, wait)
            await sleep(wait)
        finally:  # an async generator's own `finally` (its HTTP client) runs now
            close = getattr(listing, "aclose", None)
            if close is not None:
                await close()


async def _take(
    store: Store,
    target: Target,
    batch: Sequence[ListedEvent],
    tally: Tally,
    dry_run: bool,
    progress: Progress,
) -> None:
    source = target.source
    held = await store.received(source.name, [e.delivery_id for e in batch])
    missing = [e for e in batch if e.delivery_id not in held]
    tally.listed += len(batch)
    tally.received += len(batch) - len(missing)
    if dry_run:
        for event in missing:
            tally.queued += 1
            progress.missing(event)
    elif missing:
        now = time.time()
        kept = source.kept_headers
        results = await asyncio.gather(
            *(
                store.append(
                    Delivery(
                        source=source.name,
                        provider_event_id=event.delivery_id,
                        received_at=now,
                        raw_body=event.body,
                        # Only what translation reads, as intake keeps it.
                        headers={h: v for h, v in event.headers.items() if h in kept},
                    )
                )
                for event in missing
            )
        )
        for event, result in zip(missing, results, strict=True):
            if result == "accepted":
                tally.queued += 1
                progress.missing(event)
            else:  # its webhook arrived in the meantime
                tally.received += 1
    progress.batch(tally)
