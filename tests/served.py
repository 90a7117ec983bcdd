"""One handler's bridge served over real HTTP into the real local sink: deliveries signed
with the handler's own scheme through `bridge.testing`, taken by the intake, translated by
the translate stage and forwarded by the forwarder, as in production (SQLite file)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bridge.app import create_app
from bridge.config import load_settings
from bridge.plugin import Handler
from bridge.registry import load_sources
from bridge.testing import TEST_SECRET, sign, signed_request
from tests.conftest import RunningSink, ServerThread, translated

Body = bytes | Mapping[str, Any] | list[Any]


def encoded(body: Body) -> bytes:
    return body if isinstance(body, bytes) else msgspec.json.encode(body)


class Served:
    """The app for one handler at `url`, its SQLite store at `database`, and the sink."""

    def __init__(self, url: str, sink: RunningSink, database: Path, handler: Handler) -> None:
        self.url = url
        self.sink = sink
        self.database = database
        self.handler = handler

    def post(
        self, body: Body, headers: Mapping[str, str] | None = None, *, source: str | None = None
    ) -> httpx.Response:
        """Post `body` signed with the handler's scheme (and the handler's own headers)."""
        raw = encoded(body)
        sent = {"content-type": "application/json", **sign(self.handler, raw), **(headers or {})}
        return httpx.post(
            f"{self.url}/webhooks/{source or self.handler.name}", content=raw, headers=sent
        )

    def accepted(self, body: Body, headers: Mapping[str, str] | None = None) -> None:
        answer = self.post(body, headers)
        assert answer.json() == {"ok": True, "result": "accepted"}, answer.text

    def delivery_id(self, body: Body, headers: Mapping[str, str] | None = None) -> str:
        return self.handler.delivery_id(
            signed_request(self.handler, encoded(body), headers=headers)
        )

    def taken(self, body: Body, headers: Mapping[str, str] | None = None) -> tuple[str, str | None]:
        """Once the translate stage has taken the posted delivery: `translated` or
        `quarantined`, and the quarantine's reason."""
        return translated(self.database, self.delivery_id(body, headers))

    def queued(self, body: Body, headers: Mapping[str, str] | None = None) -> int:
        """The outbox rows the posted delivery became, whatever their state."""
        return self.queued_for(self.delivery_id(body, headers))

    def queued_for(self, delivery_id: str, source: str | None = None) -> int:
        """The outbox rows a stored delivery (by its delivery id, of `source` or any)
        became, whatever their state."""
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)) as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM outbox JOIN inbox ON inbox.id = outbox.inbox_id"
                " WHERE inbox.provider_event_id = ? AND (? IS NULL OR inbox.source = ?)",
                (delivery_id, source, source),
            ).fetchone()
        return int(count)

    def arrived(self, count: int, within: float = 10) -> list[dict[str, Any]]:
        """Every call at the sink, once it holds `count` (and anything more would show)."""
        return self.sink.arrived(count, within)

    def tracks(self, count: int) -> list[dict[str, Any]]:
        """The track calls at the sink once it holds `count` calls of any route."""
        return [call for call in self.arrived(count) if call["route"] == "track"]


@contextlib.contextmanager
def served(
    handler: Handler,
    sink: RunningSink,
    tmp_path: Path,
    *,
    config: str = "",
    secret: str | None = TEST_SECRET,
    env: Mapping[str, str] | None = None,
) -> Iterator[Served]:
    """The bridge with `handler` as its one source, `config` as its bridge.toml and
    `secret` in the handler's secret variable (a comma list during a rotation; None leaves
    it unset). `env` adds variables, e.g. the secret of a source the config adds."""
    (tmp_path / "bridge.toml").write_text(config)
    variables = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        **({} if secret is None else {handler.secret_variable: secret}),
        **(env or {}),
    }
    sources = load_sources(variables, {handler.name: handler})
    with ServerThread(create_app(load_settings(variables), sources=sources)) as server:
        yield Served(server.url, sink, tmp_path / "bridge.db", handler)
