"""The periodic reconcile: what providers' event lists show that their webhooks never brought.

Every `every` seconds, for each source whose provider lists its events and whose API key
is set (`bridge.backfill.targets`), the events created since the source's checkpoint
(less `overlap`, for events a list shows late) and until `settle` ago (younger ones are
left to their webhook, likely in flight) are listed, and those the inbox does not hold
are appended (`bridge.backfill`). Each is counted in `bridge_reconciled_total{source}`:
above zero, webhooks were missed. Once a window is listed in full its end is stored as
the checkpoint, so a restart lists from there rather than from the start of the
provider's retention.

The first round of a source, before any checkpoint, reaches back to the oldest delivery
of it the inbox holds: events from before the bridge received any are not webhooks it
missed (`millimetric-bridge backfill` imports them on purpose). A source the inbox holds
nothing of starts its checkpoint now. Never further back than the inbox remembers
(`Retention.inbox`), so no event is taken for missing because its delivery was dropped.

It runs on the instance that forwards, as one of the lanes of the forwarder's
leadership (as the translate stage does), so one instance lists per store. A round that
fails (a refused key, an API down past its retries, the store) is logged and counted in
`bridge_reconcile_failures_total`, keeps its checkpoint and is tried at the next
interval; nothing of it touches intake or forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec
import structlog

from bridge import metrics
from bridge.backfill import Progress, RetryPolicy, Tally, Target, backfill
from bridge.errors import ConfigError, ProviderError, StoreUnavailable
from bridge.store import Store

__all__ = ["ReconcileConfig", "Reconciler"]

log = structlog.get_logger("bridge.reconcile")


class ReconcileConfig(msgspec.Struct, frozen=True, kw_only=True):
    every: float = 900.0  # seconds between rounds (BRIDGE_RECONCILE_EVERY); 0: off
    overlap: float = 600.0  # listed again before the checkpoint
    settle: float = 300.0  # events younger than this wait for their webhook
    reach: float = 30 * 86400  # never further back (Stripe keeps 30 days of events)
    retry: RetryPolicy = RetryPolicy(tries=6)  # about 30 s of waits, then the next round


class _Logged(Progress):
    def __init__(self, source: str) -> None:
        self.source = source

    def retrying(self, error: ProviderError, wait: float) -> None:
        log.warning(
            "reconcile: the provider's API failed; trying again",
            source=self.source,
            reason=error.reason,
            wait=round(wait, 1),
        )


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


class Reconciler:
    """The stage's loop over its targets. `inbox_retention` is `Retention.inbox`."""

    def __init__(
        self,
        store: Store,
        targets: Sequence[Target],
        config: ReconcileConfig | None = None,
        *,
        inbox_retention: float = 30 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.targets = list(targets)
        self.config = config or ReconcileConfig()
        self.inbox_retention = inbox_retention
        self.clock = clock
        for target in self.targets:  # every source's series, from zero (for increase())
            metrics.RECONCILED.labels(target.source.name)

    async def run(self, stopping: asyncio.Event) -> None:
        """A round for each target now, then every `every` seconds, until `stopping`."""
        while not stopping.is_set():
            for target in self.targets:
                # A round can list for a while: stopping cuts it short (what it appended
                # stays, its checkpoint does not move) rather than holding up a shutdown.
                round_ = asyncio.ensure_future(self.round(target))
                stop = asyncio.ensure_future(stopping.wait())
                try:
                    await asyncio.wait({round_, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    if not round_.done():
                        round_.cancel()
                        await asyncio.gather(round_, return_exceptions=True)
                if stopping.is_set():
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.config.every)

    async def round(self, target: Target) -> Tally | None:
        """One window of the target's events; what it found, or None when it listed
        nothing (no window yet) or failed (logged and counted, never raised)."""
        name = target.source.name
        started = time.perf_counter()
        try:
            window = await self._window(name)
            if window is None:
                return None
            since, until = window
            tally = await backfill(
                self.store,
                target,
                since,
                until,
                progress=_Logged(name),
                retry=self.config.retry,
            )
            await self.store.set_reconciled_until(name, until)
        except ConfigError as error:
            self._failed(name, "key", str(error))
            return None
        except ProviderError as error:
            self._failed(name, "provider", error.reason)
            return None
        except StoreUnavailable as error:
            self._failed(name, "store", str(error))
            return None
        except Exception as error:  # our bug: logged by type, and the next round comes
            log.exception("reconcile error", source=name, error=type(error).__name__)
            metrics.RECONCILE_FAILURES.labels(name, "error").inc()
            return None
        metrics.RECONCILED.labels(name).inc(tally.queued)
        line = {
            "source": name,
            "listed": tally.listed,
            "received": tally.received,
            "queued": tally.queued,
            "since": _iso(since),
            "until": _iso(until),
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if tally.queued:
            log.warning("reconcile: webhooks were missed; their events are queued now", **line)
        else:
            log.info("reconcile", **line)
        return tally

    async def _window(self, name: str) -> tuple[float, float] | None:
        now = self.clock()
        until = now - self.config.settle
        floor = now - min(self.config.reach, self.inbox_retention)
        checkpoint = await self.store.reconciled_until(name)
        if checkpoint is None:
            first = await self.store.first_received(name)
            if first is None:  # nothing received from it yet: from now on
                await self.store.set_reconciled_until(name, until)
                log.info("reconcile starts now: nothing received yet", source=name)
                return None
            checkpoint = first
        elif checkpoint - self.config.overlap < floor:
            # Down longer than the inbox remembers: what was received then is forgotten,
            # and would be queued again (`backfill --since` says as much to an operator).
            log.warning(
                "reconcile: the checkpoint is older than the inbox remembers; listing from "
                "the start of what it remembers",
                source=name,
                checkpoint=_iso(checkpoint),
                since=_iso(floor),
            )
        since = max(floor, checkpoint - self.config.overlap)
        return (since, until) if since < until else None

    def _failed(self, name: str, reason: str, detail: str) -> None:
        metrics.RECONCILE_FAILURES.labels(name, reason).inc()
        log.error("reconcile failed; trying again at the next round", source=name, reason=detail)
