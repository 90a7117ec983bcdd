"""The operator's console: server-rendered pages under `/console`, signed in with
`BRIDGE_ADMIN_TOKEN` (off, 404, without it).

Pages are Jinja2 templates (`templates/`) rendered by Litestar; the few assets (a style
sheet, htmx for the overview's refresh) are served by the bridge itself from `static/`:
no build step, nothing fetched from elsewhere, every page readable without JavaScript.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Final

from jinja2 import Environment, PackageLoader, select_autoescape
from litestar import Router
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template import TemplateConfig

from bridge.console.routes import console_router
from bridge.console.session import Throttle

__all__ = ["Throttle", "console_routes", "template_config"]

STATIC: Final = Path(__file__).parent / "static"


def console_routes(token: str, throttle: Throttle | None = None) -> list[Router]:
    """The console's pages, and its static files (served to anyone: nothing in them is
    private)."""
    return [
        console_router(token, throttle),
        create_static_files_router(
            "/console/static", directories=[STATIC], include_in_schema=False
        ),
    ]


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    environment = Environment(
        loader=PackageLoader("bridge.console", "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["ago"] = ago
    environment.filters["when"] = when
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment))


def ago(seconds: float | None) -> str:
    """A duration as a person reads it: `42 s`, `5 min`, `3 h`, `2 d`."""
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def when(timestamp: Any) -> str:
    """A unix time in UTC, to the second."""
    if timestamp is None:
        return "—"
    moment = datetime.datetime.fromtimestamp(float(timestamp), datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
