"""The forwarder: drains the outbox into Millimetric, within its limits, losing nothing.

One lane per route. The track lane claims up to 500 events (under 256 KB of body) and
sends them as one `/v1/batch`; identify and forget rows go one by one to their routes.
What each answer means for the rows:

- accepted: delivered;
- rate limited: released untouched, and the lane waits for `Retry-After`;
- retryable (5xx, timeouts, connection errors): tried again after an exponential backoff
  with full jitter, until the row is older than `max_age`, then dead-lettered; the lane
  itself holds for a while that doubles with each failure in a row (an outage costs a
  request now and then, not one for every row that comes due), and the first success
  makes every row waiting on a retry of that route due at once;
- invalid: a batch is split in halves until the invalid events are alone; only those are
  dead-lettered, with Millimetric's answer as the reason;
- auth problem (401/403): forwarding pauses, no row is charged or dropped, and a probe
  every few seconds resumes it once the key works.

Every track row carries an `event_id`, so a crash between a send and its bookkeeping can
only resend what Millimetric deduplicates.

Only the store's one forwarder sends (`Store.lead`), so the rate limits hold for a
cluster of instances on one database: the others stand by and keep the gauges current,
and take over when the leader is lost. The translate stage and the periodic reconcile
run as lanes of that leadership too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import msgspec
import structlog

from bridge import metrics
from bridge.client import (
    Accepted,
    AuthProblem,
    Invalid,
    MillimetricClient,
    Outcome,
    RateLimited,
    Retryable,
    batch_body,
)
from bridge.errors import StoreUnavailable
from bridge.events import BATCH_MAX_BYTES, BATCH_MAX_EVENTS, Forget
from bridge.ratelimit import BATCH_LIMIT, TRACK_LIMIT, RateLimit, TokenBucket
from bridge.stages.reconcile import Reconciler
from bridge.stages.translate import Translator
from bridge.store import ROUTES, OutboxRow, Retention, Route, Store

__all__ = ["Forwarder", "ForwarderConfig"]

log = structlog.get_logger("bridge.forwarder")

#: Room left in a batch body for the `{"events":[...]}` wrapper.
_WRAPPER: Final = len(batch_body([]))
_SINGLE_ROUTE_CLAIM: Final = 50
_forget_decoder: Final = msgspec.json.Decoder(Forget)
T = TypeVar("T")


def _failure(outcome: Outcome) -> str:
    """A status label for an answer that had none: a timeout or a connection error."""
    reason = getattr(outcome, "reason", "")
    return "timeout" if reason.startswith("timeout") else "connection"


class ForwarderConfig(msgspec.Struct, frozen=True, kw_only=True):
    batch_limit: RateLimit = BATCH_LIMIT  # pacing of /v1/batch
    single_limit: RateLimit = TRACK_LIMIT  # pacing of /v1/identify and /v1/forget
    batch_events: int = BATCH_MAX_EVENTS
    batch_bytes: int = BATCH_MAX_BYTES
    linger: float = 0.1  # wait this long for a partial batch to fill when traffic is light
    idle_poll: float = 1.0  # look for due rows (retries, other writers) this often when idle
    max_in_flight: int = 4  # concurrent batch requests (matters when Millimetric is far away)
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    outage_hold: float = 0.5  # the lane waits this long after a retryable failure...
    outage_hold_cap: float = 30.0  # ... doubled with each failure in a row, up to this
    max_age: float = 72 * 3600  # give up on a row this old, into dead letters
    probe_min: float = 2.0  # first probe of a refused key after this long
    probe_max: float = 60.0
    error_pause: float = 1.0  # after a store error, before trying again
    retention: Retention = Retention()
    cleanup_every: float = 600.0
    gauges_every: float = 5.0


class Forwarder:
    """Runs as tasks inside the app's lifespan; `wake()` after an accept shortens the wait."""

    def __init__(
        self,
        store: Store,
        client: MillimetricClient,
        config: ForwarderConfig | None = None,
        clock: Callable[[], float] = time.time,
        translator: Translator | None = None,
        reconciler: Reconciler | None = None,
    ) -> None:
        self.store = store
        # The translate stage and the reconcile run where the forwarding does: one
        # instance per store.
        self.translator = translator
        self.reconciler = reconciler
        if translator is not None:
            translator.on_queued = self.wake
        self.client = client
        self.config = config or ForwarderConfig()
        self.clock = clock
        self.paused: str | None = None
        self._probe_after = self.config.probe_min
        self._probe_at = 0.0
        self._not_before: dict[Route, float] = dict.fromkeys(ROUTES, 0.0)
        self._failures: dict[Route, int] = dict.fromkeys(ROUTES, 0)  # retryable, in a row
        self._buckets = self._new_buckets()
        self._wake = {route: asyncio.Event() for route in ROUTES}
        self._in_flight = asyncio.Semaphore(self.config.max_in_flight)
        self._sends: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []  # leadership and gauges: while started
        self._lanes: list[asyncio.Task[None]] = []  # sending and cleanup: while leading
        self._stopping = asyncio.Event()  # the lanes stop (stop() or leadership lost)
        self._closing = asyncio.Event()  # stop() was called
        self.leading = False
        self.counts: dict[str, int] = {
            "requests": 0,
            "delivered": 0,
            "dead": 0,
            "rate_limited": 0,
            "retried": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started and no task has died: leading with every lane up, or standing by."""
        tasks = [*self._tasks, *self._lanes]
        return bool(self._tasks) and not any(task.done() for task in tasks)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._leadership(), name="forward-leadership"),
            asyncio.create_task(self._gauges(), name="outbox-gauges"),
        ]

    def wake(self, route: Route = "track") -> None:
        self._wake[route].set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; give sends in flight `grace` seconds to finish, then cancel them.
        Rows of a cancelled send stay claimed and are due again at the next start."""
        self._closing.set()
        await self._halt(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._set_leading(False)

    async def _halt(self, grace: float) -> None:
        """Stop the lanes: they finish the send they are in, then stop claiming."""
        self._stopping.set()
        for event in self._wake.values():
            event.set()
        deadline = asyncio.get_running_loop().time() + grace
        if self._lanes:
            await asyncio.wait(self._lanes, timeout=grace)
        if self._sends:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(set(self._sends), timeout=remaining)
        for task in [*self._lanes, *self._sends]:
            task.cancel()
        await asyncio.gather(*self._lanes, *self._sends, return_exceptions=True)
        self._lanes = []

    async def _leadership(self) -> None:
        """Forward while this instance is the store's one forwarder; otherwise stand by."""
        while not self._closing.is_set():
            try:
                released = await self._unless_closing(self.store.lead())
            except StoreUnavailable as error:
                log.error("cannot take the lead; trying again", error=str(error))
                await self._wait_closing(self.config.error_pause)
                continue
            if self._closing.is_set():
                return
            self._stopping.clear()
            self._buckets = self._new_buckets()  # standing by, they would have filled up
            self._lanes = [
                asyncio.create_task(self._lane(route), name=f"forward-{route}") for route in ROUTES
            ]
            self._lanes.append(asyncio.create_task(self._janitor(), name="outbox-cleanup"))
            if self.translator is not None:
                self._lanes.append(
                    asyncio.create_task(self.translator.run(self._stopping), name="translate")
                )
            if self.reconciler is not None:
                self._lanes.append(
                    asyncio.create_task(self.reconciler.run(self._stopping), name="reconcile")
                )
            self._set_leading(True)
            log.info("this instance forwards", released_claims=released)
            await self._unless_closing(self.store.lost())
            if self._closing.is_set():
                return  # stop() lets the sends in flight finish
            log.error("leadership lost; forwarding stops until this instance leads again")
            self._set_leading(False)
            await self._halt(self.config.error_pause)

    def _new_buckets(self) -> dict[Route, TokenBucket]:
        # Empty, not full: a forwarder that (re)starts or takes over from another does not
        # know how much of Millimetric's burst was just spent.
        return {
            route: TokenBucket(
                self.config.batch_limit if route == "track" else self.config.single_limit,
                start_full=False,
            )
            for route in ROUTES
        }

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        metrics.LEADER.set(int(leading))

    async def _unless_closing(self, work: Awaitable[T]) -> T | None:
        """What `work` returns, or None (and `work` cancelled) once stop() is called."""
        task = asyncio.ensure_future(work)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return None if task.cancelled() else task.result()

    async def _wait_closing(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    # -- the lanes ---------------------------------------------------------------------------

    async def _lane(self, route: Route) -> None:
        full = self.config.batch_events if route == "track" else _SINGLE_ROUTE_CLAIM
        while not self._stopping.is_set():
            try:
                await self._gate(route)
                if route == "track":
                    filled = await self._track_step(full)
                else:
                    filled = await self._single_step(route, full)
                if not filled:
                    await self._idle(route)
            except StoreUnavailable as error:
                log.error(
                    "outbox store unavailable; forwarding waits", route=route, error=str(error)
                )
                await self._sleep(self.config.error_pause)
            except Exception:
                log.exception("forwarder error; carrying on", route=route)
                await self._sleep(self.config.error_pause)

    async def _track_step(self, full: int) -> bool:
        """Claim one batch and start sending it; whether the batch was full (no linger)."""
        await self._in_flight.acquire()
        if self._stopping.is_set():  # stopping while waiting for a slot: claim nothing
            self._in_flight.release()
            return True
        try:
            # The batch is formed once it may go: whatever arrives while it waits for the
            # rate limit rides in it, rather than in batches formed early, small, and
            # queued one behind another (at 20 events/s that cost 0.9 s at the median).
            await self._take_token("track")
            rows = await self._claim("track", full)
        except BaseException:
            self._in_flight.release()
            raise
        if not rows:
            self._buckets["track"].give_back()
            self._in_flight.release()
            return False
        self._spawn(self._send_then_release(rows))
        # A batch cut by the byte limit is as full as one cut by the count.
        size = sum(len(r.body) + 1 for r in rows)
        return len(rows) >= full or size >= 0.75 * (self.config.batch_bytes - _WRAPPER)

    async def _single_step(self, route: Route, full: int) -> bool:
        rows = await self._claim(route, full)
        for index, row in enumerate(rows):
            if self._stopping.is_set() or self._held(route):
                await self.store.retry(
                    [r.id for r in rows[index:]], self.clock(), count_attempt=False
                )
                break
            if route == "forget":
                await self.store.erase(_forget_decoder.decode(row.body).user_id)
            await self._deliver(route, [row])
        return len(rows) >= full

    def _held(self, route: Route) -> bool:
        """Whether sending must wait: paused on a refused key until the next probe (which
        any lane's row may be: a backlog of identify or forget rows alone probes too), or
        inside a Retry-After."""
        now = self.clock()
        return (self.paused is not None and now < self._probe_at) or self._not_before[route] > now

    async def _claim(self, route: Route, limit: int) -> list[OutboxRow]:
        # The store counts a comma after every body and the last has none (the + 1): a
        # batch of exactly `batch_bytes` fits.
        budget = self.config.batch_bytes - _WRAPPER + 1 if route == "track" else 1 << 30
        return await self.store.claim(route, limit, budget, self.clock())

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send_then_release(self, rows: list[OutboxRow]) -> None:
        try:
            await self._deliver("track", rows, token_taken=True)
        except Exception:
            log.exception("batch send failed; its rows are due again after their lease")
        finally:
            self._in_flight.release()

    async def _idle(self, route: Route) -> None:
        """Wait for new rows (or the poll interval), then linger so a batch can fill."""
        wake = self._wake[route]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), self.config.idle_poll)
        wake.clear()
        if route == "track" and not self._stopping.is_set():
            await self._sleep(self.config.linger)

    async def _gate(self, route: Route) -> None:
        """Hold the lane while a Retry-After runs or while paused between probes."""
        while not self._stopping.is_set():
            now = self.clock()
            until = self._not_before[route]
            if self.paused is not None:
                until = max(until, self._probe_at)
            if now >= until:
                return
            await self._sleep(until - now)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))

    async def _take_token(self, route: Route) -> None:
        bucket = self._buckets[route]
        while (wait := bucket.try_take()) > 0:  # noqa: ASYNC110 (a timed wait, no event to set)
            await asyncio.sleep(wait)

    # -- one request and what its answer means -----------------------------------------------

    async def _deliver(
        self, route: Route, rows: Sequence[OutboxRow], *, token_taken: bool = False
    ) -> None:
        # Sends claimed before a 429 or a pause wait for it too (a paused lane's own probe
        # is the one send that goes through).
        wait = self._not_before[route] - self.clock()
        if wait > 0:
            await self._sleep(wait)
        if self._stopping.is_set() or (self.paused is not None and self.clock() < self._probe_at):
            await self.store.retry([r.id for r in rows], self.clock(), count_attempt=False)
            return
        if not token_taken:
            await self._take_token(route)
        body = batch_body([r.body for r in rows]) if route == "track" else rows[0].body
        path = "/v1/batch" if route == "track" else f"/v1/{route}"
        started = time.perf_counter()
        outcome = await self.client.post(path, body)
        self.counts["requests"] += 1
        status = getattr(outcome, "status", None)
        if status is None:
            status = 429 if isinstance(outcome, RateLimited) else None
        metrics.ANSWERS.labels(path, str(status) if status else _failure(outcome)).inc()
        log.info(
            "forward",
            request_id=uuid.uuid4().hex,
            route=path,
            events=len(rows),
            outcome=type(outcome).__name__,
            status=getattr(outcome, "status", None),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        await self._settle(route, rows, outcome)

    async def _settle(self, route: Route, rows: Sequence[OutboxRow], outcome: Outcome) -> None:
        ids = [r.id for r in rows]
        now = self.clock()
        match outcome:
            case Accepted():
                await self.store.delivered(ids, now)
                self.counts["delivered"] += len(ids)
                metrics.FORWARDED.labels(route).inc(len(ids))
                if self._failures[route]:
                    await self._recovered(route, now)
                if self.paused is not None:
                    await self._resume()
                if route == "forget":
                    for row in rows:  # the sends that were in flight at forget time
                        await self.store.erase(_forget_decoder.decode(row.body).user_id)
                    log.info("forget delivered; local traces erased")
            case RateLimited(retry_after=wait):
                self.counts["rate_limited"] += 1
                metrics.RETRY_WAIT.labels("rate_limited").inc(wait)
                self._not_before[route] = max(self._not_before[route], now + wait)
                await self.store.retry(ids, now + wait, count_attempt=False)
            case AuthProblem(reason=reason):
                await self.store.retry(ids, now, count_attempt=False)
                await self._pause(reason)
            case Invalid(reason=reason) if len(rows) > 1:
                half = len(rows) // 2
                for part in (rows[:half], rows[half:]):
                    await self._deliver(route, part)
            case Invalid(reason=reason):
                await self.store.dead_letter(ids, reason, now)
                self.counts["dead"] += len(ids)
                metrics.DEAD_LETTERS.labels(route).inc(len(ids))
                log.warning(
                    "dead letter: Millimetric refused the call",
                    route=route,
                    outbox_id=ids[0],
                    reason=reason,
                )
            case Retryable(reason=reason):
                await self._retry_later(rows, reason, now)
                self._failures[route] += 1
                config = self.config
                hold = config.outage_hold * 2 ** min(self._failures[route] - 1, 30)
                hold = min(config.outage_hold_cap, hold)
                self._not_before[route] = max(self._not_before[route], now + hold)

    async def _recovered(self, route: Route, now: float) -> None:
        """Millimetric answers again after failures: what waits on a retry goes now (the
        buckets keep the pace), not after the rest of its backoff."""
        due = await self.store.hasten(route, now)  # a store error: the next success tries
        failures, self._failures[route] = self._failures[route], 0
        log.info("Millimetric answers again", route=route, failures=failures, due_now=due)
        self.wake(route)

    async def _retry_later(self, rows: Sequence[OutboxRow], reason: str, now: float) -> None:
        config = self.config
        expired = [r.id for r in rows if now - r.created_at >= config.max_age]
        alive = [r for r in rows if now - r.created_at < config.max_age]
        if expired:
            await self.store.dead_letter(
                expired, f"gave up after {config.max_age / 3600:g} h; last answer: {reason}", now
            )
            self.counts["dead"] += len(expired)
            metrics.DEAD_LETTERS.labels(rows[0].route).inc(len(expired))
        if alive:
            attempts = max(r.attempts for r in alive) + 1
            ceiling = min(config.backoff_cap, config.backoff_base * 2 ** min(attempts, 30))
            delay = random.uniform(0, ceiling)  # noqa: S311 (jitter, not a secret)
            await self.store.retry([r.id for r in alive], now + delay, count_attempt=True)
            metrics.RETRY_WAIT.labels("backoff").inc(delay)
            self.counts["retried"] += len(alive)

    async def _pause(self, reason: str) -> None:
        if self.paused is None:
            self._probe_after = self.config.probe_min
            log.error(
                "forwarding paused: Millimetric refused the key; nothing is dropped, "
                "fix MILLIMETRIC_KEY and it resumes by itself",
                reason=reason,
            )
        else:
            self._probe_after = min(self._probe_after * 2, self.config.probe_max)
        self.paused = reason
        metrics.PAUSED.set(1)
        self._probe_at = self.clock() + self._probe_after
        await self.store.set_paused(reason)

    async def _resume(self) -> None:
        log.info("forwarding resumed: Millimetric accepts the key again")
        self.paused = None
        metrics.PAUSED.set(0)
        await self.store.set_paused(None)

    # -- retention -----------------------------------------------------------------------------

    async def _gauges(self) -> None:
        """Keep the outbox gauges current for /metrics (on every instance)."""
        while not self._closing.is_set():
            try:
                backlog = await self.store.backlog()
                metrics.OUTBOX_PENDING.set(backlog.pending)
                metrics.OUTBOX_DEAD.set(backlog.dead)
                oldest = backlog.oldest_pending_at
                metrics.OUTBOX_OLDEST_AGE.set(self.clock() - oldest if oldest else 0)
                metrics.UNTRANSLATED.set(backlog.untranslated)
                waiting = backlog.oldest_untranslated_at
                metrics.UNTRANSLATED_OLDEST_AGE.set(self.clock() - waiting if waiting else 0)
                metrics.QUARANTINED.set(backlog.quarantined)
            except Exception:
                log.exception("outbox gauges failed; trying again later")
            await self._wait_closing(self.config.gauges_every)

    async def _janitor(self) -> None:
        while not self._stopping.is_set():
            try:
                counts = await self.store.cleanup(self.config.retention, self.clock())
                if any(counts.values()):
                    log.info("outbox cleanup", **counts)
            except Exception:
                log.exception("outbox cleanup failed; trying again later")
            await self._sleep(self.config.cleanup_every)
