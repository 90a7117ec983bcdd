"""The baselines for bench/intake.py: Litestar answering a POST after reading its body.

`app` is the framework's own way: a `@post` handler that awaits `request.body()` and
returns a dict. `raw` declares the same route and serves it the way the bridge serves
`/webhooks/{source}`: a route middleware that reads the body from `receive` and answers
with a prebuilt response, never calling the handler. The bridge against `app` is the
issue's ratio; against `raw`, what the bridge's own work costs.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, post
from litestar.types import ASGIApp, Receive, Scope, Send


async def webhook(request: Request[Any, Any, Any]) -> dict[str, bool]:
    await request.body()
    return {"ok": True}


app = Litestar(
    route_handlers=[post("/webhooks/{source:str}", status_code=200)(webhook)],
    openapi_config=None,
    logging_config=None,
)

_OK = b'{"ok":true}'


def _serve_raw(app: ASGIApp) -> ASGIApp:  # `app`: the handler, which it never calls
    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            event = await receive()
            more = event.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
            }
        )
        await send({"type": "http.response.body", "body": _OK, "more_body": False})

    return serve


raw = Litestar(
    route_handlers=[
        post("/webhooks/{source:str}", status_code=200, middleware=[_serve_raw])(webhook)
    ],
    openapi_config=None,
    logging_config=None,
)
