"""The Litestar application factory: health, and the store and forwarder in its lifespan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from litestar import Litestar, Request, get
from litestar.response import Response

from bridge.client import MillimetricClient, build_http_client
from bridge.config import Settings
from bridge.errors import StoreUnavailable
from bridge.forwarder import Forwarder
from bridge.store import Store, open_store

__all__ = ["create_app"]

_READY_TIMEOUT = 2.0


def create_app(
    settings: Settings, *, http: httpx.AsyncClient | None = None, store: Store | None = None
) -> Litestar:
    """Build the app. `http` and `store` replace what the settings would build (tests)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        client = http or build_http_client()
        outbox = store or open_store(
            settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
        )
        await outbox.open()
        await outbox.recover(time.time())
        forwarder = Forwarder(
            outbox,
            MillimetricClient(client, key=settings.millimetric_key, host=settings.millimetric_host),
            settings.forwarder,
        )
        app.state.store = outbox
        app.state.forwarder = forwarder
        forwarder.start()
        try:
            yield
        finally:
            # Intake has stopped (uvicorn drains requests first); let sends in flight finish.
            await forwarder.stop(settings.shutdown_grace)
            await outbox.close()
            if http is None:
                await client.aclose()

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @get("/readyz")
    async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Readiness: the store answers and the forwarder runs. `degraded` (still 200) when
        forwarding is paused on a refused key or the oldest pending call is too old."""
        forwarder: Forwarder = request.app.state.forwarder
        now = time.time()
        try:
            stats = await asyncio.wait_for(request.app.state.store.stats(now), _READY_TIMEOUT)
        except (StoreUnavailable, TimeoutError) as error:
            return Response(
                {"status": "unavailable", "reasons": [f"store: {error}"]}, status_code=503
            )
        if not forwarder.running:
            return Response(
                {"status": "unavailable", "reasons": ["forwarder stopped"]}, status_code=503
            )
        reasons = []
        if forwarder.paused:
            reasons.append(f"forwarding paused: Millimetric refused the key ({forwarder.paused})")
        lag = now - stats.oldest_pending_at if stats.oldest_pending_at else 0.0
        if lag > settings.ready_max_lag:
            reasons.append(f"oldest pending call is {lag:.0f}s old")
        body = {
            "status": "degraded" if reasons else "ready",
            "reasons": reasons,
            "pending": stats.pending,
            "dead": stats.dead,
            "oldest_pending_age": lag,
        }
        return Response(body)

    app = Litestar(route_handlers=[healthz, readyz], lifespan=[lifespan], logging_config=None)
    app.state.settings = settings
    return app
