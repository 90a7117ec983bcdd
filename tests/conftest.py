"""Shared fixtures: real servers on loopback ports, never fakes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from bridge.sink import SinkState, create_sink_app
from bridge.store import Store, open_store


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """A uvicorn server for an ASGI app, in a thread of this process, on a free port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="on",
            )
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()  # for tests that reach into the app
        await self.server.serve()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class RunningSink:
    def __init__(self, url: str, state: SinkState) -> None:
        self.url = url
        self.state = state


@pytest.fixture
def sink() -> Iterator[RunningSink]:
    """The real local Millimetric sink, served over HTTP on a free loopback port."""
    state = SinkState()
    with ServerThread(create_sink_app(state)) as server:
        yield RunningSink(server.url, state)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real store on a temporary file (PostgreSQL joins here when its backend lands)."""
    opened = open_store(f"sqlite:///{tmp_path}/bridge.db")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
