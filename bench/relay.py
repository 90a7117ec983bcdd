#!/usr/bin/env python3
"""Relay throughput: `POST /v1/track` on the bridge against a bare Litestar POST on the
same server, in one run; then `/v1/batch` with 100 events a request.

    .venv/bin/python bench/relay.py [--seconds 10] [--connections 64] [--runs 1]
        [--database-url postgresql://postgres@127.0.0.1:5432/test]

The machinery of bench/intake.py (uvicorn with one worker, uvloop and httptools; wrk
replaying distinct bodies, each thread its own slice, so no event_id repeats at the
bridge): a bare Litestar `@post` handler that reads the body (the baseline), the same
route served raw (the ceiling of the way the bridge serves its routes), and the bridge
(`millimetric-bridge serve` with `BRIDGE_RELAY_KEYS`), each sent the same ~300-byte track
events with their own event_id. The bridge appends each request's calls to its inbox
durably before its 202 (SQLite in a temporary directory, synchronous=FULL, or a fresh
PostgreSQL database with `--database-url`) while its translate stage and forwarder take
them on to a local sink at the published limits. After the rounds of tracks, the bridge
alone takes batches of 100 such events (events/s). After each of the bridge's runs the
script waits until its translate stage has caught up (`then s`), and counts that time and
CPU with the run.

Prints req/s, p50, p99, the ratio to the bare POST, each server's CPU per request (the
bridge's includes what its translate stage and forwarder did meanwhile) and the load
average (the machine may be shared: compare ratios within a round). The relay's cap on
the backlog is set out of reach: this measures throughput. Needs wrk (`apt-get install
wrk`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import intake  # bench/intake.py: its servers, wrk and databases
import msgspec

KEY = "sk_bench_relay_key"
BIN = Path(sys.executable).parent

LUA = r"""
local lines = {}
local counter = 0
local thread_id = 0
local threads = 1

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  thread_id = tonumber(wrk.thread:get("id")) or 0
  threads = tonumber(args[2])
  local first = tonumber(args[3]) or 0
  local n = 0
  for line in io.lines(args[1]) do
    if n >= first and (n - first) % threads == thread_id then
      lines[#lines + 1] = wrk.format("POST", nil,
        {["Authorization"] = "Bearer KEY", ["Content-Type"] = "application/json"}, line)
    end
    n = n + 1
  end
  index = 0
end

function request()
  index = index + 1
  if index > #lines then index = 1 end
  return lines[index]
end
""".replace("KEY", KEY)


def event(i: int) -> dict[str, object]:
    """A purchase as an app's server would send it: ~300 bytes, its own event_id."""
    return {
        "event": "order_completed",
        "event_id": f"order_{i}",
        "user_id": f"user_{i % 1000}",
        "path": "/checkout/complete",
        "properties": {
            "order_id": f"ord_{i}",
            "amount_cents": 1999 + i % 500,
            "currency": "usd",
            "plan": "pro",
            "items": 1 + i % 3,
            "coupon": None,
            "note": "x" * 80,
        },
    }


def make_tracks(path: Path, count: int, first: int = 0) -> None:
    with path.open("wb") as out:
        for i in range(first, first + count):
            out.write(msgspec.json.encode(event(i)) + b"\n")


def make_batches(path: Path, count: int, size: int, first: int) -> None:
    with path.open("wb") as out:
        for b in range(count):
            start = first + b * size
            body = {"events": [event(i) for i in range(start, start + size)]}
            out.write(msgspec.json.encode(body) + b"\n")


SERVERS = ("bare Litestar POST", "bare, served raw", "bridge relay")


def per_run(args: argparse.Namespace) -> int:
    """Tracks set aside for one round: more than the bridge takes in its run (the bare
    servers replay the same bodies; they keep nothing, so a repeat costs them the same)."""
    return 15_000 * args.seconds + 15_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="alternate the servers N times")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--database-url",
        help="the bridge's store: sqlite:///PATH, or postgresql://... (a fresh database is "
        "created on that server and dropped after) [default: SQLite in a temporary directory]",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bridge-relay-"))
    try:
        script = work / "replay.lua"
        script.write_text(LUA)
        tracks = work / "tracks.jsonl"
        total = per_run(args) * args.runs
        make_tracks(tracks, total)
        batches = work / "batches.jsonl"
        batch_count = 1_000 * args.seconds + 1_000
        make_batches(batches, batch_count * args.runs, args.batch_size, first=total)
        with intake.fresh_database(args.database_url, work) as (database_url, backend):
            run(args, work, script, tracks, batches, batch_count, database_url, backend)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(
    args: argparse.Namespace,
    work: Path,
    script: Path,
    tracks: Path,
    batches: Path,
    batch_count: int,
    database_url: str,
    backend: str,
) -> None:
    free = intake.free_port
    bare_port, raw_port, sink_port, bridge_port = free(), free(), free(), free()
    bare, raw = (
        subprocess.Popen(
            [
                BIN / "uvicorn",
                f"bare_app:{name}",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
                "--app-dir",
                str(intake.ROOT / "bench"),
            ],
            stdout=subprocess.DEVNULL,
        )
        for name, port in (("app", bare_port), ("raw", raw_port))
    )
    sink = subprocess.Popen(
        [BIN / "millimetric-bridge", "sink", "--port", str(sink_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = intake.bridge_env(sink_port, bridge_port, database_url, work / "bridge.toml")
    env |= {"BRIDGE_RELAY_KEYS": KEY, "BRIDGE_RELAY_MAX_PENDING": str(10**9)}
    bridge = subprocess.Popen(
        [BIN / "millimetric-bridge", "serve"], env=env, stdout=subprocess.DEVNULL
    )
    name_of = {bare_port: SERVERS[0], raw_port: SERVERS[1], bridge_port: f"relay ({backend})"}
    pid_of = {bare_port: bare.pid, raw_port: raw.pid, bridge_port: bridge.pid}
    rows: list[tuple[str, dict[str, float], float]] = []
    batch_rows: list[tuple[dict[str, float], float]] = []
    try:
        intake.wait_up(f"http://127.0.0.1:{bare_port}/webhooks/x", bare)
        intake.wait_up(f"http://127.0.0.1:{raw_port}/webhooks/x", raw)
        intake.wait_up(f"http://127.0.0.1:{bridge_port}/healthz", bridge)
        intake.wait_up(f"http://127.0.0.1:{sink_port}/healthz", sink)
        paths = {bare_port: "/webhooks/x", raw_port: "/webhooks/x", bridge_port: "/v1/track"}
        for number in range(args.runs):
            for port in (bare_port, raw_port, bridge_port):
                before = cpu_seconds(pid_of[port])
                result = intake.run_wrk(
                    f"http://127.0.0.1:{port}{paths[port]}",
                    script,
                    tracks,
                    args.seconds,
                    args.connections,
                    first=number * per_run(args),
                )
                if port == bridge_port:
                    result["then_s"] = caught_up(bridge_port)
                result["cpu_us"] = cpu_per_request(pid_of[port], before, result, args.seconds)
                rows.append((name_of[port], result, os.getloadavg()[0]))
        # The batches after every round of tracks: the outbox they fill (the forwarder
        # sends 2,500 events/s) would otherwise weigh on the rounds that follow.
        for number in range(args.runs):
            before = cpu_seconds(bridge.pid)
            result = intake.run_wrk(
                f"http://127.0.0.1:{bridge_port}/v1/batch",
                script,
                batches,
                args.seconds,
                args.connections,
                first=number * batch_count,
            )
            result["then_s"] = caught_up(bridge_port)
            result["cpu_us"] = cpu_per_request(bridge.pid, before, result, args.seconds)
            batch_rows.append((result, os.getloadavg()[0]))
        stats = httpx.get(f"http://127.0.0.1:{bridge_port}/readyz").json()
    finally:
        for proc in (bare, raw, bridge, sink):
            proc.terminate()
            proc.wait(30)
    report(args, rows, batch_rows, stats)


def caught_up(port: int, within: float = 900) -> float:
    """Wait until the bridge's translate stage has taken every delivery appended (its work
    belongs to the run that appended them, not to the next); seconds waited."""
    started = time.monotonic()
    while httpx.get(f"http://127.0.0.1:{port}/readyz").json()["untranslated"]:
        if time.monotonic() - started > within:
            raise SystemExit(f"the translate stage did not catch up within {within:g}s")
        time.sleep(0.25)
    return time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    """User and system CPU the process has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_request(pid: int, before: float, result: dict[str, float], seconds: int) -> float:
    """Microseconds of the server's CPU per request answered, from the start of the run
    until the translate stage caught up with it (`caught_up`)."""
    return (cpu_seconds(pid) - before) / max(result["rate"] * seconds, 1) * 1e6


def report(
    args: argparse.Namespace,
    rows: list[tuple[str, dict[str, float], float]],
    batch_rows: list[tuple[dict[str, float], float]],
    stats: dict[str, object],
) -> None:
    print(
        f"{'':22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'ratio':>6}"
        f" {'CPU/req':>8} {'then s':>6} {'load':>5}"
    )
    ratios: list[float] = []
    ceiling: list[float] = []
    p99s: list[float] = []
    cpus: list[float] = []
    for index, (name, r, load) in enumerate(rows):
        base = rows[index - index % len(SERVERS)][1]["rate"]
        if index % len(SERVERS) == len(SERVERS) - 1:
            ratios.append(r["rate"] / base)
            ceiling.append(r["rate"] / rows[index - 1][1]["rate"])
            p99s.append(r["p99"])
            cpus.append(r["cpu_us"])
        print(
            f"{name:22} {r['rate']:>9,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}"
            f" {r['errors']:>8.0f} {r['rate'] / base:>6.2f} {r['cpu_us']:>5.0f} us"
            f" {r.get('then_s', 0):>6.1f} {load:>5.2f}"
        )
    print(
        f"relay track over {len(ratios)} run(s), medians: {statistics.median(ratios):.2f} of the"
        f" bare POST, {statistics.median(ceiling):.2f} of the raw route, p99"
        f" {statistics.median(p99s):.1f} ms, {statistics.median(cpus):.0f} us of the bridge's"
        " CPU a call"
    )
    print(
        f"\n{'batches of ' + str(args.batch_size):22} {'req/s':>9} {'events/s':>9}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'CPU/event':>10} {'then s':>6}"
        f" {'translated/s':>12} {'load':>5}"
    )
    for r, load in batch_rows:
        events = r["rate"] * args.batch_size
        print(
            f"{'relay batch':22} {r['rate']:>9,.0f} {events:>9,.0f}"
            f" {r['p50']:>8.2f} {r['p99']:>8.2f} {r['errors']:>8.0f}"
            f" {r['cpu_us'] / args.batch_size:>7.1f} us {r['then_s']:>6.1f}"
            f" {events * args.seconds / (args.seconds + r['then_s']):>12,.0f} {load:>5.2f}"
        )
    print(
        "(then s: how long the translate stage took after wrk stopped to catch up with what"
        " the run appended; CPU/req and CPU/event include it)"
    )
    print(
        f"\nbridge after the run: {stats.get('untranslated')} deliveries untranslated,"
        f" {stats.get('pending')} calls pending "
        f"({args.connections} connections, {args.seconds}s each, wrk -t2, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
