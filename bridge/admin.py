"""The admin API under `/admin/`: outbox status, dead letters, replay, forget.

Mounted only when `BRIDGE_ADMIN_TOKEN` is set; every call needs
`Authorization: Bearer <token>`, compared in constant time. It answers with ids, counts
and reasons, never with payload bodies.
"""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Annotated, Any

import msgspec
from litestar import Request, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromQuery, JSONBody

from bridge.events import Forget
from bridge.store import Delivery, Selection, Store

__all__ = [
    "OutboxStatus",
    "admin_router",
    "forget_user",
    "outbox_status",
    "send_again",
    "translate_again",
]


class OutboxStatus(msgspec.Struct, frozen=True, kw_only=True):
    pending: int
    delivered: int
    dead: int
    oldest_pending_age: float | None
    inbox: int
    raw_payloads: int
    paused: str | None
    untranslated: int
    oldest_untranslated_age: float | None
    quarantined: int


async def outbox_status(store: Store, now: float) -> OutboxStatus:
    """Counts by state, the oldest waiting ages, and why forwarding is paused, if it is."""
    stats = await store.stats(now)
    oldest = stats.oldest_pending_at
    return OutboxStatus(
        pending=stats.pending,
        delivered=stats.delivered,
        dead=stats.dead,
        oldest_pending_age=now - oldest if oldest else None,
        inbox=stats.inbox,
        raw_payloads=stats.raw_payloads,
        paused=stats.paused,
        untranslated=stats.untranslated,
        oldest_untranslated_age=(
            now - stats.oldest_untranslated_at if stats.oldest_untranslated_at else None
        ),
        quarantined=stats.quarantined,
    )


async def send_again(state: State, selection: Selection) -> int:
    """Make the selected dead letters (or delivered calls) pending again, and wake the
    forwarder; how many. (The admin API's and the console's replay.)"""
    count = await state.store.replay(selection, time.time())
    state.forwarder.wake("track")
    return int(count)


async def translate_again(state: State, selection: Selection) -> int:
    """Queue the selected stored deliveries for translation again; how many."""
    count = await state.store.retranslate(selection)
    state.translator.wake()
    return int(count)


async def forget_user(state: State, user_id: str) -> None:
    """Purge the user's pending calls at once and queue Millimetric's forget. A blank id is
    `EventInvalid`, and nothing is erased."""
    call = Forget(user_id=user_id)
    await state.store.accept(
        Delivery(
            source="admin",
            provider_event_id=f"forget-{uuid.uuid4()}",
            received_at=time.time(),
            calls=[call],
        )
    )
    state.forwarder.wake("forget")


class DeadLetterView(msgspec.Struct, frozen=True, kw_only=True):
    """A call (`kind` "call": `id` an outbox row) or a quarantined delivery (`kind`
    "delivery": `id` an inbox row, `route` null, `provider_event_id` the provider's id)."""

    kind: str
    id: int
    route: str | None
    source: str | None
    event_id: str | None
    provider_event_id: str | None
    reason: str
    attempts: int
    created_at: float


class ReplayRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which rows to send again; with nothing named, `all` must be true."""

    ids: list[Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]] = []  # SQLite's range
    source: str | None = None
    since: float | None = None  # unix seconds
    all: bool = False
    include_delivered: bool = False


class RetranslateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which stored deliveries to translate again; with nothing named, `all` must be true."""

    ids: list[Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]] = []  # inbox ids
    source: str | None = None
    since: float | None = None  # unix seconds, by arrival
    all: bool = False


class ForgetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    user_id: Annotated[str, msgspec.Meta(min_length=1)]


class Count(msgspec.Struct, frozen=True):
    count: int


def admin_router(token: str) -> Router:
    expected = f"Bearer {token}".encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        given = connection.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):
            raise NotAuthorizedException(
                "admin API: Authorization: Bearer $BRIDGE_ADMIN_TOKEN needed",
                headers={"www-authenticate": "Bearer"},
            )

    def store_of(request: Request[Any, Any, Any]) -> Store:
        store: Store = request.app.state.store
        return store

    @get("/outbox", summary="Outbox status")
    async def status(request: Request[Any, Any, Any]) -> OutboxStatus:
        """Counts by state, the age of the oldest pending call, and whether forwarding is
        paused (with Millimetric's answer)."""
        return await outbox_status(store_of(request), time.time())

    @get("/dead", summary="Dead letters")
    async def dead(
        request: Request[Any, Any, Any], limit: FromQuery[int] = 100
    ) -> list[DeadLetterView]:
        """Calls Millimetric refused or that failed past the maximum age, and deliveries
        their handler could not translate (quarantined), each with the reason."""
        letters = await store_of(request).dead_letters(max(1, min(limit, 1000)))
        return [
            DeadLetterView(
                kind=d.kind,
                id=d.id,
                route=d.route,
                source=d.source,
                event_id=d.event_id,
                provider_event_id=d.provider_event_id,
                reason=d.reason,
                attempts=d.attempts,
                created_at=d.created_at,
            )
            for d in letters
        ]

    @post("/replay", status_code=200, summary="Send dead letters again")
    async def replay(request: Request[Any, Any, Any], data: JSONBody[ReplayRequest]) -> Count:
        """Make the selected dead letters (or delivered calls) pending again."""
        if not (data.ids or data.source or data.since is not None or data.all):
            from litestar.exceptions import ValidationException

            raise ValidationException("name ids, a source, since, or set all: true")
        selection = Selection(
            ids=data.ids,
            source=data.source,
            since=data.since,
            include_delivered=data.include_delivered,
        )
        return Count(await send_again(request.app.state, selection))

    @post("/retranslate", status_code=200, summary="Translate stored deliveries again")
    async def retranslate(
        request: Request[Any, Any, Any], data: JSONBody[RetranslateRequest]
    ) -> Count:
        """Run the current handler and options again over the selected stored deliveries
        (quarantined, or translated while their raw body is kept); only calls not already
        queued or sent are queued."""
        if not (data.ids or data.source or data.since is not None or data.all):
            from litestar.exceptions import ValidationException

            raise ValidationException("name ids, a source, since, or set all: true")
        selection = Selection(deliveries=data.ids, source=data.source, since=data.since)
        return Count(await translate_again(request.app.state, selection))

    @post("/forget", status_code=202, summary="Erase a user")
    async def forget(request: Request[Any, Any, Any], data: JSONBody[ForgetRequest]) -> Count:
        """Purge the user's pending calls at once and queue Millimetric's forget."""
        await forget_user(request.app.state, data.user_id)  # a blank id: 400, nothing erased
        return Count(1)

    return Router(
        "/admin",
        route_handlers=[status, dead, replay, retranslate, forget],
        guards=[guard],
        tags=["admin"],
        security=[{"BearerToken": []}],
    )
