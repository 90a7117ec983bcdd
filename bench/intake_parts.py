#!/usr/bin/env python3
"""Where the bridge's intake time goes: the bridge with parts of its work switched off.

    .venv/bin/python bench/intake_parts.py [--seconds 5] [--runs 3]
        [--variants "full;no-forwarder;no-forwarder,no-log;no-forwarder,no-store"]

Each variant is `millimetric-bridge serve` with some parts replaced by nothing:
`no-translate` (the translate stage does not run: deliveries are only stored),
`no-forwarder` (neither forwarding nor translation runs), `no-log` (no line per webhook),
`no-store` (append answers at once, nothing is stored: NOT durable), `append-process`
(a prototype: intake's appends group-committed by a writer process of their own, over a
socket pair, rather than by the store's writer thread and the event loop; the same
statement into the same file, the same FULL fsync before each answer).
They run in turn with a bare Litestar POST (bench/bare_app.py) in every round, under the
same wrk load as bench/intake.py, and the script prints each variant's median ratio to
the bare POST of its round and the server's CPU per request. A diagnostic: none of these
variants is a product setting, and `no-store` breaks every guarantee.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import intake as bench
import msgspec

PARTS = ("no-forwarder", "no-translate", "no-log", "no-store", "append-process")
_FRAME = struct.Struct("!I")


def frames(buffer: bytearray) -> list[bytes]:
    """The complete length-prefixed frames at the start of `buffer`, taken out of it."""
    found, at = [], 0
    while len(buffer) - at >= 4:
        (size,) = _FRAME.unpack_from(buffer, at)
        if len(buffer) - at - 4 < size:
            break
        found.append(bytes(buffer[at + 4 : at + 4 + size]))
        at += 4 + size
    del buffer[:at]
    return found


def append_writer(path: str, fd: int) -> None:
    """The `append-process` writer: each batch of appends that arrived together in one
    transaction, committed, then every answer in one write."""
    from bridge.store import Delivery
    from bridge.store.sqlite import SQLiteStore, _appended

    sock = socket.socket(fileno=fd)
    conn = SQLiteStore(path)._connect()
    decode = msgspec.msgpack.Decoder(tuple[int, str, str, float, bytes, dict[str, str]]).decode
    buffer = bytearray()
    while data := sock.recv(1 << 20):
        buffer += data
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while more := sock.recv(1 << 20):
                buffer += more
        sock.setblocking(True)
        batch = [
            (seq, Delivery(source=s, provider_event_id=i, received_at=at, raw_body=b, headers=h))
            for seq, s, i, at, b, h in map(decode, frames(buffer))
        ]
        if not batch:
            continue
        conn.execute("BEGIN IMMEDIATE")
        answers = [(seq, _appended(conn, delivery) == "accepted") for seq, delivery in batch]
        conn.execute("COMMIT")
        body = msgspec.msgpack.encode(answers)
        sock.sendall(_FRAME.pack(len(body)) + body)


class _Appends(asyncio.Protocol):
    """The bridge's side of the `append-process` writer."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.waiting: dict[int, asyncio.Future[bool]] = {}
        self.queued: list[bytes] = []
        self.buffer = bytearray()
        self.seq = itertools.count()
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder(list[tuple[int, bool]]).decode

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for frame in frames(self.buffer):
            for seq, accepted in self.decode(frame):
                self.waiting.pop(seq).set_result(accepted)

    def flush(self) -> None:
        queued, self.queued = self.queued, []
        self.transport.write(b"".join(queued))

    async def append(self, delivery: Any) -> str:
        seq = next(self.seq)
        future = asyncio.get_running_loop().create_future()
        self.waiting[seq] = future
        d = delivery
        body = self.encode(
            (seq, d.source, d.provider_event_id, d.received_at, d.raw_body, d.headers)
        )
        if not self.queued:
            asyncio.get_running_loop().call_soon(self.flush)
        self.queued.append(_FRAME.pack(len(body)) + body)
        return "accepted" if await future else "duplicate"


def serve_without(parts: set[str]) -> None:
    """Run the bridge with `parts` switched off (in the bridge's own process)."""
    if "no-forwarder" in parts:
        from bridge.stages.forward import Forwarder

        Forwarder.start = lambda self: None  # type: ignore[method-assign]
    if "no-translate" in parts:
        from bridge.stages.translate import Translator

        async def idle(self: Any, stopping: Any) -> None:
            await stopping.wait()

        Translator.run = idle  # type: ignore[method-assign]
    if "no-store" in parts:
        from bridge.store.sqlite import SQLiteStore

        async def append(self: Any, delivery: Any) -> str:
            return "accepted"

        SQLiteStore.append = append  # type: ignore[method-assign,assignment]
    if "append-process" in parts:
        from bridge.store.sqlite import SQLiteStore

        writer: list[asyncio.Task[_Appends]] = []  # one, started by the first delivery

        async def start(path: Path) -> _Appends:
            ours, theirs = socket.socketpair()
            command = [sys.executable, __file__, "--append-writer", str(path)]
            subprocess.Popen(  # noqa: ASYNC220 (once, at the first delivery)
                [*command, str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
            theirs.close()
            loop = asyncio.get_running_loop()
            _, protocol = await loop.create_unix_connection(_Appends, sock=ours)
            return protocol

        async def appended(self: Any, delivery: Any) -> str:
            if not writer:  # the deliveries arriving meanwhile wait for the same one
                writer.append(asyncio.ensure_future(start(self.path)))
            return await (await writer[0]).append(delivery)

        SQLiteStore.append = appended  # type: ignore[method-assign,assignment]
    if "no-log" in parts:
        os.environ["BRIDGE_LOG_LEVEL"] = "warning"
    from bridge.cli import main

    sys.argv = ["millimetric-bridge", "serve"]
    main()


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its live children (the `append-process` writer)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--variants",
        default="full;no-translate;no-forwarder;no-forwarder,no-log;no-forwarder,no-store,no-log",
        help="';'-separated; each a ','-separated set of parts to switch off, or 'full'",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the bridge's own process
    parser.add_argument("--append-writer", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.append_writer is not None:
        append_writer(args.append_writer[0], int(args.append_writer[1]))
        return
    if args.serve is not None:
        serve_without(set(args.serve.split(",")) - {"full", ""})
        return
    variants = args.variants.split(";")
    unknown = {p for v in variants for p in v.split(",")} - {*PARTS, "full"}
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))} (known: {PARTS})")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bridge-parts-"))
    names = ["bare Litestar POST", *variants]
    per = 20_000 * args.seconds + 20_000
    if args.runs * len(names) * (args.seconds + 3) > 280:
        raise SystemExit("the signatures would go stale (300 s): fewer --runs or --seconds")
    requests, script = work / "requests.tsv", work / "replay.lua"
    script.write_text(bench.LUA)
    # Each variant stores into its own database: a round's variants can share its slice.
    bench.make_requests(requests, per * args.runs)
    sink_port = bench.free_port()
    procs = [
        subprocess.Popen(
            [bench.BIN / "millimetric-bridge", "sink", "--port", str(sink_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    ports = [bench.free_port() for _ in names]
    procs.append(
        subprocess.Popen(
            [
                bench.BIN / "uvicorn",
                "bare_app:app",
                f"--port={ports[0]}",
                "--no-access-log",
                "--log-level=warning",
                f"--app-dir={bench.ROOT / 'bench'}",
            ],
            stdout=subprocess.DEVNULL,
        )
    )
    for index, (variant, port) in enumerate(zip(variants, ports[1:], strict=True)):
        env = bench.bridge_env(
            sink_port, port, f"sqlite:///{work}/{index}.db", work / f"{index}.toml"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--serve", variant], env=env, stdout=subprocess.DEVNULL
            )
        )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    try:
        bench.wait_up(f"http://127.0.0.1:{ports[0]}/webhooks/x", procs[1])
        for port, proc in zip(ports[1:], procs[2:], strict=True):
            bench.wait_up(f"http://127.0.0.1:{port}/healthz", proc)
        for round_ in range(args.runs):
            for name, port, proc in zip(names, ports, procs[1:], strict=True):
                before = cpu_seconds(proc.pid)
                out = bench.run_wrk(
                    f"http://127.0.0.1:{port}/webhooks/stripe",
                    script,
                    requests,
                    args.seconds,
                    64,
                    first=round_ * per,
                )
                spent = cpu_seconds(proc.pid) - before
                results[name].append((out["rate"], spent / (out["rate"] * args.seconds) * 1e6))
                print(f"{name:50} {out['rate']:>9,.0f} req/s  p99 {out['p99']:6.1f} ms", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    bare = results[names[0]]
    print(f"\n{'':50} {'of bare (median)':>17} {'server CPU/request':>19}")
    for name in names:
        ratios = [rate / base for (rate, _), (base, _) in zip(results[name], bare, strict=True)]
        cpu = statistics.median(us for _, us in results[name])
        print(f"{name:50} {statistics.median(ratios):>17.2f} {cpu:>16.0f} us")
    print(f"({args.runs} rounds of {args.seconds}s, 64 connections, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
