"""The `millimetric-bridge` command line."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import click
import httpx
import uvicorn

from bridge.backfill import Target, targets
from bridge.backfill_cli import backfill_command
from bridge.config import Settings, load_settings
from bridge.connections import guarded_protocol, raise_file_limit
from bridge.errors import ConfigError
from bridge.logs import configure_logging
from bridge.map_cli import map_body
from bridge.outbox_cli import forget, outbox
from bridge.registry import HANDLER_GROUP, Source, load_handlers, load_sources, load_templates
from bridge.startup import open_outbox, refuse
from bridge.store import Store, open_store

__all__ = ["main"]

DEV_PORT = 8000
SINK_PORT = 8787
#: Every handler's secret under `dev`: Standard Webhooks needs base64 after `whsec_`.
DEV_SECRET = "whsec_" + base64.b64encode(b"millimetric-bridge dev secret").decode()
#: Allocations between young collections (Python's default is 700). Each delivery makes
#: hundreds of short-lived objects that reference counting frees; at the default, the
#: survivors of the 64 deliveries in flight were promoted and set off a full collection
#: about three times a second.
GC_YOUNG_THRESHOLD = 10_000


def _settings(env: Mapping[str, str], **kwargs: Any) -> Settings:
    try:
        return load_settings(env, **kwargs)
    except ConfigError as error:
        refuse(error)


def _sources(env: Mapping[str, str], *, dev: bool = False) -> dict[str, Source]:
    try:
        return load_sources(env, load_handlers(), templates=load_templates(), dev=dev)
    except ConfigError as error:
        refuse(error)


def _reconciled(env: Mapping[str, str], sources: Mapping[str, Source]) -> list[Target]:
    """The sources the periodic reconcile lists: a key of the wrong kind stops start-up."""
    try:
        return targets(sources, env)
    except ConfigError as error:
        refuse(error)


def _store(settings: Settings) -> Store:
    """The outbox, not yet opened: `_run` opens it on the serving loop, then the app's
    lifespan (for which opening again is a no-op) recovers it and starts forwarding."""
    try:
        return open_store(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    except ConfigError as error:
        refuse(error)


def _run(
    *servers: uvicorn.Server, first: Callable[[], Coroutine[Any, Any, object]] | None = None
) -> None:
    """Run `first` (opening the store), then serve until a signal. uvicorn shuts down
    cleanly on SIGINT or SIGTERM, then raises the signal again for whoever handled it
    before: here, that means exit 0.

    On the event loop uvicorn's config picks (uvloop where installed), as `uvicorn.run`
    would: `asyncio.run` alone gives the standard library's loop, which costs intake about
    a third of its throughput. `first` runs on that same loop, since the store it opens
    (a connection pool, the SQLite writer's futures) belongs to the loop that opened it;
    a ConfigError from it is refused before anything listens, where uvicorn would log a
    traceback and exit 3."""

    def stopped(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    async def serve_all() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    signal.signal(signal.SIGTERM, stopped)
    loop_factory = servers[0].config.get_loop_factory()
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as run:
        try:
            if first is not None:
                run.run(first())
        except ConfigError as error:
            refuse(error)
        _settle_heap()
        run.run(serve_all())


def _settle_heap() -> None:
    """Keep the cyclic garbage collector's pauses off the webhook path.

    A full collection walks every object the process holds, modules included: 20-35 ms
    under load, during which no request is answered, and at the default thresholds it ran
    about three times a second. That was the p99 of bench/intake.py: 30-36 ms, against
    13-19 ms with this. What exists before serving (modules, the app) lives as long as
    the process, so it is frozen out of every later collection, and young collections run
    less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def _server(app: Any, host: str, port: int, settings: Settings | None = None) -> uvicorn.Server:
    """A server for `app`; with `settings`, held to their deadlines and connection cap
    (`bridge.connections`), otherwise uvicorn's own (the local sink)."""
    guarded: dict[str, Any] = {}
    if settings is not None:
        raise_file_limit(settings.max_connections)
        guarded = {
            "http": guarded_protocol(
                header_timeout=settings.header_timeout,
                body_timeout=settings.body_timeout,
                max_connections=settings.max_connections,
            ),
            "timeout_keep_alive": settings.keepalive_timeout,
        }
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
            **guarded,
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
    sources = _sources(os.environ)
    reconciled = _reconciled(os.environ, sources)
    configure_logging("json", settings.log_level)
    from bridge.app import create_app

    store = _store(settings)
    app = create_app(settings, sources=sources, store=store, reconciled=reconciled)
    _run(
        _server(app, settings.host, settings.port, settings),
        first=lambda: open_outbox(store, settings.database_url),
    )


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
        # The relay takes the dev key too, so the API's examples work against dev as they are.
        "BRIDGE_RELAY_KEYS": os.environ.get("BRIDGE_RELAY_KEYS") or DEV_KEY,
    }
    for source in _sources(env, dev=True).values():  # all mounted, with a known dev secret
        env.setdefault(source.secret_variable, DEV_SECRET)
    settings = _settings(env, host="127.0.0.1", port=port, log_format="console")
    sources = _sources(env, dev=True)
    reconciled = _reconciled(env, sources)
    configure_logging("console", settings.log_level)
    store = _store(settings)

    async def first() -> None:
        await open_outbox(store, settings.database_url)
        click.echo(  # once the outbox is open: a refusal is then the only thing printed
            f"\n  bridge   http://127.0.0.1:{port}  (try: curl http://127.0.0.1:{port}/healthz)\n"
            f"  sink     http://127.0.0.1:{sink_port}  (what arrived: curl "
            f"http://127.0.0.1:{sink_port}/_sink/events)\n"
            f"  webhooks {', '.join(f'/webhooks/{n}' for n in sorted(sources))}\n"
            f"  relay    /v1/track, /v1/identify, /v1/batch, /v1/forget (Authorization: Bearer "
            f"{DEV_KEY})\n\n"
            f"  next: millimetric-bridge send-test stripe checkout.session.completed\n"
        )

    _run(
        _server(create_sink_app(), "127.0.0.1", sink_port),
        _server(
            create_app(settings, sources=sources, store=store, reconciled=reconciled),
            "127.0.0.1",
            port,
            settings,
        ),
        first=first,
    )


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
    _run(_server(create_sink_app(SinkState(knobs)), host, port))


@main.command()
def handlers() -> None:
    """List installed webhook handlers, their sources and whether each is configured.

    A source is mounted at /webhooks/<source> only once its secret variable is set.
    """
    sources = _sources(os.environ)
    if not sources:
        click.echo(f"no handlers installed (entry-point group {HANDLER_GROUP})")
    for name, source in sorted(sources.items()):
        state = (
            f"configured ({len(source.secrets)} secret{'s' * (len(source.secrets) > 1)})"
            if source.configured
            else f"not configured: set {source.secret_variable}"
        )
        click.echo(f"{name:16} handler={source.handler.name:12} /webhooks/{name:16} {state}")
        describe = getattr(source.handler, "describe", None)
        if callable(describe):  # a mapped source: the event types it maps
            click.echo(f"{'':16} {describe()}")


@main.command("send-test")
@click.argument("source")
@click.argument("event")
@click.option(
    "--url", default=f"http://127.0.0.1:{DEV_PORT}", show_default=True, help="The running bridge."
)
def send_test(source: str, event: str, url: str) -> None:
    """Post a correctly signed sample EVENT to SOURCE of a running bridge (like `stripe
    trigger`). The secret is the source's variable, or the dev secret under `dev`."""
    env = dict(os.environ)
    sources = _sources(env, dev=True)
    found = sources.get(source)
    if found is None:
        raise click.BadParameter(f"no source {source!r}; try: {', '.join(sorted(sources))}")
    samples = found.handler.samples()
    if event not in samples:
        raise click.BadParameter(f"no sample {event!r}; samples: {', '.join(sorted(samples))}")
    sample = samples[event]
    freshen = getattr(found.handler, "freshen", None)
    if callable(freshen):  # a new delivery each time, not a redelivery of the last one
        sample = freshen(sample)
    secret = (found.secrets or (DEV_SECRET,))[0]
    body = sample.body
    signed = {**sample.headers, **found.handler.scheme.sign(body, secret, int(time.time()))}
    # As UTF-8 bytes: httpx refuses a non-ASCII text value (an Auth0 token may have one).
    headers = {name.encode(): value.encode() for name, value in signed.items()}
    try:
        answer = httpx.post(f"{url}/webhooks/{source}", content=body, headers=headers, timeout=10)
    except httpx.TransportError as error:
        raise click.ClickException(f"cannot reach the bridge at {url}: {error}") from error
    click.echo(f"{answer.status_code} {answer.text}")
    if answer.status_code != 200:
        sys.exit(1)


main.add_command(outbox)
main.add_command(forget)
main.add_command(backfill_command)
main.add_command(map_body)
