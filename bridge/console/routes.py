"""The console's pages under `/console`: overview, deliveries, dead letters, forget.

Every page but sign-in needs a session (`bridge.console.session`); every form that
changes something is a POST carrying the CSRF token, refused when it comes from another
site. Actions go through the admin API's own functions (`bridge.admin`), so the console
does nothing the API does not. What a URL carries is never secret nor personal: ids of
stored rows, source names, filters; a user id travels in a POST body only.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import structlog
from litestar import Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import FormMultiDict, ResponseHeader
from litestar.exceptions import NotAuthorizedException, NotFoundException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from bridge import metrics
from bridge.admin import forget_user, outbox_status, send_again, translate_again
from bridge.console.chart import chart
from bridge.console.session import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    SESSION_SECONDS,
    Keys,
    Throttle,
    client_hash,
    client_of,
    cookie,
    over_https,
)
from bridge.errors import EventInvalid
from bridge.store import Selection, Store
from bridge.store.views import RESULTS, Result

__all__ = ["console_router"]

log = structlog.get_logger("bridge.console")

PAGE_SIZE: Final = 50
#: Served with every page: nothing from elsewhere, no framing, no referrer to other sites
#: (`no-referrer` would make Chromium send `Origin: null` with the forms), no caching.
HEADERS: Final = [
    ResponseHeader(
        name="content-security-policy",
        value="default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'",
    ),
    ResponseHeader(name="referrer-policy", value="same-origin"),
    ResponseHeader(name="x-content-type-options", value="nosniff"),
    ResponseHeader(name="cache-control", value="no-store"),
]
AnyRequest = Request[Any, Any, Any]


def console_router(token: str, throttle: Throttle | None = None) -> Router:
    """The console's routes, signed in with `token` (the admin token)."""
    keys = Keys(token)
    wrong = throttle or Throttle()

    def page(request: AnyRequest, name: str, code: int = 200, **context: Any) -> Template:
        """A page, its forms carrying the CSRF token of the browser's CSRF cookie (set
        here on its first page)."""
        nonce = request.cookies.get(CSRF_COOKIE)
        cookies = []
        if not nonce:
            nonce = secrets.token_urlsafe(16)
            cookies.append(cookie(CSRF_COOKIE, nonce, secure=over_https(request)))
        return Template(
            template_name=name,
            context={"csrf": keys.csrf_token(nonce), **context},
            status_code=code,
            cookies=cookies,
        )

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public"):
            return
        if not keys.signed_in(connection.cookies.get(SESSION_COOKIE), time.time()):
            raise NotAuthorizedException("sign in first")

    async def checked(request: AnyRequest) -> FormMultiDict:
        """The form of a POST from the console's own pages; another site's is refused."""
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if site in ("cross-site", "same-site") or (
            origin is not None and urlsplit(origin).netloc != request.headers.get("host")
        ):
            refuse(request, "origin")
        form = await request.form()
        if not keys.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("_csrf")):
            refuse(request, "csrf")
        return form

    def refuse(request: AnyRequest, reason: str) -> None:
        metrics.CONSOLE_REFUSED.labels(reason).inc()
        log.warning("console_refused", reason=reason, path=request.scope.get("path_template"))
        raise PermissionDeniedException(reason)

    def store_of(request: AnyRequest) -> Store:
        store: Store = request.app.state.store
        return store

    def source_names(request: AnyRequest) -> list[str]:
        names = sorted(request.app.state.sources)
        if request.app.state.relay is not None:
            names.append("relay")
        return names

    # -- signing in ------------------------------------------------------------------------

    @get("/sign-in", opt={"public": True})
    async def sign_in_form(request: AnyRequest) -> Template:
        return page(request, "sign_in.html", title="Sign in")

    @post("/sign-in", opt={"public": True}, status_code=303)
    async def sign_in(request: AnyRequest) -> Response[Any]:
        form = await checked(request)
        client, now = client_of(request), time.time()
        wait = wrong.wait(client, now)
        if wait > 0:
            metrics.CONSOLE_SIGN_INS.labels("throttled").inc()
            log.warning("console_sign_in", result="throttled", client=client_hash(client))
            response = page(
                request,
                "sign_in.html",
                429,
                title="Sign in",
                message=f"Too many wrong tokens: try again in {int(wait) + 1} s.",
            )
            response.headers["retry-after"] = str(int(wait) + 1)
            return response
        if not keys.is_token(str(form.get("token", ""))):
            failures = wrong.failed(client, now)
            metrics.CONSOLE_SIGN_INS.labels("refused").inc()
            log.warning(
                "console_sign_in", result="refused", client=client_hash(client), failures=failures
            )
            return page(request, "sign_in.html", 401, title="Sign in", message="Wrong token.")
        wrong.succeeded(client)
        metrics.CONSOLE_SIGN_INS.labels("ok").inc()
        log.info("console_sign_in", result="ok", client=client_hash(client))
        session = cookie(
            SESSION_COOKIE, keys.session(now), secure=over_https(request), max_age=SESSION_SECONDS
        )
        return Redirect("/console", status_code=303, cookies=[session])

    @post("/sign-out", status_code=303)
    async def sign_out(request: AnyRequest) -> Redirect:
        await checked(request)
        gone = cookie(SESSION_COOKIE, "", secure=over_https(request), max_age=0)
        return Redirect("/console/sign-in", status_code=303, cookies=[gone])

    # -- overview --------------------------------------------------------------------------

    async def overview_context(request: AnyRequest) -> dict[str, Any]:
        now = time.time()
        store = store_of(request)
        sources = request.app.state.sources
        forwarder = request.app.state.forwarder
        return {
            "status": await outbox_status(store, now),
            "activity": await store.activity(source_names(request), now),
            "configured": {name: source.configured for name, source in sources.items()}
            | {"relay": True},
            "chart": chart(await store.rates(now - 3600, 60, 60)),
            "leading": forwarder.leading,
            "now": now,
        }

    @get("/")
    async def overview(request: AnyRequest) -> Template:
        context = await overview_context(request)
        return page(request, "overview.html", title="Overview", section="overview", **context)

    @get("/panel")
    async def panel(request: AnyRequest) -> Template:
        """The overview's figures alone, for its refresh every few seconds (htmx)."""
        return page(request, "_overview_panel.html", **await overview_context(request))

    # -- deliveries ------------------------------------------------------------------------

    @get("/deliveries")
    async def deliveries(
        request: AnyRequest,
        source: FromQuery[str | None] = None,
        result: FromQuery[str | None] = None,
        before: FromQuery[int | None] = None,
    ) -> Template:
        chosen: Result | None = next((r for r in RESULTS if r == result), None)
        names = [*source_names(request), "admin"]
        found = await store_of(request).deliveries(
            source=source or None, result=chosen, before=before, limit=PAGE_SIZE + 1
        )
        return page(
            request,
            "deliveries.html",
            title="Deliveries",
            section="deliveries",
            rows=found[:PAGE_SIZE],
            older=found[PAGE_SIZE - 1].id if len(found) > PAGE_SIZE else None,
            source=source or "",
            result=chosen or "",
            sources=names,
            results=RESULTS,
            paged=before is not None,
            now=time.time(),
        )

    async def delivery_page(request: AnyRequest, inbox_id: int, raw: bytes | None) -> Template:
        found = await store_of(request).delivery(inbox_id)
        if found is None:
            raise NotFoundException(f"no delivery {inbox_id} is stored")
        return page(
            request,
            "delivery.html",
            title=f"Delivery {inbox_id}",
            section="deliveries",
            delivery=found,
            calls=[(call, _text(call.body)) for call in found.calls],
            raw=None if raw is None else _text(raw),
            now=time.time(),
        )

    @get("/deliveries/{inbox_id:int}")
    async def delivery(request: AnyRequest, inbox_id: FromPath[int]) -> Template:
        return await delivery_page(request, inbox_id, None)

    @post("/deliveries/{inbox_id:int}/raw", status_code=200)
    async def delivery_raw(request: AnyRequest, inbox_id: FromPath[int]) -> Template:
        """The page with the raw body shown: asked for by a button, so that it never sits
        in a URL or the browser's history; only while the body is kept."""
        await checked(request)
        raw = await store_of(request).raw_body(inbox_id)
        log.info("console_raw_body", delivery=inbox_id, kept=raw is not None)
        return await delivery_page(request, inbox_id, raw)

    # -- dead letters ----------------------------------------------------------------------

    @get("/dead")
    async def dead(
        request: AnyRequest, done: FromQuery[str | None] = None, count: FromQuery[int] = 0
    ) -> Template:
        letters = await store_of(request).dead_letters(500)
        return page(
            request,
            "dead.html",
            title="Dead letters",
            section="dead",
            letters=letters,
            sources=sorted({d.source for d in letters if d.source}),
            done=done if done in _DONE else None,
            count=count,
            now=time.time(),
        )

    async def act(request: AnyRequest, action: str) -> Redirect:
        form = await checked(request)
        kind, source = form.get("kind"), form.get("source") or None
        try:
            row = int(form.get("id", 0))
        except ValueError:
            row = 0
        store = store_of(request)
        state = request.app.state
        if kind == "call" and row > 0:
            one = Selection(ids=[row])
            count = await (send_again(state, one) if action == "replay" else store.purge(one))
        elif kind == "delivery" and row > 0:
            one = Selection(deliveries=[row])
            count = await (translate_again(state, one) if action == "replay" else store.purge(one))
        elif kind == "source" and source:
            count = await by_source(request, action, source)
        else:
            raise PermissionDeniedException("name a dead letter or a source")
        log.info("console_action", action=action, kind=kind, count=count)
        return Redirect(f"/console/dead?done={action}&count={count}", status_code=303)

    async def by_source(request: AnyRequest, action: str, source: str) -> int:
        """A source's dead letters: its dead calls sent again and its quarantined
        deliveries translated again (only those: a source's other deliveries stay as
        they are), or all of them purged."""
        store, state = store_of(request), request.app.state
        if action == "purge":
            return await store.purge(Selection(source=source))
        count = await send_again(state, Selection(source=source))
        # Named one by one: a selection by source alone would translate again every
        # delivery of the source whose raw body is kept, not only the quarantined ones.
        quarantined = [
            d.id
            for d in await store.dead_letters(10_000)
            if d.kind == "delivery" and d.source == source
        ]
        if quarantined:
            count += await translate_again(state, Selection(deliveries=quarantined))
        return count

    @post("/dead/replay", status_code=303)
    async def replay(request: AnyRequest) -> Redirect:
        return await act(request, "replay")

    @post("/dead/purge", status_code=303)
    async def purge(request: AnyRequest) -> Redirect:
        return await act(request, "purge")

    # -- forget ----------------------------------------------------------------------------

    @get("/forget")
    async def forget_form(request: AnyRequest) -> Template:
        return page(request, "forget.html", title="Forget a user", section="forget")

    @post("/forget", status_code=200)
    async def forget_confirm(request: AnyRequest) -> Template:
        """The confirmation step: the user id comes back in the body, never in the URL."""
        form = await checked(request)
        user_id = str(form.get("user_id", "")).strip()
        if not user_id:
            return page(
                request,
                "forget.html",
                400,
                title="Forget a user",
                section="forget",
                message="Give the user id to forget.",
            )
        return page(
            request, "forget.html", title="Forget a user", section="forget", confirm=user_id
        )

    @post("/forget/confirm", status_code=200)
    async def forget(request: AnyRequest) -> Template:
        form = await checked(request)
        user_id = str(form.get("user_id", "")).strip()
        try:
            await forget_user(request.app.state, user_id)
        except EventInvalid as error:
            return page(
                request,
                "forget.html",
                400,
                title="Forget a user",
                section="forget",
                message=f"Not forgotten: {error}",
            )
        log.info("console_action", action="forget", count=1)
        return page(request, "forget.html", title="Forget a user", section="forget", done=True)

    # -- refusals, as pages ----------------------------------------------------------------

    def signed_out(request: AnyRequest, _: Exception) -> Response[Any]:
        if request.headers.get("hx-request"):  # an overview refresh: htmx goes to sign-in
            return Response(b"", status_code=401, headers={"hx-redirect": "/console/sign-in"})
        if request.method == "GET":
            return Redirect("/console/sign-in", status_code=303)
        return page(
            request, "sign_in.html", 401, title="Sign in", message="Signed out: sign in again."
        )

    def forbidden(request: AnyRequest, error: Exception) -> Response[Any]:
        detail = getattr(error, "detail", "")
        message = {
            "origin": "Refused: this form was sent from another site.",
            "csrf": "Refused: the form had no valid token (reload the page and try again).",
        }.get(detail, f"Refused: {detail}")
        return page(request, "refused.html", 403, title="Refused", message=message)

    def not_found(request: AnyRequest, error: Exception) -> Response[Any]:
        return page(
            request, "refused.html", 404, title="Not found", message=getattr(error, "detail", "")
        )

    return Router(
        "/console",
        route_handlers=[
            sign_in_form,
            sign_in,
            sign_out,
            overview,
            panel,
            deliveries,
            delivery,
            delivery_raw,
            dead,
            replay,
            purge,
            forget_form,
            forget_confirm,
            forget,
        ],
        guards=[guard],
        response_headers=HEADERS,
        exception_handlers={
            NotAuthorizedException: signed_out,
            PermissionDeniedException: forbidden,
            NotFoundException: not_found,
        },
        include_in_schema=False,
    )


_DONE: Final = frozenset({"replay", "purge"})


def _text(body: bytes) -> str:
    """A body as the page shows it: JSON indented, anything else as text."""
    try:
        return msgspec.json.format(body, indent=2).decode()
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace")
