"""The `Store` protocol over a driver's transactions: every operation but the driver's own.

A driver (`SQLiteStore`, `PostgresStore`) supplies what differs between databases: how it
connects, how it runs an operation in one transaction (`_transact`), group commit for
`append`, who forwards (`recover`, `lead`, `lost`), and what follows an erasure
(`_erased`: SQLite checkpoints its WAL). The operations themselves, written once, are in
`bridge.store.operations`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bridge.events import Forget, ForgetVisitor, Purge
from bridge.store import (
    AcceptResult,
    Backlog,
    DeadLetter,
    Delivery,
    OutboxRow,
    OutboxStats,
    Retention,
    Route,
    Selection,
    StoredDelivery,
    Translation,
    hash_subject,
    reconcile_key,
)
from bridge.store import operations as ops
from bridge.store.sql import Op
from bridge.store.views import DeliveryDetail, DeliveryRow, Rates, Result, SourceActivity

__all__ = ["SQLStore"]

T = TypeVar("T")


class SQLStore:
    """The operations of `Store` that every driver shares."""

    async def _transact(self, operation: Callable[..., Op[T]], *args: Any, read: bool = False) -> T:
        """`operation(*args)` run in one transaction (`read`: it writes nothing, and may run
        beside the writer); the generator is made anew for each try."""
        raise NotImplementedError

    async def _erased(self) -> None:
        """Something stored was just erased: make sure no copy of it is left behind."""

    async def erase(self, user_id: str) -> int:
        erased = await self._transact(ops.erase, hash_subject(user_id), time.time())
        await self._erased()
        return erased

    async def accept(self, delivery: Delivery) -> AcceptResult:
        result = await self._transact(ops.accept, delivery)
        if any(isinstance(c, Forget | ForgetVisitor | Purge) for c in delivery.calls):
            await self._erased()
        return result

    async def untranslated(self, limit: int) -> list[StoredDelivery]:
        return await self._transact(ops.untranslated, limit, read=True)

    async def record(self, translations: Sequence[Translation]) -> None:
        if not translations:
            return
        if await self._transact(ops.record, translations, time.time()):
            await self._erased()

    async def retranslate(self, selection: Selection) -> int:
        return await self._transact(ops.retranslate, selection)

    async def claim(self, route: Route, limit: int, max_bytes: int, now: float) -> list[OutboxRow]:
        return await self._transact(ops.claim, route, limit, max_bytes, now)

    async def delivered(self, ids: Sequence[int], now: float) -> None:
        if ids:
            await self._transact(ops.delivered, list(ids), now)

    async def retry(self, ids: Sequence[int], next_at: float, *, count_attempt: bool) -> None:
        if ids:
            await self._transact(ops.retry, list(ids), next_at, count_attempt)

    async def dead_letter(self, ids: Sequence[int], reason: str, now: float) -> None:
        if ids:
            await self._transact(ops.dead_letter, list(ids), reason, now)

    async def hasten(self, route: Route, now: float) -> int:
        return await self._transact(ops.hasten, route, now)

    async def backlog(self) -> Backlog:
        # A write transaction begun and ended at once: the store takes deliveries (its
        # writer is not stuck, and no other process holds the write lock past the busy
        # timeout); the counts are then read beside the writer.
        await self._transact(ops.nothing)
        return await self._transact(ops.backlog, read=True)

    async def stats(self, now: float) -> OutboxStats:
        return await self._transact(ops.stats, read=True)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._transact(ops.dead_letters, limit, read=True)

    async def replay(self, selection: Selection, now: float) -> int:
        return await self._transact(ops.replay, selection, now)

    async def purge(self, selection: Selection) -> int:
        return await self._transact(ops.purge, selection)

    async def cleanup(self, retention: Retention, now: float) -> dict[str, int]:
        counts = {"delivered": 0, "raw_payloads": 0, "inbox": 0}
        for kind, query, age in (
            ("delivered", "clean_delivered", retention.delivered),
            ("raw_payloads", "clean_raw", retention.raw_payloads),
            ("inbox", "clean_inbox", retention.inbox),
        ):
            while True:  # in chunks, each its own transaction, so intake interleaves
                done = await self._transact(ops.clean, query, now - age)
                counts[kind] += done
                if done < ops.CLEANUP_CHUNK:
                    break
        return counts

    async def set_paused(self, reason: str | None) -> None:
        await self._transact(ops.set_meta, "paused", reason)

    async def received(self, source: str, delivery_ids: Sequence[str]) -> set[str]:
        if not delivery_ids:
            return set()
        return await self._transact(ops.received, source, list(delivery_ids), read=True)

    async def first_received(self, source: str) -> float | None:
        return await self._transact(ops.first_received, source, read=True)

    async def reconciled_until(self, source: str) -> float | None:
        value = await self._transact(ops.meta, reconcile_key(source), read=True)
        return None if value is None else float(value)

    async def set_reconciled_until(self, source: str, until: float) -> None:
        await self._transact(ops.set_meta, reconcile_key(source), repr(until))

    async def deliveries(
        self,
        *,
        source: str | None = None,
        result: Result | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[DeliveryRow]:
        return await self._transact(ops.deliveries, source, result, before, limit, read=True)

    async def delivery(self, inbox_id: int) -> DeliveryDetail | None:
        return await self._transact(ops.delivery, inbox_id, read=True)

    async def raw_body(self, inbox_id: int) -> bytes | None:
        return await self._transact(ops.raw_body, inbox_id, read=True)

    async def activity(self, sources: Sequence[str], now: float) -> list[SourceActivity]:
        return await self._transact(ops.activity, list(sources), now, read=True)

    async def rates(self, since: float, step: float, buckets: int) -> Rates:
        return await self._transact(ops.rates, since, step, buckets, read=True)

    async def _release_claims(self, now: float) -> int:
        return await self._transact(ops.release_all_claims, now)
