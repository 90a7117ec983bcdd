"""The Litestar application factory: health, and the store and forwarder in its lifespan."""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import httpx
import structlog
from litestar import Litestar, Request, get
from litestar.exceptions import HTTPException
from litestar.exceptions.responses import create_exception_response
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusController
from litestar.response import Response
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from bridge import metrics
from bridge.admin import admin_router
from bridge.backfill import Target, targets
from bridge.client import MillimetricClient, build_http_client
from bridge.config import Settings
from bridge.console import console_routes, template_config
from bridge.errors import (
    BridgeError,
    EventInvalid,
    HandlerFailed,
    IngestRefused,
    PayloadInvalid,
    SignatureInvalid,
    StoreUnavailable,
)
from bridge.http_metrics import HttpMetrics
from bridge.ingest_api import error_body
from bridge.registry import Source, load_handlers, load_sources, load_templates
from bridge.stages.forward import Forwarder
from bridge.stages.intake import intake_route
from bridge.stages.reconcile import Reconciler
from bridge.stages.relay import Relay, relay_routes
from bridge.stages.relay_handler import with_relay
from bridge.stages.translate import Translator
from bridge.store import Store, open_store

__all__ = ["create_app", "error_response"]

log = structlog.get_logger("bridge.app")

_READY_TIMEOUT = 2.0


_STATUS: Final[dict[type[BridgeError], tuple[int, str]]] = {
    SignatureInvalid: (401, "invalid_signature"),
    PayloadInvalid: (400, "invalid_payload"),
    EventInvalid: (400, "invalid_payload"),
    HandlerFailed: (503, "handler_failed"),
    StoreUnavailable: (503, "store_unavailable"),
}


def error_response(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """The one place where an exception becomes an answer: the error tree by `_STATUS`,
    Litestar's own HTTP exceptions as Litestar answers them, and anything else (a bug) by
    the last resort, never as a bare 500."""
    if isinstance(error, IngestRefused):  # the relay's refusals, in Millimetric's words
        return Response(
            error_body(error.code, error.message),
            status_code=error.status,
            media_type="application/json",
            headers=error.headers,
        )
    mapped = next((v for k, v in _STATUS.items() if isinstance(error, k)), None)
    if mapped is not None:
        return _answer(*mapped, str(error)[:300])
    if isinstance(error, HTTPException) and error.status_code != HTTP_500_INTERNAL_SERVER_ERROR:
        return create_exception_response(request, error)
    return _last_resort(request, error)


def _last_resort(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """An exception no code expected. 503 rather than 500: the caller (a provider, above
    all) retries, and once the bug is fixed nothing is lost. The log line and the metric
    name the exception's type, never its message or traceback, which may quote a payload
    or a secret; the route's template stands for the path, which the client chose."""
    path = request.scope.get("path_template") or "unmatched"
    failed = type(error).__name__
    cause = error.__cause__ or error.__context__
    metrics.unexpected(path, failed)
    log.error(
        "unexpected_error",
        method=request.scope.get("method"),
        path=path,
        error=failed,
        cause=type(cause).__name__ if cause is not None else None,
    )
    return _answer(503, "internal_error", f"unexpected {failed}")


def _answer(status: int, code: str, reason: str) -> Response[Any]:
    return Response(
        {"ok": False, "error": code, "reason": reason},
        status_code=status,
        headers={"retry-after": "5"} if status == 503 else None,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("millimetric-bridge")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def create_app(
    settings: Settings,
    *,
    http: httpx.AsyncClient | None = None,
    store: Store | None = None,
    sources: Mapping[str, Source] | None = None,
    dev: bool = False,
    reconciled: Sequence[Target] | None = None,
) -> Litestar:
    """Build the app. `http`, `store`, `sources` and `reconciled` (the sources the periodic
    reconcile lists) replace what the settings would build."""
    if sources is None:
        sources = load_sources(settings.env, load_handlers(), templates=load_templates(), dev=dev)
    if reconciled is None:
        reconciled = targets(sources, settings.env)
    relay = Relay(settings.relay_keys, settings.relay_max_pending) if settings.relay_keys else None

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        client = http or build_http_client()
        outbox = store or open_store(
            settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
        )
        try:
            await outbox.open()
            await outbox.recover(time.time())
        except BaseException:
            await outbox.close()
            if http is None:
                await client.aclose()
            raise
        translator = Translator(outbox, with_relay(sources))
        reconciler = None
        if reconciled and settings.reconcile.every > 0:
            reconciler = Reconciler(
                outbox,
                reconciled,
                settings.reconcile,
                inbox_retention=settings.forwarder.retention.inbox,
            )
        forwarder = Forwarder(
            outbox,
            MillimetricClient(client, key=settings.millimetric_key, host=settings.millimetric_host),
            settings.forwarder,
            translator=translator,
            reconciler=reconciler,
        )
        app.state.store = outbox
        app.state.translator = translator
        app.state.forwarder = forwarder
        if relay is not None:
            relay.bind(outbox, translator, forwarder)
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
        forwarding is paused on a refused key, or the oldest pending call or the oldest
        delivery waiting for translation is too old.
        `forwarding` says whether this instance is the store's one forwarder (`leader`) or
        stands by (`standby`: it takes webhooks all the same)."""
        forwarder: Forwarder = request.app.state.forwarder
        now = time.time()
        try:
            backlog = await asyncio.wait_for(request.app.state.store.backlog(), _READY_TIMEOUT)
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
        lag = now - backlog.oldest_pending_at if backlog.oldest_pending_at else 0.0
        if lag > settings.ready_max_lag:
            reasons.append(f"oldest pending call is {lag:.0f}s old")
        waiting = backlog.oldest_untranslated_at
        translate_lag = now - waiting if waiting else 0.0
        if translate_lag > settings.ready_max_lag:
            reasons.append(f"oldest untranslated delivery is {translate_lag:.0f}s old")
        body = {
            "status": "degraded" if reasons else "ready",
            "reasons": reasons,
            "pending": backlog.pending,
            "dead": backlog.dead,
            "oldest_pending_age": lag,
            "untranslated": backlog.untranslated,
            "oldest_untranslated_age": translate_lag,
            "quarantined": backlog.quarantined,
            "forwarding": "leader" if forwarder.leading else "standby",
        }
        return Response(body)

    handlers: list[Any] = [
        healthz,
        readyz,
        intake_route(
            sources, settings.max_body_bytes, error_response, body_timeout=settings.body_timeout
        ),
        PrometheusController,
    ]
    if relay is not None:
        handlers += relay_routes(
            relay, settings.max_body_bytes, error_response, body_timeout=settings.body_timeout
        )
    templates = None
    if settings.admin_token:
        handlers.append(admin_router(settings.admin_token))
        handlers += console_routes(settings.admin_token)
        templates = template_config()
    app = Litestar(
        route_handlers=handlers,
        middleware=[HttpMetrics],
        openapi_config=OpenAPIConfig(
            title="millimetric-bridge",
            version=_version(),
            components=Components(
                security_schemes={
                    "BearerToken": SecurityScheme(
                        type="http", scheme="bearer", description="BRIDGE_ADMIN_TOKEN"
                    ),
                }
            ),
        ),
        lifespan=[lifespan],
        template_config=templates,
        # The error tree, Litestar's 500 (its InternalServerException) and, by Litestar's
        # rule for a 500 handler, every exception outside the HTTP ones: all one mapping.
        exception_handlers={
            BridgeError: error_response,
            HTTP_500_INTERNAL_SERVER_ERROR: error_response,
        },
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
    )
    app.state.sources = sources
    app.state.relay = relay
    app.state.settings = settings
    return app
