"""The translate stage: stored deliveries, in arrival order, through their handlers into
outbox calls.

Intake only verifies a delivery and appends it; this stage rebuilds the request from the
stored body and kept headers, runs the handler's `parse` and `translate`, and hands the
store a batch at a time (`Store.record`: the calls written, instructions carried out and
each delivery marked translated, in one transaction). A delivery its handler cannot read
or translate, whatever the handler raises, is quarantined with its reason instead of
holding back the deliveries after it; `outbox retranslate` runs it again once the handler
or its options are fixed.

It runs on the instance that forwards (one per store), as one of the lanes of the
forwarder's leadership, so that two instances never translate at once. It shares the
event loop (and the GIL) with intake, so while intake takes a burst it waits, up to
`max_defer`, and catches up after: a provider's 200 waits on intake alone, and the stage
only has to keep pace with what Millimetric can take (2,500 events/s), not with bursts.
A burst that outlasts the wait shares the loop: a batch, then one short look at intake.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec
import structlog

from bridge import metrics
from bridge.errors import EventInvalid, PayloadInvalid, StoreRefused, StoreUnavailable
from bridge.events import About, Alias, Forget, ForgetVisitor, Identify, Purge, Track
from bridge.plugin import WebhookRequest
from bridge.registry import Source
from bridge.store import Route, Store, StoredDelivery, Translation, route_of

__all__ = ["Translator", "TranslatorConfig", "translate_one"]

log = structlog.get_logger("bridge.translate")

_OUTPUTS: Final = (Track, Identify, Forget, Alias, ForgetVisitor, Purge, About)
#: Longest reason kept for a quarantined delivery (an exception's message can be long).
_REASON_MAX: Final = 500


class TranslatorConfig(msgspec.Struct, frozen=True, kw_only=True):
    batch: int = 500  # deliveries a transaction; bounds what one record holds up
    idle_poll: float = 0.5  # a missed wake-up (another instance's intake) costs at most this
    error_pause: float = 1.0
    # Above this many deliveries a second arriving at this instance, intake is taking a
    # burst: the stage looks again every `busy_probe` seconds and waits while it lasts,
    # but never longer than `max_defer`, nor than one probe while a backlog remains.
    busy_rate: float = 500.0
    busy_probe: float = 0.05
    max_defer: float = 5.0
    busy_batch: int = 100  # deliveries a batch while intake takes a burst
    # A batch also ends once its deliveries have become this many calls (a relay batch
    # is up to 500 calls, where a webhook is a few): writing a call costs 30-60 us.
    batch_calls: int = 2000
    busy_batch_calls: int = 500


def translate_one(stored: StoredDelivery, sources: Mapping[str, Source]) -> Translation:
    """What the stored delivery's handler makes of it now, or why it cannot: never raises,
    whatever the plugin code does (the reason's first word is its metric label)."""
    if stored.raw_body is None:  # erased before it was translated (a purge): nothing left
        return Translation(delivery=stored)
    source = sources.get(stored.source)
    if source is None:
        return Translation(delivery=stored, failure=f"source: no source {stored.source!r} now")
    request = WebhookRequest(
        source=stored.source,
        headers=stored.headers,
        body=stored.raw_body,
        received_at=stored.received_at,
    )
    handler = source.handler
    try:
        payload = handler.parse(request)
        outputs = handler.translate(request, payload, source.options)
    except PayloadInvalid as error:
        return Translation(delivery=stored, failure=_reason("payload", str(error)))
    except EventInvalid as error:  # a call over Millimetric's field limits
        return Translation(delivery=stored, failure=_reason("event", str(error)))
    except RecursionError:  # msgspec's answer to JSON nested past its depth limit
        return Translation(delivery=stored, failure="payload: the JSON body nests too deeply")
    except Exception as error:  # a bug in plugin code: kept, to translate once it is fixed
        return Translation(delivery=stored, failure=_reason("handler", _described(error)))
    if not isinstance(outputs, list) or not all(isinstance(o, _OUTPUTS) for o in outputs):
        return Translation(
            delivery=stored,
            failure="handler: translate returned something other than a list"
            " of Track, Identify, Forget, Alias, ForgetVisitor, Purge or About",
        )
    return Translation(delivery=stored, outputs=outputs)


def _described(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _reason(kind: str, detail: str) -> str:
    return f"{kind}: {detail}"[:_REASON_MAX]


class Translator:
    """The stage's loop. `wake()` after an append shortens its wait; `on_queued` hears
    which routes got new calls (the forwarder's lanes)."""

    def __init__(
        self,
        store: Store,
        sources: Mapping[str, Source],
        config: TranslatorConfig | None = None,
    ) -> None:
        self.store = store
        self.sources = sources
        self.config = config or TranslatorConfig()
        self.on_queued: Callable[[Route], None] = lambda route: None
        self._wake = asyncio.Event()
        # Calls a delivery became, in the last batch: how many deliveries to read for the
        # next (a batch of relay batches reads tens, not 500 bodies of which it uses 20).
        self._calls_each = 1.0
        # One batch at a time in this process: the loop's and a forget's (`catch_up`).
        self._stepping = asyncio.Lock()
        self._arrivals = 0  # deliveries intake stored here (each wakes the stage)
        # (when, arrivals) at the last batch; the loop's clock is time.monotonic's.
        self._since: tuple[float, int] = (time.monotonic(), 0)

    def wake(self) -> None:
        """A delivery was stored: translate soon."""
        self._arrivals += 1
        self._wake.set()

    async def _yield_to_intake(self, stopping: asyncio.Event, behind: bool) -> bool:
        """While intake takes a burst, wait: at most `max_defer`, or one `busy_probe` when
        the last batch left a backlog (so that a burst that lasts cannot leave the stage
        ever further behind: it then takes its turns, a small batch at a time). Whether
        intake is still taking a burst."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        longest = self.config.busy_probe if behind else self.config.max_defer
        when, arrivals = self._since
        rate = (self._arrivals - arrivals) / max(started - when, 1e-3)
        while rate > self.config.busy_rate and loop.time() - started < longest:
            before = self._arrivals
            await _wait(stopping, self.config.busy_probe)
            if stopping.is_set():
                break
            rate = (self._arrivals - before) / self.config.busy_probe
        self._since = (loop.time(), self._arrivals)
        return rate > self.config.busy_rate

    async def run(self, stopping: asyncio.Event) -> None:
        """Translate until `stopping` is set (this instance stops leading, or shuts down)."""
        behind = False
        while not stopping.is_set():
            self._wake.clear()
            busy = await self._yield_to_intake(stopping, behind)
            # A batch holds the loop while it is translated (about 50-90 us a delivery):
            # a small one while intake is busy, so that no request waits long behind it.
            limit, calls = (
                (self.config.busy_batch, self.config.busy_batch_calls)
                if busy
                else (self.config.batch, self.config.batch_calls)
            )
            try:
                _, behind = await self._step(limit, calls)
            except StoreUnavailable as error:
                log.error("store unavailable; translation waits", error=str(error))
                await _wait(stopping, self.config.error_pause)
                continue
            except Exception:  # our own bug: logged, and the loop carries on
                log.exception("translate stage error; carrying on")
                await _wait(stopping, self.config.error_pause)
                continue
            if not behind:
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stopping.wait())
                try:
                    await asyncio.wait(
                        {waiter, stopper},
                        timeout=self.config.idle_poll,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                    stopper.cancel()

    async def step(self, limit: int | None = None) -> int:
        """Translate the oldest waiting deliveries, one batch; how many."""
        taken, _ = await self._step(limit or self.config.batch, self.config.batch_calls)
        return taken

    async def _step(self, limit: int, max_calls: int) -> tuple[int, bool]:
        """One batch: at most `limit` deliveries, ending early once they have become
        `max_calls` calls; how many it took, and whether it was full (more may wait)."""
        async with self._stepping:
            limit = min(limit, max(1, math.ceil(max_calls / self._calls_each)))
            stored = await self.store.untranslated(limit)
            translations = []
            calls = 0
            for delivery in stored:  # those left out stay waiting, for the next batch
                translations.append(translate_one(delivery, self.sources))
                calls += len(translations[-1].outputs)
                if calls >= max_calls:
                    break
            if not translations:
                return 0, False
            self._calls_each = max(calls / len(translations), 1.0)
            try:
                await self.store.record(translations)
            except StoreUnavailable:
                translations = await self._one_by_one(translations)
            self._report(translations)
            return len(translations), len(translations) >= limit or calls >= max_calls

    async def catch_up(self, within: float) -> bool:
        """Translate what waits now, batch after batch, here and at once (on an instance
        that stands by too), for at most `within` seconds; whether nothing was left.

        A forget carried out before its 202 (the relay's) first lets what came before it
        reach the outbox: there its calls are erased with the user's, and a visitor it
        links to the user is known to be theirs. A delivery translated after the forget
        is stored without the user's calls all the same (their tombstone), but a call
        naming only that visitor would not be known as theirs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            _, full = await self._step(self.config.batch, self.config.batch_calls)
            if not full:
                return True
        return False

    async def _one_by_one(self, translations: Sequence[Translation]) -> list[Translation]:
        """A batch the store refused, one delivery at a time: one delivery whose calls the
        store refuses (`StoreRefused`: they cannot be written) must not hold back the
        others, so it is quarantined with the store's reason. A store that is down, or
        goes down meanwhile, raises: the batch waits for it, and nothing is quarantined
        for an outage."""
        done = []
        for translation in translations:
            try:
                await self.store.record([translation])
            except StoreRefused as error:
                failure = _reason("store", str(error))
                translation = Translation(delivery=translation.delivery, failure=failure)
                await self.store.record([translation])
            done.append(translation)
        return done

    def _report(self, translations: Sequence[Translation]) -> None:
        routes: set[Route] = set()
        translated: Counter[str] = Counter()  # one metric update a source, not a delivery
        for translation in translations:
            source = translation.delivery.source
            if translation.failure is None:
                translated[source] += 1
                for output in translation.outputs:
                    if isinstance(output, Track | Identify | Forget):
                        routes.add(route_of(output))
                    # A track naming both ids may teach the link: its identify goes first.
                    if isinstance(output, Track) and output.anonymous_id and output.user_id:
                        routes.add("identify")
                continue
            kind = translation.failure.partition(":")[0]
            metrics.TRANSLATE_FAILURES.labels(source, kind).inc()
            # The kind only: a reason can quote the payload, which never goes to the logs.
            log.warning(
                "delivery quarantined",
                source=source,
                delivery=translation.delivery.provider_event_id,
                inbox_id=translation.delivery.id,
                reason=kind,
            )
        for source, count in translated.items():
            metrics.TRANSLATED.labels(source).inc(count)
        for route in routes:
            self.on_queued(route)


async def _wait(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
