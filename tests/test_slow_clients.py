"""Slow, idle and too many clients against a real `serve` process on a real port: a
thousand connections trickling a byte a second do not hold up a signed delivery nor grow
the server past a bound; a client too slow with its headers, or idle between requests, is
closed at its deadline; past the connection cap, new connections are refused, and one
line says so."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bridge.connections import BODY_GRACE
from bridge.testing import sign
from handlers.stripe import handler as stripe
from tests.conftest import RunningSink, ServeProcess, free_port, serve_process, subscription_event

SECRET = "whsec_slow_clients_secret"
TRICKLERS = 1000
#: How much earlier than a deadline a close may be seen: uvloop's clock counts whole
#: milliseconds, read once per turn of its loop.
EARLY = 0.05

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Serving(ServeProcess):
    """A `serve` process, with what these tests read of it from /proc."""

    def holds(self, clients: list[Stream]) -> int:
        """How many of `clients` the server has accepted and holds open: sockets among its
        file descriptors whose peer is one of them (Linux's /proc/net/tcp)."""
        ports = {writer.get_extra_info("sockname")[1] for _, writer in clients}
        fds = Path(f"/proc/{self.proc.pid}/fd")
        sockets: set[str] = set()
        for fd in fds.iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed since it was listed
                sockets.add(os.readlink(fd))
        held: set[str] = set()  # by inode: a table read while it changes may repeat a line
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == self.port
                and int(remote.rsplit(":", 1)[1], 16) in ports
                and f"socket:[{inode}]" in sockets
            ):
                held.add(inode)
        return len(held)

    def resident_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        (line,) = [line for line in status.splitlines() if line.startswith("VmRSS:")]
        return int(line.split()[1]) / 1024


@contextlib.contextmanager
def serving(tmp_path: Path, sink: RunningSink, **env: str) -> Iterator[Serving]:
    with serve_process(sink, tmp_path / f"bridge-{free_port()}.db", SECRET, **env) as server:
        yield Serving(server.port, server.proc, server.log)


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for this process's (and the server's, which inherits it) thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * TRICKLERS
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def delivery(n: int) -> tuple[bytes, dict[str, str]]:
    """A live Stripe delivery, signed, that becomes `subscription_started:sub_slow<n>`."""
    body = subscription_event(f"slow{n}", customer="cus_slow")
    return body, sign(stripe, body, SECRET)


def request_head(headers: dict[str, str], length: int, *extra: str) -> bytes:
    lines = [
        "POST /webhooks/stripe HTTP/1.1",
        "Host: bridge",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *(f"{name}: {value}" for name, value in headers.items()),
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.asynccontextmanager
async def connections(port: int, count: int) -> AsyncIterator[list[Stream]]:
    opened: list[Stream] = []
    try:
        for _ in range(count):
            opened.append(await asyncio.open_connection("127.0.0.1", port))
        yield opened
    finally:
        for _, writer in opened:
            writer.close()
        for _, writer in opened:  # closed before the test goes on, without the loop
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def closed_after(reader: asyncio.StreamReader, started: float) -> tuple[bytes, float]:
    """Everything the server sent until it closed the connection, and when it did (seconds
    after `started`)."""
    received = await asyncio.wait_for(reader.read(), timeout=30)
    return received, time.monotonic() - started


async def until(check: Callable[[], bool], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.anyio
async def test_a_thousand_trickling_clients_do_not_hold_up_a_delivery(
    sink: RunningSink, tmp_path: Path, many_files: None
) -> None:
    # Deadlines longer than the test: every trickler stays connected throughout.
    with serving(
        tmp_path,
        sink,
        BRIDGE_HEADER_TIMEOUT_SECONDS="120",
        BRIDGE_BODY_TIMEOUT_SECONDS="120",
    ) as server:
        body, headers = delivery(0)
        async with connections(server.port, TRICKLERS) as tricklers:
            # Half trickle their headers, half their body (after complete headers).
            for i, (_, writer) in enumerate(tricklers):
                writer.write(
                    b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\n"
                    if i % 2
                    else request_head(headers, 100_000)
                )
            await until(lambda: server.holds(tricklers) == TRICKLERS)
            slowest = 0.0
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                for second in range(1, 4):
                    for i, (_, writer) in enumerate(tricklers):
                        writer.write(b"X" if i % 2 else b" ")
                    await asyncio.gather(*(writer.drain() for _, writer in tricklers))
                    body, headers = delivery(second)
                    started = time.monotonic()
                    answer = await client.post("/webhooks/stripe", content=body, headers=headers)
                    slowest = max(slowest, time.monotonic() - started)
                    assert answer.json() == {"ok": True, "result": "accepted"}
                    await asyncio.sleep(1)
            held = server.holds(tricklers)
            resident = server.resident_mb()
            assert not any(reader.at_eof() for reader, _ in tricklers)  # none was let go
        assert held == TRICKLERS
        assert slowest < 1.0, f"a delivery took {slowest:.2f}s beside {TRICKLERS} tricklers"
        assert resident < 150, f"the server holds {resident:.0f} MB"
        sink.arrived(3)
        assert sink.state.seen_event_ids == {f"subscription_started:sub_slow{n}" for n in (1, 2, 3)}
    print(f"\n{TRICKLERS} tricklers: slowest delivery {slowest * 1000:.0f} ms, {resident:.0f} MB")


@pytest.mark.anyio
async def test_slow_headers_a_silent_client_an_idle_keepalive_and_a_slow_body_are_closed(
    sink: RunningSink, tmp_path: Path
) -> None:
    header, keepalive, body = 1.0, 1, 1.0
    with serving(
        tmp_path,
        sink,
        BRIDGE_HEADER_TIMEOUT_SECONDS=str(header),
        BRIDGE_KEEPALIVE_SECONDS=str(keepalive),
        BRIDGE_BODY_TIMEOUT_SECONDS=str(body),
    ) as server:

        async def trickled(head: bytes, byte: bytes) -> tuple[bytes, float]:
            """Send `head`, then `byte` every 0.2 s for ever: when the server closes."""
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head)

            async def trickle() -> None:
                while True:
                    writer.write(byte)
                    await asyncio.sleep(0.2)

            trickling = asyncio.create_task(trickle())
            try:
                return await closed_after(reader, started)
            finally:
                trickling.cancel()
                writer.close()

        async def slow_headers() -> tuple[bytes, float]:
            # A header byte every 0.2 s, never the end of the headers.
            return await trickled(b"GET /healthz HTTP/1.1\r\n", b"X")

        async def silent() -> tuple[bytes, float]:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                return await closed_after(reader, started)
            finally:
                writer.close()

        async def idle_after_a_request() -> tuple[bytes, float]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                assert await reader.readexactly(len(b'{"status":"ok"}')) == b'{"status":"ok"}'
                return await closed_after(reader, time.monotonic())
            finally:
                writer.close()

        async def body_never_read() -> tuple[bytes, float]:
            # /healthz answers without reading the body: the backstop closes the
            # connection the body is still arriving on.
            head = b"GET /healthz HTTP/1.1\r\nHost: bridge\r\nContent-Length: 1000\r\n\r\n"
            return await trickled(head, b" ")

        tasks: list[Awaitable[tuple[bytes, float]]] = [
            slow_headers(),
            silent(),
            idle_after_a_request(),
            body_never_read(),
        ]
        (
            (headers_sent, headers_took),
            (silent_sent, silent_took),
            (idle_sent, idle_took),
            (body_sent, body_took),
        ) = await asyncio.gather(*tasks)
        # Closed no sooner than the deadline (nor much later: the 30 s read would fail).
        assert (headers_sent, silent_sent, idle_sent) == (b"", b"", b"")
        assert headers_took >= header - EARLY
        assert silent_took >= header - EARLY
        assert idle_took >= keepalive - EARLY
        assert body_sent.startswith(b"HTTP/1.1 200 ")  # answered, then cut off
        assert body_took >= body + BODY_GRACE - EARLY
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{server.url}/metrics")).text
        for reason, count in (("header_timeout", 2), ("body_timeout", 1)):
            series = f'bridge_connections_closed_total{{reason="{reason}"}} {count:.1f}'
            assert series in metrics, reason


@pytest.mark.anyio
async def test_past_the_connection_cap_new_connections_are_refused_and_logged_once(
    sink: RunningSink, tmp_path: Path
) -> None:
    cap = 50
    with serving(
        tmp_path, sink, BRIDGE_MAX_CONNECTIONS=str(cap), BRIDGE_HEADER_TIMEOUT_SECONDS="60"
    ) as server:
        body, headers = delivery(0)
        async with connections(server.port, cap) as held:
            # Each is held by the intake waiting for its body; the 100 Continue says the
            # server has it.
            for _, writer in held:
                writer.write(request_head(headers, len(body), "Expect: 100-continue"))
            for reader, _ in held:
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            async with connections(server.port, 5) as refused:
                for reader, _ in refused:
                    assert await asyncio.wait_for(reader.read(), timeout=10) == b""
            assert not any(reader.at_eof() for reader, _ in held)
            # The held ones are still served: their bodies are taken.
            for _, writer in held:
                writer.write(body)
            for reader, _ in held:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), head
        # Once they are gone, new connections are taken again.
        await until(lambda: server.logged("connection cap cleared: accepting again") == 1)
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/healthz")).status_code == 200
            metrics = (await client.get("/metrics")).text
        assert 'bridge_connections_closed_total{reason="cap"} 5.0' in metrics
        assert server.logged("connection cap reached: refusing new connections") == 1
