"""`millimetric-bridge map SOURCE FILE`: the calls a body would become, sending nothing.

How a user iterates on a mapped source's `on` tables: edit `bridge.toml`, run `map` on a
recorded body, read the calls (or the quarantine reason the bridge would give). The body
goes through the same steps as a delivery, less the signature: the delivery id as the
intake reads it, then the translate stage's own `translate_one` over the request rebuilt
from the headers the bridge keeps. Nothing is stored, nothing is sent.
"""

from __future__ import annotations

import os
import sys
import time
from typing import BinaryIO

import click

from bridge.errors import ConfigError, PayloadInvalid
from bridge.events import Forget, Identify, Track, encode
from bridge.plugin import WebhookRequest
from bridge.registry import load_handlers, load_sources, load_templates
from bridge.stages.translate import translate_one
from bridge.startup import refuse
from bridge.store import StoredDelivery, with_event_id

__all__ = ["map_body"]

_ROUTES = {Track: "track", Identify: "identify", Forget: "forget"}


def _headers(given: tuple[str, ...]) -> dict[str, str]:
    headers = {}
    for item in given:
        name, colon, value = item.partition(":")
        if not colon or not name.strip():
            raise click.BadParameter(f"{item!r}: write a header as 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    return headers


@click.command("map")
@click.argument("source")
@click.argument("body", type=click.File("rb"), metavar="FILE")
@click.option(
    "--header",
    "-H",
    "headers",
    multiple=True,
    help="A request header the source reads, 'Name: value' (repeatable).",
)
def map_body(source: str, body: BinaryIO, headers: tuple[str, ...]) -> None:
    """Print the calls FILE (a webhook body; - for standard input) would become at SOURCE,
    or why it would be refused or quarantined. Checks no signature and sends nothing."""
    try:
        sources = load_sources(os.environ, load_handlers(), templates=load_templates())
    except ConfigError as error:
        refuse(error)
    found = sources.get(source)
    if found is None:
        raise click.BadParameter(f"no source {source!r}; try: {', '.join(sorted(sources))}")
    raw = body.read()
    sent = _headers(headers)
    request = WebhookRequest(source=source, headers=sent, body=raw, received_at=time.time())
    try:
        delivery_id = found.handler.delivery_id(request)
    except PayloadInvalid as error:
        click.echo(f"refused (400): payload: {error}")
        sys.exit(1)
    click.echo(f"delivery {delivery_id}")
    stored = StoredDelivery(
        id=0,
        source=source,
        provider_event_id=delivery_id,
        received_at=request.received_at,
        raw_body=raw,
        headers={h: v for h, v in sent.items() if h in found.kept_headers},
    )
    translation = translate_one(stored, sources)
    if translation.failure is not None:
        click.echo(f"quarantined: {translation.failure}")
        sys.exit(1)
    if not translation.outputs:
        click.echo("no call: acknowledged and ignored")
    for index, output in enumerate(translation.outputs):
        if isinstance(output, Track):
            # As the store keys it: a track without an event_id gets one from its place.
            output, _ = with_event_id(output, source, delivery_id, index)
        route = _ROUTES.get(type(output), type(output).__name__)
        click.echo(f"{route:9} {encode(output).decode()}")
