"""The `millimetric-bridge` command line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine, Mapping
from importlib.metadata import entry_points
from typing import Any, NoReturn

import click
import uvicorn

from bridge.config import Settings, load_settings
from bridge.errors import ConfigError
from bridge.logs import configure_logging
from bridge.outbox_cli import forget, outbox

__all__ = ["main"]

DEV_PORT = 8000
SINK_PORT = 8787
HANDLER_GROUP = "millimetric_bridge.handlers"


def _refuse(error: ConfigError) -> NoReturn:
    """One line naming the variable and why; exit code 2, before anything listens."""
    click.echo(f"millimetric-bridge: {error}", err=True)
    sys.exit(2)


def _settings(env: Mapping[str, str], **kwargs: Any) -> Settings:
    try:
        return load_settings(env, **kwargs)
    except ConfigError as error:
        _refuse(error)


def _run(main: Coroutine[Any, Any, Any]) -> None:
    """Run until a signal. uvicorn shuts down cleanly on SIGINT or SIGTERM, then raises the
    signal again for whoever handled it before: here, that means exit 0."""

    def stopped(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main)


def _server(app: Any, host: str, port: int) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="millimetric-bridge")
def main() -> None:
    """Verify provider webhooks and forward them to Millimetric exactly once."""


@main.command()
@click.option("--host", default=None, help="Interface to listen on [env BRIDGE_HOST; 0.0.0.0].")
@click.option("--port", type=int, default=None, help="Port to listen on [env PORT; 8000].")
def serve(host: str | None, port: int | None) -> None:
    """Run the production server: webhook intake, forwarder, health and metrics.

    Needs MILLIMETRIC_KEY (a secret sk_ key); refuses pk_ and rk_ keys with exit code 2.
    """
    settings = _settings(os.environ, host=host, port=port)
    configure_logging("json", settings.log_level)
    from bridge.app import create_app

    _run(_server(create_app(settings), settings.host, settings.port).serve())


@main.command()
@click.option("--port", type=int, default=DEV_PORT, show_default=True, help="Bridge port.")
@click.option(
    "--sink-port",
    type=int,
    default=SINK_PORT,
    show_default=True,
    help="Port of the embedded local Millimetric sink.",
)
def dev(port: int, sink_port: int) -> None:
    """Run the bridge and a local Millimetric sink together; no keys needed.

    SQLite lives under ./data, logs are readable, and nothing leaves this machine.
    """
    from bridge.app import create_app
    from bridge.sink import DEV_KEY, create_sink_app

    env = {
        **os.environ,
        "MILLIMETRIC_KEY": DEV_KEY,
        "MILLIMETRIC_HOST": f"http://127.0.0.1:{sink_port}",
        "BRIDGE_DATABASE_URL": os.environ.get("BRIDGE_DATABASE_URL", "sqlite:///data/bridge.db"),
    }
    settings = _settings(env, host="127.0.0.1", port=port, log_format="console")
    configure_logging("console", settings.log_level)
    click.echo(
        f"\n  bridge   http://127.0.0.1:{port}  (try: curl http://127.0.0.1:{port}/healthz)\n"
        f"  sink     http://127.0.0.1:{sink_port}  (what arrived: curl "
        f"http://127.0.0.1:{sink_port}/_sink/events)\n"
    )

    async def both() -> None:
        sink = _server(create_sink_app(), "127.0.0.1", sink_port)
        bridge = _server(create_app(settings), "127.0.0.1", port)
        await asyncio.gather(sink.serve(), bridge.serve())

    _run(both())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=SINK_PORT, show_default=True, help="Port to listen on.")
@click.option(
    "--key",
    "keys",
    multiple=True,
    help="An API key the sink accepts (repeatable) [default: the dev keys].",
)
@click.option("--no-limits", is_flag=True, help="Do not enforce the published rate limits.")
def sink(host: str, port: int, keys: tuple[str, ...], no_limits: bool) -> None:
    """Run the local Millimetric stand-in alone (strict contract, fault knobs under /_sink/)."""
    from bridge.sink import SinkKnobs, SinkState, create_sink_app

    configure_logging("console", "info")
    knobs = SinkKnobs(limits=not no_limits)
    if keys:
        knobs.keys = list(keys)
    click.echo(f"sink listening on http://{host}:{port}; knobs: GET/POST /_sink/knobs")
    _run(_server(create_sink_app(SinkState(knobs)), host, port).serve())


@main.command()
def handlers() -> None:
    """List installed webhook handlers and whether each is configured."""
    found = sorted(entry_points(group=HANDLER_GROUP), key=lambda ep: ep.name)
    if not found:
        click.echo(f"no handlers installed (entry-point group {HANDLER_GROUP})")
    for ep in found:
        click.echo(f"{ep.name:20} {ep.value}")


main.add_command(outbox)
main.add_command(forget)
