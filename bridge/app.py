"""The Litestar application factory: webhook intake, health and the forwarder's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from litestar import Litestar, get

from bridge.client import MillimetricClient, build_http_client
from bridge.config import Settings

__all__ = ["create_app"]


def create_app(settings: Settings, *, http: httpx.AsyncClient | None = None) -> Litestar:
    """Build the app. `http` replaces the outbound client (tests pass a MockTransport one)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        client = http or build_http_client()
        app.state.millimetric = MillimetricClient(
            client, key=settings.millimetric_key, host=settings.millimetric_host
        )
        try:
            yield
        finally:
            if http is None:
                await client.aclose()

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @get("/readyz", sync_to_thread=False)
    def readyz() -> dict[str, Any]:
        """Readiness: the parts the bridge needs are up."""
        return {"status": "ready"}

    app = Litestar(route_handlers=[healthz, readyz], lifespan=[lifespan], logging_config=None)
    app.state.settings = settings
    return app
