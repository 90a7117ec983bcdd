"""The baseline for bench/intake.py: Litestar answering a POST after reading its body."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, post


@post("/webhooks/{source:str}", status_code=200)
async def webhook(request: Request[Any, Any, Any]) -> dict[str, bool]:
    await request.body()
    return {"ok": True}


app = Litestar(route_handlers=[webhook], openapi_config=None, logging_config=None)
